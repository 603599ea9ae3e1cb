"""Smoothed keys (kvsnap.offsets): removing the calibrated key offsets and
balancing the key channels leaves attention unchanged, the kernels apply the
correction, snapshots record the offsets and refuse others."""

from __future__ import annotations

import math

import kvsnap
import mlx.core as mx
import numpy as np
import pytest
from kernel_isa import float_kernels  # noqa: F401 (fixture)
from kvsnap import cache as kc
from kvsnap import offsets as ko
from kvsnap import store as st
from kvsnap.errors import FormatMismatchError, InvalidArgumentError
from mlx_lm.models.cache import make_prompt_cache
from small_models import prompt, small_model

ARCHS = ["llama", "qwen2", "qwen3", "gemma3"]


def held_layers(model) -> list[int]:
    return [i for i, (k, _) in enumerate(kc.layer_kinds(model)) if k != "foreign"]


@pytest.fixture(scope="module")
def llama():
    return small_model("llama")


def reference(q, k, v, scale, visible, additive=None):
    """softmax(scale q k^T + additive) v over the visible keys, float64."""
    s = scale * np.einsum("bhld,bhtd->bhlt", q, k)
    if additive is not None:
        s = s + additive
    s = np.where(visible, s, -np.inf)
    s = s - s.max(-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhlt,bhtd->bhld", p, v)


def visibility(T, L, window):
    pos = np.arange(T - L, T)[:, None]
    t = np.arange(T)[None, :]
    keep = t <= pos
    if window:
        keep &= t > pos - window
    return keep[None, None]


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
@pytest.mark.parametrize("T, L, window", [(300, 1, None), (300, 24, None), (90, 90, None), (300, 1, 48), (200, 16, 48)])
def test_offsets_leave_float_attention_unchanged(arch, T, L, window):
    """q . k == (q * d) . ((k - shift) / d) + correction: attention over the
    keys as kvsnap stores them (before quantizing), with the queries as it
    scales them and the correction it adds, equals attention over the original
    keys to float32 rounding (decode, prefill chunks, windows, GQA)."""
    model = small_model(arch)
    offsets, _ = ko.calibrate(model, kc._attention_modules(model), held_layers(model))
    assert offsets.mode == "pre+sink+balance"
    rng = np.random.default_rng(T + L)
    for layer in held_layers(model)[:2]:
        lo = offsets.layers[layer]
        hkv, D = lo.const.shape
        hq = hkv * 4
        # keys that carry the model's offsets, as real keys do
        pos = mx.arange(T)[None]
        k = mx.array(rng.standard_normal((1, hkv, T, D)).astype(np.float32)) + lo.shift(pos, T) * 3
        v = rng.standard_normal((1, hkv, T, D)).astype(np.float32)
        q = mx.array(rng.standard_normal((1, hq, L, D)).astype(np.float32))
        scale = 1 / math.sqrt(D)
        stored = kc.store_form(type("Seq", (), {"offsets": offsets.group([layer]), "rotate": False}), 0, k, mx.array(v), pos, T)[0]
        corr = lo.correction(q, [T], scale)
        qs = kc._scaled_queries(lo, q)
        def rep(x, g=hq // hkv):
            return np.repeat(np.array(x, dtype=np.float64), g, axis=1)

        vis = visibility(T, L, window)
        want = reference(np.array(q, np.float64), rep(k), rep(v), scale, vis)
        got = reference(np.array(qs, np.float64), rep(stored), rep(v), scale, vis, np.array(corr, np.float64))
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)
        # without the correction the attention is not the same: it carries weight
        wrong = reference(np.array(qs, np.float64), rep(stored), rep(v), scale, vis)
        assert np.abs(wrong - want).max() > 1e-3


@pytest.mark.parametrize("isa", kvsnap._ext.available_isas())
@pytest.mark.parametrize("L, window", [(1, None), (24, None), (24, 40)])
def test_kernel_score_bias_is_the_correction(llama, L, window, isa):
    """The score bias the kernel computes (each query row's coefficients
    dotted with the position table) is the correction as a float mask: the
    same attention over a real cache's blocks (rotated, balanced, GQA), for
    decode, a prefill chunk and a window, in every CPU kernel set; and the
    mask a GPU stream is given instead is the correction too."""

    before = kvsnap._ext.isa()
    kvsnap._ext.set_isa(isa)
    try:
        check_score_bias(llama, L, window)
    finally:
        kvsnap._ext.set_isa(before)


def check_score_bias(llama, L, window):
    from kvsnap import ops

    T = 150
    cache = kc.make_cache(llama, block_tokens=32)
    mx.eval(llama(prompt(T, seed=5)[None], cache=cache))  # the blocks written
    seq = cache.sequences[0]
    lo = seq.offsets.layers[0]
    hkv, D = lo.const.shape
    q = mx.array(np.random.default_rng(L).standard_normal((1, hkv * 4, L, D)).astype(np.float32))
    qk = kc.hadamard(kc._scaled_queries(lo, q))
    scale = 1 / math.sqrt(D)
    correction = lo.correction(q, [T], scale)
    bias = lo.kernel_bias(True, T)
    assert bias[0].shape == (hkv, 2 * ko.PAIRS + 1, D) and bias[1].shape[1:] == (2 * ko.PAIRS + 1, 32)
    assert bias[1].shape[0] * 32 >= T

    def attend(**extra):
        return kvsnap.attention(seq.arena, 0, qk, seq.table(), [T], scale=scale, window=window, **extra)

    with_bias, with_mask, without = attend(bias=bias), attend(mask=correction), attend()
    np.testing.assert_allclose(np.array(with_bias), np.array(with_mask), atol=1e-4, rtol=1e-4)
    same = mx.abs(with_bias - with_mask).max().item()
    assert mx.abs(with_bias - without).max().item() > max(1e-3, 20 * same)  # it carries weight
    gpu_mask = ops._bias_mask(qk, bias, T, scale, None)
    np.testing.assert_allclose(np.array(gpu_mask), np.array(correction), atol=1e-4, rtol=1e-4)
    cache.release()


def test_score_bias_bad_arguments(llama):
    """A score bias of the wrong shape or dtype is refused, naming it."""
    cache = kc.make_cache(llama, block_tokens=32)
    mx.eval(llama(prompt(40, seed=2)[None], cache=cache))
    seq = cache.sequences[0]
    w, table = seq.offsets.layers[0].kernel_bias(True, 40)
    q = mx.zeros((1, w.shape[0] * 4, 1, w.shape[2]))
    for bias, name in [((w[:, :, :8], table), "bias_w"), ((w, table[:1]), "bias_table"),
                       ((w.astype(mx.float16), table), "bias_w"), ((w,), "bias")]:
        with pytest.raises(InvalidArgumentError) as e:
            kvsnap.attention(seq.arena, 0, q, seq.table(), [40], scale=0.1, bias=bias)
        assert name in str(e.value)
    cache.release()


@pytest.mark.parametrize("arch", ARCHS)
def test_kernels_apply_the_correction(arch):
    """8-bit K/V through the fused kernel, with offsets: logits follow the
    float model as closely as without offsets (a missing or wrong correction
    would put them far off), for a prefill in chunks and decode steps."""
    model = small_model(arch)
    tokens = prompt(160, seed=3)
    want = model(tokens[None], cache=make_prompt_cache(model))
    errs = {}
    for offsets in (True, False):
        cache = kc.make_cache(model, bits=8, block_tokens=32, key_offsets=offsets)
        assert (cache.sequences[0].offsets is not None) == offsets
        outs = [model(tokens[None, i : i + 40], cache=cache) for i in range(0, 120, 40)]
        outs += [model(tokens[None, i : i + 1], cache=cache) for i in range(120, 160)]
        got = mx.concatenate(outs, axis=1)
        errs[offsets] = mx.abs(got - want).max().item()
        cache.release()
    scale = mx.abs(want).max().item()
    assert errs[True] < 0.05 * scale, errs
    assert errs[True] < 2 * errs[False] + 1e-3 * scale, errs


@pytest.mark.usefixtures("float_kernels")
def test_batched_decode_applies_the_correction(llama):
    """The batch path (kvsnap.batch) stores and attends with the offsets:
    each row of a batched decode equals that sequence decoded alone. On the
    float kernels: a batched row's matmuls round differently (README,
    "Batching and rounding"), and the integer kernels' int8 query rounding
    turns that 1e-6 into up to ~5e-3, with or without offsets."""
    from kvsnap.batch import batch_cache

    caches, lasts = [], []
    for n in (40, 75, 130):
        c = kc.make_cache(llama, block_tokens=32)
        lasts.append(llama(prompt(n, seed=n)[None], cache=c)[0, -1])
        caches.append(c)
    alone = [c.copy() for c in caches]
    batch = batch_cache(caches)
    nxt = mx.array([[int(mx.argmax(x).item())] for x in lasts])
    together = llama(nxt, cache=batch)[:, -1]
    for i, c in enumerate(alone):
        one = llama(nxt[i : i + 1], cache=c)[0, -1]
        np.testing.assert_allclose(np.array(together[i]), np.array(one), atol=1e-4, rtol=1e-4)


def forget(model):
    """Drop what this process remembers of the model's offsets."""
    ko._MEMO.clear()
    model.__dict__.pop("_kvsnap_offsets", None)


def test_calibration_is_cached_per_model(llama, tmp_path, monkeypatch):
    monkeypatch.setenv("KVSNAP_HOME", str(tmp_path))
    forget(llama)
    held = held_layers(llama)
    first = ko.for_model(llama, kc._attention_modules(llama), held)
    files = list((tmp_path / "offsets").glob("*.npz"))
    assert len(files) == 1
    forget(llama)
    again = ko.for_model(llama, kc._attention_modules(llama), held)
    assert again.digest == first.digest
    for a, b in zip(first.layers, again.layers):
        np.testing.assert_array_equal(np.array(a.w), np.array(b.w))
    # a damaged file is not trusted: calibrated again, same offsets
    files[0].write_bytes(b"garbage")
    forget(llama)
    assert ko.for_model(llama, kc._attention_modules(llama), held).digest == first.digest
    forget(llama)


def test_unknown_rope_falls_back_to_constant_offsets():
    """A layer whose rope is not a rotation kvsnap can read gets the constant
    (post-RoPE) offset only, and the format says so."""
    model = small_model("llama")
    for layer in model.layers:
        layer.self_attn.rope = lambda x, offset=0: x * 1.5  # not a rotation
    offsets, _ = ko.calibrate(model, kc._attention_modules(model), held_layers(model))
    assert offsets.mode.startswith("post")
    assert all(lo.m is None for lo in offsets.layers)


def test_snapshot_records_offsets_and_refuses_others(llama, tmp_path):
    tokens = prompt(100, seed=1).tolist()
    custom, _ = ko.calibrate(llama, kc._attention_modules(llama), held_layers(llama), pairs=2)
    cache = kc.make_cache(llama, block_tokens=32, key_offsets=custom)
    llama(mx.array(tokens)[None], cache=cache)
    with st.Store(tmp_path / "s") as store:
        store.save_agent("a", cache, tokens=tokens, model=llama)
        with pytest.raises(FormatMismatchError, match="key offsets"):
            store.load_agent("a", model=llama)
    kvsnap.save(cache, tmp_path / "a.safetensors", tokens=tokens, model=llama)
    with pytest.raises(FormatMismatchError, match="key offsets"):
        kvsnap.load(tmp_path / "a.safetensors", model=llama)
    # keys stored without offsets load into a cache without them
    plain = kc.make_cache(llama, block_tokens=32, key_offsets=False)
    llama(mx.array(tokens)[None], cache=plain)
    with st.Store(tmp_path / "s") as store:
        store.save_agent("b", plain, tokens=tokens, model=llama)
        back = store.load_agent("b", model=llama)
    assert back.sequences[0].offsets is None
    nxt = prompt(5, seed=9)[None]
    np.testing.assert_array_equal(np.array(llama(nxt, cache=back)), np.array(llama(nxt, cache=plain)))


def test_to_mlx_adds_the_offsets_back(llama):
    """Exported float K/V are the model's keys again (offsets added back,
    scaling undone): continuing from them follows the kvsnap cache."""
    cache = kc.make_cache(llama, bits=8, block_tokens=32)
    llama(prompt(90, seed=2)[None], cache=cache)
    theirs = kc.to_mlx(cache, quantized=False)
    x = prompt(4, seed=6)[None]
    a, b = llama(x, cache=cache), llama(x, cache=theirs)
    assert mx.abs(a - b).max().item() < 0.02 * mx.abs(b).max().item()


def test_bad_arguments():
    model = small_model("llama")
    with pytest.raises(InvalidArgumentError, match="key_offsets"):
        kc.make_cache(model, key_offsets="yes")
    with pytest.raises(InvalidArgumentError, match="quality"):
        kc.make_cache(model, quality="best")
    accurate = kc.make_cache(model, quality="accurate")
    assert (accurate.sequences[0].arena.key_bits, accurate.sequences[0].arena.bits) == (6, 4)
    assert kc.make_cache(model, quality="accurate", key_bits=8).sequences[0].arena.key_bits == 8


def stored_codes(seq, layer, keys, values, offsets, counts=None, python=False):
    """The arena bytes of the blocks sequence 0..B-1 write, through the
    kernel's stored form (kc.write_blocks) or kc.store_form then a plain write."""
    table = seq.table()
    if python:
        L = keys.shape[2]
        pos = mx.array(offsets, dtype=mx.int32)[:, None] + mx.arange(L, dtype=mx.int32)[None]
        k, v = kc.store_form(seq, layer, keys, values, pos, max(offsets) + L)
        mx.eval(ops_write(seq, layer, k, v, table, offsets, counts))
    else:
        mx.eval(kc.write_blocks(seq, layer, keys, values, table, offsets, counts=counts))
    return [np.array(x) for x in seq.arena.read_block(int(np.array(table)[0][0]), layer)]


def ops_write(seq, layer, k, v, table, offsets, counts):
    from kvsnap import ops

    return ops.kv_write(seq.arena, layer, k, v, table, offsets, counts=counts)


@pytest.mark.parametrize("rotate, key_offsets", [(True, True), (False, True), (True, False)])
def test_kernel_stored_form_is_store_form(llama, rotate, key_offsets):
    """kv_write computes the stored form itself (offsets removed, keys
    divided by the balance scale, rotated; values rotated): the codes it
    writes are those of writing kc.store_form's keys and values (all but
    rare rounding ties, each then one step off), at the positions given."""
    rng = np.random.default_rng(7)
    written = {}
    for python in (False, True):
        cache = kc.make_cache(llama, block_tokens=32, rotate=rotate, key_offsets=key_offsets)
        seq = cache.sequences[0]
        seq.reserve_all(64)
        lo = None if seq.offsets is None else seq.offsets.layers[0]
        hkv, D = seq.arena.n_kv_heads, seq.arena.head_dim
        k = mx.array(rng.standard_normal((1, hkv, 20, D)).astype(np.float32))
        if lo is not None:  # keys that carry the offsets, as real keys do
            k = k + 3 * lo.shift(mx.arange(5, 25)[None], 25)
        v = mx.array(np.random.default_rng(8).standard_normal((1, hkv, 20, D)).astype(np.float32))
        written[python] = stored_codes(seq, 0, k, v, [5], python=python)
        rng = np.random.default_rng(7)  # the same rows for both
        cache.release()
    for got, want in zip(written[False], written[True]):
        assert (got == want).mean() > 0.98
    # the form was applied: the plain rows give other codes
    assert (written[False][0] != stored_codes_plain(llama, k, v, rotate, key_offsets)[0]).mean() > 0.3


def stored_codes_plain(llama, k, v, rotate, key_offsets):
    cache = kc.make_cache(llama, block_tokens=32, rotate=rotate, key_offsets=key_offsets)
    seq = cache.sequences[0]
    seq.reserve_all(64)
    mx.eval(ops_write(seq, 0, k, v, seq.table(), [5], None))
    out = [np.array(x) for x in seq.arena.read_block(int(np.array(seq.table())[0][0]), 0)]
    cache.release()
    return out


def test_kernel_stored_form_alone_or_batched(llama):
    """A sequence's tokens get the same stored bits written alone or in a
    batch with another sequence at other positions (the shift is per token)."""
    rng = np.random.default_rng(3)
    cache = kc.make_cache(llama, block_tokens=32)
    seq = cache.sequences[0]
    arena = seq.arena
    hkv, D = arena.n_kv_heads, arena.head_dim
    k = mx.array(rng.standard_normal((2, hkv, 6, D)).astype(np.float32))
    v = mx.array(rng.standard_normal((2, hkv, 6, D)).astype(np.float32))
    slots = [arena.alloc() for _ in range(6)]
    mx.eval(kc.write_blocks(seq, 0, k[:1], v[:1], [slots[:2]], [9]))
    mx.eval(kc.write_blocks(seq, 0, k, v, [slots[2:4], slots[4:6]], [9, 30], counts=[6, 4]))
    for a, b in zip(arena.read_block(slots[0], 0), arena.read_block(slots[2], 0)):
        np.testing.assert_array_equal(np.array(a), np.array(b))
    for s in slots:
        arena.decref(s)
    cache.release()


@pytest.mark.parametrize("bad, name", [
    ({"key_matrix": mx.zeros((1, 64, 64))}, "key_matrix"),
    ({"value_matrix": mx.zeros((64, 64), dtype=mx.float16)}, "value_matrix"),
    ({"shift_w": mx.zeros((3, 4, 64)), "shift_table": mx.zeros((2, 4, 32))}, "shift_const"),
    ({"shift_const": mx.zeros((3, 64)), "shift_w": mx.zeros((3, 4, 64))}, "shift_table"),
    ({"shift_const": mx.zeros((3, 64)), "shift_w": mx.zeros((3, 4, 64)), "shift_table": mx.zeros((64, 4))}, "shift_table"),
    ({"shift_const": mx.zeros((3, 64)), "shift_w": mx.zeros((3, 4, 64)), "shift_table": mx.zeros((0, 4, 32))}, "shift_table"),
    ({"shift_const": mx.zeros((3, 64)), "shift_w": mx.zeros((3, 40, 64)), "shift_table": mx.zeros((2, 40, 32))}, "shift_w"),
    ({"rotation": mx.zeros((64, 64))}, "form"),
])
def test_bad_stored_form_is_refused(bad, name):
    """A stored form of the wrong shape, dtype or parts raises
    InvalidArgumentError naming the argument, and writes nothing."""
    from kvsnap import ops

    arena = kvsnap.Arena(1, 3, 64, block_tokens=32, budget_bytes=1 << 20)
    slot = arena.alloc()
    before = [np.array(x) for x in arena.read_block(slot, 0)]
    k = mx.ones((1, 3, 20, 64))
    with pytest.raises(InvalidArgumentError) as e:
        mx.eval(ops.kv_write(arena, 0, k, k, [[slot]], [0], form=bad))
    assert name in str(e.value)
    for x, y in zip(before, arena.read_block(slot, 0)):
        np.testing.assert_array_equal(x, np.array(y))


@pytest.mark.parametrize("isa", kvsnap._ext.available_isas())
@pytest.mark.parametrize("L", [1, 24])
def test_kernel_query_basis_is_the_python_one(llama, L, isa):
    """attention(rotate=True, query_scale=s) (queries scaled and rotated,
    output rotated back, in the kernel) equals doing those steps as array ops
    around a plain attention call, in every CPU kernel set; and leaving them
    out gives something else (they carry weight)."""
    from kvsnap import ops

    before = kvsnap._ext.isa()
    kvsnap._ext.set_isa(isa)
    try:
        T = 150
        cache = kc.make_cache(llama, block_tokens=32)
        mx.eval(llama(prompt(T, seed=5)[None], cache=cache))
        seq = cache.sequences[0]
        lo = seq.offsets.layers[0]
        hkv, D = lo.const.shape
        q = mx.array(np.random.default_rng(L).standard_normal((1, hkv * 4, L, D)).astype(np.float32))
        scale = 1 / math.sqrt(D)
        bias = lo.kernel_bias(True, T)
        fused = ops.attention(seq.arena, 0, q, seq.table(), [T], scale=scale, bias=bias, rotate=True,
                              query_scale=lo.query_scale())
        steps = kc.hadamard(ops.attention(seq.arena, 0, kc.hadamard(kc._scaled_queries(lo, q)), seq.table(), [T],
                                          scale=scale, bias=bias))
        np.testing.assert_allclose(np.array(fused), np.array(steps), atol=2e-4, rtol=1e-3)
        plain = ops.attention(seq.arena, 0, q, seq.table(), [T], scale=scale, bias=bias)
        assert mx.abs(plain - steps).max().item() > 1e-2
        cache.release()
    finally:
        kvsnap._ext.set_isa(before)


def test_bad_query_basis_is_refused(llama):
    """A query_scale of the wrong shape or dtype, or a non-bool rotate, raises
    InvalidArgumentError naming it."""
    from kvsnap import ops

    cache = kc.make_cache(llama, block_tokens=32)
    mx.eval(llama(prompt(40, seed=5)[None], cache=cache))
    seq = cache.sequences[0]
    hkv, D = seq.arena.n_kv_heads, seq.arena.head_dim
    q = mx.zeros((1, hkv * 4, 1, D))
    for kw, name in [({"query_scale": mx.ones((hkv + 1, D))}, "query_scale"),
                     ({"query_scale": mx.ones((hkv, D), dtype=mx.float16)}, "query_scale"),
                     ({"query_scale": np.ones((hkv, D))}, "query_scale"),
                     ({"rotate": 1}, "rotate")]:
        with pytest.raises(InvalidArgumentError) as e:
            mx.eval(ops.attention(seq.arena, 0, q, seq.table(), [40], scale=0.1, **kw))
        assert name in str(e.value)
    cache.release()
