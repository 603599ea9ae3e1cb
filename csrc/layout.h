// Where things are: the index arithmetic of kvsnap's quantized K/V, shared
// by the CPU kernels, the arena and the Metal kernels (csrc/metal/*.metal
// include this file). It is therefore plain C++14 that the Metal shading
// language also accepts: no standard library, no pointers (Metal pointers
// need an address space), only `int`, `long` (64-bit on every target kvsnap
// builds for: LP64 hosts and Metal) and `unsigned`.
//
// Terms: a row is the head_dim quantized elements of one token and KV head;
// `bits` is 4 or 8 (6 for keys); a row is one little-endian bit stream in
// uint32 words, element i at bits [i * bits, (i + 1) * bits) (MLX's affine
// layout). At 4 and 8 bits a word holds 32 / bits whole elements; at 6 bits
// an element may straddle two words (kv_straddles), and a group of 16
// elements fills 3 words exactly.
#pragma once

// ---------------------------------------------------------------- a row

// uint32 words of one packed row.
inline int kv_words_per_row(int head_dim, int bits) {
  return head_dim * bits / 32;
}

// Scales (and biases) of one row.
inline int kv_groups_per_row(int head_dim, int group_size) {
  return head_dim / group_size;
}

// Word of a packed row that holds element i.
inline int kv_word_of(int i, int bits) {
  return i * bits / 32;
}

// Bit position of element i inside its word.
inline unsigned kv_shift_of(int i, int bits) {
  return unsigned(i * bits) % 32u;
}

// The integer (0 .. 2^bits - 1) of element i, given its word (an element
// that does not straddle: 4 and 8 bits always).
inline unsigned kv_unpack(unsigned word, int i, int bits) {
  return (word >> kv_shift_of(i, bits)) & ((1u << bits) - 1u);
}

// Whether element i runs on into the next word (6 bits only).
inline bool kv_straddles(int i, int bits) {
  return kv_shift_of(i, bits) + unsigned(bits) > 32u;
}

// The integer of element i, given its word and the next one (read only when
// kv_straddles(i, bits): the next word may lie past the row).
inline unsigned kv_unpack2(unsigned word, unsigned next, int i, int bits) {
  const unsigned s = kv_shift_of(i, bits);
  unsigned v = word >> s;
  if (s + unsigned(bits) > 32u) {
    v |= next << (32u - s);
  }
  return v & ((1u << bits) - 1u);
}

// Group (scale/bias index) of element i.
inline int kv_group_of(int i, int group_size) {
  return i / group_size;
}

// ------------------------------------------------------- blocks and slots

// Index into a [B, max_blocks] block table of the block holding position
// `pos` of sequence b.
inline long kv_table_index(int b, int max_blocks, int pos, int block_tokens) {
  return long(b) * max_blocks + pos / block_tokens;
}

// Row of (KV head h, position pos) inside a block's [n_kv_heads,
// block_tokens, ...] arrays.
inline long kv_row_in_block(int h, int pos, int block_tokens) {
  return long(h) * block_tokens + pos % block_tokens;
}

// Positions from `pos` to the end of its block (a run read at one stride).
inline int kv_left_in_block(int pos, int block_tokens) {
  return block_tokens - pos % block_tokens;
}

// Byte offset of slot s from the start of the arena.
inline long kv_slot_offset(long slot, long slot_bytes) {
  return slot * slot_bytes;
}

inline long kv_round_up(long n, long to) {
  return (n + to - 1) / to * to;
}

// Bytes of one packed array ([n_kv_heads, block_tokens, words]) and of one
// scales or biases array (float16 [n_kv_heads, block_tokens, groups]).
inline long kv_packed_bytes(int n_kv_heads, int block_tokens, int head_dim, int bits) {
  return long(n_kv_heads) * block_tokens * kv_words_per_row(head_dim, bits) * 4;
}
inline long kv_meta_bytes(int n_kv_heads, int block_tokens, int head_dim, int group_size) {
  return long(n_kv_heads) * block_tokens * kv_groups_per_row(head_dim, group_size) * 2;
}

// ------------------------------------------------------ which keys a query sees

// Position of query l of L in a sequence of kv_len tokens (the queries are
// its last L positions).
inline int kv_query_pos(int kv_len, int L, int l) {
  return kv_len - L + l;
}

// Keys [kv_key_min, kv_key_max) that query l sees. Without `causal` every
// key; with it the keys up to its position, and with window > 0 only the
// last `window` of those.
inline int kv_key_max(int kv_len, int L, int l, bool causal) {
  if (!causal) {
    return kv_len;
  }
  int end = kv_query_pos(kv_len, L, l) + 1;
  return end > 0 ? end : 0;
}
inline int kv_key_min(int kv_len, int L, int l, bool causal, int window) {
  if (!causal || window <= 0) {
    return 0;
  }
  int begin = kv_query_pos(kv_len, L, l) - window + 1;
  return begin > 0 ? begin : 0;
}

// Flash-decoding: keys [t0, t0 + span) are cut into `splits` parts of
// kv_split_step keys each (a multiple of `chunk`, the last part shorter or
// empty); part s starts at t0 + s * step.
inline int kv_split_step(int span, int splits, int chunk) {
  int per = (span + splits - 1) / splits;
  return (per + chunk - 1) / chunk * chunk;
}

// How many parts the keys of one query tile are split into: a function of
// that tile's own key span (at least `min_keys` keys a part) and of
// `max_splits` (the CPU kernels: fixed by the process's thread count), never
// of the batch around it, so a sequence's output is the same bits whether it
// is attended alone or in any batch.
inline int kv_splits_for(int span, int min_keys, int max_splits) {
  int n = span / min_keys;
  return n < 1 ? 1 : (n > max_splits ? max_splits : n);
}
