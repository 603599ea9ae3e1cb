"""Benchmark a multi-agent workload: kvsnap.AgentMemory against mlx-lm's ways
of keeping (or not keeping) each agent's KV cache between its turns.

SmolLM2-135M (float32 weights), greedy decoding. N agents (default 10) each
hold a conversation of P phases (default 5). An agent's system prompt is one
shared passage (~300 tokens, the same for every agent) plus its own passage
(--own-tokens, default 1,200); each phase adds a user message of ~100 tokens,
and the agent's earlier replies stay in the conversation as assistant
messages, so the last prompt is ~2K tokens. Every passage is real text cut
from the license texts of /usr/share/common-licenses (bench_common), a
different one per agent and phase; the JSON records where each came from.

Phases run round-robin: phase 1 of every agent, then phase 2 of every agent,
... With memory for 3 agents, each agent has left memory before its next turn.
Paths, each computing the same conversations (its own replies go back into
its conversations):

  kvsnap        AgentMemory with a budget for 3 agents (--budget-agents): for
                each, ceil(final context / 256) + 2 blocks of its 4-bit arena
  kvsnap-batched  as kvsnap (same budget), but the agents of a phase speak at
                once: each phase's requests are submitted together from one
                thread per agent, and AgentMemory decodes those admitted
                together in one batch (the others wait for memory). Its time
                is the phase's wall time (split evenly over its requests)
  kvsnap-all    AgentMemory with a budget for every agent: all stay resident
                (the "hot" side of the disk-vs-hot TTFT comparison)
  reprefill     (a) mlx-lm, a fresh float32 cache per request: the whole
                conversation is prefilled every phase
  resident      (b) mlx-lm, one float32 KVCache per agent kept in memory, never
                evicted; each request trims it to the common prefix of its
                token ids and the new prompt, and feeds the rest
  q4-files      (c) mlx-lm, 4-bit g64 QuantizedKVCache (generate_step's kv_bits,
                quantized_kv_start=0) saved per agent with save_prompt_cache
                (token ids in its metadata) after each turn, loaded and trimmed
                to the common prefix before the next
  lru           (d) mlx-lm's LRUPromptCache (the prompt cache of mlx_lm.server)
                as a library: fetch_nearest_cache, generate, insert_cache of
                prompt + reply ids, float32 caches (the server's default,
                no --kv-bits); max_bytes = kvsnap's budget, max_size = 10
                (the server's --prompt-cache-size default)

mlx-lm paths prefill with stream_generate's default prefill_step_size (2048).
The paths take turns request by request (agent k's request of phase p on
every path, then agent k + 1's), so load on the shared machine hits them
alike; a path's total time is the sum of its request times. TTFT: request start (before any load, fetch or trim) to
the first generated token. kvsnap reports its own (Reply.timings.ttft_s).

    python benchmarks/agents.py [--agents 10] [--phases 5] [--max-tokens 16]
        [--own-tokens 1200] [--budget-agents 3] [--paths ...] [--quick] [--out DIR]

Writes DIR/agents.json and DIR/agents.png (DIR: benchmarks/out); stores and
cache files live in DIR/agents-work (on disk, warm page cache) while it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import bench_common
import kvsnap
import numpy as np
from bench_common import fmt, license_text, machine_info
from kvsnap.cache import make_cache
from kvsnap.cli import reexec_with_openblas
from kvsnap.models import load
from mlx_lm import stream_generate
from mlx_lm.models.cache import (
    LRUPromptCache,
    load_prompt_cache,
    make_prompt_cache,
    save_prompt_cache,
    trim_prompt_cache,
)
from mlx_lm.sample_utils import make_sampler

MODEL = "smollm2-135m"
PATHS = ("kvsnap", "kvsnap-batched", "kvsnap-all", "reprefill", "resident", "q4-files", "lru")
PHASE_PATHS = ("kvsnap-batched",)  # served a whole phase at a time, its agents concurrently
REFERENCE = "reprefill"  # float32, full prefill: the replies the others are compared with
DEFAULTS = {"agents": 10, "phases": 5, "max_tokens": 16, "own_tokens": 1200, "budget_agents": 3,
            "shared_tokens": 300, "user_tokens": 100}
QUICK = {"agents": 3, "phases": 2, "max_tokens": 8, "own_tokens": 200, "budget_agents": 1,
         "shared_tokens": 100, "user_tokens": 40}
MARGIN_BLOCKS = 2
LRU_MAX_SIZE = 10  # mlx_lm.server --prompt-cache-size default
# kvsnap's total time at most this fraction of each path's ("faster": strictly below)
TARGET_TIME = {"reprefill": 1 / 5, "resident": 1.0, "q4-files": "faster", "lru": "faster"}
TARGET_MEMORY_VS_RESIDENT = 1 / 3  # kvsnap's budget vs (b)'s peak cache bytes
TARGET_DISK_VS_HOT = 2.0  # kvsnap TTFT, restored from disk vs resident


@dataclass
class Turn:
    tokens: list[int]  # generated ids, an end-of-turn token included
    text: str
    prompt_tokens: int
    reused_tokens: int  # prompt tokens whose K/V came from a cache
    ttft_s: float
    total_s: float
    source: str  # kvsnap: hot, disk, shared, none; mlx-lm paths: cache or none


# ------------------------------------------------------------------ workload


def cut_passages(tokenizer, text: str, sizes: list[int]) -> list[tuple[int, int]]:
    """Consecutive (start, end) character ranges of text holding sizes[i] tokens each."""
    ranges, pos = [], 0
    for n in sizes:
        window = text[pos : pos + 8 * n]
        ids = tokenizer.encode(window, add_special_tokens=False)
        if len(ids) <= n:
            raise SystemExit(f"the license texts end before {sum(sizes)} tokens: use fewer agents or tokens")
        end = pos + len(tokenizer.decode(ids[:n]))
        ranges.append((pos, end))
        pos = end
    return ranges


def file_spans(start: int, end: int, record: dict) -> list[dict]:
    """Which license files (and character ranges in them) text[start:end] comes from."""
    spans, base = [], 0
    for f in record["files"]:
        lo, hi = max(start, base), min(end, base + f["bytes"])  # ASCII files: bytes == chars
        if lo < hi:
            spans.append({"file": f["file"], "start": lo - base, "end": hi - base})
        base += f["bytes"] + 2
    return spans


def build_workload(tokenizer, cfg: dict) -> tuple[list[dict], list[dict], dict]:
    """Each agent's system prompt and user messages, and where every passage came from."""
    text, record = license_text()
    n, p = cfg["agents"], cfg["phases"]
    sizes = [cfg["shared_tokens"]] + [cfg["own_tokens"]] * n + [cfg["user_tokens"]] * (n * p)
    ranges = cut_passages(tokenizer, text, sizes)
    sources = [{"part": "shared system prefix", **_span(ranges[0], record)}]
    shared = text[slice(*ranges[0])]
    agents = []
    for a in range(n):
        own = ranges[1 + a]
        users = [ranges[1 + n + ph * n + a] for ph in range(p)]
        agents.append({"id": f"agent-{a:02d}", "system": shared + "\n\n" + text[slice(*own)],
                       "users": [text[slice(*u)] for u in users]})
        sources.append({"part": f"agent-{a:02d} system", **_span(own, record)})
        sources += [{"part": f"agent-{a:02d} phase {ph + 1} user", **_span(u, record)} for ph, u in enumerate(users)]
    return agents, sources, record


def _span(r: tuple[int, int], record: dict) -> dict:
    return {"chars": list(r), "files": file_spans(*r, record)}


def conversation(agent: dict, replies: list[str], phase: int) -> list[dict]:
    """The messages of the agent's request in `phase` (0-based): system, then
    user/assistant turns, ending with the phase's user message."""
    messages = [{"role": "system", "content": agent["system"]}]
    for ph in range(phase + 1):
        messages.append({"role": "user", "content": agent["users"][ph]})
        if ph < phase:
            messages.append({"role": "assistant", "content": replies[ph]})
    return messages


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The chat template rendered, then tokenized (as AgentMemory does with messages)."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# -------------------------------------------------------------------- paths
# Each path function returns (serve, finish): serve(agent_id, messages) -> Turn
# runs one request; finish() -> dict frees the path's state and reports it.


def mlx_generate(ctx, ids: list[int], cache: list, t0: float, **kwargs) -> tuple[list[int], float]:
    """stream_generate from `ids` into `cache`: the generated ids and the TTFT since t0."""
    tokens, ttft = [], None
    for r in stream_generate(ctx.model, ctx.tokenizer, ids, max_tokens=ctx.max_tokens, sampler=ctx.sampler,
                             prompt_cache=cache, **kwargs):
        if ttft is None:
            ttft = time.perf_counter() - t0
        tokens.append(r.token)
    return tokens, ttft


def held_ids(ids: list[int], tokens: list[int], cache: list) -> list[int]:
    """The ids whose K/V the cache holds after a turn (generate_step steps every
    sampled token, the last one included)."""
    return (ids + tokens)[: cache[0].offset]


def mlx_turn(ctx, ids, tokens, reused, ttft, t0, source) -> Turn:
    text = ctx.tokenizer.decode([t for t in tokens if t not in ctx.eos_ids])
    return Turn(tokens, text, len(ids), reused, ttft, time.perf_counter() - t0, source)


def path_reprefill(ctx):
    peak = 0

    def serve(agent_id, messages):
        nonlocal peak
        t0 = time.perf_counter()
        ids = prompt_ids(ctx.tokenizer, messages)
        cache = make_prompt_cache(ctx.model)
        tokens, ttft = mlx_generate(ctx, ids, cache, t0)
        peak = max(peak, sum(c.nbytes for c in cache))
        return mlx_turn(ctx, ids, tokens, 0, ttft, t0, "none")

    return serve, lambda: {"peak_cache_bytes": peak, "disk_bytes": 0}


def path_resident(ctx):
    caches: dict[str, tuple[list, list[int]]] = {}
    peak = 0

    def serve(agent_id, messages):
        nonlocal peak
        t0 = time.perf_counter()
        ids = prompt_ids(ctx.tokenizer, messages)
        cache, held = caches.get(agent_id) or (make_prompt_cache(ctx.model), [])
        keep = min(common_prefix(held, ids), len(ids) - 1)
        trim_prompt_cache(cache, cache[0].offset - keep)
        tokens, ttft = mlx_generate(ctx, ids[keep:], cache, t0)
        caches[agent_id] = (cache, held_ids(ids, tokens, cache))
        peak = max(peak, sum(c.nbytes for cs, _ in caches.values() for c in cs))
        return mlx_turn(ctx, ids, tokens, keep, ttft, t0, "cache" if keep else "none")

    def finish():
        caches.clear()
        return {"peak_cache_bytes": peak, "disk_bytes": 0}

    return serve, finish


def path_q4_files(ctx):
    folder = ctx.work / "q4-files"
    folder.mkdir()
    quantize = {"kv_bits": 4, "kv_group_size": 64, "quantized_kv_start": 0}
    peak = 0

    def serve(agent_id, messages):
        nonlocal peak
        t0 = time.perf_counter()
        ids = prompt_ids(ctx.tokenizer, messages)
        file = folder / f"{agent_id}.safetensors"
        cache, held = make_prompt_cache(ctx.model), []
        if file.exists():
            cache, meta = load_prompt_cache(str(file), return_metadata=True)
            held = [int(t) for t in meta["tokens"].split(",")]
        keep = min(common_prefix(held, ids), len(ids) - 1)
        trim_prompt_cache(cache, cache[0].offset - keep)
        tokens, ttft = mlx_generate(ctx, ids[keep:], cache, t0, **quantize)
        save_prompt_cache(str(file), cache, {"tokens": ",".join(map(str, held_ids(ids, tokens, cache)))})
        peak = max(peak, sum(c.nbytes for c in cache))
        return mlx_turn(ctx, ids, tokens, keep, ttft, t0, "cache" if keep else "none")

    def finish():
        return {"peak_cache_bytes": peak, "disk_bytes": sum(f.stat().st_size for f in folder.iterdir()),
                "files": len(list(folder.iterdir()))}

    return serve, finish


def path_lru(ctx):
    lru = LRUPromptCache(max_size=LRU_MAX_SIZE, max_bytes=ctx.budget)
    model_key = (MODEL, None, None)  # what mlx_lm.server keys on: (model, adapter, draft)
    peak, hits = 0, 0

    def serve(agent_id, messages):
        nonlocal peak, hits
        t0 = time.perf_counter()
        ids = prompt_ids(ctx.tokenizer, messages)
        cache, rest = lru.fetch_nearest_cache(model_key, ids)
        if cache is None:
            cache = make_prompt_cache(ctx.model)
        keep = len(ids) - len(rest)
        hits += keep > 0
        tokens, ttft = mlx_generate(ctx, rest, cache, t0)
        peak = max(peak, lru.nbytes + sum(c.nbytes for c in cache))
        lru.insert_cache(model_key, ids + tokens, cache)
        return mlx_turn(ctx, ids, tokens, keep, ttft, t0, "cache" if keep else "none")

    def finish():
        held = {"entries_at_end": len(lru), "bytes_at_end": lru.nbytes, "requests_reusing_a_prefix": hits}
        lru.trim_to(n_sequences=0)
        return {"peak_cache_bytes": peak, "disk_bytes": 0, "max_bytes": ctx.budget,
                "max_size": LRU_MAX_SIZE, **held}

    return serve, finish


def path_kvsnap(ctx, budget: int, folder: str):
    memory = kvsnap.AgentMemory(ctx.model, ctx.tokenizer, path=ctx.work / folder, budget=budget)
    peak = 0

    def serve(agent_id, messages):
        nonlocal peak
        t0 = time.perf_counter()
        r = memory.generate(agent_id, messages, max_tokens=ctx.max_tokens, temperature=0.0)
        total = time.perf_counter() - t0
        peak = max(peak, memory.stats()["bytes_in_use"])
        return Turn(r.tokens, r.text, r.usage.prompt_tokens, r.usage.cached_tokens, r.timings.ttft_s, total,
                    r.source)

    def finish():
        stats = memory.stats()
        memory.close()
        return {"peak_cache_bytes": peak, "budget_bytes": budget, "disk_bytes": stats["disk_bytes"],
                "stats": stats}

    return serve, finish


def path_kvsnap_batched(ctx):
    """kvsnap, each phase's requests at once (see the module doc)."""
    serve_one, finish = path_kvsnap(ctx, ctx.budget, "kvsnap-batched-store")

    def serve_phase(conversations: dict[str, list[dict]]) -> dict[str, Turn]:
        turns, errors = {}, []

        def one(agent_id, messages):
            try:
                turns[agent_id] = serve_one(agent_id, messages)
            except Exception as e:  # noqa: BLE001 - raised below, in the caller's thread
                errors.append(e)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=one, args=item) for item in conversations.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        wall = time.perf_counter() - t0
        for turn in turns.values():
            turn.total_s = wall / len(turns)
        return turns

    return serve_phase, finish


def start_path(name: str, ctx):
    if name == "kvsnap-batched":
        return path_kvsnap_batched(ctx)
    if name == "kvsnap":
        return path_kvsnap(ctx, ctx.budget, "kvsnap-store")
    if name == "kvsnap-all":
        return path_kvsnap(ctx, ctx.budget_all, "kvsnap-all-store")
    return {"reprefill": path_reprefill, "resident": path_resident, "q4-files": path_q4_files,
            "lru": path_lru}[name](ctx)


def agent_budget(model, agents: list[dict], tokenizer, cfg: dict) -> tuple[int, int]:
    """Arena bytes for one agent at its final context (its last prompt with
    max_tokens-long replies, plus max_tokens) with MARGIN_BLOCKS spare blocks;
    and the context that was sized for."""
    arena = make_cache(model).sequences[0].arena
    placeholder = " x" * cfg["max_tokens"]  # " x" is one token in SmolLM2's vocabulary
    final = max(len(prompt_ids(tokenizer, conversation(a, [placeholder] * cfg["phases"], cfg["phases"] - 1)))
                for a in agents) + cfg["max_tokens"]
    return (-(-final // arena.block_tokens) + MARGIN_BLOCKS) * arena.slot_bytes, final


# ---------------------------------------------------------------------- run


def run(ctx, names: list[str], agents: list[dict], phases: int) -> dict:
    """Every path through every phase; the paths take turns request by request."""
    state = {n: {"turns": [], "replies": {a["id"]: [] for a in agents}, "error": None} for n in names}
    live = {}
    for n in names:
        try:
            live[n] = start_path(n, ctx)
        except Exception:  # noqa: BLE001 - a path that fails is reported, the others still run
            state[n]["error"] = traceback.format_exc()
            print(f"{n}: could not start:\n{state[n]['error']}", flush=True)
    for ph in range(phases):
        for a in agents:
            for n in [n for n in live if n not in PHASE_PATHS]:
                try:
                    turn = live[n][0](a["id"], conversation(a, state[n]["replies"][a["id"]], ph))
                except Exception:  # noqa: BLE001 - a path that fails is reported, the others still run
                    state[n]["error"] = traceback.format_exc()
                    print(f"{n}: failed in phase {ph + 1}:\n{state[n]['error']}", flush=True)
                    del live[n]
                    continue
                state[n]["replies"][a["id"]].append(turn.text)
                state[n]["turns"].append({"phase": ph + 1, "agent": a["id"], **asdict(turn)})
        for n in [n for n in live if n in PHASE_PATHS]:
            try:
                turns = live[n][0]({a["id"]: conversation(a, state[n]["replies"][a["id"]], ph) for a in agents})
            except Exception:  # noqa: BLE001 - a path that fails is reported, the others still run
                state[n]["error"] = traceback.format_exc()
                print(f"{n}: failed in phase {ph + 1}:\n{state[n]['error']}", flush=True)
                del live[n]
                continue
            for a in agents:
                state[n]["replies"][a["id"]].append(turns[a["id"]].text)
                state[n]["turns"].append({"phase": ph + 1, "agent": a["id"], **asdict(turns[a["id"]])})
        for n in live:
            done = [t for t in state[n]["turns"] if t["phase"] == ph + 1]
            print(f"  phase {ph + 1} {n:>10}: {sum(t['total_s'] for t in done):7.1f} s, TTFT median "
                  f"{statistics.median(t['ttft_s'] for t in done) * 1e3:7.0f} ms", flush=True)
    for n, (_, finish) in live.items():
        state[n].update(finish())
    return state


def summarize(state: dict, phases: int) -> dict:
    out = {}
    for n, s in state.items():
        turns = s["turns"]
        per_phase = []
        for ph in range(1, phases + 1):
            ttft = [t["ttft_s"] for t in turns if t["phase"] == ph]
            per_phase.append({"median_s": float(np.median(ttft)) if ttft else None,
                              "p95_s": float(np.percentile(ttft, 95)) if ttft else None})
        out[n] = {
            "complete": s["error"] is None,
            "total_s": sum(t["total_s"] for t in turns),
            "ttft_per_phase": per_phase,
            "prompt_tokens": sum(t["prompt_tokens"] for t in turns),
            "reused_tokens": sum(t["reused_tokens"] for t in turns),
            "sources": {src: sum(t["source"] == src for t in turns) for src in sorted({t["source"] for t in turns})},
            "peak_cache_bytes": s.get("peak_cache_bytes"),
            "disk_bytes": s.get("disk_bytes"),
            **{k: v for k, v in s.items() if k not in ("turns", "replies", "error", "peak_cache_bytes", "disk_bytes")},
        }
    return out


def agreement(state: dict, agents: list[dict], phases: int) -> dict:
    """Per phase: how many agents' replies equal the reference path's, per path,
    and how many are equal across every path that got that far."""
    names = [n for n in state if state[n]["turns"]]
    ref = REFERENCE if REFERENCE in names else (names[0] if names else None)
    tokens = {n: {(t["phase"], t["agent"]): t["tokens"] for t in state[n]["turns"]} for n in names}
    out = {"reference": ref, "phases": []}
    for ph in range(1, phases + 1):
        keys = [(ph, a["id"]) for a in agents]
        row = {"phase": ph, "vs_reference": {}, "all_paths": 0}
        for n in names:
            row["vs_reference"][n] = sum(k in tokens[n] and tokens[n][k] == tokens[ref].get(k) for k in keys)
        row["all_paths"] = sum(all(k in tokens[n] and tokens[n][k] == tokens[ref].get(k) for n in names) for k in keys)
        out["phases"].append(row)
    return out


def disk_vs_hot(state: dict) -> dict:
    """kvsnap TTFT of requests restored from disk against requests whose agent
    was resident (kvsnap's own hot hits and kvsnap-all's), phases 2 and later."""
    turns = [t for n in ("kvsnap", "kvsnap-all") for t in state.get(n, {}).get("turns", []) if t["phase"] > 1]
    disk = [t["ttft_s"] for t in turns if t["source"] == "disk"]
    hot = [t["ttft_s"] for t in turns if t["source"] == "hot"]
    out = {"disk_requests": len(disk), "hot_requests": len(hot)}
    if disk and hot:
        out.update(disk_median_s=statistics.median(disk), hot_median_s=statistics.median(hot),
                   ratio=statistics.median(disk) / statistics.median(hot))
    return out


def targets(summary: dict, dvh: dict) -> list[tuple[str, bool | None, str]]:
    """(target, met or None when a path is missing or failed, value)."""
    done = {n: s for n, s in summary.items() if s["complete"] and s["prompt_tokens"]}
    k = done.get("kvsnap")
    checks = []
    for other, limit in TARGET_TIME.items():
        r = k["total_s"] / done[other]["total_s"] if k and other in done else None
        met = None if r is None else r < 1 if limit == "faster" else r <= limit
        want = "< 1" if limit == "faster" else f"<= {limit:.2f}"
        checks.append((f"kvsnap total time / {other}'s {want}", met, fmt(r, ".3f")))
    r = k["budget_bytes"] / done["resident"]["peak_cache_bytes"] if k and "resident" in done else None
    checks.append((f"kvsnap budget / resident's peak cache bytes <= {TARGET_MEMORY_VS_RESIDENT:.2f}",
                   None if r is None else r <= TARGET_MEMORY_VS_RESIDENT, fmt(r, ".3f")))
    batched = done.get("kvsnap-batched")
    r = batched["total_s"] / k["total_s"] if k and batched else None
    checks.append(("kvsnap-batched total time / kvsnap's (one request at a time) < 1", None if r is None else r < 1,
                   fmt(r, ".3f")))
    r = dvh.get("ratio")
    checks.append((f"kvsnap TTFT from disk / hot (medians, phases >= 2) <= {TARGET_DISK_VS_HOT:.0f}",
                   None if r is None else r <= TARGET_DISK_VS_HOT, fmt(r, ".2f")))
    return checks


# ------------------------------------------------------------------- report


def mb(n: int | None) -> str:
    return fmt(None if n is None else n / 1e6, ".1f")


def print_report(summary: dict, agree: dict, dvh: dict, checks, phases: int) -> None:
    k_total = summary.get("kvsnap", {}).get("total_s")
    head = f"{'path':>10} {'total s':>8} {'vs kvsnap':>9} {'peak MB':>8} {'disk MB':>8} {'reused':>7} "
    print("\nTTFT median / p95 per phase, ms")
    print(head + " ".join(f"{f'phase {p}':>13}" for p in range(1, phases + 1)))
    for n, s in summary.items():
        if not s["prompt_tokens"]:
            print(f"{n:>10} FAILED before its first reply")
            continue
        rel = s["total_s"] / k_total if k_total else None
        reused = s["reused_tokens"] / s["prompt_tokens"] if s["prompt_tokens"] else None
        cols = " ".join(f"{fmt(None if t['median_s'] is None else t['median_s'] * 1e3, '.0f'):>6}/"
                        f"{fmt(None if t['p95_s'] is None else t['p95_s'] * 1e3, '.0f'):<6}"
                        for t in s["ttft_per_phase"])
        flag = "" if s["complete"] else "  (FAILED, partial)"
        print(f"{n:>10} {s['total_s']:>8.1f} {fmt(rel, '.2f'):>8}x {mb(s['peak_cache_bytes']):>8} "
              f"{mb(s['disk_bytes']):>8} {fmt(reused, '.0%'):>7} {cols}{flag}")
    print(f"\nreplies equal to {agree['reference']}'s (agents per phase):")
    for row in agree["phases"]:
        per = ", ".join(f"{n} {v}" for n, v in row["vs_reference"].items())
        print(f"  phase {row['phase']}: {per}; all paths {row['all_paths']}")
    for n in ("kvsnap", "kvsnap-all"):
        if "stats" in summary.get(n, {}):
            st = summary[n]["stats"]
            print(f"\n{n} stats: hits {st['hits']}, tokens computed {st['tokens_computed']} / reused "
                  f"{st['tokens_reused']}, evictions {st['evictions']}, restores {st['restores']}, "
                  f"disk {st['disk_bytes'] / 1e6:.1f} MB in {st['disk_blocks']} blocks, "
                  f"budget {st['budget_bytes'] / 1e6:.1f} MB")
    if dvh.get("ratio"):
        print(f"kvsnap TTFT disk {dvh['disk_median_s'] * 1e3:.0f} ms ({dvh['disk_requests']} requests) vs hot "
              f"{dvh['hot_median_s'] * 1e3:.0f} ms ({dvh['hot_requests']}): {dvh['ratio']:.2f}x")
    print()
    for name, ok, value in checks:
        print(f"{'-' if ok is None else 'PASS' if ok else 'MISS'}  {name}: {value}")


def plot(summary: dict, phases: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    bars = a.bar(names, [summary[n]["total_s"] for n in names], color=[f"C{i}" for i in range(len(names))])
    a.bar_label(bars, fmt="%.0f s", fontsize=8)
    a.set(ylabel="total time of all requests (s)", title="Multi-agent workload: SmolLM2-135M, CPU")
    a.tick_params(axis="x", labelrotation=20)
    for i, n in enumerate(names):
        med = [t["median_s"] for t in summary[n]["ttft_per_phase"]]
        xs = [p + 1 for p, m in enumerate(med) if m is not None]
        b.plot(xs, [m * 1e3 for m in med if m is not None], marker="o", color=f"C{i}", label=n)
    b.set(yscale="log", xlabel="phase", ylabel="TTFT, median over agents (ms)", title="Time to first token per phase")
    b.set_xticks(range(1, phases + 1))
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int)
    parser.add_argument("--phases", type=int)
    parser.add_argument("--max-tokens", type=int, help="tokens per reply (default 16)")
    parser.add_argument("--own-tokens", type=int, help="tokens of each agent's own system text (default 1200)")
    parser.add_argument("--budget-agents", type=int, help="agents kvsnap's budget holds (default 3)")
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    parser.add_argument("--quick", action="store_true", help="3 agents x 2 phases, short prompts")
    bench_common.add_out_argument(parser)
    args = parser.parse_args()
    reexec_with_openblas([os.path.abspath(__file__), *sys.argv[1:]])  # as the kvsnap command does
    cfg = dict(QUICK if args.quick else DEFAULTS)
    cfg.update({k: v for k in cfg if (v := getattr(args, k, None)) is not None})
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "agents-work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()

    machine = machine_info(model=MODEL)
    bench_common.print_machine(machine)
    model, tokenizer = load(MODEL)
    agents, sources, record = build_workload(tokenizer, cfg)
    per_agent, final_context = agent_budget(model, agents, tokenizer, cfg)
    ctx = argparse.Namespace(model=model, tokenizer=tokenizer, max_tokens=cfg["max_tokens"], work=work,
                             sampler=make_sampler(temp=0.0), eos_ids=set(tokenizer.eos_token_ids),
                             budget=cfg["budget_agents"] * per_agent, budget_all=cfg["agents"] * per_agent)
    print(f"{cfg['agents']} agents x {cfg['phases']} phases, {cfg['max_tokens']} tokens per reply, final context "
          f"<= {final_context} tokens; kvsnap budget {ctx.budget / 1e6:.1f} MB ({cfg['budget_agents']} agents x "
          f"{per_agent / 1e6:.2f} MB), kvsnap-all {ctx.budget_all / 1e6:.1f} MB", flush=True)

    start = time.perf_counter()
    state = run(ctx, args.paths, agents, cfg["phases"])
    summary = summarize(state, cfg["phases"])
    agree = agreement(state, agents, cfg["phases"])
    dvh = disk_vs_hot(state)
    checks = targets(summary, dvh)
    print_report(summary, agree, dvh, checks, cfg["phases"])

    result = {
        "machine": {**machine, "text": record, "wall_s": time.perf_counter() - start,
                    "load_average_at_end": os.getloadavg()},
        "config": {**cfg, "paths": args.paths, "final_context_tokens": final_context, "budget_bytes": ctx.budget,
                   "budget_all_bytes": ctx.budget_all, "budget_per_agent_bytes": per_agent,
                   "margin_blocks": MARGIN_BLOCKS, "lru_max_size": LRU_MAX_SIZE},
        "sources": sources,
        "summary": summary,
        "agreement": agree,
        "disk_vs_hot": dvh,
        "targets": [{"target": n, "met": ok, "value": v} for n, ok, v in checks],
        "errors": {n: s["error"] for n, s in state.items() if s["error"]},
        "turns": {n: s["turns"] for n, s in state.items()},
    }
    (args.out / "agents.json").write_text(json.dumps(result, indent=1))
    plot(summary, cfg["phases"], args.out / "agents.png")
    shutil.rmtree(work, ignore_errors=True)
    print(f"\nwrote {args.out / 'agents.json'} and {args.out / 'agents.png'}")


if __name__ == "__main__":
    main()
