"""Shared fixtures and the float64 numpy reference the kernels are checked against.

The reference is deliberately naive: unpack the uint32 words, dequantize in
float64, then softmax(scale * q k^T + mask) v with the KV heads repeated for
GQA. Nothing here calls kvsnap, so a kernel bug cannot hide in the reference.
"""

from __future__ import annotations

import sys
import zlib

import kvsnap
import mlx.core as mx
import numpy as np
import pytest
from kvsnap import cli


def pytest_configure(config):
    # The real-model tests run float32 models on the CPU; with MLX's bundled
    # reference BLAS a 1K-token forward pass of SmolLM2 takes minutes, with
    # Debian's OpenBLAS seconds. Run the session with it preloaded, as the
    # kvsnap command does (KVSNAP_NO_PRELOAD=1 turns this off). Output
    # capturing is stopped first so the new process writes to the terminal.
    # When no re-exec happens after all (KVSNAP_NO_PRELOAD, or the loader
    # refused the library), capturing is started again: pytest's own hooks
    # read the capture and fail with an INTERNALERROR if it is gone.
    capture = config.pluginmanager.getplugin("capturemanager")
    stopped = capture is not None and cli.openblas_path() and not cli.openblas_loaded(cli.openblas_path())
    if stopped:
        capture.stop_global_capturing()
    cli.reexec_with_openblas(["-m", "pytest", *sys.argv[1:]])
    if stopped:
        capture.start_global_capturing()

MX_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


@pytest.fixture
def poison():
    """New arena slots and kernel outputs start as 0xFF bytes (NaN), so any
    element a kernel forgets to write shows up."""
    kvsnap._ext.set_poison(True)
    yield
    kvsnap._ext.set_poison(False)


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A numpy RNG seeded from the test id: every parametrization draws its own
    data, and a failure reproduces on rerun."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


# ---------------------------------------------------------------- conversions


def to_mx(x: np.ndarray, dtype=mx.float32) -> mx.array:
    return mx.array(np.asarray(x, dtype=np.float32)).astype(dtype)


def to_f64(x: mx.array) -> np.ndarray:
    """The exact values of a float mx array (any float dtype) in float64."""
    return np.array(x.astype(mx.float32)).astype(np.float64)


def f16_bits_to_f64(bits: np.ndarray) -> np.ndarray:
    """uint16 float16 bit patterns (as read_block returns them) to float64."""
    return np.asarray(bits, dtype=np.uint16).view(np.float16).astype(np.float64)


# ------------------------------------------------------------ quantization


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """uint32 words [..., W] -> integers [..., W * 32 / bits]: each row is one
    little-endian bit stream, element k at bits [k * bits, (k + 1) * bits)
    (at 6 bits an element may straddle two words)."""
    packed = np.ascontiguousarray(packed, dtype="<u4")
    stream = np.unpackbits(packed.view(np.uint8), axis=-1, bitorder="little")
    fields = stream.reshape(*packed.shape[:-1], packed.shape[-1] * 32 // bits, bits).astype(np.int64)
    return (fields << np.arange(bits, dtype=np.int64)).sum(axis=-1)


def dequantize(packed, scales, biases, bits: int, group_size: int) -> np.ndarray:
    """float64 scale_g * q + bias_g. scales/biases: float arrays of values."""
    q = unpack(packed, bits).astype(np.float64)
    s = np.repeat(np.asarray(scales, dtype=np.float64), group_size, axis=-1)
    b = np.repeat(np.asarray(biases, dtype=np.float64), group_size, axis=-1)
    assert s.shape == q.shape, (s.shape, q.shape)
    return s * q + b


def random_quantized(
    rng: np.random.Generator,
    shape: tuple[int, int, int, int],
    bits: int,
    group_size: int,
    scale_dtype=mx.float16,
) -> tuple[tuple[mx.array, mx.array, mx.array], np.ndarray]:
    """A random quantized triple [B, H, T, ...] built directly (no quantizer):
    random words, scales of magnitude 0.05..0.2 (per 4-bit step; smaller for 8
    bits so values stay in the same range) with random sign, biases in [-1, 1].

    Returns the mx triple and its float64 dequantized values [B, H, T, D].
    """
    B, H, T, D = shape
    words = rng.integers(0, 2**32, size=(B, H, T, D * bits // 32), dtype=np.uint64).astype(
        np.uint32
    )
    step = 15 / ((1 << bits) - 1)
    n_groups = D // group_size
    mag = rng.uniform(0.05, 0.2, size=(B, H, T, n_groups)) * step
    scales = mag * rng.choice([-1.0, 1.0], size=mag.shape)
    biases = rng.uniform(-1.0, 1.0, size=(B, H, T, n_groups))
    triple = (mx.array(words), to_mx(scales, scale_dtype), to_mx(biases, scale_dtype))
    values = dequantize(words, to_f64(triple[1]), to_f64(triple[2]), bits, group_size)
    return triple, values


# ----------------------------------------------------------------- attention


def reference_attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    scale: float,
    *,
    lengths=None,
    causal: bool = False,
    window: int | None = None,
    mask=None,
) -> np.ndarray:
    """float64 softmax(scale * q k^T + mask) v.

    q [B, Hq, L, D]; k, v [B, Hkv, T, D] (Hq a multiple of Hkv; KV head h
    serves query heads h * G .. h * G + G - 1). Sequence b uses its first
    lengths[b] keys (default T). causal: query l sits at position
    lengths[b] - L + l and sees keys <= its position; window W (with causal):
    keys in (p - W, p]. mask: bool (True = attend) or additive, broadcastable
    to [B, Hq, L, T]. A row that sees no key is all zeros.
    """
    q = np.asarray(q, dtype=np.float64)
    # Poison (NaN) in the inputs means the test read memory nobody wrote.
    assert np.all(np.isfinite(q)) and np.all(np.isfinite(k)) and np.all(np.isfinite(v))
    B, Hq, L, _D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    G = Hq // Hkv
    kf = np.repeat(np.asarray(k, dtype=np.float64), G, axis=1)
    vf = np.repeat(np.asarray(v, dtype=np.float64), G, axis=1)
    scores = scale * np.einsum("bhld,bhtd->bhlt", q, kf)

    lengths = np.full(B, T) if lengths is None else np.asarray(lengths)
    t = np.arange(T)
    visible = np.ones((B, 1, L, T), dtype=bool)
    for b in range(B):
        n = int(lengths[b])
        visible[b, 0] &= t[None, :] < n
        if causal:
            pos = n - L + np.arange(L)
            visible[b, 0] &= t[None, :] <= pos[:, None]
            if window is not None:
                visible[b, 0] &= t[None, :] > pos[:, None] - window
    visible = np.broadcast_to(visible, scores.shape).copy()
    if mask is not None:
        mask = np.asarray(mask)
        if mask.dtype == bool:
            visible &= np.broadcast_to(mask, scores.shape)
        else:
            scores = scores + np.broadcast_to(mask.astype(np.float64), scores.shape)
            visible &= np.isfinite(scores)

    scores = np.where(visible, scores, -np.inf)
    row_max = scores.max(axis=-1, keepdims=True)
    any_visible = np.isfinite(row_max)
    p = np.where(visible, np.exp(scores - np.where(any_visible, row_max, 0.0)), 0.0)
    denom = p.sum(axis=-1, keepdims=True)
    out = np.einsum("bhlt,bhtd->bhld", p, vf) / np.where(any_visible, denom, 1.0)
    return np.where(any_visible, out, 0.0)


def rel_error(out: mx.array, ref: np.ndarray) -> float:
    """max |out - ref| / max(1, max |ref|); NaN anywhere (poison) is inf."""
    got = to_f64(out)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    if not np.all(np.isfinite(got)):
        return float("inf")
    return float(
        np.max(np.abs(got - ref), initial=0.0) / max(1.0, float(np.max(np.abs(ref), initial=0.0)))
    )


# Bounds on rel_error. float32: the kernel accumulates in float32 (measured
# errors are ~1e-6); an extra or a missing key among thousands, or one wrong
# group scale, moves the output by far more. f16 / bf16 outputs add their own
# rounding (unit roundoff 2^-11 = 4.9e-4 and 2^-8 = 3.9e-3).
TOL = {"float32": 1e-5, "float16": 1.2e-3, "bfloat16": 5e-3}


# ------------------------------------------------------------------- arena


def arena_kv(arena: kvsnap.Arena, layer: int, slots, n_tokens: int):
    """(keys, values) float64 [Hkv, n_tokens, D] of one sequence, read from the
    arena's own bytes through its list of slots."""
    bits, key_bits, gs = arena.bits, arena.key_bits, arena.group_size
    ks, vs = [], []
    for slot in slots:
        kp, ksc, kb, vp, vsc, vb = arena.read_block(slot, layer)
        ks.append(dequantize(kp, f16_bits_to_f64(ksc), f16_bits_to_f64(kb), key_bits, gs))
        vs.append(dequantize(vp, f16_bits_to_f64(vsc), f16_bits_to_f64(vb), bits, gs))
    k = np.concatenate(ks, axis=1)[:, :n_tokens]
    v = np.concatenate(vs, axis=1)[:, :n_tokens]
    return k, v


def arena_triples(arena: kvsnap.Arena, layer: int, tables, n_tokens: int):
    """Contiguous (packed, float16 scales, float16 biases) mx triples
    [B, Hkv, n_tokens, ...] copied from the arena bytes of each sequence."""
    parts = [[] for _ in range(6)]
    for slots in tables:
        blocks = [arena.read_block(s, layer) for s in slots]
        for i in range(6):
            parts[i].append(np.concatenate([blk[i] for blk in blocks], axis=1)[:, :n_tokens])
    arrays = []
    for i in range(6):
        x = np.stack(parts[i])
        arrays.append(mx.array(x) if i % 3 == 0 else mx.array(x.view(np.float16)))
    return tuple(arrays[:3]), tuple(arrays[3:])
