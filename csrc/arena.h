// The block arena: one mmap'd region cut into fixed-size slots. A slot holds
// one block (block_tokens consecutive tokens of one sequence) for every layer,
// keys and values, in MLX's affine-quantized layout, as six arrays:
//
//   K packed, K scales, K biases, V packed, V scales, V biases, each holding
//   every layer back to back ([n_layers, ...] of):
//   packed  uint32  [n_kv_heads, block_tokens, head_dim * bits / 32]
//           (keys at k_bits, values at v_bits: 4 or 8 each)
//   scales  float16 [n_kv_heads, block_tokens, head_dim / group_size]
//   biases  float16 [n_kv_heads, block_tokens, head_dim / group_size]
//
// Each of the six arrays starts on a 64-byte boundary; a slot is a whole
// number of pages. Kernels find a layer's arrays through LayerOffsets.
// Slots are reference counted; eviction policy lives in Python.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <functional>
#include <memory>
#include <vector>

#include "layout.h"

namespace kvsnap {

struct ArenaGeometry {
  int n_layers;
  int n_kv_heads;
  int head_dim;
  int block_tokens;
  int k_bits; // keys
  int v_bits; // values
  int group_size;

  // uint32 words of one packed row of keys (kv = 0) or values (kv = 1).
  int words_per_row(int kv) const { return kv_words_per_row(head_dim, kv ? v_bits : k_bits); }
  int groups_per_row() const { return kv_groups_per_row(head_dim, group_size); }
  // Validates every field; throws InvalidArgument naming the bad one.
  void validate() const;
};

// Byte offsets of the six arrays of one layer inside a slot.
struct LayerOffsets {
  // 0..2: K packed, scales, biases; 3..5: V packed, scales, biases.
  std::array<size_t, 6> off;
};

struct ArenaStats {
  int64_t slots_total;
  int64_t slots_used;
  int64_t slots_shared; // refcount > 1
  int64_t slot_bytes;
  int64_t bytes_total;
  int64_t bytes_used;
};

class Arena {
 public:
  Arena(const ArenaGeometry& geometry, int64_t budget_bytes);
  ~Arena();
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;

  const ArenaGeometry& geometry() const { return geo_; }
  size_t slot_bytes() const { return slot_bytes_; }
  int64_t n_slots() const { return n_slots_; }
  const LayerOffsets& layer(int i) const { return layers_[i]; }
  uint8_t* base() const { return base_; }
  uint8_t* slot_ptr(int64_t slot) const { return base_ + slot * slot_bytes_; }

  // Takes a free slot (refcount 1). Throws ArenaFull when none is left.
  int64_t alloc();
  // Returns the new refcount. Throws SlotError for a free or out-of-range slot.
  int64_t incref(int64_t slot);
  // Returns the new refcount; at 0 the slot goes back on the free list.
  int64_t decref(int64_t slot);
  int64_t refcount(int64_t slot) const;
  // Throws SlotError unless `slot` is allocated; `what` names the caller.
  void check_live(int64_t slot, const char* what) const;
  ArenaStats stats() const;

  // Bytes of one array of one layer, by LayerOffsets index.
  size_t array_bytes(int which) const;

  // Bytes of the mapping: the slots, rounded up to whole pages of this
  // system (16 KiB on Apple silicon), as a GPU API wrapping it needs.
  size_t map_bytes() const { return map_bytes_; }

  // A handle of the whole mapping for a GPU API, made by `make(base,
  // map_bytes)` on first use and kept until the arena is destroyed (released
  // before the unmap). On macOS: a Metal buffer over the mapping, no copy.
  std::shared_ptr<void> device_view(
      const std::function<std::shared_ptr<void>(uint8_t*, size_t)>& make) const;

 private:
  void check_range(int64_t slot, const char* what) const;

  ArenaGeometry geo_;
  size_t slot_bytes_ = 0;
  int64_t n_slots_ = 0;
  size_t map_bytes_ = 0;
  uint8_t* base_ = nullptr;
  std::vector<LayerOffsets> layers_;

  mutable std::mutex view_mu_;
  mutable std::shared_ptr<void> device_view_;

  mutable std::mutex mu_;
  std::vector<int64_t> free_list_; // stack of free slots
  std::vector<int32_t> refcount_;
  int64_t used_ = 0;
  int64_t shared_ = 0;
};

// Checks a quantization format: bits 4 or 8, group_size 16/32/64/128
// dividing head_dim, head_dim <= 256 (InvalidArgument names `head_dim_arg`
// for a head_dim that is too large).
void check_quant_format(int bits, int group_size, int head_dim, const char* head_dim_arg);

// When on, freshly allocated slots and kernel outputs are filled with NaN
// bit patterns, so a test can tell an element that was never written.
void set_poison(bool on);
bool poison();

} // namespace kvsnap
