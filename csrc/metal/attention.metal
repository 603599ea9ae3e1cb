// Fused quantized attention on Apple GPUs: the algorithm of attention_impl
// in csrc/cpu/kernels_impl.h (flash-decoding, online softmax, K/V
// dequantized in registers, never a float K/V or a score matrix in memory),
// in two passes:
//
// 1. kvsnap_attention_partial: threadgroup (split s, group of query rows of
//    KV head h, sequence b). The L * G query rows that share KV head h (G =
//    Hq / n_kv_heads query heads, L query positions) are taken kGroupRows at
//    a time, in the CPU kernel's tile order (row k: position k / G of head
//    h * G + k % G), and the threadgroup walks its part of the keys any of
//    them sees. Each of its simdgroups takes every kSimds-th key; the 32
//    lanes of a simdgroup hold the head dimension (lane j owns elements j,
//    j + 32, ...). A key and its value are read and dequantized once into
//    registers and used by every row of the group that sees them (a dot
//    product is one simd_sum per row); each row keeps its own window, mask
//    and running (max, sum, accumulator). Per row, the simdgroups' results
//    are merged in threadgroup memory and written as the split's partial
//    result of that row.
// 2. kvsnap_attention_merge: one simdgroup per query row rescales and sums
//    the partial results of its splits and writes the output row.
//
// All index arithmetic (words, shifts, groups, blocks, slots, visible keys,
// split bounds) comes from ../layout.h, shared with the CPU kernels.
#include <metal_stdlib>

#include "../layout.h"
#include "dtypes.h"
#include "params.h"

using namespace metal;

static constant constexpr const int kSimds = 4; // simdgroups per threadgroup of pass 1
static constant constexpr const int kLanes = 32;
static constant constexpr const int kMaxDim = 256;
static constant constexpr const int kPerLane = kMaxDim / kLanes; // head-dim elements per lane
static constant constexpr const int kSplitChunk = 32; // split bounds are multiples of this
// Query rows per threadgroup of pass 1: registers hold kGroupRows x kPerLane
// accumulators per thread. launch.h sizes the grid with the same numbers.
static constant constexpr const int kGroupRows = 8;

// The emulation harness (emu/harness.cpp) defines this to count the K (0)
// and V (1) elements pass 1 dequantizes; nothing for Apple's compiler.
#ifndef KVSNAP_COUNT_DEQUANT
#define KVSNAP_COUNT_DEQUANT(what)
#endif

// Groups of kGroupRows among the L * G query rows of one KV head.
inline int row_groups_per_kv_head(int L, int G) {
  return (L * G + kGroupRows - 1) / kGroupRows;
}

// Output row ([B, Hq, L] index) of row k of the L * G query rows of
// (sequence b, KV head h): position k / G of query head h * G + k % G.
inline long group_row(constant AttentionParams& p, int b, int h, int G, int k) {
  const int l = k / G;
  const int hq = h * G + k % G;
  return (long(b) * p.Hq + hq) * p.L + l;
}

// Where the six arrays of one row (token t of KV head h in sequence b) are.
template <typename ST>
struct KVRow {
  device const uint* kp;
  device const ST* ks;
  device const ST* kb;
  device const uint* vp;
  device const ST* vs;
  device const ST* vb;
};

template <typename ST>
KVRow<ST> kv_row(
    constant AttentionParams& p,
    device const uchar* arena,
    device const int* block_table,
    device const uint* k_packed,
    device const ST* k_scales,
    device const ST* k_biases,
    device const uint* v_packed,
    device const ST* v_scales,
    device const ST* v_biases,
    int k_bits,
    int v_bits,
    int b,
    int h,
    int t) {
  KVRow<ST> row;
  const int D = p.head_dim;
  if (p.paged != 0) {
    const int slot = block_table[kv_table_index(b, p.max_blocks, t, p.block_tokens)];
    device const uchar* base = arena + kv_slot_offset(slot, p.slot_bytes);
    const long r = kv_row_in_block(h, t, p.block_tokens);
    const long groups = kv_groups_per_row(D, p.group_size);
    row.kp = (device const uint*)(base + p.off[0]) + r * kv_words_per_row(D, k_bits);
    row.ks = (device const ST*)(base + p.off[1]) + r * groups;
    row.kb = (device const ST*)(base + p.off[2]) + r * groups;
    row.vp = (device const uint*)(base + p.off[3]) + r * kv_words_per_row(D, v_bits);
    row.vs = (device const ST*)(base + p.off[4]) + r * groups;
    row.vb = (device const ST*)(base + p.off[5]) + r * groups;
  } else {
    row.kp = k_packed + b * p.stride[0][0] + h * p.stride[0][1] + t * p.stride[0][2];
    row.ks = k_scales + b * p.stride[1][0] + h * p.stride[1][1] + t * p.stride[1][2];
    row.kb = k_biases + b * p.stride[2][0] + h * p.stride[2][1] + t * p.stride[2][2];
    row.vp = v_packed + b * p.stride[3][0] + h * p.stride[3][1] + t * p.stride[3][2];
    row.vs = v_scales + b * p.stride[4][0] + h * p.stride[4][1] + t * p.stride[4][2];
    row.vb = v_biases + b * p.stride[5][0] + h * p.stride[5][1] + t * p.stride[5][2];
  }
  return row;
}

// Element i of a quantized row, dequantized.
template <int BITS, typename ST>
inline float dequant(device const uint* packed, device const ST* scales, device const ST* biases, int i, int gs) {
  const int w = kv_word_of(i, BITS);
  const uint q = kv_straddles(i, BITS) ? kv_unpack2(packed[w], packed[w + 1], i, BITS)
                                       : kv_unpack(packed[w], i, BITS);
  const int g = kv_group_of(i, gs);
  return float(q) * to_float(scales[g]) + to_float(biases[g]);
}

template <typename QT, typename ST, int KB, int VB>
[[kernel]] void kvsnap_attention_partial(
    device const QT* queries [[buffer(0)]], // [B, Hq, L, D]
    device const uchar* arena [[buffer(1)]], // paged source
    device const int* block_table [[buffer(2)]],
    device const int* kv_len [[buffer(3)]], // [B]
    device const uint* k_packed [[buffer(4)]], // contiguous source
    device const ST* k_scales [[buffer(5)]],
    device const ST* k_biases [[buffer(6)]],
    device const uint* v_packed [[buffer(7)]],
    device const ST* v_scales [[buffer(8)]],
    device const ST* v_biases [[buffer(9)]],
    device const uchar* mask [[buffer(10)]],
    constant AttentionParams& p [[buffer(11)]],
    device float* part_m [[buffer(12)]], // [rows, n_splits]
    device float* part_l [[buffer(13)]], // [rows, n_splits]
    device float* part_acc [[buffer(14)]], // [rows, n_splits, D]
    uint3 tgid [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint simd_gid [[simdgroup_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  threadgroup float tg_q[kGroupRows * kMaxDim];
  threadgroup float tg_m[kSimds];
  threadgroup float tg_l[kSimds];
  threadgroup float tg_acc[kSimds * kMaxDim];

  const int D = p.head_dim;
  const int gs = p.group_size;
  const int G = p.Hq / p.n_kv_heads; // query heads per KV head
  const int groups = row_groups_per_kv_head(p.L, G);
  const int split = int(tgid.x);
  const int h = int(tgid.y) / groups;
  const int first = (int(tgid.y) % groups) * kGroupRows; // first of this group's rows of (b, h)
  const int R = min(kGroupRows, p.L * G - first);
  const int b = int(tgid.z);
  const int T = kv_len[b];

  // The group's rows: the keys each sees and where its mask row is. Rows
  // past R see no key. The group walks the union of their keys, [lo, hi).
  int kmin[kGroupRows];
  int kmax[kGroupRows];
  long mask_off[kGroupRows];
  int lo = T;
  int hi = 0;
  for (int r = 0; r < kGroupRows; ++r) {
    kmin[r] = 0;
    kmax[r] = 0;
    mask_off[r] = 0;
    if (r < R) {
      const long row = group_row(p, b, h, G, first + r);
      const int l = int(row % p.L);
      const int hq = int(row / p.L % p.Hq);
      kmin[r] = kv_key_min(T, p.L, l, p.causal != 0, p.window);
      kmax[r] = kv_key_max(T, p.L, l, p.causal != 0);
      mask_off[r] = b * p.mask_stride[0] + hq * p.mask_stride[1] + l * p.mask_stride[2];
      if (kmax[r] > kmin[r]) {
        lo = min(lo, kmin[r]);
        hi = max(hi, kmax[r]);
      }
    }
  }
  // This split's share of them.
  const int step = kv_split_step(max(hi - lo, 0), p.n_splits, kSplitChunk);
  const int t0 = min(hi, lo + split * step);
  const int t1 = min(hi, t0 + step);

  // The rows' queries, scaled, shared by the simdgroups (zeros past D).
  for (int e = int(tid); e < kGroupRows * kMaxDim; e += kSimds * kLanes) {
    const int r = e / kMaxDim;
    const int i = e % kMaxDim;
    tg_q[e] = r < R && i < D ? to_float(queries[group_row(p, b, h, G, first + r) * D + i]) * p.scale : 0.0f;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  float m[kGroupRows];
  float sum[kGroupRows];
  float acc[kGroupRows][kPerLane];
  for (int r = 0; r < kGroupRows; ++r) {
    m[r] = -INFINITY;
    sum[r] = 0.0f;
    for (int j = 0; j < kPerLane; ++j) {
      acc[r][j] = 0.0f;
    }
  }
  const int mask_bytes = p.mask_is_bool != 0 ? 1 : 4;

  for (int t = t0 + int(simd_gid); t < t1; t += kSimds) {
    bool seen[kGroupRows];
    bool any_seen = false;
    for (int r = 0; r < kGroupRows; ++r) {
      seen[r] = t >= kmin[r] && t < kmax[r];
      any_seen = any_seen || seen[r];
    }
    if (!any_seen) {
      continue;
    }
    KVRow<ST> kv = kv_row<ST>(
        p, arena, block_table, k_packed, k_scales, k_biases, v_packed,
        v_scales, v_biases, KB, VB, b, h, t);
    // Key t, dequantized once for every row of the group.
    float k[kPerLane];
    for (int j = 0; j < kPerLane; ++j) {
      const int i = int(lane) + j * kLanes;
      k[j] = 0.0f;
      if (i < D) {
        k[j] = dequant<KB, ST>(kv.kp, kv.ks, kv.kb, i, gs);
        KVSNAP_COUNT_DEQUANT(0);
      }
    }
    float score[kGroupRows];
    bool any_weight = false;
    for (int r = 0; r < kGroupRows; ++r) {
      score[r] = -INFINITY;
      if (!seen[r]) {
        continue;
      }
      float dot = 0.0f;
      for (int j = 0; j < kPerLane; ++j) {
        dot += tg_q[r * kMaxDim + int(lane) + j * kLanes] * k[j];
      }
      float qk = simd_sum(dot); // the same in every lane
      if (p.has_mask != 0) {
        device const uchar* mask_row = mask + mask_off[r] * mask_bytes;
        const long mi = t * p.mask_stride[3];
        if (p.mask_is_bool != 0) {
          qk = mask_row[mi] != 0 ? qk : -INFINITY;
        } else {
          qk += ((device const float*)mask_row)[mi];
        }
      }
      score[r] = qk;
      any_weight = any_weight || qk != -INFINITY;
    }
    if (!any_weight) {
      continue; // masked out for every row: V is not read
    }
    // Value t, dequantized once for every row that gives it weight.
    float v[kPerLane];
    for (int j = 0; j < kPerLane; ++j) {
      const int i = int(lane) + j * kLanes;
      v[j] = 0.0f;
      if (i < D) {
        v[j] = dequant<VB, ST>(kv.vp, kv.vs, kv.vb, i, gs);
        KVSNAP_COUNT_DEQUANT(1);
      }
    }
    for (int r = 0; r < kGroupRows; ++r) {
      if (score[r] == -INFINITY) {
        continue; // no weight, and exp(-inf - -inf) must not run
      }
      const float m_new = max(m[r], score[r]);
      const float corr = exp(m[r] - m_new); // 0 while m is still -inf
      const float w = exp(score[r] - m_new);
      sum[r] = sum[r] * corr + w;
      for (int j = 0; j < kPerLane; ++j) {
        acc[r][j] = acc[r][j] * corr + w * v[j];
      }
      m[r] = m_new;
    }
  }

  // Per row, merge the simdgroups' partial results into the split's.
  for (int r = 0; r < kGroupRows; ++r) {
    if (r >= R) {
      break; // the same in every thread: the barriers below are uniform
    }
    if (lane == 0) {
      tg_m[simd_gid] = m[r];
      tg_l[simd_gid] = sum[r];
    }
    for (int j = 0; j < kPerLane; ++j) {
      const int i = int(lane) + j * kLanes;
      if (i < D) {
        tg_acc[simd_gid * kMaxDim + i] = acc[r][j];
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    float m_all = -INFINITY;
    for (int s = 0; s < kSimds; ++s) {
      m_all = max(m_all, tg_m[s]);
    }
    float weight[kSimds];
    float l_all = 0.0f;
    for (int s = 0; s < kSimds; ++s) {
      weight[s] = m_all == -INFINITY || tg_m[s] == -INFINITY ? 0.0f : exp(tg_m[s] - m_all);
      l_all += weight[s] * tg_l[s];
    }
    const long part = group_row(p, b, h, G, first + r) * p.n_splits + split;
    for (int i = int(tid); i < D; i += kSimds * kLanes) {
      float x = 0.0f;
      for (int s = 0; s < kSimds; ++s) {
        x += weight[s] * tg_acc[s * kMaxDim + i];
      }
      part_acc[part * D + i] = x;
    }
    if (tid == 0) {
      part_m[part] = m_all;
      part_l[part] = l_all;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup); // tg_* are rewritten for the next row
  }
}

template <typename OT>
[[kernel]] void kvsnap_attention_merge(
    device const float* part_m [[buffer(0)]],
    device const float* part_l [[buffer(1)]],
    device const float* part_acc [[buffer(2)]],
    device OT* out [[buffer(3)]], // [B, Hq, L, D]
    constant AttentionParams& p [[buffer(4)]],
    uint row [[threadgroup_position_in_grid]],
    uint lane [[thread_index_in_threadgroup]]) {
  const int D = p.head_dim;
  const int n = p.n_splits;
  const long first = long(row) * n;
  float m_all = -INFINITY;
  for (int s = 0; s < n; ++s) {
    m_all = max(m_all, part_m[first + s]);
  }
  float l_all = 0.0f;
  float acc[kPerLane];
  for (int j = 0; j < kPerLane; ++j) {
    acc[j] = 0.0f;
  }
  if (m_all != -INFINITY) {
    for (int s = 0; s < n; ++s) {
      const float ms = part_m[first + s];
      if (ms == -INFINITY) {
        continue; // a split that saw no key
      }
      const float w = exp(ms - m_all);
      l_all += w * part_l[first + s];
      for (int j = 0; j < kPerLane; ++j) {
        const int i = int(lane) + j * kLanes;
        if (i < D) {
          acc[j] += w * part_acc[(first + s) * D + i];
        }
      }
    }
  }
  // A query that sees no key gets zeros, as on the CPU.
  const float inv = l_all > 0.0f ? 1.0f / l_all : 0.0f;
  for (int j = 0; j < kPerLane; ++j) {
    const int i = int(lane) + j * kLanes;
    if (i < D) {
      store_float(out, long(row) * D + i, acc[j] * inv);
    }
  }
}

// Kernel names: kvsnap_attention_partial_<queries>_<scales>_k<bits>_v<bits>
// and kvsnap_attention_merge_<output>; primitives.cpp builds the same names.
#define KVSNAP_PARTIAL(qn, QT, sn, ST, kb, vb)                                      \
  template [[host_name("kvsnap_attention_partial_" #qn "_" #sn "_k" #kb "_v" #vb)]] \
  [[kernel]] decltype(kvsnap_attention_partial<QT, ST, kb, vb>)                     \
      kvsnap_attention_partial<QT, ST, kb, vb>;

#define KVSNAP_PARTIAL_BITS(qn, QT, sn, ST) \
  KVSNAP_PARTIAL(qn, QT, sn, ST, 4, 4)      \
  KVSNAP_PARTIAL(qn, QT, sn, ST, 4, 8)      \
  KVSNAP_PARTIAL(qn, QT, sn, ST, 6, 4)      \
  KVSNAP_PARTIAL(qn, QT, sn, ST, 6, 8)      \
  KVSNAP_PARTIAL(qn, QT, sn, ST, 8, 4)      \
  KVSNAP_PARTIAL(qn, QT, sn, ST, 8, 8)

#define KVSNAP_PARTIAL_SCALES(qn, QT)                \
  KVSNAP_PARTIAL_BITS(qn, QT, float32, float)        \
  KVSNAP_PARTIAL_BITS(qn, QT, float16, half)         \
  KVSNAP_PARTIAL_BITS(qn, QT, bfloat16, bf16)

KVSNAP_PARTIAL_SCALES(float32, float)
KVSNAP_PARTIAL_SCALES(float16, half)
KVSNAP_PARTIAL_SCALES(bfloat16, bf16)

#define KVSNAP_MERGE(on, OT)                                           \
  template [[host_name("kvsnap_attention_merge_" #on)]] [[kernel]]     \
  decltype(kvsnap_attention_merge<OT>) kvsnap_attention_merge<OT>;

KVSNAP_MERGE(float32, float)
KVSNAP_MERGE(float16, half)
KVSNAP_MERGE(bfloat16, bf16)
