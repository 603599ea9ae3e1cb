"""The fused quantized attention kernel against a float64 numpy reference.

q4_attention runs on random quantized triples built directly (words, scales,
biases), so these tests do not depend on kv_write. The paged path reads blocks
written by kv_write; its reference is dequantized from the arena's own bytes
(read_block). Kernel outputs are poisoned (NaN) before every run, so a row the
kernel forgets to write fails the comparison.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import kvsnap
import mlx.core as mx
import numpy as np
import pytest
from conftest import (
    MX_DTYPES,
    arena_kv,
    arena_triples,
    dequantize,
    random_quantized,
    reference_attention,
    rel_error,
    to_f64,
    to_mx,
)
from kernel_isa import attention_tol, integer_dot
from kvsnap import _ext
from kvsnap.errors import InvalidArgumentError

pytestmark = pytest.mark.usefixtures("poison")


def random_queries(rng, shape, dtype="float32"):
    """Random queries in `dtype` and their exact (rounded) values in float64."""
    q = to_mx(rng.standard_normal(shape), MX_DTYPES[dtype])
    return q, to_f64(q)


def run_q4(
    rng, *, B, Hkv, G, L, T, D, bits=4, gs=64, qdtype="float32", sdtype="float16", mask=None
):
    """Random inputs -> (kvsnap output, float64 reference) for q4_attention."""
    keys, kf = random_quantized(rng, (B, Hkv, T, D), bits, gs, MX_DTYPES[sdtype])
    values, vf = random_quantized(rng, (B, Hkv, T, D), bits, gs, MX_DTYPES[sdtype])
    q, qf = random_queries(rng, (B, Hkv * G, L, D), qdtype)
    scale = 1.0 / math.sqrt(D)
    out = kvsnap.q4_attention(q, keys, values, scale=scale, mask=mask, group_size=gs, bits=bits)
    mx.eval(out)
    assert out.dtype == q.dtype and out.shape == q.shape
    if isinstance(mask, mx.array):
        ref_mask = np.array(mask) if mask.dtype == mx.bool_ else to_f64(mask)
        ref = reference_attention(qf, kf, vf, scale, mask=ref_mask)
    else:
        ref = reference_attention(qf, kf, vf, scale, causal=mask == "causal")
    return out, ref


# ------------------------------------------------------------ q4_attention


@pytest.mark.parametrize(
    "D,gs,bits",
    [
        (64, 64, 4),
        (64, 32, 8),
        (80, 16, 4),
        (80, 16, 8),
        (96, 32, 4),
        (96, 32, 8),
        (128, 32, 4),
        (128, 128, 4),
        (128, 64, 8),
        (256, 64, 4),
        (256, 128, 8),
    ],
)
def test_q4_head_dims_group_sizes_bits(rng, D, gs, bits):
    out, ref = run_q4(rng, B=2, Hkv=2, G=4, L=3, T=257, D=D, bits=bits, gs=gs, mask="causal")
    assert rel_error(out, ref) <= attention_tol("float32")


@pytest.mark.parametrize("qdtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("sdtype", ["float32", "float16", "bfloat16"])
def test_q4_query_and_scale_dtypes(rng, qdtype, sdtype):
    out, ref = run_q4(
        rng, B=2, Hkv=2, G=2, L=5, T=300, D=128, qdtype=qdtype, sdtype=sdtype, mask="causal"
    )
    assert rel_error(out, ref) <= attention_tol(qdtype)


@pytest.mark.parametrize("G", [1, 4, 8])
@pytest.mark.parametrize("T", [1, 255, 256, 257])
def test_q4_gqa_decode(rng, G, T):
    out, ref = run_q4(rng, B=2, Hkv=2, G=G, L=1, T=T, D=64, gs=32)
    assert rel_error(out, ref) <= attention_tol("float32")


@pytest.mark.parametrize(
    "G,L,mask", [(1, 1, None), (8, 1, None), (4, 64, "causal"), (1, 7, "causal")]
)
def test_q4_long_context(rng, G, L, mask):
    # 4097 keys: the kernel splits the context across tasks and merges them.
    out, ref = run_q4(rng, B=1, Hkv=2, G=G, L=L, T=4097, D=128, mask=mask)
    assert rel_error(out, ref) <= attention_tol("float32")


@pytest.mark.parametrize("L", [7, 64])
@pytest.mark.parametrize("T", [64, 257, 1000])
def test_q4_causal_chunks(rng, L, T):
    out, ref = run_q4(rng, B=2, Hkv=1, G=4, L=L, T=T, D=64, mask="causal")
    assert rel_error(out, ref) <= attention_tol("float32")


@pytest.mark.parametrize(
    "G,L", [(1, 3), (1, 4), (1, 5), (2, 4), (1, 9), (3, 3), (1, 31), (4, 8), (1, 33), (8, 5)]
)
def test_q4_row_counts_around_register_blocks(rng, G, L):
    # G * L query rows share one KV head: row counts just below, at and above
    # the kernel's blocks of 4, 8 and 32 rows, odd GQA ratios, odd key counts.
    out, ref = run_q4(rng, B=1, Hkv=2, G=G, L=L, T=97, D=64, gs=32, mask="causal")
    assert rel_error(out, ref) <= attention_tol("float32")


def test_q4_random_configurations(rng):
    # A seeded sweep over the combinations the parametrized tests leave out.
    formats = [(64, 64, 4), (64, 32, 8), (80, 16, 4), (96, 32, 8), (128, 128, 4), (256, 64, 4)]
    for _ in range(60):
        D, gs, bits = formats[rng.integers(len(formats))]
        B, Hkv, G = (
            int(rng.integers(1, 4)),
            int(rng.integers(1, 4)),
            int(rng.choice([1, 2, 3, 4, 8])),
        )
        L = int(rng.choice([1, 1, 2, 7, 16, 33]))
        T = int(rng.choice([1, 31, 32, 33, 255, 257, 700, 1500])) + L
        qdtype = str(rng.choice(["float32", "float32", "float16", "bfloat16"]))
        sdtype = str(rng.choice(["float32", "float16", "bfloat16"]))
        kind = rng.integers(4)
        if kind == 0:
            mask = None
        elif kind == 1:
            mask = "causal"
        elif kind == 2:
            mask = mx.array(rng.random((B, 1, L, T)) < 0.7)
        else:
            mask = to_mx(rng.normal(size=(L, T)))
        out, ref = run_q4(
            rng,
            B=B,
            Hkv=Hkv,
            G=G,
            L=L,
            T=T,
            D=D,
            bits=bits,
            gs=gs,
            qdtype=qdtype,
            sdtype=sdtype,
            mask=mask,
        )
        config = f"{B=} {Hkv=} {G=} {L=} {T=} {D=} {gs=} {bits=} {qdtype=} {sdtype=} {kind=}"
        assert rel_error(out, ref) <= attention_tol(qdtype), config


def test_q4_non_causal_prefill(rng):
    # Without a mask every query sees every key, whatever L and T.
    out, ref = run_q4(rng, B=1, Hkv=2, G=2, L=40, T=33, D=64)
    assert rel_error(out, ref) <= attention_tol("float32")


MASK_SHAPES = [
    lambda B, H, L, T: (B, H, L, T),
    lambda B, H, L, T: (L, T),
    lambda B, H, L, T: (B, 1, 1, T),
    lambda B, H, L, T: (T,),
    lambda B, H, L, T: (1, H, L, 1),
]


@pytest.mark.parametrize("shape_fn", MASK_SHAPES, ids=["full", "LT", "B11T", "T", "1HL1"])
def test_q4_bool_mask(rng, shape_fn):
    B, Hkv, G, L, T = 2, 2, 2, 6, 70
    shape = shape_fn(B, Hkv * G, L, T)
    mask = mx.array(rng.random(shape) < 0.6)
    out, ref = run_q4(rng, B=B, Hkv=Hkv, G=G, L=L, T=T, D=64, mask=mask)
    assert rel_error(out, ref) <= attention_tol("float32")


@pytest.mark.parametrize("mdtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("shape_fn", MASK_SHAPES[:3], ids=["full", "LT", "B11T"])
def test_q4_additive_mask(rng, mdtype, shape_fn):
    B, Hkv, G, L, T = 2, 2, 2, 5, 90
    shape = shape_fn(B, Hkv * G, L, T)
    add = rng.normal(0.0, 2.0, size=shape)
    add[rng.random(shape) < 0.2] = -np.inf
    mask = to_mx(add, MX_DTYPES[mdtype])
    out, ref = run_q4(rng, B=B, Hkv=Hkv, G=G, L=L, T=T, D=64, mask=mask)
    assert rel_error(out, ref) <= attention_tol("float32")


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_q4_mask_views(rng, kind):
    # Masks that are views: transposed (last axis strided) and sliced.
    B, Hkv, G, L, T = 2, 1, 2, 6, 70
    if kind == "bool":
        mask = mx.swapaxes(mx.array(rng.random((B, 1, T, L)) < 0.6), 2, 3)
    else:
        mask = to_mx(rng.normal(0.0, 3.0, size=(B, 2, L + 3, T + 5)))[:, :, 2 : 2 + L, 5:]
    out, ref = run_q4(rng, B=B, Hkv=Hkv, G=G, L=L, T=T, D=64, mask=mask)
    assert rel_error(out, ref) <= attention_tol("float32")


@pytest.mark.parametrize("T", [50, 4097])
def test_q4_fully_masked_rows_are_zero(rng, T):
    B, Hkv, G, L = 1, 2, 2, 4
    keep = rng.random((B, Hkv * G, L, T)) < 0.5
    keep[0, 1, 2] = False  # this row sees no key at all
    keep[0, 3, :] = False  # nor do all rows of this head
    out, ref = run_q4(rng, B=B, Hkv=Hkv, G=G, L=L, T=T, D=64, mask=mx.array(keep))
    got = np.array(out)
    assert np.all(got[0, 1, 2] == 0.0) and np.all(got[0, 3] == 0.0)
    assert rel_error(out, ref) <= attention_tol("float32")

    additive = np.where(keep, 0.0, -np.inf).astype(np.float32)
    out2, ref2 = run_q4(rng, B=B, Hkv=Hkv, G=G, L=L, T=T, D=64, mask=mx.array(additive))
    assert np.all(np.array(out2)[0, 3] == 0.0)
    assert rel_error(out2, ref2) <= attention_tol("float32")


def test_q4_single_visible_key_returns_its_value(rng):
    # With one visible key the softmax weight is exactly 1: out == that value.
    B, Hkv, L, T, D = 1, 1, 3, 40, 64
    keys, _ = random_quantized(rng, (B, Hkv, T, D), 4, 64)
    values, vf = random_quantized(rng, (B, Hkv, T, D), 4, 64)
    keep = np.zeros((L, T), dtype=bool)
    picks = [0, 17, T - 1]
    keep[np.arange(L), picks] = True
    q, _ = random_queries(rng, (B, Hkv, L, D))
    out = kvsnap.q4_attention(q, keys, values, scale=0.125, mask=mx.array(keep))
    expected = vf[0, 0, picks]
    np.testing.assert_allclose(np.array(out)[0, 0], expected, rtol=1e-6, atol=1e-6)


def test_q4_large_scores_are_stable(rng):
    # Scores in the thousands: the softmax must subtract the running max.
    keys, kf = random_quantized(rng, (1, 1, 600, 64), 4, 64)
    values, vf = random_quantized(rng, (1, 1, 600, 64), 4, 64)
    q, qf = random_queries(rng, (1, 4, 2, 64))
    out = kvsnap.q4_attention(q, keys, values, scale=50.0, mask="causal")
    ref = reference_attention(qf, kf, vf, 50.0, causal=True)
    assert rel_error(out, ref) <= attention_tol("float32")


@pytest.mark.parametrize("gs", [32, 64, 128])
def test_q4_extreme_codes_fill_the_integer_sums_exactly(rng, gs):
    # Every 4-bit code 15 and every query element equal (int8 127): the
    # integer kernels' int16 runs (avx2-int: 8 vpmaddubsw pair sums of up to
    # 2 * 15 * 127 each) sit at their largest, 30480 of 32767. An overflow
    # there would be off by ~65536 steps.
    B, Hkv, G, L, T, D = 1, 2, 4, 2, 300, 128
    keys, _ = random_quantized(rng, (B, Hkv, T, D), 4, gs)
    values, _ = random_quantized(rng, (B, Hkv, T, D), 4, gs)
    keys = (mx.full(keys[0].shape, 0xFFFFFFFF, dtype=mx.uint32), *keys[1:])
    values = (mx.full(values[0].shape, 0xFFFFFFFF, dtype=mx.uint32), *values[1:])
    kf = dequantize(np.array(keys[0]), to_f64(keys[1]), to_f64(keys[2]), 4, gs)
    vf = dequantize(np.array(values[0]), to_f64(values[1]), to_f64(values[2]), 4, gs)
    q = mx.full((B, Hkv * G, L, D), 0.3)
    out = kvsnap.q4_attention(q, keys, values, scale=D**-0.5, mask="causal", group_size=gs)
    ref = reference_attention(to_f64(q), kf, vf, D**-0.5, causal=True)
    assert rel_error(out, ref) <= attention_tol("float32")


def test_q4_strided_inputs(rng):
    # Views, not copies: a slice along T, a [B, T, H, ...] buffer seen as
    # [B, H, T, ...], and a last axis that is not contiguous.
    B, Hkv, G, L, T, D, gs = 2, 2, 2, 3, 100, 64, 32
    (kp, ks, kb), kf = random_quantized(rng, (B, Hkv, T + 9, D), 4, gs)
    keys = (kp[:, :, 4 : 4 + T], ks[:, :, 4 : 4 + T], kb[:, :, 4 : 4 + T])
    kf = kf[:, :, 4 : 4 + T]
    (vp, vs, vb), vf = random_quantized(rng, (B, T, Hkv, D), 4, gs)
    values = (
        mx.swapaxes(vp, 1, 2),
        mx.swapaxes(vs, 1, 2),
        mx.swapaxes(mx.array(np.ascontiguousarray(np.array(vb).transpose(0, 2, 3, 1))), 2, 3),
    )
    vf = np.swapaxes(vf, 1, 2)
    q, qf = random_queries(rng, (B, Hkv * G, L, D))
    q = mx.swapaxes(mx.swapaxes(q, 1, 2), 1, 2)
    scale = 1.0 / math.sqrt(D)
    out = kvsnap.q4_attention(q, keys, values, scale=scale, mask="causal", group_size=gs)
    ref = reference_attention(qf, kf, vf, scale, causal=True)
    assert rel_error(out, ref) <= attention_tol("float32")


def test_q4_matches_mlx_quantized_matmul(rng):
    # Independent of the numpy reference: MLX's own quantized_matmul on the
    # same triples, softmax in float32.
    B, H, L, T, D = 1, 2, 4, 130, 128
    keys, _ = random_quantized(rng, (B, H, T, D), 4, 64, mx.float32)
    values, _ = random_quantized(rng, (B, H, T, D), 4, 64, mx.float32)
    q, _ = random_queries(rng, (B, H, L, D))
    scale = 1.0 / math.sqrt(D)
    out = kvsnap.q4_attention(q, keys, values, scale=scale)
    scores = mx.quantized_matmul(q * scale, *keys, transpose=True, group_size=64, bits=4)
    expected = mx.quantized_matmul(
        mx.softmax(scores, axis=-1), *values, transpose=False, group_size=64, bits=4
    )
    tol = attention_tol() if integer_dot() else 1e-4
    np.testing.assert_allclose(np.array(out), np.array(expected), rtol=tol, atol=tol)


# ------------------------------------------------------------------ paged


class Paged:
    """An arena whose sequences were written by kv_write from random floats,
    through slots handed out in shuffled order; the reference K/V come from
    the arena's own bytes."""

    def __init__(self, rng, lengths, *, Hkv=2, D=64, bits=4, gs=64, bt=256, n_layers=2, layer=1, key_bits=None):
        self.arena = kvsnap.Arena(
            n_layers, Hkv, D, block_tokens=bt, bits=bits, group_size=gs, budget_bytes=1 << 28,
            key_bits=key_bits,
        )
        self.layer, self.lengths = layer, list(lengths)
        n_blocks = [max(1, -(-n // bt)) for n in lengths]
        slots = [self.arena.alloc() for _ in range(sum(n_blocks) + 3)]
        rng.shuffle(slots)
        width = max(n_blocks)
        self.table = np.full((len(lengths), width), -1, dtype=np.int32)
        self.slots = []
        tokens = []
        for b, (n, nb) in enumerate(zip(lengths, n_blocks)):
            own = slots[:nb]
            slots = slots[nb:]
            self.table[b, :nb] = own
            self.slots.append(own)
            if n:
                k = to_mx(rng.normal(0.0, 1.5, size=(1, Hkv, n, D)))
                v = to_mx(rng.normal(0.0, 1.0, size=(1, Hkv, n, D)))
                tokens.append(kvsnap.kv_write(self.arena, layer, k, v, self.table[b : b + 1], [0]))
        self.tokens = tokens
        mx.eval(tokens)
        T = max(lengths)
        self.kf = np.zeros((len(lengths), Hkv, T, D))
        self.vf = np.zeros((len(lengths), Hkv, T, D))
        for b, n in enumerate(lengths):
            k, v = arena_kv(self.arena, layer, self.slots[b], n)
            self.kf[b, :, :n], self.vf[b, :, :n] = k, v

    def run(self, q, qf, *, causal=True, window=None):
        scale = 1.0 / math.sqrt(q.shape[-1])
        out = kvsnap.attention(
            self.arena,
            self.layer,
            q,
            self.table,
            self.lengths,
            scale=scale,
            causal=causal,
            window=window,
            after=self.tokens,
        )
        mx.eval(out)
        assert out.dtype == q.dtype and out.shape == q.shape
        ref = reference_attention(
            qf, self.kf, self.vf, scale, lengths=self.lengths, causal=causal, window=window
        )
        return out, ref


RAGGED = [1, 255, 256, 257]


@pytest.mark.parametrize("G", [1, 4, 8])
@pytest.mark.parametrize(
    "D,gs,bits", [(64, 64, 4), (80, 16, 4), (96, 32, 8), (128, 128, 4), (256, 64, 8)]
)
def test_paged_decode_ragged(rng, G, D, gs, bits):
    paged = Paged(rng, RAGGED, Hkv=2, D=D, bits=bits, gs=gs)
    q, qf = random_queries(rng, (len(RAGGED), 2 * G, 1, D))
    out, ref = paged.run(q, qf)
    assert rel_error(out, ref) <= attention_tol("float32")


@pytest.mark.parametrize(
    "D,gs,bits,G,L,window",
    [(64, 64, 4, 3, 1, None), (64, 16, 4, 1, 9, 100), (96, 32, 8, 4, 1, None), (128, 128, 4, 2, 5, None),
     (256, 64, 8, 1, 1, 300)],
)
def test_paged_6bit_keys(rng, D, gs, bits, G, L, window):
    # 6-bit keys (quality="accurate"): codes straddle words; every kernel set
    # reads them (the integer sets through their float blocks).
    lengths = [L, 255, 257, 700]
    paged = Paged(rng, lengths, Hkv=2, D=D, bits=bits, gs=gs, key_bits=6)
    assert paged.arena.key_bits == 6
    q, qf = random_queries(rng, (len(lengths), 2 * G, L, D))
    out, ref = paged.run(q, qf, window=window)
    assert rel_error(out, ref) <= attention_tol("float32")


@pytest.mark.parametrize("L", [7, 64])
def test_paged_prefill_chunks_at_own_offsets(rng, L):
    lengths = [64, 300, 513, 257]
    paged = Paged(rng, lengths, Hkv=2, D=64, gs=32)
    q, qf = random_queries(rng, (len(lengths), 4, L, 64))
    out, ref = paged.run(q, qf)
    assert rel_error(out, ref) <= attention_tol("float32")


@pytest.mark.parametrize("qdtype", ["float16", "bfloat16"])
def test_paged_query_dtypes(rng, qdtype):
    lengths = [30, 257]
    paged = Paged(rng, lengths, Hkv=2, D=128, gs=64)
    q, qf = random_queries(rng, (2, 8, 7, 128), qdtype)
    out, ref = paged.run(q, qf)
    assert rel_error(out, ref) <= attention_tol(qdtype)


@pytest.mark.parametrize("window", [1, 37, 256, 600])
@pytest.mark.parametrize("L", [1, 7])
def test_paged_sliding_window(rng, window, L):
    # Lengths on both sides of the window (600 exceeds every length).
    lengths = [40, 300, 513]
    paged = Paged(rng, lengths, Hkv=1, D=64, gs=64)
    q, qf = random_queries(rng, (3, 4, L, 64))
    out, ref = paged.run(q, qf, window=window)
    assert rel_error(out, ref) <= attention_tol("float32")
    if window < max(lengths):
        # The window really cut keys off: the unwindowed answer differs.
        full = reference_attention(qf, paged.kf, paged.vf, 1 / 8, lengths=lengths, causal=True)
        assert np.max(np.abs(full - ref)) > 1e-2


def test_paged_non_causal_ragged(rng):
    # Without causal every query sees all lengths[b] keys; 0 keys -> zeros.
    lengths = [0, 5, 256, 300]
    paged = Paged(rng, lengths, Hkv=2, D=64)
    q, qf = random_queries(rng, (4, 4, 9, 64))
    out, ref = paged.run(q, qf, causal=False)
    assert np.all(np.array(out)[0] == 0.0)
    assert rel_error(out, ref) <= attention_tol("float32")


@pytest.mark.parametrize("G,L", [(8, 1), (1, 64)])
def test_paged_long_context(rng, G, L):
    lengths = [4097, 1000]
    paged = Paged(rng, lengths, Hkv=2, D=128, gs=64)
    q, qf = random_queries(rng, (2, 2 * G, L, 128))
    out, ref = paged.run(q, qf)
    assert rel_error(out, ref) <= attention_tol("float32")


def test_paged_random_configurations(rng):
    # A seeded sweep: ragged lengths around block boundaries, chunks at each
    # sequence's own offset, windows, GQA ratios, block sizes.
    formats = [(64, 64, 4), (64, 32, 8), (80, 16, 4), (96, 32, 4), (128, 64, 8)]
    for _ in range(30):
        D, gs, bits = formats[rng.integers(len(formats))]
        bt = int(rng.choice([16, 64, 256]))
        Hkv, G = int(rng.integers(1, 3)), int(rng.choice([1, 3, 4, 8]))
        L = int(rng.choice([1, 1, 5, 32]))
        lengths = [
            L + int(rng.choice([0, bt - 1 - L % bt, bt, 2 * bt + 1, rng.integers(600)]))
            for _ in range(rng.integers(1, 5))
        ]
        window = None if rng.random() < 0.5 else int(rng.integers(1, 400))
        paged = Paged(rng, lengths, Hkv=Hkv, D=D, bits=bits, gs=gs, bt=bt)
        q, qf = random_queries(rng, (len(lengths), Hkv * G, L, D))
        out, ref = paged.run(q, qf, window=window)
        config = f"{D=} {gs=} {bits=} {bt=} {Hkv=} {G=} {L=} {lengths=} {window=}"
        assert rel_error(out, ref) <= attention_tol("float32"), config


def test_paged_small_blocks_and_shared_prefix(rng):
    # 16-token blocks; sequence 1 shares sequence 0's first two blocks (a
    # common prefix) and continues in its own blocks.
    bt, D, Hkv = 16, 64, 2
    arena = kvsnap.Arena(1, Hkv, D, block_tokens=bt, budget_bytes=1 << 30)
    slots = [arena.alloc() for _ in range(12)]
    rng.shuffle(slots)
    t0 = np.array([slots[:5]], dtype=np.int32)
    prefix = 32
    k0 = to_mx(rng.normal(size=(1, Hkv, 70, D)))
    v0 = to_mx(rng.normal(size=(1, Hkv, 70, D)))
    tok0 = kvsnap.kv_write(arena, 0, k0, v0, t0, [0])
    for s in slots[:2]:
        arena.incref(s)
    t1 = np.array([slots[:2] + slots[5:9]], dtype=np.int32)
    k1 = to_mx(rng.normal(size=(1, Hkv, 50, D)))
    v1 = to_mx(rng.normal(size=(1, Hkv, 50, D)))
    tok1 = kvsnap.kv_write(arena, 0, k1, v1, t1, [prefix])
    lengths = [70, prefix + 50]
    table = np.concatenate([np.pad(t0, ((0, 0), (0, 1)), constant_values=-1), t1])
    q, qf = random_queries(rng, (2, 4, 3, D))
    out = kvsnap.attention(arena, 0, q, table, lengths, scale=0.125, after=[tok0, tok1])
    mx.eval(out)
    kf = np.zeros((2, Hkv, 82, D))
    vf = np.zeros((2, Hkv, 82, D))
    for b, n in enumerate(lengths):
        kf[b, :, :n], vf[b, :, :n] = arena_kv(arena, 0, [s for s in table[b] if s >= 0], n)
    # The shared prefix is the same bytes in both sequences.
    np.testing.assert_array_equal(kf[0, :, :prefix], kf[1, :, :prefix])
    ref = reference_attention(qf, kf, vf, 0.125, lengths=lengths, causal=True)
    assert rel_error(out, ref) <= attention_tol("float32")


@pytest.mark.parametrize("L,T", [(1, 257), (7, 4097), (64, 600)])
def test_paged_and_contiguous_agree_exactly(rng, L, T):
    # The same bytes through the block table and as contiguous triples: the
    # same kernel must give the same bits.
    paged = Paged(rng, [T, T], Hkv=2, D=128, gs=64)
    q, qf = random_queries(rng, (2, 8, L, 128))
    out, ref = paged.run(q, qf)
    keys, values = arena_triples(paged.arena, paged.layer, paged.slots, T)
    contiguous = kvsnap.q4_attention(q, keys, values, scale=1 / math.sqrt(128), mask="causal")
    np.testing.assert_array_equal(np.array(out), np.array(contiguous))
    assert rel_error(out, ref) <= attention_tol("float32")


@pytest.mark.parametrize("isa", [isa for isa in _ext.available_isas() if isa != _ext.isa()])
def test_every_kernel_set_passes_the_kernel_tests(isa):
    # This session uses one kernel set (the best this CPU runs, unless
    # KVSNAP_ISA says otherwise); each other one, chosen with KVSNAP_ISA at
    # import, runs this file and the kv_write tests again in a process of its own.
    here = os.path.dirname(__file__)
    env = dict(os.environ, KVSNAP_ISA=isa)
    check = subprocess.run(
        [sys.executable, "-c", "import kvsnap; print(kvsnap._ext.isa())"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.stdout.strip() == isa, check.stderr
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-k",
            "not every_kernel_set",
            os.path.join(here, "test_attention.py"),
            os.path.join(here, "test_kv_write.py"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-2000:]


def test_kernel_sets_are_chosen_by_name():
    # KVSNAP_ISA names a set at import; _ext.set_isa switches at run time; a
    # name this build or CPU cannot run is refused with the list of choices.
    available = _ext.available_isas()
    assert available[0] == "generic"
    default = _ext.isa()
    try:
        for isa in available:
            _ext.set_isa(isa)
            assert _ext.isa() == isa
    finally:
        _ext.set_isa(default)
    with pytest.raises(InvalidArgumentError, match="one of: generic"):
        _ext.set_isa("sse9")
    env = dict(os.environ, KVSNAP_ISA="sse9")
    r = subprocess.run(
        [sys.executable, "-c", "import kvsnap"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode != 0 and "KVSNAP_ISA=sse9" in r.stderr, r.stderr


def test_float_and_integer_kernel_sets_agree(rng):
    # The same call under every kernel set of this machine, against float64:
    # the float sets within float32 rounding, the integer sets within theirs.
    q, qf = random_queries(rng, (2, 8, 5, 128))
    keys, kf = random_quantized(rng, (2, 2, 700, 128), 4, 64, mx.float16)
    values, vf = random_quantized(rng, (2, 2, 700, 128), 4, 64, mx.float16)
    mask = to_mx(rng.normal(size=(5, 700)))
    ref = reference_attention(qf, kf, vf, 0.125, mask=to_f64(mask))
    default = _ext.isa()
    try:
        for isa in _ext.available_isas():
            _ext.set_isa(isa)
            out = kvsnap.q4_attention(q, keys, values, scale=0.125, mask=mask)
            mx.eval(out)
            assert rel_error(out, ref) <= attention_tol(), isa
    finally:
        _ext.set_isa(default)


# Integer kernel sets that round queries and weights alike: int8 of full range
# for every plane (avx2-int rounds 8-bit planes to 7 bits, so it joins only
# for 4-bit keys and values).
SAME_ROUNDING = [
    isa for isa in ("avx512-vnni", "avx2-vnni", "avx2-int") if isa in _ext.available_isas()
]


@pytest.mark.skipif(
    not {"avx512-vnni", "avx2-vnni"} <= set(_ext.available_isas()),
    reason="needs a CPU with both AVX-512 VNNI and AVX-VNNI",
)
@pytest.mark.parametrize("D,bits,same", [(64, 4, True), (32, 8, True), (128, 4, False), (64, 8, False)])
def test_avx512_vnni_runs_short_rows_on_256_bits(rng, D, bits, same):
    # Code rows of at most 32 bytes (head_dim 64 at 4 bits) fill half of a
    # 512-bit vector: where the CPU has AVX-VNNI too, "avx512-vnni" runs them
    # with the "avx2-vnni" kernels (the same bits), and longer rows with its
    # own 512-bit kernels (other code: float sums in another order).
    keys, _ = random_quantized(rng, (1, 2, 200, D), bits, 32, mx.float16)
    values, _ = random_quantized(rng, (1, 2, 200, D), bits, 32, mx.float16)
    q, _ = random_queries(rng, (1, 8, 3, D))
    before = _ext.isa()
    outs = []
    try:
        for isa in ("avx512-vnni", "avx2-vnni"):
            _ext.set_isa(isa)
            out = kvsnap.q4_attention(q, keys, values, scale=D**-0.5, mask="causal", group_size=32, bits=bits)
            outs.append(np.array(out))
    finally:
        _ext.set_isa(before)
    assert np.array_equal(outs[0], outs[1]) == same


AGREE_FORMATS = [  # D, gs, bits, G (query heads per KV head), L (query positions)
    (64, 64, 4, 3, 1),
    (64, 32, 4, 1, 1),
    (80, 16, 4, 4, 3),
    (96, 32, 8, 2, 1),
    (128, 32, 4, 4, 1),
    (128, 64, 4, 4, 5),
    (128, 64, 8, 7, 1),
    (256, 32, 4, 2, 2),
]


@pytest.mark.parametrize(
    "other,D,gs,bits,G,L",
    [
        (other, *fmt)
        for other in SAME_ROUNDING[1:]
        for fmt in AGREE_FORMATS
        if not (fmt[2] == 8 and other == "avx2-int")
    ],
)
def test_integer_sets_agree_with_each_other(rng, other, D, gs, bits, G, L):
    # The 512-bit and 256-bit integer kernels are separate code (transposes,
    # interleaves, lane layouts) for the same integer sums: where they round
    # alike their outputs differ only by float32 summation order, ~1e-6 of
    # the largest output, far below the 5e-2 both keep to float64. A slip in
    # either (a lane with another group's weights, a missed block) shows here.
    first = SAME_ROUNDING[0]
    B, Hkv, T = 1, 2, 300
    keys, _ = random_quantized(rng, (B, Hkv, T, D), bits, gs, mx.float16)
    values, _ = random_quantized(rng, (B, Hkv, T, D), bits, gs, mx.float16)
    q, _ = random_queries(rng, (B, Hkv * G, L, D))
    before = _ext.isa()
    outs = []
    try:
        for isa in (first, other):
            _ext.set_isa(isa)
            out = kvsnap.q4_attention(
                q, keys, values, scale=D**-0.5, mask="causal", group_size=gs, bits=bits
            )
            outs.append(np.array(out))
    finally:
        _ext.set_isa(before)
    peak = np.abs(outs[0]).max()
    assert np.isfinite(outs[1]).all()
    assert np.abs(outs[1] - outs[0]).max() <= 1e-5 * peak, (first, other)


@pytest.mark.parametrize(
    "other,D,gs,bits,G,L",
    [
        (other, *fmt)
        for other in SAME_ROUNDING[1:]
        for fmt in [(64, 64, 4, 3, 1), (96, 32, 4, 2, 1), (128, 16, 4, 4, 5), (256, 64, 8, 1, 1)]
        if not (fmt[2] == 8 and other == "avx2-int")
    ],
)
def test_integer_sets_agree_on_6bit_keys(rng, other, D, gs, bits, G, L):
    # 6-bit keys are widened to bytes by separate code in each set (64, 32
    # or 16 codes at a time, head dims that end inside a block): the same
    # integer sums, so the same outputs but for float32 summation order.
    lengths = [L, 300]
    paged = Paged(rng, lengths, Hkv=2, D=D, bits=bits, gs=gs, key_bits=6)
    q, _ = random_queries(rng, (len(lengths), 2 * G, L, D))
    before = _ext.isa()
    outs = []
    try:
        for isa in (SAME_ROUNDING[0], other):
            _ext.set_isa(isa)
            out = kvsnap.attention(
                paged.arena, paged.layer, q, paged.table, lengths, scale=D**-0.5, after=paged.tokens
            )
            outs.append(np.array(out))
    finally:
        _ext.set_isa(before)
    peak = np.abs(outs[0]).max()
    assert np.isfinite(outs[1]).all()
    assert np.abs(outs[1] - outs[0]).max() <= 1e-5 * peak, (SAME_ROUNDING[0], other)


def test_denormal_queries_attend_uniformly(rng):
    # Queries of denormal size score every key ~0: the output is the mean of
    # the visible values, finite. (The integer sets' int8 step of such a group,
    # QMAX / amax, overflows to inf; they count the group as 0 explicitly.)
    T, D = 70, 64
    keys, _ = random_quantized(rng, (1, 2, T, D), 4, 64, mx.float16)
    values, vf = random_quantized(rng, (1, 2, T, D), 4, 64, mx.float16)
    q = mx.full((1, 4, 1, D), 1e-39, dtype=mx.float32)
    out = np.array(kvsnap.q4_attention(q, keys, values, scale=0.125))
    want = np.repeat(vf.mean(axis=2, keepdims=True), 2, axis=1)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, want, atol=0.05 * np.abs(want).max())
