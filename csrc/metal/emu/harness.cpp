// Runs kvsnap's Metal kernels under the CPU emulation of ./metal_stdlib
// (tests/test_metal_emulated.py compiles and drives it).
//
//     harness kv_write SPEC      # reads and rewrites the arena file
//     harness attention SPEC     # writes the output file; prints n_splits and
//                                # the K and V elements pass 1 dequantized
//
// SPEC is a text file of "name value..." lines: the kernel arguments as
// numbers and the paths of raw binary files (native byte order) holding the
// buffers. Arguments and grids are built by ../launch.h, as primitives.cpp
// builds them for the GPU.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "launch.h"

// K (0) and V (1) elements dequantized by pass 1 (attention.metal's hook).
std::atomic<long> dequantized[2];
#define KVSNAP_COUNT_DEQUANT(what) dequantized[what].fetch_add(1, std::memory_order_relaxed)

// The kernels, compiled against the emulation (-I csrc/metal/emu first).
#include "kv_write.metal"
#include "attention.metal"

static_assert(
    kvsnap::metal_launch::kSimds == kSimds && kvsnap::metal_launch::kLanes == kLanes &&
        kvsnap::metal_launch::kGroupRows == kGroupRows,
    "launch.h sizes pass 1's grid with attention.metal's numbers");

namespace {

namespace launch = kvsnap::metal_launch;

struct Spec {
  std::map<std::string, std::vector<std::string>> fields;

  explicit Spec(const std::string& path) {
    std::ifstream in(path);
    if (!in) {
      throw std::runtime_error("cannot read spec " + path);
    }
    std::string line;
    while (std::getline(in, line)) {
      std::istringstream words(line);
      std::string name, word;
      if (!(words >> name)) {
        continue;
      }
      while (words >> word) {
        fields[name].push_back(word);
      }
    }
  }
  const std::string& str(const std::string& name, size_t i = 0) const {
    auto it = fields.find(name);
    if (it == fields.end() || it->second.size() <= i) {
      throw std::runtime_error("spec has no value " + std::to_string(i) + " of " + name);
    }
    return it->second[i];
  }
  long num(const std::string& name, size_t i = 0) const { return std::stol(str(name, i)); }
  float real(const std::string& name) const { return std::stof(str(name)); }
};

// A raw file in memory, 8-byte aligned.
struct Buffer {
  std::vector<uint64_t> words;
  size_t bytes = 0;

  template <typename T>
  T* as() {
    return reinterpret_cast<T*>(words.data());
  }
};

Buffer load(const std::string& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) {
    throw std::runtime_error("cannot read " + path);
  }
  Buffer b;
  b.bytes = size_t(in.tellg());
  b.words.assign(b.bytes / 8 + 1, 0);
  in.seekg(0);
  in.read(reinterpret_cast<char*>(b.words.data()), std::streamsize(b.bytes));
  return b;
}

void save(const std::string& path, const void* data, size_t bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(static_cast<const char*>(data), std::streamsize(bytes));
  if (!out) {
    throw std::runtime_error("cannot write " + path);
  }
}

void run_launch(const launch::Launch& l, const std::function<void(const metal_emu::ThreadInfo&)>& body) {
  const metal_emu::Size3 grid{l.grid.x, l.grid.y, l.grid.z};
  const metal_emu::Size3 group{l.group.x, l.group.y, l.group.z};
  if (l.threads) {
    metal_emu::dispatch_threads(grid, group, body);
  } else {
    metal_emu::dispatch_threadgroups(grid, group, body);
  }
}

// ------------------------------------------------------------------ kv_write

template <typename T>
void kv_write(const Spec& s) {
  KVWriteParams p{};
  p.slot_bytes = s.num("slot_bytes");
  for (int i = 0; i < 6; ++i) {
    p.off[i] = s.num("off", i);
  }
  p.B = int(s.num("B"));
  p.L = int(s.num("L"));
  p.n_kv_heads = int(s.num("n_kv_heads"));
  p.head_dim = int(s.num("head_dim"));
  p.group_size = int(s.num("group_size"));
  p.block_tokens = int(s.num("block_tokens"));
  p.max_blocks = int(s.num("max_blocks"));
  p.k_bits = int(s.num("k_bits"));
  p.v_bits = int(s.num("v_bits"));
  Buffer keys = load(s.str("keys")), values = load(s.str("values"));
  Buffer table = load(s.str("block_table")), offsets = load(s.str("offsets"));
  Buffer counts = load(s.str("counts")), arena = load(s.str("arena"));
  run_launch(launch::kv_write_launch(p), [&](const metal_emu::ThreadInfo& t) {
    kvsnap_kv_write<T>(
        keys.as<T>(), values.as<T>(), table.as<int>(), offsets.as<int>(), counts.as<int>(),
        arena.as<uchar>(), p, t.thread_position_in_grid);
  });
  save(s.str("arena"), arena.words.data(), arena.bytes);
}

// ----------------------------------------------------------------- attention

struct AttentionBuffers {
  Buffer queries, arena, table, lengths, mask;
  Buffer kv[6]; // contiguous source: K packed/scales/biases, V ...
  std::vector<float> part_m, part_l, part_acc;
};

template <typename QT, typename ST, int KB, int VB>
void partial(AttentionBuffers& in, AttentionParams& p) {
  run_launch(launch::attention_partial_launch(p), [&](const metal_emu::ThreadInfo& t) {
    kvsnap_attention_partial<QT, ST, KB, VB>(
        in.queries.as<QT>(), in.arena.as<uchar>(), in.table.as<int>(), in.lengths.as<int>(),
        in.kv[0].as<uint>(), in.kv[1].as<ST>(), in.kv[2].as<ST>(), in.kv[3].as<uint>(),
        in.kv[4].as<ST>(), in.kv[5].as<ST>(), in.mask.as<uchar>(), p, in.part_m.data(),
        in.part_l.data(), in.part_acc.data(), t.threadgroup_position_in_grid,
        t.thread_index_in_threadgroup, t.simdgroup_index_in_threadgroup,
        t.thread_index_in_simdgroup);
  });
}

template <typename QT, typename ST>
void partial_bits(AttentionBuffers& in, AttentionParams& p, int k_bits, int v_bits) {
  if (k_bits == 4 && v_bits == 4) {
    partial<QT, ST, 4, 4>(in, p);
  } else if (k_bits == 4 && v_bits == 8) {
    partial<QT, ST, 4, 8>(in, p);
  } else if (k_bits == 6 && v_bits == 4) {
    partial<QT, ST, 6, 4>(in, p);
  } else if (k_bits == 6 && v_bits == 8) {
    partial<QT, ST, 6, 8>(in, p);
  } else if (k_bits == 8 && v_bits == 4) {
    partial<QT, ST, 8, 4>(in, p);
  } else if (k_bits == 8 && v_bits == 8) {
    partial<QT, ST, 8, 8>(in, p);
  } else {
    throw std::runtime_error("no kernel for k_bits " + std::to_string(k_bits) + ", v_bits " +
                             std::to_string(v_bits));
  }
}

template <typename QT>
void attention_typed(const Spec& s, AttentionBuffers& in, AttentionParams& p) {
  const std::string scales = s.str("scale_dtype");
  const int kb = int(s.num("k_bits")), vb = int(s.num("v_bits"));
  if (scales == "float32") {
    partial_bits<QT, float>(in, p, kb, vb);
  } else if (scales == "float16") {
    partial_bits<QT, half>(in, p, kb, vb);
  } else {
    partial_bits<QT, bf16>(in, p, kb, vb);
  }
  const size_t rows = size_t(p.B) * p.Hq * p.L;
  std::vector<QT> out(rows * p.head_dim);
  run_launch(launch::attention_merge_launch(p), [&](const metal_emu::ThreadInfo& t) {
    kvsnap_attention_merge<QT>(
        in.part_m.data(), in.part_l.data(), in.part_acc.data(), out.data(), p,
        t.threadgroup_position_in_grid.x, t.thread_index_in_threadgroup);
  });
  save(s.str("out"), out.data(), out.size() * sizeof(QT));
}

void attention(const Spec& s) {
  AttentionParams p{};
  AttentionBuffers in;
  p.B = int(s.num("B"));
  p.Hq = int(s.num("Hq"));
  p.L = int(s.num("L"));
  p.head_dim = int(s.num("head_dim"));
  p.n_kv_heads = int(s.num("n_kv_heads"));
  p.group_size = int(s.num("group_size"));
  p.causal = int(s.num("causal"));
  p.window = int(s.num("window"));
  p.scale = s.real("scale");
  p.paged = int(s.num("paged"));
  in.queries = load(s.str("queries"));
  in.lengths = load(s.str("lengths"));
  if (p.paged) {
    p.slot_bytes = s.num("slot_bytes");
    for (int i = 0; i < 6; ++i) {
      p.off[i] = s.num("off", i);
    }
    p.block_tokens = int(s.num("block_tokens"));
    p.max_blocks = int(s.num("max_blocks"));
    in.arena = load(s.str("arena"));
    in.table = load(s.str("block_table"));
  } else {
    for (int i = 0; i < 6; ++i) {
      in.kv[i] = load(s.str("kv", i));
      for (int k = 0; k < 3; ++k) {
        p.stride[i][k] = s.num("stride", size_t(3 * i + k));
      }
    }
    p.has_mask = int(s.num("has_mask"));
    if (p.has_mask) {
      p.mask_is_bool = int(s.num("mask_is_bool"));
      for (int k = 0; k < 4; ++k) {
        p.mask_stride[k] = s.num("mask_stride", size_t(k));
      }
      in.mask = load(s.str("mask"));
    }
  }
  const int* lengths = in.lengths.as<int>();
  const int longest = p.B ? *std::max_element(lengths, lengths + p.B) : 0;
  const int64_t rows = int64_t(p.B) * p.Hq * p.L;
  p.n_splits = launch::attention_splits(launch::attention_row_groups(p), longest);
  // NaN: a partial result the kernel forgets to write shows up in the output.
  const float nan = __builtin_nanf("");
  in.part_m.assign(size_t(rows) * p.n_splits, nan);
  in.part_l.assign(size_t(rows) * p.n_splits, nan);
  in.part_acc.assign(size_t(rows) * p.n_splits * p.head_dim, nan);

  const std::string queries = s.str("query_dtype");
  if (queries == "float32") {
    attention_typed<float>(s, in, p);
  } else if (queries == "float16") {
    attention_typed<half>(s, in, p);
  } else {
    attention_typed<bf16>(s, in, p);
  }
  std::printf("n_splits %d\n", p.n_splits);
  std::printf("dequantized_k %ld\n", dequantized[0].load());
  std::printf("dequantized_v %ld\n", dequantized[1].load());
}

} // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: harness kv_write|attention SPEC\n");
    return 2;
  }
  try {
    const std::string op = argv[1];
    const Spec s(argv[2]);
    if (op == "kv_write") {
      const std::string dtype = s.str("dtype");
      if (dtype == "float32") {
        kv_write<float>(s);
      } else if (dtype == "float16") {
        kv_write<half>(s);
      } else {
        kv_write<bf16>(s);
      }
    } else if (op == "attention") {
      attention(s);
    } else {
      std::fprintf(stderr, "harness: unknown op %s\n", op.c_str());
      return 2;
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "harness: %s\n", e.what());
    return 1;
  }
  return 0;
}
