#include "kv_write.h"

#include <string>

#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"

namespace kvsnap {

mx::array kv_write(
    std::shared_ptr<Arena> arena,
    int layer,
    const mx::array& keys,
    const mx::array& values,
    const IntTable& block_table,
    const std::vector<int32_t>& offsets,
    const std::optional<std::vector<int32_t>>& counts,
    const std::vector<mx::array>& after,
    mx::StreamOrDevice s) {
  mx::Stream stream = kernel_stream(s, "kv_write");
  const ArenaGeometry& g = arena->geometry();
  if (layer < 0 || layer >= g.n_layers) {
    throw InvalidArgument(
        "layer",
        std::to_string(layer) + " is out of range for an arena of " +
            std::to_string(g.n_layers) + " layers");
  }
  if (keys.ndim() != 4) {
    throw InvalidArgument(
        "keys", "must have shape (B, n_kv_heads, L, head_dim), got " +
            shape_str(keys.shape()));
  }
  if (values.shape() != keys.shape()) {
    throw InvalidArgument(
        "values",
        "shape " + shape_str(values.shape()) + " differs from keys " +
            shape_str(keys.shape()));
  }
  float_dtype(keys, "keys");
  if (values.dtype() != keys.dtype()) {
    throw InvalidArgument("values", "dtype differs from keys");
  }
  if (keys.shape(1) != g.n_kv_heads || keys.shape(3) != g.head_dim) {
    throw InvalidArgument(
        "keys",
        "shape " + shape_str(keys.shape()) + " does not match the arena (" +
            std::to_string(g.n_kv_heads) + " KV heads, head_dim " +
            std::to_string(g.head_dim) + ")");
  }
  const int B = keys.shape(0);
  const int L = keys.shape(2);
  if (int(offsets.size()) != B) {
    throw InvalidArgument(
        "offsets",
        "has " + std::to_string(offsets.size()) + " entries for a batch of " +
            std::to_string(B));
  }
  std::vector<int32_t> n_written = counts.value_or(std::vector<int32_t>(B, L));
  if (int(n_written.size()) != B) {
    throw InvalidArgument(
        "counts",
        "has " + std::to_string(n_written.size()) + " entries for a batch of " +
            std::to_string(B));
  }
  std::vector<int64_t> begin(B), end(B);
  for (int b = 0; b < B; ++b) {
    if (offsets[b] < 0) {
      throw InvalidArgument(
          "offsets",
          "entry " + std::to_string(b) + " is negative (" +
              std::to_string(offsets[b]) + ")");
    }
    if (n_written[b] < 0 || n_written[b] > L) {
      throw InvalidArgument(
          "counts",
          "entry " + std::to_string(b) + " is " + std::to_string(n_written[b]) +
              "; each must be in 0 .. L = " + std::to_string(L));
    }
    begin[b] = offsets[b];
    end[b] = int64_t(offsets[b]) + n_written[b];
  }
  // Only the blocks of the real tokens: padding is never written.
  std::vector<int64_t> slots =
      check_block_table(*arena, block_table, B, begin, end, "kv_write");
  // A shared block (a common prefix) belongs to several sequences: writing
  // into it would change the others' history.
  const int bt = g.block_tokens;
  for (int b = 0; b < B; ++b) {
    if (begin[b] == end[b]) {
      continue; // counts[b] == 0: writes no block
    }
    for (int64_t blk = begin[b] / bt; blk * bt < end[b]; ++blk) {
      int32_t slot = block_table.data[size_t(b) * block_table.shape[1] + blk];
      int64_t holders = arena->refcount(slot);
      if (holders != 1) {
        throw InvalidArgument(
            "block_table",
            "block " + std::to_string(blk) + " of sequence " + std::to_string(b) + ": " +
                shared_slot_message(slot, holders));
      }
    }
  }
  auto pins = std::make_shared<SlotPins>(arena, std::move(slots));

  std::vector<mx::array> inputs = {
      mx::contiguous(keys, false, stream), mx::contiguous(values, false, stream)};
  inputs.insert(inputs.end(), after.begin(), after.end());
  return mx::array(
      {1},
      mx::uint32,
      std::make_shared<KVWrite>(
          stream, arena, layer, block_table, offsets, std::move(n_written), std::move(pins)),
      std::move(inputs));
}

void KVWrite::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& enc = mx::cpu::get_command_encoder(stream());
  for (auto& in : inputs) {
    enc.set_input_array(in);
  }
  enc.set_output_array(out);
  const mx::array& keys = inputs[0];
  enc.dispatch([keys = mx::array::unsafe_weak_copy(keys),
                values = mx::array::unsafe_weak_copy(inputs[1]),
                out = mx::array::unsafe_weak_copy(out),
                arena = arena_,
                layer = layer_,
                table = block_table_,
                offsets = offsets_,
                counts = counts_,
                pins = pins_]() mutable {
    (void)pins; // held, not used: the slots stay pinned until this work is gone
    const ArenaGeometry& g = arena->geometry();
    cpu::WriteArgs a;
    a.B = keys.shape(0);
    a.L = keys.shape(2);
    a.keys = keys.data<void>();
    a.values = values.data<void>();
    a.dtype = float_dtype(keys, "keys");
    a.offsets = offsets.data();
    a.counts = counts.data();
    cpu::QuantSource& d = a.dst;
    d.k_bits = g.k_bits;
    d.v_bits = g.v_bits;
    d.group_size = g.group_size;
    d.head_dim = g.head_dim;
    d.n_kv_heads = g.n_kv_heads;
    d.paged = true;
    d.arena = arena->base();
    d.slot_bytes = arena->slot_bytes();
    for (int i = 0; i < 6; ++i) {
      d.off[i] = arena->layer(layer).off[i];
    }
    d.block_tokens = g.block_tokens;
    d.block_table = table.data.data();
    d.max_blocks = table.shape[1];
    a.arena = arena->base();
    cpu::kv_write(a);
    out.data<uint32_t>()[0] = 0;
  });
}

#ifndef KVSNAP_METAL
// Builds with the Metal kernels define this in csrc/metal/primitives.cpp.
void KVWrite::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw DeviceUnsupported(
      "kv_write: this kvsnap build has no GPU kernels; run it on the CPU stream");
}
#endif

} // namespace kvsnap
