"""The Metal kernels, checked where they cannot run.

No Mac is available to this project, so:
- tools/check_metal.py compiles every csrc/metal file with g++ through a
  shim (and fails on a planted error);
- the self-check that a Mac runs at first GPU use is exercised here with
  substituted kernels: the CPU kernel (must pass) and deliberately wrong
  ones (must fail, warn once, and route the op to its fallback);
- the fallback (composed MLX ops) is checked against the CPU kernel.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import kvsnap
import mlx.core as mx
import numpy as np
import pytest
from kernel_isa import float_kernels  # noqa: F401 (fixture)
from kvsnap import _ext, metal

# The self-checks compare the Metal kernels (and their fallbacks) with the CPU
# kernels within float32 error: the float CPU kernels, not the integer ones.
pytestmark = pytest.mark.usefixtures("float_kernels")

ROOT = Path(__file__).resolve().parent.parent
CHECK = ROOT / "tools" / "check_metal.py"
METAL_DIR = ROOT / "csrc" / "metal"


def run_check(*files: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(CHECK), *map(str, files)], capture_output=True, text=True, check=False
    )


# ------------------------------------------------------------- shim compile


def test_g_plus_plus_is_installed():
    # .ci/run installs it; without it the shim check below cannot run.
    assert shutil.which("g++") or shutil.which("clang++")


def test_every_metal_file_compiles_through_the_shim():
    sources = sorted(METAL_DIR.glob("*.metal"))
    assert {p.name for p in sources} >= {"attention.metal", "kv_write.metal"}
    result = run_check()
    assert result.returncode == 0, result.stdout + result.stderr
    for path in sources:
        assert f"ok     {path}" in result.stdout


def plant(tmp_path: Path, name: str, old: str, new: str) -> Path:
    source = (METAL_DIR / name).read_text()
    assert old in source, f"{old!r} is no longer in {name}; update the planted error"
    bad = tmp_path / name
    bad.write_text(source.replace(old, new, 1))
    return bad


@pytest.mark.parametrize(
    ("name", "old", "new", "message"),
    [
        # a type error: a struct of pointers used as a float
        ("attention.metal", "float dot = 0.0f;", "float dot = kv;", "cannot convert"),
        # a typo in a name
        ("attention.metal", "simd_sum(dot)", "simd_summ(dot)", "simd_summ"),
        # a type error inside a template, seen only when it is instantiated
        ("kv_write.metal", "float w = to_float(x[j]);", "float w = to_float(x);", "to_float"),
        # a wrong argument count to a shared layout.h helper
        ("kv_write.metal", "kv_word_of(g * gs, bits)", "kv_word_of(g * gs)", "kv_word_of"),
    ],
)
def test_the_shim_check_fails_on_a_planted_error(tmp_path, name, old, new, message):
    bad = plant(tmp_path, name, old, new)
    result = run_check(bad)
    assert result.returncode == 1
    assert f"FAILED {bad}" in result.stdout
    assert message in result.stdout


def test_the_host_side_check_fails_on_a_planted_error(tmp_path):
    import mlx

    if not (Path(mlx.__path__[0]) / "include" / "mlx" / "backend" / "metal" / "device.h").exists():
        pytest.skip("this mlx wheel has no Metal headers to check primitives.cpp against")
    good = run_check(METAL_DIR / "primitives.cpp")
    assert good.returncode == 0, good.stdout
    bad = plant(tmp_path, "primitives.cpp", "enc.set_bytes(p, 6);", "enc.set_bytes(p);")
    result = run_check(bad)
    assert result.returncode == 1 and "set_bytes" in result.stdout


def instantiated_kernels() -> set[str]:
    """Kernel names the .metal files instantiate, read from the preprocessed
    sources (the names are built by macros)."""
    names = set()
    for path in METAL_DIR.glob("*.metal"):
        out = subprocess.run(
            ["g++", "-E", "-x", "c++", f"-I{METAL_DIR / 'shim'}", str(path)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for args in re.findall(r"host_name\(((?:\s*\"[^\"]*\")+)\s*\)", out):
            names.add("".join(re.findall(r"\"([^\"]*)\"", args)))
    return names


def test_every_kernel_name_the_host_asks_for_is_instantiated():
    # launch.h builds these names for primitives.cpp at run time; a missing one would
    # fail only on a Mac.
    dtypes = ("float32", "float16", "bfloat16")
    wanted = {f"kvsnap_kv_write_{t}" for t in dtypes}
    wanted |= {f"kvsnap_attention_merge_{t}" for t in dtypes}
    wanted |= {
        f"kvsnap_attention_partial_{q}_{s}_k{kb}_v{vb}"
        for q in dtypes
        for s in dtypes
        for kb in (4, 8)
        for vb in (4, 8)
    }
    assert wanted <= instantiated_kernels()


# -------------------------------------------------------------- self-check


def cpu_kv_write(arena, layer, keys, values, table, offsets, counts):
    return _ext.kv_write(arena, layer, keys, values, table, list(offsets), list(counts), [], mx.cpu)


def cpu_attention(arena, layer, queries, table, lengths, scale, causal, window):
    return _ext.attention(
        arena, layer, queries, table, list(lengths), scale, causal, window, [], mx.cpu
    )


def cpu_q4_attention(queries, keys, values, scale, mask, group_size, bits):
    causal = isinstance(mask, str) and mask == "causal"
    array_mask = mask if isinstance(mask, mx.array) else None
    return _ext.q4_attention(
        queries, list(keys), list(values), scale, causal, array_mask, group_size, bits, mx.cpu
    )


CPU_KERNELS = {
    "kv_write": cpu_kv_write,
    "attention": cpu_attention,
    "q4_attention": cpu_q4_attention,
}


# Deliberately wrong kernels, each a bug a real kernel could have.
def attention_off_by_a_little(*args):
    return cpu_attention(*args) * 1.01


def attention_ignoring_the_window(arena, layer, queries, table, lengths, scale, causal, window):
    return cpu_attention(arena, layer, queries, table, lengths, scale, causal, 0)


def attention_with_nan(*args):
    out = cpu_attention(*args)
    return mx.where(mx.arange(out.shape[-1]) == 3, mx.array(np.nan), out)


def attention_that_raises(*args):
    raise RuntimeError("Failed to load the metallib")


def kv_write_one_position_late(arena, layer, keys, values, table, offsets, counts):
    return cpu_kv_write(arena, layer, keys, values, table, [o + 1 for o in offsets], counts)


def kv_write_values_only(arena, layer, keys, values, table, offsets, counts):
    # keys written from the values: a swapped buffer index
    return cpu_kv_write(arena, layer, values, values, table, offsets, counts)


def kv_write_ignoring_counts(arena, layer, keys, values, table, offsets, counts):
    # the padded tokens written too
    return cpu_kv_write(arena, layer, keys, values, table, offsets, [keys.shape[2]] * len(counts))


def q4_ignoring_the_mask(queries, keys, values, scale, mask, group_size, bits):
    return cpu_q4_attention(queries, keys, values, scale, None, group_size, bits)


def test_the_cpu_kernels_pass_every_check():
    check = metal.SelfCheck(CPU_KERNELS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert all(check.passed(op) for op in metal.OPS)
    assert all(check.problem(op) is None for op in metal.OPS)


@pytest.mark.parametrize(
    ("op", "wrong"),
    [
        ("attention", attention_off_by_a_little),
        ("attention", attention_ignoring_the_window),
        ("attention", attention_with_nan),
        ("attention", attention_that_raises),
        ("kv_write", kv_write_one_position_late),
        ("kv_write", kv_write_values_only),
        ("kv_write", kv_write_ignoring_counts),
        ("q4_attention", q4_ignoring_the_mask),
    ],
)
def test_a_wrong_kernel_fails_warns_once_and_falls_back(op, wrong):
    check = metal.SelfCheck({**CPU_KERNELS, op: wrong})
    with pytest.warns(RuntimeWarning, match=f"Metal kernel of {op} failed its self-check") as w:
        assert not metal.use_metal_kernel(op, check)
    assert len(w) == 1
    assert check.problem(op) and op in check.problem(op)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, no second check
        assert not metal.use_metal_kernel(op, check)
        # the other ops keep their (correct) kernels
        assert all(metal.use_metal_kernel(other, check) for other in metal.OPS if other != op)


def test_the_check_runs_once_per_op():
    calls = []

    def counting(*args):
        calls.append(1)
        return cpu_attention(*args)

    check = metal.SelfCheck({**CPU_KERNELS, "attention": counting})
    assert check.passed("attention") and check.passed("attention")
    assert len(calls) == len(metal.CASES)


def test_the_cases_cover_the_issue():
    cases = metal.CASES
    assert {c.bits for c in cases} == {4, 8} and {c.key_bits for c in cases} == {4, 6, 8}
    assert {c.group_size for c in cases} >= {32, 64, 128}
    assert min(c.head_dim for c in cases) == 64 and max(c.head_dim for c in cases) == 256
    assert {c.dtype for c in cases} == {mx.float32, mx.float16, mx.bfloat16}
    assert any(c.n_heads > c.n_kv_heads for c in cases)  # GQA
    # the Metal kernel's groups of 8 query rows (heads x positions) of a KV
    # head: one that ends inside a position, in a chunk whose rows see different keys
    assert any(
        c.queries > 1 and c.causal and 8 % (c.n_heads // c.n_kv_heads) for c in cases
    )
    assert any(len(set(c.lengths)) > 1 for c in cases)  # ragged
    assert any(c.window for c in cases) and any(not c.causal for c in cases)
    assert {c.queries == 1 for c in cases} == {True, False}  # decode and prefill
    assert max(max(c.lengths) for c in cases) >= 4 * 256  # several flash-decoding splits


@pytest.mark.skipif(
    metal.kernels_built(), reason="assumes a build without GPU kernels; this build has the Metal kernels"
)
def test_builds_without_metal_refuse_gpu_streams():
    arena = kvsnap.Arena(1, 1, 64, block_tokens=16, budget_bytes=1 << 20)
    q = mx.zeros((1, 1, 1, 64))
    with pytest.raises(kvsnap.errors.DeviceUnsupportedError, match="no GPU kernels"):
        kvsnap.attention(arena, 0, q, [[arena.alloc()]], [1], scale=1.0, stream=mx.gpu)


# ---------------------------------------------------------------- fallback

FALLBACK_CASES = [
    metal.Case("decode gqa ragged", 8, 2, 128, 1, (300, 17, 64)),
    metal.Case("prefill causal 8-bit", 4, 4, 64, 16, (40, 16), bits=8, key_bits=8, group_size=32),
    metal.Case("window k8v4", 4, 1, 128, 8, (700, 300), key_bits=8, group_size=128, window=100),
    metal.Case("prefill k6v4", 4, 2, 64, 5, (300, 40), key_bits=6, group_size=32),
    metal.Case("window wider than the context", 6, 3, 64, 4, (20, 9), window=50),
    metal.Case("non-causal", 4, 2, 64, 3, (90, 5), bits=8, causal=False),
    metal.Case("empty sequence", 2, 1, 64, 1, (0, 33), causal=False),
    metal.Case("float16 queries", 4, 2, 64, 2, (70, 2), dtype=mx.float16),
    metal.Case("bfloat16 queries", 4, 2, 64, 1, (70, 2), dtype=mx.bfloat16),
]


@pytest.mark.parametrize("case", FALLBACK_CASES, ids=lambda c: c.name)
def test_fallback_attention_matches_the_cpu_kernel(case):
    def fallback(arena, layer, queries, table, lengths, scale, causal, window):
        return metal.fallback_attention(
            arena, layer, queries, table, lengths, scale, causal, window, stream=mx.cpu
        )

    assert metal.check_attention(fallback, [case]) is None


@pytest.mark.parametrize("mask", ["none", "causal", "bool", "additive"])
@pytest.mark.parametrize("bits", [4, 8])
def test_fallback_q4_attention_matches_the_cpu_kernel(mask, bits):
    case = metal.Case(f"q4 {mask}", 8, 2, 64, 5, (50, 50), bits=bits, key_bits=bits, mask=mask)

    def fallback(queries, keys, values, scale, m, group_size, b):
        return metal.fallback_q4_attention(
            queries, keys, values, scale, m, group_size, b, stream=mx.cpu
        )

    assert metal.check_q4_attention(fallback, [case]) is None


def test_fallback_rows_that_see_nothing_are_zero():
    queries = mx.ones((1, 2, 3, 64))
    keys = mx.quantize(mx.ones((1, 2, 4, 64)), group_size=64, bits=4)
    mask = mx.zeros((1, 1, 3, 4), dtype=mx.bool_)  # nobody sees anything
    out = metal.fallback_q4_attention(queries, keys, keys, 0.125, mask, 64, 4, stream=mx.cpu)
    assert np.array_equal(np.array(out), np.zeros((1, 2, 3, 64), dtype=np.float32))
