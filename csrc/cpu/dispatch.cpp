#include "kernels.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <string_view>

#if defined(KVSNAP_HAVE_X86_KERNELS)
#include <cpuid.h>
#endif

#if defined(KVSNAP_HAVE_NEON_DOTPROD)
#include <asm/hwcap.h>
#include <sys/auxv.h>
#endif

#include "../layout.h"

namespace kvsnap::cpu {

namespace {

using AttentionFn = void (*)(const AttentionArgs&);
using WriteFn = void (*)(const WriteArgs&);

struct KernelSet {
  const char* name;
  AttentionFn attention;
  WriteFn kv_write;
  bool (*supported)();
};

bool always() {
  return true;
}

#if defined(KVSNAP_HAVE_X86_KERNELS)
bool cpu_has_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c");
}

// AVX-VNNI (VEX-encoded vpdpbusd): CPUID leaf 7, subleaf 1, eax bit 4.
bool cpu_has_avx_vnni() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  return cpu_has_avx2() && __get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) && ((eax >> 4) & 1);
}

bool cpu_has_avx512_vnni() {
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512vnni");
}

// The "avx512-vnni" set's attention. Its 512-bit vectors hold one 64-byte
// row of codes (head_dim 128 at 4 bits); rows of at most 32 bytes (head_dim
// 64 at 4 bits, as in SmolLM2) fill half of every load, transpose and
// vpdpbusd, so where the CPU also has AVX-VNNI those calls run the
// "avx2-vnni" kernels: the same integer math (int8 of full range, one step
// per group and chunk) on 256-bit vectors, 1.7x faster there on an AMD
// Zen 5 (RESULTS.md, 2026-12-02).
void avx512_vnni_attention(const AttentionArgs& a) {
  static const bool has_avx_vnni = cpu_has_avx_vnni();
  const int row_bytes = a.kv.head_dim * std::max(a.kv.k_bits, a.kv.v_bits) / 8;
  if (row_bytes <= 32 && has_avx_vnni) {
    avx2_vnni::attention(a);
  } else {
    avx512_vnni::attention(a);
  }
}
#endif

#if defined(KVSNAP_HAVE_NEON_DOTPROD)
bool cpu_has_neon_dotprod() {
  return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
}
#endif

// Baseline first, preferred last.
const KernelSet kSets[] = {
    {"generic", generic::attention, generic::kv_write, always},
#if defined(KVSNAP_HAVE_X86_KERNELS)
    {"avx2", avx2::attention, avx2::kv_write, cpu_has_avx2},
    // kv_write has no integer form: the AVX2 one (the same bits as before).
    {"avx2-int", avx2_int::attention, avx2::kv_write, cpu_has_avx2},
    {"avx2-vnni", avx2_vnni::attention, avx2::kv_write, cpu_has_avx_vnni},
    {"avx512-vnni", avx512_vnni_attention, avx2::kv_write, cpu_has_avx512_vnni},
#endif
#if defined(KVSNAP_HAVE_NEON_DOTPROD)
    {"neon-dotprod", neon_dotprod::attention, generic::kv_write, cpu_has_neon_dotprod},
#endif
};
constexpr int kNumSets = sizeof(kSets) / sizeof(kSets[0]);

int find_set(std::string_view name) {
  for (int i = 0; i < kNumSets; ++i) {
    if (name == kSets[i].name && kSets[i].supported()) {
      return i;
    }
  }
  return -1;
}

std::string unknown_set_message(std::string_view what) {
  std::string msg = std::string(what) + ": not a kernel set this build and CPU can run; one of:";
  for (const auto& name : available_isas()) {
    msg += " " + name;
  }
  return msg;
}

// The set chosen at the first call: KVSNAP_ISA if set, else the best one.
int initial_set() {
  const char* env = std::getenv("KVSNAP_ISA");
  if (env && *env) {
    int i = find_set(env);
    if (i < 0) {
      throw std::invalid_argument(unknown_set_message(std::string("KVSNAP_ISA=") + env));
    }
    return i;
  }
  for (int i = kNumSets - 1; i > 0; --i) {
    if (kSets[i].supported()) {
      return i;
    }
  }
  return 0;
}

std::atomic<int>& current() {
  static std::atomic<int> set{initial_set()};
  return set;
}

} // namespace

std::vector<std::string> available_isas() {
  std::vector<std::string> names;
  for (const auto& set : kSets) {
    if (set.supported()) {
      names.emplace_back(set.name);
    }
  }
  return names;
}

void set_isa(const char* name) {
  int i = find_set(name);
  if (i < 0) {
    throw std::invalid_argument(unknown_set_message(std::string("'") + name + "'"));
  }
  current().store(i);
}

const char* isa() {
  return kSets[current().load()].name;
}

void attention(const AttentionArgs& args) {
  kSets[current().load()].attention(args);
}

void kv_write(const WriteArgs& args) {
  kSets[current().load()].kv_write(args);
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
