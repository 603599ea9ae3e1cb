"""The drop-in cache on small random-weight mlx-lm models of each supported family.

Real trained models are covered in test_cache_real.py; these tests check the
mechanics (routing, masking, windows, trimming, conversions, errors) on every
architecture quickly.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import kvsnap
import mlx.core as mx
import numpy as np
import pytest
from kernel_isa import float_kernels  # noqa: F401 (fixture)
from kvsnap import cache as kc
from kvsnap.errors import InvalidArgumentError, UnsupportedModelError
from mlx_lm.generate import generate_step
from mlx_lm.models import base as mlx_base
from mlx_lm.models import llama
from mlx_lm.models.cache import KVCache, QuantizedKVCache, RotatingKVCache, make_prompt_cache
from small_models import VOCAB, prompt, small_model


def logits(model, tokens: mx.array, cache) -> mx.array:
    out = model(tokens[None], cache=cache)
    mx.eval(out)
    return out


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma3"]


@pytest.mark.parametrize("arch", ARCHS)
def test_8bit_cache_tracks_the_float_cache(arch):
    # Prefill in two chunks then decode: 8-bit K/V stays within a few
    # hundredths of the float cache's logits, at every step.
    model = small_model(arch)
    ours, ref = kc.make_cache(model, bits=8, block_tokens=32), make_prompt_cache(model)
    assert all(isinstance(c, kc.KVSnapCache) for c in ours) and not ours.foreign_layers
    tokens = prompt(120)
    for chunk in (tokens[:70], tokens[70:]):
        a, b = logits(model, chunk, ours), logits(model, chunk, ref)
        assert mx.abs(a - b).max().item() < 0.05 * max(1.0, mx.abs(b).max().item())
    for _ in range(20):
        t = mx.argmax(b[0, -1:], axis=-1)
        a, b = logits(model, t, ours), logits(model, t, ref)
        assert mx.abs(a - b).max().item() < 0.05 * max(1.0, mx.abs(b).max().item())
    assert all(c.offset == 140 for c in ours)


@pytest.mark.usefixtures("float_kernels")  # float32 error: the float CPU kernels
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_logits_match_mlx_lm_reading_the_same_bytes(arch):
    # Convert the kvsnap cache to mlx-lm's QuantizedKVCache (same bytes) and
    # continue both: the next logits agree to float32 accumulation error.
    model = small_model(arch)
    ours = kc.make_cache(model, block_tokens=32, rotate=False)
    logits(model, prompt(100), ours)
    theirs = kc.to_mlx(ours)
    assert all(isinstance(c, QuantizedKVCache) for c in theirs)
    x = prompt(3, seed=5)
    a, b = logits(model, x, ours), logits(model, x, theirs)
    assert mx.abs(a - b).max().item() < 1e-4 * max(1.0, mx.abs(b).max().item())


def test_generate_step_runs_unchanged_and_matches_a_fresh_cache():
    model = small_model("llama")
    cache = kc.make_cache(model, block_tokens=32)
    toks = [t for t, _ in generate_step(prompt(90), model, prompt_cache=cache, max_tokens=12)]
    assert len(toks) == 12
    # generate_step computes one step ahead: 90 prompt tokens + 12 fed back.
    assert cache.offset == 102
    # The same tokens, fed one forward pass at a time into a fresh cache, give
    # the same greedy continuation.
    fresh = kc.make_cache(model, block_tokens=32)
    out = logits(model, prompt(90), fresh)
    greedy = []
    for _ in range(12):
        t = int(mx.argmax(out[0, -1]).item())
        greedy.append(t)
        out = logits(model, mx.array([t]), fresh)
    assert greedy == toks


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_trim_and_re_extend_gives_the_same_logits(arch):
    # Both caches see the same forward passes but for the 25 tokens trimmed
    # from a: a BLAS need not give a row the same bits in matmuls of other
    # row counts (OpenBLAS's FMA kernels on AMD Zen 3 do not), and this
    # checks the cache, not the BLAS.
    model = small_model(arch)
    tokens = prompt(100)
    a = kc.make_cache(model, block_tokens=16)
    logits(model, tokens[:65], a)
    logits(model, tokens[65:90], a)
    assert a.trim(25) == 25
    assert all(c.offset == 65 for c in a)
    out_a = logits(model, tokens[65:], a)
    b = kc.make_cache(model, block_tokens=16)
    logits(model, tokens[:65], b)
    out_b = logits(model, tokens[65:], b)
    np.testing.assert_array_equal(np.array(out_a), np.array(out_b))


def test_trim_frees_blocks_past_the_end():
    model = small_model("llama")
    cache = kc.make_cache(model, block_tokens=16)
    logits(model, prompt(100), cache)
    arena = cache.sequences[0].arena
    assert arena.stats()["slots_used"] == 7
    cache.trim(60)
    assert arena.stats()["slots_used"] == 3
    cache.release()
    assert arena.stats()["slots_used"] == 0


def test_sliding_window_layers_free_blocks_behind_the_window():
    model = small_model("gemma3")
    cache = kc.make_cache(model, block_tokens=16)
    full, windowed = cache.sequences
    assert windowed.window == 48
    logits(model, prompt(100), cache)
    out = None
    for i in range(60):
        out = logits(model, mx.array([i % VOCAB]), cache)
    live = [b for b in windowed.blocks if b >= 0]
    # The window (48) plus the token being written spans at most 5 blocks of 16.
    assert len(live) <= 5 and windowed.arena.stats()["slots_used"] == len(live)
    assert len(full.blocks) == -(-160 // 16)
    assert np.isfinite(np.array(out)).all()


def test_conversions_round_trip_bit_exactly():
    model = small_model("llama")
    ours = kc.make_cache(model, block_tokens=32, rotate=False)
    logits(model, prompt(77), ours)
    back = kc.from_mlx(model, kc.to_mlx(ours), block_tokens=32)
    x = prompt(4, seed=9)
    np.testing.assert_array_equal(np.array(logits(model, x, ours)), np.array(logits(model, x, back)))


def test_from_mlx_quantized_cache_is_bit_exact_for_float16_scales():
    model = small_model("llama")
    # mlx-lm's QuantizedKVCache fed float16 K/V keeps float16 scales.
    src = [QuantizedKVCache(group_size=64, bits=4) for _ in model.layers]
    for c in src:
        k = mx.random.normal((1, 2, 40, 64)).astype(mx.float16)
        c.update_and_fetch(k, k * 0.5)
    ours = kc.from_mlx(model, src, block_tokens=16)
    back = kc.to_mlx(ours)
    for a, b in zip(src, back):
        for x, y in zip((*a.keys, *a.values), (*b.keys, *b.values)):
            np.testing.assert_array_equal(np.array(x[..., :40, :]), np.array(y))


def test_rotated_cache_attends_like_the_unrotated_one():
    # The Hadamard basis changes what is quantized, not the attention: at 8
    # bits both track the float cache, and a rotated cache converts back to a
    # float mlx-lm cache holding (nearly) the original keys and values.
    model = small_model("qwen3")
    rotated, plain = kc.make_cache(model, bits=8), kc.make_cache(model, bits=8, rotate=False)
    assert rotated.sequences[0].rotate and not plain.sequences[0].rotate
    ref = make_prompt_cache(model)
    x = prompt(64)
    a, b, f = logits(model, x, rotated), logits(model, x, plain), logits(model, x, ref)
    scale = mx.abs(f).max().item()
    assert mx.abs(a - f).max().item() < 0.05 * scale
    assert mx.abs(b - f).max().item() < 0.05 * scale
    back = kc.to_mlx(rotated, quantized=False)
    k_ref = ref[0].keys[..., :64, :]
    k_back = back[0].keys[..., :64, :]
    assert mx.abs(k_back - k_ref).max().item() < 0.02 * mx.abs(k_ref).max().item()


def test_rotate_needs_a_power_of_two_head_dim():
    mx.random.seed(1)
    args = llama.ModelArgs(
        model_type="llama", hidden_size=192, num_hidden_layers=2, intermediate_size=256,
        vocab_size=VOCAB, num_attention_heads=2, num_key_value_heads=1, rms_norm_eps=1e-5,
        head_dim=96, tie_word_embeddings=True,
    )
    model = llama.Model(args)
    assert not kc.make_cache(model, group_size=32).sequences[0].rotate  # auto: off
    with pytest.raises(InvalidArgumentError, match="96") as e:
        kc.make_cache(model, group_size=32, rotate=True)
    assert e.value.argument == "rotate"


def test_from_float_caches_quantizes_them():
    model = small_model("gemma3")
    ref = make_prompt_cache(model)
    logits(model, prompt(70), ref)
    assert any(isinstance(c, RotatingKVCache) for c in ref)
    ours = kc.from_mlx(model, ref, block_tokens=16, bits=8)
    assert [c.offset for c in ours] == [70] * 4
    x = prompt(2, seed=3)
    a, b = logits(model, x, ours), logits(model, x, ref)
    assert mx.abs(a - b).max().item() < 0.05 * max(1.0, mx.abs(b).max().item())


def test_from_mlx_with_other_key_bits_requantizes_the_keys():
    # 8-bit mlx-lm caches into 6-bit keys with 8-bit values: the keys cannot be
    # copied as stored (other bits), so K and V are re-quantized (the values
    # within about one 8-bit step), and the cache attends like the source.
    model = small_model("llama")
    src = [QuantizedKVCache(group_size=32, bits=8) for _ in model.layers]
    for c in src:
        k = mx.random.normal((1, 2, 40, 64)).astype(mx.float16)
        c.update_and_fetch(k, k * 0.5)
    ours = kc.from_mlx(model, src, block_tokens=16, key_bits=6)
    arena = ours.sequences[0].arena
    assert (arena.key_bits, arena.bits, ours.offset) == (6, 8, 40)
    back = kc.to_mlx(ours, quantized=False)
    for a, b in zip(src, back):
        k = mx.dequantize(*(x[..., :40, :] for x in a.keys), group_size=32, bits=8)
        v = mx.dequantize(*(x[..., :40, :] for x in a.values), group_size=32, bits=8)
        assert mx.abs(b.keys[..., :40, :] - k).max().item() < 0.1 * mx.abs(k).max().item()
        assert mx.abs(b.values[..., :40, :] - v).max().item() < 0.02 * mx.abs(v).max().item()
    x = prompt(2, seed=3)
    want = logits(model, x, src)
    assert mx.abs(logits(model, x, ours) - want).max().item() < 0.05 * max(1.0, mx.abs(want).max().item())


def test_from_mlx_refuses_a_different_quantization():
    model = small_model("llama")
    src = [QuantizedKVCache(group_size=32, bits=8) for _ in model.layers]
    with pytest.raises(InvalidArgumentError) as e:
        kc.from_mlx(model, src, bits=4)
    assert e.value.argument == "bits"
    with pytest.raises(InvalidArgumentError, match="layers"):
        kc.from_mlx(model, src[:2])


def test_calls_without_a_kvsnap_cache_are_untouched():
    model = small_model("llama")
    before = logits(model, prompt(40), [KVCache() for _ in model.layers])
    kc.make_cache(model)
    assert llama.scaled_dot_product_attention is not mlx_base.scaled_dot_product_attention
    after = logits(model, prompt(40), [KVCache() for _ in model.layers])
    np.testing.assert_array_equal(np.array(before), np.array(after))
    nocache = logits(model, prompt(40), None)
    np.testing.assert_allclose(np.array(nocache), np.array(after), atol=1e-5)


def test_importing_kvsnap_changes_nothing_in_mlx_lm():
    code = textwrap.dedent(
        """
        import kvsnap, kvsnap.cache
        from mlx_lm.models import base, llama, qwen3, gemma3_text
        for m in (llama, qwen3, gemma3_text):
            assert m.scaled_dot_product_attention is base.scaled_dot_product_attention, m
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_a_model_kvsnap_cannot_serve_is_named():
    from mlx_lm.models import mamba

    args = mamba.ModelArgs(
        model_type="mamba", vocab_size=100, hidden_size=32, intermediate_size=64, state_size=4,
        num_hidden_layers=2, conv_kernel=4, use_bias=False, use_conv_bias=True, time_step_rank=4,
    )
    model = mamba.Model(args)
    with pytest.raises(UnsupportedModelError, match="mamba"):
        kc.make_cache(model)


def test_layer_kinds_name_full_window_and_foreign_layers():
    assert kc.layer_kinds(small_model("llama")) == [("full", None)] * 4
    assert kc.layer_kinds(small_model("gemma3")) == [("window", 48), ("full", None)] * 2


def test_batches_and_mismatched_arenas_are_refused():
    model = small_model("llama")
    cache = kc.make_cache(model)
    with pytest.raises(InvalidArgumentError, match="batch"):
        model(mx.zeros((2, 5), dtype=mx.int32), cache=cache)
    wrong = kvsnap.Arena(4, 2, 32, group_size=32, budget_bytes=1 << 24)
    with pytest.raises(InvalidArgumentError, match="head_dim=32") as e:
        kc.make_cache(model, arena=wrong, group_size=32)
    assert e.value.argument == "arena"


def test_cache_reports_what_it_holds():
    model = small_model("llama")
    cache = kc.make_cache(model, block_tokens=32)
    logits(model, prompt(70), cache)
    assert cache.offset == 70
    assert [len(t) for t in cache.block_tables] == [3]
    assert cache.nbytes == 3 * cache.sequences[0].arena.slot_bytes
    # Quantized bytes per token per layer: 4 bits + float16 scale and bias per group of 64.
    per_token_f16 = 2 * 2 * 64 * 2
    assert cache[0].nbytes == 70 * 2 * 2 * (32 + 4)
    assert cache[0].nbytes / (70 * per_token_f16) <= 0.3
    cache.record_tokens(range(70))
    cache.trim(10)
    assert cache.tokens == list(range(60))


def test_8bit_keys_4bit_values_cache():
    model = small_model("llama")
    cache = kc.make_cache(model, key_bits=8, block_tokens=32)
    ref = make_prompt_cache(model)
    x = prompt(50)
    a, f = logits(model, x, cache), logits(model, x, ref)
    # A random-weight model: the 4-bit values' error dominates (~0.1 of the
    # largest logit with or without key offsets).
    assert mx.abs(a - f).max().item() < 0.15 * mx.abs(f).max().item()
    arena = cache.sequences[0].arena
    assert (arena.key_bits, arena.bits) == (8, 4)
    # Per token and layer: 8-bit keys + 4-bit values + float16 scale/bias pairs.
    assert cache[0].nbytes == 50 * 2 * (64 + 32 + 2 * 4)
    with pytest.raises(InvalidArgumentError) as e:
        kc.to_mlx(cache)
    assert e.value.argument == "quantized"
    back = kc.to_mlx(cache, quantized=False)
    assert back[0].offset == 50


def test_trim_past_the_window_is_refused_and_changes_nothing():
    # Gemma 3 style: the window layers have freed the blocks a trim back to
    # position 20 would need. Trimming anyway used to leave the window layers
    # at other offsets than the full layers; now it is refused up front.
    model = small_model("gemma3")
    cache = kc.make_cache(model, block_tokens=16)
    logits(model, prompt(100), cache)
    for i in range(40):
        logits(model, mx.array([i % VOCAB]), cache)
    tables = cache.block_tables
    with pytest.raises(InvalidArgumentError, match="window"):
        cache.trim(120)
    assert all(c.offset == 140 for c in cache) and cache.block_tables == tables
    # The window (48) keeps blocks from position 80 on: trims back to 128 are exact.
    assert not cache.can_trim_to(20) and not cache.can_trim_to(127) and cache.can_trim_to(128)
    assert cache.trim(10) == 10 and all(c.offset == 130 for c in cache)
    tail = mx.array([(7 * i % VOCAB) for i in range(10)])
    out = logits(model, tail, cache)
    fresh = kc.make_cache(model, block_tokens=16)
    logits(model, prompt(100), fresh)
    for i in range(30):
        logits(model, mx.array([i % VOCAB]), fresh)
    ref = logits(model, tail, fresh)
    np.testing.assert_allclose(np.array(out), np.array(ref), atol=1e-4, rtol=1e-4)


def test_arena_full_mid_forward_leaves_every_layer_as_it_was():
    # Two layer groups on one budget: the step's blocks for every group are
    # taken before any layer writes, so a full budget fails the whole step.
    model = small_model("gemma3")
    cache = kc.make_cache(model, block_tokens=16)
    slot = cache.sequences[0].arena.slot_bytes + cache.sequences[1].arena.slot_bytes
    small = kc.make_cache(model, block_tokens=16, budget_bytes=4 * slot)
    logits(model, prompt(60), small)
    offsets, tables, used = [c.offset for c in small], small.block_tables, small.sequences[0].arena.budget.used
    with pytest.raises(kvsnap.errors.ArenaFullError):
        logits(model, prompt(80, seed=3), small)
    assert [c.offset for c in small] == offsets and small.block_tables == tables
    assert small.sequences[0].arena.budget.used == used
    # The cache still works: the next tokens that fit are computed exactly.
    a = logits(model, prompt(3, seed=4), small)
    b = kc.make_cache(model, block_tokens=16)
    logits(model, prompt(60), b)
    np.testing.assert_array_equal(np.array(a), np.array(logits(model, prompt(3, seed=4), b)))


def test_both_layer_groups_count_against_one_budget():
    model = small_model("gemma3")
    cache = kc.make_cache(model, block_tokens=16, budget_bytes=1 << 24)
    full, windowed = cache.sequences
    assert full.arena.budget.limit == windowed.arena.budget.limit == 1 << 24
    logits(model, prompt(100), cache)
    used = full.arena.stats()["bytes_used"] + windowed.arena.stats()["bytes_used"]
    assert full.arena.budget.used == windowed.arena.budget.used == used > 0
    cache.release()
    assert full.arena.budget.used == 0
