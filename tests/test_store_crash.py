"""Crash safety: a writer killed with SIGKILL never leaves a store that loses
or half-shows a snapshot.

50 writer processes (tests/store_writer.py) are killed: 34 at random moments,
16 inside the rename window (just before or just after a block's or a
manifest's rename, before the folder's fsync). After each kill, opening the
store must show every agent at its last completed snapshot or at the one
being written, every file verified, and the restored cache identical to a
replay of the same tokens.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from kvsnap.cache import make_cache
from kvsnap.store import Store
from small_models import small_model
from store_writer import AGENTS, BLOCK_TOKENS, agent_chunks, agent_tokens, feed

TESTS = Path(__file__).parent
KILLS_AT_RANDOM = 34
KILLS_IN_RENAME_WINDOW = 16


def kill_a_writer(store: Path, mode: str, rng: random.Random) -> dict[str, int]:
    """Run a writer, SIGKILL it, and return each agent's last completed save."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, str(TESTS / "store_writer.py"), str(store), mode],
        stdout=subprocess.PIPE, text=True, env=env,
    )
    saved: dict[str, int] = {}
    lines: list[str] = []
    killer = None
    if mode == "run":
        assert proc.stdout.readline().strip() == "ready"
        killer = threading.Timer(rng.uniform(0.0, 0.8), proc.send_signal, [signal.SIGKILL])
        killer.start()
    else:
        event = rng.choice(["rename", "renamed"])
        countdown = rng.randint(1, 12)  # block renames and manifest renames interleave
    for line in proc.stdout:
        lines.append(line)
        word, *rest = line.split()
        if word == "saved":
            saved[rest[0]] = int(rest[1])
        elif mode == "pause" and word == event:
            countdown -= 1
            if countdown == 0:
                proc.send_signal(signal.SIGKILL)
    proc.wait()
    if killer is not None:
        killer.join()
    assert proc.returncode == -signal.SIGKILL, f"writer ended on its own: {lines[-3:]}"
    return saved


def replay(model, agent: str, n_tokens: int):
    """A cache fed the agent's first n_tokens in the writer's chunks."""
    cache = make_cache(model, block_tokens=BLOCK_TOKENS)
    tokens, fed = agent_tokens(agent), 0
    for size in agent_chunks(agent):
        if fed == n_tokens:
            break
        assert fed + size <= n_tokens, f"{n_tokens} is not a snapshot boundary of {agent}"
        feed(model, cache, tokens[fed : fed + size])
        fed += size
    return cache


def check_store(path: Path, saved: dict[str, int], model) -> None:
    with Store(path) as store:
        leftovers = [p for p in path.rglob(".tmp-*")]
        assert leftovers == [], f"temporary files survived the reopen: {leftovers}"
        assert store.verify() == []
        in_flight = 0
        for agent in AGENTS:
            if agent not in store.list_agents():
                assert agent not in saved, f"{agent}'s completed snapshot was lost"
                continue
            restored = store.load_agent(agent, model=model)
            n = restored.offset
            assert restored.tokens == agent_tokens(agent)[:n]
            last = saved.get(agent, 0)
            assert n >= last, f"{agent}: the store went back from {last} to {n} tokens"
            if n > last:  # the save in progress when the writer died
                in_flight += 1
                assert n - last <= 40
            want = replay(model, agent, n)
            probe = agent_tokens(agent)[n : n + 3] or [1, 2, 3]
            np.testing.assert_array_equal(np.array(feed(model, restored, probe)), np.array(feed(model, want, probe)))
        assert in_flight <= 1


def test_killed_writers_leave_old_or_new_snapshots(tmp_path):
    rng = random.Random(2026)
    modes = ["run"] * KILLS_AT_RANDOM + ["pause"] * KILLS_IN_RENAME_WINDOW
    stores = [tmp_path / f"store{i}" for i in range(len(modes))]
    seeds = [rng.random() for _ in modes]
    with ThreadPoolExecutor(2) as pool:
        saved = list(pool.map(lambda a: kill_a_writer(a[0], a[1], random.Random(a[2])), zip(stores, modes, seeds)))
    model = small_model("llama")
    for path, s in zip(stores, saved):
        check_store(path, s, model)
    # Kills landed at many points: some before any save completed, most after several.
    assert sum(1 for s in saved if s) >= len(modes) // 2
