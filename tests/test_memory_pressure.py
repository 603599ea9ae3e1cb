"""AgentMemory under memory pressure: agents of very different sizes,
requests from many threads at once, budgets from "the largest agent barely
fits alone" to "everything fits". The budget is never exceeded (checked
before every forward pass, as the scheduler reserves), no request waits
forever (threads joined with a timeout), no running agent is evicted, and
every agent gets the same greedy tokens as with a budget that never evicts.

Batching changes rounding (see test_scheduler.py): 8-bit K/V, and a
difference in greedy tokens must start at a near tie of the model (top-two
margin under 0.5 logits). Model: the small random-weight llama of
tests/serving.py (SmolLM2's tokenizer), prompts as token ids.
"""

from __future__ import annotations

import threading

import mlx.core as mx
import numpy as np
import pytest
from kvsnap import make_cache
from kvsnap.memory import AgentMemory
from kvsnap.models import load
from serving import tiny_model_dir

SIZES = {"tiny": 40, "small": 150, "mid": 520, "large": 900, "huge": 1300, "odd": 300}
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load(tiny_model_dir(tmp_path_factory.mktemp("models") / "tiny-llama"))


def prompts(seed: int, extra: dict[str, list[int]] | None = None) -> dict[str, list[int]]:
    rng = np.random.default_rng(seed)
    out = {a: rng.integers(100, 40000, n).tolist() for a, n in SIZES.items()}
    return {a: ids + (extra or {}).get(a, []) for a, ids in out.items()}


class Checked(AgentMemory):
    """Checks the budget and that no running agent was evicted before every forward pass."""

    violations: list

    def _reserve(self, cache, n_tokens):
        super()._reserve(cache, n_tokens)
        with self._lock:
            if self.budget.used > self.budget.limit:
                self.violations.append(("over budget", self.budget.used, self.budget.limit))
            if not any(a.cache is cache for a in self._agents.values()):
                self.violations.append(("evicted while running", n_tokens))


def run_all(memory: AgentMemory, jobs: dict[str, list[int]]) -> dict[str, list[int]]:
    out, errors = {}, []

    def run(agent, ids):
        try:
            out[agent] = memory.generate(agent, ids, max_tokens=MAX_TOKENS).tokens
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append((agent, repr(e)))

    threads = [threading.Thread(target=run, args=job, daemon=True) for job in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a request never finished (deadlock?)"
    assert not errors, errors
    return out


def same_or_near_tie(model, ids: list[int], a: list[int], b: list[int]) -> bool:
    j = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), None)
    if j is None:
        return len(a) == len(b)
    logits = model(mx.array([ids + a[:j]]), cache=make_cache(model, bits=8))[0, -1]
    return abs(float(logits[a[j]] - logits[b[j]])) < 0.5


def test_budgets_from_one_agent_to_all_give_the_same_tokens(tiny, tmp_path):
    model, tokenizer = tiny
    phase1 = prompts(0)
    # The reference: a budget that never evicts, one request at a time.
    ref = AgentMemory(model, tokenizer, path=tmp_path / "ref", budget="1GB", bits=8)
    want1 = {a: ref.generate(a, ids, max_tokens=MAX_TOKENS).tokens for a, ids in phase1.items()}
    phase2 = {a: ids + want1[a] + prompts(1)[a][:60] for a, ids in phase1.items()}
    want2 = {a: ref.generate(a, ids, max_tokens=MAX_TOKENS).tokens for a, ids in phase2.items()}
    assert ref.stats()["evictions"] == 0
    one = ref._need_bytes(max(len(ids) for ids in phase2.values()) + MAX_TOKENS)
    everything = sum(ref._need_bytes(len(ids) + MAX_TOKENS) for ids in phase2.values())
    ref.close()

    figures = {}
    for name, budget in (("one agent barely fits", one), ("two agents", 2 * one), ("half", everything // 2),
                         ("everything fits", everything)):
        memory = Checked(model, tokenizer, path=tmp_path / name.replace(" ", "-"), budget=budget, bits=8)
        memory.violations = []
        got1 = run_all(memory, phase1)
        got2 = run_all(memory, phase2)  # agents come back from disk while others decode
        stats = memory.stats()
        assert memory.violations == [], (name, memory.violations[:5])
        assert memory.budget.used <= memory.budget.limit
        for a in phase1:
            assert same_or_near_tie(model, phase1[a], want1[a], got1[a]), (name, a, want1[a], got1[a])
            assert same_or_near_tie(model, phase2[a], want2[a], got2[a]), (name, a, want2[a], got2[a])
        figures[name] = (budget, stats["evictions"], stats["restores"], round(stats["batch_size_mean"], 2))
        if name != "everything fits":
            assert stats["evictions"] > 0, name
        memory.close()
        # Every agent is on disk at its last turn.
        again = AgentMemory(model, tokenizer, path=tmp_path / name.replace(" ", "-"), budget="1GB", bits=8)
        for a, ids in phase2.items():
            assert again.history(a) == ids + got2[a][:-1]
        again.close()
    print("pressure figures (budget, evictions, restores, mean batch):", figures)
