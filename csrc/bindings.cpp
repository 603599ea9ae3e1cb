// The Python surface of kvsnap's C++ core (module kvsnap._ext). Thin: types
// cross here once, and C++ exceptions become kvsnap.errors classes.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include <atomic>
#include <cstring>
#include <stdexcept>

#include "arena.h"
#include "attention.h"
#include "cpu/kernels.h"
#include "cpu/thread_pool.h"
#include "kv_write.h"

namespace nb = nanobind;
using namespace nb::literals;
namespace mx = mlx::core;
using kvsnap::Arena;

namespace {

using Int32Table = nb::ndarray<const int32_t, nb::ndim<2>, nb::c_contig, nb::device::cpu>;

kvsnap::IntTable to_table(const Int32Table& t) {
  kvsnap::IntTable out;
  out.shape = {int(t.shape(0)), int(t.shape(1))};
  out.data.assign(t.data(), t.data() + t.size());
  return out;
}

// Python classes of kvsnap.errors, looked up once at import.
struct ErrorClasses {
  PyObject* invalid_argument;
  PyObject* arena_full;
  PyObject* slot_error;
  PyObject* device_unsupported;
};
ErrorClasses g_errors;

void raise_invalid_argument(const kvsnap::InvalidArgument& e) {
  PyObject* exc = PyObject_CallFunction(
      g_errors.invalid_argument, "ss", e.what(), e.argument.c_str());
  if (exc) {
    PyErr_SetObject(g_errors.invalid_argument, exc);
    Py_DECREF(exc);
  }
}

void translate(const std::exception_ptr& p, void*) {
  try {
    std::rethrow_exception(p);
  } catch (const kvsnap::InvalidArgument& e) {
    raise_invalid_argument(e);
  } catch (const kvsnap::ArenaFull& e) {
    PyErr_SetString(g_errors.arena_full, e.what());
  } catch (const kvsnap::SlotError& e) {
    PyErr_SetString(g_errors.slot_error, e.what());
  } catch (const kvsnap::DeviceUnsupported& e) {
    PyErr_SetString(g_errors.device_unsupported, e.what());
  }
}

// Copy of one array of one layer of a slot, as a numpy array.
nb::ndarray<nb::numpy> slot_array(const Arena& arena, int64_t slot, int layer, int which) {
  const auto& g = arena.geometry();
  bool packed = which % 3 == 0;
  size_t cols = packed ? g.words_per_row(which == 3) : g.groups_per_row();
  size_t n = size_t(g.n_kv_heads) * g.block_tokens * cols;
  size_t bytes = arena.array_bytes(which);
  uint8_t* copy = new uint8_t[bytes];
  std::memcpy(copy, arena.slot_ptr(slot) + arena.layer(layer).off[which], bytes);
  nb::capsule owner(copy, [](void* p) noexcept { delete[] static_cast<uint8_t*>(p); });
  size_t shape[3] = {size_t(g.n_kv_heads), size_t(g.block_tokens), cols};
  (void)n;
  if (packed) {
    return nb::ndarray<nb::numpy>(copy, 3, shape, owner, nullptr, nb::dtype<uint32_t>());
  }
  return nb::ndarray<nb::numpy>(copy, 3, shape, owner, nullptr, nb::dtype<uint16_t>());
}

// Writable numpy views of the six arrays of a slot, each [n_layers,
// n_kv_heads, block_tokens, cols] and sharing the arena's memory (the store
// reads files straight into them and hashes them in place). Each view keeps
// the arena alive.
nb::list slot_views(const std::shared_ptr<Arena>& arena, int64_t slot) {
  const Arena& a = *arena;
  const auto& g = a.geometry();
  nb::capsule owner(new std::shared_ptr<Arena>(arena), [](void* p) noexcept {
    delete static_cast<std::shared_ptr<Arena>*>(p);
  });
  const nb::dlpack::dtype f16{uint8_t(nb::dlpack::dtype_code::Float), 16, 1};
  nb::list arrays;
  for (int which = 0; which < 6; ++which) {
    bool packed = which % 3 == 0;
    size_t cols = packed ? g.words_per_row(which == 3) : g.groups_per_row();
    size_t shape[4] = {size_t(g.n_layers), size_t(g.n_kv_heads), size_t(g.block_tokens), cols};
    void* data = a.slot_ptr(slot) + a.layer(0).off[which];
    arrays.append(nb::ndarray<nb::numpy>(
        data, 4, shape, owner, nullptr, packed ? nb::dtype<uint32_t>() : f16));
  }
  return arrays;
}

// What Python holds for a Budget and an Arena. Each lives in a plain C++
// shared_ptr that kernels in flight copy: releasing their copy on an MLX
// stream thread must not need the GIL (a nanobind-managed shared_ptr would
// take it and deadlock against a Python thread waiting for that stream).
struct BudgetHandle {
  std::shared_ptr<kvsnap::Budget> impl;
};

struct ArenaHandle {
  std::shared_ptr<Arena> impl;
  nb::object budget; // the Python Budget, so that arena.budget is the one passed
};

} // namespace

NB_MODULE(_ext, m) {
  m.doc() = "kvsnap C++ core: block arena, kv_write and fused quantized attention";
  // Resolve KVSNAP_ISA now: a bad value fails the import, naming the choices.
  kvsnap::cpu::isa();

  nb::module_ errors = nb::module_::import_("kvsnap.errors");
  g_errors.invalid_argument = nb::object(errors.attr("InvalidArgumentError")).release().ptr();
  g_errors.arena_full = nb::object(errors.attr("ArenaFullError")).release().ptr();
  g_errors.slot_error = nb::object(errors.attr("SlotError")).release().ptr();
  g_errors.device_unsupported = nb::object(errors.attr("DeviceUnsupportedError")).release().ptr();
  nb::register_exception_translator(translate);

  nb::class_<BudgetHandle>(m, "Budget",
      "A byte limit shared by arenas: each slot an arena hands out is charged to it "
      "until the slot is free again. Thread-safe.")
      .def(
          "__init__",
          [](BudgetHandle* self, int64_t limit_bytes) {
            new (self) BudgetHandle{std::make_shared<kvsnap::Budget>(limit_bytes)};
          },
          "limit_bytes"_a)
      .def_prop_ro("limit", [](const BudgetHandle& b) { return b.impl->limit(); })
      .def_prop_ro("used", [](const BudgetHandle& b) { return b.impl->used(); })
      .def_prop_ro("free", [](const BudgetHandle& b) { return b.impl->limit() - b.impl->used(); })
      .def("__repr__", [](const BudgetHandle& b) {
        return "Budget(limit=" + std::to_string(b.impl->limit()) +
            ", used=" + std::to_string(b.impl->used()) + ")";
      });

  nb::class_<ArenaHandle>(m, "Arena",
      "A byte-budgeted pool of fixed-size slots; one slot holds one block of "
      "block_tokens tokens for every layer, keys and values, quantized.")
      .def(
          "__init__",
          [](ArenaHandle* self, int n_layers, int n_kv_heads, int head_dim,
             int block_tokens, int bits, int group_size, std::optional<int64_t> budget_bytes,
             std::optional<int> key_bits, BudgetHandle* budget) {
            auto arena = std::make_shared<Arena>(
                kvsnap::ArenaGeometry{n_layers, n_kv_heads, head_dim, block_tokens,
                                      key_bits.value_or(bits), bits, group_size},
                budget_bytes,
                budget ? budget->impl : nullptr);
            nb::object py_budget =
                budget ? nb::find(budget) : nb::cast(BudgetHandle{arena->budget()});
            new (self) ArenaHandle{std::move(arena), std::move(py_budget)};
          },
          "n_layers"_a, "n_kv_heads"_a, "head_dim"_a, nb::kw_only(),
          "block_tokens"_a = 256, "bits"_a = 4, "group_size"_a = 64,
          "budget_bytes"_a = nb::none(), "key_bits"_a = nb::none(), "budget"_a = nb::none(),
          "bits: of the values (and the keys unless key_bits is given); 4 or 8. "
          "key_bits: 4, 6 or 8.\n"
          "budget_bytes: this arena's own limit; budget: a Budget shared with other "
          "arenas (then budget_bytes may be omitted: the arena can grow to the whole "
          "budget). One of the two is required.")
      .def("alloc", [](ArenaHandle& h) { return h.impl->alloc(); },
           "Take a free slot (refcount 1) and charge it to the budget; ArenaFullError "
           "when none is left or the budget is spent.")
      .def("incref", [](ArenaHandle& h, int64_t slot) { return h.impl->incref(slot); }, "slot"_a, "Share a slot; returns the new refcount.")
      .def("decref", [](ArenaHandle& h, int64_t slot) { return h.impl->decref(slot); }, "slot"_a,
           "Drop a reference; returns the new refcount. At 0 the slot is free again, "
           "once no pending kvsnap op holds it (see pins).")
      .def("refcount", [](ArenaHandle& h, int64_t slot) { return h.impl->refcount(slot); }, "slot"_a)
      .def("pins", [](ArenaHandle& h, int64_t slot) { return h.impl->pins(slot); }, "slot"_a,
           "How many pending (not yet evaluated) kvsnap ops hold the slot. A slot freed "
           "while pinned is reused only after its last pin goes.")
      .def("stats", [](const ArenaHandle& h) {
        auto s = h.impl->stats();
        nb::dict d;
        d["slots_total"] = s.slots_total;
        d["slots_used"] = s.slots_used;
        d["slots_free"] = s.slots_total - s.slots_used;
        d["slots_shared"] = s.slots_shared;
        d["slots_pinned_free"] = s.slots_pinned_free;
        d["slot_bytes"] = s.slot_bytes;
        d["bytes_total"] = s.bytes_total;
        d["bytes_used"] = s.bytes_used;
        return d;
      })
      .def("read_block", [](const ArenaHandle& h, int64_t slot, int layer) {
            const Arena& a = *h.impl;
            a.check_live(slot, "read_block");
            if (layer < 0 || layer >= a.geometry().n_layers) {
              throw kvsnap::InvalidArgument("layer", std::to_string(layer) + " is out of range");
            }
            nb::list out;
            for (int i = 0; i < 6; ++i) {
              out.append(slot_array(a, slot, layer, i));
            }
            return nb::tuple(out);
          }, "slot"_a, "layer"_a,
          "Copies of (k_packed, k_scales, k_biases, v_packed, v_scales, v_biases) "
          "of one layer of a slot; scales/biases as uint16 float16 bit patterns.")
      .def("write_block", [](ArenaHandle& h, int64_t slot, int layer,
                             std::vector<nb::ndarray<nb::c_contig, nb::device::cpu>> arrays) {
            Arena& a = *h.impl;
            a.check_live(slot, "write_block");
            if (int64_t holders = a.refcount(slot); holders > 1) {
              throw kvsnap::InvalidArgument("slot", kvsnap::shared_slot_message(slot, holders));
            }
            const auto& g = a.geometry();
            if (layer < 0 || layer >= g.n_layers) {
              throw kvsnap::InvalidArgument("layer", std::to_string(layer) + " is out of range");
            }
            if (arrays.size() != 6) {
              throw kvsnap::InvalidArgument(
                  "arrays", "must be the 6 arrays (k_packed, k_scales, k_biases, v_packed, v_scales, v_biases)");
            }
            static const char* names[6] = {"k_packed", "k_scales", "k_biases", "v_packed", "v_scales", "v_biases"};
            for (int i = 0; i < 6; ++i) {
              const auto& x = arrays[i];
              bool packed = i % 3 == 0;
              size_t cols = packed ? g.words_per_row(i == 3) : g.groups_per_row();
              bool dtype_ok = packed ? x.dtype() == nb::dtype<uint32_t>()
                                     : (x.dtype().bits == 16 && x.dtype().lanes == 1 &&
                                        (x.dtype().code == uint8_t(nb::dlpack::dtype_code::UInt) ||
                                         x.dtype().code == uint8_t(nb::dlpack::dtype_code::Float)));
              bool shape_ok = x.ndim() == 3 && x.shape(0) == size_t(g.n_kv_heads) &&
                  x.shape(1) == size_t(g.block_tokens) && x.shape(2) == cols;
              if (!dtype_ok || !shape_ok) {
                throw kvsnap::InvalidArgument(
                    "arrays",
                    std::string(names[i]) + " must be " + (packed ? "uint32" : "float16/uint16") +
                        " of shape (" + std::to_string(g.n_kv_heads) + ", " +
                        std::to_string(g.block_tokens) + ", " + std::to_string(cols) + ")");
              }
            }
            for (int i = 0; i < 6; ++i) {
              std::memcpy(a.slot_ptr(slot) + a.layer(layer).off[i], arrays[i].data(), a.array_bytes(i));
            }
          }, "slot"_a, "layer"_a, "arrays"_a,
          "Overwrite one layer of a slot with the 6 arrays read_block returns. "
          "The slot must not be shared (refcount 1) nor read or written by a pending "
          "(lazy) kvsnap op.")
      .def("block_views", [](const ArenaHandle& h, int64_t slot) {
            h.impl->check_live(slot, "block_views");
            return slot_views(h.impl, slot);
          }, "slot"_a,
          "Writable numpy views of a slot's six arrays (k_packed, k_scales, k_biases, "
          "v_packed, v_scales, v_biases), each [n_layers, n_kv_heads, block_tokens, cols]; "
          "scales/biases float16. They share the arena's memory: settle pending kvsnap "
          "ops on the slot first, and do not use a view after the slot is freed.")
      .def_prop_ro("n_layers", [](const ArenaHandle& h) { return h.impl->geometry().n_layers; })
      .def_prop_ro("n_kv_heads", [](const ArenaHandle& h) { return h.impl->geometry().n_kv_heads; })
      .def_prop_ro("head_dim", [](const ArenaHandle& h) { return h.impl->geometry().head_dim; })
      .def_prop_ro("block_tokens", [](const ArenaHandle& h) { return h.impl->geometry().block_tokens; })
      .def_prop_ro("bits", [](const ArenaHandle& h) { return h.impl->geometry().v_bits; },
                   "Bits of the values (and of the keys unless key_bits differs).")
      .def_prop_ro("key_bits", [](const ArenaHandle& h) { return h.impl->geometry().k_bits; })
      .def_prop_ro("group_size", [](const ArenaHandle& h) { return h.impl->geometry().group_size; })
      .def_prop_ro("slot_bytes", [](const ArenaHandle& h) { return h.impl->slot_bytes(); })
      .def_prop_ro("budget", [](const ArenaHandle& h) { return h.budget; },
                   "The Budget this arena charges: the one given, or its own.")
      .def_prop_ro("n_slots", [](const ArenaHandle& h) { return h.impl->n_slots(); });

  m.def(
      "kv_write",
      [](const ArenaHandle& arena, int layer, const mx::array& keys,
         const mx::array& values, const Int32Table& block_table,
         const std::vector<int32_t>& offsets,
         const std::optional<std::vector<int32_t>>& counts,
         const std::vector<mx::array>& after, mx::StreamOrDevice s,
         bool rotate, const std::optional<mx::array>& key_scale,
         const std::optional<mx::array>& shift_const, const std::optional<mx::array>& shift_w,
         const std::optional<mx::array>& shift_table) {
        return kvsnap::kv_write(
            arena.impl, layer, keys, values, to_table(block_table), offsets, counts, after, s,
            kvsnap::StoredForm{rotate, key_scale, shift_const, shift_w, shift_table});
      },
      "arena"_a, "layer"_a, "keys"_a, "values"_a, "block_table"_a, "offsets"_a,
      "counts"_a.none(), "after"_a, "stream"_a = nb::none(), "rotate"_a = false,
      "key_scale"_a = nb::none(), "shift_const"_a = nb::none(), "shift_w"_a = nb::none(),
      "shift_table"_a = nb::none());

  m.def(
      "attention",
      [](const ArenaHandle& arena, int layer, const mx::array& queries,
         const Int32Table& block_table, const std::vector<int32_t>& lengths,
         float scale, bool causal, int window, const std::vector<mx::array>& after,
         mx::StreamOrDevice s, const std::optional<mx::array>& mask,
         const std::optional<mx::array>& bias_w, const std::optional<mx::array>& bias_table,
         bool rotate, const std::optional<mx::array>& query_scale) {
        return kvsnap::paged_attention(
            arena.impl, layer, queries, to_table(block_table), lengths,
            scale, causal, window, mask, after, s, bias_w, bias_table,
            kvsnap::QueryForm{rotate, query_scale});
      },
      "arena"_a, "layer"_a, "queries"_a, "block_table"_a, "lengths"_a, "scale"_a,
      "causal"_a, "window"_a, "after"_a, "stream"_a = nb::none(), "mask"_a = nb::none(),
      "bias_w"_a = nb::none(), "bias_table"_a = nb::none(), "rotate"_a = false,
      "query_scale"_a = nb::none());

  m.def(
      "q4_attention",
      [](const mx::array& queries, const std::vector<mx::array>& keys,
         const std::vector<mx::array>& values, float scale, bool causal,
         const std::optional<mx::array>& mask, int group_size, int bits,
         mx::StreamOrDevice s) {
        return kvsnap::q4_attention(
            queries, keys, values, scale, causal, mask, group_size, bits, s);
      },
      "queries"_a, "keys"_a, "values"_a, "scale"_a, "causal"_a, "mask"_a.none(),
      "group_size"_a, "bits"_a, "stream"_a = nb::none());

  m.def("set_poison", &kvsnap::set_poison, "on"_a,
        "Fill new slots and kernel outputs with NaN bit patterns (for tests).");
  m.def("metal_kernels", [] {
#ifdef KVSNAP_METAL
    return true;
#else
    return false;
#endif
  }, "Whether this build has the Metal kernels (macOS builds with Xcode's metal compiler).");
  m.def("isa", &kvsnap::cpu::isa,
        "The CPU kernel set in use: 'generic', 'avx2' or 'avx512-vnni'.");
  m.def("available_isas", &kvsnap::cpu::available_isas,
        "The CPU kernel sets this build and CPU can run, baseline first.");
  m.def(
      "set_isa",
      [](const std::string& name) {
        try {
          kvsnap::cpu::set_isa(name.c_str());
        } catch (const std::invalid_argument& e) {
          throw kvsnap::InvalidArgument("name", e.what());
        }
      },
      "name"_a,
      "Use CPU kernel set `name` from now on (as KVSNAP_ISA=name at import); "
      "kvsnap.errors.InvalidArgumentError if this build or CPU cannot run it.");
  m.def("num_threads", &kvsnap::cpu::num_threads, "Threads the CPU kernels use.");
  m.def(
      "_parallel_for_failing_at",
      [](int n, int fail_at) {
        // Each task sums its index; task fail_at throws. Tests that an
        // exception inside a pool task reaches Python (RuntimeError) and
        // that the pool keeps working afterwards.
        std::atomic<int64_t> sum{0};
        {
          nb::gil_scoped_release release;
          kvsnap::cpu::parallel_for(n, [&](int i) {
            if (i == fail_at) {
              throw std::runtime_error("task " + std::to_string(i) + " failed (test hook)");
            }
            sum += i;
          });
        }
        return int64_t(sum);
      },
      "n"_a, "fail_at"_a, "Test hook: run n thread-pool tasks of which task fail_at throws.");
}
