#include "kv_write.h"

#include <algorithm>
#include <string>
#include <utility>

#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"

namespace kvsnap {

namespace {

void check_f32(const mx::array& x, const char* arg, const mx::Shape& want, const std::string& what) {
  if (x.dtype() != mx::float32) {
    throw InvalidArgument(arg, "must be float32");
  }
  if (x.shape() != want) {
    throw InvalidArgument(arg, "must have shape " + what + ", got " + shape_str(x.shape()));
  }
}

// Checks `form` and appends its arrays to `inputs`; returns (KVWrite form
// flags, shift rank).
std::pair<int, int> check_form(
    const StoredForm& form,
    int n_kv_heads,
    int D,
    int max_end,
    const mx::Stream& stream,
    std::vector<mx::array>& inputs) {
  const bool shift = form.shift_const || form.shift_w || form.shift_table;
  if (!form.rotate && !form.key_scale && !shift) {
    return {0, 0};
  }
  if (stream.device.type != mx::Device::cpu) {
    throw InvalidArgument(
        "form", "the stored-form transform runs on CPU streams only; transform the rows first on the GPU");
  }
  const std::string hd = std::to_string(D), hkv = std::to_string(n_kv_heads);
  int flags = 0, rank = 0;
  if (form.rotate) {
    if (D & (D - 1)) {
      throw InvalidArgument("rotate", "needs a power-of-two head_dim, got " + hd);
    }
    flags |= KVWrite::kRotate;
  }
  if (form.key_scale) {
    check_f32(*form.key_scale, "key_scale", {n_kv_heads, D}, "(" + hkv + ", " + hd + ")");
    inputs.push_back(row_major(*form.key_scale, stream));
    flags |= KVWrite::kKeyScale;
  }
  if (shift) {
    if (!form.shift_const || bool(form.shift_w) != bool(form.shift_table)) {
      throw InvalidArgument(
          !form.shift_const ? "shift_const" : !form.shift_w ? "shift_w" : "shift_table",
          "shift_w and shift_table go together, and with shift_const");
    }
    check_f32(*form.shift_const, "shift_const", {n_kv_heads, D}, "(" + hkv + ", " + hd + ")");
    inputs.push_back(row_major(*form.shift_const, stream));
    flags |= KVWrite::kShift;
  }
  if (form.shift_w) {
    const mx::array& w = *form.shift_w;
    rank = w.ndim() == 3 ? w.shape(1) : 0;
    if (rank < 1 || rank > cpu::kMaxBiasRank) {
      throw InvalidArgument(
          "shift_w", "must have shape (" + hkv + ", E, " + hd + ") with 1 <= E <= " +
              std::to_string(cpu::kMaxBiasRank) + ", got " + shape_str(w.shape()));
    }
    check_f32(w, "shift_w", {n_kv_heads, rank, D}, "(" + hkv + ", E, " + hd + ")");
    const mx::array& t = *form.shift_table;
    const int blocks = (max_end + cpu::kBiasBlock - 1) / cpu::kBiasBlock;
    if (t.dtype() != mx::float32 || t.ndim() != 3 || t.shape(1) != rank ||
        t.shape(2) != cpu::kBiasBlock || t.shape(0) < blocks) {
      throw InvalidArgument(
          "shift_table", "must be float32 of shape (>= " + std::to_string(blocks) + " blocks, E=" +
              std::to_string(rank) + ", " + std::to_string(cpu::kBiasBlock) + ") for " +
              std::to_string(max_end) + " positions, got " + shape_str(t.shape()));
    }
    inputs.push_back(row_major(w, stream));
    inputs.push_back(row_major(t, stream));
    flags |= KVWrite::kShiftRank;
  }
  return {flags, rank};
}

} // namespace

mx::array kv_write(
    std::shared_ptr<Arena> arena,
    int layer,
    const mx::array& keys,
    const mx::array& values,
    const IntTable& block_table,
    const std::vector<int32_t>& offsets,
    const std::optional<std::vector<int32_t>>& counts,
    const std::vector<mx::array>& after,
    mx::StreamOrDevice s,
    const StoredForm& form) {
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
  int max_end = 0;
  for (int64_t e : end) {
    max_end = std::max<int>(max_end, int(e));
  }
  std::vector<mx::array> inputs = {
      row_major(keys, stream), row_major(values, stream)};
  auto [flags, shift_rank] = check_form(form, g.n_kv_heads, g.head_dim, max_end, stream, inputs);
  auto pins = std::make_shared<SlotPins>(arena, std::move(slots));
  inputs.insert(inputs.end(), after.begin(), after.end());
  return mx::array(
      {1},
      mx::uint32,
      std::make_shared<KVWrite>(
          stream, arena, layer, block_table, offsets, std::move(n_written), std::move(pins),
          flags, shift_rank),
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
  // The StoredForm arrays, in the order kv_write appended them.
  const int n_form = ((form_flags_ & kKeyScale) ? 1 : 0) + ((form_flags_ & kShift) ? 1 : 0) +
      ((form_flags_ & kShiftRank) ? 2 : 0);
  std::vector<mx::array> form;
  for (int i = 0; i < n_form; ++i) {
    form.push_back(mx::array::unsafe_weak_copy(inputs[2 + i]));
  }
  enc.dispatch([keys = mx::array::unsafe_weak_copy(keys),
                values = mx::array::unsafe_weak_copy(inputs[1]),
                form = std::move(form),
                flags = form_flags_,
                shift_rank = shift_rank_,
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
    size_t next = 0;
    a.rotate = (flags & kRotate) != 0;
    if (flags & kKeyScale) {
      a.key_scale = form[next++].data<float>();
    }
    if (flags & kShift) {
      a.shift_const = form[next++].data<float>();
    }
    if (flags & kShiftRank) {
      a.shift_w = form[next++].data<float>();
      a.shift_table = form[next++].data<float>();
      a.shift_rank = shift_rank;
    }
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
