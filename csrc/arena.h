// The block arena: one mmap'd region cut into fixed-size slots. A slot holds
// one block (block_tokens consecutive tokens of one sequence) for every layer,
// keys and values, in MLX's affine-quantized layout, as six arrays:
//
//   K packed, K scales, K biases, V packed, V scales, V biases, each holding
//   every layer back to back ([n_layers, ...] of):
//   packed  uint32  [n_kv_heads, block_tokens, head_dim * bits / 32]
//           (keys at k_bits: 4, 6 or 8; values at v_bits: 4 or 8)
//   scales  float16 [n_kv_heads, block_tokens, head_dim / group_size]
//   biases  float16 [n_kv_heads, block_tokens, head_dim / group_size]
//
// Each of the six arrays starts on a 64-byte boundary; a slot is a whole
// number of pages. Kernels find a layer's arrays through LayerOffsets.
// Slots are reference counted; eviction policy lives in Python.
//
// Memory over time: every slot an arena hands out is charged to a Budget,
// which several arenas may share (the layer groups of a model, many
// agents). A pending (lazy) kernel pins the slots it touches, so a slot
// freed meanwhile is not handed out again until the kernel is gone. A slot
// that becomes free goes back to the OS (madvise) and its bytes back to the
// budget.
#pragma once

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <functional>
#include <memory>
#include <optional>
#include <string>
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

// A byte limit that arenas charge their slots to. Lock-free (one atomic),
// so an arena may charge it while holding its own lock, and slots may be
// released on an MLX stream thread.
class Budget {
 public:
  // Throws InvalidArgument (limit_bytes) unless limit_bytes > 0.
  explicit Budget(int64_t limit_bytes);
  Budget(const Budget&) = delete;
  Budget& operator=(const Budget&) = delete;

  int64_t limit() const { return limit_; }
  int64_t used() const { return used_.load(); }
  // Adds `bytes` to the bytes in use unless that would pass the limit;
  // `seen` (if given) gets the bytes in use it saw.
  bool try_charge(int64_t bytes, int64_t* seen = nullptr);
  void release(int64_t bytes);

 private:
  const int64_t limit_;
  std::atomic<int64_t> used_{0};
};

struct ArenaStats {
  int64_t slots_total;
  int64_t slots_used; // not on the free list: refcount > 0, or still pinned
  int64_t slots_shared; // refcount > 1
  int64_t slots_pinned_free; // refcount 0 but pinned by a pending op
  int64_t slot_bytes;
  int64_t bytes_total;
  int64_t bytes_used; // charged to the budget
};

class Arena {
 public:
  // The mapping holds budget_bytes / slot_bytes slots, or, when only a
  // shared `budget` is given, budget->limit() / slot_bytes. Without a shared
  // budget the arena charges a private one of budget_bytes.
  Arena(
      const ArenaGeometry& geometry,
      std::optional<int64_t> budget_bytes,
      std::shared_ptr<Budget> budget = nullptr);
  ~Arena();
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;

  const ArenaGeometry& geometry() const { return geo_; }
  size_t slot_bytes() const { return slot_bytes_; }
  int64_t n_slots() const { return n_slots_; }
  const LayerOffsets& layer(int i) const { return layers_[i]; }
  uint8_t* base() const { return base_; }
  uint8_t* slot_ptr(int64_t slot) const { return base_ + slot * slot_bytes_; }

  const std::shared_ptr<Budget>& budget() const { return budget_; }

  // Takes a free slot (refcount 1) and charges its bytes to the budget.
  // Throws ArenaFull when no slot is free or the budget is spent.
  int64_t alloc();
  // Returns the new refcount. Throws SlotError for a free or out-of-range slot.
  int64_t incref(int64_t slot);
  // Returns the new refcount; at 0 the slot is free again (once unpinned).
  int64_t decref(int64_t slot);
  int64_t refcount(int64_t slot) const;
  // Throws SlotError unless `slot` is allocated; `what` names the caller.
  void check_live(int64_t slot, const char* what) const;
  ArenaStats stats() const;

  // Pins: a pending kernel holds the slots it reads or writes, so that a
  // slot freed (refcount 0) before the kernel ran is not handed to a new
  // owner whose data the kernel would then overwrite or read. pin throws
  // SlotError unless the slot is allocated; the last unpin of a slot with
  // refcount 0 frees it. unpin runs on MLX stream threads: it takes only
  // this arena's lock and never throws.
  void pin(int64_t slot);
  void unpin(int64_t slot) noexcept;
  int64_t pins(int64_t slot) const;

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
  // The message of ArenaFull; `seen`: the budget's bytes in use when it refused.
  std::string full_message(bool budget_spent, int64_t seen) const;
  // Puts a slot with refcount 0 and no pins back on the free list. Needs mu_.
  void free_slot_locked(int64_t slot);

  ArenaGeometry geo_;
  size_t slot_bytes_ = 0;
  int64_t n_slots_ = 0;
  size_t map_bytes_ = 0;
  uint8_t* base_ = nullptr;
  std::vector<LayerOffsets> layers_;

  mutable std::mutex view_mu_;
  mutable std::shared_ptr<void> device_view_;

  std::shared_ptr<Budget> budget_;
  bool shared_budget_ = false; // given by the caller, not our private one

  mutable std::mutex mu_;
  std::vector<int64_t> free_list_; // stack of free slots
  std::vector<int32_t> refcount_;
  std::vector<int32_t> pins_;
  int64_t used_ = 0; // slots off the free list, each charged to the budget
  int64_t shared_ = 0;
  int64_t pinned_free_ = 0;
};

// The distinct slots of a block table that one kernel touches, pinned for
// as long as this object lives. Primitives hold it through a shared_ptr
// that their dispatched work copies: the slots stay pinned until both the
// graph node and the work are gone.
class SlotPins {
 public:
  // Pins each distinct slot once; SlotError, with nothing pinned, if one is
  // not allocated.
  SlotPins(std::shared_ptr<Arena> arena, std::vector<int64_t> slots);
  ~SlotPins();
  SlotPins(const SlotPins&) = delete;
  SlotPins& operator=(const SlotPins&) = delete;

 private:
  std::shared_ptr<Arena> arena_;
  std::vector<int64_t> slots_;
};

// Why a write into `slot` (held `refcount` times) is refused.
std::string shared_slot_message(int64_t slot, int64_t refcount);

// Checks a quantization format: bits 4 or 8, group_size 16/32/64/128
// dividing head_dim, head_dim <= 256 (InvalidArgument names `head_dim_arg`
// for a head_dim that is too large).
void check_quant_format(int bits, int group_size, int head_dim, const char* head_dim_arg);

// When on, freshly allocated slots and kernel outputs are filled with NaN
// bit patterns, so a test can tell an element that was never written.
void set_poison(bool on);
bool poison();

} // namespace kvsnap
