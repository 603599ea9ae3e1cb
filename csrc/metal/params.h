// Arguments of the Metal kernels, passed by value (setBytes) from
// primitives.cpp and read as `constant` structs by the .metal files. Plain
// C++14 so that both compilers see the same layout: 64-bit fields first,
// then 32-bit ones (no padding on either side).
#pragma once

struct KVWriteParams {
  long slot_bytes;
  long off[6]; // byte offsets in a slot: K packed/scales/biases, V ...
  int B;
  int L;
  int n_kv_heads;
  int head_dim;
  int group_size;
  int block_tokens;
  int max_blocks;
  int k_bits;
  int v_bits;
  int pad;
};

struct AttentionParams {
  // Paged source: slot s starts at arena + s * slot_bytes, this layer's
  // arrays at off[0..5] inside it.
  long slot_bytes;
  long off[6];
  // Contiguous source: element strides (batch, head, token) of K
  // packed/scales/biases and V packed/scales/biases.
  long stride[6][3];
  // Mask over [B, Hq, L, T]: element strides, 0 where broadcast.
  long mask_stride[4];
  int B;
  int Hq;
  int L;
  int head_dim;
  int n_kv_heads;
  int group_size;
  int paged; // 1: arena + block table; 0: contiguous arrays
  int block_tokens;
  int max_blocks;
  int causal; // query l sits at position kv_len[b] - L + l
  int window; // > 0: query at p sees keys (p - window, p]
  int has_mask;
  int mask_is_bool; // 1: uchar, keep where nonzero; 0: float32, added
  int n_splits; // parts of each query's keys (flash-decoding)
  float scale;
  int pad;
};

// The host compiler and Metal must agree on these sizes (checked by both).
static_assert(sizeof(KVWriteParams) == 96, "KVWriteParams layout changed");
static_assert(sizeof(AttentionParams) == 296, "AttentionParams layout changed");
