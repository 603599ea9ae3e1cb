#include "kernels.h"

#include <cstdlib>
#include <string_view>

#include "../layout.h"

namespace kvsnap::cpu {

namespace {

// KVSNAP_ISA=generic forces the baseline kernels (tests cover both sets).
bool has_avx2() {
#if defined(KVSNAP_HAVE_AVX2_KERNELS)
  static const bool yes = __builtin_cpu_supports("avx2") &&
      __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
      !(std::getenv("KVSNAP_ISA") &&
        std::string_view(std::getenv("KVSNAP_ISA")) == "generic");
  return yes;
#else
  return false;
#endif
}

} // namespace

const char* isa() {
  return has_avx2() ? "avx2" : "generic";
}

void attention(const AttentionArgs& args) {
#if defined(KVSNAP_HAVE_AVX2_KERNELS)
  if (has_avx2()) {
    return avx2::attention(args);
  }
#endif
  generic::attention(args);
}

void kv_write(const WriteArgs& args) {
#if defined(KVSNAP_HAVE_AVX2_KERNELS)
  if (has_avx2()) {
    return avx2::kv_write(args);
  }
#endif
  generic::kv_write(args);
}

RowRun row_run(const QuantSource& src, int b, int h, int t) {
  RowRun run;
  const void* p[6];
  int64_t elem[6];
  int scale_bytes = src.scale_dtype == DType::f32 ? 4 : 2;
  for (int i = 0; i < 6; ++i) {
    elem[i] = (i % 3 == 0) ? 4 : scale_bytes;
  }
  if (src.paged) {
    int bt = src.block_tokens;
    int slot = src.block_table[kv_table_index(b, src.max_blocks, t, bt)];
    const uint8_t* base = src.arena + kv_slot_offset(slot, long(src.slot_bytes));
    int64_t row = kv_row_in_block(h, t, bt);
    int64_t groups = kv_groups_per_row(src.head_dim, src.group_size);
    for (int i = 0; i < 6; ++i) {
      int bits = i < 3 ? src.k_bits : src.v_bits;
      run.st[i] = (i % 3 == 0) ? kv_words_per_row(src.head_dim, bits) : groups;
      p[i] = base + src.off[i] + row * run.st[i] * elem[i];
    }
    run.run = kv_left_in_block(t, bt);
  } else {
    for (int i = 0; i < 6; ++i) {
      const int64_t* s = src.stride[i];
      run.st[i] = s[2];
      p[i] = static_cast<const char*>(src.ptr[i]) +
          (b * s[0] + h * s[1] + t * s[2]) * elem[i];
    }
    run.run = src.n_tokens - t;
  }
  run.kp = static_cast<const uint32_t*>(p[0]);
  run.ks = p[1];
  run.kb = p[2];
  run.vp = static_cast<const uint32_t*>(p[3]);
  run.vs = p[4];
  run.vb = p[5];
  return run;
}

} // namespace kvsnap::cpu
