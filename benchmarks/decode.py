"""Benchmark whole-model decode and prefill: kvsnap's Q4 cache against mlx-lm's caches.

SmolLM2-135M (float32 weights) on real text: the license texts of
/usr/share/common-licenses, concatenated in a fixed order (LICENSE_FILES).
Every variant runs in the same process on the same context:

  kvsnap q4 g64       kvsnap's drop-in cache: 4-bit groups of 64 with float16
                      scales/biases in arena blocks, attended by its fused kernel
                      (kvsnap.cache's defaults otherwise, e.g. its Hadamard
                      rotation of K/V where it applies one), with the CPU
                      kernel set kvsnap picks here (kvsnap._ext.isa())
  kvsnap q4 g64 [avx2]  the same cache with the float kernels ("avx2", or
                      "generic" on a CPU without AVX2), the path before the
                      integer kernels; only where the default is another set
  kvsnap k6v4 accurate  make_cache(quality="accurate"): 6-bit keys, 4-bit
                      values (5.5 bits per element), same kernel set
  mlx-lm f32          mlx-lm's KVCache (float32 K/V, mx.fast sdpa)
  mlx-lm q4 g64       mlx-lm's QuantizedKVCache, 4-bit groups of 64 (float32
                      scales/biases, as a float32 model's cache holds them)

The context is built once: the text's first max(contexts) tokens are
prefilled with mlx-lm's float32 KVCache in chunks of 512, each chunk
evaluated like mlx-lm's generate does (the cache state, not the logits).
Chunks are causal, so the first N positions of that cache are exactly what a
prefill of N tokens gives; each context N takes them as its float32 cache.
The quantized caches are derived from it: kvsnap via kvsnap.cache.from_mlx
(quantizes the same float K/V), mlx-lm via KVCache.to_quantized. A separate
check at 1K compares that derived kvsnap cache with a direct kvsnap prefill.

Decode: the text's next token, then greedy tokens; every step is
`model(token, cache=c)` evaluated, timed per step. The variants take turns
step by step (so a change in machine load hits them alike); the first
WARMUP steps are not timed, the median of the rest is reported.

Prefill: kvsnap's cache (kvsnap.cache.make_cache) and the float32 KVCache
prefill the first PREFILL_CONTEXT tokens chunk by chunk, taking turns per
chunk (the float32 chunks are the first chunks of the context build).

    python benchmarks/decode.py [--contexts 1024 4096 8192] [--quick] [--out DIR]

Writes DIR/decode.json and DIR/decode.png (DIR: benchmarks/out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import bench_common
import mlx.core as mx
from bench_common import LICENSE_DIR, files_spanned, fmt, license_text, machine_info
from kvsnap import _ext
from kvsnap import cache as kc
from kvsnap.models import load
from mlx_lm.models.cache import KVCache, QuantizedKVCache, make_prompt_cache

MODEL = "smollm2-135m"
BITS, GROUP_SIZE, BLOCK_TOKENS = 4, 64, 256
CHUNK = 512  # prefill chunk, mlx-lm's default prefill_step_size
DEFAULT_CONTEXTS = (1024, 4096, 8192)
QUICK_CONTEXTS = (1024, 2048)
PREFILL_CONTEXT, QUICK_PREFILL_CONTEXT = 4096, 1024
CHECK_CONTEXT = 1024  # where the derived kvsnap cache is compared with a direct prefill
WARMUP, STEPS = 2, 16
QUICK_WARMUP, QUICK_STEPS = 1, 4


KVSNAP = "kvsnap q4 g64"
FLOAT = "mlx-lm f32"
MLX_Q4 = "mlx-lm q4 g64"
DEFAULT_ISA = _ext.isa()
FLOAT_ISA = "avx2" if "avx2" in _ext.available_isas() else "generic"
KVSNAP_FLOAT = f"{KVSNAP} [{FLOAT_ISA}]"
KVSNAP_ACCURATE = "kvsnap k6v4 accurate"  # quality="accurate": 6-bit keys, 4-bit values
VARIANTS = (KVSNAP, FLOAT, MLX_Q4) + ((KVSNAP_FLOAT,) if FLOAT_ISA != DEFAULT_ISA else ()) + (KVSNAP_ACCURATE,)
ISA_OF = {KVSNAP_FLOAT: FLOAT_ISA}  # variants run with another CPU kernel set

# kvsnap must decode this many times faster than the float32 KVCache and
# mlx-lm's QuantizedKVCache at TARGET_CONTEXT (and gain more over float32 at
# the longer context), hold at most this fraction of float16's bytes per
# token, and prefill no slower than the float32 KVCache.
TARGET_CONTEXT, TARGET_LONG_CONTEXT = 4096, 8192
TARGET_VS_FLOAT, TARGET_VS_MLX_Q4 = 1.3, 2.0
TARGET_BYTES_FRACTION = 0.3
TARGET_PREFILL_RATIO = 1.0

# How closely the derived cache's next-token logits were expected to match a
# direct kvsnap prefill's. They only can if every layer's K/V match, but the
# derived cache quantizes a float32 prefill's K/V while in a kvsnap prefill
# every layer after the first sees hidden states from quantized attention.
# Layer 0's K/V do not depend on attention: those must match byte for byte.
CHECK_RELATIVE_TOLERANCE = 1e-5


@dataclass
class Row:
    context: int
    variant: str
    ms: float
    ms_min: float
    steps: int
    tokens_per_s: float
    bytes_per_token: float
    f16_fraction: float  # bytes_per_token / float16 K/V bytes per token
    arena_bytes_per_token: float | None = None  # kvsnap: whole allocated blocks
    kvsnap_speedup: float | None = None  # this row's ms / kvsnap's ms
    first_token: int = -1
    first_token_text: str = ""
    tokens: list[int] | None = None


# ---------------------------------------------------------------------------
# Machine and text


# ---------------------------------------------------------------------------
# Caches


def f16_bytes_per_token(model) -> int:
    """K and V of every layer in float16."""
    attn = model.layers[0].self_attn
    head_dim = model.args.head_dim or model.args.hidden_size // model.args.num_attention_heads
    return 2 * len(model.layers) * attn.n_kv_heads * head_dim * 2


def float_prefix(caches: list[KVCache], n: int) -> list[KVCache]:
    """Float32 caches holding the first n positions of `caches` (which stay as they are)."""
    out = []
    for c in caches:
        f = KVCache()
        f.state = (c.keys[..., :n, :], c.values[..., :n, :], n)
        out.append(f)
    mx.eval([(c.keys, c.values) for c in out])
    return out


def float_bytes(caches: list[KVCache]) -> int:
    return sum(
        c.keys[..., : c.offset, :].nbytes + c.values[..., : c.offset, :].nbytes for c in caches
    )


def mlx_q4_bytes(caches: list[QuantizedKVCache]) -> int:
    """Packed data + scales + biases of the held tokens (mlx-lm allocates in steps of 256)."""
    return sum(x[..., : c.offset, :].nbytes for c in caches for x in (*c.keys, *c.values))


def kvsnap_bytes(cache: kc.PromptCache) -> int:
    return sum(c.nbytes for c in cache if isinstance(c, kc.KVSnapCache))


def eval_prefill(cache: list) -> None:
    """Evaluate a prefill chunk as mlx-lm's generate does: the cache, not the logits."""
    mx.eval([c.state for c in cache])


# ---------------------------------------------------------------------------
# Measurements


def prefill(model, ids: list[int], total: int, kvsnap_upto: int) -> tuple[list[KVCache], dict]:
    """Float32 caches of ids[:total]; kvsnap prefills ids[:kvsnap_upto] alongside, timed."""
    float_cache = make_prompt_cache(model)
    kvsnap_cache = kc.make_cache(model, bits=BITS, group_size=GROUP_SIZE, block_tokens=BLOCK_TOKENS)
    float_s, kvsnap_s = [], []
    for start in range(0, total, CHUNK):
        chunk = mx.array(ids[start : start + CHUNK])[None]
        t0 = time.perf_counter()
        model(chunk, cache=float_cache)
        eval_prefill(float_cache)
        float_s.append(time.perf_counter() - t0)
        line = f"  prefill {start:5d}..{start + CHUNK:5d}: {FLOAT} {float_s[-1]:6.2f} s"
        if start < kvsnap_upto:
            t0 = time.perf_counter()
            model(chunk, cache=kvsnap_cache)
            eval_prefill(kvsnap_cache)
            kvsnap_s.append(time.perf_counter() - t0)
            line += f", {KVSNAP} {kvsnap_s[-1]:6.2f} s"
        print(line, flush=True)
    kvsnap_cache.release()
    n_chunks = len(kvsnap_s)
    float_total, kvsnap_total = sum(float_s[:n_chunks]), sum(kvsnap_s)
    report = {
        "tokens": kvsnap_upto,
        "chunk": CHUNK,
        "evaluated": "cache state per chunk (as mlx_lm.generate's prefill)",
        "float_s": float_total,
        "kvsnap_s": kvsnap_total,
        "float_tokens_per_s": kvsnap_upto / float_total,
        "kvsnap_tokens_per_s": kvsnap_upto / kvsnap_total,
        "float_over_kvsnap": float_total / kvsnap_total,
        "float_chunk_s": float_s[:n_chunks],
        "kvsnap_chunk_s": kvsnap_s,
        "context_build_s": sum(float_s),
    }
    return float_cache, report


def next_logits(model, cache: list, token: int) -> mx.array:
    logits = model(mx.array([[token]]), cache=cache)[0, -1].astype(mx.float32)
    mx.eval(logits)
    return logits


def check_derived_cache(model, ids: list[int], float_cache: list[KVCache], n: int) -> dict:
    """Compare kvsnap's cache derived from float K/V with a direct kvsnap prefill of ids[:n].

    Both are fed the text's next token; their logits are compared, and the
    packed K of every layer (layer 0 does not depend on attention: it must be
    identical; deeper layers see the prefill's quantized attention).
    """
    direct = kc.make_cache(model, bits=BITS, group_size=GROUP_SIZE, block_tokens=BLOCK_TOKENS)
    for start in range(0, n, CHUNK):
        model(mx.array(ids[start : min(n, start + CHUNK)])[None], cache=direct)
        eval_prefill(direct)
    floats = float_prefix(float_cache, n)
    derived = kc.from_mlx(model, floats, bits=BITS, group_size=GROUP_SIZE)

    packed_direct = [c.keys[0] for c in kc.to_mlx(direct)]
    packed_derived = [c.keys[0] for c in kc.to_mlx(derived)]
    differing = [
        mx.mean(a != b).item() for a, b in zip(packed_direct, packed_derived)
    ]  # fraction of differing uint32 words per layer

    token = ids[n]
    direct_logits = next_logits(model, direct, token)
    derived_logits = next_logits(model, derived, token)
    float_logits = next_logits(model, floats, token)
    direct.release()
    derived.release()

    def relative(a: mx.array, b: mx.array) -> float:
        return (mx.abs(a - b).max() / mx.abs(b).max()).item()

    rel = relative(derived_logits, direct_logits)
    return {
        "context": n,
        "next_token_fed": token,
        "relative_diff_derived_vs_direct": rel,
        "relative_diff_direct_vs_float": relative(direct_logits, float_logits),
        "relative_diff_derived_vs_float": relative(derived_logits, float_logits),
        "greedy_direct": int(mx.argmax(direct_logits).item()),
        "greedy_derived": int(mx.argmax(derived_logits).item()),
        "greedy_float": int(mx.argmax(float_logits).item()),
        "packed_k_differing_fraction_per_layer": differing,
        "layer0_identical": differing[0] == 0.0,
        "tolerance": CHECK_RELATIVE_TOLERANCE,
        "status": "ok" if rel <= CHECK_RELATIVE_TOLERANCE else "DIFFERS",
    }


def decode(
    model, caches: dict[str, list], first_token: int, warmup: int, steps: int
) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    """Seconds per timed step and the tokens produced, per variant (variants take turns)."""
    tokens = {name: [first_token] for name in caches}
    times: dict[str, list[float]] = {name: [] for name in caches}
    for step in range(warmup + steps):
        for name, cache in caches.items():
            token = mx.array([[tokens[name][-1]]])
            _ext.set_isa(ISA_OF.get(name, DEFAULT_ISA))
            try:
                t0 = time.perf_counter()
                logits = model(token, cache=cache)
                mx.eval(logits)
                elapsed = time.perf_counter() - t0
            finally:
                _ext.set_isa(DEFAULT_ISA)
            tokens[name].append(int(mx.argmax(logits[0, -1]).item()))
            if step >= warmup:
                times[name].append(elapsed)
    return times, {name: t[1:] for name, t in tokens.items()}


def bench_context(
    model, tokenizer, ids: list[int], float_cache: list[KVCache], n: int, warmup: int, steps: int
) -> list[Row]:
    f16 = f16_bytes_per_token(model)
    floats = float_prefix(float_cache, n)
    kvsnap_cache = kc.from_mlx(model, floats, bits=BITS, group_size=GROUP_SIZE)
    mlx_q4 = [c.to_quantized(group_size=GROUP_SIZE, bits=BITS) for c in floats]
    mx.eval([(c.keys, c.values) for c in mlx_q4])
    stored = {
        KVSNAP: kvsnap_bytes(kvsnap_cache),
        FLOAT: float_bytes(floats),
        MLX_Q4: mlx_q4_bytes(mlx_q4),
    }
    arena_bytes = kvsnap_cache.nbytes
    caches = {KVSNAP: kvsnap_cache, FLOAT: floats, MLX_Q4: mlx_q4}
    if KVSNAP_FLOAT in VARIANTS:
        caches[KVSNAP_FLOAT] = kc.from_mlx(model, floats, bits=BITS, group_size=GROUP_SIZE)
        stored[KVSNAP_FLOAT] = stored[KVSNAP]
    caches[KVSNAP_ACCURATE] = kc.from_mlx(
        model, floats, bits=BITS, group_size=GROUP_SIZE, key_bits=kc.ACCURATE_KEY_BITS
    )
    stored[KVSNAP_ACCURATE] = kvsnap_bytes(caches[KVSNAP_ACCURATE])
    times, tokens = decode(model, caches, ids[n], warmup, steps)
    for name in (KVSNAP, KVSNAP_FLOAT, KVSNAP_ACCURATE):
        if name in caches:
            caches[name].release()

    rows = []
    for name in VARIANTS:
        seconds = statistics.median(times[name])
        row = Row(
            context=n,
            variant=name,
            ms=seconds * 1e3,
            ms_min=min(times[name]) * 1e3,
            steps=len(times[name]),
            tokens_per_s=1 / seconds,
            bytes_per_token=stored[name] / n,
            f16_fraction=stored[name] / n / f16,
            arena_bytes_per_token=arena_bytes / n if name in (KVSNAP, KVSNAP_FLOAT) else None,
            first_token=tokens[name][0],
            first_token_text=tokenizer.decode([tokens[name][0]]),
            tokens=tokens[name],
        )
        rows.append(row)
        print(
            f"  decode @ {n // 1024}K  {name:<20} {row.ms:8.1f} ms/step  ({row.steps} steps)",
            flush=True,
        )
    kvsnap_ms = rows[0].ms
    for row in rows:
        row.kvsnap_speedup = row.ms / kvsnap_ms
    return rows


# ---------------------------------------------------------------------------
# Reporting


def print_table(rows: list[Row], f16: int) -> None:
    header = (
        f"{'context':>7} {'variant':<22} {'ms/step':>8} {'min':>7} {'tok/s':>6} "
        f"{'B/token':>8} {'x f16':>6} {'kvsnap x':>8}  first greedy token"
    )
    print(header)
    print("-" * len(header))
    context = None
    for row in rows:
        if context is not None and row.context != context:
            print()
        context = row.context
        print(
            f"{row.context:7d} {row.variant:<22} {row.ms:8.1f} {row.ms_min:7.1f} {row.tokens_per_s:6.2f} "
            f"{row.bytes_per_token:8.0f} {row.f16_fraction:6.3f} {fmt(row.kvsnap_speedup, '7.2f')}x  "
            f"{row.first_token} {row.first_token_text!r}"
        )
    print(
        f"\nms/step: median per decode step (min: fastest step); B/token: K/V bytes held per context token "
        f"(kvsnap: packed + float16 scales/biases; mlx-lm q4: packed + float32 scales/biases, trimmed "
        f"to the tokens held); x f16: of float16 K/V = {f16} B/token;"
        f"\nkvsnap x: this row's ms / {KVSNAP}'s (how many times faster kvsnap is)"
    )


def find(rows: list[Row], context: int, variant: str) -> Row | None:
    return next((r for r in rows if r.context == context and r.variant == variant), None)


def first_token_check(rows: list[Row], context: int, rotated: bool) -> dict:
    """kvsnap's first greedy token must be mlx-lm q4's (same quantization of the same K/V).

    A rotated kvsnap cache quantizes other numbers than mlx-lm's Q4 cache, so
    there the token may instead match float32's.
    """
    tokens = {name: find(rows, context, name) for name in (KVSNAP, FLOAT, MLX_Q4)}
    ours = tokens[KVSNAP].first_token
    note = ""
    if ours == tokens[MLX_Q4].first_token:
        status = "ok"
    elif rotated and ours == tokens[FLOAT].first_token:
        status = "ok"
        note = f"kvsnap's K/V are rotated before quantizing, unlike {MLX_Q4}'s; it matches {FLOAT}"
    else:
        status = "FAIL"
    return {
        "context": context,
        **{name: f"{r.first_token} {r.first_token_text!r}" for name, r in tokens.items()},
        "status": status,
        "note": note,
    }


def speedup(rows: list[Row], context: int, other: str) -> float | None:
    base, row = find(rows, context, KVSNAP), find(rows, context, other)
    return None if base is None or row is None else row.ms / base.ms


def check_targets(rows: list[Row], prefill_report: dict) -> list[dict]:
    k = TARGET_CONTEXT // 1024
    long_k = TARGET_LONG_CONTEXT // 1024
    vs_float = speedup(rows, TARGET_CONTEXT, FLOAT)
    vs_float_long = speedup(rows, TARGET_LONG_CONTEXT, FLOAT)
    base = find(rows, TARGET_CONTEXT, KVSNAP) or next(
        (r for r in rows if r.variant == KVSNAP), None
    )
    prefill_k = prefill_report["tokens"] // 1024
    targets = [
        {
            "target": f"decode {k}K: {KVSNAP} >= {TARGET_VS_FLOAT:g}x faster than {FLOAT}",
            "measured": vs_float,
            "goal": TARGET_VS_FLOAT,
            "unit": "x",
        },
        {
            "target": f"decode {long_k}K: {KVSNAP} gains more over {FLOAT} than at {k}K",
            "measured": vs_float_long,
            "goal": None if vs_float is None else max(vs_float, TARGET_VS_FLOAT),
            "unit": "x",
        },
        {
            "target": f"decode {k}K: {KVSNAP} >= {TARGET_VS_MLX_Q4:g}x faster than {MLX_Q4}",
            "measured": speedup(rows, TARGET_CONTEXT, MLX_Q4),
            "goal": TARGET_VS_MLX_Q4,
            "unit": "x",
        },
        {
            "target": (
                f"decode {long_k}K: {KVSNAP} ({DEFAULT_ISA}) faster than {KVSNAP_FLOAT} "
                "(the float kernels, same cache)"
            ),
            "measured": speedup(rows, TARGET_LONG_CONTEXT, KVSNAP_FLOAT),
            "goal": None if KVSNAP_FLOAT not in VARIANTS else 1.0,
            "unit": "x",
        },
        {
            "target": f"decode {long_k}K: {KVSNAP_ACCURATE} step time / {KVSNAP}'s (reported, no goal)",
            "measured": speedup(rows, TARGET_LONG_CONTEXT, KVSNAP_ACCURATE),
            "goal": None,
            "unit": "x",
        },
        {
            "target": f"{KVSNAP} bytes per token <= {TARGET_BYTES_FRACTION:g}x float16",
            "measured": None if base is None else base.f16_fraction,
            "goal": TARGET_BYTES_FRACTION,
            "unit": "x",
            "lower_is_better": True,
        },
        {
            "target": f"prefill {prefill_k}K: {KVSNAP} no slower than {FLOAT} ({FLOAT} time / kvsnap time)",
            "measured": prefill_report["float_over_kvsnap"],
            "goal": TARGET_PREFILL_RATIO,
            "unit": "x",
        },
    ]
    if prefill_report["tokens"] != PREFILL_CONTEXT:
        targets[-1]["note"] = (
            f"target is at {PREFILL_CONTEXT // 1024}K; this run prefilled {prefill_k}K"
        )
    for target in targets:
        measured, goal = target["measured"], target["goal"]
        if measured is None or goal is None:
            target["status"] = "n/a"
        elif target.get("lower_is_better"):
            target["status"] = "PASS" if measured <= goal else "MISS"
        else:
            target["status"] = "PASS" if measured >= goal else "MISS"
    return targets


def print_targets(targets: list[dict]) -> None:
    print("\ntargets")
    for target in targets:
        measured = target["measured"]
        shown = "context not run" if measured is None else f"{measured:.2f}{target['unit']}"
        if target["goal"] is not None and measured is not None:
            shown += (
                f" (goal {'<=' if target.get('lower_is_better') else '>='} {target['goal']:.2f})"
            )
        if "note" in target:
            shown += f" [{target['note']}]"
        print(f"  {target['status']:<4} {target['target']}: {shown}")


def plot(rows: list[Row], prefill_report: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    fig, (ax_ms, ax_bytes) = plt.subplots(1, 2, figsize=(12, 4.5), width_ratios=(3, 2))
    contexts = sorted({r.context for r in rows})
    for name in VARIANTS:
        points = [r for r in rows if r.variant == name]
        style = {"linewidth": 2.5} if name == KVSNAP else {"linestyle": "--"}
        ax_ms.plot(
            [r.context for r in points], [r.ms for r in points], marker="o", label=name, **style
        )
    ax_ms.set_xscale("log", base=2)
    ax_ms.set_xticks(contexts, [f"{c // 1024}K" for c in contexts])
    ax_ms.set_xlabel("context (tokens)")
    ax_ms.set_ylabel("ms per decode step (median)")
    ax_ms.set_ylim(bottom=0)
    ax_ms.set_title(f"{MODEL} decode, whole model")
    ax_ms.grid(True, alpha=0.3)
    ax_ms.legend(fontsize=8)

    last = [find(rows, contexts[-1], name) for name in VARIANTS]
    ax_bytes.bar(
        VARIANTS, [r.f16_fraction for r in last], color=[f"C{i}" for i in range(len(VARIANTS))]
    )
    ax_bytes.axhline(1.0, color="black", linewidth=1, label="float16")
    ax_bytes.axhline(TARGET_BYTES_FRACTION, color="gray", linestyle=":", label="target")
    ax_bytes.set_ylabel("K/V bytes per token / float16's")
    ax_bytes.set_title(
        f"cache size; prefill {prefill_report['tokens'] // 1024}K: "
        f"{FLOAT} / kvsnap = {prefill_report['float_over_kvsnap']:.2f}x"
    )
    ax_bytes.legend(fontsize=8)
    ax_bytes.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"{os.cpu_count()} CPU cores, kvsnap {_ext.isa()} x{_ext.num_threads()} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--contexts",
        type=int,
        nargs="+",
        help=f"decode contexts in tokens (default {DEFAULT_CONTEXTS}, quick {QUICK_CONTEXTS})",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"contexts {QUICK_CONTEXTS}, prefill {QUICK_PREFILL_CONTEXT}, few steps",
    )
    parser.add_argument(
        "--steps",
        type=int,
        help=f"timed decode steps per variant (default {STEPS}, quick {QUICK_STEPS})",
    )
    bench_common.add_out_argument(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    mx.set_default_device(mx.cpu)
    contexts = sorted(args.contexts or (QUICK_CONTEXTS if args.quick else DEFAULT_CONTEXTS))
    prefill_context = QUICK_PREFILL_CONTEXT if args.quick else PREFILL_CONTEXT
    warmup = QUICK_WARMUP if args.quick else WARMUP
    steps = args.steps or (QUICK_STEPS if args.quick else STEPS)
    if any(c % CHUNK for c in contexts):
        raise SystemExit(
            f"--contexts: every context must be a multiple of the prefill chunk {CHUNK}"
        )

    machine = machine_info()
    bench_common.print_machine(machine)

    model, tokenizer = load(MODEL)
    text, text_record = license_text()
    ids = tokenizer.encode(text)
    total = max(max(contexts), prefill_context, CHECK_CONTEXT)
    if total + 1 > len(ids):
        raise SystemExit(f"the text has {len(ids)} tokens; contexts up to {len(ids) - 1} only")
    text_record["tokens"] = len(ids)
    text_record["tokens_used"] = total + 1
    text_record["files_spanned"] = files_spanned(tokenizer, ids[: total + 1], text_record)
    f16 = f16_bytes_per_token(model)
    probe = kc.make_cache(model, bits=BITS, group_size=GROUP_SIZE)
    rotated = any(getattr(s, "rotate", False) for s in probe.sequences)
    print(
        f"{KVSNAP}: kvsnap.cache defaults, K/V "
        + ("in a Hadamard-rotated basis" if rotated else "not rotated")
    )
    print(
        f"model {MODEL}: {len(model.layers)} layers, float16 K/V {f16} B/token; text: "
        f"{', '.join(text_record['files_spanned'])} from {LICENSE_DIR} "
        f"(first {total + 1} of {len(ids)} tokens)"
    )
    print(f"decode: {warmup} warm-up + {steps} timed steps per variant, variants taking turns\n")

    float_cache, prefill_report = prefill(model, ids, total, prefill_context)
    print(
        f"  prefill {prefill_context // 1024}K: {FLOAT} {prefill_report['float_s']:.1f} s, "
        f"{KVSNAP} {prefill_report['kvsnap_s']:.1f} s\n",
        flush=True,
    )
    check = check_derived_cache(model, ids, float_cache, CHECK_CONTEXT)
    rows: list[Row] = []
    for n in contexts:
        rows += bench_context(model, tokenizer, ids, float_cache, n, warmup, steps)

    print()
    print_table(rows, f16)
    print(
        f"\nprefill {prefill_context} tokens in chunks of {CHUNK} (cache state evaluated per chunk): "
        f"{FLOAT} {prefill_report['float_s']:.2f} s ({prefill_report['float_tokens_per_s']:.0f} tok/s), "
        f"{KVSNAP} {prefill_report['kvsnap_s']:.2f} s ({prefill_report['kvsnap_tokens_per_s']:.0f} tok/s): "
        f"kvsnap {prefill_report['float_over_kvsnap']:.2f}x the float32 speed"
    )

    print("\nchecks")
    print(
        f"  {check['status']:<4} kvsnap cache from_mlx(float32 prefill) vs a direct kvsnap prefill "
        f"at {CHECK_CONTEXT // 1024}K, next-token logits: max|diff|/max|logit| = "
        f"{check['relative_diff_derived_vs_direct']:.1e} (tolerance {CHECK_RELATIVE_TOLERANCE:g})"
        f"\n       for scale: direct kvsnap vs float32 {check['relative_diff_direct_vs_float']:.1e}, "
        f"derived vs float32 {check['relative_diff_derived_vs_float']:.1e}; greedy tokens "
        f"direct/derived/float32 {check['greedy_direct']}/{check['greedy_derived']}/"
        f"{check['greedy_float']}"
    )
    if check["status"] != "ok":
        print(
            "       (the derived cache quantizes the float32 prefill's K/V; in a kvsnap prefill every "
            "layer after\n        the first attends over quantized K/V, so its hidden states and "
            "hence its K/V differ.\n        Decode timings do not depend on the values.)"
        )
    fractions = check["packed_k_differing_fraction_per_layer"]
    print(
        f"  {'ok' if check['layer0_identical'] else 'FAIL':<4} packed K of layer 0 identical in both "
        f"(it does not depend on attention); deeper layers differ in "
        f"{min(fractions[1:]):.1%}..{max(fractions[1:]):.1%} of their uint32 words"
    )
    first_tokens = [first_token_check(rows, n, rotated) for n in contexts]
    for c in first_tokens:
        print(
            f"  {c['status']:<4} first greedy token after {c['context'] // 1024}K: {KVSNAP} "
            f"{c[KVSNAP]}, {MLX_Q4} {c[MLX_Q4]}, {FLOAT} {c[FLOAT]}"
            + (f"  ({c['note']})" if c["note"] else "")
        )
    targets = check_targets(rows, prefill_report)
    print_targets(targets)

    args.out.mkdir(parents=True, exist_ok=True)
    elapsed = time.perf_counter() - started
    machine["load_average_at_end"] = os.getloadavg()
    report = {
        "model": MODEL,
        "text": text_record,
        "machine": machine,
        "settings": {
            "contexts": contexts,
            "bits": BITS,
            "group_size": GROUP_SIZE,
            "block_tokens": BLOCK_TOKENS,
            "kvsnap_rotated": rotated,
            "warmup_steps": warmup,
            "timed_steps": steps,
            "statistic": "median",
            "float16_bytes_per_token": f16,
            "elapsed_s": elapsed,
        },
        "prefill": prefill_report,
        "check_derived_cache": check,
        "check_first_tokens": first_tokens,
        "rows": [asdict(r) for r in rows],
        "targets": targets,
    }
    json_path, png_path = args.out / "decode.json", args.out / "decode.png"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    plot(rows, prefill_report, png_path)
    print(f"\nwrote {json_path} and {png_path} in {elapsed:.0f} s")


if __name__ == "__main__":
    main()
