// The fused quantized attention primitive: softmax(scale * q k^T) v with K/V
// read in MLX's affine-quantized layout and dequantized on the fly, either
// from arena blocks through a block table or from contiguous arrays.
#pragma once

#include <memory>
#include <optional>
#include <vector>

#include "arena.h"
#include "common.h"
#include "mlx/primitives.h"

namespace kvsnap {

// Attention of queries [B, Hq, L, D] over `layer` of the arena. Sequence b
// holds lengths[b] tokens in the blocks block_table[b]; with `causal` its L
// queries are its last L positions. window > 0 limits each query to the last
// `window` keys. mask: none or a float array broadcastable to [B, Hq, L, T]
// (T = the longest of `lengths`) added to the scores, as in q4_attention
// (kvsnap.offsets adds its key-offset correction this way). bias_w [Hkv, E,
// D] and bias_table [>= T / 32, E, 32] (float32, CPU streams only): a
// low-rank score bias computed in the kernel, row (b, hq, l) and key t
// gaining sum_e (scale * q . bias_w[hq / G, e]) bias_table[t / 32, e, t % 32]
// (the same correction without materializing a mask). `after`: tokens of kv_write
// calls this read must follow. The op pins the slots it reads.
// The basis the paged K/V are stored in (kv_write's StoredForm; CPU
// streams): each query row is multiplied by query_scale[hq / G]
// ([n_kv_heads, D] float32) and rotated by the orthonormal Hadamard
// transform if `rotate`; the output is rotated back.
struct QueryForm {
  bool rotate = false;
  std::optional<mx::array> query_scale;
};

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
    mx::StreamOrDevice s = {},
    const std::optional<mx::array>& bias_w = std::nullopt,
    const std::optional<mx::array>& bias_table = std::nullopt,
    const QueryForm& form = {});

// The same over contiguous quantized K/V: keys and values are
// (packed [B, Hkv, T, D * bits / 32] uint32, scales, biases [B, Hkv, T,
// D / group_size]). mask: none, causal (queries are the last L of T
// positions), or an array broadcastable to [B, Hq, L, T] (bool: keep where
// true; float: added to the scores).
mx::array q4_attention(
    const mx::array& queries,
    const std::vector<mx::array>& keys,
    const std::vector<mx::array>& values,
    float scale,
    bool causal,
    const std::optional<mx::array>& mask,
    int group_size,
    int bits,
    mx::StreamOrDevice s = {});

struct PagedSpec {
  std::shared_ptr<Arena> arena;
  int layer;
  IntTable block_table;
  std::vector<int32_t> lengths;
  // The slots read, held until the node and every copy of this spec (the
  // dispatched work's) are gone.
  std::shared_ptr<SlotPins> pins;
};

class QuantizedAttention : public mx::UnaryPrimitive {
 public:
  QuantizedAttention(
      mx::Stream stream,
      std::optional<PagedSpec> paged,
      float scale,
      bool causal,
      int window,
      int group_size,
      int k_bits,
      int v_bits,
      bool has_mask,
      int bias_rank = 0,
      bool rotate = false,
      bool has_query_scale = false)
      : mx::UnaryPrimitive(stream),
        paged_(std::move(paged)),
        scale_(scale),
        causal_(causal),
        window_(window),
        group_size_(group_size),
        k_bits_(k_bits),
        v_bits_(v_bits),
        has_mask_(has_mask),
        bias_rank_(bias_rank),
        rotate_(rotate),
        has_query_scale_(has_query_scale) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "QuantizedAttention";
  }

 private:
  std::optional<PagedSpec> paged_;
  float scale_;
  bool causal_;
  int window_;
  int group_size_;
  int k_bits_;
  int v_bits_;
  bool has_mask_;
  int bias_rank_; // > 0: inputs bias_w and bias_table follow the mask (CPU only)
  bool rotate_; // QueryForm (CPU only)
  bool has_query_scale_; // input query_scale follows the bias
};

} // namespace kvsnap
