// Attention in integers with NEON's dot-product extension (sdot: signed
// bytes times signed bytes, four products summed into each int32 lane; Arm
// v8.2-A+dotprod). Included by kernels_impl.h in the translation unit
// compiled with -march=armv8.2-a+dotprod; the chunk loop is int_dot_rows.h,
// the math int_dot_avx512.h.
//
// sdot takes both operands signed. 4-bit codes (0 .. 15) are signed bytes
// as they are; 8-bit codes (0 .. 255) are taken as c - 128 (the top bit
// flipped), and the 128 times the sum of the other operand is added back:
// in int32 for a query (IntQuery::q8sum, exact), in the float bias sums for
// the P.V weights. Queries and weights keep the full int8 range.
//
// Keys are scored 4 at a time, one int32x4 accumulator per key over a key
// group's bytes, then summed across lanes into one vector of 4 scores.
#pragma once

#include <arm_neon.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "int_dot_common.h"

namespace kvsnap::cpu::KVSNAP_ISA {

namespace {

using IVec = int32x4_t;
constexpr int kVecBytes = 16;
constexpr int kPvRows = 1; // int_dot_rows.h; not measured with more (no arm64 machine here)

template <int KB>
constexpr int kQueryMax = 127;
template <int VB>
constexpr int kWeightMax = 127;
template <int VB>
constexpr int kValueCodeOffset = VB == 8 ? 128 : 0;

inline IVec dot4(IVec acc, IVec codes, IVec w) {
  return vdotq_s32(acc, vreinterpretq_s8_s32(codes), vreinterpretq_s8_s32(w));
}

// A chain of dot4 steps on codes of CB bits begun at zero, and its int32
// lanes (sdot sums into int32 directly: CB makes no difference here).
template <int CB>
inline IVec dot_step(IVec acc, IVec codes, IVec w) {
  return dot4(acc, codes, w);
}

template <int CB>
inline IVec dot_finish(IVec acc) {
  return acc;
}

// load_params (int_dot_common.h), as it is.
template <DType SD>
inline void load_params8(const char* p, int64_t st, int G, int n, float* out, int ost) {
  load_params<SD>(p, st, G, n, out, ost);
}

// Lane x: the int8 weights of 4 keys for the group of lane x (the 4 bytes at
// w + group[x] * kChunk); one broadcast where the 4 lanes share a group
// (quad, ValueLayout).
inline IVec lane_weights(const int8_t* w, const int32_t* group, const int32_t* quad) {
  int32_t lanes[4];
  if (quad[0] >= 0) {
    std::memcpy(&lanes[0], w + quad[0] * kChunk, 4);
    return vdupq_n_s32(lanes[0]);
  }
  for (int x = 0; x < 4; ++x) {
    std::memcpy(&lanes[x], w + group[x] * kChunk, 4);
  }
  return vld1q_s32(lanes);
}

inline void fma_lanes(float* out, IVec s, const float* f) {
  vst1q_f32(out, vfmaq_f32(vld1q_f32(out), vcvtq_f32_s32(s), vld1q_f32(f)));
}

using FVec = float32x4_t;

// Lane x: step[group[x]] (quad as in lane_weights).
inline FVec lane_steps(const float* step, const int32_t* group, const int32_t* quad) {
  if (quad[0] >= 0) {
    return vdupq_n_f32(step[quad[0]]);
  }
  const float lanes[4] = {step[group[0]], step[group[1]], step[group[2]], step[group[3]]};
  return vld1q_f32(lanes);
}

inline void fma_lanes(float* out, IVec s, FVec f) {
  vst1q_f32(out, vfmaq_f32(vld1q_f32(out), vcvtq_f32_s32(s), f));
}

// 16 bytes of a row from byte cb (zeros past row_bytes).
inline uint8x16_t load16(const uint8_t* row, int cb, int row_bytes) {
  if (row_bytes - cb >= 16) {
    return vld1q_u8(row + cb);
  }
  uint8_t tmp[16] = {};
  std::memcpy(tmp, row + cb, row_bytes - cb);
  return vld1q_u8(tmp);
}

// 16 6-bit codes (a row's bit stream at byte sb: 12 bytes; zeros past
// row_bytes) as 16 bytes, code i in byte i: each 3-byte group into a 32-bit
// lane v, code k of it (bits 6k .. 6k+5) into byte k (as int_dot_avx512.h).
inline uint8x16_t widen6(const uint8_t* row, int sb, int row_bytes) {
  uint8_t tmp[16] = {};
  std::memcpy(tmp, row + sb, std::min(12, row_bytes - sb));
  static const uint8_t kGroups[16] = {0, 1, 2, 255, 3, 4, 5, 255, 6, 7, 8, 255, 9, 10, 11, 255};
  const uint32x4_t v = vreinterpretq_u32_u8(vqtbl1q_u8(vld1q_u8(tmp), vld1q_u8(kGroups)));
  uint32x4_t r = vandq_u32(v, vdupq_n_u32(0x3F));
  r = vorrq_u32(r, vandq_u32(vshlq_n_u32(v, 2), vdupq_n_u32(0x3F00)));
  r = vorrq_u32(r, vandq_u32(vshlq_n_u32(v, 4), vdupq_n_u32(0x3F0000)));
  r = vorrq_u32(r, vandq_u32(vshlq_n_u32(v, 6), vdupq_n_u32(0x3F000000)));
  return vreinterpretq_u8_u32(r);
}

// Scores of n <= 4 keys (arguments as int_scores16), out[r * out_st + u].
template <int KB, DType SD>
void int_scores4(
    const KeyRun& keys, int n, int D, int gs, const IntQuery* const* qi, int R, float* out, int out_st) {
  const int n_groups = D / gs;
  constexpr int KC = KB == 6 ? 8 : KB; // bits per code in the integer sums (6: widened)
  const int row_bytes = D * KC / 8;
  alignas(16) float scale[16][4]; // [group][key]
  alignas(16) float bias[16][4];
  for (int u = 0; u < 4; ++u) {
    for (int g = 0; g < n_groups; ++g) {
      scale[g][u] = u < n ? load_elem<SD>(keys.ks, u * keys.sst + g) : 0.f;
      bias[g][u] = u < n ? load_elem<SD>(keys.kb, u * keys.bst + g) : 0.f;
    }
  }
  // The 4 keys' codes as signed bytes: 4 bits, low nibbles at [0, 128) and
  // high nibbles at [128, 256); 8 bits, c - 128.
  alignas(16) int8_t codes[4][256];
  const uint8x16_t nib = vdupq_n_u8(0x0F);
  for (int u = 0; u < 4; ++u) {
    const uint8_t* row = reinterpret_cast<const uint8_t*>(keys.kp + (u < n ? u : 0) * keys.kst);
    for (int cb = 0; cb < row_bytes; cb += 16) {
      uint8x16_t x = KB == 6 ? widen6(row, cb / 4 * 3, D * 6 / 8) : load16(row, cb, row_bytes);
      if constexpr (KC == 4) {
        vst1q_s8(&codes[u][cb], vreinterpretq_s8_u8(vandq_u8(x, nib)));
        vst1q_s8(&codes[u][128 + cb], vreinterpretq_s8_u8(vshrq_n_u8(x, 4)));
      } else {
        vst1q_s8(&codes[u][cb], vreinterpretq_s8_u8(veorq_u8(x, vdupq_n_u8(0x80))));
      }
    }
  }
  const int group_bytes = gs * KC / 8; // a multiple of 16 (gs >= 32)
  for (int r = 0; r < R; ++r) {
    const IntQuery& q = *qi[r];
    float32x4_t s = vdupq_n_f32(0.f);
    for (int g = 0; g < n_groups; ++g) {
      s = vfmaq_n_f32(s, vld1q_f32(bias[g]), q.qsum[g]);
    }
    for (int g = 0; g < n_groups; ++g) {
      int32x4_t acc[4], acc_res[4];
      for (int u = 0; u < 4; ++u) {
        acc[u] = acc_res[u] = vdupq_n_s32(0);
      }
      for (int byte = g * group_bytes; byte < (g + 1) * group_bytes; byte += 16) {
        int8x16_t q_lo = vld1q_s8(q.lo + byte);
        if constexpr (KC == 4) {
          int8x16_t q_hi = vld1q_s8(q.hi + byte);
          for (int u = 0; u < 4; ++u) {
            acc[u] = vdotq_s32(acc[u], vld1q_s8(&codes[u][byte]), q_lo);
            acc[u] = vdotq_s32(acc[u], vld1q_s8(&codes[u][128 + byte]), q_hi);
          }
        } else {
          int8x16_t q_res = vld1q_s8(q.res + byte);
          for (int u = 0; u < 4; ++u) {
            int8x16_t c = vld1q_s8(&codes[u][byte]);
            acc[u] = vdotq_s32(acc[u], c, q_lo);
            acc_res[u] = vdotq_s32(acc_res[u], c, q_res);
          }
        }
      }
      int32x4_t dots = vpaddq_s32(vpaddq_s32(acc[0], acc[1]), vpaddq_s32(acc[2], acc[3]));
      float32x4_t f = vmulq_n_f32(vld1q_f32(scale[g]), q.qs[g]);
      if constexpr (KC == 8) {
        dots = vaddq_s32(dots, vdupq_n_s32(128 * q.q8sum[g]));
        int32x4_t res = vpaddq_s32(vpaddq_s32(acc_res[0], acc_res[1]), vpaddq_s32(acc_res[2], acc_res[3]));
        res = vaddq_s32(res, vdupq_n_s32(128 * q.res_sum[g]));
        s = vfmaq_f32(s, vcvtq_f32_s32(res), vmulq_n_f32(f, 1.f / float(2 * kQueryMax<KB>)));
      }
      s = vfmaq_f32(s, vcvtq_f32_s32(dots), f);
    }
    vst1q_f32(out + r * out_st, s);
  }
}

// What int_dot_avx2.h prepares of a tile's query rows for its scores;
// nothing here (the int8 rows are read as they are).
struct ScoreQueries {
  template <int KB>
  void prepare(const IntQuery* const*, int, int) {}
};

// Scores (before masks) of n <= 16 keys for the R query rows (as in
// int_dot_avx512.h): sets of 4; keys past n are left as they were.
template <int KB, DType SD>
void int_scores16(
    const KeyRun& keys, int n, int D, int gs, const IntQuery* const* qi, const ScoreQueries&, int R, float* out, int out_st) {
  for (int u = 0; u < n; u += 4) {
    int_scores4<KB, SD>(keys.from<SD>(u), std::min(4, n - u), D, gs, qi, R, out + u, out_st);
  }
}

// The codes of 4 value rows v[0..3] as ValueLayout<16>'s n_vec vectors at
// x[0 .. n_vec), 8-bit codes as c - 128.
template <int VB>
void interleave4(const uint8_t* const* v, int row_bytes, int32x4_t* x) {
  const uint8x16_t nib = vdupq_n_u8(0x0F);
  int k = 0;
  for (int cb = 0; cb < row_bytes; cb += 16) {
    uint8x16_t r[4];
    for (int u = 0; u < 4; ++u) {
      r[u] = load16(v[u], cb, row_bytes);
    }
    for (int plane = 0; plane < (VB == 4 ? 2 : 1); ++plane) {
      uint8x16_t c[4];
      for (int u = 0; u < 4; ++u) {
        if constexpr (VB == 4) {
          c[u] = plane == 0 ? vandq_u8(r[u], nib) : vshrq_n_u8(r[u], 4);
        } else {
          c[u] = veorq_u8(r[u], vdupq_n_u8(0x80));
        }
      }
      uint16x8_t a01 = vreinterpretq_u16_u8(vzip1q_u8(c[0], c[1]));
      uint16x8_t b01 = vreinterpretq_u16_u8(vzip2q_u8(c[0], c[1]));
      uint16x8_t a23 = vreinterpretq_u16_u8(vzip1q_u8(c[2], c[3]));
      uint16x8_t b23 = vreinterpretq_u16_u8(vzip2q_u8(c[2], c[3]));
      x[k++] = vreinterpretq_s32_u16(vzip1q_u16(a01, a23));
      x[k++] = vreinterpretq_s32_u16(vzip2q_u16(a01, a23));
      x[k++] = vreinterpretq_s32_u16(vzip1q_u16(b01, b23));
      x[k++] = vreinterpretq_s32_u16(vzip2q_u16(b01, b23));
    }
  }
}

} // namespace

} // namespace kvsnap::cpu::KVSNAP_ISA

#include "int_dot_rows.h"
