"""Benchmark one attention call: kvsnap's fused Q4 kernel against MLX alternatives.

Shapes follow a mid-size GQA model (B=1, 32 query heads, 8 KV heads, head_dim
128): one decode step (L=1) at each context, plus one causal prefill chunk of
512 queries at 4K context. Every variant runs in the same process on the same
random data:

  kvsnap q4 g64 / g32   kvsnap.q4_attention on mx.quantize triples with float16
                        scales/biases (kvsnap's storage format), with the CPU
                        kernel set kvsnap picks here (kvsnap._ext.isa())
  kvsnap q4 g64 [isa]   the same call with each other kernel set this CPU runs
                        (_ext.set_isa: "avx2-vnni" integer on AVX-VNNI, "avx2-int"
                        integer on AVX2, "avx2" float,
                        "generic" float baseline)
  kvsnap paged q4 g64   kvsnap.attention over arena blocks written by kv_write
  kvsnap paged k6v4 g64 the same with 6-bit keys (quality="accurate": 5.5 bits
                        per element; the integer kernels widen the codes)
  sdpa f32 / f16        mx.fast.scaled_dot_product_attention on float K/V
  mlx-lm q4 sdpa        mlx_lm.models.base.quantized_scaled_dot_product_attention
                        on the same Q4 g64 data; "f32" = float32 queries and
                        scales (a float32 model's QuantizedKVCache), "f16" =
                        float16 queries and scales (a float16 model's cache)

On a Mac with a kvsnap build that has the Metal kernels, the same cases get
"[gpu]" rows: kvsnap's Metal kernels (after their self-check; a failed check
is printed and those rows then time the fallback) and MLX's sdpa / mlx-lm's
quantized attention on the GPU. --cpu-only leaves them out. %BW of a GPU row
is still relative to the CPU's measured read bandwidth.

Each call is warmed up, then timed: the median of N runs, each ending in
mx.eval, N giving about a second per variant (at least 5, 3 for calls over
5 s, at most 100; --quick: fewer). Before every run the CPU caches are
flushed by reading twice the last-level cache the machine reports (at least
64 MiB) on every core, since in a real model a layer's K/V is evicted by the
other layers between two steps; --warm-cache turns that off. Bandwidth columns divide the
K/V bytes a variant must read by its time and compare that with this
machine's read bandwidth, measured in the same run: numpy summing a large
array on one thread and on every core, before and after the cases, the
fastest of the four (a pure read; until 2026-12-02 the read side of a numpy
copy, about half of it, was the yardstick). The bandwidth target (32K
decode) is measured in pairs: each kvsnap call followed by that read on
every core, caches flushed before each, and the median of the pairs'
fractions; the table's %BW (the median call against the fastest read of the
run) is printed beside it. On a shared host the two differ: see
paired_bandwidth.

    python benchmarks/attention.py [--contexts 1024 4096 ...] [--quick] [--cpu-only] [--out DIR]

Writes DIR/attention.json and DIR/attention.png (DIR: benchmarks/out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import bench_common
import kvsnap
import mlx.core as mx
import numpy as np
from bench_common import fmt
from kvsnap import _ext
from mlx_lm.models.base import quantized_scaled_dot_product_attention

BATCH, N_HEADS, N_KV_HEADS, HEAD_DIM = 1, 32, 8, 128
SCALE = HEAD_DIM**-0.5
BITS = 4
BLOCK_TOKENS = 256
DEFAULT_CONTEXTS = (1024, 4096, 16384, 32768)
PREFILL_QUERIES, PREFILL_CONTEXT = 512, 4096

# kvsnap q4 g64 must be TARGET_SPEEDUP times faster than sdpa f32 and
# TARGET_SPEEDUP_MLX_LM times faster than mlx-lm's quantized path in decode at
# TARGET_SPEEDUP_CONTEXT, TARGET_PREFILL_SPEEDUP times faster than sdpa f32 on
# the prefill chunk, and reach this fraction of the measured read bandwidth
# at TARGET_BANDWIDTH_CONTEXT.
TARGET_SPEEDUP, TARGET_SPEEDUP_MLX_LM, TARGET_SPEEDUP_CONTEXT = 15.0, 5.0, 16384
TARGET_PREFILL_SPEEDUP = 4.0
TARGET_BANDWIDTH_FRACTION, TARGET_BANDWIDTH_CONTEXT = 0.5, 32768

CHECK_TOLERANCE = 1e-3  # max |kvsnap - sdpa on the dequantized K/V|, float kernels
# The integer kernels round queries and probability weights to int8 (see
# csrc/cpu/int_dot_avx512.h): about 1e-3 in decode, 1e-2 in the first rows of a
# causal prefill (few keys, so no averaging of the rounding).
INT_CHECK_TOLERANCE = 2e-2
INTEGER_ISAS = ("avx2-int", "avx2-vnni", "avx512-vnni")
MIN_FLUSH_BYTES = 64 << 20  # the flush reads at least this much, and twice the last-level cache
MIN_COPY_BYTES = 512 << 20  # the bandwidth-measuring read (and copy): at least this, and the flush's size

# mlx-lm with float16 queries takes ~1.2 s per decode step at 4K on CPU (with
# float32 queries, float16 scales cost nothing extra); it runs only for decode
# up to this context. Float16 sdpa (~14 s per call) skips the prefill.
MLX_LM_F16_MAX_CONTEXT = 4096

BASELINE = "kvsnap q4 g64"
DEFAULT_ISA = _ext.isa()  # the kernel set kvsnap chose (or KVSNAP_ISA named)
SDPA_F32 = "sdpa f32"
MLX_LM_F32 = "mlx-lm q4 sdpa f32"


@dataclass(frozen=True)
class Case:
    queries: int
    context: int

    @property
    def mask(self) -> str | None:
        return "causal" if self.queries > 1 else None

    @property
    def name(self) -> str:
        kind = "decode" if self.queries == 1 else f"prefill L={self.queries}"
        return f"{kind} @ {self.context // 1024}K"


@dataclass
class Variant:
    name: str
    run: Callable[[], mx.array]
    kv_bytes: int
    reference: mx.array | None = None  # expected output, for the correctness check
    skip_reason: str | None = None
    isa: str | None = None  # the CPU kernel set to run it with (None: kvsnap's default)


@dataclass
class Row:
    case: str
    queries: int
    context: int
    variant: str
    kv_bytes: int
    ms: float | None = None
    runs: int = 0
    gb_per_s: float | None = None
    bandwidth_fraction: float | None = None
    # The bandwidth target's row only: timed in alternation with the
    # bandwidth read (paired_bandwidth); the median fraction, and all of it.
    paired_bandwidth_fraction: float | None = None
    paired: dict | None = None
    kvsnap_speedup: float | None = None  # this row's time / kvsnap q4 g64's time
    max_abs_diff: float | None = None
    check: str = ""  # "ok" / "FAIL" for kvsnap rows, "" otherwise
    skipped: str | None = None


@dataclass(frozen=True)
class Timing:
    budget_s: float  # time to spend on the runs of one variant
    min_runs: int
    max_runs: int
    slow_call_s: float  # calls slower than this (the float prefills, ~12 s) ...
    slow_min_runs: int  # ... get this many runs instead of min_runs
    pair_budget_s: float  # time to spend on the bandwidth target's paired runs (paired_bandwidth)
    min_pairs: int


FULL_TIMING = Timing(
    budget_s=1.0, min_runs=5, max_runs=100, slow_call_s=5.0, slow_min_runs=3, pair_budget_s=4.0, min_pairs=10
)
QUICK_TIMING = Timing(
    budget_s=0.2, min_runs=1, max_runs=10, slow_call_s=5.0, slow_min_runs=1, pair_budget_s=0.5, min_pairs=2
)


# ---------------------------------------------------------------------------
# Machine


def measure_bandwidth(nbytes: int, repeats: int) -> dict:
    """Best-of-`repeats` read of an `nbytes` array, one thread and all cores.

    The read is numpy summing the array as int64 (a pure read, as a kernel that
    streams K/V and writes almost nothing): the reference for %BW. A copy of
    the array is timed too and recorded: its read side was the reference until
    2026-12-02 and reaches about half of a pure read, since the copy's writes
    (and the reads of the lines they allocate) share the memory bus.
    """
    src = np.ones(nbytes // 8, dtype=np.int64)
    dst = np.empty_like(src)
    dst.fill(0)  # fault the pages in before timing
    threads = os.cpu_count() or 1
    parts = [p for p in np.array_split(src, threads) if p.size]
    dst_parts = np.array_split(dst, threads)[: len(parts)]

    def best_time(run: Callable[[], object]) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        return min(times)

    # numpy releases the GIL for the sum and the copy: the parts run in parallel.
    with ThreadPoolExecutor(threads) as pool:
        read = {
            "1_thread": best_time(lambda: np.sum(src)),
            "all_threads": best_time(lambda: list(pool.map(np.sum, parts))),
        }
        copy = {
            "1_thread": best_time(lambda: np.copyto(dst, src)),
            "all_threads": best_time(
                lambda: list(pool.map(lambda pair: np.copyto(*pair), zip(dst_parts, parts)))
            ),
        }
    gb_per_s = {k: nbytes / v / 1e9 for k, v in read.items()}
    copy_gb_per_s = {k: nbytes / v / 1e9 for k, v in copy.items()}
    return {
        "read_bytes": nbytes,
        "threads": threads,
        "read_gb_per_s_1_thread": gb_per_s["1_thread"],
        "read_gb_per_s_all_threads": gb_per_s["all_threads"],
        "copy_read_gb_per_s_1_thread": copy_gb_per_s["1_thread"],
        "copy_read_gb_per_s_all_threads": copy_gb_per_s["all_threads"],
        "read_gb_per_s": max(gb_per_s.values()),  # the reference for %BW
    }


def print_bandwidth(when: str, bandwidth: dict) -> None:
    print(
        f"memory bandwidth {when} ({bandwidth['read_bytes'] >> 20} MiB numpy array, best of a few): "
        f"read {bandwidth['read_gb_per_s_1_thread']:.2f} GB/s on 1 thread, "
        f"{bandwidth['read_gb_per_s_all_threads']:.2f} GB/s on {bandwidth['threads']}; "
        f"a copy's read side {bandwidth['copy_read_gb_per_s_1_thread']:.2f} / "
        f"{bandwidth['copy_read_gb_per_s_all_threads']:.2f} GB/s",
        flush=True,
    )


def machine_info(bandwidth: dict) -> dict:
    return bench_common.machine_info(numpy=np.__version__, bandwidth=bandwidth)


# ---------------------------------------------------------------------------
# Data and variants


def nbytes(*arrays: mx.array) -> int:
    return sum(a.nbytes for a in arrays)


def quantize(
    x: mx.array, group_size: int, scale_dtype: mx.Dtype = mx.float16, bits: int = BITS
) -> tuple:
    """mx.quantize with scales/biases stored as `scale_dtype` (kvsnap: float16)."""
    packed, scales, biases = mx.quantize(x, group_size=group_size, bits=bits)
    return packed, scales.astype(scale_dtype), biases.astype(scale_dtype)


def dequantize(triple: tuple, group_size: int, bits: int = BITS) -> mx.array:
    packed, scales, biases = triple
    return mx.dequantize(
        packed,
        scales.astype(mx.float32),
        biases.astype(mx.float32),
        group_size=group_size,
        bits=bits,
    )


def sdpa(q: mx.array, k: mx.array, v: mx.array, mask: str | None) -> mx.array:
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=SCALE, mask=mask)


def mlx_lm_attention(q: mx.array, keys: tuple, values: tuple, mask: str | None) -> mx.array:
    """mlx-lm's quantized attention on Q4 g64 triples."""
    # mlx-lm scales its `queries` argument in place (`queries *= scale`), which
    # would rescale our q on every call; hand it a fresh array object.
    return quantized_scaled_dot_product_attention(
        mx.array(q), keys, values, scale=SCALE, mask=mask, group_size=64, bits=BITS
    )


def filled_arena(
    k: mx.array, v: mx.array, group_size: int, key_bits: int = BITS
) -> tuple[kvsnap.Arena, np.ndarray]:
    """An arena holding k/v (one layer) and the block table of that sequence."""
    context = k.shape[2]
    n_blocks = -(-context // BLOCK_TOKENS)
    groups = HEAD_DIM // group_size
    # K and V: packed values plus float16 scale and bias per group.
    row_bytes = HEAD_DIM * (key_bits + BITS) // 8 + 2 * 2 * 2 * groups
    block_bytes = N_KV_HEADS * BLOCK_TOKENS * row_bytes
    arena = kvsnap.Arena(
        1,
        N_KV_HEADS,
        HEAD_DIM,
        block_tokens=BLOCK_TOKENS,
        bits=BITS,
        key_bits=key_bits,
        group_size=group_size,
        budget_bytes=2 * n_blocks * block_bytes,  # slack for any slot padding
    )
    block_table = np.array([[arena.alloc() for _ in range(n_blocks)]], dtype=np.int32)
    mx.eval(kvsnap.kv_write(arena, 0, k, v, block_table, [0]))
    return arena, block_table


def metal_available() -> bool:
    """kvsnap was built with its Metal kernels and MLX has a Metal GPU."""
    return kvsnap.metal.kernels_built() and mx.metal.is_available()


def metal_self_check() -> dict[str, str]:
    """Runs kvsnap's self-check of each Metal kernel: "ok" or what failed."""
    check = kvsnap.metal.process_check()
    return {op: "ok" if check.passed(op) else check.problem(op) for op in kvsnap.metal.OPS}


def gpu_variants(case: Case, q, k16, v16, kq64, vq64, arena, block_table, ref64) -> list[Variant]:
    """The Metal rows: the same calls on the GPU stream."""
    mask = case.mask
    q16 = q.astype(mx.float16)
    return [
        Variant(
            f"{BASELINE} [gpu]",
            lambda: kvsnap.q4_attention(
                q, kq64, vq64, scale=SCALE, group_size=64, bits=BITS, mask=mask, stream=mx.gpu
            ),
            nbytes(*kq64, *vq64),
            ref64,
        ),
        Variant(
            "kvsnap paged q4 g64 [gpu]",
            lambda: kvsnap.attention(
                arena, 0, q, block_table, [case.context], scale=SCALE, causal=True, stream=mx.gpu
            ),
            nbytes(*kq64, *vq64),
            ref64,
        ),
        Variant(
            "sdpa f16 [gpu]",
            lambda: mx.fast.scaled_dot_product_attention(
                q16, k16, v16, scale=SCALE, mask=mask, stream=mx.gpu
            ),
            nbytes(k16, v16),
        ),
        Variant(
            "mlx-lm q4 sdpa f16 [gpu]",
            lambda: _on_gpu(lambda: mlx_lm_attention(q16, kq64, vq64, mask)),
            nbytes(*kq64, *vq64),
            ref64,
        ),
    ]


def _on_gpu(run: Callable[[], mx.array]) -> mx.array:
    with mx.stream(mx.gpu):
        return run()


def make_variants(case: Case, seed: int, gpu: bool = False) -> list[Variant]:
    """Inputs for `case` and one Variant per implementation, all on the same data."""
    mx.random.seed(seed)
    q = mx.random.normal((BATCH, N_HEADS, case.queries, HEAD_DIM))
    k = mx.random.normal((BATCH, N_KV_HEADS, case.context, HEAD_DIM))
    v = mx.random.normal((BATCH, N_KV_HEADS, case.context, HEAD_DIM))
    mask = case.mask
    decode = case.queries == 1

    kq64, vq64 = quantize(k, 64), quantize(v, 64)
    kq32, vq32 = quantize(k, 32), quantize(v, 32)
    # mlx-lm on the same quantized values, held as a float32 model's cache holds them.
    kq64_f32 = tuple(x.astype(mx.float32) if x.dtype == mx.float16 else x for x in kq64)
    vq64_f32 = tuple(x.astype(mx.float32) if x.dtype == mx.float16 else x for x in vq64)
    q16, k16, v16 = q.astype(mx.float16), k.astype(mx.float16), v.astype(mx.float16)
    # References: sdpa in float32 on exactly the values the kernels dequantize.
    ref64 = sdpa(q, dequantize(kq64, 64), dequantize(vq64, 64), mask)
    ref32 = sdpa(q, dequantize(kq32, 32), dequantize(vq32, 32), mask)
    kq6 = quantize(k, 64, bits=6)  # what kv_write stores for 6-bit keys
    ref6 = sdpa(q, dequantize(kq6, 64, bits=6), dequantize(vq64, 64), mask)
    mx.eval(q, k, v, kq64, vq64, kq32, vq32, kq64_f32, vq64_f32, q16, k16, v16, ref64, ref32, kq6, ref6)
    arena, block_table = filled_arena(k, v, 64)
    arena6, block_table6 = filled_arena(k, v, 64, key_bits=6)

    def kvsnap_q4(keys: tuple, values: tuple, group_size: int) -> Callable[[], mx.array]:
        return lambda: kvsnap.q4_attention(
            q, keys, values, scale=SCALE, group_size=group_size, bits=BITS, mask=mask
        )

    gpu_rows = gpu_variants(case, q, k16, v16, kq64, vq64, arena, block_table, ref64) if gpu else []
    other_isas = [isa for isa in reversed(_ext.available_isas()) if isa != DEFAULT_ISA]
    return [
        Variant(BASELINE, kvsnap_q4(kq64, vq64, 64), nbytes(*kq64, *vq64), ref64),
        *(
            Variant(
                f"{BASELINE} [{isa}]",
                kvsnap_q4(kq64, vq64, 64),
                nbytes(*kq64, *vq64),
                ref64,
                isa=isa,
            )
            for isa in other_isas
        ),
        Variant("kvsnap q4 g32", kvsnap_q4(kq32, vq32, 32), nbytes(*kq32, *vq32), ref32),
        Variant(
            "kvsnap paged q4 g64",
            lambda: kvsnap.attention(
                arena, 0, q, block_table, [case.context], scale=SCALE, causal=True
            ),
            nbytes(*kq64, *vq64),
            ref64,
        ),
        Variant(
            "kvsnap paged k6v4 g64",
            lambda: kvsnap.attention(
                arena6, 0, q, block_table6, [case.context], scale=SCALE, causal=True
            ),
            nbytes(*kq6, *vq64),
            ref6,
        ),
        Variant(SDPA_F32, lambda: sdpa(q, k, v, mask), nbytes(k, v)),
        Variant(
            "sdpa f16",
            lambda: sdpa(q16, k16, v16, mask),
            nbytes(k16, v16),
            skip_reason=None if decode else "float16 prefill takes ~14 s per call on CPU",
        ),
        Variant(
            MLX_LM_F32,
            lambda: mlx_lm_attention(q, kq64_f32, vq64_f32, mask),
            nbytes(*kq64_f32, *vq64_f32),
            ref64,
        ),
        Variant(
            "mlx-lm q4 sdpa f16",
            lambda: mlx_lm_attention(q16, kq64, vq64, mask),
            nbytes(*kq64, *vq64),
            ref64,
            skip_reason=(
                None
                if decode and case.context <= MLX_LM_F16_MAX_CONTEXT
                else f"~1.2 s per decode step at 4K; run only for decode <= {MLX_LM_F16_MAX_CONTEXT}"
            ),
        ),
        *gpu_rows,
    ]


# ---------------------------------------------------------------------------
# Timing


def last_level_cache_bytes() -> int | None:
    """The largest CPU cache Linux reports (sysfs), in bytes; None where it reports none."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        if text and text[-1] in units and text[:-1].isdigit():
            sizes.append(int(text[:-1]) * units[text[-1]])
    return max(sizes) if sizes else None


def flush_bytes() -> int:
    """Twice the last-level cache (at least MIN_FLUSH_BYTES): a read of that
    many bytes leaves none of the K/V in any cache. Machines differ: this VM
    reported a 32 MiB L3 until 2026-11-27 and 480 MiB since."""
    llc = last_level_cache_bytes()
    return max(MIN_FLUSH_BYTES, 2 * llc) if llc else MIN_FLUSH_BYTES


class CacheFlusher:
    """Evicts the CPU caches by reading a buffer larger than the last-level cache,
    on every core (each has its own L2), as the rest of a model's decode step
    keeps every core busy between two attention calls."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self._buffer = np.ones(nbytes // 8, dtype=np.int64)
        n = max(1, os.cpu_count() or 1)
        self.threads = n
        self._parts = np.array_split(self._buffer, n)
        self._pool = ThreadPoolExecutor(n)

    def __call__(self) -> None:
        # A read, not a write: dirty lines would be written back during the timed run.
        # numpy's sum releases the GIL, so the parts are read in parallel.
        list(self._pool.map(np.sum, self._parts))

    def close(self) -> None:
        self._pool.shutdown()
        self._buffer = self._parts = None

    def describe(self) -> str:
        return f"read of {self.nbytes >> 20} MiB on {self.threads} threads"


def time_call(
    run: Callable[[], mx.array], timing: Timing, flush: Callable[[], None]
) -> tuple[list[float], mx.array]:
    """Seconds per call (each run ends in mx.eval) and the last output."""
    start = time.perf_counter()
    out = run()
    mx.eval(out)  # warm-up: allocations, first-touch of buffers
    first = time.perf_counter() - start
    min_runs = timing.slow_min_runs if first > timing.slow_call_s else timing.min_runs
    runs = int(min(max(timing.budget_s / max(first, 1e-6), min_runs), timing.max_runs))
    times = []
    for _ in range(runs):
        flush()
        start = time.perf_counter()
        out = run()
        mx.eval(out)
        times.append(time.perf_counter() - start)
    return times, out


def paired_bandwidth(
    run: Callable[[], mx.array], kv_bytes: int, read: CacheFlusher, timing: Timing, flush: Callable[[], None]
) -> dict:
    """The bandwidth target's measurement: the kernel call and the read that
    measures the machine's bandwidth (measure_bandwidth's, on every core),
    timed in alternation, caches flushed before each; the fraction of each
    pair (the kernel's K/V bytes per second over the read's) and their median.

    The table's %BW compares the kernel's median with the best of ~20 reads
    spread over the run; on a shared host whose load changes within minutes
    that compares a typical minute with the quietest one (the same 32K call
    measured 20% to 58% of it in one session). A pair sees the same minute.
    """
    kernel, reads = [], []
    deadline = time.perf_counter() + timing.pair_budget_s
    while len(kernel) < timing.min_pairs or time.perf_counter() < deadline:
        flush()
        start = time.perf_counter()
        mx.eval(run())
        kernel.append(time.perf_counter() - start)
        flush()
        start = time.perf_counter()
        read()
        reads.append(time.perf_counter() - start)
    fractions = [(kv_bytes / k) / (read.nbytes / r) for k, r in zip(kernel, reads)]
    return {
        "pairs": len(fractions),
        "fraction": statistics.median(fractions),
        "fraction_min": min(fractions),
        "fraction_max": max(fractions),
        "kernel_ms": 1e3 * statistics.median(kernel),
        "read_gb_per_s": read.nbytes / statistics.median(reads) / 1e9,
        "read_bytes": read.nbytes,
    }


def bench_case(
    case: Case,
    timing: Timing,
    flush: Callable[[], None],
    seed: int,
    gpu: bool = False,
    pair_read: CacheFlusher | None = None,
) -> list[Row]:
    """The case's rows; with pair_read, the bandwidth target's row gets its
    paired measurement too (paired_bandwidth)."""
    rows = []
    for variant in make_variants(case, seed, gpu):
        row = Row(case.name, case.queries, case.context, variant.name, variant.kv_bytes)
        rows.append(row)
        if variant.skip_reason:
            row.skipped = variant.skip_reason
            continue
        _ext.set_isa(variant.isa or DEFAULT_ISA)
        try:
            times, out = time_call(variant.run, timing, flush)
        finally:
            _ext.set_isa(DEFAULT_ISA)
        seconds = statistics.median(times)
        row.ms, row.runs = seconds * 1e3, len(times)
        row.gb_per_s = variant.kv_bytes / seconds / 1e9
        target_row = (case.queries, case.context, variant.name) == (1, TARGET_BANDWIDTH_CONTEXT, BASELINE)
        if pair_read is not None and target_row:
            row.paired = paired_bandwidth(variant.run, variant.kv_bytes, pair_read, timing, flush)
            row.paired_bandwidth_fraction = row.paired["fraction"]
            print(
                f"  {case.name:<20} {variant.name:<28} {row.paired['kernel_ms']:10.3f} ms  "
                f"({row.paired['pairs']} runs, each paired with a {pair_read.describe()})",
                flush=True,
            )
        if variant.reference is not None:
            diff = mx.abs(out.astype(mx.float32) - variant.reference).max().item()
            row.max_abs_diff = diff
            if variant.name.startswith("kvsnap"):
                isa = variant.isa or DEFAULT_ISA
                tolerance = INT_CHECK_TOLERANCE if isa in INTEGER_ISAS else CHECK_TOLERANCE
                row.check = "ok" if diff < tolerance else "FAIL"
        print(
            f"  {case.name:<20} {variant.name:<28} {row.ms:10.3f} ms  ({row.runs} runs)", flush=True
        )

    baseline = next(r for r in rows if r.variant == BASELINE)
    for row in rows:
        if row.ms is not None and baseline.ms is not None:
            row.kvsnap_speedup = row.ms / baseline.ms
    return rows


# ---------------------------------------------------------------------------
# Reporting


def print_table(rows: list[Row]) -> None:
    header = (
        f"{'case':<20} {'variant':<28} {'ms':>10} {'runs':>5} {'KV MiB':>8} "
        f"{'GB/s':>7} {'%BW':>5} {'g64 x':>7} {'max|diff|':>9} {'check':>5}"
    )
    print(header)
    print("-" * len(header))
    case = None
    for row in rows:
        if case is not None and row.case != case:
            print()
        case = row.case
        mib = row.kv_bytes / 2**20
        if row.skipped:
            print(f"{row.case:<20} {row.variant:<28} {'skipped':>10}  {mib:12.1f}  ({row.skipped})")
            continue
        pct = None if row.bandwidth_fraction is None else 100 * row.bandwidth_fraction
        print(
            f"{row.case:<20} {row.variant:<28} {fmt(row.ms, '10.3f')} {row.runs:5d} {mib:8.1f} "
            f"{fmt(row.gb_per_s, '7.2f')} {fmt(pct, '5.0f')} {fmt(row.kvsnap_speedup, '6.2f')}x "
            f"{fmt(row.max_abs_diff, '9.1e')} {row.check:>5}"
        )


def find(rows: list[Row], context: int, variant: str, queries: int = 1) -> Row | None:
    for row in rows:
        if (
            row.queries == queries
            and row.context == context
            and row.variant == variant
            and row.ms is not None
        ):
            return row
    return None


def ratio(rows: list[Row], context: int, other: str, queries: int = 1) -> float | None:
    """other's time / kvsnap q4 g64's time on one case."""
    base, row = find(rows, context, BASELINE, queries), find(rows, context, other, queries)
    return None if base is None or row is None else row.ms / base.ms


def check_targets(rows: list[Row]) -> list[dict]:
    k = TARGET_SPEEDUP_CONTEXT // 1024
    targets = [
        {
            "target": f"decode {k}K: {BASELINE} >= {TARGET_SPEEDUP:g}x faster than {SDPA_F32}",
            "measured": ratio(rows, TARGET_SPEEDUP_CONTEXT, SDPA_F32),
            "goal": TARGET_SPEEDUP,
            "unit": "x",
        },
        {
            "target": f"decode {k}K: {BASELINE} >= {TARGET_SPEEDUP_MLX_LM:g}x faster than {MLX_LM_F32}",
            "measured": ratio(rows, TARGET_SPEEDUP_CONTEXT, MLX_LM_F32),
            "goal": TARGET_SPEEDUP_MLX_LM,
            "unit": "x",
        },
        {
            "target": (
                f"prefill L={PREFILL_QUERIES} @ {PREFILL_CONTEXT // 1024}K: {BASELINE} >= "
                f"{TARGET_PREFILL_SPEEDUP:g}x faster than {SDPA_F32}"
            ),
            "measured": ratio(rows, PREFILL_CONTEXT, SDPA_F32, PREFILL_QUERIES),
            "goal": TARGET_PREFILL_SPEEDUP,
            "unit": "x",
        },
    ]
    base = find(rows, TARGET_BANDWIDTH_CONTEXT, BASELINE)
    targets.append(
        {
            "target": (
                f"decode {TARGET_BANDWIDTH_CONTEXT // 1024}K: {BASELINE} reads K/V at "
                f">= {TARGET_BANDWIDTH_FRACTION:.0%} of measured read bandwidth "
                "(each call paired with a bandwidth read: median)"
            ),
            "measured": None if base is None else base.paired_bandwidth_fraction,
            "goal": TARGET_BANDWIDTH_FRACTION,
            "unit": "fraction",
        }
    )
    for target in targets:
        measured = target["measured"]
        target["status"] = (
            "n/a" if measured is None else ("PASS" if measured >= target["goal"] else "MISS")
        )
    return targets


def cpu_mhz() -> float | None:
    """The CPU clock /proc/cpuinfo reports (Linux), for cycles per key."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return float(line.split(":")[1])
    except OSError:
        pass
    return None


def key_costs(rows: list[Row]) -> list[dict]:
    """Time and core cycles per (key, KV head) of the kvsnap decode rows: the
    work of one key for the G query heads sharing it, QK and PV."""
    mhz, threads = cpu_mhz(), _ext.num_threads()
    costs = []
    for row in rows:
        if row.queries != 1 or row.ms is None or not row.variant.startswith(BASELINE):
            continue
        ns = row.ms * 1e6 / (row.context * N_KV_HEADS)
        costs.append(
            {
                "variant": row.variant,
                "context": row.context,
                "ns_per_key_and_head": ns,
                "core_cycles_per_key_and_head": None if mhz is None else ns * mhz * 1e-3 * threads,
                "cpu_mhz": mhz,
            }
        )
    return costs


def print_key_costs(costs: list[dict]) -> None:
    print(f"\ncost per key and KV head ({N_HEADS // N_KV_HEADS} query heads each), decode:")
    for c in costs:
        cycles = c["core_cycles_per_key_and_head"]
        shown = (
            ""
            if cycles is None
            else f", {cycles:6.1f} core cycles ({_ext.num_threads()} threads, "
            f"at the {c['cpu_mhz']:.0f} MHz /proc/cpuinfo reports; kernel_bound.py measures the clock)"
        )
        print(
            f"  {c['variant']:<28} @ {c['context'] // 1024:3d}K: {c['ns_per_key_and_head']:6.2f} ns{shown}"
        )


def print_targets(targets: list[dict]) -> None:
    print("\ntargets")
    for target in targets:
        measured = target["measured"]
        if measured is None:
            shown = "context not run"
        elif target["unit"] == "x":
            shown = f"{measured:.2f}x"
        else:
            shown = f"{measured:.0%}"
        print(f"  {target['status']:<4} {target['target']}: {shown}")


def print_paired(rows: list[Row], bandwidth: dict) -> None:
    base = find(rows, TARGET_BANDWIDTH_CONTEXT, BASELINE)
    if base is None or base.paired is None:
        return
    p = base.paired
    print(
        f"  the pairs: {p['pairs']} kernel calls (median {p['kernel_ms']:.3f} ms) each followed by the "
        f"{p['read_bytes'] >> 20} MiB read (median {p['read_gb_per_s']:.2f} GB/s); fraction per pair "
        f"{p['fraction_min']:.0%} to {p['fraction_max']:.0%}, median {p['fraction']:.0%}"
    )
    print(
        f"  unpaired, as the table's %BW: the kernel's median call against the best read of the run "
        f"({bandwidth['read_gb_per_s']:.2f} GB/s): {base.bandwidth_fraction:.0%}"
    )


def plot(rows: list[Row], bandwidth: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    decode = [r for r in rows if r.queries == 1 and r.ms is not None]
    variants = list(dict.fromkeys(r.variant for r in decode))
    fig, (ax_ms, ax_bw) = plt.subplots(1, 2, figsize=(13, 5))
    for name in variants:
        points = [r for r in decode if r.variant == name]
        contexts = [r.context for r in points]
        style = {"linewidth": 2.5} if name.startswith("kvsnap") else {"linestyle": "--"}
        ax_ms.plot(contexts, [r.ms for r in points], marker="o", label=name, **style)
        ax_bw.plot(contexts, [r.gb_per_s for r in points], marker="o", label=name, **style)
    read_bw = bandwidth["read_gb_per_s"]
    ax_bw.axhline(
        read_bw, color="black", linewidth=1, label=f"measured read bandwidth ({read_bw:.1f} GB/s)"
    )
    ax_bw.axhline(
        read_bw * TARGET_BANDWIDTH_FRACTION,
        color="gray",
        linestyle=":",
        linewidth=1,
        label="50% target",
    )
    contexts = sorted({r.context for r in decode})
    for ax in (ax_ms, ax_bw):
        ax.set_xscale("log", base=2)
        ax.set_xticks(contexts, [f"{c // 1024}K" for c in contexts])
        ax.set_xlabel("context (keys)")
        ax.grid(True, which="both", alpha=0.3)
    ax_ms.set_yscale("log")
    ax_ms.set_ylabel("ms per decode step (one layer)")
    ax_ms.set_title("attention time, decode L=1")
    ax_bw.set_ylabel("K/V bytes read / time (GB/s)")
    ax_bw.set_title("effective K/V read bandwidth")
    ax_ms.legend(fontsize=8)
    ax_bw.legend(fontsize=8)
    fig.suptitle(
        f"B={BATCH} Hq={N_HEADS} Hkv={N_KV_HEADS} D={HEAD_DIM}, "
        f"{os.cpu_count()} CPU cores, kvsnap {_ext.isa()} x{_ext.num_threads()} threads"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--contexts",
        type=int,
        nargs="+",
        default=list(DEFAULT_CONTEXTS),
        help="decode contexts in keys",
    )
    parser.add_argument("--quick", action="store_true", help="few repetitions, for smoke testing")
    parser.add_argument(
        "--warm-cache", action="store_true", help="do not flush the CPU caches between timed runs"
    )
    bench_common.add_out_argument(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--cpu-only", action="store_true", help="no [gpu] rows even where Metal is available"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    timing = QUICK_TIMING if args.quick else FULL_TIMING
    mx.set_default_device(mx.cpu)

    copy_bytes = max(MIN_COPY_BYTES, flush_bytes())
    repeats = 2 if args.quick else 5
    before = measure_bandwidth(copy_bytes, repeats)
    bench_common.print_machine(machine_info(before))
    print_bandwidth("before the cases", before)
    flusher = (lambda: None) if args.warm_cache else CacheFlusher(flush_bytes())
    llc = last_level_cache_bytes()
    llc_text = f"last-level cache reported: {llc >> 20} MiB" if llc else "no cache size reported"
    print(
        "caches NOT flushed between runs"
        if args.warm_cache
        else f"caches flushed between runs: {flusher.nbytes >> 20} MiB read on every core ({llc_text})"
    )
    gpu = metal_available() and not args.cpu_only
    self_check = metal_self_check() if gpu else None
    if gpu:
        print("Metal GPU available; kvsnap's self-check of its Metal kernels:")
        for op, verdict in self_check.items():
            print(
                f"  {op}: {verdict if verdict == 'ok' else 'FAILED, rows time the fallback: ' + verdict}"
            )
    else:
        reason = "--cpu-only" if args.cpu_only else "this build or machine has no Metal kernels"
        print(f"no [gpu] rows ({reason})")
    print()

    cases = [Case(1, context) for context in args.contexts] + [
        Case(PREFILL_QUERIES, PREFILL_CONTEXT)
    ]
    rows: list[Row] = []
    # measure_bandwidth's read on every core, for the bandwidth target's
    # pairs (only where its context runs: the buffer is 512 MiB).
    pair_read = CacheFlusher(copy_bytes) if TARGET_BANDWIDTH_CONTEXT in args.contexts else None
    for case in cases:
        rows += bench_case(case, timing, flusher, args.seed, gpu, pair_read)
    if pair_read is not None:
        pair_read.close()
    flush_bytes_used = 0 if args.warm_cache else flusher.nbytes
    if isinstance(flusher, CacheFlusher):
        flusher.close()  # the worker threads and the flush buffer
    # Measured again after the cases: a busy minute on a shared host only
    # lowers a measurement, so the reference is the faster of the two.
    after = measure_bandwidth(copy_bytes, repeats)
    print_bandwidth("after the cases", after)
    bandwidth = {
        **max(before, after, key=lambda b: b["read_gb_per_s"]),
        "before_cases": before,
        "after_cases": after,
    }
    machine = machine_info(bandwidth)
    for row in rows:
        if row.gb_per_s is not None:
            row.bandwidth_fraction = row.gb_per_s / bandwidth["read_gb_per_s"]

    print()
    print_table(rows)
    print(
        "\nms: median per call; KV MiB: K/V bytes the variant reads (packed + scales + biases, or raw floats);"
        f"\nGB/s: those bytes / ms; %BW: of the measured read bandwidth {bandwidth['read_gb_per_s']:.2f} GB/s;"
        f"\ng64 x: this row's time / {BASELINE}'s (how many times faster kvsnap is);"
        f"\nmax|diff|: vs mx.fast sdpa in float32 on the dequantized K/V (float16-rounded scales), "
        f"kvsnap rows must stay < {CHECK_TOLERANCE:g} (float kernels) or "
        f"{INT_CHECK_TOLERANCE:g} (integer kernels: {', '.join(INTEGER_ISAS)});"
        f"\nkvsnap rows without [isa] use the kernel set {DEFAULT_ISA};"
        "\nmlx-lm q4 sdpa f32: float32 queries and scales/biases (a float32 model's QuantizedKVCache);"
        "\nmlx-lm q4 sdpa f16: float16 queries and scales/biases (a float16 model's cache), output float16."
    )
    costs = key_costs(rows)
    print_key_costs(costs)
    targets = check_targets(rows)
    print_targets(targets)
    print_paired(rows, bandwidth)

    args.out.mkdir(parents=True, exist_ok=True)
    elapsed = time.perf_counter() - started
    report = {
        "shape": {
            "batch": BATCH,
            "n_heads": N_HEADS,
            "n_kv_heads": N_KV_HEADS,
            "head_dim": HEAD_DIM,
        },
        "machine": machine,
        "timing": {
            **asdict(timing),
            "statistic": "median",
            "caches_flushed": not args.warm_cache,
            "flush_bytes": flush_bytes_used,
            "last_level_cache_bytes": llc,
            "elapsed_s": elapsed,
        },
        "metal_self_check": self_check,
        "rows": [asdict(r) for r in rows],
        "key_costs": costs,
        "cpu_mhz": cpu_mhz(),
        "targets": targets,
    }
    json_path, png_path = args.out / "attention.json", args.out / "attention.png"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    plot(rows, bandwidth, png_path)
    print(f"\nwrote {json_path} and {png_path} in {elapsed:.0f} s")


if __name__ == "__main__":
    main()
