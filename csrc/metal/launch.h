// How the Metal kernels are launched: their argument structs and grids,
// computed from plain numbers. Shared by primitives.cpp (which encodes the
// launches on MLX's command encoder) and emu/harness.cpp (which runs the
// same launches under the CPU emulation of tests/test_metal_emulated.py), so
// the emulation executes exactly the grids a Mac would.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>

#include "../layout.h"
#include "params.h"

namespace kvsnap::metal_launch {

constexpr int kSimds = 4; // attention.metal: simdgroups per threadgroup of pass 1
constexpr int kLanes = 32;
constexpr int kGroupRows = 8; // attention.metal: query rows per threadgroup of pass 1

struct Size3 {
  uint64_t x, y, z;
};

// A launch: `threads` is true for dispatch_threads (grid counts threads,
// edge threadgroups may be smaller), false for dispatch_threadgroups (grid
// counts threadgroups).
struct Launch {
  bool threads;
  Size3 grid;
  Size3 group;
};

// kv_write: one thread per (row, group, K or V), up to 256 threads per
// threadgroup. rows = B * n_kv_heads * L > 0.
inline Launch kv_write_launch(const KVWriteParams& p) {
  const int64_t rows = int64_t(p.B) * p.n_kv_heads * p.L;
  const int groups = kv_groups_per_row(p.head_dim, p.group_size);
  const uint64_t rows_per_group = uint64_t(std::max<int64_t>(1, std::min<int64_t>(rows, 256 / groups)));
  return {true, {uint64_t(groups), uint64_t(rows), 2}, {uint64_t(groups), rows_per_group, 1}};
}

// Pass 1 takes the L * G query rows that share a KV head (G = Hq /
// n_kv_heads query heads, L positions) kGroupRows at a time: the groups of
// one KV head, and of a whole split (every KV head of every sequence).
inline int64_t attention_row_groups_per_kv_head(const AttentionParams& p) {
  const int64_t rows = int64_t(p.Hq / p.n_kv_heads) * p.L;
  return (rows + kGroupRows - 1) / kGroupRows;
}
inline int64_t attention_row_groups(const AttentionParams& p) {
  return int64_t(p.B) * p.n_kv_heads * attention_row_groups_per_kv_head(p);
}

// Flash-decoding: split the keys until there are enough threadgroups to
// fill the GPU (row_groups of them per split), keeping at least 256 keys
// per split.
inline int attention_splits(int64_t row_groups, int longest_kv_len) {
  const int64_t want = (1024 + row_groups - 1) / row_groups;
  return int(std::max<int64_t>(1, std::min<int64_t>({want, longest_kv_len / 256, 64})));
}

// Pass 1: a threadgroup of kSimds simdgroups per (split, KV head and group
// of its query rows, sequence).
inline Launch attention_partial_launch(const AttentionParams& p) {
  const int64_t groups_per_sequence = int64_t(p.n_kv_heads) * attention_row_groups_per_kv_head(p);
  return {false,
          {uint64_t(p.n_splits), uint64_t(groups_per_sequence), uint64_t(p.B)},
          {uint64_t(kSimds * kLanes), 1, 1}};
}

// Pass 2: one simdgroup per output row.
inline Launch attention_merge_launch(const AttentionParams& p) {
  return {false, {uint64_t(p.B) * p.Hq * p.L, 1, 1}, {uint64_t(kLanes), 1, 1}};
}

// Kernel names, as the .metal files instantiate them. Type names are
// "float32", "float16" or "bfloat16".
inline std::string kv_write_kernel(const std::string& dtype) {
  return "kvsnap_kv_write_" + dtype;
}
inline std::string attention_partial_kernel(
    const std::string& queries, const std::string& scales, int k_bits, int v_bits) {
  return "kvsnap_attention_partial_" + queries + "_" + scales + "_k" + std::to_string(k_bits) +
         "_v" + std::to_string(v_bits);
}
inline std::string attention_merge_kernel(const std::string& out) {
  return "kvsnap_attention_merge_" + out;
}

} // namespace kvsnap::metal_launch
