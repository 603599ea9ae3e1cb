"""mlx-lm's prompt-cache contract, kept by kvsnap caches (small random-weight models).

Saving and loading through mlx-lm's own functions, copies that share blocks,
masks, what update_and_fetch returns, and mlx-lm's LRUPromptCache holding
kvsnap caches. A real model continuing a conversation: test_dropin_real.py.
"""

from __future__ import annotations

import copy
import gc

import mlx.core as mx
import numpy as np
import pytest
from kernel_isa import float_kernels  # noqa: F401 (fixture)
from kvsnap import cache as kc
from kvsnap import model_audit
from kvsnap.errors import InvalidArgumentError, UnsupportedModelError
from mlx_lm.models import base as mlx_base
from mlx_lm.models import gemma3_text, llama, qwen2, qwen3
from mlx_lm.models.base import scaled_dot_product_attention
from mlx_lm.models.cache import (
    KVCache,
    LRUPromptCache,
    QuantizedKVCache,
    RotatingKVCache,
    load_prompt_cache,
    save_prompt_cache,
)
from small_models import prompt, small_model


def logits(model, tokens: mx.array, cache) -> mx.array:
    out = model(tokens[None], cache=cache)
    mx.eval(out)
    return out


def alone(model, *steps, block_tokens: int = 16) -> mx.array:
    """The last logits of a new cache taken through ``steps`` (token arrays
    fed in those chunks; an int trims that many tokens) with no copy made."""
    cache = kc.make_cache(model, block_tokens=block_tokens)
    for step in steps:
        if isinstance(step, int):
            cache.trim(step)
        else:
            out = logits(model, step, cache)
    return out


def slots_used(cache: kc.PromptCache) -> list[int]:
    return [s.arena.stats()["slots_used"] for s in cache.sequences]


def same(a: mx.array, b: mx.array) -> None:
    np.testing.assert_array_equal(np.array(a), np.array(b))


# ---------------------------------------------------------------- save / load


@pytest.mark.usefixtures("float_kernels")  # compared with mlx-lm at float32 error
def test_save_prompt_cache_writes_the_quantized_kv_and_load_prompt_cache_reads_it_back(tmp_path):
    # An unrotated 4-bit cache is saved by mlx-lm itself, metadata included,
    # and loads as mlx-lm's QuantizedKVCache holding the very bytes kvsnap
    # stored: mlx-lm attends it like kvsnap does, and from_mlx makes a kvsnap
    # cache of it again that gives bit-identical logits.
    model = small_model("llama")
    cache = kc.make_cache(model, block_tokens=16, rotate=False)
    logits(model, prompt(70), cache)
    path = str(tmp_path / "chat.safetensors")
    save_prompt_cache(path, cache, {"model": "small llama", "turn": "3"})

    loaded, meta = load_prompt_cache(path, return_metadata=True)
    assert meta == {"model": "small llama", "turn": "3"}
    assert [type(c) for c in loaded] == [QuantizedKVCache] * 4
    for ours, theirs in zip(kc.to_mlx(cache), loaded):
        assert (theirs.offset, theirs.bits, theirs.group_size) == (70, 4, 64)
        for x, y in zip((*ours.keys, *ours.values), (*theirs.keys, *theirs.values)):
            assert x.dtype == y.dtype
            same(x, y)

    x = prompt(3, seed=5)
    a, b = logits(model, x, cache), logits(model, x, loaded)
    assert mx.abs(a - b).max().item() < 1e-4 * max(1.0, mx.abs(b).max().item())
    again = kc.from_mlx(model, load_prompt_cache(path), block_tokens=16)
    same(logits(model, x, again), a)


def test_gemma3_cache_saves_its_window_layers_as_rotating_caches(tmp_path):
    # Sliding-window layers load as mlx-lm's RotatingKVCache holding the
    # window (float32, dequantized), full layers as QuantizedKVCache; mlx-lm
    # then goes on decoding as kvsnap does (the new tokens are quantized by
    # kvsnap and kept float by mlx-lm: 8-bit keeps that difference small).
    model = small_model("gemma3")
    cache = kc.make_cache(model, block_tokens=16, rotate=False, bits=8)
    logits(model, prompt(100), cache)
    path = str(tmp_path / "gemma.safetensors")
    save_prompt_cache(path, cache)
    loaded = load_prompt_cache(path)
    assert [type(c) for c in loaded] == [RotatingKVCache, QuantizedKVCache] * 2
    window = loaded[0]
    assert (window.offset, window.max_size, window.keys.shape) == (100, 48, (1, 1, 48, 64))
    same(window.keys, kc.to_mlx(cache)[0].keys)
    for _ in range(3):
        t = prompt(1, seed=7)
        a, b = logits(model, t, cache), logits(model, t, loaded)
        assert mx.abs(a - b).max().item() < 0.05 * max(1.0, mx.abs(b).max().item())


@pytest.mark.parametrize("fmt", [{}, {"rotate": False, "key_bits": 8}])
def test_saving_a_cache_mlx_lm_cannot_hold_is_refused_before_writing(tmp_path, fmt):
    # Rotated K/V (the default) and 8-bit keys with 4-bit values fit no
    # mlx-lm class: save_prompt_cache raises kvsnap's error naming the ways to
    # save them, and writes nothing. mlx-lm's generate still evaluates their
    # state after each prefill chunk.
    model = small_model("qwen3")
    cache = kc.make_cache(model, block_tokens=16, **fmt)
    logits(model, prompt(40), cache)
    mx.eval([c.state for c in cache])
    path = tmp_path / "lost.safetensors"
    with pytest.raises(InvalidArgumentError, match="kvsnap.save") as e:
        save_prompt_cache(str(path), cache)
    assert "kvsnap.store.export_mlx" in str(e.value) and e.value.argument == "cache"
    assert not path.exists()


def test_state_cannot_be_set_and_a_layer_alone_cannot_be_copied():
    model = small_model("llama")
    cache = kc.make_cache(model, rotate=False)
    with pytest.raises(InvalidArgumentError, match="from_mlx"):
        cache[0].state = QuantizedKVCache().state
    with pytest.raises(InvalidArgumentError, match="from_mlx"):
        type(cache[0]).from_state(())
    with pytest.raises(InvalidArgumentError, match="whole prompt cache"):
        copy.deepcopy(cache[0])


# ---------------------------------------------------------------------- copies


def test_deepcopy_shares_full_blocks_and_copies_only_the_tail():
    model = small_model("llama")
    tokens = prompt(70)  # 4 full blocks of 16 and a tail of 6
    cache = kc.make_cache(model, block_tokens=16)
    logits(model, tokens, cache)
    cache.record_tokens(tokens.tolist())
    before = slots_used(cache)
    twin = copy.deepcopy(cache)
    mine, theirs = cache.sequences[0], twin.sequences[0]
    assert theirs.blocks[:4] == mine.blocks[:4] and theirs.blocks[4] != mine.blocks[4]
    assert all(mine.arena.refcount(s) == 2 for s in mine.blocks[:4])
    assert slots_used(cache) == [before[0] + 1]  # one block per layer group
    assert twin.offset == 70 and twin.tokens == cache.tokens and twin.tokens is not cache.tokens
    assert [type(c) for c in twin] == [type(c) for c in cache]

    # Each goes on with its own tokens: the same logits as a cache that saw
    # only its own history.
    a, b = prompt(20, seed=1), prompt(20, seed=2)
    out_a, out_b = logits(model, a, cache), logits(model, b, twin)
    same(out_a, alone(model, tokens, a))
    same(out_b, alone(model, tokens, b))

    # The copy outlives the original, and gives its blocks back when dropped.
    third = cache.copy()
    cache.release()
    c = prompt(5, seed=3)
    same(logits(model, c, third), alone(model, tokens, a, c))
    del twin, third, theirs
    gc.collect()
    assert slots_used(cache) == [0]


def test_copies_of_a_two_group_cache_cost_at_most_one_block_per_group():
    model = small_model("gemma3")
    tokens = prompt(100)
    cache = kc.make_cache(model, block_tokens=16)
    logits(model, tokens, cache)
    before = slots_used(cache)
    twin = cache.copy()
    assert [u - b for u, b in zip(slots_used(cache), before)] == [1, 1]
    window, twin_window = cache.sequences[1], twin.sequences[1]
    assert twin_window.window == 48
    assert [b >= 0 for b in twin_window.blocks] == [b >= 0 for b in window.blocks]
    x, y = prompt(30, seed=4), prompt(30, seed=5)
    ref_x = alone(model, tokens, x)
    ref_y = alone(model, tokens, y)
    same(logits(model, y, twin), ref_y)
    same(logits(model, x, cache), ref_x)


def test_trimming_after_copying_never_writes_a_shared_block():
    # Trimming back into a full block both caches hold copies that block
    # before it is written again; the other cache keeps its bytes.
    model = small_model("llama")
    tokens = prompt(70)
    cache = kc.make_cache(model, block_tokens=16)
    logits(model, tokens, cache)
    twin = cache.copy()
    shared = cache.sequences[0].blocks[2]  # positions 32..47
    assert twin.trim(30) == 30 and twin.offset == 40
    assert twin.sequences[0].blocks[:2] == cache.sequences[0].blocks[:2]
    assert twin.sequences[0].blocks[2] != shared and cache.sequences[0].arena.refcount(shared) == 1
    x = prompt(12, seed=8)
    same(logits(model, x, twin), alone(model, tokens, 30, x))
    y = prompt(3, seed=9)
    same(logits(model, y, cache), alone(model, tokens, y))
    # And the original trims into blocks its copy shares, the same way.
    third = cache.copy()
    assert cache.trim(40) == 40
    same(logits(model, x, cache), alone(model, tokens, y, 40, x))
    z = prompt(2, seed=10)
    same(logits(model, z, third), alone(model, tokens, y, z))


def test_lru_prompt_cache_holds_kvsnap_caches():
    # mlx-lm's server-side prompt cache as a library: insert, fetch the
    # nearest (a deep copy, trimmed when a longer entry is found), evict.
    model = small_model("qwen3")
    lru = LRUPromptCache(max_size=2)
    system = prompt(50).tolist()
    cache = kc.make_cache(model, block_tokens=16)
    logits(model, mx.array(system), cache)
    arena = cache.sequences[0].arena
    lru.insert_cache("m", system, cache)
    assert lru.nbytes == sum(c.nbytes for c in cache) > 0

    # A longer prompt finds the shorter entry: a copy, and the rest to compute.
    ask = system + prompt(10, seed=1).tolist()
    got, rest = lru.fetch_nearest_cache("m", ask)
    assert got is not cache and got.offset == 50 and rest == ask[50:]
    same(logits(model, mx.array(rest), got), alone(model, mx.array(system), mx.array(rest)))
    lru.insert_cache("m", ask, got)

    # A prompt that leaves the stored one at token 40 gets a copy trimmed there
    # (the entry itself stays whole).
    other = system[:40] + prompt(8, seed=2).tolist()
    got2, rest2 = lru.fetch_nearest_cache("m", other)
    assert got2.offset == 40 and rest2 == other[40:]
    # (The reference takes the same forward passes: a BLAS may round a row
    # differently in a matmul of another row count.)
    reference = alone(model, mx.array(system), mx.array(rest), 20, mx.array(rest2))
    same(logits(model, mx.array(rest2), got2), reference)
    exact, rest3 = lru.fetch_nearest_cache("m", ask)
    assert exact.offset == 60 and rest3 == []

    # Entries evicted and copies dropped give their blocks back.
    del cache, got, got2, exact
    lru.trim_to(n_sequences=0)
    gc.collect()
    assert len(lru) == 0 and arena.stats()["slots_used"] == 0


# ----------------------------------------------------------------------- masks


@pytest.mark.parametrize("offset", [0, 37])
@pytest.mark.parametrize("n", [1, 5])
@pytest.mark.parametrize("return_array", [False, True])
@pytest.mark.parametrize("window_size", [None, 8])
def test_make_mask_is_the_mask_kvcache_makes(offset, n, return_array, window_size):
    model = small_model("llama")
    cache = kc.make_cache(model)
    if offset:
        logits(model, prompt(offset), cache)
    ref = KVCache()
    if offset:
        ref.update_and_fetch(mx.zeros((1, 2, offset, 64)), mx.zeros((1, 2, offset, 64)))
    want = ref.make_mask(n, return_array=return_array, window_size=window_size)
    got = cache[0].make_mask(n, return_array=return_array, window_size=window_size)
    # Also as the models ask for it.
    h = mx.zeros((1, n, 128))
    via_base = mlx_base.create_attention_mask(h, cache[0], window_size=window_size, return_array=return_array)
    for mask in (got, via_base):
        if isinstance(want, mx.array):
            assert isinstance(mask, mx.array) and mask.shape == want.shape == (n, offset + n)
            assert mask.dtype == want.dtype
            same(mask, want)
        else:
            assert mask == want


def test_attention_takes_the_mask_arrays_make_mask_made_and_refuses_others():
    model = small_model("llama")
    attn = model.model.layers[0].self_attn
    x = mx.random.normal((1, 5, 128), key=mx.random.key(3))

    def layer0(mask_of):
        cache = kc.make_cache(model, block_tokens=16)
        logits(model, prompt(40), cache)
        out = attn(x, mask=mask_of(cache), cache=cache[0])
        mx.eval(out)
        return out

    causal = layer0(lambda c: "causal")
    as_array = layer0(lambda c: mlx_base.create_attention_mask(x, c[0], return_array=True))
    same(as_array, causal)
    with pytest.raises(InvalidArgumentError, match="make_mask") as e:
        layer0(lambda c: mx.ones((5, 45), dtype=mx.bool_))
    assert e.value.argument == "mask"
    with pytest.raises(InvalidArgumentError, match="window 8"):
        layer0(lambda c: mlx_base.create_attention_mask(x, c[0], window_size=8))


# -------------------------------------------------------- update_and_fetch


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gemma3"])
def test_update_and_fetch_returns_the_new_keys_and_values(arch):
    # The contract (KVSnapCache's docstring): the new tokens' K/V, unchanged,
    # whatever the cache holds already; the claimed families only hand them
    # to the attention call, which reads the history from the blocks.
    model = small_model(arch)
    cache = kc.make_cache(model)
    logits(model, prompt(30), cache)
    k, v = mx.random.normal((1, 1, 4, 64)), mx.random.normal((1, 1, 4, 64))
    layer = next(c for c in cache if c.window is None)
    n_kv = layer.seq.arena.n_kv_heads
    k, v = mx.broadcast_to(k, (1, n_kv, 4, 64)), mx.broadcast_to(v, (1, n_kv, 4, 64))
    got_k, got_v = layer.update_and_fetch(k, v)
    assert got_k is k and got_v is v and layer.offset == 34
    attn = type(model.model.layers[0].self_attn)
    assert model_audit.history_use(attn) is None


def test_families_kvsnap_serves_only_hand_the_returned_kv_to_attention():
    for attn in (llama.Attention, qwen2.Attention, qwen3.Attention, gemma3_text.Attention):
        assert model_audit.history_use(attn) is None, attn


class _HistoryAttention(llama.Attention):
    """llama's attention, plus a use of the returned keys' length (as models
    with position biases over the whole history do)."""

    def __call__(self, x, mask=None, cache=None):
        B, L, _ = x.shape
        queries = self.q_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        keys = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        values = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        queries = self.rope(queries, offset=cache.offset)
        keys, values = cache.update_and_fetch(self.rope(keys, offset=cache.offset), values)
        scale = self.scale * (keys.shape[2] ** -0.01)
        output = scaled_dot_product_attention(queries, keys, values, cache=cache, scale=scale, mask=mask)
        return self.o_proj(output.transpose(0, 2, 1, 3).reshape(B, L, -1))


def test_make_cache_refuses_a_model_that_needs_the_history():
    model = small_model("llama")
    for layer in model.layers:
        layer.self_attn = _HistoryAttention(model.args)
    with pytest.raises(UnsupportedModelError, match="update_and_fetch") as e:
        kc.make_cache(model)
    assert "keys.shape[2]" in str(e.value) and "whole K/V history" in str(e.value)
