"""Processes sharing a store with others (test_store_concurrency.py).

    python store_worker.py STORE load AGENT   load AGENT once, pausing 1 s after
                                             its manifest is open ("loading")
    python store_worker.py STORE loads SECS   load every listed agent, again and
                                             again, for SECS seconds
    python store_worker.py STORE churn SECS   save agents, delete them and collect
                                             garbage, again and again

Prints "ready" once the model is built, then one line per event; ends with
"done <count>" (an exception ends it with a traceback and exit status 1).
"""

from __future__ import annotations

import sys
import time

import mlx.core as mx
from kvsnap import store as st
from kvsnap.cache import make_cache
from kvsnap.errors import AgentNotFoundError
from small_models import prompt, small_model


def main() -> None:
    path, mode, arg = sys.argv[1], sys.argv[2], sys.argv[3]
    model = small_model("llama")
    store = st.Store(path)
    print("ready", flush=True)
    if mode == "load":
        prefetch = st._prefetch

        def paused_prefetch(paths):  # the store's lock is held and the manifest open here
            print("loading", flush=True)
            time.sleep(1.0)
            prefetch(paths)

        st._prefetch = paused_prefetch
        cache = store.load_agent(arg, model=model)
        print(f"done {cache.offset}", flush=True)
        return
    end, count = time.monotonic() + float(arg), 0
    while time.monotonic() < end:
        if mode == "loads":
            for agent in store.list_agents():
                try:
                    cache = store.load_agent(agent, model=model)
                except AgentNotFoundError:
                    continue  # deleted between the listing and the load
                assert cache.offset == len(cache.tokens) > 0
                cache.release()
                count += 1
        else:
            for i in range(3):
                tokens = prompt(50 + 16 * i, seed=100 + count).tolist()
                cache = make_cache(model, block_tokens=16)
                mx.eval(model(mx.array(tokens)[None], cache=cache))
                store.save_agent(f"churn{i}", cache, tokens=tokens, model=model)
            for i in range(3):
                store.delete_agent(f"churn{i}")
            store.gc()
            count += 1
    print(f"done {count}", flush=True)


if __name__ == "__main__":
    main()
