"""Benchmark waking an agent from disk: kvsnap snapshots against re-prefill and
mlx-lm's prompt cache files.

SmolLM2-135M (float32 weights) on real text (the license texts of
/usr/share/common-licenses, bench_common.LICENSE_FILES). One kvsnap cache
(Q4 g64, kvsnap.cache defaults) is prefilled to the longest context, in
chunks of 512; each shorter context is that cache trimmed (prefill is
causal, so it holds what a prefill of N tokens holds). Per context N:

  snapshot            kvsnap.Store.save_agent into a fresh store: bytes on disk
                      (block files + manifest) and save time (fsyncs included)
  load warm / cold    Store.load_agent, verified, into one long-lived arena (as
                      a runtime holds; its pages touched once, untimed). Cold: every
                      file of the snapshot is dropped from the page cache with
                      posix_fadvise(DONTNEED) first
  raw read cold       open and read the same files (same order, one buffer
                      each), after the same DONTNEED: the disk's time for
                      the bytes, the floor of a cold load
  single file         kvsnap.save / kvsnap.load of the same cache
  TTFT kvsnap         load (warm or cold) + the next token's forward pass +
                      argmax: time to the first new token from a snapshot
  TTFT re-prefill     mlx-lm's generate_step on the N tokens with its default
                      float32 KVCache and prefill step, to its first token
  TTFT mlx-lm q4 file mlx_lm load_prompt_cache of a 4-bit g64 QuantizedKVCache
                      file (save_prompt_cache of the same tokens) + the next
                      token's forward pass, warm and cold
  mlx-lm f16 file     bytes of save_prompt_cache of the float16 KVCache

Timed runs repeat (REPEATS, the median is reported) and alternate between
variants, so machine load hits them alike.

    python benchmarks/restore.py [--contexts 1024 2048 4096 8192] [--quick] [--out DIR]

Writes DIR/restore.json and DIR/restore.png (DIR: benchmarks/out), and keeps
its stores under DIR/restore-work (on the same disk as DIR, not tmpfs: the
cold runs need files the page cache can drop).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import bench_common
import kvsnap
import mlx.core as mx
from bench_common import fmt, license_text, machine_info
from kvsnap import cache as kc
from kvsnap.cli import reexec_with_openblas
from kvsnap.models import load
from kvsnap.store import Store
from kvsnap.tensorfile import TensorFile
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import KVCache, load_prompt_cache, save_prompt_cache

MODEL = "smollm2-135m"
CHUNK = 512
DEFAULT_CONTEXTS = (1024, 2048, 4096, 8192)
QUICK_CONTEXTS = (1024, 2048)
REPEATS, QUICK_REPEATS = 5, 3
TARGET_CONTEXT = 4096
TARGET_COLD_VS_RAW = 1.5  # cold restore within this factor of reading its bytes
TARGET_VS_PREFILL = 300  # TTFT from a snapshot at least this many times faster than re-prefill
TARGET_VS_MLX_FILE = 0.5  # at most this fraction of mlx-lm's q4 file load + one token
TARGET_BYTES = 0.3  # snapshot bytes at most this fraction of mlx-lm's float16 file


def drop_from_page_cache(paths) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_read(paths) -> float:
    start = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            buf = bytearray(os.fstat(f.fileno()).st_size)
            f.readinto(buf)
    return time.perf_counter() - start


def snapshot_files(store: Store, agent: str) -> list[Path]:
    """The files a load reads, in the order it reads them."""
    info = store.agent_info(agent)
    with TensorFile(info.path) as f:
        blocks = f.metadata["blocks"].split(",") if f.metadata["blocks"] else []
    return [info.path, *(store.block_path(h) for h in blocks)]


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def first_token(model, cache, token: int) -> int:
    logits = model(mx.array([[token]]), cache=cache)
    return int(mx.argmax(logits[0, -1]).item())


def reprefill_ttft(model, ids: list[int]) -> float:
    start = time.perf_counter()
    token, _ = next(generate_step(mx.array(ids), model, max_tokens=1))
    int(token)
    return time.perf_counter() - start


def measure(model, tokenizer, cache, ids, n: int, work: Path, repeats: int, arena) -> dict:
    nxt = ids[n]
    tokens = ids[:n]
    row: dict = {"context": n}
    stores = []

    # Saves: a fresh store each time (a store that has the blocks writes only the manifest).
    saves = []
    for r in range(repeats):
        path = work / f"store-{n}-{r}"
        shutil.rmtree(path, ignore_errors=True)
        stores.append(Store(path))
        start = time.perf_counter()
        stores[-1].save_agent("agent", cache, tokens=tokens, model=model)
        saves.append(time.perf_counter() - start)
    store = stores[0]
    files = snapshot_files(store, "agent")
    row["snapshot_bytes"] = sum(p.stat().st_size for p in files)
    row["snapshot_files"] = len(files)
    row["save_s"] = statistics.median(saves)

    single = work / f"single-{n}.safetensors"
    row["single_file_bytes"] = kvsnap.save(cache, single, tokens=tokens, model=model)

    # mlx-lm files of the same tokens: 4-bit (what its QuantizedKVCache holds) and float16.
    q4_file = work / f"mlx-q4-{n}.safetensors"
    save_prompt_cache(str(q4_file), kc.to_mlx(cache, quantized=True))
    f16 = []
    for c in kc.to_mlx(cache, quantized=False):
        h = KVCache()
        n_held = c.offset
        h.state = (c.keys[..., :n_held, :].astype(mx.float16), c.values[..., :n_held, :].astype(mx.float16), n_held)
        f16.append(h)
    f16_file = work / f"mlx-f16-{n}.safetensors"
    save_prompt_cache(str(f16_file), f16)
    row["mlx_q4_file_bytes"] = q4_file.stat().st_size
    row["mlx_f16_file_bytes"] = f16_file.stat().st_size
    del f16

    want = first_token(model, cache, nxt)  # the token the in-memory cache gives
    cache.trim(1)
    store.load_agent("agent", model=model, arena=arena).release()  # touch the pool's pages once
    samples: dict[str, list[float]] = {k: [] for k in (
        "load_warm_s", "load_cold_s", "raw_read_cold_s", "raw_read_warm_s", "single_load_warm_s",
        "single_load_cold_s", "ttft_warm_s", "ttft_cold_s", "mlx_q4_ttft_warm_s", "mlx_q4_ttft_cold_s",
    )}
    for _ in range(repeats):
        drop_from_page_cache(files)
        samples["raw_read_cold_s"].append(raw_read(files))
        samples["raw_read_warm_s"].append(raw_read(files))

        for mode in ("cold", "warm"):
            if mode == "cold":
                drop_from_page_cache(files)
            t, restored = timed(lambda: store.load_agent("agent", model=model, arena=arena))
            samples[f"load_{mode}_s"].append(t)
            restored.release()

            if mode == "cold":
                drop_from_page_cache(files)
            start = time.perf_counter()
            restored = store.load_agent("agent", model=model, arena=arena)
            got = first_token(model, restored, nxt)
            samples[f"ttft_{mode}_s"].append(time.perf_counter() - start)
            assert got == want, f"restored cache picked {got}, the cache in memory {want}"
            restored.release()

            if mode == "cold":
                drop_from_page_cache([single])
            t, restored = timed(lambda: kvsnap.load(single, model=model, arena=arena))
            samples[f"single_load_{mode}_s"].append(t)
            restored.release()

            if mode == "cold":
                drop_from_page_cache([q4_file])
            start = time.perf_counter()
            mlx_cache = load_prompt_cache(str(q4_file))
            first_token(model, mlx_cache, nxt)
            samples[f"mlx_q4_ttft_{mode}_s"].append(time.perf_counter() - start)
            del mlx_cache
    for k, v in samples.items():
        row[k] = statistics.median(v)
    row["reprefill_ttft_s"] = reprefill_ttft(model, tokens)
    row["next_token_matches"] = True
    for s in stores:
        s.close()
    return row


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ctx = [r["context"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, label in (
        ("reprefill_ttft_s", "re-prefill (mlx-lm, float32 KVCache)"),
        ("mlx_q4_ttft_cold_s", "mlx-lm q4 file load + 1 token (cold)"),
        ("mlx_q4_ttft_warm_s", "mlx-lm q4 file load + 1 token (warm)"),
        ("ttft_cold_s", "kvsnap snapshot + 1 token (cold)"),
        ("ttft_warm_s", "kvsnap snapshot + 1 token (warm)"),
    ):
        a.plot(ctx, [r[key] * 1e3 for r in rows], marker="o", label=label)
    a.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="time to first token (ms)",
          title="Waking an agent: SmolLM2-135M, CPU")
    a.set_xticks(ctx, [str(c) for c in ctx])
    a.minorticks_off()
    a.legend(fontsize=7)
    for key, label in (
        ("raw_read_cold_s", "raw read of the bytes (cold)"),
        ("load_cold_s", "kvsnap load (cold, verified)"),
        ("load_warm_s", "kvsnap load (warm, verified)"),
    ):
        b.plot(ctx, [r[key] * 1e3 for r in rows], marker="o", label=label)
    b.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="ms",
          title="Restore vs reading the same bytes")
    b.set_xticks(ctx, [str(c) for c in ctx])
    b.minorticks_off()
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+")
    parser.add_argument("--quick", action="store_true", help="1K and 2K, fewer repeats")
    bench_common.add_out_argument(parser)
    args = parser.parse_args()
    reexec_with_openblas([os.path.abspath(__file__), *sys.argv[1:]])  # as the kvsnap command does
    contexts = sorted(args.contexts or (QUICK_CONTEXTS if args.quick else DEFAULT_CONTEXTS), reverse=True)
    repeats = QUICK_REPEATS if args.quick else REPEATS
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "restore-work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()

    bench_common.print_machine(machine_info())
    model, tokenizer = load(MODEL)
    text, record = license_text()
    ids = tokenizer.encode(text)[: contexts[0] + 1]
    if len(ids) <= contexts[0]:
        raise SystemExit(f"the text has only {len(ids)} tokens")
    cache = kc.make_cache(model)
    start = time.perf_counter()
    for i in range(0, contexts[0], CHUNK):
        mx.eval(model(mx.array(ids[i : min(i + CHUNK, contexts[0])])[None], cache=cache))
    print(f"kvsnap prefill of {contexts[0]} tokens: {time.perf_counter() - start:.1f} s")

    # Agents wake into one long-lived arena, as in a runtime: its slots' pages
    # are touched once (by the first, untimed load) and reused after.
    pool = kc.make_cache(model).sequences[0].arena
    rows = []
    for n in contexts:  # longest first: each shorter context is the cache trimmed
        cache.trim(cache.offset - n)
        rows.append(measure(model, tokenizer, cache, ids, n, work, repeats, pool))
        r = rows[-1]
        print(f"  {n}: load cold {r['load_cold_s'] * 1e3:.1f} ms, raw {r['raw_read_cold_s'] * 1e3:.1f} ms, "
              f"TTFT {r['ttft_warm_s'] * 1e3:.1f} ms vs re-prefill {r['reprefill_ttft_s']:.1f} s", flush=True)
    rows.sort(key=lambda r: r["context"])
    for r in rows:
        r["cold_load_vs_raw_read"] = r["load_cold_s"] / r["raw_read_cold_s"]
        r["ttft_speedup_vs_reprefill_warm"] = r["reprefill_ttft_s"] / r["ttft_warm_s"]
        r["ttft_speedup_vs_reprefill_cold"] = r["reprefill_ttft_s"] / r["ttft_cold_s"]
        r["ttft_vs_mlx_q4_file_warm"] = r["ttft_warm_s"] / r["mlx_q4_ttft_warm_s"]
        r["ttft_vs_mlx_q4_file_cold"] = r["ttft_cold_s"] / r["mlx_q4_ttft_cold_s"]
        r["bytes_vs_mlx_f16_file"] = r["snapshot_bytes"] / r["mlx_f16_file_bytes"]

    print()
    print(f"{'context':>7} {'snapshot':>9} {'vs f16':>6} {'save':>7} {'load warm':>9} {'load cold':>9} "
          f"{'raw cold':>8} {'cold/raw':>8} {'TTFT warm':>9} {'TTFT cold':>9} {'re-prefill':>10} "
          f"{'speedup':>8} {'mlx q4 file':>11} {'vs mlx':>6}")
    for r in rows:
        print(
            f"{r['context']:>7} {r['snapshot_bytes'] / 2**20:>7.1f}MB {r['bytes_vs_mlx_f16_file']:>6.3f} "
            f"{r['save_s'] * 1e3:>5.0f}ms {r['load_warm_s'] * 1e3:>7.1f}ms {r['load_cold_s'] * 1e3:>7.1f}ms "
            f"{r['raw_read_cold_s'] * 1e3:>6.1f}ms {r['cold_load_vs_raw_read']:>8.2f} "
            f"{r['ttft_warm_s'] * 1e3:>7.1f}ms {r['ttft_cold_s'] * 1e3:>7.1f}ms {r['reprefill_ttft_s']:>9.2f}s "
            f"{r['ttft_speedup_vs_reprefill_warm']:>7.0f}x {r['mlx_q4_ttft_warm_s'] * 1e3:>9.1f}ms "
            f"{r['ttft_vs_mlx_q4_file_warm']:>6.2f}"
        )
    target = next((r for r in rows if r["context"] == TARGET_CONTEXT), None)
    checks = []
    for r in rows:
        checks.append((f"cold restore within {TARGET_COLD_VS_RAW}x of raw read at {r['context']}",
                       r["cold_load_vs_raw_read"] <= TARGET_COLD_VS_RAW, fmt(r["cold_load_vs_raw_read"], ".2f")))
    if target:
        checks += [
            (f"TTFT from snapshot (cold) >= {TARGET_VS_PREFILL}x faster than re-prefill at {TARGET_CONTEXT}",
             target["ttft_speedup_vs_reprefill_cold"] >= TARGET_VS_PREFILL,
             fmt(target["ttft_speedup_vs_reprefill_cold"], ".0f")),
            (f"TTFT <= {TARGET_VS_MLX_FILE}x of mlx-lm q4 file + 1 token at {TARGET_CONTEXT} (warm)",
             target["ttft_vs_mlx_q4_file_warm"] <= TARGET_VS_MLX_FILE, fmt(target["ttft_vs_mlx_q4_file_warm"], ".2f")),
            (f"TTFT <= {TARGET_VS_MLX_FILE}x of mlx-lm q4 file + 1 token at {TARGET_CONTEXT} (cold)",
             target["ttft_vs_mlx_q4_file_cold"] <= TARGET_VS_MLX_FILE, fmt(target["ttft_vs_mlx_q4_file_cold"], ".2f")),
            (f"snapshot bytes <= {TARGET_BYTES}x of mlx-lm's float16 file at {TARGET_CONTEXT}",
             target["bytes_vs_mlx_f16_file"] <= TARGET_BYTES, fmt(target["bytes_vs_mlx_f16_file"], ".3f")),
        ]
    print()
    for name, ok, value in checks:
        print(f"{'PASS' if ok else 'MISS'}  {name}: {value}")

    result = {
        "machine": machine_info(model=MODEL, text=record, repeats=repeats, chunk=CHUNK),
        "rows": rows,
        "targets": [{"target": n, "met": ok, "value": v} for n, ok, v in checks],
    }
    (args.out / "restore.json").write_text(json.dumps(result, indent=2))
    plot(rows, args.out / "restore.png")
    shutil.rmtree(work, ignore_errors=True)
    print(f"\nwrote {args.out / 'restore.json'} and {args.out / 'restore.png'}")


if __name__ == "__main__":
    main()
