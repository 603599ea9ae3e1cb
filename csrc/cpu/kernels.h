// CPU kernels of kvsnap, free of MLX and Python types. The same source
// (kernels_impl.h) is compiled once for the baseline target and, on x86-64,
// once for AVX2+FMA+F16C and twice more with the dot products in integers
// (AVX2, AVX-512 VNNI); on arm64 Linux once more with them in integers
// (NEON sdot). dispatch.cpp picks one at run time.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace kvsnap::cpu {

enum class DType : int { f32 = 0, f16 = 1, bf16 = 2 };

// Where the quantized rows of one layer live. Either paged (arena slots found
// through a block table) or contiguous ([B, Hkv, T, ...] arrays with strides).
// Scales and biases of paged sources are always float16.
struct QuantSource {
  int k_bits = 4; // bits of the keys' packed data
  int v_bits = 4; // bits of the values' packed data
  int group_size = 64;
  int head_dim = 0;
  int n_kv_heads = 0;
  DType scale_dtype = DType::f16;

  // Paged: slot s of the arena starts at arena + s * slot_bytes; the six
  // arrays of this layer start at off[0..5] inside it (K p/s/b, V p/s/b).
  bool paged = false;
  const uint8_t* arena = nullptr;
  size_t slot_bytes = 0;
  size_t off[6] = {};
  int block_tokens = 0;
  const int32_t* block_table = nullptr; // [B, max_blocks]
  int max_blocks = 0;

  // Contiguous: base pointers and element strides (batch, head, token) of
  // K packed/scales/biases and V packed/scales/biases.
  const void* ptr[6] = {};
  int64_t stride[6][3] = {};
  int n_tokens = 0;
};

// Pointers to row t of (b, h) for the six arrays, and how many consecutive
// tokens follow at the same token stride (`run`).
struct RowRun {
  const uint32_t* kp;
  const void* ks;
  const void* kb;
  const uint32_t* vp;
  const void* vs;
  const void* vb;
  int64_t st[6]; // token strides in elements
  int run;
};

RowRun row_run(const QuantSource& src, int b, int h, int t);

struct AttentionArgs {
  int B = 0, Hq = 0, L = 0;
  float scale = 1.0f;
  const void* q = nullptr; // [B, Hq, L, D], row-major
  DType q_dtype = DType::f32;
  void* out = nullptr; // [B, Hq, L, D], row-major
  const int32_t* kv_len = nullptr; // [B] keys visible to sequence b
  bool causal = false; // query l sits at position kv_len[b] - L + l
  int window = 0; // > 0: query at p sees keys (p - window, p]
  // Optional mask over [B, Hq, L, T]: bool (keep where true) or float32
  // (added to the scores); element strides, 0 where broadcast.
  const void* mask = nullptr;
  bool mask_is_bool = false;
  int64_t mask_stride[4] = {};
  // Optional low-rank score bias (kvsnap.offsets' key-offset correction):
  // the score of query row (b, hq, l) and key t gains
  //   sum_e c_e T(e, t),  T(e, t) = bias_table[((t / 32) * bias_rank + e) * 32 + t % 32],
  // c_e = (scale * q) . bias_w[(hq / G) * bias_rank + e] (D floats each).
  // The table is blocked by 32 keys (one softmax chunk reads one run of
  // memory) and covers every key position.
  const float* bias_w = nullptr; // [Hkv, bias_rank, D]
  const float* bias_table = nullptr; // [>= max kv_len / 32, bias_rank, 32]
  int bias_rank = 0; // <= kMaxBiasRank
  // Optional basis of the stored K/V (kvsnap's key balance and rotation):
  // each query row is multiplied by query_scale[hq / G] ([Hkv, D]), then
  // rotated by the orthonormal Hadamard transform if `rotate`, and the output
  // rows rotated back.
  const float* query_scale = nullptr;
  bool rotate = false;
  QuantSource kv;
};

constexpr int kMaxBiasRank = 32;
constexpr int kBiasBlock = 32; // keys per block of the score-bias table

// out = softmax(scale * q k^T + mask) v, dequantizing K/V on the fly.
// A query row that sees no key gets zeros.
void attention(const AttentionArgs& args);

struct WriteArgs {
  int B = 0, L = 0;
  const void* keys = nullptr; // [B, Hkv, L, D], row-major
  const void* values = nullptr;
  DType dtype = DType::f32;
  const int32_t* offsets = nullptr; // [B] position of the first new token
  const int32_t* counts = nullptr; // [B] tokens l < counts[b] are written, the rest is padding
  QuantSource dst; // paged
  uint8_t* arena = nullptr; // writable alias of dst.arena
  // Optional stored form (kvsnap's key offsets and rotation), float32: a
  // key row x of KV head h at position p is quantized as
  //   H((x - shift_const[h] - sum_e T(e, p) shift_w[h * shift_rank + e]) / key_scale[h]),
  //   T(e, p) = shift_table[((p / 32) * shift_rank + e) * 32 + p % 32]
  // (each term in that order, so a token gets the same bits alone or
  // batched), a value row as H(x); H is the orthonormal Hadamard transform
  // if `rotate`, else nothing. Null arrays: no such term.
  bool rotate = false;
  const float* key_scale = nullptr; // [Hkv, D]
  const float* shift_const = nullptr; // [Hkv, D]
  const float* shift_w = nullptr; // [Hkv, shift_rank, D] (with shift_table and shift_const)
  const float* shift_table = nullptr; // [> every position written / 32, shift_rank, 32] (bias_table's layout)
  int shift_rank = 0;
};

// Quantizes keys/values (MLX affine algorithm, float16 scales/biases) into
// the arena positions given by dst.block_table and offsets; padded tokens
// (l >= counts[b]) are skipped before their block is looked up.
void kv_write(const WriteArgs& args);

// Per-ISA entry points, used by dispatch.cpp.
namespace generic {
void attention(const AttentionArgs& args);
void kv_write(const WriteArgs& args);
} // namespace generic
namespace avx2 {
void attention(const AttentionArgs& args);
void kv_write(const WriteArgs& args);
} // namespace avx2
namespace avx2_int {
void attention(const AttentionArgs& args);
void kv_write(const WriteArgs& args);
} // namespace avx2_int
namespace avx2_vnni {
void attention(const AttentionArgs& args);
void kv_write(const WriteArgs& args);
} // namespace avx2_vnni
namespace avx512_vnni {
void attention(const AttentionArgs& args);
void kv_write(const WriteArgs& args);
} // namespace avx512_vnni
namespace neon_dotprod {
void attention(const AttentionArgs& args);
void kv_write(const WriteArgs& args);
} // namespace neon_dotprod

// Kernel sets, by name:
//   "generic"      float kernels for the baseline target (the reference)
//   "avx2"         float kernels for AVX2+FMA+F16C
//   "avx2-int"     both dot products in integers on AVX2 (vpmaddubsw; int8
//                  of 7 bits against 8-bit codes), the rest as "avx2"
//   "avx2-vnni"    as "avx2-int" with 256-bit vpdpbusd (AVX-VNNI, no
//                  AVX-512): int8 of full range, as "avx512-vnni"
//   "avx512-vnni"  both dot products in integers (int8 queries and weights
//                  times 4/8-bit codes, vpdpbusd), the rest as "avx2"
//   "neon-dotprod" arm64 with the dot-product extension: integers (sdot),
//                  the rest as "generic"
// The default is the last one this CPU supports; KVSNAP_ISA=<name> in the
// environment (read at the first kernel call) or set_isa() choose another.

// Name of the kernel set in use.
const char* isa();

// The kernel sets this build and CPU can run, baseline first.
std::vector<std::string> available_isas();

// Use kernel set `name` from now on; throws std::invalid_argument naming
// the sets available if it is not one of them.
void set_isa(const char* name);

} // namespace kvsnap::cpu
