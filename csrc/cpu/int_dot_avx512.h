// Attention in integers with AVX-512 VNNI (vpdpbusd: unsigned bytes times
// signed bytes, four products summed into each int32 lane). Included by
// kernels_impl.h in the translation unit compiled with -mavx512vnni; replaces
// attend_block there. This file holds the math and the instruction set's
// part; the chunk loop is int_dot_rows.h, shared with AVX2 and NEON.
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
// and unpacked once per chunk for all of them. The P.V product goes column
// block by column block: one weight vector per block of 4 keys serves all
// of a block's code vectors (int_dot_rows.h).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "int_dot_common.h"
#include "int_dot_x86.h"

namespace kvsnap::cpu::KVSNAP_ISA {

namespace {


using IVec = __m512i;
constexpr int kVecBytes = 64;
constexpr int kPvRows = 4; // int_dot_rows.h; 32 registers: 4 rows' sums and steps, a code vector, most of the rows' weights

template <int KB>
constexpr int kQueryMax = 127; // int8 queries of full range: vpdpbusd sums in int32
template <int VB>
constexpr int kWeightMax = 127;
template <int VB>
constexpr int kValueCodeOffset = 0;

// vpdpbusd sums into int32: a chain is its own result, whatever the bits.
template <int CB>
inline IVec dot_step(IVec acc, IVec codes, IVec w) {
  return _mm512_dpbusd_epi32(acc, codes, w);
}

template <int CB>
inline IVec dot_finish(IVec acc) {
  return acc;
}

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

// Scales (or biases) of n <= 16 keys as floats, out[g * ost + u] for group g
// of key u (keys past n: 0), the first key's at p, key u's at p + u * stride
// elements.
template <DType SD>
__attribute__((always_inline)) inline void load_meta16(const char* p, int64_t stride, int n_groups, int n, float* out, int ost) {
  if constexpr (SD == DType::f16) {
    if (stride == n_groups && n_groups == 1) {
      __m256i h = _mm256_maskz_loadu_epi16(__mmask16((1u << n) - 1), p);
      _mm512_store_ps(out, _mm512_cvtph_ps(h));
      return;
    }
    if (stride == n_groups && n_groups == 2) {
      __mmask32 m = n == 16 ? ~__mmask32(0) : __mmask32((1u << (2 * n)) - 1);
      __m512i h = _mm512_maskz_loadu_epi16(m, p);
      __m512 f0 = _mm512_cvtph_ps(_mm512_castsi512_si256(h)); // keys 0-7, g0 g1 g0 g1 ...
      __m512 f1 = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1)); // keys 8-15
      const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
      const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
      _mm512_store_ps(out, _mm512_permutex2var_ps(f0, even, f1));
      _mm512_store_ps(out + ost, _mm512_permutex2var_ps(f0, odd, f1));
      return;
    }
  }
  for (int u = 0; u < 16; ++u) {
    for (int g = 0; g < n_groups; ++g) {
      out[g * ost + u] = u < n ? load_elem<SD>(p, u * stride + g) : 0.f;
    }
  }
}

// acc + vpdpbusd(codes, the 4 bytes at p in every lane), the bytes read by
// the instruction's own broadcast ({1to16}): GCC 12 loads them with a
// vpbroadcastd of its own instead, one more instruction per product, and
// this kernel's calls are bound by the instructions they run (RESULTS.md).
inline __m512i dpbusd_bcast(__m512i acc, __m512i codes, const int8_t* p) {
  asm("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(codes), "m"(*reinterpret_cast<const int32_t*>(p)));
  return acc;
}


// Lane x: the int8 weights of 4 keys for the group of lane x (the 4 bytes at
// w + group[x] * kChunk). Where each 128-bit lane of the vector has one
// group (quad, ValueLayout): a broadcast, plus a masked one per lane of
// another group; otherwise a gather.
inline IVec lane_weights(const int8_t* w, const int32_t* group, const int32_t* quad) {
  static_assert(kChunk == 32);
  if (quad[0] >= 0 && quad[1] >= 0 && quad[2] >= 0 && quad[3] >= 0) {
    __m512i x = _mm512_set1_epi32(load4(w + quad[0] * kChunk));
    for (int i = 1; i < 4; ++i) {
      if (quad[i] != quad[0]) {
        x = _mm512_mask_set1_epi32(x, __mmask16(0xF << (4 * i)), load4(w + quad[i] * kChunk));
      }
    }
    return x;
  }
  __m512i offsets = _mm512_slli_epi32(_mm512_load_si512(group), 5);
  return _mm512_i32gather_epi32(offsets, w, 1);
}

// A row's int8 P.V weights of a chunk (w8[g][t], at most 2 groups of 32
// bytes) as one vector, made by row_weights4 (ok). Loading them from w8
// instead waited on the 16-byte stores just made there (a 64-byte load over
// several stores is not forwarded from the store buffer): without this a
// 32K decode call took 1.04x as long (RESULTS.md, when each row's weights
// were made right before its product).
struct PackedWeights {
  __m512i v;
  bool ok; // set for each active row of a chunk (no constructor: the chunk loop's array holds kMaxRows)
};

// lane_weights of every block of 4 keys of a chunk at once (w[blk]), where
// the int8 weights of all groups fit one vector (at most 2 groups of 32
// bytes; from packed where it holds them, else from w8): one vpermd per
// block instead of a broadcast per group. False (nothing written) for more
// groups.
#define KVSNAP_BLOCK_WEIGHTS 1
inline bool block_weights(const int8_t (*w8)[kChunk], int n_groups, const int32_t* group, IVec* w, const PackedWeights& packed) {
  static_assert(kChunk == 32);
  if (n_groups > 2) {
    return false;
  }
  const __m512i all = packed.ok ? packed.v : _mm512_maskz_loadu_epi8(n_groups == 2 ? ~__mmask64(0) : __mmask64(0xFFFFFFFF), w8[0]);
  __m512i idx = _mm512_slli_epi32(_mm512_load_si512(group), 3); // dword g * 8 + blk: group g's block blk
  for (int blk = 0; blk < kChunk / 4; ++blk) {
    w[blk] = _mm512_permutexvar_epi32(idx, all);
    idx = _mm512_add_epi32(idx, _mm512_set1_epi32(1));
  }
  return true;
}

using FVec = __m512;

// Lane x: step[group[x]] (step: 16 floats).
inline FVec lane_steps(const float* step, const int32_t* group, const int32_t*) {
  return _mm512_permutexvar_ps(_mm512_load_si512(group), _mm512_loadu_ps(step));
}

inline void fma_lanes(float* out, IVec s, FVec f) {
  _mm512_storeu_ps(out, _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), f, _mm512_loadu_ps(out)));
}

inline void fma_lanes(float* out, IVec s, const float* f) {
  fma_lanes(out, s, _mm512_load_ps(f));
}

// simd::exp_neg on 16 lanes, the same steps: exp(x) for x <= 0 (below
// -87.3, -inf included: 0).
inline __m512 exp_neg16(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.3f);
  const __mmask16 zero = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
  x = _mm512_max_ps(x, lo);
  // x = n ln2 + r, |r| <= ln2 / 2
  __m512 n = _mm512_roundscale_ps(
      _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_maskz_mul_ps(__mmask16(~zero), p, _mm512_castsi512_ps(e));
}

// int_dot_rows.h's softmax steps, 16 lanes at a time: the largest score of
// each row of kChunk scores (rows_max), and (row_exp) a row's scores
// replaced by exp(score - m), their sum added to lanes[0 .. 16).
#define KVSNAP_ROW_SOFTMAX 1
inline float row_max(const float* sc) {
  static_assert(kChunk == 32);
  return _mm512_reduce_max_ps(_mm512_max_ps(_mm512_load_ps(sc), _mm512_load_ps(sc + 16)));
}

// out[r] = row_max(sc[r]) for r < R, rows 4 at a time by one tree of
// shuffles (a row's own reduction is 8 instructions).
inline void rows_max(const float (*sc)[kChunk], int R, float* out) {
  static_assert(kChunk == 32);
  int r = 0;
  for (; r + 4 <= R; r += 4) {
    __m512 a[4];
    for (int i = 0; i < 4; ++i) {
      a[i] = _mm512_max_ps(_mm512_load_ps(sc[r + i]), _mm512_load_ps(sc[r + i] + 16));
    }
    // 128-bit lanes of t01: row r's lanes 0|2, 1|3, row r+1's 0|2, 1|3 (t23: rows r+2, r+3).
    const __m512 t01 = _mm512_max_ps(_mm512_shuffle_f32x4(a[0], a[1], 0x44), _mm512_shuffle_f32x4(a[0], a[1], 0xEE));
    const __m512 t23 = _mm512_max_ps(_mm512_shuffle_f32x4(a[2], a[3], 0x44), _mm512_shuffle_f32x4(a[2], a[3], 0xEE));
    // 128-bit lane i: row r + i's 4 partial maxima; then within lanes.
    __m512 u = _mm512_max_ps(_mm512_shuffle_f32x4(t01, t23, 0x88), _mm512_shuffle_f32x4(t01, t23, 0xDD));
    u = _mm512_max_ps(u, _mm512_permute_ps(u, 0x4E));
    u = _mm512_max_ps(u, _mm512_permute_ps(u, 0xB1));
    const __m512 rows = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), u);
    _mm_storeu_ps(out + r, _mm512_castps512_ps128(rows));
  }
  for (; r < R; ++r) {
    out[r] = row_max(sc[r]);
  }
}

inline void row_exp(float* sc, float m, float* lanes) {
  const __m512 mv = _mm512_set1_ps(m);
  const __m512 p0 = exp_neg16(_mm512_sub_ps(_mm512_load_ps(sc), mv));
  const __m512 p1 = exp_neg16(_mm512_sub_ps(_mm512_load_ps(sc + 16), mv));
  _mm512_store_ps(sc, p0);
  _mm512_store_ps(sc + 16, p1);
  _mm512_store_ps(lanes, _mm512_add_ps(_mm512_load_ps(lanes), _mm512_add_ps(p0, p1)));
}

// int_dot_rows.h's P.V weights of one row for 4-bit values, 16 keys to a
// vector: for each group g, w8[g][t] = round(p_t s_tg / step[g]) with
// step[g] = max_t |p_t s_tg| / 127 (0 below 1e-30), and the 16 lanes
// b_lanes[g] += the terms of sum_t p_t b_tg; the weights of up to 2 groups
// also in packed (for block_weights). The same weights as the 8-lane loop
// there, in half the instructions (vpmovdb packs to bytes in one step).
#define KVSNAP_ROW_WEIGHTS 1
inline void row_weights4(
    const float* p, const float (*scale)[kChunk], const float (*bias)[kChunk], int n_groups, int8_t (*w8)[kChunk],
    float* step, float (*b_lanes)[16], PackedWeights& packed) {
  static_assert(kChunk == 32);
  const __m512 p0 = _mm512_load_ps(p), p1 = _mm512_load_ps(p + 16);
  __m512i all = _mm512_setzero_si512();
  for (int g = 0; g < n_groups; ++g) {
    const __m512 w0 = _mm512_mul_ps(p0, _mm512_load_ps(scale[g]));
    const __m512 w1 = _mm512_mul_ps(p1, _mm512_load_ps(scale[g] + 16));
    const __m512 bs = _mm512_fmadd_ps(p1, _mm512_load_ps(bias[g] + 16), _mm512_mul_ps(p0, _mm512_load_ps(bias[g])));
    const float w_max = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(w0), _mm512_abs_ps(w1)));
    const float inv = w_max > 1e-30f ? 127.f / w_max : 0.f;
    step[g] = w_max / 127.f;
    const __m512 vi = _mm512_set1_ps(inv);
    const __m128i x0 = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(w0, vi)));
    const __m128i x1 = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(w1, vi)));
    _mm_store_si128(reinterpret_cast<__m128i*>(w8[g]), x0);
    _mm_store_si128(reinterpret_cast<__m128i*>(w8[g] + 16), x1);
    if (g < 2) {
      all = _mm512_inserti32x4(_mm512_inserti32x4(all, x0, 2 * g), x1, 2 * g + 1);
    }
    _mm512_store_ps(b_lanes[g], _mm512_add_ps(_mm512_load_ps(b_lanes[g]), bs));
  }
  packed.v = all;
  packed.ok = n_groups <= 2;
}

// int_dot_avx2.h prepares a table of broadcast query bytes; here vpdpbusd
// broadcasts its memory operand itself ({1to16}), so there is nothing to
// prepare.
struct ScoreQueries {
  template <int KB>
  void prepare(const IntQuery* const*, int, int) {}
};

// out[r * out_st + u] += the scores of 16 keys from their code columns
// cols[c .. c + cnt) (all in key group g; byte0: the first one's byte in the
// row) for the NR query rows qi[0 .. NR): columns outer, rows inner, so
// each column is split once for NR rows and every row's two sums stay in
// registers. KC 4: the low and high nibbles against q.lo and q.hi; KC 8
// (8-bit codes, 6-bit widened): the codes against q.lo and the residual
// plane q.res. Two sums per row also halve the dependency chain.
template <int KB, int KC, int NR>
__attribute__((always_inline)) inline void score_cols(
    const __m512i* cols, int c, int cnt, int byte0, int g, const float* scale_g, const IntQuery* const* qi,
    float* out, int out_st) {
  const __m512i nib = _mm512_set1_epi8(0x0F);
  __m512i a0[NR], a1[NR];
  for (int r = 0; r < NR; ++r) {
    a0[r] = a1[r] = _mm512_setzero_si512();
  }
#pragma GCC unroll 16
  for (int i = 0; i < cnt; ++i) {
    __m512i c0 = cols[c + i], c1 = c0;
    if constexpr (KC == 4) {
      c0 = _mm512_and_si512(c0, nib);
      c1 = _mm512_and_si512(_mm512_srli_epi16(c1, 4), nib);
    }
    const int byte = byte0 + 4 * i;
    for (int r = 0; r < NR; ++r) {
      a0[r] = dpbusd_bcast(a0[r], c0, qi[r]->lo + byte);
      a1[r] = dpbusd_bcast(a1[r], c1, (KC == 4 ? qi[r]->hi : qi[r]->res) + byte);
    }
  }
  const __m512 sc = _mm512_load_ps(scale_g);
  for (int r = 0; r < NR; ++r) {
    const __m512 f = _mm512_mul_ps(sc, _mm512_set1_ps(qi[r]->qs[g]));
    __m512 s = _mm512_loadu_ps(out + r * out_st);
    if constexpr (KC == 4) {
      s = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(a0[r], a1[r])), f, s);
    } else {
      const __m512 res_step = _mm512_set1_ps(1.f / float(2 * kQueryMax<KB>));
      s = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a0[r]), f, s);
      s = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a1[r]), _mm512_mul_ps(f, res_step), s);
    }
    _mm512_storeu_ps(out + r * out_st, s);
  }
}

// The code part of the scores of n <= 16 keys, key u at kp + u * kst words,
// for the R query rows qi[0..R): out[r * out_st + u] += the sum over groups
// g of scale[g * kChunk + u] qs_g (q8_g . c_g). Keys past n score garbage.
// 6-bit keys are widened to bytes as they are loaded and then summed as
// 8-bit keys are (the queries have the residual plane).
template <int KB>
__attribute__((always_inline)) inline void score_keys16(
    const uint32_t* kp, int64_t kst, int n, int D, int gs, const IntQuery* const* qi, int R, const float* scale,
    float* out, int out_st) {
  constexpr int KC = KB == 6 ? 8 : KB; // bits per code in the integer sums
  const int row_bytes = D * KC / 8;
  // Elements per dword column of packed bytes: 8 at 4 bits, 4 at 8 bits.
  constexpr int kElemsPerCol = KC == 4 ? 8 : 4;
  const int cols_per_group = gs / kElemsPerCol;
  // Key u's row at key0 + u * key_st (keys past n: the last key's row
  // again), by one pointer stepped from key to key: a table of 16 pointers
  // here was filled by vector multiplies and spilled.
  const uint8_t* const key0 = reinterpret_cast<const uint8_t*>(kp);
  const int64_t key_st = kst * 4;
  for (int cb = 0; cb < row_bytes; cb += 64) {
    int w = std::min(64, row_bytes - cb); // bytes of this 64-byte column block
    __mmask64 m = w == 64 ? ~__mmask64(0) : ((__mmask64(1) << w) - 1);
    __m512i rows[16], cols[16];
    const uint8_t* key = key0 + (KB == 6 ? cb / 4 * 3 : cb);
    const auto row = [&](const uint8_t* p) __attribute__((always_inline)) {
      if constexpr (KB == 6) {
        return widen6(p, w / 4 * 3);
      } else {
        return w == 64 ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi8(m, p);
      }
    };
    if (n == 16) {
      for (int u = 0; u < 16; ++u, key += key_st) {
        rows[u] = row(key);
        asm volatile("" : "+r"(key)); // stepped here, not precomputed for every key
      }
    } else {
      for (int u = 0; u < 16; ++u) {
        rows[u] = row(key);
        key += u + 1 < n ? key_st : 0;
      }
    }
    transpose16(rows, cols);
    const int n_cols = w / 4;
    const int col0 = cb / 4; // index of this block's first column in the row
    for_score_parts<16>(R, n_cols, col0, cols_per_group, [&](int r0, auto nr, int c, int cnt, int g)
                                  __attribute__((always_inline)) {
      score_cols<KB, KC, decltype(nr)::value>(
          cols, c, cnt, 4 * (col0 + c), g, scale + g * kChunk, qi + r0, out + r0 * out_st, out_st);
    });
  }
}

// Scores (before masks) of the n <= kChunk keys of a chunk (keys: its first
// key on) for the R query rows qi[0..R): out[r * out_st + u], u < kChunk
// (keys past n score garbage; the caller ignores them). The scales and
// biases of the chunk's keys are loaded, and the bias terms summed, once;
// then the codes 16 keys at a time. Inlined in the chunk loop: as two calls
// of a 16-key function, the calls and their set-up were ~600 of a chunk's
// ~4,400 instructions by the count; this form (with the three-pass softmax
// of int_dot_rows.h) runs 6-7.5% fewer, for 1-2% of time (RESULTS.md).
#define KVSNAP_CHUNK_SCORES 1
template <int KB, DType SD>
__attribute__((always_inline)) inline void int_scores_chunk(
    const KeyRun& keys, int n, int D, int gs, const IntQuery* const* qi, const ScoreQueries&, int R, float* out, int out_st) {
  static_assert(kChunk == 32);
  const int n_groups = D / gs;
  alignas(64) float scale[16][kChunk]; // [group][key]
  alignas(64) float bias[16][kChunk];
  const int n_lo = std::min(16, n), n_hi = n - n_lo;
  const KeyRun hi = keys.from<SD>(16); // keys 16 .. n (read only where n_hi > 0)
  load_meta16<SD>(keys.ks, keys.sst, n_groups, n_lo, scale[0], kChunk);
  load_meta16<SD>(keys.kb, keys.bst, n_groups, n_lo, bias[0], kChunk);
  if (n_hi > 0) {
    load_meta16<SD>(hi.ks, hi.sst, n_groups, n_hi, scale[0] + 16, kChunk);
    load_meta16<SD>(hi.kb, hi.bst, n_groups, n_hi, bias[0] + 16, kChunk);
  }
  // Bias terms first: score = sum_g b_g qsum_g + ... (keys past n: 0 or
  // garbage, never read).
  for (int r = 0; r < R; ++r) {
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    for (int g = 0; g < n_groups; ++g) {
      const __m512 qsum = _mm512_set1_ps(qi[r]->qsum[g]);
      s0 = _mm512_fmadd_ps(_mm512_load_ps(bias[g]), qsum, s0);
      s1 = _mm512_fmadd_ps(_mm512_load_ps(bias[g] + 16), qsum, s1);
    }
    _mm512_storeu_ps(out + r * out_st, s0);
    _mm512_storeu_ps(out + r * out_st + 16, s1);
  }
  score_keys16<KB>(keys.kp, keys.kst, n_lo, D, gs, qi, R, scale[0], out, out_st);
  if (n_hi > 0) {
    score_keys16<KB>(hi.kp, hi.kst, n_hi, D, gs, qi, R, scale[0] + 16, out + 16, out_st);
  }
}

// The codes of 4 value rows v[0..3] as ValueLayout<64>'s n_vec vectors at
// x[0 .. n_vec).
template <int VB>
__attribute__((always_inline)) inline void interleave4(const uint8_t* const* v, int row_bytes, __m512i* x) {
  const __m512i nib = _mm512_set1_epi8(0x0F);
  int k = 0;
  for (int cb = 0; cb < row_bytes; cb += 64) {
    int w = std::min(64, row_bytes - cb);
    __mmask64 m = w == 64 ? ~__mmask64(0) : ((__mmask64(1) << w) - 1);
    __m512i r[4];
    for (int u = 0; u < 4; ++u) {
      r[u] = w == 64 ? _mm512_loadu_si512(v[u] + cb) : _mm512_maskz_loadu_epi8(m, v[u] + cb);
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

} // namespace

} // namespace kvsnap::cpu::KVSNAP_ISA

#include "int_dot_rows.h"
