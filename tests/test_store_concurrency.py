"""Several processes on one store never lose or corrupt an agent.

- a load holds the store's lock shared: ``gc`` in another process waits for
  it instead of deleting the blocks it is reading;
- one process saving (tests/store_writer.py), one saving, deleting and
  collecting garbage, and one loading every agent, at once for a few
  seconds: no load fails, every file verifies;
- a block file that is on disk but damaged is rewritten by the next save of
  the same block instead of being trusted because it exists.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from kvsnap import store as st
from kvsnap.cache import make_cache
from small_models import prompt, small_model

TESTS = Path(__file__).parent
SECONDS = 4.0


def spawn(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def worker(store: Path, mode: str, arg: str) -> subprocess.Popen:
    proc = spawn(str(TESTS / "store_worker.py"), str(store), mode, arg)
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    return proc


def finish(proc: subprocess.Popen) -> int:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    last = out.split()
    assert last[-2] == "done", out
    return int(last[-1])


def fed(model, tokens):
    cache = make_cache(model, block_tokens=16)
    mx.eval(model(mx.array(tokens)[None], cache=cache))
    return cache


def test_gc_in_another_process_waits_for_a_load(tmp_path):
    model = small_model("llama")
    tokens = prompt(80).tolist()
    with st.Store(tmp_path) as store:
        store.save_agent("a", fed(model, tokens), tokens=tokens, model=model)
    loader = worker(tmp_path, "load", "a")
    assert loader.stdout.readline().strip() == "loading"  # the manifest is open, the blocks not yet read
    with st.Store(tmp_path) as store:
        store.delete_agent("a")  # allowed: the loader has the manifest open
        start = time.monotonic()
        removed, _ = store.gc()  # must wait for the load
        waited = time.monotonic() - start
    assert finish(loader) == 80
    assert removed == 5 and waited > 0.5


def test_saving_collecting_and_loading_processes_at_once(tmp_path):
    writer = spawn(str(TESTS / "store_writer.py"), str(tmp_path), "run")
    assert writer.stdout.readline().strip() == "ready"
    churn = worker(tmp_path, "churn", str(SECONDS))
    loads = worker(tmp_path, "loads", str(SECONDS))
    n_loads, n_churns = finish(loads), finish(churn)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert n_loads >= 10 and n_churns >= 3, (n_loads, n_churns)
    model = small_model("llama")
    with st.Store(tmp_path) as store:
        assert store.verify() == []
        assert set(store.list_agents()) == {"alpha", "beta", "gamma"}
        for agent in store.list_agents():
            cache = store.load_agent(agent, model=model)
            assert cache.offset == len(cache.tokens) > 0
        store.gc()
        assert store.verify() == []
    print(f"\nconcurrent loads: {n_loads}, save/delete/gc rounds: {n_churns}")


def test_a_damaged_block_on_disk_is_rewritten_by_the_next_save(tmp_path):
    model = small_model("llama")
    tokens = prompt(40).tolist()
    cache = fed(model, tokens)
    with st.Store(tmp_path) as store:
        result = store.save_agent("a", cache, tokens=tokens, model=model)
        damaged = store.block_path(result.blocks[1])
        data = bytearray(damaged.read_bytes())
        data[-3] ^= 0x10
        damaged.write_bytes(bytes(data))
    # Another process (a fresh Store) saves an agent with the same blocks.
    with st.Store(tmp_path) as store:
        assert [p for p, _ in store.verify()] == [damaged, store.agent_path("a")]
        again = store.save_agent("b", cache, tokens=tokens, model=model)
        assert again.new_blocks == 1  # the damaged one, rewritten; the good one kept
        assert store.verify() == []
        nxt = mx.array(prompt(3, seed=8).tolist())[None]
        want = np.array(model(nxt, cache=fed(model, tokens)))
        for agent in ("a", "b"):
            np.testing.assert_array_equal(np.array(model(nxt, cache=store.load_agent(agent, model=model))), want)
