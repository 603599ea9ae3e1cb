// eval_gpu of the KVWrite and QuantizedAttention primitives: encode the
// kernels of kv_write.metal and attention.metal on the stream's Metal command
// encoder. Built only on macOS with Metal (CMake option KVSNAP_METAL); other
// builds take the eval_gpu in kv_write.cpp / attention.cpp, which refuses.
//
// The arena is not an MLX array: its mmap'd, page-aligned mapping is wrapped
// once in a Metal buffer without a copy (unified memory), cached on the
// arena. Ordering comes from the tokens, as on the CPU: kv_write registers
// its token as an output and attention takes it as an input, so MLX puts a
// memory barrier (scope: all buffers, the arena's included) or a fence
// between them.
#include <dlfcn.h>

#include <algorithm>
#include <filesystem>
#include <string>

#include "../arena.h"
#include "../attention.h"
#include "../kv_write.h"
#include "../layout.h"
#include "mlx/backend/metal/device.h"
#include "launch.h"
#include "params.h"

namespace kvsnap {

namespace {

namespace launch = metal_launch;

// kvsnap.metallib sits next to the _ext module in the package folder.
std::string module_dir() {
  static const std::string dir = [] {
    Dl_info info;
    if (!dladdr(reinterpret_cast<void*>(&module_dir), &info)) {
      throw std::runtime_error("kvsnap: cannot locate the _ext module to load kvsnap.metallib");
    }
    return std::filesystem::path(info.dli_fname).parent_path().string();
  }();
  return dir;
}

MTL::Size mtl_size(const launch::Size3& s) {
  return MTL::Size(s.x, s.y, s.z);
}

// Encodes a launch of launch.h (the compute pipeline and arguments are set).
void dispatch(mx::metal::CommandEncoder& enc, const launch::Launch& l) {
  if (l.threads) {
    enc.dispatch_threads(mtl_size(l.grid), mtl_size(l.group));
  } else {
    enc.dispatch_threadgroups(mtl_size(l.grid), mtl_size(l.group));
  }
}

MTL::ComputePipelineState* kernel(mx::metal::Device& d, const std::string& name) {
  MTL::Library* lib = d.get_library("kvsnap", module_dir());
  return d.get_kernel(name, lib);
}

std::string dtype_name(mx::Dtype t) {
  if (t == mx::float32) {
    return "float32";
  }
  if (t == mx::float16) {
    return "float16";
  }
  return "bfloat16";
}

// The arena's mapping as a Metal buffer, made once per arena.
MTL::Buffer* arena_buffer(const Arena& arena, mx::metal::Device& d) {
  std::shared_ptr<void> view = arena.device_view([&d](uint8_t* base, size_t bytes) {
    MTL::Buffer* buf = d.mtl_device()->newBuffer(
        base,
        bytes,
        MTL::ResourceStorageModeShared | MTL::ResourceHazardTrackingModeUntracked,
        nullptr); // no deallocator: the arena unmaps its own memory
    if (!buf) {
      throw std::runtime_error(
          "kvsnap: Metal could not wrap the arena's " + std::to_string(bytes) +
          " bytes in a buffer");
    }
    return std::shared_ptr<void>(buf, [](void* p) {
      auto pool = mx::metal::new_scoped_memory_pool();
      static_cast<MTL::Buffer*>(p)->release();
    });
  });
  return static_cast<MTL::Buffer*>(view.get());
}

// A tiny array whose only job is to hold the arena and the kernel's slot
// pins until the command buffer that uses them completes (the encoder keeps
// its temporaries until then): a slot freed meanwhile is not reused before.
mx::array keep_alive(std::shared_ptr<Arena> arena, std::shared_ptr<SlotPins> pins) {
  mx::allocator::Data data(
      mx::allocator::allocator().malloc(4),
      [arena = std::move(arena), pins = std::move(pins)](mx::allocator::Buffer b) {
        mx::allocator::allocator().free(b);
      });
  return mx::array(std::move(data), {1}, mx::uint8);
}

mx::array int32_array(const std::vector<int32_t>& v, mx::Shape shape) {
  return mx::array(v.begin(), std::move(shape), mx::int32);
}

mx::array float_scratch(size_t n) {
  mx::array a({int(n)}, mx::float32, nullptr, {});
  a.set_data(mx::allocator::malloc(a.nbytes()));
  return a;
}

} // namespace

void KVWrite::eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  out.data<uint32_t>()[0] = 0; // fresh memory no kernel uses yet
  const mx::array& keys = inputs[0];
  const mx::array& values = inputs[1];
  const ArenaGeometry& g = arena_->geometry();
  auto& d = mx::metal::device(stream().device);
  auto& enc = mx::metal::get_command_encoder(stream());
  // Later readers take the token: registering it orders them after this write.
  enc.register_output_array(out);
  for (size_t i = 2; i < inputs.size(); ++i) {
    enc.set_input_array(inputs[i], 30); // earlier readers: wait for them
  }
  const int B = keys.shape(0), L = keys.shape(2);
  const int64_t rows = int64_t(B) * g.n_kv_heads * L;
  if (rows == 0) {
    return;
  }
  KVWriteParams p{};
  p.slot_bytes = long(arena_->slot_bytes());
  for (int i = 0; i < 6; ++i) {
    p.off[i] = long(arena_->layer(layer_).off[i]);
  }
  p.B = B;
  p.L = L;
  p.n_kv_heads = g.n_kv_heads;
  p.head_dim = g.head_dim;
  p.group_size = g.group_size;
  p.block_tokens = g.block_tokens;
  p.max_blocks = block_table_.shape[1];
  p.k_bits = g.k_bits;
  p.v_bits = g.v_bits;
  mx::array table = int32_array(block_table_.data, {block_table_.shape[0], block_table_.shape[1]});
  mx::array offsets = int32_array(offsets_, {int(offsets_.size())});
  mx::array counts = int32_array(counts_, {int(counts_.size())});
  enc.add_temporary(table);
  enc.add_temporary(offsets);
  enc.add_temporary(counts);
  enc.add_temporary(keep_alive(arena_, pins_));

  enc.set_compute_pipeline_state(kernel(d, launch::kv_write_kernel(dtype_name(keys.dtype()))));
  enc.set_input_array(keys, 0);
  enc.set_input_array(values, 1);
  enc.set_input_array(table, 2);
  enc.set_input_array(offsets, 3);
  enc.set_input_array(counts, 4);
  enc.set_buffer(arena_buffer(*arena_, d), 5);
  enc.set_bytes(p, 6);
  dispatch(enc, launch::kv_write_launch(p));
}

void QuantizedAttention::eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& d = mx::metal::device(stream().device);
  auto& enc = mx::metal::get_command_encoder(stream());
  const mx::array& q = inputs[0];
  if (paged_) {
    for (size_t i = 1; i < inputs.size(); ++i) {
      enc.set_input_array(inputs[i], 30); // kv_write tokens: read after the writes
    }
  }
  if (out.size() == 0) {
    return;
  }

  AttentionParams p{};
  p.B = q.shape(0);
  p.Hq = q.shape(1);
  p.L = q.shape(2);
  p.head_dim = q.shape(3);
  p.group_size = group_size_;
  p.causal = causal_ ? 1 : 0;
  p.window = window_;
  p.scale = scale_;
  std::vector<int32_t> kv_len;
  std::string scale_name = "float16";
  if (paged_) {
    const Arena& arena = *paged_->arena;
    p.paged = 1;
    p.n_kv_heads = arena.geometry().n_kv_heads;
    p.slot_bytes = long(arena.slot_bytes());
    for (int i = 0; i < 6; ++i) {
      p.off[i] = long(arena.layer(paged_->layer).off[i]);
    }
    p.block_tokens = arena.geometry().block_tokens;
    p.max_blocks = paged_->block_table.shape[1];
    kv_len = paged_->lengths;
    if (has_mask_) {
      const mx::array& m = inputs[1];
      p.has_mask = 1;
      p.mask_is_bool = 0;
      for (int k = 0; k < 4; ++k) {
        p.mask_stride[k] = long(m.strides()[k]);
      }
    }
  } else {
    p.n_kv_heads = inputs[1].shape(1);
    for (int i = 0; i < 6; ++i) {
      for (int k = 0; k < 3; ++k) {
        p.stride[i][k] = long(inputs[1 + i].strides()[k]);
      }
    }
    scale_name = dtype_name(inputs[2].dtype());
    kv_len.assign(p.B, inputs[1].shape(2));
    if (has_mask_) {
      const mx::array& m = inputs[7];
      p.has_mask = 1;
      p.mask_is_bool = m.dtype() == mx::bool_ ? 1 : 0;
      for (int k = 0; k < 4; ++k) {
        p.mask_stride[k] = long(m.strides()[k]);
      }
    }
  }

  const int64_t rows = int64_t(p.B) * p.Hq * p.L;
  const int longest = kv_len.empty() ? 0 : *std::max_element(kv_len.begin(), kv_len.end());
  p.n_splits = launch::attention_splits(launch::attention_row_groups(p), longest);

  mx::array lengths = int32_array(kv_len, {p.B});
  mx::array part_m = float_scratch(size_t(rows) * p.n_splits);
  mx::array part_l = float_scratch(size_t(rows) * p.n_splits);
  mx::array part_acc = float_scratch(size_t(rows) * p.n_splits * p.head_dim);
  enc.add_temporaries({lengths, part_m, part_l, part_acc});

  enc.set_compute_pipeline_state(kernel(
      d, launch::attention_partial_kernel(dtype_name(q.dtype()), scale_name, k_bits_, v_bits_)));
  enc.set_input_array(q, 0);
  enc.set_input_array(lengths, 3);
  if (paged_) {
    mx::array table = int32_array(
        paged_->block_table.data, {paged_->block_table.shape[0], paged_->block_table.shape[1]});
    enc.add_temporary(table);
    enc.add_temporary(keep_alive(paged_->arena, paged_->pins));
    enc.set_buffer(arena_buffer(*paged_->arena, d), 1);
    enc.set_input_array(table, 2);
    for (int i = 0; i < 6; ++i) {
      enc.set_input_array(q, 4 + i); // unused by a paged source; bound for validity
    }
  } else {
    enc.set_input_array(q, 1); // unused by a contiguous source
    enc.set_input_array(lengths, 2);
    for (int i = 0; i < 6; ++i) {
      enc.set_input_array(inputs[1 + i], 4 + i);
    }
  }
  enc.set_input_array(has_mask_ ? inputs[paged_ ? 1 : 7] : q, 10);
  enc.set_bytes(p, 11);
  enc.set_output_array(part_m, 12);
  enc.set_output_array(part_l, 13);
  enc.set_output_array(part_acc, 14);
  dispatch(enc, launch::attention_partial_launch(p));

  enc.set_compute_pipeline_state(kernel(d, launch::attention_merge_kernel(dtype_name(out.dtype()))));
  enc.set_input_array(part_m, 0);
  enc.set_input_array(part_l, 1);
  enc.set_input_array(part_acc, 2);
  enc.set_output_array(out, 3);
  enc.set_bytes(p, 4);
  dispatch(enc, launch::attention_merge_launch(p));
}

} // namespace kvsnap
