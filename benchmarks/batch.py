"""Batched decode: aggregate tokens/s of B agents decoding together, and the
latency a running batch sees while a new agent's prompt is prefilled.

    python benchmarks/batch.py [--contexts 2048 8192] [--batches 1 2 4 8] [--quick]

Paths, on SmolLM2-135M (float32 weights, OpenBLAS), every agent at the same
context length (one prefill, shared by all agents: decode cost does not
depend on which tokens the context holds):
  kvsnap batched      one forward pass per step for all B agents (kvsnap.batch),
                      4-bit K/V read in place by the fused kernel
  kvsnap one-by-one   each agent's step alone (B=1), so B agents cost B steps
  mlx-lm batch float  mlx-lm's BatchGenerator (batch_generate's engine) with
                      float KVCaches: its only batched path (it refuses
                      quantized caches)
Latency: 4 agents decode through AgentMemory while a 5th arrives with a 2K-token
prompt; inter-token latency of the running agents during its prefill (p95)
against the steady step before it, for prefill chunks of 256 and 64 tokens.
Text: Debian's license texts (bench_common.license_text).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import statistics
import tempfile
import threading
import time

import kvsnap
import mlx.core as mx
import numpy as np
from bench_common import add_out_argument, fmt, license_text, machine_info, print_machine
from kvsnap.batch import batch_cache, share
from kvsnap.models import load
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import make_prompt_cache

STEPS = 12


def prefill(model, ids, cache, chunk=512):
    for i in range(0, len(ids), chunk):
        mx.eval(model(mx.array([ids[i : i + chunk]]), cache=cache))


def kvsnap_rate(model, base, batch: int, together: bool) -> float:
    """Decode tokens/s of `batch` agents holding `base`'s context."""
    caches = [share(base) for _ in range(batch)]
    token = mx.array([[42]] * batch)
    if together:
        view = batch_cache(caches) if batch > 1 else caches[0]
        mx.eval(model(token, cache=view))  # warm-up step (first batched step builds tables)
        t = time.perf_counter()
        for _ in range(STEPS):
            mx.eval(model(token, cache=view))
        elapsed = time.perf_counter() - t
    else:
        for c in caches:
            mx.eval(model(token[:1], cache=c))
        t = time.perf_counter()
        for _ in range(STEPS):
            for c in caches:
                mx.eval(model(token[:1], cache=c))
        elapsed = time.perf_counter() - t
    for c in caches:
        c.release()
    return batch * STEPS / elapsed


def mlx_rate(model, base_float, batch: int) -> float:
    """Decode tokens/s of mlx-lm's BatchGenerator over float caches."""
    gen = BatchGenerator(model, max_tokens=STEPS + 2, stop_tokens=[])
    gen.insert([[42]] * batch, caches=[copy.deepcopy(base_float) for _ in range(batch)])
    times = []
    while True:
        t = time.perf_counter()
        responses = gen.next_generated()
        times.append(time.perf_counter() - t)
        if not responses or all(r.finish_reason is not None for r in responses):
            break
    gen.close()
    steady = times[2:]  # the first calls merge the caches and prefill the one-token prompts
    return batch / statistics.median(steady)


def arrival_latency(model, tokenizer, ids, chunk: int) -> dict:
    """4 agents decode; a 5th arrives with a 2K prompt. Inter-token latencies."""
    with tempfile.TemporaryDirectory() as tmp:
        memory = kvsnap.AgentMemory(model, tokenizer, path=tmp, budget="2GB", prefill_chunk=chunk)
        context = ids[:2048]
        memory.generate("warm", context, max_tokens=1)  # the shared 2K context, computed once
        stamps: dict[str, list[float]] = {}
        arrival = {}

        def run(agent):
            stamps[agent] = []
            for piece in memory.stream(agent, context + [100 + len(stamps)], max_tokens=60):
                if isinstance(piece, str):
                    stamps[agent].append(time.perf_counter())

        threads = [threading.Thread(target=run, args=(f"r{i}",)) for i in range(4)]
        for t in threads:
            t.start()
        time.sleep(4.0)
        arrival["start"] = time.perf_counter()
        memory.generate("late", ids[4096 : 4096 + 2048], max_tokens=1)
        arrival["end"] = time.perf_counter()
        for t in threads:
            t.join()
        chunks = memory._scheduler.chunk_sizes
        memory.close()
    steady, during = [], []
    for s in stamps.values():
        for a, b in itertools.pairwise(s):
            if b <= arrival["start"]:
                steady.append(b - a)
            elif a >= arrival["start"] and b <= arrival["end"] + 1.0:
                during.append(b - a)
    step = statistics.median(steady) if steady else None
    p95 = float(np.percentile(during, 95)) if during else None
    return {"chunk": chunk, "steady_step_s": step, "p95_during_arrival_s": p95,
            "ratio": p95 / step if step and p95 else None, "arrival_prefill_s": arrival["end"] - arrival["start"],
            "chunk_tokens_min": min(chunks), "chunk_tokens_median": statistics.median(chunks)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="*", default=[2048, 8192],
                        help="context lengths of the throughput rows (none: skip them)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--quick", action="store_true", help="512-token contexts, batches 1 and 4")
    parser.add_argument("--no-latency", action="store_true")
    add_out_argument(parser)
    args = parser.parse_args()
    if args.quick:
        args.contexts, args.batches = [512], [1, 4]
    machine = machine_info()
    print_machine(machine)
    model, tokenizer = load("smollm2-135m")
    text, source = license_text()
    ids = tokenizer.encode(text)
    rows = []
    for context in args.contexts:
        base = kvsnap.make_cache(model)
        prefill(model, ids[:context], base)
        base_float = make_prompt_cache(model)
        prefill(model, ids[:context], base_float)
        kvsnap_rate(model, base, 1, together=True)  # warm-up: the first steps of a process run slower
        alone = kvsnap_rate(model, base, 1, together=True)
        for batch in args.batches:
            row = {
                "context": context, "agents": batch,
                "kvsnap_batched_tok_s": kvsnap_rate(model, base, batch, together=True),
                "kvsnap_one_by_one_tok_s": alone if batch == 1 else kvsnap_rate(model, base, batch, together=False),
                "mlx_lm_float_batch_tok_s": mlx_rate(model, base_float, batch),
            }
            row["batched_vs_one_by_one"] = row["kvsnap_batched_tok_s"] / row["kvsnap_one_by_one_tok_s"]
            row["batched_vs_mlx_lm"] = row["kvsnap_batched_tok_s"] / row["mlx_lm_float_batch_tok_s"]
            rows.append(row)
            print(
                f"context {context:>5}  agents {batch}  kvsnap batched {row['kvsnap_batched_tok_s']:6.1f} tok/s  "
                f"one-by-one {row['kvsnap_one_by_one_tok_s']:6.1f}  mlx-lm float batch "
                f"{row['mlx_lm_float_batch_tok_s']:6.1f}  -> {row['batched_vs_one_by_one']:.2f}x one-by-one, "
                f"{row['batched_vs_mlx_lm']:.2f}x mlx-lm",
                flush=True,
            )
        base.release()
    latency = [] if args.no_latency else [arrival_latency(model, tokenizer, ids, c) for c in (256, 64)]
    for r in latency:
        print(
            f"arrival of a 2K prompt (chunks of up to {r['chunk']}): steady step {fmt(r['steady_step_s'], '.3f')} s, "
            f"p95 during arrival {fmt(r['p95_during_arrival_s'], '.3f')} s, ratio {fmt(r['ratio'], '.2f')}x, "
            f"its prefill {r['arrival_prefill_s']:.1f} s (median chunk {r['chunk_tokens_median']:.0f} tokens)"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine, "text": source, "steps": STEPS, "throughput": rows, "arrival": latency}
    (args.out / "batch.json").write_text(json.dumps(result, indent=2))
    if not rows:
        print(f"wrote {args.out / 'batch.json'}")
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(args.contexts), figsize=(5 * len(args.contexts), 4), squeeze=False)
        for ax, context in zip(axes[0], args.contexts):
            sub = [r for r in rows if r["context"] == context]
            x = [r["agents"] for r in sub]
            for key, label in (("kvsnap_batched_tok_s", "kvsnap batched"),
                               ("kvsnap_one_by_one_tok_s", "kvsnap one by one"),
                               ("mlx_lm_float_batch_tok_s", "mlx-lm float batch")):
                ax.plot(x, [r[key] for r in sub], marker="o", label=label)
            ax.set_title(f"SmolLM2-135M decode, {context}-token contexts")
            ax.set_xlabel("agents decoding")
            ax.set_ylabel("tokens/s (all agents)")
            ax.set_xticks(x)
            ax.legend()
        fig.tight_layout()
        fig.savefig(args.out / "batch.png", dpi=110)
    except ImportError:
        print("matplotlib missing: no plot (pip install '.[bench]')")
    print(f"wrote {args.out / 'batch.json'}")


if __name__ == "__main__":
    main()
