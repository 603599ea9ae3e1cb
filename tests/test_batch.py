"""Ragged batches over kvsnap caches (kvsnap.batch).

Real models: SmolLM2-135M and Gemma-3-270M (sliding window), prompts from
Debian's license texts. Each agent is prefilled once; the batched run and the
run alone start from copies of that cache (same bytes), so any difference
comes from the batched forward pass itself. kvsnap's attention gives a
sequence the same bits alone or in any batch (its key splits depend on the
sequence and the process's thread count, never on the batch), but
OpenBLAS's matmuls round a row differently when the matrix has more rows
(measured: ~1e-6 on some of SmolLM2's projections).
Stored K/V are quantized, and a rounding difference that lands on a
quantization boundary moves one code by a whole step: at 4 bits that moves
later logits by up to ~1, at 8 bits by ~1/16 of that. The comparison
therefore runs at 8 bits, where the logits must stay within TOL at every
step (wrong offsets, tables or lengths move them by many logits), and greedy tokens must agree wherever the alone run's top two logits
are further apart than that (near ties are followed and counted: Gemma-3-270M,
a base model, has many at this margin).

Small random-weight models check the mechanics mlx-lm's BatchGenerator relies
on (merge, filter, extend, extract, deepcopy, ragged prefill).
"""

from __future__ import annotations

import copy
from pathlib import Path

import kvsnap
import mlx.core as mx
import numpy as np
import pytest
from kvsnap.batch import batch_cache, share
from kvsnap.errors import InvalidArgumentError
from kvsnap.models import load
from mlx_lm import batch_generate
from mlx_lm.models.cache import make_prompt_cache
from small_models import VOCAB, prompt, small_model

WORDS = " ".join(Path(f"/usr/share/common-licenses/{n}").read_text() for n in ("GPL-3", "GPL-2", "LGPL-2.1")).split()
TOL = 0.5  # batched vs one-row rounding, through 8-bit K/V over 8 steps, in logits (of ~20)


def text_ids(tokenizer, n: int, seed: int) -> list[int]:
    ids = tokenizer.encode(" ".join(WORDS[seed * 97 :][: 2 * n]))
    assert len(ids) >= n
    return ids[:n]


def prefill(model, ids: list[int]) -> tuple[kvsnap.cache.PromptCache, mx.array]:
    cache = kvsnap.make_cache(model, bits=8)
    for i in range(0, len(ids), 256):
        logits = model(mx.array([ids[i : i + 256]]), cache=cache)[:, -1]
        mx.eval(logits)
    return cache, logits


@pytest.mark.parametrize(
    "name, lengths",
    [("smollm2-135m", [100, 3000, 450, 1700, 250, 900, 2300, 130]), ("gemma3-270m", [120, 2000, 600, 900, 300])],
)
def test_batched_decode_equals_each_agent_alone(name, lengths):
    model, tokenizer = load(name)
    steps, arrive = 8, list(range(len(lengths)))  # agent i joins the running batch at step i
    agents = []
    for i, n in enumerate(lengths):
        cache, logits = prefill(model, text_ids(tokenizer, n, i))
        agents.append((cache, int(mx.argmax(logits).item())))
    # Alone: one agent at a time, greedy, logits kept.
    alone_logits, alone_tokens = [], []
    for cache, first in agents:
        c, t, ls, ts = share(cache), first, [], [first]
        for _ in range(steps):
            out = model(mx.array([[t]]), cache=c)[0, -1]
            mx.eval(out)
            ls.append(np.array(out))
            t = int(np.argmax(ls[-1]))
            ts.append(t)
        alone_logits.append(ls)
        alone_tokens.append(ts)
    # Batched: agents join at their step and leave after `steps` steps.
    running: dict[int, tuple] = {}
    done = {}
    step, near_ties, worst = 0, 0, 0.0
    while len(done) < len(agents):
        for i in arrive:
            if i == step:
                running[i] = (share(agents[i][0]), [agents[i][1]], [])
        order = sorted(running)
        caches = [running[i][0] for i in order]
        tokens = mx.array([[running[i][1][-1]] for i in order])
        out = model(tokens, cache=batch_cache(caches) if len(caches) > 1 else caches[0])[:, -1]
        mx.eval(out)
        for row, i in enumerate(order):
            logits = np.array(out[row])
            k = len(running[i][2])
            ref = alone_logits[i][k]
            worst = max(worst, float(np.abs(logits - ref).max()))
            assert worst < TOL, (name, i, k, worst)
            running[i][2].append(logits)
            top2 = np.sort(ref)[-2:]
            t = int(np.argmax(logits))
            if top2[1] - top2[0] > TOL:
                assert t == alone_tokens[i][k + 1], (name, i, k)
            else:  # a near tie: follow the alone run so the rest stays comparable
                t = alone_tokens[i][k + 1]
                near_ties += 1
            running[i][1].append(t)
            if len(running[i][2]) == steps:
                done[i] = running.pop(i)
        step += 1
    for i in range(len(agents)):
        assert done[i][1] == alone_tokens[i]
    print(f"{name}: worst logit difference batched vs alone {worst:.2e}, near ties {near_ties}")


def test_batch_generate_with_kvsnap_caches_matches_float_caches():
    model, tokenizer = load("smollm2-135m")
    prompts = [text_ids(tokenizer, n, i) for i, n in enumerate((40, 300, 120, 700, 60))]
    max_tokens = 12
    ref = batch_generate(model, tokenizer, prompts, max_tokens=max_tokens, return_token_ids=True)
    ours = batch_generate(
        model, tokenizer, prompts, max_tokens=max_tokens, return_token_ids=True,
        prompt_caches=[kvsnap.make_cache(model, key_bits=8) for _ in prompts],
    )
    agree = 0  # tokens before the first difference, over all prompts
    for p, a, b in zip(prompts, ref.token_ids, ours.token_ids):
        j = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if j is None:
            assert len(a) == len(b)
            agree += len(a)
            continue
        agree += j
        # The first difference must be a near tie of the float model: 8-bit keys
        # and 4-bit values move logits by a few hundredths.
        c = make_prompt_cache(model)
        logits = model(mx.array([p + a[:j]]), cache=c)[0, -1]
        margin = float(logits[a[j]] - logits[b[j]])
        assert 0 <= margin < 0.5, (j, margin)
    # Differences are rare: most tokens come before the first one (a greedy
    # run that parts at a near tie then follows another text).
    assert agree >= len(prompts) * max_tokens // 2, agree


# Batched rows against the same sequences alone on small models (see its
# first use). 2e-2: OpenBLAS's FMA kernels on AMD Zen 3 round a row of a
# 210-row matmul differently from the same row alone, and an 8-bit code then
# flipping moved ragged prefill's logits by 7e-3 (5e-3 held on the AVX-512
# Xeon); a wrong row is off by ~1.
ROW_TOL = 2e-2


def test_merge_filter_extend_extract_copy_on_small_models():
    for arch in ("llama", "gemma3"):
        model = small_model(arch)
        lengths = [30, 75, 120]
        caches = [kvsnap.make_cache(model, block_tokens=16) for _ in lengths]
        refs = [kvsnap.make_cache(model, block_tokens=16) for _ in lengths]
        for c, r, n in zip(caches, refs, lengths):
            mx.eval(model(prompt(n, seed=n)[None], cache=c), model(prompt(n, seed=n)[None], cache=r))
        before = [c.block_tables for c in caches]
        batch = [c.merge([p[i] for p in caches]) for i, c in enumerate(caches[0])]
        assert [c.block_tables for c in caches] == before  # merge shares, the caches stay as they were
        assert batch[0].offset.tolist() == lengths

        def step(tokens, cache, model=model):
            out = model(mx.array(tokens), cache=cache)[:, -1]
            mx.eval(out)
            return out

        out = step([[1], [2], [3]], batch)
        ref = mx.concatenate([step([[t]], r) for t, r in zip((1, 2, 3), refs)])
        # ROW_TOL: the model's own matmuls round a row differently in a batch
        # (README, "Batching and rounding"); a 4-bit code of the new token can
        # then differ by one step. A wrong row would be off by ~1.
        assert mx.abs(out - ref).max().item() < ROW_TOL
        # A deep copy is independent; filtering each side keeps different rows.
        twin = copy.deepcopy(batch)
        for c in batch:
            c.filter([0, 2])
        for c in twin:
            c.filter([1])
        out = step([[4], [5]], batch)
        ref = mx.concatenate([step([[t]], r) for t, r in zip((4, 5), (refs[0], refs[2]))])
        assert mx.abs(out - ref).max().item() < ROW_TOL
        out = step([[6]], twin)
        assert mx.abs(out - step([[6]], refs[1])).max().item() < ROW_TOL
        # Extend: rows of another batch join; extract gives an independent cache.
        for a, b in zip(batch, twin):
            a.extend(b)
        assert batch[0].offset.tolist() == [32, 122, 77]
        row = [c.extract(2) for c in batch]
        out = step([[7], [8], [9]], batch)
        ref = mx.concatenate([step([[t]], r) for t, r in zip((7, 8, 9), (refs[0], refs[2], refs[1]))])
        assert mx.abs(out - ref).max().item() < ROW_TOL
        assert row[0].offset == 77  # the extracted copy did not move on with the batch
        assert caches[0][0].offset == 30  # nor did the original caches


def test_ragged_prefill_writes_only_the_real_tokens():
    model = small_model("gemma3")
    lengths = [5, 70, 33]
    # 8-bit: a 4-bit code of a key can round the other way in a batch (its
    # row's matmuls round differently), which on this random-weight model
    # moves logits by ~0.1; at 8 bits such a flip stays under ROW_TOL.
    caches = [kvsnap.make_cache(model, block_tokens=16, bits=8) for _ in lengths]
    batch = batch_cache(caches)
    width = max(lengths)
    padded = mx.array([prompt(n, seed=n).tolist() + [0] * (width - n) for n in lengths])
    for c in batch:
        c.prepare(lengths=lengths, right_padding=[width - n for n in lengths])
    mx.eval(model(padded, cache=batch))
    for c in batch:
        c.finalize()
    assert [c.offset for c in caches] == lengths
    assert [len(c.sequences[0].blocks) for c in caches] == [-(-n // 16) for n in lengths]
    out = model(mx.array([[9], [9], [9]]), cache=batch)[:, -1]
    for row, n in enumerate(lengths):
        r = kvsnap.make_cache(model, block_tokens=16, bits=8)
        ref = model(mx.concatenate([prompt(n, seed=n), mx.array([9])])[None], cache=r)[0, -1]
        assert mx.abs(out[row] - ref).max().item() < ROW_TOL  # see ROW_TOL


def test_batches_refuse_what_they_cannot_serve():
    llama, gemma = small_model("llama"), small_model("gemma3")
    with pytest.raises(InvalidArgumentError, match="one model"):
        batch_cache([kvsnap.make_cache(llama), kvsnap.make_cache(gemma)])
    with pytest.raises(InvalidArgumentError):
        batch_cache([])
    batch = batch_cache([kvsnap.make_cache(llama), kvsnap.make_cache(llama)])
    with pytest.raises(InvalidArgumentError, match="left_padding"):
        batch[0].prepare(left_padding=[2, 0])
    with pytest.raises(ValueError):  # 3 rows for 2 sequences (RoPE's offsets refuse it first)
        llama(mx.zeros((3, 4), dtype=mx.int32), cache=batch)
    assert all(c.offset == 0 for m in batch[0].batch.members for c in m)
    assert VOCAB > 9
