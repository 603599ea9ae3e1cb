// Attention in integers with AVX-512 VNNI (vpdpbusd: unsigned bytes times
// signed bytes, four products summed into each int32 lane). Included by
// kernels_impl.h in the translation unit compiled with -mavx512vnni; replaces
// attend_block there.
//
// Query . key:
// Each query row is quantized once per call to int8 with one scale per key
// group (qs_g = max |q_g| / 127). For a key with codes c, scales s_g and
// biases b_g (k_i = s_g c_i + b_g):
//
//   q . k  =  sum_g  qs_g s_g (q8_g . c_g)  +  b_g sum(q_g)
//
// q8_g . c_g is exact in int32; sum(q_g) is taken on the float query. The only
// new error is the rounding of q to int8 (|error| <= qs_g / 2 per element).
// That is well below a 4-bit key's own step, not below an 8-bit key's: with
// 8-bit keys the residual q - qs_g q8 is rounded to int8 too, in steps of
// qs_g / 254, and dotted with the same codes (about 15 bits of query).
//
// Keys are scored 16 at a time with the keys in the lanes: the 16 packed rows
// are loaded as 16 x 16 dwords and transposed, so that dword column i holds
// bytes 4i .. 4i+3 of every key; one vpdpbusd per column and query row then
// adds four products to each key's running sum, with the query's four bytes
// broadcast. No horizontal sums: the 16 scores come out in one register.
//
// Probabilities . values: for a chunk of keys t with probabilities p_t and
// value scales/biases s_tg, b_tg (v_ti = s_tg c_ti + b_tg),
//
//   sum_t p_t v_ti  =  sum_t (p_t s_tg) c_ti  +  sum_t p_t b_tg
//
// The weights w_tg = p_t s_tg of one row are rounded to int8 per group and
// chunk (step max_t |w_tg| / 127; 8-bit values add a residual plane, as the
// queries of 8-bit keys); the codes of 4 consecutive keys are
// interleaved so that each int32 lane holds one element of 4 keys, and one
// vpdpbusd per 16 elements adds 4 keys' products. The bias sums stay float.
// The lanes hold the elements in a permuted order (ValueLayout), put back
// once at the end of the key range.
//
// All the rows of a tile (query heads of one KV head times query positions,
// up to kMaxRows) go through each chunk of keys together: K and V are read
// and unpacked once per chunk for all of them.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "int_dot_common.h"

namespace kvsnap::cpu::KVSNAP_ISA {

namespace {

template <int KB>
constexpr int kQueryMax = 127; // int8 queries of full range: vpdpbusd sums in int32

// In-register transpose of a 16 x 16 dword tile: c[i] lane k = r[k] lane i.
inline void transpose16(const __m512i* r, __m512i* c) {
  __m512i a[16], b[16];
  for (int k = 0; k < 16; k += 2) {
    a[k] = _mm512_unpacklo_epi32(r[k], r[k + 1]);
    a[k + 1] = _mm512_unpackhi_epi32(r[k], r[k + 1]);
  }
  // b[4m + j], 128-bit lane L: column 4L + j of keys 4m .. 4m+3.
  for (int k = 0; k < 16; k += 4) {
    b[k] = _mm512_unpacklo_epi64(a[k], a[k + 2]);
    b[k + 1] = _mm512_unpackhi_epi64(a[k], a[k + 2]);
    b[k + 2] = _mm512_unpacklo_epi64(a[k + 1], a[k + 3]);
    b[k + 3] = _mm512_unpackhi_epi64(a[k + 1], a[k + 3]);
  }
  // 4 x 4 transpose of 128-bit lanes among b[j], b[4 + j], b[8 + j], b[12 + j].
  for (int j = 0; j < 4; ++j) {
    __m512i e0 = _mm512_shuffle_i32x4(b[j], b[4 + j], 0x44);
    __m512i e1 = _mm512_shuffle_i32x4(b[j], b[4 + j], 0xEE);
    __m512i e2 = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], 0x44);
    __m512i e3 = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], 0xEE);
    c[j] = _mm512_shuffle_i32x4(e0, e2, 0x88);
    c[4 + j] = _mm512_shuffle_i32x4(e0, e2, 0xDD);
    c[8 + j] = _mm512_shuffle_i32x4(e1, e3, 0x88);
    c[12 + j] = _mm512_shuffle_i32x4(e1, e3, 0xDD);
  }
}

// 64 6-bit codes (a row's bit stream from p: 48 bytes, the first n_bytes of
// them read) as 64 bytes, code i in byte i. Lane L of 128 bits takes bytes
// 12L .. 12L+11 (4 groups of 3 bytes = 4 codes each); each group goes into a
// dword v, and code k of it (bits 6k .. 6k+5 of v) into byte k: byte k of
// v << 2k, masked to 6 bits.
inline __m512i widen6(const uint8_t* p, int n_bytes) {
  const __mmask64 m = n_bytes >= 64 ? ~__mmask64(0) : (__mmask64(1) << n_bytes) - 1;
  __m512i x = _mm512_maskz_loadu_epi8(m, p);
  x = _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 1, 2, 0, 3, 4, 5, 0, 6, 7, 8, 0, 9, 10, 11, 0), x);
  const __m512i groups = _mm512_broadcast_i32x4(_mm_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1));
  const __m512i v = _mm512_shuffle_epi8(x, groups);
  __m512i r = _mm512_mask_mov_epi8(v, __mmask64(0x2222222222222222ull), _mm512_slli_epi32(v, 2));
  r = _mm512_mask_mov_epi8(r, __mmask64(0x4444444444444444ull), _mm512_slli_epi32(v, 4));
  r = _mm512_mask_mov_epi8(r, __mmask64(0x8888888888888888ull), _mm512_slli_epi32(v, 6));
  return _mm512_and_si512(r, _mm512_set1_epi8(0x3F));
}

inline __m512i bcast4(const int8_t* p) {
  int32_t x;
  std::memcpy(&x, p, 4);
  return _mm512_set1_epi32(x);
}

// v with 128-bit lane i (0..3) replaced by x.
inline __m512i insert128(__m512i v, __m128i x, int i) {
  switch (i) {
    case 0:
      return _mm512_inserti32x4(v, x, 0);
    case 1:
      return _mm512_inserti32x4(v, x, 1);
    case 2:
      return _mm512_inserti32x4(v, x, 2);
    default:
      return _mm512_inserti32x4(v, x, 3);
  }
}

// simd::exp_neg on 16 lanes: exp(x) for x <= 0 (-inf and below -87.3: 0).
inline __m512 exp_neg16(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.3f);
  __mmask16 zero = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
  x = _mm512_max_ps(x, lo);
  __m512 n = _mm512_roundscale_ps(
      _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  __m512 y = _mm512_scalef_ps(p, n); // p * 2^n
  return _mm512_maskz_mov_ps(__mmask16(~zero), y);
}

// Scales (or biases) of n <= 16 keys as floats, out[g][u] for group g of key
// u (keys past n: 0), the first key's at p, key u's at p + u * stride elements.
template <DType SD>
void load_meta16(const char* p, int64_t stride, int n_groups, int n, float (*out)[16]) {
  if constexpr (SD == DType::f16) {
    if (stride == n_groups && n_groups == 1) {
      __m256i h = _mm256_maskz_loadu_epi16(__mmask16((1u << n) - 1), p);
      _mm512_store_ps(out[0], _mm512_cvtph_ps(h));
      return;
    }
    if (stride == n_groups && n_groups == 2) {
      __mmask32 m = n == 16 ? ~__mmask32(0) : __mmask32((1u << (2 * n)) - 1);
      __m512i h = _mm512_maskz_loadu_epi16(m, p);
      __m512 f0 = _mm512_cvtph_ps(_mm512_castsi512_si256(h)); // keys 0-7, g0 g1 g0 g1 ...
      __m512 f1 = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1)); // keys 8-15
      const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
      const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
      _mm512_store_ps(out[0], _mm512_permutex2var_ps(f0, even, f1));
      _mm512_store_ps(out[1], _mm512_permutex2var_ps(f0, odd, f1));
      return;
    }
  }
  for (int u = 0; u < 16; ++u) {
    for (int g = 0; g < n_groups; ++g) {
      out[g][u] = u < n ? load_elem<SD>(p, u * stride + g) : 0.f;
    }
  }
}

// Scores (before masks) of n <= 16 keys, key u at kp + u * kst words with
// scales/biases at ks + u * sst, kb + u * bst elements, for the R query rows
// qi[0..R): out[r * out_st + u]. Keys past n score garbage (the caller
// ignores them). 6-bit keys are widened to bytes as they are loaded and then
// summed as 8-bit keys are (the queries have the residual plane).
template <int KB, DType SD>
void int_scores16(
    const uint32_t* kp,
    int64_t kst,
    const char* ks,
    const char* kb,
    int64_t sst,
    int64_t bst,
    int n,
    int D,
    int gs,
    const IntQuery* const* qi,
    int R,
    float* out,
    int out_st) {
  const int n_groups = D / gs;
  constexpr int KC = KB == 6 ? 8 : KB; // bits per code in the integer sums
  const int row_bytes = D * KC / 8;
  alignas(64) float scale[16][16]; // [group][key]
  alignas(64) float bias[16][16];
  load_meta16<SD>(ks, sst, n_groups, n, scale);
  load_meta16<SD>(kb, bst, n_groups, n, bias);
  // Bias terms first: score = sum_g b_g qsum_g + ...
  for (int r = 0; r < R; ++r) {
    __m512 s = _mm512_setzero_ps();
    for (int g = 0; g < n_groups; ++g) {
      s = _mm512_fmadd_ps(_mm512_load_ps(bias[g]), _mm512_set1_ps(qi[r]->qsum[g]), s);
    }
    _mm512_storeu_ps(out + r * out_st, s);
  }
  const __m512i nib = _mm512_set1_epi8(0x0F);
  // Elements per dword column of packed bytes: 8 at 4 bits, 4 at 8 bits.
  constexpr int kElemsPerCol = KC == 4 ? 8 : 4;
  const int cols_per_group = gs / kElemsPerCol;
  for (int cb = 0; cb < row_bytes; cb += 64) {
    int w = std::min(64, row_bytes - cb); // bytes of this 64-byte column block
    __mmask64 m = w == 64 ? ~__mmask64(0) : ((__mmask64(1) << w) - 1);
    __m512i rows[16], cols[16];
    for (int u = 0; u < 16; ++u) {
      const uint8_t* row = reinterpret_cast<const uint8_t*>(kp + (u < n ? u : 0) * kst);
      if constexpr (KB == 6) {
        rows[u] = widen6(row + cb / 4 * 3, w / 4 * 3);
      } else {
        rows[u] = _mm512_maskz_loadu_epi8(m, row + cb);
      }
    }
    transpose16(rows, cols);
    const int n_cols = w / 4;
    const int col0 = cb / 4; // index of this block's first column in the row
    __m512i lo[16], hi[16]; // the columns' codes as bytes (4 bits: both nibbles)
    for (int c = 0; c < n_cols; ++c) {
      if constexpr (KC == 4) {
        lo[c] = _mm512_and_si512(cols[c], nib);
        hi[c] = _mm512_and_si512(_mm512_srli_epi16(cols[c], 4), nib);
      } else {
        lo[c] = cols[c];
      }
    }
    // Columns in groups: accumulate a group in int32, then fold its scale.
    for (int r = 0; r < R; ++r) {
      const IntQuery& q = *qi[r];
      __m512 s = _mm512_loadu_ps(out + r * out_st);
      for (int c = 0; c < n_cols;) {
        int g = (col0 + c) / cols_per_group;
        int c_end = std::min(n_cols, (g + 1) * cols_per_group - col0);
        // Two sums (low and high nibbles, or codes and residuals): half the
        // dependency chain.
        __m512i acc = _mm512_setzero_si512(), acc_res = _mm512_setzero_si512();
        for (; c < c_end; ++c) {
          int byte = (col0 + c) * 4;
          acc = _mm512_dpbusd_epi32(acc, lo[c], bcast4(q.lo + byte));
          if constexpr (KC == 4) {
            acc_res = _mm512_dpbusd_epi32(acc_res, hi[c], bcast4(q.hi + byte));
          } else {
            acc_res = _mm512_dpbusd_epi32(acc_res, lo[c], bcast4(q.res + byte));
          }
        }
        if constexpr (KC == 4) {
          acc = _mm512_add_epi32(acc, acc_res);
        }
        __m512 f = _mm512_mul_ps(_mm512_load_ps(scale[g]), _mm512_set1_ps(q.qs[g]));
        s = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), f, s);
        if constexpr (KC == 8) {
          s = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc_res), _mm512_mul_ps(f, _mm512_set1_ps(1.f / 254)), s);
        }
      }
      _mm512_storeu_ps(out + r * out_st, s);
    }
  }
}

// The codes of 4 value rows (v[0..3]; nullptr: a row of zeros) as
// ValueLayout's n_vec vectors at x[0 .. n_vec).
template <int VB>
void interleave4(const uint8_t* const* v, int row_bytes, __m512i* x) {
  const __m512i nib = _mm512_set1_epi8(0x0F);
  int k = 0;
  for (int cb = 0; cb < row_bytes; cb += 64) {
    int w = std::min(64, row_bytes - cb);
    __mmask64 m = w == 64 ? ~__mmask64(0) : ((__mmask64(1) << w) - 1);
    __m512i r[4];
    for (int u = 0; u < 4; ++u) {
      r[u] = v[u] ? _mm512_maskz_loadu_epi8(m, v[u] + cb) : _mm512_setzero_si512();
    }
    // Byte unpacks commute with the nibble split: interleave the packed
    // bytes once, then split each result (8 shuffles per 4 rows, not 16).
    __m512i a01 = _mm512_unpacklo_epi8(r[0], r[1]), b01 = _mm512_unpackhi_epi8(r[0], r[1]);
    __m512i a23 = _mm512_unpacklo_epi8(r[2], r[3]), b23 = _mm512_unpackhi_epi8(r[2], r[3]);
    __m512i y[4] = {
        _mm512_unpacklo_epi16(a01, a23),
        _mm512_unpackhi_epi16(a01, a23),
        _mm512_unpacklo_epi16(b01, b23),
        _mm512_unpackhi_epi16(b01, b23)};
    for (int i = 0; i < 4; ++i) {
      if constexpr (VB == 4) {
        x[k + i] = _mm512_and_si512(y[i], nib);
        x[k + 4 + i] = _mm512_and_si512(_mm512_srli_epi16(y[i], 4), nib);
      } else {
        x[k + i] = y[i];
      }
    }
    k += VB == 4 ? 8 : 4;
  }
}

// attend_block's job for all R <= kMaxRows rows of a tile at once, in integers.
template <int KB, int VB, DType SD>
void attend_rows_int(
    const AttentionArgs& a,
    int b,
    int h,
    const Row* rows,
    int R,
    int t0,
    int t1,
    float* m,
    float* l,
    float* acc) {
  const QuantSource& src = a.kv;
  const int D = src.head_dim;
  const int gs = src.group_size;
  const int n_groups = D / gs;
  const int v_row_bytes = D * VB / 8;
  constexpr int kScaleBytes = SD == DType::f32 ? 4 : 2;
  constexpr int kBlocks = kChunk / 4; // blocks of 4 keys in a chunk
  static_assert(kChunk == 32);
  const ValueLayout<64> layout(D, gs, VB);
  const int NV = layout.n_vec;

  alignas(64) float acc_perm[kMaxRows][kMaxDim]; // sum_t w_t c_t, ValueLayout order
  float bias_sum[kMaxRows][16]; // sum_t p_t b_tg
  alignas(64) float sc[kMaxRows][kChunk];
  alignas(64) __m512i xv[kBlocks][16]; // the chunk's value codes, interleaved
  alignas(64) float v_scale[16][32], v_bias[16][32]; // [group][key of chunk]
  const IntQuery* qi[kMaxRows];
  bool active[kMaxRows];
  for (int r = 0; r < R; ++r) {
    qi[r] = rows[r].qi;
    m[r] = kNegInf;
    l[r] = 0.f;
    std::fill(acc_perm[r], acc_perm[r] + NV * 16, 0.f);
    std::fill(bias_sum[r], bias_sum[r] + n_groups, 0.f);
  }

  for (int t = t0; t < t1;) {
    RowRun run = row_run(src, b, h, t);
    int run_end = std::min(t1, t + run.run);
    // Chunks at multiples of kChunk: a key falls in the same chunk whatever
    // the tile's other rows (the weights' int8 steps are per chunk), so a
    // row gets the same bits alone or batched.
    for (int c0 = t, n = 0; c0 < run_end; c0 += n) {
      n = std::min((c0 / kChunk + 1) * kChunk, run_end) - c0;
      int64_t j0 = c0 - t;
      bool any = false;
      for (int r = 0; r < R; ++r) {
        active[r] = rows[r].kmin < c0 + n && rows[r].kmax > c0;
        any |= active[r];
      }
      if (!any) {
        continue;
      }
      // Scores, then key ranges and masks.
      for (int j = 0; j < n; j += 16) {
        int64_t jj = j0 + j;
        int_scores16<KB, SD>(
            run.kp + jj * run.st[0],
            run.st[0],
            static_cast<const char*>(run.ks) + jj * run.st[1] * kScaleBytes,
            static_cast<const char*>(run.kb) + jj * run.st[2] * kScaleBytes,
            run.st[1],
            run.st[2],
            std::min(16, n - j),
            D,
            gs,
            qi,
            R,
            &sc[0][j],
            kChunk);
      }
      for (int r = 0; r < R; ++r) {
        const Row& row = rows[r];
        // Keys [lo, hi) of the chunk are in the row's range; the rest -inf.
        int lo = std::clamp(row.kmin - c0, 0, n), hi = std::clamp(row.kmax - c0, 0, n);
        uint32_t keep = hi > lo ? uint32_t((uint64_t(1) << hi) - (uint64_t(1) << lo)) : 0u;
        const __m512 ninf = _mm512_set1_ps(kNegInf);
        _mm512_store_ps(&sc[r][0], _mm512_mask_mov_ps(ninf, __mmask16(keep), _mm512_load_ps(&sc[r][0])));
        _mm512_store_ps(
            &sc[r][16], _mm512_mask_mov_ps(ninf, __mmask16(keep >> 16), _mm512_load_ps(&sc[r][16])));
        if (row.mask && !a.mask_is_bool && row.mask_st == 1) {
          // A float mask along the keys: added 16 keys at a time.
          const float* mrow = static_cast<const float*>(row.mask) + c0;
          for (int j = 0; j < 32; j += 16) {
            const __mmask16 in = __mmask16(keep >> j);
            if (in) {
              __m512 add = _mm512_maskz_loadu_ps(in, mrow + j);
              _mm512_store_ps(&sc[r][j], _mm512_add_ps(_mm512_load_ps(&sc[r][j]), add));
            }
          }
        } else if (row.mask) {
          for (int j = lo; j < hi; ++j) {
            int64_t mi = int64_t(c0 + j) * row.mask_st;
            if (a.mask_is_bool) {
              if (!static_cast<const uint8_t*>(row.mask)[mi]) {
                sc[r][j] = kNegInf;
              }
            } else {
              sc[r][j] += static_cast<const float*>(row.mask)[mi];
            }
          }
        }
      }
      if (a.bias_rank > 0) {
        // The key-offset correction (kernels_impl.h), in 256-bit FMAs: 512-bit
        // float FMAs would lower the core's clock for the whole kernel.
        add_score_bias(a, rows, R, c0, n, sc);
      }
      // Softmax update: sc becomes the chunk's probabilities.
      for (int r = 0; r < R; ++r) {
        __m512 s0 = _mm512_load_ps(&sc[r][0]), s1 = _mm512_load_ps(&sc[r][16]);
        float cmax = _mm512_reduce_max_ps(_mm512_max_ps(s0, s1));
        if (cmax == kNegInf) {
          active[r] = false;
          continue;
        }
        float m_new = std::max(m[r], cmax);
        if (m_new != m[r]) {
          float corr = std::exp(m[r] - m_new);
          l[r] *= corr;
          scale_row(corr, acc_perm[r], NV * 16);
          for (int g = 0; g < n_groups; ++g) {
            bias_sum[r][g] *= corr;
          }
          m[r] = m_new;
        }
        __m512 mv = _mm512_set1_ps(m_new);
        __m512 p0 = exp_neg16(_mm512_sub_ps(s0, mv)), p1 = exp_neg16(_mm512_sub_ps(s1, mv));
        _mm512_store_ps(&sc[r][0], p0);
        _mm512_store_ps(&sc[r][16], p1);
        l[r] += _mm512_reduce_add_ps(_mm512_add_ps(p0, p1));
      }
      // Values of the chunk: scales/biases by group, codes interleaved.
      for (int j = 0; j < kChunk; j += 16) {
        int64_t jj = j0 + j;
        int nj = std::max(0, std::min(16, n - j));
        alignas(64) float tmp_s[16][16], tmp_b[16][16];
        if (nj > 0) {
          load_meta16<SD>(
              static_cast<const char*>(run.vs) + jj * run.st[4] * kScaleBytes,
              run.st[4], n_groups, nj, tmp_s);
          load_meta16<SD>(
              static_cast<const char*>(run.vb) + jj * run.st[5] * kScaleBytes,
              run.st[5], n_groups, nj, tmp_b);
        } else {
          for (int g = 0; g < n_groups; ++g) {
            std::fill(tmp_s[g], tmp_s[g] + 16, 0.f);
            std::fill(tmp_b[g], tmp_b[g] + 16, 0.f);
          }
        }
        for (int g = 0; g < n_groups; ++g) {
          std::memcpy(&v_scale[g][j], tmp_s[g], sizeof(tmp_s[g]));
          std::memcpy(&v_bias[g][j], tmp_b[g], sizeof(tmp_b[g]));
        }
      }
      for (int blk = 0; blk < kBlocks; ++blk) {
        const uint8_t* v[4];
        for (int u = 0; u < 4; ++u) {
          int j = 4 * blk + u;
          v[u] = j < n ? reinterpret_cast<const uint8_t*>(run.vp + (j0 + j) * run.st[3]) : nullptr;
        }
        interleave4<VB>(v, v_row_bytes, xv[blk]);
      }
      const int n_blocks = (n + 3) / 4;
      constexpr int WP = VB == 8 ? 2 : 1; // weight planes (8 bits: int8 + residual)
      for (int r = 0; r < R; ++r) {
        if (!active[r]) {
          continue;
        }
        // Weights w_tg = p_t s_tg in int8, one step per group; bias sums.
        // wz[plane]: dword g * 8 + blk holds the weights of keys 4 blk ..
        // 4 blk + 3 for group g (groups 0-3, kept in registers); more groups
        // go through w8 in memory.
        alignas(64) int8_t w8[WP][16][kChunk];
        alignas(64) float step[16] = {};
        __m512i wz[WP][2] = {};
        for (int g = 0; g < n_groups; ++g) {
          __m512 w0 = _mm512_mul_ps(_mm512_load_ps(&sc[r][0]), _mm512_load_ps(&v_scale[g][0]));
          __m512 w1 = _mm512_mul_ps(_mm512_load_ps(&sc[r][16]), _mm512_load_ps(&v_scale[g][16]));
          __m512 bs = _mm512_mul_ps(_mm512_load_ps(&sc[r][0]), _mm512_load_ps(&v_bias[g][0]));
          bs = _mm512_fmadd_ps(_mm512_load_ps(&sc[r][16]), _mm512_load_ps(&v_bias[g][16]), bs);
          bias_sum[r][g] += _mm512_reduce_add_ps(bs);
          float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(w0), _mm512_abs_ps(w1)));
          // Below 1e-30 (denormal weights; 127 / amax would overflow) the
          // weights count as 0, as in int_dot_rows.h.
          float inv = amax > 1e-30f ? 127.f / amax : 0.f;
          step[g] = amax / 127.f;
          __m512 vi = _mm512_set1_ps(inv);
          for (int half = 0; half < 2; ++half) {
            __m512 x = _mm512_mul_ps(half ? w1 : w0, vi);
            __m512i xi = _mm512_cvtps_epi32(x);
            __m128i b8[WP];
            b8[0] = _mm512_cvtepi32_epi8(xi);
            if constexpr (VB == 8) {
              __m512 res = _mm512_mul_ps(_mm512_sub_ps(x, _mm512_cvtepi32_ps(xi)), _mm512_set1_ps(254.f));
              b8[1] = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(res));
            }
            for (int plane = 0; plane < WP; ++plane) {
              if (n_groups <= 4) {
                wz[plane][g / 2] = insert128(wz[plane][g / 2], b8[plane], 2 * (g % 2) + half);
              } else {
                _mm_store_si128(reinterpret_cast<__m128i*>(&w8[plane][g][16 * half]), b8[plane]);
              }
            }
          }
        }
        // wl[plane][blk][p]: lane x holds the 4 weights of block blk for the
        // group of lane x in pattern p.
        alignas(64) __m512i wl[WP][kBlocks][16];
        for (int p = 0; p < layout.n_pat; ++p) {
          const __m512i gidx = _mm512_slli_epi32(_mm512_load_si512(layout.group[p]), 3);
          for (int blk = 0; blk < n_blocks; ++blk) {
            const __m512i idx = _mm512_add_epi32(gidx, _mm512_set1_epi32(blk));
            for (int plane = 0; plane < WP; ++plane) {
              if (n_groups <= 2) {
                wl[plane][blk][p] = _mm512_permutexvar_epi32(idx, wz[plane][0]);
              } else if (n_groups <= 4) {
                wl[plane][blk][p] = _mm512_permutex2var_epi32(wz[plane][0], idx, wz[plane][1]);
              } else {
                wl[plane][blk][p] = _mm512_i32gather_epi32(idx, w8[plane], 4);
              }
            }
          }
        }
        __m512 stepv = _mm512_load_ps(step);
        float* out = acc_perm[r];
        for (int k = 0; k < NV; ++k) {
          const int p = layout.pat[k];
          __m512i s = _mm512_setzero_si512(), s_res = _mm512_setzero_si512();
          for (int blk = 0; blk < n_blocks; ++blk) {
            s = _mm512_dpbusd_epi32(s, xv[blk][k], wl[0][blk][p]);
            if constexpr (VB == 8) {
              s_res = _mm512_dpbusd_epi32(s_res, xv[blk][k], wl[WP - 1][blk][p]);
            }
          }
          __m512 f = _mm512_permutexvar_ps(_mm512_load_si512(layout.group[p]), stepv);
          __m512 o = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), f, _mm512_load_ps(out + 16 * k));
          if constexpr (VB == 8) {
            o = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s_res), _mm512_mul_ps(f, _mm512_set1_ps(1.f / 254)), o);
          }
          _mm512_store_ps(out + 16 * k, o);
        }
      }
    }
    t = run_end;
  }
  // Back to element order, bias sums added.
  for (int r = 0; r < R; ++r) {
    float* out = acc + size_t(r) * D;
    for (int x = 0; x < NV * 16; ++x) {
      int d = layout.elem[x];
      if (d >= 0) {
        out[d] = acc_perm[r][x] + bias_sum[r][d / gs];
      }
    }
  }
}

} // namespace

} // namespace kvsnap::cpu::KVSNAP_ISA
