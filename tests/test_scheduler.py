"""Agents that speak together decode together: AgentMemory's step loop on a
real model (SmolLM2-135M), requests from many threads.

Batched and one-at-a-time runs can differ by rounding (see test_batch.py):
the comparisons run with 8-bit K/V, and a difference in greedy tokens must
start at a near tie of the model (top-two margin under 0.5 logits).
Text: Debian's license texts.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import mlx.core as mx
import pytest
from kvsnap import make_cache
from kvsnap.memory import AgentMemory
from kvsnap.models import load

WORDS = Path("/usr/share/common-licenses/GPL-2").read_text().split()


@pytest.fixture(scope="module")
def smollm():
    return load("smollm2-135m")


def prompt(i: int, n_words: int) -> str:
    return " ".join(WORDS[i * 150 :][:n_words]) + " To summarize:"


def run_threads(memory, jobs, stagger=0.0, max_tokens=6):
    """jobs: {agent: prompt}; all start together (or staggered); returns replies."""
    replies, errors = {}, []

    def run(agent, text):
        try:
            replies[agent] = memory.generate(agent, text, max_tokens=max_tokens)
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append((agent, e))

    threads = [threading.Thread(target=run, args=job) for job in jobs.items()]
    for t in threads:
        t.start()
        time.sleep(stagger)
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    assert all(not t.is_alive() for t in threads), "a request never finished"
    return replies


def same_or_near_tie(model, tokenizer, text, a: list[int], b: list[int]) -> bool:
    j = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), None)
    if j is None:
        return len(a) == len(b)
    cache = make_cache(model, bits=8)
    ids = tokenizer.encode(text) + a[:j]
    logits = model(mx.array([ids]), cache=cache)[0, -1]
    return abs(float(logits[a[j]] - logits[b[j]])) < 0.5


def test_concurrent_agents_decode_in_one_batch_and_match_one_at_a_time(smollm, tmp_path):
    model, tokenizer = smollm
    jobs = {f"a{i}": prompt(i, n) for i, n in enumerate((60, 400, 150, 900, 250))}
    alone = AgentMemory(model, tokenizer, path=tmp_path / "alone", budget="512MB", bits=8)
    want = {a: alone.generate(a, text, max_tokens=24).tokens for a, text in jobs.items()}
    assert max(alone._scheduler.batch_sizes) == 1
    alone.close()

    together = AgentMemory(model, tokenizer, path=tmp_path / "together", budget="512MB", bits=8)
    # Staggered arrivals: later agents join a batch that is already decoding,
    # their prefill chunks interleaved with its steps.
    got = run_threads(together, jobs, stagger=0.3, max_tokens=24)
    assert max(together._scheduler.batch_sizes) >= 2
    for a, text in jobs.items():
        assert same_or_near_tie(model, tokenizer, text, want[a], got[a].tokens), (a, want[a], got[a].tokens)
        assert got[a].usage.computed_tokens == got[a].usage.prompt_tokens
    together.close()


def test_admission_holds_the_budget_and_never_evicts_a_running_agent(smollm, tmp_path):
    model, tokenizer = smollm
    probe = AgentMemory(model, tokenizer, path=tmp_path / "probe", budget="512MB")
    one = probe._need_bytes(700)
    probe.close()

    violations = []

    class Checked(AgentMemory):
        def _reserve(self, cache, n_tokens):
            super()._reserve(cache, n_tokens)
            with self._lock:  # called before every forward pass, for each running request
                if self.budget.used > self.budget.limit:
                    violations.append(("budget", self.budget.used))
                if not any(a.cache is cache for a in self._agents.values()):
                    violations.append(("evicted while running", n_tokens))

    memory = Checked(model, tokenizer, path=tmp_path / "tight", budget=int(2.5 * one))
    jobs = {f"b{i}": prompt(10 + i, 450) for i in range(6)}
    replies = run_threads(memory, jobs)
    assert not violations
    assert len(replies) == 6 and all(r.tokens for r in replies.values())
    stats = memory.stats()
    assert stats["evictions"] >= 3 and stats["agents_on_disk"] == 6
    assert memory.budget.used <= memory.budget.limit
    # Second phase, all at once again: agents come back from disk while others decode.
    again = run_threads(memory, {a: text + " " + replies[a].text + " Next," for a, text in jobs.items()})
    assert sum(r.source == "disk" for r in again.values()) >= 3
    assert not violations
    memory.close()


def test_closing_the_stream_early_ends_the_request_and_keeps_the_agent(smollm, tmp_path):
    model, tokenizer = smollm
    memory = AgentMemory(model, tokenizer, path=tmp_path / "s", budget="256MB")
    stream = memory.stream("c", prompt(3, 100), max_tokens=40)
    first = next(stream)
    assert isinstance(first, str)
    stream.close()  # the caller stops reading
    info = memory.info("c")
    assert info.resident and not info.busy and info.n_tokens > 100
    # The agent goes on from what it computed; a new request is served at once.
    reply = memory.generate("c", prompt(3, 100) + " And", max_tokens=3, wait=False)
    assert reply.usage.cached_tokens > 100
    memory.close()
