// kv_write: quantize new keys/values and write them into arena slots.
#pragma once

#include <memory>
#include <optional>
#include <vector>

#include "arena.h"
#include "common.h"
#include "mlx/primitives.h"

namespace kvsnap {

// Writes the first counts[b] tokens of keys/values [B, Hkv, L, D] of `layer`
// at positions offsets[b] .. offsets[b] + counts[b] - 1 of sequence b, whose
// blocks are block_table[b] (a [B, max_blocks] table of arena slots). The
// tokens l >= counts[b] are padding (prompts of different lengths batched at
// one L): neither quantized nor written. Without counts, every sequence
// writes all L tokens. Returns a token (uint32, shape [1]); an attention that
// takes it reads after the write. `after` are arrays that must be computed
// before the write happens (earlier reads of the same slots). Only the blocks
// written are checked: each must be live and held once (refcount 1), shared
// blocks are never written. The op pins those slots.
//
// `form` (CPU streams; float32 arrays) is the stored form of the rows, what
// kvsnap's key offsets and rotation make of them: a key x of KV head h at
// position p is quantized as H((x - shift_const[h] - sum_e T(e, p)
// shift_w[h, e]) / key_scale[h]) (T(e, p) = shift_table[p / 32, e, p % 32]), a value v as H(v), where H is the
// orthonormal Hadamard transform if `rotate` (else nothing).
struct StoredForm {
  bool rotate = false;
  std::optional<mx::array> key_scale; // [n_kv_heads, D]
  std::optional<mx::array> shift_const; // [n_kv_heads, D]
  std::optional<mx::array> shift_w; // [n_kv_heads, E, D], with shift_table and shift_const
  std::optional<mx::array> shift_table; // [> last position written / 32, E, 32]: T(e, p) at [p / 32, e, p % 32]
};

mx::array kv_write(
    std::shared_ptr<Arena> arena,
    int layer,
    const mx::array& keys,
    const mx::array& values,
    const IntTable& block_table,
    const std::vector<int32_t>& offsets,
    const std::optional<std::vector<int32_t>>& counts,
    const std::vector<mx::array>& after,
    mx::StreamOrDevice s = {},
    const StoredForm& form = {});

class KVWrite : public mx::UnaryPrimitive {
 public:
  KVWrite(
      mx::Stream stream,
      std::shared_ptr<Arena> arena,
      int layer,
      IntTable block_table,
      std::vector<int32_t> offsets,
      std::vector<int32_t> counts,
      std::shared_ptr<SlotPins> pins,
      int form_flags,
      int shift_rank)
      : mx::UnaryPrimitive(stream),
        arena_(std::move(arena)),
        layer_(layer),
        block_table_(std::move(block_table)),
        offsets_(std::move(offsets)),
        counts_(std::move(counts)),
        pins_(std::move(pins)),
        form_flags_(form_flags),
        shift_rank_(shift_rank) {}

  // Which StoredForm arrays follow keys and values in the inputs, in order.
  static constexpr int kRotate = 1, kKeyScale = 2, kShift = 4, kShiftRank = 8;

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "KVWrite";
  }

 private:
  std::shared_ptr<Arena> arena_;
  int layer_;
  IntTable block_table_;
  std::vector<int32_t> offsets_;
  std::vector<int32_t> counts_; // tokens written per sequence, 0..L
  // The slots written, held until this node and its dispatched work are gone.
  std::shared_ptr<SlotPins> pins_;
  int form_flags_;
  int shift_rank_;
};

} // namespace kvsnap
