#include "common.h"

#include <cstring>
#include <variant>

#include "arena.h"
#include "mlx/ops.h"
#include "mlx/utils.h"

namespace kvsnap {

cpu::DType float_dtype(const mx::array& a, const char* arg) {
  if (a.dtype() == mx::float32) {
    return cpu::DType::f32;
  }
  if (a.dtype() == mx::float16) {
    return cpu::DType::f16;
  }
  if (a.dtype() == mx::bfloat16) {
    return cpu::DType::bf16;
  }
  std::ostringstream msg;
  msg << "must be float32, float16 or bfloat16, got " << a.dtype();
  throw InvalidArgument(arg, msg.str());
}

mx::array row_major(const mx::array& x, const mx::Stream& stream) {
  if (x.is_available() && x.flags().row_contiguous) {
    return x;
  }
  return mx::contiguous(x, false, stream);
}

std::string shape_str(const mx::Shape& s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) {
    out += (i ? ", " : "") + std::to_string(s[i]);
  }
  return out + (s.size() == 1 ? ",)" : ")");
}

void poison_fill(void* out, size_t bytes) {
  if (poison()) {
    std::memset(out, 0xFF, bytes);
  }
}

mx::Stream kernel_stream(mx::StreamOrDevice s, const char* op) {
#ifdef KVSNAP_METAL
  (void)op;
  return mx::to_stream(s);
#else
  // Look at the device before asking MLX for a stream: on CPU-only builds
  // MLX itself refuses to make a GPU stream, with a less useful message.
  bool gpu = false;
  if (auto* d = std::get_if<mx::Device>(&s)) {
    gpu = d->type == mx::Device::gpu;
  } else if (auto* st = std::get_if<mx::Stream>(&s)) {
    gpu = st->device.type == mx::Device::gpu;
  }
  if (!gpu) {
    mx::Stream stream = mx::to_stream(s);
    gpu = stream.device.type == mx::Device::gpu;
    if (!gpu) {
      return stream;
    }
  }
  throw DeviceUnsupported(
      std::string(op) +
      ": this kvsnap build has no GPU kernels (they are built on macOS "
      "only); run it on the CPU stream (mx.cpu)");
#endif
}

std::vector<int64_t> check_block_table(
    const Arena& arena,
    const IntTable& table,
    int B,
    const std::vector<int64_t>& begin,
    const std::vector<int64_t>& end,
    const char* op) {
  if (table.shape.size() != 2 || table.shape[0] != B) {
    std::string got = "(";
    for (size_t i = 0; i < table.shape.size(); ++i) {
      got += (i ? ", " : "") + std::to_string(table.shape[i]);
    }
    throw InvalidArgument(
        "block_table",
        "must have shape (B, max_blocks) with B = " + std::to_string(B) +
            ", got " + got + ")");
  }
  const int max_blocks = table.shape[1];
  const int bt = arena.geometry().block_tokens;
  std::vector<int64_t> slots;
  for (int b = 0; b < B; ++b) {
    if (begin[b] >= end[b]) {
      continue; // touches no block
    }
    if (end[b] > int64_t(max_blocks) * bt) {
      throw InvalidArgument(
          "block_table",
          "sequence " + std::to_string(b) + " needs " +
              std::to_string((end[b] + bt - 1) / bt) + " blocks for " +
              std::to_string(end[b]) + " tokens but its row holds " +
              std::to_string(max_blocks));
    }
    for (int64_t blk = begin[b] / bt; blk * bt < end[b]; ++blk) {
      int32_t slot = table.data[size_t(b) * max_blocks + blk];
      try {
        arena.check_live(slot, op);
      } catch (const SlotError& e) {
        throw InvalidArgument(
            "block_table",
            "block " + std::to_string(blk) + " of sequence " +
                std::to_string(b) + ": " + e.what());
      }
      slots.push_back(slot);
    }
  }
  return slots;
}

} // namespace kvsnap
