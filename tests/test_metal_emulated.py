"""The Metal kernels, executed on Linux under a CPU emulation of Metal.

csrc/metal/emu/harness.cpp compiles kv_write.metal and attention.metal
unchanged against csrc/metal/emu/metal_stdlib: threadgroups run one at a
time, the threads of a threadgroup each on its own std::thread, simdgroup
reductions and threadgroup barriers are real exchanges among those threads,
`threadgroup` arrays are shared, half is IEEE binary16. The kernel arguments
and grids come from csrc/metal/launch.h, as on a Mac (primitives.cpp).

Each test runs the emulated kernels on small random problems and compares
them with kvsnap's CPU kernels (the float ones: kernel_isa.float_isa(), not
the integer-dot set): kv_write bit for bit, attention within the float32
accumulation error (or the output dtype's rounding). The harness also
counts the K and V elements attention's pass 1 dequantizes, which shows
that the query rows sharing a KV head share each read. What this cannot
show: Apple's compiler, the GPU memory model, real concurrency between
threadgroups, speed (docs/METAL.md).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import kvsnap
import mlx.core as mx
import numpy as np
import pytest
from conftest import TOL, random_quantized, to_mx
from kernel_isa import float_kernels  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parent.parent
METAL_DIR = ROOT / "csrc" / "metal"
HARNESS = METAL_DIR / "emu" / "harness.cpp"

# The Metal kernels compute in float: they are compared with the float CPU kernels.
pytestmark = [
    pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20)"),
    pytest.mark.usefixtures("float_kernels"),
]


def build_harness(out: Path, kernels_dir: Path | None = None) -> Path:
    """Compile the harness; kernels_dir (a folder of modified .metal copies)
    is searched before csrc/metal."""
    exe = out / "harness"
    includes = [f"-I{METAL_DIR / 'emu'}"]
    if kernels_dir is not None:
        includes.append(f"-I{kernels_dir}")
    includes += [f"-I{METAL_DIR}", f"-I{ROOT / 'csrc'}"]
    cmd = [
        "g++",
        "-O1",
        "-std=c++20",
        "-pthread",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-Wno-attributes",
        *includes,
        str(HARNESS),
        "-o",
        str(exe),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    return exe


@pytest.fixture(scope="session")
def harness(tmp_path_factory) -> Path:
    return build_harness(tmp_path_factory.mktemp("metal_emu"))


def run(exe: Path, op: str, spec: dict, tmp: Path) -> dict[str, int]:
    """Run one op of the harness; array values of `spec` go to files.
    Returns what it prints ("name number" lines)."""
    lines = []
    for name, value in spec.items():
        if isinstance(value, np.ndarray):
            path = tmp / f"{name}.bin"
            np.ascontiguousarray(value).tofile(path)
            value = path
        if isinstance(value, (list, tuple)):
            value = " ".join(str(v) for v in value)
        lines.append(f"{name} {value}")
    spec_path = tmp / f"{op}.spec"
    spec_path.write_text("\n".join(lines) + "\n")
    result = subprocess.run(
        [str(exe), op, str(spec_path)], capture_output=True, text=True, check=False, timeout=120
    )
    assert result.returncode == 0, result.stderr
    lines = (line.split() for line in result.stdout.splitlines())
    return {name: int(value) for name, value in lines}


# ------------------------------------------------------------------ buffers

DTYPE_NAMES = {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16"}


def raw(x: mx.array) -> np.ndarray:
    """The bytes of an mx array as numpy (bfloat16 as uint16 bit patterns)."""
    if x.dtype == mx.bfloat16:
        return (np.array(x.astype(mx.float32)).view(np.uint32) >> 16).astype(np.uint16)
    return np.array(x)


def from_raw(path: Path, dtype: mx.Dtype, shape) -> np.ndarray:
    """A harness output file as float64."""
    if dtype == mx.bfloat16:
        bits = np.fromfile(path, dtype=np.uint16).astype(np.uint32) << 16
        x = bits.view(np.float32)
    else:
        x = np.fromfile(path, dtype=np.float16 if dtype == mx.float16 else np.float32)
    return x.astype(np.float64).reshape(shape)


def rel_error(got: np.ndarray, want: mx.array) -> float:
    want64 = np.array(want.astype(mx.float32), dtype=np.float64)
    if not np.all(np.isfinite(got)):
        return float("inf")
    return float(np.max(np.abs(got - want64), initial=0.0)) / max(
        1.0, float(np.max(np.abs(want64), initial=0.0))
    )


def address(x: np.ndarray) -> int:
    return x.__array_interface__["data"][0]


def arena_bytes(arena: kvsnap.Arena, slots) -> np.ndarray:
    """The arena's bytes as the GPU sees its buffer (slot s at s * slot_bytes),
    copied from the slots' six arrays (`Arena.block_views`)."""
    buf = np.zeros(arena.n_slots * arena.slot_bytes, dtype=np.uint8)
    for slot in slots:
        views = arena.block_views(int(slot))
        start = int(slot) * arena.slot_bytes
        for v in views:
            off = start + address(v) - address(views[0])  # K packed opens the slot
            buf[off : off + v.nbytes] = v.reshape(-1).view(np.uint8)
    return buf


def layer_offsets(arena: kvsnap.Arena, layer: int) -> list[int]:
    """Byte offsets of one layer's six arrays in a slot (LayerOffsets::off)."""
    views = arena.block_views(0)
    return [address(v) - address(views[0]) + layer * v.nbytes // arena.n_layers for v in views]


# ------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    name: str
    n_heads: int
    n_kv_heads: int
    head_dim: int
    queries: int  # L
    lengths: tuple[int, ...]
    key_bits: int = 4
    bits: int = 4  # values
    group_size: int = 64
    block_tokens: int = 32
    causal: bool = True
    window: int = 0
    dtype: mx.Dtype = mx.float32
    min_splits: int = 1  # the emulated launch must split the keys at least this much


PAGED = (
    Case("decode gqa ragged", 8, 2, 128, 1, (1100, 37, 300), min_splits=4),
    Case("decode gqa 3 k6v4 gs16 f16", 6, 2, 64, 1, (900, 41), key_bits=6, group_size=16, dtype=mx.float16),
    Case("prefill window k6v8 d96 gs32 bf16", 4, 2, 96, 5, (500, 9), key_bits=6, bits=8, group_size=32,
         window=70, dtype=mx.bfloat16),
    Case(
        "prefill f16 k8v4 gs32",
        4,
        2,
        64,
        8,
        (620, 12),
        key_bits=8,
        group_size=32,
        dtype=mx.float16,
        min_splits=2,
    ),
    Case(
        "prefill window d256 k4v8 gs128",
        4,
        1,
        256,
        4,
        (900,),
        bits=8,
        group_size=128,
        window=100,
        min_splits=3,
    ),
    Case(
        "decode window bf16 8-bit",
        4,
        4,
        64,
        1,
        (700, 650),
        key_bits=8,
        bits=8,
        group_size=32,
        window=300,
        dtype=mx.bfloat16,
        min_splits=2,
    ),
    Case(
        "non-causal d128 gs128",
        2,
        1,
        128,
        3,
        (530, 20),
        causal=False,
        group_size=128,
        block_tokens=64,
        min_splits=2,
    ),
)


def random_case(rng: np.random.Generator, i: int) -> Case:
    """A random paged case: head_dim 64/96/128/256 (96: lanes past head_dim),
    group sizes dividing it, GQA ratios 1/2/3/4/7, decode or prefill, ragged
    lengths, windows, key bits 4/6/8, value bits 4/8, the three query dtypes."""
    D = int(rng.choice([64, 96, 128, 256]))
    gs = int(rng.choice([g for g in (16, 32, 64, 128) if D % g == 0]))
    Hkv = int(rng.choice([1, 2]))
    L = int(rng.choice([1, 1, 3, 8]))
    B = int(rng.integers(1, 4))
    lengths = tuple(int(n) for n in rng.integers(L, 1200, size=B))
    causal = bool(rng.random() < 0.8)
    return Case(
        f"random {i}",
        Hkv * int(rng.choice([1, 2, 3, 4, 7])),
        Hkv,
        D,
        L,
        lengths,
        key_bits=int(rng.choice([4, 6, 8])),
        bits=int(rng.choice([4, 8])),
        group_size=gs,
        block_tokens=int(rng.choice([16, 32, 64])),
        causal=causal,
        window=int(rng.integers(1, 400)) if causal and rng.random() < 0.4 else 0,
        dtype=[mx.float32, mx.float16, mx.bfloat16][int(rng.integers(3))],
    )


def make_arena(case: Case, n_slots: int, n_layers: int = 2) -> kvsnap.Arena:
    D, groups = case.head_dim, case.head_dim // case.group_size
    slot_bound = n_layers * 2 * case.n_kv_heads * case.block_tokens * (D + 4 * groups) + 8192
    return kvsnap.Arena(
        n_layers,
        case.n_kv_heads,
        D,
        block_tokens=case.block_tokens,
        bits=case.bits,
        group_size=case.group_size,
        budget_bytes=slot_bound * (n_slots + 2),
        key_bits=case.key_bits,
    )


def paged(case: Case, rng: np.random.Generator):
    """An arena, its used slots and a shuffled block table (unused entries -1)."""
    per_seq = [-(-n // case.block_tokens) for n in case.lengths]
    arena = make_arena(case, sum(per_seq))
    slots = [arena.alloc() for _ in range(arena.n_slots)]
    used = rng.permutation(slots)[: sum(per_seq)]
    table = np.full((len(per_seq), max(per_seq)), -1, dtype=np.int32)
    taken = 0
    for b, n in enumerate(per_seq):
        table[b, :n] = used[taken : taken + n]
        taken += n
    return arena, used, table


def random_kv(case: Case, rng: np.random.Generator, T: int, dtype=None):
    shape = (len(case.lengths), case.n_kv_heads, T, case.head_dim)
    return tuple(to_mx(rng.standard_normal(shape), dtype or case.dtype) for _ in range(2))


def attention_spec(case: Case, queries: mx.array, lengths, scale: float) -> dict:
    B, Hq, L, D = queries.shape
    return {
        "query_dtype": DTYPE_NAMES[queries.dtype],
        "B": B,
        "Hq": Hq,
        "L": L,
        "head_dim": D,
        "n_kv_heads": case.n_kv_heads,
        "group_size": case.group_size,
        "causal": int(case.causal),
        "window": case.window,
        "scale": repr(scale),
        "k_bits": case.key_bits,
        "v_bits": case.bits,
        "queries": raw(queries),
        "lengths": np.asarray(lengths, dtype=np.int32),
    }


def emulated_paged_attention(exe, case, arena, used, table, layer, queries, scale, tmp):
    spec = attention_spec(case, queries, case.lengths, scale)
    spec.update(
        {
            "paged": 1,
            "scale_dtype": "float16",
            "slot_bytes": arena.slot_bytes,
            "off": layer_offsets(arena, layer),
            "block_tokens": case.block_tokens,
            "max_blocks": table.shape[1],
            "arena": arena_bytes(arena, used),
            "block_table": table,
            "out": tmp / "out.bin",
        }
    )
    report = run(exe, "attention", spec, tmp)
    return from_raw(tmp / "out.bin", queries.dtype, queries.shape), report


def compare_paged(exe: Path, case: Case, rng, tmp: Path) -> tuple[float, dict[str, int]]:
    """Paged attention of `case` by the CPU kernel and by the emulated one:
    their relative difference and the harness's report (n_splits,
    dequantized_k, dequantized_v)."""
    arena, used, table = paged(case, rng)
    T = max(case.lengths)
    # Layer 1 is attended; layer 0 holds other data, so a wrong layer offset shows.
    for layer in (0, 1):
        keys, values = random_kv(case, rng, T, mx.float32)
        for b, n in enumerate(case.lengths):
            mx.eval(
                kvsnap.kv_write(
                    arena,
                    layer,
                    keys[b : b + 1, :, :n],
                    values[b : b + 1, :, :n],
                    table[b : b + 1],
                    [0],
                    stream=mx.cpu,
                )
            )
    shape = (len(case.lengths), case.n_heads, case.queries, case.head_dim)
    queries = to_mx(rng.standard_normal(shape), case.dtype)
    scale = case.head_dim**-0.5
    want = kvsnap.attention(
        arena,
        1,
        queries,
        table,
        list(case.lengths),
        scale=scale,
        causal=case.causal,
        window=case.window or None,
        stream=mx.cpu,
    )
    mx.eval(want)
    got, report = emulated_paged_attention(exe, case, arena, used, table, 1, queries, scale, tmp)
    return rel_error(got, want), report


# -------------------------------------------------------------- attention


RANDOM = tuple(random_case(np.random.default_rng(i), i) for i in range(12))


# Pass 1 runs the L * G query rows that share a KV head (G query heads per KV
# head, L positions) in groups of 8, row k being position k // G of head
# h * G + k % G, each K/V element read once per group: GQA ratios 1, 3
# (SmolLM2: 9/3) and 7 (Qwen2.5: 14/2), groups that end inside a query
# position, more positions than one group holds, rows of one group that see
# different keys (windows narrower than the chunk), ragged lengths (a
# sequence as short as its queries), non-causal.
GROUPED = (
    Case("gqa 3 decode ragged", 9, 3, 64, 1, (700, 33, 1), min_splits=2),
    Case("gqa 3 prefill window ragged", 9, 3, 64, 5, (400, 5, 64), window=20, block_tokens=16),
    Case(
        "gqa 3 prefill 8 k4v8 window",
        6,
        2,
        128,
        8,
        (1000, 9),
        bits=8,
        group_size=32,
        window=300,
        min_splits=3,
    ),
    Case("gqa 7 prefill f16 ragged", 14, 2, 64, 3, (500, 3, 40), dtype=mx.float16, min_splits=1),
    Case(
        "gqa 7 decode window bf16 k8",
        14,
        2,
        128,
        1,
        (600, 90),
        key_bits=8,
        window=100,
        dtype=mx.bfloat16,
        min_splits=2,
    ),
    Case("gqa 7 non-causal d96", 7, 1, 96, 2, (300, 17), causal=False, group_size=32),
    Case("gqa 1 prefill 11 positions window 5", 2, 2, 64, 11, (260, 11), window=5, block_tokens=16),
)


@pytest.mark.parametrize("case", PAGED + GROUPED + RANDOM, ids=lambda c: c.name)
def test_paged_attention_matches_the_cpu_kernel(harness, case, rng, tmp_path):
    err, report = compare_paged(harness, case, rng, tmp_path)
    assert report["n_splits"] >= case.min_splits
    assert err <= TOL[DTYPE_NAMES[case.dtype]], f"relative error {err:.3g} against the CPU kernel"


Q4 = (
    # (case, mask kind, scale dtype)
    (Case("decode gqa", 8, 2, 128, 1, (800, 800), group_size=32), "none", mx.float16),
    (Case("prefill causal 8-bit", 4, 2, 64, 8, (600,), key_bits=8, bits=8), "causal", mx.bfloat16),
    (
        Case("bool mask f16", 4, 1, 128, 4, (520, 520), group_size=128, dtype=mx.float16),
        "bool",
        mx.float32,
    ),
    (Case("additive mask d96", 2, 2, 96, 2, (600,), group_size=32), "additive", mx.float16),
    # a mask row per query head and position, 9 rows per KV head
    (Case("additive gqa 3", 6, 2, 64, 3, (600,), group_size=32), "additive", mx.float16),
    (
        Case("bool gqa 7 f16", 7, 1, 64, 2, (520, 520), dtype=mx.float16),
        "bool",
        mx.float32,
    ),
    (
        Case("causal gqa 7 8-bit", 14, 2, 64, 4, (600,), key_bits=8, bits=8),
        "causal",
        mx.bfloat16,
    ),
)


def compare_contiguous(
    exe: Path, case: Case, mask_kind: str, scale_dtype, rng, tmp_path: Path
) -> tuple[float, dict[str, int]]:
    """q4_attention of `case` (its first length for every sequence) by the
    CPU kernel and by the emulated one: their relative difference and the
    harness's report."""
    B, T, L, Hq = len(case.lengths), case.lengths[0], case.queries, case.n_heads
    kv_shape = (B, case.n_kv_heads, T, case.head_dim)
    k, _ = random_quantized(rng, kv_shape, case.bits, case.group_size, scale_dtype)
    v, _ = random_quantized(rng, kv_shape, case.bits, case.group_size, scale_dtype)
    queries = to_mx(rng.standard_normal((B, Hq, L, case.head_dim)), case.dtype)
    scale = case.head_dim**-0.5
    mask: str | mx.array | None = None
    mask_shape = ()
    if mask_kind == "causal":
        mask = "causal"
    elif mask_kind == "bool":
        mask_shape = (B, 1, L, T)
        keep = rng.random(mask_shape) < 0.7
        keep[0, 0, 0] = False  # a query that sees no key: zeros, as on the CPU
        mask = mx.array(keep)
    elif mask_kind == "additive":
        mask_shape = (1, Hq, L, T)
        mask = to_mx(rng.standard_normal(mask_shape))
    want = kvsnap.q4_attention(
        queries,
        k,
        v,
        scale=scale,
        mask=mask,
        group_size=case.group_size,
        bits=case.bits,
        stream=mx.cpu,
    )
    mx.eval(want)

    spec = attention_spec(
        Case(**{**case.__dict__, "causal": mask_kind == "causal"}), queries, case.lengths, scale
    )
    strides = []
    for x in (*k, *v):
        cols = x.shape[-1]
        strides += [case.n_kv_heads * T * cols, T * cols, cols]
    spec.update(
        {
            "paged": 0,
            "scale_dtype": DTYPE_NAMES[scale_dtype],
            "stride": strides,
            "kv": [],
            "has_mask": int(isinstance(mask, mx.array)),
            "out": tmp_path / "out.bin",
        }
    )
    for i, x in enumerate((*k, *v)):
        spec[f"kv{i}"] = raw(x)
    spec["kv"] = [tmp_path / f"kv{i}.bin" for i in range(6)]
    if isinstance(mask, mx.array):
        full = (B, Hq, L, T)
        contiguous = np.cumprod((1, *mask_shape[::-1]))[:4][::-1]
        spec["mask_is_bool"] = int(mask.dtype == mx.bool_)
        spec["mask_stride"] = [
            0 if n == 1 and f != 1 else int(s) for n, f, s in zip(mask_shape, full, contiguous)
        ]
        spec["mask"] = np.array(mask).astype(np.uint8 if mask.dtype == mx.bool_ else np.float32)
    report = run(exe, "attention", spec, tmp_path)
    got = from_raw(tmp_path / "out.bin", case.dtype, queries.shape)
    return rel_error(got, want), report


@pytest.mark.parametrize("case,mask_kind,scale_dtype", Q4, ids=lambda x: getattr(x, "name", None))
def test_contiguous_attention_matches_the_cpu_kernel(
    harness, case, mask_kind, scale_dtype, rng, tmp_path
):
    err, report = compare_contiguous(harness, case, mask_kind, scale_dtype, rng, tmp_path)
    assert report["n_splits"] >= 2
    assert err <= TOL[DTYPE_NAMES[case.dtype]], f"relative error {err:.3g} against the CPU kernel"


# -------------------------------------------------- reads shared by a group


def visible(case: Case, T: int, l: int) -> range:
    """Keys query l of a sequence of T tokens sees (layout.h's rule)."""
    if not case.causal:
        return range(T)
    pos = T - case.queries + l
    lo = max(pos - case.window + 1, 0) if case.window > 0 else 0
    return range(lo, max(pos + 1, 0))


def key_reads(case: Case, rows_per_read: int) -> int:
    """Key rows pass 1 dequantizes when each group of `rows_per_read` query
    rows of a KV head (row k: position k // G, G query heads per KV head)
    reads every key any of them sees once: rows_per_read=1 is one query row
    per threadgroup, the kernel before rows were grouped."""
    G, L = case.n_heads // case.n_kv_heads, case.queries
    reads = 0
    for T in case.lengths:
        for first in range(0, L * G, rows_per_read):
            rows = range(first, min(first + rows_per_read, L * G))
            reads += len(set().union(*(visible(case, T, k // G) for k in rows)))
    return reads * case.n_kv_heads


READS = (
    Case("SmolLM2-like decode 4K", 9, 3, 64, 1, (4096,), min_splits=16),
    Case("Qwen2.5-like prefill chunk", 14, 2, 64, 4, (1024, 300), window=500),
)


@pytest.mark.parametrize("case", READS, ids=lambda c: c.name)
def test_the_rows_of_a_kv_head_share_each_key_and_value_read(harness, case, rng, tmp_path):
    """Pass 1 dequantizes each K and V element a query sees once per group
    of up to 8 query rows of its KV head, not once per query row: for a
    SmolLM2-like decode (9 query heads over 3 KV heads) 3x fewer, for a
    Qwen2.5-like prefill chunk (14 over 2, 4 positions) up to 8x fewer."""
    err, report = compare_paged(harness, case, rng, tmp_path)
    assert err <= TOL[DTYPE_NAMES[case.dtype]], f"relative error {err:.3g} against the CPU kernel"
    assert report["n_splits"] >= case.min_splits
    grouped, per_row = key_reads(case, 8), key_reads(case, 1)
    # No mask: every key read is used by some row, so its value is read too.
    assert report["dequantized_k"] == grouped * case.head_dim
    assert report["dequantized_v"] == grouped * case.head_dim
    if case.queries == 1:
        assert per_row == grouped * (case.n_heads // case.n_kv_heads)
    else:
        assert per_row > 6 * grouped


# ---------------------------------------------------------------- kv_write


WRITES = (
    Case("float32 4-bit gs64 d128", 4, 2, 128, 5, (40, 90, 7)),
    Case(
        "float16 k8v4 gs32 d64",
        4,
        4,
        64,
        33,
        (33, 100),
        key_bits=8,
        group_size=32,
        dtype=mx.float16,
    ),
    Case(
        "bfloat16 k4v8 gs128 d256", 2, 1, 256, 3, (3, 70), bits=8, group_size=128, dtype=mx.bfloat16
    ),
    Case("float32 8-bit gs32 d64", 2, 2, 64, 17, (17, 17), key_bits=8, bits=8, group_size=32),
    Case("float32 k6v4 gs16 d64", 4, 2, 64, 9, (9, 300), key_bits=6, group_size=16),
    Case("bfloat16 k6v8 gs64 d192", 2, 1, 192, 5, (5, 40), key_bits=6, bits=8, dtype=mx.bfloat16),
)


def check_kv_write(exe: Path, case: Case, rng, keys: mx.array, values: mx.array, tmp: Path):
    """Write keys/values (the last L tokens of each sequence: ragged offsets,
    across block boundaries) into layer 1 of shuffled slots with the CPU
    kernel and with the emulated one: every byte of every slot, the untouched
    ones included, must be equal."""
    arena, used, table = paged(case, rng)
    L = keys.shape[2]
    offsets = [n - L for n in case.lengths]
    compare_kv_write(exe, case, arena, used, table, keys, values, offsets, [L] * len(offsets), tmp)


def compare_kv_write(exe: Path, case: Case, arena, slots, table, keys, values, offsets, counts, tmp):
    """kv_write(counts=counts) by the CPU kernel and by the emulated kernel
    into copies of the same arena: every byte of `slots` must be equal."""
    before = arena_bytes(arena, slots)
    mx.eval(kvsnap.kv_write(arena, 1, keys, values, table, offsets, counts=counts, stream=mx.cpu))
    want = arena_bytes(arena, slots)
    spec = {
        "dtype": DTYPE_NAMES[keys.dtype],
        "slot_bytes": arena.slot_bytes,
        "off": layer_offsets(arena, 1),
        "B": len(offsets),
        "L": keys.shape[2],
        "n_kv_heads": case.n_kv_heads,
        "head_dim": case.head_dim,
        "group_size": case.group_size,
        "block_tokens": case.block_tokens,
        "max_blocks": table.shape[1],
        "k_bits": case.key_bits,
        "v_bits": case.bits,
        "keys": raw(keys),
        "values": raw(values),
        "block_table": table,
        "offsets": np.asarray(offsets, dtype=np.int32),
        "counts": np.asarray(counts, dtype=np.int32),
        "arena": before,
    }
    run(exe, "kv_write", spec, tmp)
    got = np.fromfile(tmp / "arena.bin", dtype=np.uint8)
    assert not np.array_equal(want, before)
    differ = np.flatnonzero(got != want)
    assert differ.size == 0, (
        f"{differ.size} bytes differ from the CPU kernel's, first at {differ[:5]}"
    )


@pytest.mark.parametrize("case", WRITES, ids=lambda c: c.name)
def test_kv_write_writes_the_cpu_kernels_bytes(harness, case, rng, tmp_path):
    """Bit for bit: both run MLX's affine quantization in float32 with the
    same operations in the same order and round scales/biases to float16 to
    nearest even (emulated half: shim/metal_core.h)."""
    keys, values = random_kv(case, rng, case.queries)
    check_kv_write(harness, case, rng, keys, values, tmp_path)


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16], ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("bits", [(4, 4), (8, 4), (6, 4), (4, 8), (6, 8), (8, 8)], ids=str)
def test_kv_write_special_values(harness, dtype, bits, rng, tmp_path):
    """Groups of zeros, constants, tiny values (float16 subnormal scales) and
    large ones, group size 16."""
    case = Case(
        "special",
        2,
        2,
        64,
        20,
        (20, 45),
        key_bits=bits[0],
        bits=bits[1],
        group_size=16,
        dtype=dtype,
    )
    x = rng.standard_normal((2, 2, 20, 64))
    magnitudes = np.array([0, 1, 1e-6, 1e-3, 3e-5, 300, -1, 1e-9])
    x *= magnitudes[np.arange(20) % len(magnitudes)][:, None]
    x[:, :, 1] = 0.37  # constant groups
    keys, values = to_mx(x, dtype), to_mx(x[..., ::-1] * 0.5, dtype)
    check_kv_write(harness, case, rng, keys, values, tmp_path)


# One batch of prompts right-padded to L = case.queries: sequence b writes
# counts[b] real tokens at offsets[b] (0 and L included, starts mid-block);
# case.lengths are where the real tokens end, offsets[b] + counts[b].
COUNTED_WRITES = (
    (
        Case("counts float32 4-bit d128", 4, 2, 128, 20, (20, 13, 44, 66)),
        (0, 13, 37, 50),
        (20, 0, 7, 16),
    ),
    (
        Case(
            "counts float16 k8v4 gs32 d64",
            4,
            4,
            64,
            33,
            (6, 97, 33),
            key_bits=8,
            group_size=32,
            dtype=mx.float16,
        ),
        (5, 64, 31),
        (1, 33, 2),
    ),
    (
        Case(
            "counts bfloat16 k4v8 gs128 d256",
            2,
            1,
            256,
            9,
            (30, 9),
            bits=8,
            group_size=128,
            dtype=mx.bfloat16,
        ),
        (30, 0),
        (0, 9),
    ),
)


def counted_paged(case: Case, offsets, counts, L: int, rng: np.random.Generator):
    """An arena and a block table for writing counts[b] of L tokens at
    offsets[b]: the blocks of the real tokens name their own shuffled slots;
    every other entry, up to offsets[b] + L, names one decoy slot, so a padded
    token written anywhere changes bytes that the CPU kernel leaves alone."""
    bt = case.block_tokens
    real = [range(o // bt, -(-(o + c) // bt)) if c else range(0) for o, c in zip(offsets, counts)]
    n_real = sum(len(blocks) for blocks in real)
    arena = make_arena(case, n_real + 1)
    slots = rng.permutation([arena.alloc() for _ in range(n_real + 1)])
    fresh = iter(slots[1:])
    table = np.full((len(offsets), max(-(-(o + L) // bt) for o in offsets)), slots[0], np.int32)
    for b, blocks in enumerate(real):
        for blk in blocks:
            table[b, blk] = next(fresh)
    return arena, slots, table


@pytest.mark.parametrize("case,offsets,counts", COUNTED_WRITES, ids=lambda x: getattr(x, "name", ""))
def test_kv_write_with_counts_writes_the_cpu_kernels_bytes(harness, case, offsets, counts, rng, tmp_path):
    """Ragged counts: the padded tokens (random values, not zeros) are written
    by neither kernel, and the bytes of the real ones are equal."""
    assert case.lengths == tuple(o + c for o, c in zip(offsets, counts))
    keys, values = random_kv(case, rng, case.queries)
    arena, slots, table = counted_paged(case, offsets, counts, case.queries, rng)
    compare_kv_write(harness, case, arena, slots, table, keys, values, offsets, counts, tmp_path)


# ------------------------------------------------------- planted bugs


def planted_harness(tmp_path: Path, old: str, new: str) -> Path:
    """The harness built with attention.metal's `old` replaced by `new`."""
    source = (METAL_DIR / "attention.metal").read_text()
    assert old in source, f"{old!r} is no longer in attention.metal; update the planted bug"
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    (bad_dir / "attention.metal").write_text(source.replace(old, new))
    return build_harness(bad_dir, kernels_dir=bad_dir)


def test_a_planted_bug_in_the_merge_is_caught(rng, tmp_path):
    """The comparison above is not vacuous: the merge pass skipping the first
    split (an off-by-one) makes the emulated kernel disagree."""
    exe = planted_harness(
        tmp_path,
        "for (int s = 0; s < n; ++s) {\n      const float ms",
        "for (int s = 1; s < n; ++s) {\n      const float ms",
    )
    err, report = compare_paged(exe, PAGED[0], rng, tmp_path)
    assert report["n_splits"] > 1
    assert err > 100 * TOL["float32"]


def test_a_row_that_reads_another_rows_keys_is_caught(rng, tmp_path):
    """Every row of a group walking the keys of its first row (right for
    decode, where the G heads of a position see the same keys; wrong for a
    prefill chunk) makes the emulated kernel disagree."""
    exe = planted_harness(
        tmp_path,
        "seen[r] = t >= kmin[r] && t < kmax[r];",
        "seen[r] = r < R && t >= kmin[0] && t < kmax[0];",
    )
    case = next(c for c in GROUPED if c.name == "gqa 3 prefill window ragged")
    err, _ = compare_paged(exe, case, rng, tmp_path)
    assert err > 100 * TOL["float32"]


def test_a_row_that_reads_another_rows_mask_is_caught(rng, tmp_path):
    """Every row of a group taking its first row's mask makes the emulated
    kernel disagree on a mask with one row per query head and position."""
    exe = planted_harness(
        tmp_path, "mask + mask_off[r] * mask_bytes", "mask + mask_off[0] * mask_bytes"
    )
    case, mask_kind, scale_dtype = next(q for q in Q4 if q[0].name == "additive gqa 3")
    err, _ = compare_contiguous(exe, case, mask_kind, scale_dtype, rng, tmp_path)
    assert err > 100 * TOL["float16"]


def test_a_planted_bug_in_the_counts_is_caught(rng, tmp_path):
    """The counts comparison is not vacuous: a kernel that also writes the
    first padded token (an off-by-one) disagrees with the CPU kernel."""
    source = (METAL_DIR / "kv_write.metal").read_text()
    old = "if (l >= counts[b]) {"
    assert old in source, "update the planted bug to the current padding test"
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    (bad_dir / "kv_write.metal").write_text(source.replace(old, "if (l > counts[b]) {"))
    exe = build_harness(bad_dir, kernels_dir=bad_dir)
    case, offsets, counts = COUNTED_WRITES[0]
    keys, values = random_kv(case, rng, case.queries)
    arena, slots, table = counted_paged(case, offsets, counts, case.queries, rng)
    with pytest.raises(AssertionError, match="bytes differ from the CPU kernel's"):
        compare_kv_write(exe, case, arena, slots, table, keys, values, offsets, counts, tmp_path)
