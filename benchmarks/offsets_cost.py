"""What kvsnap's key offsets (kvsnap.offsets) cost in speed: decode, prefill and restore,
with them (the default) and without (key_offsets=False), in the same run.

SmolLM2-135M (float32 weights) on the license texts of /usr/share/common-licenses.
Both caches prefill the text's first max(contexts) tokens in chunks of 512,
taking turns chunk by chunk (prefill time per variant). Decode: for each
context N, a copy of each cache trimmed to N tokens decodes greedy tokens,
the variants taking turns step by step; the median step after WARMUP steps
is reported, and the ratio is the median over steps of the two variants'
same step (taken back to back). Restore: each cache (at the largest context) is saved to a
kvsnap store and loaded back REPEATS times, taking turns; median load time.

    python benchmarks/offsets_cost.py [--contexts 1024 4096 8192] [--quick] [--out DIR]

Writes DIR/offsets_cost.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import bench_common
import mlx.core as mx
from bench_common import license_text, machine_info
from kvsnap import cache as kc
from kvsnap.models import load
from kvsnap.store import Store

MODEL = "smollm2-135m"
CHUNK = 512
DEFAULT_CONTEXTS, QUICK_CONTEXTS = (1024, 4096, 8192), (1024, 2048)
WARMUP, STEPS, QUICK_STEPS = 2, 40, 4
REPEATS, QUICK_REPEATS = 9, 2
VARIANTS = {"offsets (default)": True, "no offsets": False}
TARGET = 1.05  # with offsets at most 5% slower


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", nargs="+", type=int)
    p.add_argument("--quick", action="store_true")
    bench_common.add_out_argument(p)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    mx.set_default_device(mx.cpu)
    contexts = sorted(args.contexts or (QUICK_CONTEXTS if args.quick else DEFAULT_CONTEXTS))
    steps = QUICK_STEPS if args.quick else STEPS
    repeats = QUICK_REPEATS if args.quick else REPEATS
    machine = machine_info()
    bench_common.print_machine(machine)
    model, tokenizer = load(MODEL)
    text, _ = license_text()
    ids = tokenizer.encode(text)[: contexts[-1] + WARMUP + steps + 1]

    caches = {name: kc.make_cache(model, key_offsets=on) for name, on in VARIANTS.items()}
    prefill_s = {name: 0.0 for name in VARIANTS}
    for start in range(0, contexts[-1], CHUNK):
        chunk = mx.array(ids[start : min(start + CHUNK, contexts[-1])])[None]
        for name, cache in caches.items():
            t0 = time.perf_counter()
            model(chunk, cache=cache)
            mx.eval([c.state for c in cache])
            prefill_s[name] += time.perf_counter() - t0
        print(f"  prefill {start + chunk.shape[1]:6d} tokens", flush=True)

    rows = []
    for n in contexts:
        work = {name: c.copy() for name, c in caches.items()}
        for c in work.values():
            c.trim(c.offset - n)
        token = {name: ids[n] for name in VARIANTS}
        times = {name: [] for name in VARIANTS}
        for step in range(WARMUP + steps):
            for name, c in work.items():
                t0 = time.perf_counter()
                logits = model(mx.array([[token[name]]]), cache=c)
                mx.eval(logits)
                if step >= WARMUP:
                    times[name].append(time.perf_counter() - t0)
                token[name] = int(mx.argmax(logits[0, -1]).item())
        for c in work.values():
            c.release()
        ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
        # The ratio: median over steps of (with / without) of the same step,
        # the two taken back to back (robust to the load changing mid-run).
        paired = statistics.median(a / b for a, b in zip(times["offsets (default)"], times["no offsets"]))
        rows.append({"context": n, "ms": ms, "ratio": paired})
        print(f"  decode at {n}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in ms.items()), flush=True)

    load_s = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp, Store(Path(tmp) / "store") as store:
        for name, c in caches.items():
            store.save_agent(name.split()[0], c, tokens=ids[: contexts[-1]], model=model, tokenizer=tokenizer)
        for _ in range(repeats):
            for name in VARIANTS:
                t0 = time.perf_counter()
                back = store.load_agent(name.split()[0], model=model, tokenizer=tokenizer)
                mx.eval([c.state for c in back])
                load_s[name].append(time.perf_counter() - t0)
                back.release()
    restore_ms = {name: 1000 * statistics.median(t) for name, t in load_s.items()}
    restore_paired = statistics.median(a / b for a, b in zip(load_s["offsets (default)"], load_s["no offsets"]))

    print(f"\n{'':<22}" + "".join(f"{k:>20}" for k in VARIANTS) + f"{'ratio':>9}")
    for r in rows:
        print(f"{'decode at ' + str(r['context']) + ' (ms)':<22}" + "".join(f"{r['ms'][k]:20.1f}" for k in VARIANTS)
              + f"{r['ratio']:9.3f}")
    pre_ratio = prefill_s["offsets (default)"] / prefill_s["no offsets"]
    print(f"{'prefill ' + str(contexts[-1]) + ' (s)':<22}" + "".join(f"{prefill_s[k]:20.2f}" for k in VARIANTS)
          + f"{pre_ratio:9.3f}")
    res_ratio = restore_paired
    print(f"{'restore ' + str(contexts[-1]) + ' (ms)':<22}" + "".join(f"{restore_ms[k]:20.1f}" for k in VARIANTS)
          + f"{res_ratio:9.3f}")
    targets = [
        {"target": f"decode at {r['context']} with offsets <= {TARGET}x without", "measured": r["ratio"],
         "status": "PASS" if r["ratio"] <= TARGET else "MISS"}
        for r in rows
    ] + [{"target": f"restore with offsets <= {TARGET}x without", "measured": res_ratio,
          "status": "PASS" if res_ratio <= TARGET else "MISS"}]
    print("\ntargets")
    for t in targets:
        print(f"  {t['status']:<4} {t['target']}: {t['measured']:.3f}x")
    for c in caches.values():
        c.release()
    args.out.mkdir(parents=True, exist_ok=True)
    machine["load_average_at_end"] = list(__import__("os").getloadavg())
    out = args.out / "offsets_cost.json"
    out.write_text(json.dumps({
        "machine": machine, "model": MODEL, "decode": rows, "prefill_s": prefill_s,
        "prefill_ratio": pre_ratio, "restore_ms": restore_ms, "restore_ratio": res_ratio,
        "targets": targets,
    }, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
