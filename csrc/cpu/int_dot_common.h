// Parts of the integer-dot attention shared by every instruction set
// (int_dot_avx512.h, int_dot_avx2.h, int_dot_neon.h): the int8 form of a
// query row and where value elements sit in the integer accumulators. See
// int_dot_avx512.h for the math.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace kvsnap::cpu::KVSNAP_ISA {

namespace {

// The int8 form of one query row, laid out like a packed key row's bytes:
// 4-bit keys hold elements 2j (low nibble) and 2j+1 (high nibble) in byte j,
// so lo[j] = q8[2j], hi[j] = q8[2j+1]; 8-bit keys hold element j in byte j
// (lo[j] = q8[j], hi unused).
struct IntQuery {
  static constexpr int kMaxBytes = 256; // kMaxDim elements at 8 bits
  alignas(64) int8_t lo[kMaxBytes];
  alignas(64) int8_t hi[kMaxBytes / 2];
  alignas(64) int8_t res[kMaxBytes]; // 8-bit keys: the rounding residual, in steps qs / (2 QMAX)
  float qs[16]; // per key group: int8 step (0 for an all-zero group)
  float qsum[16]; // per key group: sum of the float query's elements
  int32_t q8sum[16]; // per key group: sum of the int8 query (and of res below),
  int32_t res_sum[16]; // for kernels that take codes as signed bytes (c - 128)
};

// The keys of a run of the cache (row_run) from one key on, as every
// instruction set's scoring functions take them: key u's codes at
// kp + u * kst words, its scales and biases (one per key group, elements of
// the scales' dtype) at ks + u * sst and kb + u * bst elements.
struct KeyRun {
  const uint32_t* kp;
  const char* ks;
  const char* kb;
  int64_t kst, sst, bst;

  // The same run from key u on (SD: the scales' dtype).
  template <DType SD>
  KeyRun from(int64_t u) const {
    constexpr int kScaleBytes = SD == DType::f32 ? 4 : 2;
    return {kp + u * kst, ks + u * sst * kScaleBytes, kb + u * bst * kScaleBytes, kst, sst, bst};
  }
};

// Rounds a query row to int8 in [-QMAX, QMAX] with one step per key group.
// QMAX is 127 unless the instruction set's 16-bit pair sums would overflow
// (vpmaddubsw with 8-bit codes: 2 * 255 * 63 < 32768).
template <int KB, int QMAX>
void quantize_query(const float* q, int D, int gs, IntQuery& out) {
  for (int g = 0; g < D / gs; ++g) {
    float amax = 0.f, sum = 0.f;
    for (int i = g * gs; i < (g + 1) * gs; ++i) {
      amax = std::max(amax, std::abs(q[i]));
      sum += q[i];
    }
    float step = amax / float(QMAX);
    // A group below 1e-30 (denormal; QMAX / amax would overflow) counts as 0.
    float inv = amax > 1e-30f ? float(QMAX) / amax : 0.f;
    out.qs[g] = step;
    out.qsum[g] = sum;
    int32_t q8sum = 0, res_sum = 0;
    for (int i = g * gs; i < (g + 1) * gs; ++i) {
      long v = std::lrint(q[i] * inv);
      q8sum += int32_t(v);
      if constexpr (KB == 4) {
        (i % 2 ? out.hi : out.lo)[i / 2] = int8_t(v);
      } else {
        out.lo[i] = int8_t(v);
        long r = std::lrint((q[i] * inv - float(v)) * float(2 * QMAX));
        out.res[i] = int8_t(std::clamp(r, long(-QMAX), long(QMAX)));
        res_sum += out.res[i];
      }
    }
    out.q8sum[g] = q8sum;
    out.res_sum[g] = res_sum;
  }
}

// out[g * ost + u] = the scale (or bias) of key u < 8, group g < G, for the
// keys at p, p + st, ... (elements of SD); 0 for keys u >= n. The
// instruction sets' load_params8 fall back to it.
template <DType SD>
void load_params(const char* p, int64_t st, int G, int n, float* out, int ost) {
  for (int u = 0; u < 8; ++u) {
    for (int g = 0; g < G; ++g) {
      out[g * ost + u] = u < n ? load_elem<SD>(p, u * st + g) : 0.f;
    }
  }
}

// Where the elements of a value row sit in the int32 lanes of the P.V
// accumulators, for vectors of W bytes (W / 4 lanes). The codes of 4 keys
// are interleaved W packed bytes at a time (one column block cb; at 4 bits
// the low and high nibbles are separate planes); vector m of a block holds,
// in lane 4L + i, byte 16L + 4m + i of the 4 keys (L: the 128-bit lane, as
// byte unpacks work within them). Lanes past the row (head dims not a
// multiple of W * 2 / bits) hold zeros.
template <int W>
struct ValueLayout {
  static constexpr int kLanes = W / 4;
  static constexpr int kMaxVec = 1024 / W; // 256 elements at 4 or 8 bits
  int n_vec = 0; // int32 vectors of kLanes lanes per row
  int n_pat = 0; // distinct group patterns among them
  int pat[kMaxVec] = {}; // pattern of vector k
  alignas(64) int32_t group[kMaxVec][kLanes] = {}; // per pattern: group of each lane
  // Per pattern: the group of each quad of lanes (4x .. 4x+3: 16 bytes of
  // one 128-bit lane), or -1 where a quad spans two groups (groups of fewer
  // than 32 elements at 4 bits, 16 at 8). lane_weights broadcasts a
  // uniform quad's 4 weights instead of gathering them lane by lane.
  int32_t quad[kMaxVec][kLanes / 4] = {};
  int16_t elem[kMaxVec * kLanes] = {}; // element of lane k * kLanes + x, -1 for padding
  int16_t lane[kMaxVec * kLanes] = {}; // lane of element d (d < D): elem's inverse
  // The vectors of one column block (4 per nibble plane) are vectors
  // cb * vec_per_block ... Where every block's vectors agree on the group of
  // each lane (padding lanes agree with anything: groups of at least 32
  // elements at 4 bits, 16 at 8), blocks_uniform, and block_group /
  // block_quad are that lane's group and each quad's, as group / quad: the
  // P.V product then takes one weight vector per block of keys for all of
  // a column block's vectors.
  int vec_per_block = 0;
  bool blocks_uniform = true;
  alignas(64) int32_t block_group[kMaxVec][kLanes] = {};
  int32_t block_quad[kMaxVec][kLanes / 4] = {};

  // The group of 4 lanes (g[i] -2: padding, codes of zero, which take any
  // group), or -1 where they span two groups.
  static int32_t quad_group(const int32_t* g) {
    int32_t qg = -2;
    for (int i = 0; i < 4; ++i) {
      if (g[i] >= 0) {
        qg = qg == -2 || qg == g[i] ? g[i] : -1;
      }
    }
    return qg == -2 ? 0 : qg;
  }

  ValueLayout(int D, int gs, int bits) {
    const int row_bytes = D * bits / 8;
    const int planes = bits == 4 ? 2 : 1;
    n_vec = (row_bytes + W - 1) / W * planes * 4;
    for (int k = 0; k < n_vec; ++k) {
      int cb = k / (4 * planes), plane = k / 4 % planes, m = k % 4;
      int32_t g[kLanes], gq[kLanes]; // gq: -2 for padding
      for (int x = 0; x < kLanes; ++x) {
        int j = W * cb + 16 * (x / 4) + 4 * m + x % 4;
        int d = j < row_bytes ? (bits == 4 ? 2 * j + plane : j) : -1;
        elem[k * kLanes + x] = int16_t(d);
        if (d >= 0) {
          lane[d] = int16_t(k * kLanes + x);
        }
        g[x] = d >= 0 ? d / gs : 0;
        gq[x] = d >= 0 ? d / gs : -2;
      }
      int p = 0;
      while (p < n_pat && std::memcmp(group[p], g, sizeof(g)) != 0) {
        ++p;
      }
      if (p == n_pat) {
        std::memcpy(group[n_pat], g, sizeof(g));
        for (int x = 0; x < kLanes / 4; ++x) {
          quad[n_pat][x] = quad_group(gq + 4 * x);
        }
        ++n_pat;
      }
      pat[k] = p;
    }
    vec_per_block = 4 * planes;
    for (int cb = 0; cb * vec_per_block < n_vec; ++cb) {
      int32_t g[kLanes]; // -2: padding in every vector of the block
      for (int x = 0; x < kLanes; ++x) {
        g[x] = -2;
        for (int k = cb * vec_per_block; k < (cb + 1) * vec_per_block; ++k) {
          int d = elem[k * kLanes + x];
          if (d >= 0) {
            blocks_uniform &= g[x] == -2 || g[x] == d / gs;
            g[x] = d / gs;
          }
        }
      }
      for (int x = 0; x < kLanes / 4; ++x) {
        int32_t qg = block_quad[cb][x] = quad_group(g + 4 * x);
        for (int i = 4 * x; i < 4 * x + 4; ++i) {
          block_group[cb][i] = g[i] >= 0 ? g[i] : std::max(qg, 0); // padding: any group
        }
      }
    }
  }
};

} // namespace

} // namespace kvsnap::cpu::KVSNAP_ISA
