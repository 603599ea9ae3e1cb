// Helpers shared by the primitives: dtype mapping, argument checks, host
// copies of small integer tables.
#pragma once

#include <string>
#include <vector>

#include "cpu/kernels.h"
#include "errors.h"
#include "mlx/array.h"
#include "mlx/stream.h"
#include "mlx/utils.h"

namespace kvsnap {

namespace mx = mlx::core;

// The kernel dtype of a float array; InvalidArgument naming `arg` otherwise.
cpu::DType float_dtype(const mx::array& a, const char* arg);

std::string shape_str(const mx::Shape& s);

// `x` as a kernel input in row-major order: itself when it is computed and
// row-contiguous already (a constant such as a table: no graph node added),
// else mx::contiguous of it.
mx::array row_major(const mx::array& x, const mx::Stream& stream);

// A table of int32 values with its shape, copied from the caller.
struct IntTable {
  std::vector<int32_t> data;
  std::vector<int> shape;
};

// The stream to run kvsnap's kernels on: the CPU, or the GPU when this build
// has the Metal kernels (KVSNAP_METAL); DeviceUnsupported for a GPU stream
// otherwise.
mx::Stream kernel_stream(mx::StreamOrDevice s, const char* op);

class Arena;
// Checks a [B, max_blocks] block table against the arena: every block that
// covers positions [begin[b], end[b]) of sequence b names a live slot (blocks
// outside that range are never touched and may hold anything, e.g. -1; an
// empty range touches no block, so the row may be shorter than begin[b]).
// Returns those slots (a slot may repeat), for the kernel to pin.
std::vector<int64_t> check_block_table(
    const Arena& arena,
    const IntTable& table,
    int B,
    const std::vector<int64_t>& begin,
    const std::vector<int64_t>& end,
    const char* op);

// Fills `out` with NaN bit patterns when poisoning is on (tests only).
void poison_fill(void* out, size_t bytes);

} // namespace kvsnap
