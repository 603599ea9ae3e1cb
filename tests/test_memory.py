"""AgentMemory's contract on a real model (SmolLM2-135M): replies, reuse,
eviction and restore, restart, budgets, bad input, concurrency, memory
returned to the OS.

Text: Debian's license texts in /usr/share/common-licenses.
"""

from __future__ import annotations

import gc
import os
import threading
import time
from pathlib import Path

import kvsnap
import mlx.core as mx
import pytest
from kvsnap.errors import (
    AgentBusyError,
    AgentNotFoundError,
    BudgetExceededError,
    FormatMismatchError,
    InvalidAgentIdError,
    InvalidArgumentError,
)
from kvsnap.memory import AgentMemory, parse_bytes
from kvsnap.models import load

TEXT = Path("/usr/share/common-licenses/GPL-3").read_text().split()


def text(start: int, n: int) -> str:
    return " ".join(TEXT[start : start + n])


@pytest.fixture(scope="module")
def smollm():
    return load("smollm2-135m")


@pytest.fixture
def memory(smollm, tmp_path):
    model, tokenizer = smollm
    m = AgentMemory(model, tokenizer, path=tmp_path / "store", budget="256MB")
    yield m
    m.close()


def chat(system: str, *turns: str) -> list[dict]:
    out = [{"role": "system", "content": system}]
    for i, t in enumerate(turns):
        out.append({"role": "user" if i % 2 == 0 else "assistant", "content": t})
    return out


def test_parse_bytes():
    assert parse_bytes("512MB") == 512 * 10**6
    assert parse_bytes("1.5GiB") == 3 * 2**29
    assert parse_bytes(4096) == 4096
    for bad in ("lots", "12 parsecs", -1, 0, "0MB", True, 1.5):
        with pytest.raises(InvalidArgumentError):
            parse_bytes(bad)


def test_reply_and_cross_phase_reuse(memory, smollm):
    _, tokenizer = smollm
    system = text(0, 300)
    r1 = memory.generate("alice", chat(system, "Summarize the preamble in one sentence."), max_tokens=12)
    assert r1.source == "none" and r1.usage.cached_tokens == 0
    assert r1.usage.computed_tokens == r1.usage.prompt_tokens > 300
    assert 1 <= len(r1.tokens) <= 12 and r1.finish_reason in ("stop", "length")
    assert r1.text == tokenizer.decode([t for t in r1.tokens if t not in tokenizer.eos_token_ids])
    assert r1.timings.ttft_s > 0 and r1.timings.prefill_s > 0

    # Phase 2 sends the whole conversation back, the reply included: only
    # the new user turn (and the end of the reply's turn) is computed.
    question = "And what about the freedom to change it?"
    r2 = memory.generate("alice", chat(system, "Summarize the preamble in one sentence.", r1.text, question),
                         max_tokens=8)
    new = len(tokenizer.encode(question, add_special_tokens=False))
    assert r2.source == "hot"
    # + the reply's last token (sampled, never fed) and ChatML's turn markers:
    # "<|im_end|>\n<|im_start|>user\n" (5) and "<|im_end|>\n<|im_start|>assistant\n" (6).
    assert r2.usage.computed_tokens <= new + 1 + 11
    assert r2.usage.cached_tokens == r2.usage.prompt_tokens - r2.usage.computed_tokens
    assert r2.usage.cached_tokens >= r1.usage.prompt_tokens + len(r1.tokens) - 1

    # A diverging conversation trims to the common prefix and recomputes the rest.
    r3 = memory.generate("alice", chat(system, "Something else entirely."), max_tokens=4)
    assert r3.usage.cached_tokens >= 300 and r3.usage.computed_tokens < 20
    info = memory.info("alice")
    assert info.resident and info.on_disk and info.n_tokens == r3.usage.prompt_tokens + len(r3.tokens) - 1


def test_stream_yields_the_text_then_the_reply(memory):
    pieces = list(memory.stream("bob", text(100, 80) + " In short,", max_tokens=10))
    reply = pieces[-1]
    assert isinstance(reply, kvsnap.Reply)
    assert all(isinstance(p, str) for p in pieces[:-1])
    assert "".join(pieces[:-1]) == reply.text


def test_stop_strings_and_sampling_are_honoured(memory):
    greedy = memory.generate("carol", text(300, 60), max_tokens=12)
    assert len(greedy.text) > 4
    stop = greedy.text[2:4]
    cut = memory.generate("carol2", text(300, 60), max_tokens=12, stop=[stop])
    assert cut.finish_reason == "stop" and stop not in cut.text and greedy.text.startswith(cut.text)
    a = memory.generate("d1", text(300, 60), max_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    b = memory.generate("d2", text(300, 60), max_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    assert a.tokens == b.tokens  # the seed fixes the draw


def test_evict_restore_and_restart_give_the_same_tokens(smollm, tmp_path):
    model, tokenizer = smollm
    system = text(500, 700)
    turn1, turn2 = "What is this text about?", "Name one obligation it creates."

    def conversation(memory, between):
        r1 = memory.generate("a", chat(system, turn1), max_tokens=6)
        memory = between(memory)
        r2 = memory.generate("a", chat(system, turn1, r1.text, turn2), max_tokens=6)
        return r1, r2, memory

    m = AgentMemory(model, tokenizer, path=tmp_path / "hot", budget="256MB")
    _hot1, hot2, m = conversation(m, lambda m: m)
    assert hot2.source == "hot"
    m.close()

    m = AgentMemory(model, tokenizer, path=tmp_path / "evicted", budget="256MB")

    def evict(m):
        m.evict("a")
        assert not m.info("a").resident and m.info("a").on_disk
        assert m.stats()["bytes_in_use"] == 0
        return m

    _ev1, ev2, m = conversation(m, evict)
    assert ev2.source == "disk" and ev2.tokens == hot2.tokens
    assert ev2.usage.computed_tokens == hot2.usage.computed_tokens
    m.close()

    path = tmp_path / "restart"
    m = AgentMemory(model, tokenizer, path=path, budget="256MB")

    def restart(m):
        m.close()
        m2 = AgentMemory(model, tokenizer, path=path, budget="256MB")
        assert m2.agents() == ["a"] and not m2.info("a").resident
        return m2

    _rs1, rs2, m = conversation(m, restart)
    assert rs2.source == "disk" and rs2.tokens == hot2.tokens
    # After a restart the reply's last token has no K/V on disk: at most one more token.
    assert rs2.usage.computed_tokens <= hot2.usage.computed_tokens + 1
    m.close()


def test_agents_sharing_a_prefix_hold_it_once(smollm, tmp_path):
    model, tokenizer = smollm
    shared = text(0, 700)  # > 2 blocks of 256 tokens
    m = AgentMemory(model, tokenizer, path=tmp_path / "s", budget="256MB")
    first = m.generate("x", chat(shared, "First question?"), max_tokens=3)
    second = m.generate("y", chat(shared, "Another one?"), max_tokens=3)
    assert first.source == "none" and second.source == "shared"
    assert second.usage.cached_tokens >= 512 and second.usage.computed_tokens < first.usage.computed_tokens
    stats = m.stats()
    assert stats["blocks_shared"] >= 2
    # A third agent with the same prefix, from disk after a restart: adopts the resident blocks.
    m.evict("y")
    z = m.generate("z", chat(shared, "Third?"), max_tokens=3)
    assert z.source == "shared"
    blocks = sorted(p.name for p in (tmp_path / "s" / "blocks").iterdir())
    assert len(blocks) == len(set(blocks)) == stats["disk_blocks"]
    # Evicting one sharer keeps the blocks for the others; forgetting all frees everything.
    for a in ("x", "y", "z"):
        m.forget(a)
    assert m.stats()["bytes_in_use"] == 0 and m.agents() == []
    assert not any((tmp_path / "s" / "blocks").iterdir())
    m.close()


def test_budget_is_held_and_lru_agents_are_evicted(smollm, tmp_path):
    model, tokenizer = smollm
    probe = AgentMemory(model, tokenizer, path=tmp_path / "probe", budget="256MB")
    one = probe._need_bytes(700)
    probe.close()
    budget = int(one * 2.5)

    steps = []

    class Checked(AgentMemory):
        def _reserve(self, cache, n_tokens):  # before every forward pass, after its blocks are taken
            super()._reserve(cache, n_tokens)
            steps.append(self.budget.used)
            assert self.budget.used <= self.budget.limit

    m = Checked(model, tokenizer, path=tmp_path / "b", budget=budget)
    for i, a in enumerate(("p", "q", "r", "s")):
        m.generate(a, text(1000 + 600 * i, 450), max_tokens=3)
        assert m.budget.used <= budget
    stats = m.stats()
    assert len(steps) >= 4 * 3 and max(steps) <= budget
    assert stats["evictions"] >= 1 and stats["agents_on_disk"] == 4
    assert not m.info("p").resident and m.info("s").resident  # least recently used went first
    # A request that cannot fit even alone is refused up front; nothing changes.
    before = m.info("s")
    with pytest.raises(BudgetExceededError) as e:
        m.generate("s", text(0, 3000), max_tokens=10)
    assert str(budget) in str(e.value) and e.value.need > budget
    assert m.info("s") == before
    m.close()


def test_bad_input_is_refused_with_memory_unchanged(memory):
    memory.generate("ok", text(0, 50), max_tokens=2)
    before = memory.info("ok")
    cases = [
        ({"agent_id": "../etc", "prompt": "hi", "max_tokens": 2}, InvalidAgentIdError),
        ({"agent_id": "", "prompt": "hi", "max_tokens": 2}, InvalidAgentIdError),
        ({"agent_id": "ok", "prompt": "", "max_tokens": 2}, InvalidArgumentError),
        ({"agent_id": "ok", "prompt": [], "max_tokens": 2}, InvalidArgumentError),
        ({"agent_id": "ok", "prompt": [1, -5], "max_tokens": 2}, InvalidArgumentError),
        ({"agent_id": "ok", "prompt": [{"role": "user"}], "max_tokens": 2}, InvalidArgumentError),
        ({"agent_id": "ok", "prompt": "hi", "max_tokens": 0}, InvalidArgumentError),
        ({"agent_id": "ok", "prompt": "hi", "max_tokens": -3}, InvalidArgumentError),
        ({"agent_id": "ok", "prompt": "hi", "max_tokens": 2, "temperature": -1}, InvalidArgumentError),
        ({"agent_id": "ok", "prompt": "hi", "max_tokens": 2, "top_p": 0}, InvalidArgumentError),
        ({"agent_id": "ok", "prompt": "hi", "max_tokens": 2, "stop": [""]}, InvalidArgumentError),
        ({"agent_id": "ok", "prompt": [5] * 9000, "max_tokens": 2}, InvalidArgumentError),  # context is 8192
        ({"agent_id": "ok", "prompt": 12, "max_tokens": 2}, InvalidArgumentError),
    ]
    for kwargs, error in cases:
        with pytest.raises(error) as e:
            memory.generate(**kwargs)
        assert str(e.value)
        assert memory.info("ok") == before, kwargs
    for call in (memory.evict, memory.forget, memory.info):
        with pytest.raises(AgentNotFoundError, match="nobody"):
            call("nobody")
    assert memory.agents() == ["ok"]


def test_one_request_per_agent_and_many_agents_in_threads(memory):
    prompt = text(2000, 200)
    # Sequential replies of two agents, then the same from two threads at once.
    want = {a: memory.generate(a + "-seq", prompt + a, max_tokens=6).tokens for a in ("t1", "t2")}
    got, errors = {}, []

    def run(a):
        try:
            got[a] = memory.generate(a, prompt + a, max_tokens=6).tokens
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=run, args=(a,)) for a in ("t1", "t2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and got == want

    # While an agent streams, a second request for it waits or is refused.
    stream = memory.stream("t1", prompt + "t1 more", max_tokens=6)
    next(stream)
    with pytest.raises(AgentBusyError):
        memory.generate("t1", prompt, max_tokens=2, wait=False)
    waited = []
    waiter = threading.Thread(target=lambda: waited.append(memory.generate("t1", prompt, max_tokens=2)))
    waiter.start()
    time.sleep(0.5)
    assert not waited  # still waiting for the stream
    list(stream)
    waiter.join(timeout=120)
    assert waited and waited[0].source == "hot"


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_memory_goes_back_to_the_os_after_eviction(smollm, tmp_path):
    model, tokenizer = smollm
    m = AgentMemory(model, tokenizer, path=tmp_path / "rss", budget="1GB")
    # As long as the agents below: what kvsnap keeps per model, not per agent
    # (the key offsets' position tables, kvsnap.offsets), is built before `before`.
    m.generate("warm", text(0, 1200), max_tokens=2)
    m.forget("warm")
    gc.collect()
    mx.clear_cache()
    before = rss_bytes()
    for i in range(6):
        m.generate(f"r{i}", text(600 * i, 1200), max_tokens=2)
    used = m.stats()["bytes_in_use"]
    assert used > 50 * 2**20
    for i in range(6):
        m.evict(f"r{i}")
    assert m.stats()["bytes_in_use"] == 0
    gc.collect()
    mx.clear_cache()
    after = rss_bytes()
    assert after - before < 8 * 2**20, (before, after, used)
    m.close()


def test_accurate_memory_wakes_6bit_agents_and_a_default_one_refuses_them(smollm, tmp_path):
    # quality="accurate": 6-bit keys, 4-bit values. An evicted agent wakes
    # from disk to the same tokens; a memory of the default format does not
    # read its snapshot as 4-bit keys but says what differs.
    model, tokenizer = smollm
    messages = chat(text(900, 300), "What is this text about?")
    m = AgentMemory(model, tokenizer, path=tmp_path / "store", budget="256MB", quality="accurate")
    assert (m.arena.key_bits, m.arena.bits) == (6, 4)
    hot = m.generate("a", messages, max_tokens=5)
    m.evict("a")
    woken = m.generate("a", messages, max_tokens=5)
    assert woken.source == "disk" and woken.tokens == hot.tokens
    m.close()
    m = AgentMemory(model, tokenizer, path=tmp_path / "store", budget="256MB")
    with pytest.raises(FormatMismatchError, match="key_bits=4 \\(the snapshot has 6\\)"):
        m.generate("a", messages, max_tokens=5)
    m.close()
