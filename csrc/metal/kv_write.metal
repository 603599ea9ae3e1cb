// kv_write on Apple GPUs: quantize new keys/values (MLX's affine algorithm,
// float16 scales and biases) into arena slots, like kv_write_impl in
// csrc/cpu/kernels_impl.h. One thread per (row, group, keys or values): it
// reads its group twice (range, then integers) and writes whole words, so no
// two threads touch the same word. The threads of padded tokens (l >=
// counts[b]) return before looking up their block.
#include <metal_stdlib>

#include "../layout.h"
#include "dtypes.h"
#include "params.h"

using namespace metal;

template <typename T>
[[kernel]] void kvsnap_kv_write(
    device const T* keys [[buffer(0)]], // [B, Hkv, L, D]
    device const T* values [[buffer(1)]],
    device const int* block_table [[buffer(2)]], // [B, max_blocks]
    device const int* offsets [[buffer(3)]], // [B]
    device const int* counts [[buffer(4)]], // [B] tokens written; the rest is padding
    device uchar* arena [[buffer(5)]],
    constant KVWriteParams& p [[buffer(6)]],
    uint3 gid [[thread_position_in_grid]]) {
  const int D = p.head_dim;
  const int gs = p.group_size;
  const int g = int(gid.x);
  const long row = long(gid.y); // (b * Hkv + h) * L + l
  const int kv = int(gid.z);
  if (g >= kv_groups_per_row(D, gs) || row >= long(p.B) * p.n_kv_heads * p.L) {
    return;
  }
  const int b = int(row / (long(p.n_kv_heads) * p.L));
  const int h = int(row / p.L % p.n_kv_heads);
  const int l = int(row % p.L);
  if (l >= counts[b]) {
    return; // padding: its position may lie past the block table row
  }
  const int pos = offsets[b] + l;
  const int slot = block_table[kv_table_index(b, p.max_blocks, pos, p.block_tokens)];
  device uchar* base = arena + kv_slot_offset(slot, p.slot_bytes);
  const long r = kv_row_in_block(h, pos, p.block_tokens);
  const int bits = kv == 0 ? p.k_bits : p.v_bits;
  device uint* packed = (device uint*)(base + p.off[3 * kv]) + r * kv_words_per_row(D, bits);
  device half* scales = (device half*)(base + p.off[3 * kv + 1]) + r * kv_groups_per_row(D, gs);
  device half* biases = (device half*)(base + p.off[3 * kv + 2]) + r * kv_groups_per_row(D, gs);
  device const T* x = (kv == 0 ? keys : values) + row * D + long(g) * gs;

  const float n_bins = float((1 << bits) - 1);
  const float eps = 1e-7f;
  float w_min = INFINITY;
  float w_max = -INFINITY;
  for (int j = 0; j < gs; ++j) {
    float w = to_float(x[j]);
    w_max = max(w_max, w);
    w_min = min(w_min, w);
  }
  const bool neg_edge = abs(w_min) > abs(w_max);
  float scale = max((w_max - w_min) / n_bins, eps);
  scale = neg_edge ? scale : -scale;
  const float edge = neg_edge ? w_min : w_max;
  const float q0 = rint(edge / scale);
  float bias = 0.0f;
  if (q0 != 0.0f) {
    scale = edge / q0;
    bias = edge;
  }
  // The group's codes as one little-endian bit stream: gs * bits is a
  // multiple of 32 (6 bits: gs a multiple of 16), so a group fills whole
  // words and no other thread writes them.
  int w = kv_word_of(g * gs, bits);
  ulong stream = 0;
  int n_bits = 0;
  for (int j = 0; j < gs; ++j) {
    float q = rint((to_float(x[j]) - bias) / scale);
    q = clamp(q, 0.0f, n_bins);
    stream |= ulong(uint(q)) << n_bits;
    n_bits += bits;
    if (n_bits >= 32) {
      packed[w++] = uint(stream);
      stream >>= 32;
      n_bits -= 32;
    }
  }
  scales[g] = half(scale);
  biases[g] = half(bias);
}

#define KVSNAP_KV_WRITE(name, T)                                    \
  template [[host_name("kvsnap_kv_write_" #name)]] [[kernel]]       \
  decltype(kvsnap_kv_write<T>) kvsnap_kv_write<T>;

KVSNAP_KV_WRITE(float32, float)
KVSNAP_KV_WRITE(float16, half)
KVSNAP_KV_WRITE(bfloat16, bf16)
