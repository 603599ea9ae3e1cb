"""Perplexity with kvsnap's quantized K/V against float K/V, on real models and real text.

Text: the license texts of /usr/share/common-licenses, concatenated in a fixed
order (LICENSE_FILES), tokenized with each model's tokenizer. The first
--tokens tokens are cut into non-overlapping windows of 512; each window is
one forward pass with a fresh cache, and perplexity is exp(mean NLL of
predicting tokens 2..512 of every window) (511 predictions per window). A
tokenizer that starts its encodings with BOS (Gemma) gets BOS as token 1 of
every window, followed by 511 text tokens.

Variants, all on the same windows:

  float             no cache: mlx-lm's attention on float32 K/V
  kvsnap q4 g64     kvsnap.cache.make_cache(bits=4, group_size=64), its
  kvsnap q4 g32     defaults otherwise: K/V are quantized when written (float16
  kvsnap q8 g64     scale and bias per group), in a Hadamard-rotated basis
                    where make_cache rotates by default (head_dim a power of
                    two), after the model's key offsets are removed and its
                    key channels balanced (kvsnap.offsets), and every position
                    attends over the quantized K/V
  kvsnap k6v4 g64   6-bit keys, 4-bit values (5.5 bits per element):
                    make_cache(quality="accurate")
  kvsnap k8v4 g64   8-bit keys, 4-bit values: make_cache(key_bits=8)
  q4 g64 no offsets key_offsets=False: kvsnap's format before the offsets
                    (what they buy)

Besides perplexity, each variant's mean per-token KL divergence from the float
model's next-token distribution (KL(float || variant), nats) ranks variants
with less noise than perplexity.

The logits are float32 (float32 models) and the NLL is logsumexp(logits) -
logit(target). The relative perplexity change of a variant is exp(its mean
NLL - float's) - 1; its +- is twice the standard error of the per-window
differences (the windows are paired: every variant sees the same text).

    python benchmarks/accuracy.py [--models smollm2-135m gemma3-270m] [--tokens N] [--quick]

Writes DIR/accuracy.json and DIR/accuracy.png (DIR: benchmarks/out).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import bench_common
import mlx.core as mx
from bench_common import LICENSE_DIR, LICENSE_FILES, files_spanned, license_text, machine_info
from kvsnap import cache as kc
from kvsnap.models import load

DEFAULT_MODELS = ("smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b")
WINDOW = 512
DEFAULT_TOKENS, QUICK_TOKENS = 16384, 2048
SCALE_BITS = 16  # float16 scale and bias per group


@dataclass(frozen=True)
class Format:
    name: str
    bits: int | None  # None: float K/V, no cache
    group_size: int | None = None
    rotate: bool | None = None  # make_cache's: None = its default (Hadamard basis if it can)
    key_bits: int | None = None  # None: the keys at `bits` too
    key_offsets: bool = True  # make_cache's key_offsets

    @property
    def bits_per_element(self) -> float:
        """Stored bits per K/V element (keys and values averaged), scales and biases included."""
        if self.bits is None:
            return 32.0
        key_bits = self.key_bits or self.bits
        return (key_bits + self.bits) / 2 + 2 * SCALE_BITS / self.group_size


FLOAT = Format("float", None)
Q4_G64 = Format("kvsnap q4 g64", 4, 64)
K6V4 = Format("kvsnap k6v4 g64", 4, 64, key_bits=6)  # quality="accurate"
K8V4 = Format("kvsnap k8v4 g64", 4, 64, key_bits=8)
FORMATS = (
    FLOAT,
    Q4_G64,
    Format("q4 g64 no offsets", 4, 64, key_offsets=False),
    Format("kvsnap q4 g32", 4, 32),
    K6V4,
    K8V4,
    Format("kvsnap q8 g64", 8, 64),
)

# The default format (q4 g64, 4.5 bits per element) may raise perplexity by at
# most TARGET_PPL_CHANGE; the accurate preset (k6v4) by at most
# TARGET_ACCURATE, at <= ACCURATE_BITS bits per element if a format allows it.
TARGET_PPL_CHANGE = 0.03
TARGET_ACCURATE = 0.01
ACCURATE_BITS = 5.5


@dataclass
class Row:
    model: str
    variant: str
    bits_per_element: float
    rotated: bool | None  # K/V quantized in a Hadamard-rotated basis (None: float)
    windows: int
    predictions: int
    mean_nll: float
    perplexity: float
    ppl_change: float | None = None  # relative to float
    ppl_change_2se: float | None = None  # +- two standard errors of the paired windows
    seconds: float = 0.0  # forward + NLL time over all windows
    kl: float | None = None  # mean per-token KL(float || variant), nats
    window_nll: list[float] | None = None


# ---------------------------------------------------------------------------
# Machine and text


def windows(tokenizer, text: str, text_record: dict, n_tokens: int) -> tuple[list[list[int]], dict]:
    """Windows of WINDOW tokens covering the text's first n_tokens tokens."""
    ids = tokenizer.encode(text)
    bos = tokenizer.bos_token_id
    prefix = [bos] if bos is not None and ids[0] == bos else []  # the tokenizer adds BOS
    ids = ids[len(prefix) :]
    per_window = WINDOW - len(prefix)
    n_windows = -(-n_tokens // WINDOW)
    if n_windows * per_window > len(ids):
        raise SystemExit(
            f"the text has {len(ids)} tokens for this tokenizer; --tokens up to "
            f"{len(ids) // per_window * WINDOW}"
        )
    out = [prefix + ids[i * per_window : (i + 1) * per_window] for i in range(n_windows)]
    used = ids[: n_windows * per_window]
    return out, {
        "text_tokens": len(ids),
        "windows": n_windows,
        "text_tokens_used": len(used),
        "bos_per_window": bool(prefix),
        "files_spanned": files_spanned(tokenizer, used, text_record),
    }


# ---------------------------------------------------------------------------
# Measurement


def make_cache(model, fmt: Format, tokenizer=None) -> kc.PromptCache | None:
    if fmt.bits is None:
        return None
    return kc.make_cache(
        model, bits=fmt.bits, group_size=fmt.group_size, rotate=fmt.rotate, key_bits=fmt.key_bits,
        key_offsets=fmt.key_offsets, tokenizer=tokenizer,
    )


def rotated(model, fmt: Format) -> bool | None:
    """Whether kvsnap stores this format's K/V in a rotated basis for this model."""
    cache = make_cache(model, fmt)
    return None if cache is None else any(s.rotate for s in cache.sequences)


def window_nll(
    model, tokens: list[int], fmt: Format, tokenizer=None, reference: mx.array | None = None
) -> tuple[float, float | None, mx.array]:
    """Mean NLL of predicting tokens 2..WINDOW of one window with a fresh
    cache, the mean KL from ``reference`` (float log-probabilities), and
    this variant's log-probabilities."""
    cache = make_cache(model, fmt, tokenizer)
    x = mx.array(tokens)
    logits = model(x[None], cache=cache)[0, :-1].astype(mx.float32)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    nll = -mx.take_along_axis(logp, x[1:, None], axis=-1)[:, 0]
    kl = None
    if reference is not None:
        kl = mx.mean(mx.sum(mx.exp(reference) * (reference - logp), axis=-1)).item()
    mean = mx.mean(nll).item()
    if cache is not None:
        cache.release()
    return mean, kl, logp


def bench_model(name: str, text: str, text_record: dict, n_tokens: int) -> tuple[list[Row], dict]:
    t0 = time.perf_counter()
    model, tokenizer = load(name)
    load_s = time.perf_counter() - t0
    wins, record = windows(tokenizer, text, text_record, n_tokens)
    record["load_s"] = load_s
    print(
        f"\n{name}: {len(model.layers)} layers, {record['windows']} windows of {WINDOW} "
        f"({'BOS + ' if record['bos_per_window'] else ''}text tokens), text: "
        f"{', '.join(record['files_spanned'])}",
        flush=True,
    )
    nll: dict[str, list[float]] = {f.name: [] for f in FORMATS}
    kls: dict[str, list[float]] = {f.name: [] for f in FORMATS}
    seconds = {f.name: 0.0 for f in FORMATS}
    kc.make_cache(model, tokenizer=tokenizer).release()  # key offsets calibrated (once per model)
    for i, tokens in enumerate(wins):
        line = []
        reference = None
        for fmt in FORMATS:  # variants take turns on each window (float first)
            t0 = time.perf_counter()
            value, kl, logp = window_nll(model, tokens, fmt, tokenizer, reference)
            seconds[fmt.name] += time.perf_counter() - t0
            nll[fmt.name].append(value)
            if fmt is FLOAT:
                reference = logp
            else:
                kls[fmt.name].append(kl)
            line.append(f"{nll[fmt.name][-1]:.4f}")
        print(f"  window {i + 1:3d}/{len(wins)}  NLL {' '.join(line)}", flush=True)

    base = nll[FLOAT.name]
    rows = []
    for fmt in FORMATS:
        values = nll[fmt.name]
        mean = statistics.fmean(values)
        row = Row(
            model=name,
            variant=fmt.name,
            bits_per_element=fmt.bits_per_element,
            rotated=rotated(model, fmt),
            windows=len(values),
            predictions=len(values) * (WINDOW - 1),
            mean_nll=mean,
            perplexity=math.exp(mean),
            seconds=seconds[fmt.name],
            kl=statistics.fmean(kls[fmt.name]) if kls[fmt.name] else None,
            window_nll=values,
        )
        if fmt is not FLOAT:
            diffs = [a - b for a, b in zip(values, base)]
            mean_diff = statistics.fmean(diffs)
            se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else 0.0
            row.ppl_change = math.expm1(mean_diff)
            row.ppl_change_2se = math.exp(mean_diff) * 2 * se  # delta method
        rows.append(row)
    del model
    return rows, record


# ---------------------------------------------------------------------------
# Reporting


def print_table(rows: list[Row]) -> None:
    header = (
        f"{'model':<18} {'variant':<17} {'rotated':>7} {'bits/elem':>9} {'windows':>7} {'ppl':>9} "
        f"{'change':>8} {'+-2SE':>7} {'KL':>7} {'s':>6}"
    )
    print(header)
    print("-" * len(header))
    model = None
    for row in rows:
        if model is not None and row.model != model:
            print()
        model = row.model
        change = "-" if row.ppl_change is None else f"{100 * row.ppl_change:+.2f}%"
        spread = "-" if row.ppl_change_2se is None else f"{100 * row.ppl_change_2se:.2f}%"
        rotated = "-" if row.rotated is None else ("yes" if row.rotated else "no")
        kl = "-" if row.kl is None else f"{row.kl:.4f}"
        print(
            f"{row.model:<18} {row.variant:<17} {rotated:>7} {row.bits_per_element:9.2f} "
            f"{row.windows:7d} "
            f"{row.perplexity:9.3f} {change:>8} {spread:>7} {kl:>7} {row.seconds:6.0f}"
        )
    print(
        "\nbits/elem: stored bits per K/V element (value + its share of the float16 scale and "
        "bias of its group; float: float32 K/V); rotated: kvsnap stores K/V (and attends) in a "
        "Hadamard-rotated basis"
        "\nchange: perplexity relative to float on the same windows; +-2SE: two standard errors "
        "of the per-window differences; KL: mean per-token KL(float || variant) in nats; "
        "s: forward + NLL time over all windows"
    )


def check_targets(rows: list[Row]) -> tuple[list[dict], dict]:
    models = list(dict.fromkeys(r.model for r in rows))
    targets = []
    for model in models:
        for fmt, goal in ((Q4_G64, TARGET_PPL_CHANGE), (K6V4, TARGET_ACCURATE)):
            row = next(r for r in rows if r.model == model and r.variant == fmt.name)
            targets.append(
                {
                    "target": f"{model}: {fmt.name} ({fmt.bits_per_element:g} bits) perplexity "
                    f"change <= +{goal:.1%}",
                    "measured": row.ppl_change,
                    "goal": goal,
                    "status": "PASS" if row.ppl_change <= goal else "MISS",
                }
            )
    # The formats within +1% on every model, fewest bits first.
    meeting = []
    for fmt in FORMATS[1:]:
        changes = [r.ppl_change for r in rows if r.variant == fmt.name]
        if all(c <= TARGET_ACCURATE for c in changes):
            meeting.append(
                {"variant": fmt.name, "bits_per_element": fmt.bits_per_element, "worst_change": max(changes)}
            )
    meeting.sort(key=lambda m: m["bits_per_element"])
    cheapest = meeting[0] if meeting else None
    targets.append(
        {
            "target": f"a format within +{TARGET_ACCURATE:.0%} on every model at <= {ACCURATE_BITS} bits",
            "measured": cheapest["bits_per_element"] if cheapest else None,
            "goal": ACCURATE_BITS,
            "status": "PASS" if cheapest and cheapest["bits_per_element"] <= ACCURATE_BITS else "MISS",
        }
    )
    return targets, {"formats_within_1pct": meeting, "cheapest": cheapest}


def print_targets(targets: list[dict], choice: dict) -> None:
    print("\ntargets")
    for target in targets:
        m = target["measured"]
        shown = "-" if m is None else (f"{100 * m:+.2f}%" if target["goal"] < 1 else f"{m:g} bits")
        print(f"  {target['status']:<4} {target['target']}: {shown}")
    cheapest = choice["cheapest"]
    if cheapest is None:
        print(f"  no tested format stays within +{TARGET_ACCURATE:.0%} on every model")
    else:
        print(
            f"  cheapest tested format within +{TARGET_ACCURATE:.0%} on every model: "
            f"{cheapest['variant']}, {cheapest['bits_per_element']:g} bits per element "
            f"(worst change {100 * cheapest['worst_change']:+.2f}%)"
        )


def plot(rows: list[Row], path: Path) -> None:
    """Perplexity change against bits per element, one line per model."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    models = list(dict.fromkeys(r.model for r in rows))
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for model in models:
        points = sorted(
            (r for r in rows if r.model == model and r.ppl_change is not None),
            key=lambda r: (r.bits_per_element, r.ppl_change),
        )
        line = ax.errorbar(
            [r.bits_per_element for r in points],
            [100 * r.ppl_change for r in points],
            yerr=[100 * r.ppl_change_2se for r in points],
            fmt="o",
            capsize=3,
            label=model,
        )
        for r in points:
            ax.annotate(
                r.variant.replace("kvsnap ", ""), (r.bits_per_element, 100 * r.ppl_change),
                fontsize=7, xytext=(4, 3), textcoords="offset points", color=line[0].get_color(),
            )
    ax.axhline(100 * TARGET_PPL_CHANGE, color="gray", linestyle=":", label="goal for the default")
    ax.axhline(100 * TARGET_ACCURATE, color="gray", linestyle="--", label="goal for accurate")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlabel("stored bits per K/V element")
    ax.set_ylabel("perplexity change vs float K/V (%)")
    ax.set_yscale("symlog", linthresh=2)
    ax.set_title(f"quantized K/V, windows of {WINDOW} tokens (error bars: 2 SE)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models", nargs="+", default=list(DEFAULT_MODELS), help="kvsnap.models.load names"
    )
    parser.add_argument(
        "--tokens",
        type=int,
        help=f"tokens per model, in windows of {WINDOW} (default {DEFAULT_TOKENS}, "
        f"quick {QUICK_TOKENS})",
    )
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_TOKENS} tokens per model")
    bench_common.add_out_argument(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    mx.set_default_device(mx.cpu)
    n_tokens = args.tokens or (QUICK_TOKENS if args.quick else DEFAULT_TOKENS)

    machine = machine_info()
    bench_common.print_machine(machine)
    text, text_record = license_text()
    print(
        f"text: {', '.join(LICENSE_FILES)} from {LICENSE_DIR}, joined by blank lines "
        f"({text_record['chars']} chars); first {n_tokens} tokens per model"
    )

    rows: list[Row] = []
    per_model = {}
    for name in args.models:
        model_rows, record = bench_model(name, text, text_record, n_tokens)
        rows += model_rows
        per_model[name] = record

    print()
    print_table(rows)
    targets, choice = check_targets(rows)
    print_targets(targets, choice)

    args.out.mkdir(parents=True, exist_ok=True)
    elapsed = time.perf_counter() - started
    machine["load_average_at_end"] = os.getloadavg()
    report = {
        "text": {**text_record, "per_model": per_model},
        "machine": machine,
        "settings": {
            "window": WINDOW,
            "tokens_per_model": n_tokens,
            "predictions_per_window": WINDOW - 1,
            "formats": [{**asdict(f), "bits_per_element": f.bits_per_element} for f in FORMATS],
            "elapsed_s": elapsed,
        },
        "rows": [asdict(r) for r in rows],
        "targets": targets,
        "format_choice": choice,
    }
    json_path, png_path = args.out / "accuracy.json", args.out / "accuracy.png"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    plot(rows, png_path)
    print(f"\nwrote {json_path} and {png_path} in {elapsed:.0f} s")


if __name__ == "__main__":
    main()
