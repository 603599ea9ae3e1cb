#include "attention.h"

#include <cmath>
#include <cstring>
#include <string>

#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"

namespace kvsnap {

namespace {

// Checks queries [B, Hq, L, D] against Hkv and D.
void check_queries(const mx::array& q, int n_kv_heads, int head_dim) {
  if (q.ndim() != 4) {
    throw InvalidArgument(
        "queries",
        "must have shape (B, n_heads, L, head_dim), got " +
            shape_str(q.shape()));
  }
  float_dtype(q, "queries");
  if (q.shape(3) != head_dim) {
    throw InvalidArgument(
        "queries",
        "head_dim " + std::to_string(q.shape(3)) + " differs from the keys' " +
            std::to_string(head_dim));
  }
  if (q.shape(1) % n_kv_heads != 0) {
    throw InvalidArgument(
        "queries",
        std::to_string(q.shape(1)) + " query heads are not a multiple of " +
            std::to_string(n_kv_heads) + " KV heads");
  }
}

void check_scale(float scale) {
  if (!(scale > 0.f) || !std::isfinite(scale)) {
    throw InvalidArgument(
        "scale", "must be a positive finite number, got " + std::to_string(scale));
  }
}

// Checks one (packed, scales, biases) triple; returns its T.
int check_triple(
    const std::vector<mx::array>& t,
    const char* arg,
    int B,
    int head_dim,
    int group_size,
    int bits) {
  if (t.size() != 3) {
    throw InvalidArgument(
        arg, "must be a (packed, scales, biases) triple, got " +
            std::to_string(t.size()) + " arrays");
  }
  const mx::array& p = t[0];
  if (p.ndim() != 4 || p.dtype() != mx::uint32) {
    throw InvalidArgument(
        arg, "packed data must be a uint32 array (B, n_kv_heads, T, head_dim * bits / 32), got shape " +
            shape_str(p.shape()));
  }
  if (p.shape(1) < 1) {
    throw InvalidArgument(arg, "has no KV heads (shape " + shape_str(p.shape()) + ")");
  }
  if (p.shape(0) != B) {
    throw InvalidArgument(
        arg, "batch " + std::to_string(p.shape(0)) + " differs from the queries' " +
            std::to_string(B));
  }
  if (int64_t(p.shape(3)) * 32 != int64_t(head_dim) * bits) {
    throw InvalidArgument(
        arg, "packed rows of " + std::to_string(p.shape(3)) + " words do not hold head_dim " +
            std::to_string(head_dim) + " at " + std::to_string(bits) + " bits");
  }
  mx::Shape meta = {p.shape(0), p.shape(1), p.shape(2), head_dim / group_size};
  for (int i = 1; i < 3; ++i) {
    const char* what = i == 1 ? "scales" : "biases";
    if (t[i].shape() != meta) {
      throw InvalidArgument(
          arg, std::string(what) + " must have shape " + shape_str(meta) + ", got " +
              shape_str(t[i].shape()));
    }
    float_dtype(t[i], arg);
    if (t[i].dtype() != t[1].dtype()) {
      throw InvalidArgument(arg, "scales and biases have different dtypes");
    }
  }
  return p.shape(2);
}

// A row-major copy of a 4-D array whose last axis is strided (rare: the
// kernel loads rows as dense runs).
std::vector<char> dense_copy(const mx::array& x) {
  const size_t item = x.itemsize();
  std::vector<char> buf(x.size() * item);
  const char* base = x.data<char>();
  size_t k = 0;
  for (int i0 = 0; i0 < x.shape(0); ++i0) {
    for (int i1 = 0; i1 < x.shape(1); ++i1) {
      for (int i2 = 0; i2 < x.shape(2); ++i2) {
        for (int i3 = 0; i3 < x.shape(3); ++i3, k += item) {
          int64_t off = i0 * x.strides()[0] + i1 * x.strides()[1] +
              i2 * x.strides()[2] + i3 * x.strides()[3];
          std::memcpy(&buf[k], base + off * item, item);
        }
      }
    }
  }
  return buf;
}

// A mask broadcast to the scores' shape `full`: bool (if allowed) kept as
// is, floating point as float32.
mx::array prepare_mask(const mx::array& m, const mx::Shape& full, bool allow_bool, mx::Stream stream) {
  if (m.ndim() > 4) {
    throw InvalidArgument(
        "mask", "has " + std::to_string(m.ndim()) + " dimensions; at most 4");
  }
  for (int i = 0; i < m.ndim(); ++i) {
    int dim = m.shape(m.ndim() - 1 - i);
    int want = full[3 - i];
    if (dim != 1 && dim != want) {
      throw InvalidArgument(
          "mask",
          "shape " + shape_str(m.shape()) +
              " does not broadcast to the scores " + shape_str(full));
    }
  }
  mx::array mm = m;
  if (m.dtype() == mx::bool_ && allow_bool) {
    // kept as is
  } else if (mx::issubdtype(m.dtype(), mx::floating)) {
    mm = mx::astype(m, mx::float32, stream);
  } else {
    std::ostringstream msg;
    msg << "must be " << (allow_bool ? "bool or " : "") << "floating point, got " << m.dtype();
    throw InvalidArgument("mask", msg.str());
  }
  return mx::broadcast_to(mm, full, stream);
}

// The score bias's rank E, after checking bias_w [n_kv_heads, E, head_dim]
// and bias_table [>= T / 32, E, 32] (float32, both or neither, CPU streams).
int check_bias(
    const std::optional<mx::array>& w,
    const std::optional<mx::array>& table,
    int n_kv_heads,
    int head_dim,
    int T,
    const mx::Stream& stream) {
  if (!w || !table) {
    throw InvalidArgument(w ? "bias_table" : "bias_w", "bias_w and bias_table go together");
  }
  if (stream.device.type != mx::Device::cpu) {
    throw InvalidArgument("bias_w", "the score bias runs on CPU streams only; pass a mask on the GPU");
  }
  if (w->dtype() != mx::float32 || table->dtype() != mx::float32) {
    throw InvalidArgument(
        w->dtype() != mx::float32 ? "bias_w" : "bias_table", "must be float32");
  }
  if (w->ndim() != 3 || w->shape(0) != n_kv_heads || w->shape(2) != head_dim ||
      w->shape(1) < 1 || w->shape(1) > cpu::kMaxBiasRank) {
    throw InvalidArgument(
        "bias_w",
        "must have shape (n_kv_heads=" + std::to_string(n_kv_heads) + ", E, head_dim=" +
            std::to_string(head_dim) + ") with 1 <= E <= " +
            std::to_string(cpu::kMaxBiasRank) + ", got " + shape_str(w->shape()));
  }
  const int E = w->shape(1);
  const int blocks = (T + cpu::kBiasBlock - 1) / cpu::kBiasBlock;
  if (table->ndim() != 3 || table->shape(1) != E || table->shape(2) != cpu::kBiasBlock ||
      table->shape(0) < blocks) {
    throw InvalidArgument(
        "bias_table",
        "must have shape (>= " + std::to_string(blocks) + " blocks, E=" + std::to_string(E) +
            ", " + std::to_string(cpu::kBiasBlock) + ") for " + std::to_string(T) +
            " key positions, got " + shape_str(table->shape()));
  }
  return E;
}

} // namespace

mx::array paged_attention(
    std::shared_ptr<Arena> arena,
    int layer,
    const mx::array& queries,
    const IntTable& block_table,
    const std::vector<int32_t>& lengths,
    float scale,
    bool causal,
    int window,
    const std::optional<mx::array>& mask,
    const std::vector<mx::array>& after,
    mx::StreamOrDevice s,
    const std::optional<mx::array>& bias_w,
    const std::optional<mx::array>& bias_table,
    const QueryForm& form) {
  mx::Stream stream = kernel_stream(s, "attention");
  const ArenaGeometry& g = arena->geometry();
  if (layer < 0 || layer >= g.n_layers) {
    throw InvalidArgument(
        "layer",
        std::to_string(layer) + " is out of range for an arena of " +
            std::to_string(g.n_layers) + " layers");
  }
  check_queries(queries, g.n_kv_heads, g.head_dim);
  check_scale(scale);
  if (window < 0) {
    throw InvalidArgument("window", "must be >= 0, got " + std::to_string(window));
  }
  if (window > 0 && !causal) {
    throw InvalidArgument(
        "window", "a sliding window needs causal=True (it is relative to each query's position)");
  }
  const int B = queries.shape(0);
  const int L = queries.shape(2);
  if (int(lengths.size()) != B) {
    throw InvalidArgument(
        "lengths",
        "has " + std::to_string(lengths.size()) + " entries for a batch of " +
            std::to_string(B));
  }
  std::vector<int64_t> begin(B, 0), end(B);
  for (int b = 0; b < B; ++b) {
    if (lengths[b] < 0 || (causal && lengths[b] < L)) {
      throw InvalidArgument(
          "lengths",
          "entry " + std::to_string(b) + " is " + std::to_string(lengths[b]) +
              (causal ? "; with causal masking each sequence must hold at "
                        "least its L = " + std::to_string(L) + " queries"
                      : "; lengths must be >= 0"));
    }
    end[b] = lengths[b];
    if (window > 0) {
      // The first query sits at lengths[b] - L and sees `window` keys back.
      begin[b] = std::max<int64_t>(0, int64_t(lengths[b]) - L - window + 1);
    }
  }
  std::vector<int64_t> slots =
      check_block_table(*arena, block_table, B, begin, end, "attention");
  auto pins = std::make_shared<SlotPins>(arena, std::move(slots));

  std::vector<mx::array> inputs = {row_major(queries, stream)};
  if (mask) {
    // Input 1 (before the kv_write tokens); float only: positions are masked
    // by causal/window.
    int T = 0;
    for (int32_t n : lengths) {
      T = std::max<int>(T, n);
    }
    inputs.push_back(prepare_mask(*mask, {B, queries.shape(1), L, T}, false, stream));
  }
  int bias_rank = 0;
  if (bias_w || bias_table) {
    int T = 0;
    for (int32_t n : lengths) {
      T = std::max<int>(T, n);
    }
    bias_rank = check_bias(bias_w, bias_table, g.n_kv_heads, g.head_dim, T, stream);
    inputs.push_back(row_major(*bias_w, stream));
    inputs.push_back(row_major(*bias_table, stream));
  }
  if (form.rotate || form.query_scale) {
    if (stream.device.type != mx::Device::cpu) {
      throw InvalidArgument(
          form.rotate ? "rotate" : "query_scale",
          "the stored basis is applied on CPU streams only; transform the queries first on the GPU");
    }
    const int D = g.head_dim;
    if (form.rotate && (D & (D - 1))) {
      throw InvalidArgument("rotate", "needs a power-of-two head_dim, got " + std::to_string(D));
    }
  }
  if (form.query_scale) {
    const mx::array& qs = *form.query_scale;
    if (qs.dtype() != mx::float32 || qs.shape() != mx::Shape{g.n_kv_heads, g.head_dim}) {
      throw InvalidArgument(
          "query_scale",
          "must be float32 of shape (" + std::to_string(g.n_kv_heads) + ", " +
              std::to_string(g.head_dim) + "), got " + shape_str(qs.shape()));
    }
    inputs.push_back(row_major(qs, stream));
  }
  inputs.insert(inputs.end(), after.begin(), after.end());
  PagedSpec spec{arena, layer, block_table, lengths, std::move(pins)};
  return mx::array(
      queries.shape(),
      queries.dtype(),
      std::make_shared<QuantizedAttention>(
          stream, std::move(spec), scale, causal, window, g.group_size, g.k_bits, g.v_bits,
          mask.has_value(), bias_rank, form.rotate, form.query_scale.has_value()),
      std::move(inputs));
}

mx::array q4_attention(
    const mx::array& queries,
    const std::vector<mx::array>& keys,
    const std::vector<mx::array>& values,
    float scale,
    bool causal,
    const std::optional<mx::array>& mask,
    int group_size,
    int bits,
    mx::StreamOrDevice s) {
  mx::Stream stream = kernel_stream(s, "q4_attention");
  if (queries.ndim() != 4) {
    throw InvalidArgument(
        "queries",
        "must have shape (B, n_heads, L, head_dim), got " +
            shape_str(queries.shape()));
  }
  const int D = queries.shape(3);
  check_quant_format(bits, group_size, D, "queries");
  check_scale(scale);
  const int B = queries.shape(0);
  int T = check_triple(keys, "keys", B, D, group_size, bits);
  int Tv = check_triple(values, "values", B, D, group_size, bits);
  if (keys[0].shape() != values[0].shape()) {
    throw InvalidArgument(
        "values",
        "packed shape " + shape_str(values[0].shape()) + " differs from keys " +
            shape_str(keys[0].shape()));
  }
  if (values[1].dtype() != keys[1].dtype()) {
    throw InvalidArgument("values", "scales dtype differs from the keys' scales");
  }
  check_queries(queries, keys[0].shape(1), D);
  const int Hq = queries.shape(1);
  const int L = queries.shape(2);
  if (causal && T < L) {
    throw InvalidArgument(
        "mask",
        "causal masking needs at least as many keys (" + std::to_string(T) +
            ") as queries (" + std::to_string(L) + ")");
  }
  (void)Tv;

  std::vector<mx::array> inputs = {row_major(queries, stream)};
  // The Metal kernel reads rows as dense runs (the CPU kernel copies the
  // rare strided row itself).
  const bool gpu = stream.device.type == mx::Device::gpu;
  for (const auto* triple : {&keys, &values}) {
    for (const mx::array& x : *triple) {
      inputs.push_back(gpu ? row_major(x, stream) : x);
    }
  }
  if (mask) {
    inputs.push_back(prepare_mask(*mask, {B, Hq, L, T}, true, stream));
  }
  return mx::array(
      queries.shape(),
      queries.dtype(),
      std::make_shared<QuantizedAttention>(
          stream,
          std::nullopt,
          scale,
          causal,
          0,
          group_size,
          bits,
          bits,
          mask.has_value()),
      std::move(inputs));
}

void QuantizedAttention::eval_cpu(
    const std::vector<mx::array>& inputs,
    mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  if (out.size() == 0) {
    return; // no query rows: nothing to compute
  }
  auto& enc = mx::cpu::get_command_encoder(stream());
  for (auto& in : inputs) {
    enc.set_input_array(in);
  }
  enc.set_output_array(out);
  std::vector<mx::array> ins;
  for (auto& in : inputs) {
    ins.push_back(mx::array::unsafe_weak_copy(in));
  }
  enc.dispatch([ins = std::move(ins),
                out = mx::array::unsafe_weak_copy(out),
                paged = paged_, // its pins hold the slots until this work is gone
                scale = scale_,
                causal = causal_,
                window = window_,
                group_size = group_size_,
                k_bits = k_bits_,
                v_bits = v_bits_,
                has_mask = has_mask_,
                bias_rank = bias_rank_,
                rotate = rotate_,
                has_query_scale = has_query_scale_]() mutable {
    const mx::array& q = ins[0];
    cpu::AttentionArgs a;
    a.B = q.shape(0);
    a.Hq = q.shape(1);
    a.L = q.shape(2);
    a.scale = scale;
    a.q = q.data<void>();
    a.q_dtype = float_dtype(q, "queries");
    a.out = out.data<void>();
    a.causal = causal;
    a.window = window;
    cpu::QuantSource& src = a.kv;
    src.k_bits = k_bits;
    src.v_bits = v_bits;
    src.group_size = group_size;
    src.head_dim = q.shape(3);
    std::vector<int32_t> kv_len;
    std::vector<char> dense[6];
    if (paged) {
      const Arena& arena = *paged->arena;
      src.n_kv_heads = arena.geometry().n_kv_heads;
      src.scale_dtype = cpu::DType::f16;
      src.paged = true;
      src.arena = arena.base();
      src.slot_bytes = arena.slot_bytes();
      for (int i = 0; i < 6; ++i) {
        src.off[i] = arena.layer(paged->layer).off[i];
      }
      src.block_tokens = arena.geometry().block_tokens;
      src.block_table = paged->block_table.data.data();
      src.max_blocks = paged->block_table.shape[1];
      kv_len = paged->lengths;
      if (has_mask) {
        const mx::array& m = ins[1];
        a.mask = m.data<void>();
        a.mask_is_bool = false;
        for (int d = 0; d < 4; ++d) {
          a.mask_stride[d] = m.strides()[d];
        }
      }
      if (bias_rank > 0) {
        const mx::array& w = ins[1 + has_mask];
        const mx::array& tab = ins[2 + has_mask];
        a.bias_rank = bias_rank;
        a.bias_w = w.data<float>();
        a.bias_table = tab.data<float>();
      }
      a.rotate = rotate;
      if (has_query_scale) {
        a.query_scale = ins[1 + has_mask + (bias_rank > 0 ? 2 : 0)].data<float>();
      }
    } else {
      src.n_kv_heads = ins[1].shape(1);
      src.scale_dtype = float_dtype(ins[2], "keys");
      src.n_tokens = ins[1].shape(2);
      for (int i = 0; i < 6; ++i) {
        const mx::array& x = ins[1 + i];
        src.ptr[i] = x.data<void>();
        for (int d = 0; d < 3; ++d) {
          src.stride[i][d] = x.strides()[d];
        }
        if (x.strides()[3] != 1 && x.shape(3) > 1) {
          dense[i] = dense_copy(x);
          src.ptr[i] = dense[i].data();
          int64_t n = x.shape(3);
          for (int d = 2; d >= 0; --d) {
            src.stride[i][d] = n;
            n *= x.shape(d);
          }
        }
      }
      kv_len.assign(a.B, src.n_tokens);
      if (has_mask) {
        const mx::array& m = ins[7];
        a.mask = m.data<void>();
        a.mask_is_bool = m.dtype() == mx::bool_;
        for (int d = 0; d < 4; ++d) {
          a.mask_stride[d] = m.strides()[d];
        }
      }
    }
    a.kv_len = kv_len.data();
    poison_fill(a.out, out.nbytes());
    cpu::attention(a);
  });
}

#ifndef KVSNAP_METAL
// Builds with the Metal kernels define this in csrc/metal/primitives.cpp.
void QuantizedAttention::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw DeviceUnsupported(
      "attention: this kvsnap build has no GPU kernels; run it on the CPU stream");
}
#endif

} // namespace kvsnap
