"""Bad input to kv_write / attention / q4_attention raises a kvsnap.errors
exception when the op is built (not a crash, not a failure at a later eval),
and an InvalidArgumentError names the argument at fault in .argument and in
its message."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import kvsnap
import mlx.core as mx
import numpy as np
import pytest
from kvsnap.errors import DeviceUnsupportedError, InvalidArgumentError, KvsnapError

D = 64


def expect_invalid(argument: str, call, *args, **kwargs) -> InvalidArgumentError:
    # Raised by the call itself: an error inside the kernel would only surface
    # at some later, unrelated evaluation.
    with pytest.raises(InvalidArgumentError) as e:
        call(*args, **kwargs)
    assert isinstance(e.value, KvsnapError) and isinstance(e.value, ValueError)
    assert e.value.argument == argument, (e.value.argument, str(e.value))
    assert argument in str(e.value)
    return e.value


def triple(B=1, H=2, T=8, d=D, bits=4, gs=64, dtype=mx.float16):
    return (
        mx.zeros((B, H, T, d * bits // 32), dtype=mx.uint32),
        mx.ones((B, H, T, d // gs), dtype=dtype),
        mx.zeros((B, H, T, d // gs), dtype=dtype),
    )


def q4(queries=None, keys=None, values=None, **kwargs):
    queries = mx.zeros((1, 4, 2, D)) if queries is None else queries
    kwargs.setdefault("scale", 0.125)
    return kvsnap.q4_attention(
        queries,
        triple() if keys is None else keys,
        triple() if values is None else values,
        **kwargs,
    )


@pytest.fixture
def arena():
    return kvsnap.Arena(2, 2, D, block_tokens=16, budget_bytes=1 << 22)


@pytest.fixture
def table(arena):
    """One sequence of 2 live blocks (32 tokens)."""
    return [[arena.alloc(), arena.alloc()]]


def kv(B=1, H=2, L=4, d=D, dtype=mx.float32):
    return mx.zeros((B, H, L, d), dtype=dtype)


# ------------------------------------------------------------------ q4_attention


def test_q4_sanity_the_base_call_works():
    # The calls below differ from this one in one argument only.
    out = q4()
    mx.eval(out)
    assert out.shape == (1, 4, 2, D)


@pytest.mark.parametrize("dtype", [mx.int32, mx.uint32, mx.bool_])
def test_q4_non_float_queries(dtype):
    expect_invalid("queries", q4, mx.zeros((1, 4, 2, D), dtype=dtype))


def test_q4_queries_not_mx():
    expect_invalid("queries", q4, np.zeros((1, 4, 2, D), dtype=np.float32))
    expect_invalid("queries", q4, mx.zeros((4, 2, D)))


def test_q4_float_packed():
    p, s, b = triple()
    expect_invalid("keys", q4, keys=(p.astype(mx.float32), s, b))
    expect_invalid("values", q4, values=(p.astype(mx.float16), s, b))


def test_q4_triple_structure():
    p, s, _b = triple()
    expect_invalid("keys", q4, keys=(p, s))
    expect_invalid("keys", q4, keys=p)
    expect_invalid("values", q4, values=(p, s, np.zeros((1, 2, 8, 1))))


def test_q4_scales_wrong():
    p, s, b = triple()
    expect_invalid("keys", q4, keys=(p, mx.ones((1, 2, 8, 2), dtype=mx.float16), b))
    expect_invalid("keys", q4, keys=(p, s, mx.zeros((1, 2, 7, 1), dtype=mx.float16)))
    expect_invalid("keys", q4, keys=(p, s.astype(mx.int32), b.astype(mx.int32)))
    expect_invalid("keys", q4, keys=(p, s, b.astype(mx.float32)))
    # values' scales in another dtype than the keys'
    expect_invalid("values", q4, values=triple(dtype=mx.float32))


def test_q4_shapes_disagree():
    expect_invalid("values", q4, values=triple(T=9))
    expect_invalid("values", q4, values=triple(H=4))
    expect_invalid("keys", q4, keys=triple(B=2), values=triple(B=2))
    # Packed rows hold 128 dims; the queries have 64.
    expect_invalid("keys", q4, keys=triple(d=128), values=triple(d=128))
    # 4 query heads over 3 KV heads.
    expect_invalid("queries", q4, keys=triple(H=3), values=triple(H=3))


@pytest.mark.parametrize("group_size", [0, 8, 48, 256])
def test_q4_bad_group_size(group_size):
    expect_invalid("group_size", q4, group_size=group_size)


def test_q4_group_size_not_dividing_head_dim():
    q = mx.zeros((1, 2, 1, 80))
    expect_invalid("group_size", q4, q, triple(d=80, gs=16), triple(d=80, gs=16), group_size=64)


@pytest.mark.parametrize("bits", [1, 2, 3, 5, 16])
def test_q4_bad_bits(bits):
    expect_invalid("bits", q4, bits=bits)


def test_q4_head_dim_too_large():
    q = mx.zeros((1, 2, 1, 512))
    expect_invalid("queries", q4, q, triple(d=512), triple(d=512))


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf")])
def test_q4_bad_scale(scale):
    expect_invalid("scale", q4, scale=scale)


@pytest.mark.parametrize(
    "shape", [(1, 4, 2, 9), (2, 4, 2, 8), (3, 2, 8), (1, 1, 4, 2, 8), (8, 1)], ids=str
)
def test_q4_mask_wrong_shape(shape):
    expect_invalid("mask", q4, mask=mx.ones(shape, dtype=mx.bool_))


@pytest.mark.parametrize("dtype", [mx.int32, mx.uint8, mx.int64])
def test_q4_mask_wrong_dtype(dtype):
    expect_invalid("mask", q4, mask=mx.zeros((2, 8), dtype=dtype))


def test_q4_mask_bad_string_or_type():
    expect_invalid("mask", q4, mask="foo")
    expect_invalid("mask", q4, mask="Causal")
    expect_invalid("mask", q4, mask=np.ones((2, 8), dtype=bool))


def test_q4_causal_with_fewer_keys_than_queries():
    e = expect_invalid("mask", q4, mx.zeros((1, 4, 9, D)), mask="causal")
    assert "9" in str(e)


# --------------------------------------------------------------------- kv_write


def test_kv_write_sanity(arena, table):
    mx.eval(kvsnap.kv_write(arena, 1, kv(), kv(), table, [28]))


@pytest.mark.parametrize(
    "dtype", [mx.int32, mx.uint32, mx.float64 if hasattr(mx, "float64") else mx.int8]
)
def test_kv_write_non_float_keys(arena, table, dtype):
    expect_invalid("keys", kvsnap.kv_write, arena, 0, kv(dtype=dtype), kv(dtype=dtype), table, [0])


def test_kv_write_not_mx(arena, table):
    expect_invalid(
        "keys", kvsnap.kv_write, arena, 0, np.zeros((1, 2, 4, D), np.float32), kv(), table, [0]
    )
    expect_invalid("values", kvsnap.kv_write, arena, 0, kv(), [[0.0]], table, [0])


def test_kv_write_shapes(arena, table):
    expect_invalid("values", kvsnap.kv_write, arena, 0, kv(), kv(L=5), table, [0])
    expect_invalid("values", kvsnap.kv_write, arena, 0, kv(), kv(dtype=mx.float16), table, [0])
    expect_invalid("keys", kvsnap.kv_write, arena, 0, kv(d=128), kv(d=128), table, [0])
    expect_invalid("keys", kvsnap.kv_write, arena, 0, kv(H=4), kv(H=4), table, [0])
    expect_invalid(
        "keys", kvsnap.kv_write, arena, 0, mx.zeros((2, 4, D)), mx.zeros((2, 4, D)), table, [0]
    )


def test_kv_write_offsets(arena, table):
    expect_invalid("offsets", kvsnap.kv_write, arena, 0, kv(), kv(), table, [-1])
    expect_invalid("offsets", kvsnap.kv_write, arena, 0, kv(), kv(), table, [0, 0])
    expect_invalid("offsets", kvsnap.kv_write, arena, 0, kv(), kv(), table, [[0]])
    expect_invalid("offsets", kvsnap.kv_write, arena, 0, kv(), kv(), table, [0.5])


@pytest.mark.parametrize("layer", [-1, 2, 1000])
def test_kv_write_layer_out_of_range(arena, table, layer):
    expect_invalid("layer", kvsnap.kv_write, arena, layer, kv(), kv(), table, [0])


def test_kv_write_beyond_block_table(arena, table):
    # 2 blocks of 16 hold 32 tokens: 4 tokens at offset 29 do not fit.
    expect_invalid("block_table", kvsnap.kv_write, arena, 0, kv(), kv(), table, [29])


def test_kv_write_block_table_use_after_free(arena, table):
    arena.decref(table[0][1])
    e = expect_invalid("block_table", kvsnap.kv_write, arena, 0, kv(), kv(), table, [20])
    assert str(table[0][1]) in str(e)
    # Positions before the free block also need every earlier block live.
    arena.decref(table[0][0])
    expect_invalid("block_table", kvsnap.kv_write, arena, 0, kv(), kv(), table, [0])


def test_kv_write_block_table_malformed(arena, table):
    expect_invalid("block_table", kvsnap.kv_write, arena, 0, kv(), kv(), [[-1, 0]], [0])
    expect_invalid("block_table", kvsnap.kv_write, arena, 0, kv(), kv(), [[10**6, 0]], [0])
    expect_invalid("block_table", kvsnap.kv_write, arena, 0, kv(), kv(), table[0], [0])
    expect_invalid("block_table", kvsnap.kv_write, arena, 0, kv(), kv(), [[0.0, 1.0]], [0])
    expect_invalid("block_table", kvsnap.kv_write, arena, 0, kv(B=2), kv(B=2), table, [0, 0])
    expect_invalid("block_table", kvsnap.kv_write, arena, 0, kv(), kv(), [[2**40, 0]], [0])


# -------------------------------------------------------------------- attention


def paged(arena, table, queries=None, lengths=(20,), **kwargs):
    queries = mx.zeros((1, 4, 2, D)) if queries is None else queries
    kwargs.setdefault("scale", 0.125)
    return kvsnap.attention(arena, 1, queries, table, list(lengths), **kwargs)


def test_attention_sanity(arena, table):
    mx.eval(paged(arena, table, window=3))


@pytest.mark.parametrize("dtype", [mx.int32, mx.uint16, mx.bool_])
def test_attention_non_float_queries(arena, table, dtype):
    expect_invalid("queries", paged, arena, table, mx.zeros((1, 4, 2, D), dtype=dtype))


def test_attention_queries_shape(arena, table):
    expect_invalid("queries", paged, arena, table, mx.zeros((1, 4, 2, 128)))
    expect_invalid("queries", paged, arena, table, mx.zeros((1, 3, 2, D)))
    expect_invalid("queries", paged, arena, table, mx.zeros((4, 2, D)))
    expect_invalid("queries", paged, arena, table, np.zeros((1, 4, 2, D), np.float32))


def test_attention_lengths(arena, table):
    # 20 tokens fit, 33 do not fit in 2 blocks of 16.
    expect_invalid("block_table", paged, arena, table, lengths=[33])
    expect_invalid("lengths", paged, arena, table, lengths=[20, 20])
    expect_invalid("lengths", paged, arena, table, lengths=[-1], causal=False)
    # causal: 2 queries need at least 2 tokens
    expect_invalid("lengths", paged, arena, table, lengths=[1])
    expect_invalid("lengths", paged, arena, table, lengths=[2.5])


def test_attention_block_table_use_after_free(arena, table):
    arena.decref(table[0][1])
    # The freed block holds tokens 16..31: reading 20 tokens uses it, 16 do not.
    expect_invalid("block_table", paged, arena, table, lengths=[20])
    mx.eval(paged(arena, table, lengths=[16]))
    arena.decref(table[0][0])
    expect_invalid("block_table", paged, arena, table, lengths=[16])


def test_attention_block_table_malformed(arena, table):
    expect_invalid("block_table", paged, arena, table[0])
    expect_invalid("block_table", paged, arena, [[5000, 0]])
    expect_invalid("block_table", paged, arena, table * 2)


@pytest.mark.parametrize("layer", [-1, 2])
def test_attention_layer_out_of_range(arena, table, layer):
    expect_invalid(
        "layer", kvsnap.attention, arena, layer, mx.zeros((1, 4, 1, D)), table, [5], scale=0.1
    )


def test_window_without_causal_is_refused(arena, table):
    expect_invalid("window", paged, arena, table, window=3, causal=False)


@pytest.mark.parametrize("window", [0, -3, 2.5, "8"])
def test_attention_bad_window(arena, table, window):
    expect_invalid("window", paged, arena, table, window=window)


@pytest.mark.parametrize("scale", [0.0, -0.5, float("nan")])
def test_attention_bad_scale(arena, table, scale):
    expect_invalid("scale", paged, arena, table, scale=scale)


# ------------------------------------------------------------------ GPU streams


@pytest.mark.skipif(
    kvsnap._ext.metal_kernels(), reason="assumes a build without GPU kernels; this build has the Metal kernels"
)
def test_gpu_stream_is_refused(arena, table):
    # A build without GPU kernels: asking for a GPU stream or device is refused
    # at call time with kvsnap's own error, before MLX is asked for a stream.
    calls = [
        lambda s: q4(stream=s),
        lambda s: kvsnap.kv_write(arena, 0, kv(), kv(), table, [0], stream=s),
        lambda s: paged(arena, table, stream=s),
    ]
    for device in (mx.gpu, mx.Device(mx.gpu)):
        for call in calls:
            with pytest.raises(DeviceUnsupportedError, match="GPU"):
                call(device)
    # The CPU stream, asked for explicitly, works.
    mx.eval(q4(stream=mx.cpu), paged(arena, table, stream=mx.cpu))


# ------------------------------------------------------- degenerate shapes
# These run in a child process: a crash there (e.g. SIGFPE from a division
# by zero in the kernel) fails the test instead of killing the test run.


def run_child(code: str) -> subprocess.CompletedProcess:
    code = "import mlx.core as mx, numpy as np, kvsnap\n" + textwrap.dedent(code)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )


def crash_message(r: subprocess.CompletedProcess) -> str:
    if r.returncode < 0:
        return f"the process was killed by signal {-r.returncode}\n{r.stderr[-2000:]}"
    return f"exit code {r.returncode}\n{r.stdout[-500:]}\n{r.stderr[-2000:]}"


def zero_size_code(call: str) -> str:
    return f"""
    D = 64
    def trip(B, H, T):
        return (mx.zeros((B, H, T, 8), dtype=mx.uint32), mx.ones((B, H, T, 1), dtype=mx.float16),
                mx.zeros((B, H, T, 1), dtype=mx.float16))
    arena = kvsnap.Arena(1, 2, D, budget_bytes=1 << 22)
    slot = arena.alloc()
    out = {call}
    mx.eval(out)
    assert out.shape == expected, out.shape
    print("OK")
    """


@pytest.mark.parametrize(
    "call,expected",
    [
        (
            "kvsnap.q4_attention(mx.zeros((1, 2, 0, D)), trip(1, 2, 4), trip(1, 2, 4), scale=1.0, mask='causal')",
            (1, 2, 0, 64),
        ),
        (
            "kvsnap.q4_attention(mx.zeros((1, 2, 0, D)), trip(1, 2, 4), trip(1, 2, 4), scale=1.0)",
            (1, 2, 0, 64),
        ),
        (
            "kvsnap.q4_attention(mx.zeros((0, 2, 1, D)), trip(0, 2, 4), trip(0, 2, 4), scale=1.0)",
            (0, 2, 1, 64),
        ),
        (
            "kvsnap.attention(arena, 0, mx.zeros((1, 2, 0, D)), [[slot]], [5], scale=1.0)",
            (1, 2, 0, 64),
        ),
        (
            (
                "kvsnap.attention(arena, 0, mx.zeros((0, 2, 1, D)), np.zeros((0, 1), np.int32), "
                "np.zeros(0, np.int32), scale=1.0)"
            ),
            (0, 2, 1, 64),
        ),
    ],
    ids=["q4-L0-causal", "q4-L0", "q4-B0", "paged-L0", "paged-B0"],
)
def test_empty_queries_give_empty_output(call, expected):
    # An empty chunk of queries (e.g. a request whose every token is already
    # cached) is a valid call with an empty answer.
    r = run_child(f"expected = {expected}\n" + textwrap.dedent(zero_size_code(call)))
    assert r.returncode == 0 and "OK" in r.stdout, crash_message(r)


def test_keys_with_zero_kv_heads_are_refused():
    r = run_child(
        """
        from kvsnap.errors import InvalidArgumentError
        kv = (mx.zeros((1, 0, 4, 8), dtype=mx.uint32), mx.ones((1, 0, 4, 1)), mx.zeros((1, 0, 4, 1)))
        try:
            mx.eval(kvsnap.q4_attention(mx.zeros((1, 2, 1, 64)), kv, kv, scale=1.0))
        except InvalidArgumentError as e:
            print("REFUSED", e.argument)
        """
    )
    assert r.returncode == 0 and "REFUSED" in r.stdout, crash_message(r)
    assert r.stdout.split()[-1] in ("keys", "queries")
