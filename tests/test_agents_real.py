"""AgentMemory on real models: 5 agents x 4 phases give the same tokens
whether every agent stays in memory, the budget holds ~1.5 agents (constant
eviction and restore), or a fresh AgentMemory is opened between phases, and
the same tokens as each agent run alone with one uninterrupted make_cache.

Text: Debian's license texts in /usr/share/common-licenses, which nobody here
wrote. SmolLM2-135M (full attention: shared prefix blocks are adopted before
they are computed) and Gemma-3-270M (sliding-window layers: the base model,
no chat template, Gemma's turn format; shared blocks are deduplicated after
they are computed).
"""

from __future__ import annotations

from pathlib import Path

import kvsnap
import mlx.core as mx
import pytest
from kvsnap.memory import render_chat
from kvsnap.models import load

LICENSES = Path("/usr/share/common-licenses")
BLOCK = 256


def words(name: str, start: int, n: int) -> str:
    return " ".join((LICENSES / name).read_text().split()[start : start + n])


SHARED = "You are one of five agents reviewing software licenses together. " + words("GPL-3", 0, 420)
OWN = ["Apache-2.0", "MPL-2.0", "LGPL-2.1", "Artistic", "GPL-2"]
QUESTIONS = words("GFDL-1.3", 0, 400).split()


def script(n_agents: int, n_phases: int, own_words: int, user_words: int):
    """Per agent: its system prompt, then one user message per phase."""
    agents = {}
    for a in range(n_agents):
        system = SHARED + "\n\nYour own license:\n" + words(OWN[a], 0, own_words)
        users = [
            " ".join(QUESTIONS[(a * 7 + p * user_words) % 300 :][:user_words]) + " What does this mean?"
            for p in range(n_phases)
        ]
        agents[f"agent-{a}"] = (system, users)
    return agents


def messages(system: str, users: list[str], replies: list[str]) -> list[dict]:
    out = [{"role": "system", "content": system}]
    for i, u in enumerate(users):
        out.append({"role": "user", "content": u})
        if i < len(replies):
            out.append({"role": "assistant", "content": replies[i]})
    return out


def run_memory(model, tokenizer, agents, n_phases, max_tokens, path, budget, reopen=False, check=None):
    """Round-robin phases through AgentMemory; returns tokens per agent per phase and the replies."""
    memory = kvsnap.AgentMemory(model, tokenizer, path=path, budget=budget)
    tokens = {a: [] for a in agents}
    replies = {a: [] for a in agents}
    usage = {a: [] for a in agents}
    for p in range(n_phases):
        if reopen and p:
            memory.close()
            memory = kvsnap.AgentMemory(model, tokenizer, path=path, budget=budget)
        for a, (system, users) in agents.items():
            r = memory.generate(a, messages(system, users[: p + 1], replies[a]), max_tokens=max_tokens)
            tokens[a].append(r.tokens)
            replies[a].append(r.text)
            usage[a].append(r)
            if check is not None:
                check(memory)
    return memory, tokens, replies, usage


def spliced_ids(tokenizer, text: str, history: list[int]) -> list[int]:
    """The prompt ids the agent contract gives: text that extends what the
    agent holds keeps the agent's own ids for that part."""
    known = tokenizer.decode(history, skip_special_tokens=False) if history else ""
    if known and text.startswith(known):
        return history + tokenizer.encode(text[len(known):], add_special_tokens=False)
    return tokenizer.encode(text, add_special_tokens=False)


def run_alone(model, tokenizer, system, users, n_phases, max_tokens, eos):
    """One agent with one uninterrupted make_cache: trim to the common prefix,
    prefill the rest in block-aligned chunks, decode greedily."""
    cache = kvsnap.make_cache(model)
    held: list[int] = []  # ids whose K/V the cache holds
    history: list[int] = []
    out, replies = [], []
    for p in range(n_phases):
        text = render_chat(tokenizer, messages(system, users[: p + 1], replies))
        ids = spliced_ids(tokenizer, text, history)
        n = 0
        while n < min(len(held), len(ids) - 1) and held[n] == ids[n]:
            n += 1
        if n < cache.offset:
            cache.trim(cache.offset - n)
        pos = n
        while pos < len(ids):
            end = min(len(ids), (pos // BLOCK + 1) * BLOCK)
            logits = model(mx.array([ids[pos:end]]), cache=cache)[:, -1]
            mx.eval(logits)
            pos = end
        gen = []
        while True:
            t = int(mx.argmax(logits).item())
            gen.append(t)
            if t in eos or len(gen) == max_tokens:
                break
            logits = model(mx.array([[t]]), cache=cache)[:, -1]
            mx.eval(logits)
        held = ids + gen[:-1]
        history = ids + gen
        out.append(gen)
        replies.append(tokenizer.decode([t for t in gen if t not in eos]))
    cache.release()
    return out


def agent_bytes(memory, n_tokens):
    return memory._need_bytes(n_tokens)


@pytest.fixture(scope="module", params=["smollm2-135m", "gemma3-270m"])
def setup(request):
    model, tokenizer = load(request.param)
    if request.param == "smollm2-135m":
        agents = script(5, 4, own_words=700, user_words=25)
        max_tokens = 6
    else:
        agents = script(5, 4, own_words=450, user_words=25)
        max_tokens = 4
    return request.param, model, tokenizer, agents, max_tokens


def test_same_tokens_under_every_budget_and_alone(setup, tmp_path):
    name, model, tokenizer, agents, max_tokens = setup
    n_phases = 4
    eos = set(tokenizer.eos_token_ids)

    steps = []

    def within_budget(memory):
        steps.append(memory.budget.used)
        assert memory.budget.used <= memory.budget.limit

    roomy, ref_tokens, _, usage = run_memory(
        model, tokenizer, agents, n_phases, max_tokens, tmp_path / "roomy", "2GB", check=within_budget
    )
    stats = roomy.stats()
    assert stats["agents_resident"] == 5 and stats["evictions"] == 0
    # Reuse: in phase k only the new user message (and the turn markers around
    # it, and the last reply's end-of-turn token) is computed.
    for a, (system, users) in agents.items():
        for p in range(1, n_phases):
            r = usage[a][p]
            new = len(tokenizer.encode(users[p], add_special_tokens=False))
            # + the last reply token (sampled, never fed) + the turn markers
            # closing the reply and opening the user and assistant turns.
            assert r.usage.computed_tokens <= new + 1 + 11, (a, p, r.usage)
            assert r.source == "hot"
            assert r.usage.cached_tokens + r.usage.computed_tokens == r.usage.prompt_tokens
    # The shared prefix is held once in the arena and stored once on disk.
    shared_blocks = len(tokenizer.encode(render_chat(tokenizer, [{"role": "system", "content": SHARED}]))) // BLOCK
    assert shared_blocks >= 2
    assert stats["blocks_shared"] >= shared_blocks
    disk_blocks = stats["disk_blocks"]
    own_blocks = sum(roomy.info(a).n_tokens // BLOCK for a in agents) - (len(agents) - 1) * shared_blocks
    assert disk_blocks == own_blocks, (disk_blocks, own_blocks)
    roomy.close()

    # ~1.5 agents: every request evicts and restores.
    tight_budget = int(1.5 * agent_bytes(roomy, max(roomy.info(a).n_tokens for a in agents) + 64))
    tight, tight_tokens, _, tight_usage = run_memory(
        model, tokenizer, agents, n_phases, max_tokens, tmp_path / "tight", tight_budget, check=within_budget
    )
    assert tight_tokens == ref_tokens
    tstats = tight.stats()
    assert tstats["evictions"] >= 5 * (n_phases - 1) - 2 and tstats["restores"] >= 5 * (n_phases - 1) - 2
    assert sum(r.source == "disk" for u in tight_usage.values() for r in u) >= 5 * (n_phases - 1) - 2
    tight.close()

    # A fresh AgentMemory on the same path between phases.
    _, fresh_tokens, _, fresh_usage = run_memory(
        model, tokenizer, agents, n_phases, max_tokens, tmp_path / "fresh", "2GB", reopen=True
    )
    assert fresh_tokens == ref_tokens
    assert all(u[p].source == "disk" for u in fresh_usage.values() for p in range(1, n_phases))

    # Each agent alone, one uninterrupted make_cache.
    for a, (system, users) in agents.items():
        alone = run_alone(model, tokenizer, system, users, n_phases, max_tokens, eos)
        assert alone == ref_tokens[a], (name, a)
