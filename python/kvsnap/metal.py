"""kvsnap's Metal kernels at run time: the self-check and the fallback.

The Metal kernels (csrc/metal/) are compiled on macOS only, and this
project's machines have no Mac: they were type-checked on Linux through a
shim (tools/check_metal.py), never run here. So before a process first uses
one of them, :class:`SelfCheck` runs it on small random cases and compares
it with the CPU kernel (which the test suite checks against a float64
reference). If they disagree, or the kernel raises, it warns once and the op
uses its fallback for the rest of the process:

- ``attention`` / ``q4_attention``: composed MLX ops on the requested
  stream, ``mx.dequantize`` + ``mx.fast.scaled_dot_product_attention`` with
  an explicit mask for the causal window and ragged lengths;
- ``kv_write``: the CPU kernel on the CPU stream (the arena is in unified
  memory, so the GPU reads what the CPU wrote).

The kernels under test are injectable, which is how the Linux tests check
this decision logic: they substitute the CPU kernel (must pass) and
deliberately wrong kernels (must fail, warn once, and fall back).
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from kvsnap import _ext

OPS = ("kv_write", "attention", "q4_attention")

# kernel(arena, layer, keys, values, block_table, offsets, counts) -> token
KVWriteKernel = Callable[[_ext.Arena, int, mx.array, mx.array, np.ndarray, list, list], mx.array]
# kernel(arena, layer, queries, block_table, lengths, scale, causal, window) -> out
AttentionKernel = Callable[
    [_ext.Arena, int, mx.array, np.ndarray, list, float, bool, int], mx.array
]
# kernel(queries, keys, values, scale, mask, group_size, bits) -> out
Q4Kernel = Callable[[mx.array, tuple, tuple, float, "str | mx.array | None", int, int], mx.array]

# Bounds on max |kernel - CPU kernel| / max(1, max |CPU kernel|) by output
# dtype: both accumulate in float32 but in different orders; a wrong key,
# group or position moves the output far more.
TOLERANCE = {mx.float32: 1e-4, mx.float16: 4e-3, mx.bfloat16: 3e-2}


def kernels_built() -> bool:
    """Whether this build has the Metal kernels (macOS builds with Xcode's compiler)."""
    return _ext.metal_kernels()


# ------------------------------------------------------------------ cases


@dataclass(frozen=True)
class Case:
    """One small random problem: a paged attention (and the kv_write that
    fills its arena), or, with the same shapes, a contiguous q4_attention."""

    name: str
    n_heads: int
    n_kv_heads: int
    head_dim: int
    queries: int  # L
    lengths: tuple[int, ...]  # one per sequence
    bits: int = 4
    key_bits: int = 4
    group_size: int = 64
    block_tokens: int = 64
    causal: bool = True
    window: int = 0
    dtype: mx.Dtype = mx.float32
    mask: str = "causal"  # q4_attention: "none", "causal", "bool" or "additive"


# Decode and prefill, GQA, ragged batches, windows, bits 4/8 (keys 6), group sizes
# 32/64/128, head_dim 64-256 (96: lanes past head_dim), the three dtypes,
# and enough keys for several flash-decoding splits. The attention kernel
# runs the query rows of a KV head in groups of 8 (heads x positions): 3
# query heads per KV head make a group end inside a query position, and the
# window makes the rows of a group see different keys.
CASES = (
    Case("decode gqa ragged", 8, 2, 128, 1, (300, 17)),
    Case(
        "prefill 8-bit f16",
        4,
        4,
        64,
        16,
        (40, 16),
        bits=8,
        key_bits=8,
        group_size=32,
        dtype=mx.float16,
        mask="bool",
    ),
    Case(
        "prefill window gqa 3 k8v4 bf16",
        6,
        2,
        256,
        8,
        (700,),
        key_bits=8,
        group_size=128,
        window=100,
        dtype=mx.bfloat16,
        mask="additive",
    ),
    Case("decode long d96", 2, 1, 96, 1, (2000,), group_size=32, mask="none"),
    Case("decode gqa 3 k6v4 (accurate)", 6, 2, 64, 1, (500, 33), key_bits=6, group_size=32, mask="none"),
    Case("non-causal", 4, 2, 64, 3, (90, 5), bits=8, causal=False, mask="none"),
)


def _case_data(case: Case, seed: int):
    """Random keys/values [B, Hkv, T, D] and queries [B, Hq, L, D] of a case."""
    rng = np.random.default_rng(seed)
    B, T = len(case.lengths), max(case.lengths)
    kv_shape = (B, case.n_kv_heads, T, case.head_dim)
    keys = mx.array(rng.standard_normal(kv_shape, dtype=np.float32)).astype(case.dtype)
    values = mx.array(rng.standard_normal(kv_shape, dtype=np.float32)).astype(case.dtype)
    q_shape = (B, case.n_heads, case.queries, case.head_dim)
    queries = mx.array(rng.standard_normal(q_shape, dtype=np.float32)).astype(case.dtype)
    return rng, keys, values, queries


def _arena(case: Case, n_blocks: int) -> _ext.Arena:
    """An arena of at least n_blocks slots (the budget bounds a slot from
    above: 8-bit K and V, two float16 per group, alignment and a page)."""
    D, groups = case.head_dim, case.head_dim // case.group_size
    slot_bound = 2 * case.n_kv_heads * case.block_tokens * (D + 4 * groups) + 6 * 64 + 4096
    return _ext.Arena(
        1,
        case.n_kv_heads,
        D,
        block_tokens=case.block_tokens,
        bits=case.bits,
        group_size=case.group_size,
        budget_bytes=slot_bound * n_blocks,
        key_bits=case.key_bits,
    )


def _paged(case: Case, rng: np.random.Generator):
    """An empty arena for the case and a shuffled block table over it
    (unused entries -1), so the kernels really go through the table."""
    B, bt = len(case.lengths), case.block_tokens
    per_seq = [-(-n // bt) for n in case.lengths]
    arena = _arena(case, sum(per_seq))
    slots = rng.permutation([arena.alloc() for _ in range(sum(per_seq))])
    table = np.full((B, max(per_seq)), -1, dtype=np.int32)
    taken = 0
    for b, n in enumerate(per_seq):
        table[b, :n] = slots[taken : taken + n]
        taken += n
    return arena, table


def _rel_error(got: mx.array, want: mx.array) -> float:
    got64 = np.array(got.astype(mx.float32), dtype=np.float64)
    want64 = np.array(want.astype(mx.float32), dtype=np.float64)
    if got64.shape != want64.shape:
        return float("inf")
    if not np.all(np.isfinite(got64)):
        return float("inf")
    scale = max(1.0, float(np.max(np.abs(want64), initial=0.0)))
    return float(np.max(np.abs(got64 - want64), initial=0.0)) / scale


def _write_cpu(arena, keys, values, table, case: Case) -> None:
    """Fill the arena with each sequence's own first lengths[b] tokens."""
    for b, n in enumerate(case.lengths):
        mx.eval(
            _ext.kv_write(
                arena,
                0,
                keys[b : b + 1, :, :n],
                values[b : b + 1, :, :n],
                table[b : b + 1],
                [0],
                None,
                [],
                mx.cpu,
            )
        )


# ------------------------------------------------------------------ checks


def check_kv_write(
    kernel: KVWriteKernel, cases: Sequence[Case] = CASES, seed: int = 0
) -> str | None:
    """None if `kernel` writes what the CPU kernel writes, else what differs.

    Both write the same keys/values (L tokens of each sequence, L its
    shortest length, at ragged offsets n - L; after the first sequence only
    the first L // 2 tokens are real, the rest padding) into arenas with the
    same block table; every element of every block must dequantize to
    within one quantization step of the CPU kernel's (an exact tie may round
    either way), and untouched rows, the padded ones included, must stay
    untouched.
    """
    for i, case in enumerate(cases):
        _, keys, values, _ = _case_data(case, seed + i)
        L = min(case.lengths)
        offsets = [n - L for n in case.lengths]
        counts = [L] + [L // 2] * (len(case.lengths) - 1)
        ref_arena, table = _paged(case, np.random.default_rng(seed + i))
        test_arena, _ = _paged(case, np.random.default_rng(seed + i))
        k, v = keys[:, :, :L], values[:, :, :L]
        mx.eval(_ext.kv_write(ref_arena, 0, k, v, table, offsets, counts, [], mx.cpu))
        mx.eval(kernel(test_arena, 0, k, v, table, offsets, counts))
        for slot in np.unique(table[table >= 0]):
            ref, got = ref_arena.read_block(int(slot), 0), test_arena.read_block(int(slot), 0)
            for kv, bits in ((0, case.key_bits), (1, case.bits)):
                want = _dequantize(*ref[3 * kv : 3 * kv + 3], bits, case.group_size)
                have = _dequantize(*got[3 * kv : 3 * kv + 3], bits, case.group_size)
                step = np.repeat(
                    np.abs(ref[3 * kv + 1].view(np.float16).astype(np.float64)),
                    case.group_size,
                    axis=-1,
                )
                if not np.all(np.abs(have - want) <= 1.01 * step + 1e-6):
                    what = "keys" if kv == 0 else "values"
                    return f"kv_write, case {case.name!r}: {what} in slot {slot} differ from the CPU kernel's"
    return None


def _dequantize(packed, scales, biases, bits: int, group_size: int) -> np.ndarray:
    # Each row is one little-endian bit stream (6-bit codes straddle words).
    packed = np.ascontiguousarray(packed, dtype="<u4")
    stream = np.unpackbits(packed.view(np.uint8), axis=-1, bitorder="little")
    fields = stream.reshape(*packed.shape[:-1], -1, bits).astype(np.int64)
    q = (fields << np.arange(bits, dtype=np.int64)).sum(axis=-1).astype(np.float64)
    s = np.repeat(scales.view(np.float16).astype(np.float64), group_size, axis=-1)
    b = np.repeat(biases.view(np.float16).astype(np.float64), group_size, axis=-1)
    return q * s + b


def check_attention(
    kernel: AttentionKernel, cases: Sequence[Case] = CASES, seed: int = 0
) -> str | None:
    """None if `kernel` agrees with the CPU kernel on every case, else what differs."""
    for i, case in enumerate(cases):
        rng, keys, values, queries = _case_data(case, seed + i)
        arena, table = _paged(case, rng)
        _write_cpu(arena, keys, values, table, case)
        scale = case.head_dim**-0.5
        lengths = list(case.lengths)
        want = _ext.attention(
            arena, 0, queries, table, lengths, scale, case.causal, case.window, [], mx.cpu
        )
        got = kernel(arena, 0, queries, table, lengths, scale, case.causal, case.window)
        err = _rel_error(got, want)
        if not err <= TOLERANCE[case.dtype]:
            return f"attention, case {case.name!r}: relative error {err:.3g} against the CPU kernel"
    return None


def _q4_inputs(case: Case, seed: int):
    """Queries, quantized triples (float16 scales) and the mask of a q4 case."""
    rng, keys, values, queries = _case_data(case, seed)
    B, T, L = len(case.lengths), max(case.lengths), case.queries
    triples = []
    for x in (keys, values):
        p, s, b = mx.quantize(x.astype(mx.float32), group_size=case.group_size, bits=case.bits)
        triples.append((p, s.astype(mx.float16), b.astype(mx.float16)))
    mask: str | mx.array | None = None
    if case.mask == "causal":
        mask = "causal"
    elif case.mask == "bool":
        mask = mx.array(rng.random((B, 1, L, T)) < 0.7)
    elif case.mask == "additive":
        mask = mx.array(rng.standard_normal((1, case.n_heads, L, T), dtype=np.float32))
    return queries, triples[0], triples[1], mask


def check_q4_attention(
    kernel: Q4Kernel, cases: Sequence[Case] = CASES, seed: int = 0
) -> str | None:
    """None if `kernel` agrees with the CPU kernel on contiguous triples."""
    for i, case in enumerate(cases):
        queries, k, v, mask = _q4_inputs(case, seed + i)
        scale = case.head_dim**-0.5
        causal = mask == "causal" if isinstance(mask, str) else False
        array_mask = mask if isinstance(mask, mx.array) else None
        want = _ext.q4_attention(
            queries, list(k), list(v), scale, causal, array_mask, case.group_size, case.bits, mx.cpu
        )
        got = kernel(queries, k, v, scale, mask, case.group_size, case.bits)
        err = _rel_error(got, want)
        if not err <= TOLERANCE[case.dtype]:
            return (
                f"q4_attention, case {case.name!r}: relative error {err:.3g} against the CPU kernel"
            )
    return None


CHECKS = {
    "kv_write": check_kv_write,
    "attention": check_attention,
    "q4_attention": check_q4_attention,
}


# --------------------------------------------------------- the Metal kernels


def _gpu_kv_write(arena, layer, keys, values, block_table, offsets, counts):
    return _ext.kv_write(
        arena, layer, keys, values, block_table, list(offsets), list(counts), [], mx.gpu
    )


def _gpu_attention(arena, layer, queries, block_table, lengths, scale, causal, window):
    return _ext.attention(
        arena, layer, queries, block_table, list(lengths), scale, causal, window, [], mx.gpu
    )


def _gpu_q4_attention(queries, keys, values, scale, mask, group_size, bits):
    causal = mask == "causal" if isinstance(mask, str) else False
    array_mask = mask if isinstance(mask, mx.array) else None
    return _ext.q4_attention(
        queries, list(keys), list(values), scale, causal, array_mask, group_size, bits, mx.gpu
    )


METAL_KERNELS = {
    "kv_write": _gpu_kv_write,
    "attention": _gpu_attention,
    "q4_attention": _gpu_q4_attention,
}


class SelfCheck:
    """Per-process verdicts on the Metal kernels, decided at first use.

    ``kernels`` maps op names to the kernels under test (default: the Metal
    kernels on the GPU stream); tests pass their own.
    """

    def __init__(self, kernels: dict[str, Callable] | None = None) -> None:
        self._kernels = dict(METAL_KERNELS if kernels is None else kernels)
        self._verdicts: dict[str, bool] = {}
        self._problems: dict[str, str] = {}
        self._lock = threading.Lock()

    def passed(self, op: str) -> bool:
        """Whether `op`'s kernel agreed with the CPU kernel. The first call
        per op runs the check; a failure warns (once) and stays failed."""
        with self._lock:
            if op not in self._verdicts:
                self._verdicts[op] = self._run(op)
            return self._verdicts[op]

    def problem(self, op: str) -> str | None:
        """What the failed check of `op` found (None: passed or not run)."""
        return self._problems.get(op)

    def _run(self, op: str) -> bool:
        try:
            problem = CHECKS[op](self._kernels[op])
        except Exception as e:  # noqa: BLE001 - a kernel that cannot run fails its check
            problem = f"{op}: the kernel raised {type(e).__name__}: {e}"
        if problem is None:
            return True
        self._problems[op] = problem
        fallback = (
            "the CPU kernel on the CPU stream"
            if op == "kv_write"
            else "composed MLX ops (mx.dequantize + mx.fast.scaled_dot_product_attention)"
        )
        warnings.warn(
            f"kvsnap: the Metal kernel of {op} failed its self-check ({problem}); "
            f"using {fallback} for {op} in this process instead. Please report this "
            "with your Mac model and macOS version.",
            RuntimeWarning,
            stacklevel=4,
        )
        return False


_process_check: SelfCheck | None = None
_process_lock = threading.Lock()


def process_check() -> SelfCheck:
    """The SelfCheck of this process (made on first use)."""
    global _process_check
    with _process_lock:
        if _process_check is None:
            _process_check = SelfCheck()
        return _process_check


def use_metal_kernel(op: str, check: SelfCheck | None = None) -> bool:
    """Whether a GPU call of `op` runs kvsnap's Metal kernel (True) or its
    fallback (False). Only meaningful when :func:`kernels_built`."""
    return (check or process_check()).passed(op)


# ---------------------------------------------------------------- fallbacks


def _visible(lengths: Sequence[int], L: int, T: int, causal: bool, window: int) -> np.ndarray:
    """bool [B, 1, L, T]: which keys each query sees (the kernels' rule)."""
    t = np.arange(T)
    out = np.zeros((len(lengths), 1, L, T), dtype=bool)
    for b, n in enumerate(lengths):
        pos = n - L + np.arange(L)[:, None]
        keep = t[None, :] < n
        if causal:
            keep = keep & (t[None, :] <= pos)
            if window > 0:
                keep = keep & (t[None, :] > pos - window)
        out[b, 0] = keep
    return out


def _sdpa(queries, k, v, scale, visible: mx.array, additive: mx.array | None, stream):
    """softmax(scale q k^T + additive) v over the visible keys, float32 inside;
    a query that sees no key gets zeros, as from the kernels."""
    q = queries.astype(mx.float32)
    if k.shape[2] == 0:
        return mx.zeros(queries.shape, dtype=queries.dtype, stream=stream)
    if additive is None:
        mask = visible
    else:
        mask = mx.where(visible, additive, mx.array(-np.inf, dtype=mx.float32), stream=stream)
        visible = mx.logical_and(visible, mask > -np.inf, stream=stream)
    out = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask, stream=stream)
    seen = mx.any(visible, axis=-1, keepdims=True, stream=stream)
    out = mx.where(seen, out, mx.array(0.0, dtype=mx.float32), stream=stream)
    return out.astype(queries.dtype, stream=stream)


def _dequantize_mx(triple, group_size: int, bits: int, stream) -> mx.array:
    packed, scales, biases = triple
    return mx.dequantize(
        packed,
        scales.astype(mx.float32, stream=stream),
        biases.astype(mx.float32, stream=stream),
        group_size=group_size,
        bits=bits,
        stream=stream,
    )


def fallback_attention(
    arena: _ext.Arena,
    layer: int,
    queries: mx.array,
    block_table: np.ndarray,
    lengths: Sequence[int],
    scale: float,
    causal: bool,
    window: int,
    stream=None,
    additive: mx.array | None = None,
) -> mx.array:
    """kvsnap.attention by composed MLX ops: the blocks are copied out of the
    arena (pending writes must have run: evaluate their tokens first),
    dequantized, and attended with an explicit mask."""
    B, bt = queries.shape[0], arena.block_tokens
    T = max(lengths, default=0)
    n_blocks = -(-T // bt)
    parts = [
        np.zeros((B, arena.n_kv_heads, n_blocks * bt, w), dtype=dt)
        for w, dt in (
            (arena.head_dim * arena.key_bits // 32, np.uint32),
            (arena.head_dim // arena.group_size, np.uint16),
            (arena.head_dim // arena.group_size, np.uint16),
            (arena.head_dim * arena.bits // 32, np.uint32),
            (arena.head_dim // arena.group_size, np.uint16),
            (arena.head_dim // arena.group_size, np.uint16),
        )
    ]
    for b, n in enumerate(lengths):
        for j in range(-(-n // bt)):
            block = arena.read_block(int(block_table[b][j]), layer)
            for i in range(6):
                parts[i][b, :, j * bt : (j + 1) * bt] = block[i]
    arrays = [
        mx.array(p[:, :, :T]) if i % 3 == 0 else mx.array(p[:, :, :T].view(np.float16))
        for i, p in enumerate(parts)
    ]
    k = _dequantize_mx(arrays[:3], arena.group_size, arena.key_bits, stream)
    v = _dequantize_mx(arrays[3:], arena.group_size, arena.bits, stream)
    visible = mx.array(_visible(lengths, queries.shape[2], T, causal, window))
    if additive is not None:
        additive = mx.broadcast_to(additive.astype(mx.float32), (*queries.shape[:3], T))
    return _sdpa(queries, k, v, scale, visible, additive, stream)


def fallback_q4_attention(
    queries: mx.array,
    keys: Sequence[mx.array],
    values: Sequence[mx.array],
    scale: float,
    mask: str | mx.array | None,
    group_size: int,
    bits: int,
    stream=None,
) -> mx.array:
    """kvsnap.q4_attention by composed MLX ops."""
    B, Hq, L, _ = queries.shape
    T = keys[0].shape[2]
    k = _dequantize_mx(keys, group_size, bits, stream)
    v = _dequantize_mx(values, group_size, bits, stream)
    visible = mx.array(
        _visible([T] * B, L, T, mask == "causal" if isinstance(mask, str) else False, 0)
    )
    additive = None
    if isinstance(mask, mx.array):
        if mask.dtype == mx.bool_:
            visible = mx.logical_and(visible, mask, stream=stream)
        else:
            additive = mask.astype(mx.float32, stream=stream)
    visible = mx.broadcast_to(visible, (B, Hq, L, T), stream=stream)
    return _sdpa(queries, k, v, scale, visible, additive, stream)
