"""The drop-in cache on real trained models (SmolLM2-135M, Gemma-3-270M).

Prompt text: /usr/share/common-licenses/GPL-3 (Debian's copy of the GPL-3),
which nobody here wrote.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from kernel_isa import float_kernels  # noqa: F401 (fixture)
from kvsnap import cache as kc
from kvsnap.models import load
from mlx_lm import generate, stream_generate
from mlx_lm.models.cache import QuantizedKVCache, make_prompt_cache

TEXT = Path("/usr/share/common-licenses/GPL-3").read_text()
PREFILL_CHUNK = 512


@pytest.fixture(scope="module")
def smollm():
    return load("smollm2-135m")


def prompt_tokens(tokenizer, n: int) -> mx.array:
    ids = tokenizer.encode(TEXT)
    assert len(ids) >= n
    return mx.array(ids[:n])


def prefill(model, tokens: mx.array, cache) -> mx.array:
    for i in range(0, tokens.size, PREFILL_CHUNK):
        out = model(tokens[None, i : i + PREFILL_CHUNK], cache=cache)
        mx.eval(out)
    return out[0, -1]


def greedy(model, tokens: mx.array, cache, n: int) -> tuple[list[int], list[mx.array]]:
    last = prefill(model, tokens, cache)
    out, steps = [], []
    for _ in range(n):
        t = int(mx.argmax(last).item())
        out.append(t)
        steps.append(last)
        last = model(mx.array([[t]]), cache=cache)[0, -1]
        mx.eval(last)
    return out, steps


def forced_picks(model, tokens: mx.array, cache, follow: list[int]) -> tuple[list[int], list[float]]:
    """Greedy picks at each step while feeding the tokens ``follow`` (teacher
    forcing), and the top-2 logit margin at each step."""
    last = prefill(model, tokens, cache)
    picks, margins = [], []
    for t in follow:
        top2 = mx.sort(last)[-2:]
        picks.append(int(mx.argmax(last).item()))
        margins.append((top2[1] - top2[0]).item())
        last = model(mx.array([[t]]), cache=cache)[0, -1]
        mx.eval(last)
    return picks, margins


@pytest.fixture(scope="module")
def float_run(smollm):
    """The float32 cache's 64 greedy tokens after a 1,000-token prompt."""
    model, tokenizer = smollm
    tokens = prompt_tokens(tokenizer, 1000)
    ref, _ = greedy(model, tokens, make_prompt_cache(model), 64)
    return tokens, ref


@pytest.mark.usefixtures("float_kernels")  # float32 error: the float CPU kernels
def test_q4_reading_the_same_bytes_as_mlx_lm_agrees_to_float32_error(smollm):
    # Hand mlx-lm the exact bytes kvsnap stored (float16 scales): both
    # attention paths then agree to float32 accumulation error. (mlx-lm's own
    # QuantizedKVCache keeps float32 scales for a float32 model, so its greedy
    # picks differ from kvsnap's at SmolLM2's many near ties; both agree with
    # the float cache equally often: test_agreement_with_the_float_cache.)
    model, tokenizer = smollm
    tokens = prompt_tokens(tokenizer, 1000)
    ours = kc.make_cache(model, rotate=False)
    prefill(model, tokens, ours)
    theirs = kc.to_mlx(ours)
    nxt = mx.array([[int(tokens[-1].item())]])
    a = model(nxt, cache=ours)[0, -1]
    b = model(nxt, cache=theirs)[0, -1]
    scale = mx.abs(b).max().item()
    assert mx.abs(a - b).max().item() < 2e-4 * scale


def test_agreement_with_the_float_cache(smollm, float_run):
    # Teacher-forced along the float run: kvsnap's default (Hadamard-rotated
    # Q4) picks the float token at least as often as mlx-lm's own 4-bit
    # cache, and 8-bit at least 95% of the time. (Free-running greedy text
    # diverges for good at the first near tie, for mlx-lm's caches too.)
    model, _ = smollm
    tokens, follow = float_run
    q4_default, _ = forced_picks(model, tokens, kc.make_cache(model), follow)
    q4_mlx, _ = forced_picks(
        model, tokens, [QuantizedKVCache(group_size=64, bits=4) for _ in model.layers], follow
    )
    q8, _ = forced_picks(model, tokens, kc.make_cache(model, bits=8), follow)
    agree = {
        name: float(np.mean(np.array(p) == np.array(follow)))
        for name, p in (("kvsnap q4", q4_default), ("mlx-lm q4", q4_mlx), ("kvsnap q8", q8))
    }
    assert agree["kvsnap q4"] >= agree["mlx-lm q4"], agree
    assert agree["kvsnap q4"] >= 0.85, agree
    assert agree["kvsnap q8"] >= 0.95, agree


def perplexity(model, ids: list[int], make, windows: int = 2) -> float:
    nll = []
    for w in range(windows):
        x = mx.array(ids[w * 512 : (w + 1) * 512])[None]
        out = model(x, cache=make())
        logp = out[0, :-1] - mx.logsumexp(out[0, :-1], axis=-1, keepdims=True)
        nll.append(-mx.take_along_axis(logp, x[0, 1:, None], axis=-1).mean().item())
    return float(np.exp(np.mean(nll)))


def test_rotation_cuts_the_perplexity_cost_of_q4(smollm):
    model, tokenizer = smollm
    ids = tokenizer.encode(TEXT)
    base = perplexity(model, ids, lambda: make_prompt_cache(model))
    plain = perplexity(model, ids, lambda: kc.make_cache(model, rotate=False))
    rotated = perplexity(model, ids, lambda: kc.make_cache(model))
    assert base < rotated < plain, (base, rotated, plain)
    assert (rotated - base) < 0.6 * (plain - base), (base, rotated, plain)


def test_mlx_lm_generate_and_stream_generate_use_the_cache(smollm):
    model, tokenizer = smollm
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    cache = kc.make_cache(model)
    text = generate(model, tokenizer, prompt, max_tokens=12, prompt_cache=cache)
    assert "Paris" in text
    assert cache.offset > len(prompt) + 3  # the prompt and the answer went through it
    # The same through stream_generate with a fresh cache.
    cache = kc.make_cache(model)
    pieces = [r.text for r in stream_generate(model, tokenizer, prompt, max_tokens=12, prompt_cache=cache)]
    assert "".join(pieces) == text


def test_gemma3_windowed_cache_agrees_with_the_float_cache():
    # Gemma 3: 5 of every 6 layers see only the last 512 tokens. A 1,200-token
    # prompt crosses the window, so windowed blocks are freed as decoding goes.
    model, tokenizer = load("gemma3-270m")
    tokens = prompt_tokens(tokenizer, 1200)
    cache = kc.make_cache(model, bits=8)
    ours, _ = greedy(model, tokens, cache, 24)
    ref, _ = greedy(model, tokens, make_prompt_cache(model), 24)
    assert np.mean(np.array(ours) == np.array(ref)) == 1.0
    windowed = [s for s in cache.sequences if s.window]
    assert windowed and windowed[0].window == 512
    live = [b for b in windowed[0].blocks if b >= 0]
    assert len(live) <= 3  # 512 + 1 tokens span at most 3 blocks of 256


def test_8bit_and_6bit_keys_with_4bit_values_stay_within_1_percent_perplexity(smollm):
    # SmolLM2's keys carry the outlier channels: with them at 8 bits (values at
    # 4, rotated; 6.5 bits per element) or at 6 bits (quality="accurate", 5.5
    # bits per element) perplexity stays within 1% of float.
    model, tokenizer = smollm
    ids = tokenizer.encode(TEXT)
    base = perplexity(model, ids, lambda: make_prompt_cache(model))
    k8v4 = perplexity(model, ids, lambda: kc.make_cache(model, key_bits=8))
    assert k8v4 < base * 1.01, (base, k8v4)
    k6v4 = perplexity(model, ids, lambda: kc.make_cache(model, quality="accurate"))
    assert k6v4 < base * 1.01, (base, k6v4)
