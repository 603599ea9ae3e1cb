// Attention in integers with AVX2 (vpmaddubsw: unsigned bytes times signed
// bytes, adjacent pairs summed into int16; vpmaddwd with ones then sums the
// pairs into int32, which together do what vpdpbusd does in one step).
// Included by kernels_impl.h in the translation unit compiled with -mavx2
// -mfma -mf16c; the chunk loop is int_dot_rows.h, the math int_dot_avx512.h.
//
// The int16 pair sums saturate at 32767. 4-bit codes (<= 15) with int8 of
// full range stay far below (2 * 15 * 127 = 3810); 8-bit codes (<= 255) do
// not (2 * 255 * 127 = 64770), so queries of 8-bit keys and weights of
// 8-bit values are rounded to [-63, 63] instead (2 * 255 * 63 = 32130),
// one bit less per plane: with the residual plane about 13 bits.
//
// With KVSNAP_AVX_VNNI (the "avx2-vnni" set: CPUs with AVX-VNNI but no
// AVX-512, e.g. Intel's since Alder Lake) dot4 is one vpdpbusd on 256 bits,
// summing into int32 directly: no saturation, so 8-bit planes keep int8 of
// full range, as in int_dot_avx512.h.
//
// Keys are scored 8 at a time with the keys in the lanes (8 x 8 dword
// transpose of 32 packed bytes per key), as int_dot_avx512.h does 16.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "int_dot_common.h"
#include "int_dot_x86.h"

namespace kvsnap::cpu::KVSNAP_ISA {

namespace {

using IVec = __m256i;
constexpr int kVecBytes = 32;
constexpr int kPvRows = 1; // int_dot_rows.h; 16 registers: with 4 rows the sums spilled (avx2-int 1.05x as long at 32K)

#if defined(KVSNAP_AVX_VNNI)
template <int KB>
constexpr int kQueryMax = 127;
template <int VB>
constexpr int kWeightMax = 127;
#else
template <int KB>
constexpr int kQueryMax = KB == 8 ? 63 : 127;
template <int VB>
constexpr int kWeightMax = VB == 8 ? 63 : 127;
#endif
template <int VB>
constexpr int kValueCodeOffset = 0;

// acc + sum of four u8 x s8 products per int32 lane (no overflow within the
// ranges above).
inline IVec dot4(IVec acc, IVec codes, IVec w) {
#if defined(KVSNAP_AVX_VNNI)
  return _mm256_dpbusd_avx_epi32(acc, codes, w);
#else
  const __m256i ones = _mm256_set1_epi16(1);
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(codes, w), ones));
#endif
}

// A chain of at most kChunk / 4 = 8 dot4 steps on codes of CB bits, begun
// at zero (dot_step), and its int32 lanes (dot_finish). 4-bit codes (<= 15)
// times int8 (|w| <= 127) give vpmaddubsw pair sums of at most 3810, so 8
// of them add in int16 without overflow (30480) and widen to int32 once:
// 2 instructions per step instead of 3. The same integers, so the same
// result.
template <int CB>
inline IVec dot_step(IVec acc, IVec codes, IVec w) {
#if !defined(KVSNAP_AVX_VNNI)
  if constexpr (CB == 4) {
    return _mm256_add_epi16(acc, _mm256_maddubs_epi16(codes, w));
  }
#endif
  return dot4(acc, codes, w);
}

template <int CB>
inline IVec dot_finish(IVec acc) {
#if !defined(KVSNAP_AVX_VNNI)
  if constexpr (CB == 4) {
    return _mm256_madd_epi16(acc, _mm256_set1_epi16(1));
  }
#endif
  return acc;
}

// Keeps a chain's sum in a register at this point: without it GCC 12
// reassociates unrolled dot_step chains, storing every product on the
// stack to add them later.
inline void in_register(IVec& acc) {
  asm("" : "+x"(acc));
}

// Lane x: the int8 weights of 4 keys for the group of lane x (the 4 bytes at
// w + group[x] * kChunk). Where each 128-bit half of the lanes has one group
// (quad, ValueLayout), broadcasts: on AMD Zen 3 the gathers took a fifth of
// the P.V time.
inline IVec lane_weights(const int8_t* w, const int32_t* group, const int32_t* quad) {
  static_assert(kChunk == 32);
  if (quad[0] >= 0 && quad[0] == quad[1]) {
    return _mm256_set1_epi32(load4(w + quad[0] * kChunk));
  }
  if (quad[0] >= 0 && quad[1] >= 0) {
    return _mm256_setr_m128i(_mm_set1_epi32(load4(w + quad[0] * kChunk)), _mm_set1_epi32(load4(w + quad[1] * kChunk)));
  }
  __m256i offsets = _mm256_slli_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(group)), 5);
  return _mm256_i32gather_epi32(reinterpret_cast<const int*>(w), offsets, 1);
}

inline void fma_lanes(float* out, IVec s, const float* f) {
  _mm256_storeu_ps(out, _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_load_ps(f), _mm256_loadu_ps(out)));
}

using FVec = __m256;

// Lane x: step[group[x]] (quad as in lane_weights).
inline FVec lane_steps(const float* step, const int32_t* group, const int32_t* quad) {
  if (quad[0] >= 0 && quad[1] >= 0) {
    return _mm256_setr_m128(_mm_set1_ps(step[quad[0]]), _mm_set1_ps(step[quad[1]]));
  }
  return _mm256_i32gather_ps(step, _mm256_load_si256(reinterpret_cast<const __m256i*>(group)), 4);
}

inline void fma_lanes(float* out, IVec s, FVec f) {
  _mm256_storeu_ps(out, _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), f, _mm256_loadu_ps(out)));
}

// Dword mask of the first w / 4 dwords of a 32-byte block.
inline __m256i dword_mask(int w) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(w / 4), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// The first w bytes at p (w a multiple of 4; zeros after), m = dword_mask(w):
// a plain load where w is 32 (a masked load costs more).
inline __m256i load_bytes(const uint8_t* p, int w, __m256i m) {
  return w == 32 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                 : _mm256_maskload_epi32(reinterpret_cast<const int*>(p), m);
}

// In-register transpose of an 8 x 8 dword tile: c[i] lane k = r[k] lane i.
inline void transpose8(const __m256i* r, __m256i* c) {
  __m256i a[8], b[8];
  for (int k = 0; k < 8; k += 2) {
    a[k] = _mm256_unpacklo_epi32(r[k], r[k + 1]);
    a[k + 1] = _mm256_unpackhi_epi32(r[k], r[k + 1]);
  }
  // b[4m + j], 128-bit lane L: column 4L + j of keys 4m .. 4m+3.
  for (int k = 0; k < 8; k += 4) {
    b[k] = _mm256_unpacklo_epi64(a[k], a[k + 2]);
    b[k + 1] = _mm256_unpackhi_epi64(a[k], a[k + 2]);
    b[k + 2] = _mm256_unpacklo_epi64(a[k + 1], a[k + 3]);
    b[k + 3] = _mm256_unpackhi_epi64(a[k + 1], a[k + 3]);
  }
  for (int j = 0; j < 4; ++j) {
    c[j] = _mm256_permute2x128_si256(b[j], b[4 + j], 0x20);
    c[4 + j] = _mm256_permute2x128_si256(b[j], b[4 + j], 0x31);
  }
}

// 32 6-bit codes (a row's bit stream from p: 24 bytes, the first n_bytes of
// them read; n_bytes a multiple of 4) as 32 bytes, code i in byte i: as
// int_dot_avx512.h's widen6, on two 128-bit lanes of 12 bytes.
inline __m256i widen6(const uint8_t* p, int n_bytes) {
  __m256i x = _mm256_maskload_epi32(reinterpret_cast<const int*>(p), dword_mask(n_bytes));
  x = _mm256_permutevar8x32_epi32(x, _mm256_setr_epi32(0, 1, 2, 0, 3, 4, 5, 0));
  const __m256i groups = _mm256_setr_epi8(
      0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1, 0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1);
  const __m256i v = _mm256_shuffle_epi8(x, groups);
  __m256i r = _mm256_and_si256(v, _mm256_set1_epi32(0x3F));
  r = _mm256_or_si256(r, _mm256_and_si256(_mm256_slli_epi32(v, 2), _mm256_set1_epi32(0x3F00)));
  r = _mm256_or_si256(r, _mm256_and_si256(_mm256_slli_epi32(v, 4), _mm256_set1_epi32(0x3F0000)));
  return _mm256_or_si256(r, _mm256_and_si256(_mm256_slli_epi32(v, 6), _mm256_set1_epi32(0x3F000000)));
}

inline __m256i bcast4(const int8_t* p) {
  return _mm256_set1_epi32(load4(p));
}

// The query rows of a tile as score_cols reads them: the 4 bytes of each
// code column (the query's lo and hi planes for 4-bit codes, lo and res
// for 8-bit) broadcast to 32, by groups of 4 rows: [row group][column]
// [row in group][plane]. vpmaddubsw then reads them from memory, at
// offsets fixed within a column block, instead of a vpbroadcastd and an
// address computed per column, row and plane.
class ScoreQueries {
 public:
  template <int KB>
  void prepare(const IntQuery* const* qi, int R, int D) {
    constexpr int KC = KB == 6 ? 8 : KB;
    n_cols_ = D * KC / 32;
    const int n_groups = (R + 3) / 4;
    thread_local std::vector<__m256i> buf;
    buf.resize(size_t(n_groups) * n_cols_ * 8);
    for (int r = 0; r < R; ++r) {
      const int8_t* planes[2] = {qi[r]->lo, KC == 4 ? qi[r]->hi : qi[r]->res};
      for (int c = 0; c < n_cols_; ++c) {
        for (int p = 0; p < 2; ++p) {
          buf[((size_t(r / 4) * n_cols_ + c) * 4 + r % 4) * 2 + p] = bcast4(planes[p] + 4 * c);
        }
      }
    }
    tab_ = buf.data();
  }
  // Column col of rows r0 .. r0 + 3 (r0 a multiple of 4): 8 vectors.
  const __m256i* at(int r0, int col) const {
    return tab_ + (size_t(r0 / 4) * n_cols_ + col) * 8;
  }

 private:
  const __m256i* tab_ = nullptr;
  int n_cols_ = 0;
};

// out[r * out_st + u] += the scores of 8 keys from their code columns
// cols[c .. c + cnt) (cnt <= 8, all in key group g; qt: ScoreQueries::at
// for their first column) for the NR query rows qi[0 .. NR): columns outer, rows inner,
// so each column is split once for NR rows and every row's two sums stay
// in registers. KC 4: the low and high nibbles against q.lo and q.hi (int16
// chains, dot_step); KC 8 (8-bit codes, 6-bit widened): the codes against
// q.lo and the query's residual plane q.res.
template <int KB, int KC, int NR>
__attribute__((always_inline)) inline void score_cols(
    const __m256i* cols, int c, int cnt, const __m256i* qt, int g, const float* scale_g, const IntQuery* const* qi,
    float* out, int out_st) {
  const __m256i nib = _mm256_set1_epi8(0x0F);
  __m256i a0[NR], a1[NR];
  for (int r = 0; r < NR; ++r) {
    a0[r] = a1[r] = _mm256_setzero_si256();
  }
#pragma GCC unroll 8 // else GCC 12 rotates the sums through other registers every column
  for (int i = 0; i < cnt; ++i) {
    __m256i c0 = cols[c + i], c1 = c0;
    if constexpr (KC == 4) {
      c0 = _mm256_and_si256(c0, nib);
      c1 = _mm256_and_si256(_mm256_srli_epi16(c1, 4), nib);
    }
    for (int r = 0; r < NR; ++r) {
      a0[r] = dot_step<KC>(a0[r], c0, qt[(4 * i + r) * 2]);
      a1[r] = dot_step<KC>(a1[r], c1, qt[(4 * i + r) * 2 + 1]);
      in_register(a0[r]);
      in_register(a1[r]);
    }
  }
  const __m256 sc = _mm256_load_ps(scale_g);
  for (int r = 0; r < NR; ++r) {
    const __m256 f = _mm256_mul_ps(sc, _mm256_set1_ps(qi[r]->qs[g]));
    __m256 s = _mm256_loadu_ps(out + r * out_st);
    if constexpr (KC == 4) {
      s = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(dot_finish<4>(a0[r]), dot_finish<4>(a1[r]))), f, s);
    } else {
      const __m256 res_step = _mm256_set1_ps(1.f / float(2 * kQueryMax<KB>));
      s = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a0[r]), f, s);
      s = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a1[r]), _mm256_mul_ps(f, res_step), s);
    }
    _mm256_storeu_ps(out + r * out_st, s);
  }
}

// Scores of n <= 8 keys (arguments as int_scores16), out[r * out_st + u].
template <int KB, DType SD>
__attribute__((always_inline)) inline void int_scores8(
    const KeyRun& keys, int n, int D, int gs, const IntQuery* const* qi, const ScoreQueries& sq, int R, float* out, int out_st) {
  const int n_groups = D / gs;
  constexpr int KC = KB == 6 ? 8 : KB; // bits per code in the integer sums (6: widened)
  const int row_bytes = D * KC / 8;
  alignas(32) float scale[16][8]; // [group][key]
  alignas(32) float bias[16][8];
  load_params8<SD>(keys.ks, keys.sst, n_groups, n, scale[0], 8);
  load_params8<SD>(keys.kb, keys.bst, n_groups, n, bias[0], 8);
  for (int r = 0; r < R; ++r) {
    __m256 s = _mm256_setzero_ps();
    for (int g = 0; g < n_groups; ++g) {
      s = _mm256_fmadd_ps(_mm256_load_ps(bias[g]), _mm256_set1_ps(qi[r]->qsum[g]), s);
    }
    _mm256_storeu_ps(out + r * out_st, s);
  }
  constexpr int kElemsPerCol = KC == 4 ? 8 : 4;
  const int cols_per_group = gs / kElemsPerCol;
  const uint8_t* key[8];
  for (int u = 0; u < 8; ++u) {
    key[u] = reinterpret_cast<const uint8_t*>(keys.kp + (u < n ? u : 0) * keys.kst);
  }
  for (int cb = 0; cb < row_bytes; cb += 32) {
    int w = std::min(32, row_bytes - cb);
    const __m256i m = dword_mask(w);
    __m256i rows[8], cols[8];
    for (int u = 0; u < 8; ++u) {
      if constexpr (KB == 6) {
        rows[u] = widen6(key[u] + cb / 4 * 3, w / 4 * 3);
      } else {
        rows[u] = load_bytes(key[u] + cb, w, m);
      }
    }
    transpose8(rows, cols);
    const int n_cols = w / 4;
    const int col0 = cb / 4;
    for_score_parts<8>(R, n_cols, col0, cols_per_group, [&](int r0, auto nr, int c, int cnt, int g)
                                  __attribute__((always_inline)) {
      score_cols<KB, KC, decltype(nr)::value>(
          cols, c, cnt, sq.at(r0, col0 + c), g, scale[g], qi + r0, out + r0 * out_st, out_st);
    });
  }
}

// Scores (before masks) of n <= 16 keys for the R query rows (as in
// int_dot_avx512.h): sets of 8.
template <int KB, DType SD>
void int_scores16(
    const KeyRun& keys, int n, int D, int gs, const IntQuery* const* qi, const ScoreQueries& sq, int R, float* out, int out_st) {
  // A loop, not int_scores8 inlined twice: half the code, and on AMD Zen 3
  // a decode call 3.6% faster at 32K, 3.1% at 16K (same bits).
#pragma GCC unroll 1
  for (int h = 0; h < n; h += 8) {
    int_scores8<KB, SD>(keys.from<SD>(h), std::min(8, n - h), D, gs, qi, sq, R, out + h, out_st);
  }
}

// int_scores8's work for the 4 sets of 8 keys of a whole chunk of 4-bit
// keys in groups of 64 or more (every 32-byte column block in one group:
// kvsnap's default format), for rows in fours (R % 4 == 0): the same
// score_cols calls in the same order, so the same bits, without the
// general form's per-set checks (n < 8, ragged column blocks, row counts),
// its division for the group, and two int_scores16 calls per chunk.
template <DType SD>
void scores_whole_chunk4(
    const KeyRun& keys, int D, int gs, const IntQuery* const* qi, const ScoreQueries& sq, int R, float* out, int out_st) {
  const int n_groups = D / gs;
  const int row_bytes = D / 2;
  const int gs_shift = __builtin_ctz(unsigned(gs)); // group sizes are powers of 2
#pragma GCC unroll 1
  for (int h = 0; h < kChunk; h += 8) {
    const KeyRun set = keys.from<SD>(h);
    alignas(32) float scale[16][8]; // [group][key]
    alignas(32) float bias[16][8];
    load_params8<SD>(set.ks, set.sst, n_groups, 8, scale[0], 8);
    load_params8<SD>(set.kb, set.bst, n_groups, 8, bias[0], 8);
    for (int r = 0; r < R; ++r) {
      __m256 s = _mm256_setzero_ps();
      for (int g = 0; g < n_groups; ++g) {
        s = _mm256_fmadd_ps(_mm256_load_ps(bias[g]), _mm256_set1_ps(qi[r]->qsum[g]), s);
      }
      _mm256_storeu_ps(out + r * out_st + h, s);
    }
    const uint8_t* key = reinterpret_cast<const uint8_t*>(set.kp);
    const int64_t key_st = set.kst * 4;
#pragma GCC unroll 1
    for (int cb = 0; cb < row_bytes; cb += 32) {
      __m256i rows[8], cols[8];
      for (int u = 0; u < 8; ++u) {
        rows[u] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(key + u * key_st + cb));
      }
      transpose8(rows, cols);
      const int g = (2 * cb) >> gs_shift; // the block's 64 elements' group
      for (int r0 = 0; r0 < R; r0 += 4) {
        score_cols<4, 4, 4>(cols, 0, 8, sq.at(r0, cb / 4), g, scale[g], qi + r0, out + r0 * out_st + h, out_st);
      }
    }
  }
}

// The scores of the n <= kChunk keys of a chunk (as int_dot_avx512.h's):
// scores_whole_chunk4 where it applies, else int_scores16 per 16 keys. On
// AMD Zen 3 the whole-chunk form made a 32K decode call 0.950x as long, 4K
// 0.967x (same bits; RESULTS.md).
#define KVSNAP_CHUNK_SCORES 1
template <int KB, DType SD>
inline void int_scores_chunk(
    const KeyRun& keys, int n, int D, int gs, const IntQuery* const* qi, const ScoreQueries& sq, int R, float* out, int out_st) {
  if constexpr (KB == 4) {
    if (n == kChunk && R % 4 == 0 && gs % 64 == 0 && D % 64 == 0) {
      scores_whole_chunk4<SD>(keys, D, gs, qi, sq, R, out, out_st);
      return;
    }
  }
  for (int j = 0; j < n; j += 16) {
    int_scores16<KB, SD>(keys.from<SD>(j), std::min(16, n - j), D, gs, qi, sq, R, out + j, out_st);
  }
}

// The codes of 4 value rows v[0..3] as ValueLayout<32>'s n_vec vectors at x[0 .. n_vec).
template <int VB>
__attribute__((always_inline)) inline void interleave4(const uint8_t* const* v, int row_bytes, __m256i* x) {
  const __m256i nib = _mm256_set1_epi8(0x0F);
  int k = 0;
  for (int cb = 0; cb < row_bytes; cb += 32) {
    __m256i r[4];
    if (row_bytes - cb >= 32) {
      for (int u = 0; u < 4; ++u) {
        r[u] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v[u] + cb));
      }
    } else {
      const __m256i m = dword_mask(row_bytes - cb);
      for (int u = 0; u < 4; ++u) {
        r[u] = _mm256_maskload_epi32(reinterpret_cast<const int*>(v[u] + cb), m);
      }
    }
    // Bytes of the 4 rows interleaved, then (4 bits) split into the low
    // and high nibble planes: byte shuffles commute with the split.
    __m256i a01 = _mm256_unpacklo_epi8(r[0], r[1]), b01 = _mm256_unpackhi_epi8(r[0], r[1]);
    __m256i a23 = _mm256_unpacklo_epi8(r[2], r[3]), b23 = _mm256_unpackhi_epi8(r[2], r[3]);
    __m256i y[4] = {_mm256_unpacklo_epi16(a01, a23), _mm256_unpackhi_epi16(a01, a23),
                    _mm256_unpacklo_epi16(b01, b23), _mm256_unpackhi_epi16(b01, b23)};
    for (int i = 0; i < 4; ++i) {
      x[k + i] = VB == 4 ? _mm256_and_si256(y[i], nib) : y[i];
    }
    k += 4;
    if constexpr (VB == 4) {
      for (int i = 0; i < 4; ++i) {
        x[k + i] = _mm256_and_si256(_mm256_srli_epi16(y[i], 4), nib);
      }
      k += 4;
    }
  }
}

} // namespace

} // namespace kvsnap::cpu::KVSNAP_ISA

#include "int_dot_rows.h"
