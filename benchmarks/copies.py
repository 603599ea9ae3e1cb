"""Benchmark copying a prompt cache: kvsnap's copy-on-write copy against
deep copies of mlx-lm's caches holding the same conversation.

mlx-lm's LRUPromptCache (its server's prompt cache) and mlx_lm.evaluate
deep-copy a cache before using it. Per model and context N (real text: the
license texts of /usr/share/common-licenses, bench_common.LICENSE_FILES):

  kvsnap        copy.deepcopy of kvsnap's drop-in cache (Q4 g64, kvsnap.cache
                defaults): full blocks shared by reference count, each layer
                group's partial last block copied
  mlx-lm q4     copy.deepcopy of mlx-lm caches holding the same tokens
                (kvsnap.cache.to_mlx: QuantizedKVCache 4-bit g64, and float32
                RotatingKVCache for sliding-window layers)
  mlx-lm f32    the same with float32 KVCache

Columns: the deep copy itself (median and max of REPEATS); the memory it
adds; the first decode step of the copy next to a step of the original
(median of STEPS), and the memory the copy holds after that step. A deep
copy of an mx.array shares its buffer, so mlx-lm's copies are cheap until
written: the first step copies every layer's K/V buffers (MLX copies a
shared buffer it updates in place). kvsnap's copy never writes a shared block.
Memory: arena bytes (kvsnap) plus MLX's active memory (mx.get_active_memory).

Also, for a kvsnap cache mlx-lm can save (unrotated: kvsnap.cache.
QuantizedKVCache layers copy their K/V out for `state`): the time of
mx.eval of every layer's state, which mlx-lm's generate runs after each
prefill chunk, next to one 512-token prefill chunk at that context.

The cache is prefilled once per model in chunks of 512: 4000 tokens (a
partial last block), then 96 more (4096: none).

    python benchmarks/copies.py [--quick] [--out DIR]

Writes DIR/copies.json (DIR: benchmarks/out).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import time

import bench_common
import mlx.core as mx
from bench_common import fmt, license_text, machine_info
from kvsnap import cache as kc
from kvsnap.cli import reexec_with_openblas
from kvsnap.models import load

MODELS = ("smollm2-135m", "gemma3-270m")
CONTEXTS = (4000, 4096)
CHUNK = 512
REPEATS, QUICK_REPEATS = 50, 10
STEPS = 3
TARGET_MS = 5.0  # deep copy of a 4K-token conversation's cache
TARGET_BLOCKS = 1  # blocks a copy adds per layer group


def prefill(model, cache, ids: list[int]) -> list[float]:
    """Feed ids after what the cache holds, in chunks of CHUNK; returns each chunk's seconds."""
    times = []
    for i in range(0, len(ids), CHUNK):
        start = time.perf_counter()
        mx.eval(model(mx.array(ids[i : i + CHUNK])[None], cache=cache))
        times.append(time.perf_counter() - start)
    return times


def time_copies(cache, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        gc.collect()  # the previous copy's blocks go back first
        start = time.perf_counter()
        twin = copy.deepcopy(cache)
        times.append(time.perf_counter() - start)
        del twin
    gc.collect()
    return times


def memory(cache) -> int:
    """Bytes in use: MLX's active memory, plus the arenas of a kvsnap cache."""
    arenas = {id(s.arena): s.arena for s in getattr(cache, "sequences", [])}
    return mx.get_active_memory() + sum(a.stats()["bytes_used"] for a in arenas.values())


def step(model, cache, token: int) -> float:
    start = time.perf_counter()
    mx.eval(model(mx.array([[token]]), cache=cache))
    return time.perf_counter() - start


def measure_copies(cache, model, token: int, repeats: int) -> dict:
    """Copy time, memory added, and the copy's first step (see the module doc)."""
    step(model, cache, token)  # a first step (mlx-lm: grows its buffers), undone
    cache_trim(cache)
    gc.collect()
    base = memory(cache)
    twin = copy.deepcopy(cache)
    gc.collect()
    added_by_copy = memory(cache) - base
    del twin
    times = time_copies(cache, repeats)
    steps, firsts, held_after = [], [], []
    for _ in range(STEPS):
        steps.append(step(model, cache, token))
        cache_trim(cache)
        gc.collect()
        base = memory(cache)
        twin = copy.deepcopy(cache)
        firsts.append(step(model, twin, token))
        gc.collect()
        held_after.append(memory(cache) - base)
        del twin
        gc.collect()
    return {
        "copy_ms_median": statistics.median(times) * 1e3, "copy_ms_max": max(times) * 1e3,
        "bytes_added_by_copy": added_by_copy, "step_ms": statistics.median(steps) * 1e3,
        "first_step_of_copy_ms": statistics.median(firsts) * 1e3,
        "bytes_added_after_first_step": statistics.median(held_after),
    }


def cache_trim(cache) -> None:
    """Back to the context measured (kvsnap); mlx-lm's caches just grow by the few tokens."""
    if isinstance(cache, kc.PromptCache):
        cache.trim(1)


def measure(model_name: str, model, cache, n: int, token: int, chunk_s: float, repeats: int) -> list[dict]:
    groups = len(cache.sequences)
    before = [s.arena.stats()["slots_used"] for s in cache.sequences]
    twin = copy.deepcopy(cache)
    blocks = [s.arena.stats()["slots_used"] - b for s, b in zip(cache.sequences, before)]
    del twin
    gc.collect()
    rows = [{
        "model": model_name, "context": n, "cache": "kvsnap", "groups": groups,
        "bytes_held": cache.nbytes, "blocks_added_per_group": blocks,
        **measure_copies(cache, model, token, repeats),
    }]
    for name, quantized in (("mlx-lm q4", True), ("mlx-lm f32", False)):
        theirs = kc.to_mlx(cache, quantized=quantized)
        mx.eval([c.state for c in theirs])
        rows.append({
            "model": model_name, "context": n, "cache": name, "groups": groups,
            "bytes_held": sum(c.nbytes for c in theirs), "blocks_added_per_group": None,
            **measure_copies(theirs, model, token, repeats),
        })
        del theirs
        gc.collect()
    # What generate's mx.eval([c.state ...]) costs per prefill chunk for a
    # cache mlx-lm can save (the same tokens, unrotated Q4 layers).
    savable = kc.from_mlx(model, kc.to_mlx(cache))
    assert any(isinstance(c, kc.QuantizedKVCache) for c in savable)
    reads = []
    for _ in range(5):
        start = time.perf_counter()
        mx.eval([c.state for c in savable])
        reads.append(time.perf_counter() - start)
    rows[0]["state_read_ms_unrotated"] = statistics.median(reads) * 1e3
    rows[0]["prefill_chunk_ms"] = chunk_s * 1e3
    savable.release()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="SmolLM2 only, fewer repeats")
    bench_common.add_out_argument(parser)
    args = parser.parse_args()
    reexec_with_openblas([os.path.abspath(__file__), *sys.argv[1:]])  # as the kvsnap command does
    repeats = QUICK_REPEATS if args.quick else REPEATS
    args.out.mkdir(parents=True, exist_ok=True)

    bench_common.print_machine(machine_info())
    text, record = license_text()
    rows = []
    for model_name in MODELS[:1] if args.quick else MODELS:
        model, tokenizer = load(model_name)
        ids = tokenizer.encode(text)[: max(CONTEXTS) + 1]
        cache = kc.make_cache(model)
        held, chunk_s = 0, None
        for n in CONTEXTS:
            chunks = prefill(model, cache, ids[held:n])
            if chunk_s is None:  # the last whole chunk of the first prefill: [3072, 3584)
                chunk_s = chunks[(n - held) // CHUNK - 1]
            held = n
            print(f"{model_name}: prefilled to {n} tokens; a {CHUNK}-token chunk near 4K took "
                  f"{chunk_s:.2f} s", flush=True)
            rows += measure(model_name, model, cache, n, ids[n], chunk_s, repeats)
        del cache

    print()
    print(f"{'model':<13} {'context':>7} {'cache':<11} {'held':>8} {'copy':>9} {'max':>8} {'copy adds':>9} "
          f"{'blocks/group':>12} {'step':>8} {'copy 1st step':>13} {'then holds':>10}")
    for r in rows:
        blocks = "-" if r["blocks_added_per_group"] is None else ",".join(map(str, r["blocks_added_per_group"]))
        print(f"{r['model']:<13} {r['context']:>7} {r['cache']:<11} {r['bytes_held'] / 2**20:>6.1f}MB "
              f"{r['copy_ms_median']:>7.3f}ms {r['copy_ms_max']:>6.2f}ms {r['bytes_added_by_copy'] / 2**20:>7.2f}MB "
              f"{blocks:>12} {r['step_ms']:>6.1f}ms {r['first_step_of_copy_ms']:>11.1f}ms "
              f"{r['bytes_added_after_first_step'] / 2**20:>8.2f}MB")
    print()
    for r in rows:
        if "state_read_ms_unrotated" in r:
            print(f"{r['model']} at {r['context']}: state read (unrotated, savable) "
                  f"{r['state_read_ms_unrotated']:.1f} ms; one {CHUNK}-token prefill chunk {r['prefill_chunk_ms']:.0f} ms")

    ours = [r for r in rows if r["cache"] == "kvsnap"]
    checks = [
        (f"{r['model']} deep copy at {r['context']} under {TARGET_MS} ms (median)",
         r["copy_ms_median"] < TARGET_MS, fmt(r["copy_ms_median"], ".3f"))
        for r in ours
    ] + [
        (f"{r['model']} copy at {r['context']} adds at most {TARGET_BLOCKS} block per layer group",
         max(r["blocks_added_per_group"]) <= TARGET_BLOCKS, str(r["blocks_added_per_group"]))
        for r in ours
    ]
    print()
    for name, ok, value in checks:
        print(f"{'PASS' if ok else 'MISS'}  {name}: {value}")
    result = {
        "machine": machine_info(models=list(MODELS), text=record, repeats=repeats, chunk=CHUNK),
        "rows": rows,
        "targets": [{"target": n, "met": ok, "value": v} for n, ok, v in checks],
    }
    (args.out / "copies.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
