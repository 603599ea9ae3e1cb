"""A process that saves agents into a store until it is killed (test_store_crash.py).

    python store_writer.py STORE run     save as fast as it can
    python store_writer.py STORE pause   also announce every rename and pause
                                         0.2 s before and after it, so the test
                                         can kill inside the rename window

Each agent's tokens and chunk sizes come from seeded generators, so the test
can replay exactly what a snapshot of n tokens holds. Prints "ready", then
"saved <agent> <n_tokens>" after each save returns; once every agent holds
MAX_TOKENS it saves the same snapshots again, never ending on its own.
"""

from __future__ import annotations

import sys
import time

import mlx.core as mx
import numpy as np
from kvsnap import tensorfile
from kvsnap.cache import make_cache
from kvsnap.store import Store
from small_models import VOCAB, small_model

AGENTS = ("alpha", "beta", "gamma")
BLOCK_TOKENS = 16
MAX_TOKENS = 1200


def agent_tokens(agent: str) -> list[int]:
    return np.random.RandomState(AGENTS.index(agent)).randint(0, VOCAB, MAX_TOKENS).tolist()


def agent_chunks(agent: str) -> list[int]:
    """Tokens fed per step; a snapshot after k steps holds sum(chunks[:k]) tokens."""
    return np.random.RandomState(100 + AGENTS.index(agent)).randint(5, 41, MAX_TOKENS).tolist()


def feed(model, cache, tokens: list[int]) -> mx.array:
    out = model(mx.array(tokens)[None], cache=cache)
    mx.eval(out)
    return out


def main() -> None:
    path, mode = sys.argv[1], sys.argv[2]
    if mode == "pause":
        real_replace = tensorfile.OS_CALLS.replace

        def announced_replace(src, dst):
            print(f"rename {dst}", flush=True)
            time.sleep(0.2)
            real_replace(src, dst)
            print(f"renamed {dst}", flush=True)
            time.sleep(0.2)

        tensorfile.OS_CALLS.replace = announced_replace  # the writer's renames go through it
    model = small_model("llama")
    store = Store(path)
    caches = {a: make_cache(model, block_tokens=BLOCK_TOKENS) for a in AGENTS}
    tokens = {a: agent_tokens(a) for a in AGENTS}
    chunks = {a: agent_chunks(a) for a in AGENTS}
    n = dict.fromkeys(AGENTS, 0)
    print("ready", flush=True)
    for step in range(MAX_TOKENS):
        for a in AGENTS:
            if n[a] + chunks[a][step] > MAX_TOKENS:
                continue
            feed(model, caches[a], tokens[a][n[a] : n[a] + chunks[a][step]])
            n[a] += chunks[a][step]
            store.save_agent(a, caches[a], tokens=tokens[a][: n[a]], model=model)
            print(f"saved {a} {n[a]}", flush=True)
    while True:  # full: save the same snapshots again until killed
        for a in AGENTS:
            store.save_agent(a, caches[a], tokens=tokens[a][: n[a]], model=model)
            print(f"saved {a} {n[a]}", flush=True)


if __name__ == "__main__":
    main()
