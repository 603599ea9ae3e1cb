"""``kvsnap demo``: a small team of agents works through several rounds twice,
once with kvsnap and once the way plain mlx-lm would, and the two are compared.

    kvsnap demo [--quick] [--model NAME] [--out DIR] [--budget SIZE] [--rounds N] [--json]

The team: a planner, a critic and three specialists (``--quick``: the planner,
the critic and one specialist, shorter texts). Each agent's system prompt is a
shared preamble followed by its own long reference document, real text that
ships with the machine (Debian's /usr/share/common-licenses; without it, the
documentation of Python's standard library modules). Every round each agent
gets a short user message quoting what the team said in the previous round and
answers in one short greedy reply, so its conversation grows round by round,
its own earlier replies included. Rounds alternate direction (planner first,
then specialists first), as a discussion passes back and forth.

- kvsnap: one ``AgentMemory`` whose budget holds only some of the agents (by
  default two agents' 4-bit caches): the others sleep on disk and are restored
  when their turn comes. Each turn computes only what the agent has not seen.
- plain mlx-lm: a fresh float cache (``make_prompt_cache``) per turn, the whole
  conversation prefilled again every round, as mlx-lm does without a cache.

The two ways take turns request by request, so other load on the machine hits
them alike. The table compares time to first token per round (kvsnap's turns
split into cold, restored from disk and resident), prompt tokens computed vs
reused, KV memory, disk and total time; ``DIR/demo.json`` holds every turn and
``DIR/demo.png`` a chart.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pydoc
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from kvsnap import models
from kvsnap.errors import InvalidArgumentError, KvsnapError

LICENSE_DIR = Path("/usr/share/common-licenses")
# Where each text comes from: a Debian license file, else the pydoc text of a
# standard library module (real prose too, present wherever Python is).
TEXTS = {"GPL-2": "argparse", "LGPL-2.1": "json", "Artistic": "pathlib", "GPL-3": "subprocess",
         "Apache-2.0": "threading", "MPL-2.0": "logging"}
PREAMBLE_TEXT = "GPL-2"
# (agent id, role, its reference document)
TEAM = (
    ("planner", "the planner: you decide what the team checks next", "LGPL-2.1"),
    ("critic", "the critic: you point out what the others missed or got wrong", "Artistic"),
    ("gpl-expert", "the GPL specialist", "GPL-3"),
    ("apache-expert", "the Apache license specialist", "Apache-2.0"),
    ("mpl-expert", "the MPL specialist", "MPL-2.0"),
)
# The preamble is longer than one 256-token block, so its first block is shared.
DEFAULT = {"agents": 5, "rounds": 4, "preamble_tokens": 280, "own_tokens": 300, "max_tokens": 16}
QUICK = {"agents": 3, "rounds": 2, "preamble_tokens": 100, "own_tokens": 40, "max_tokens": 8}
BUDGET_AGENTS = 2  # the default budget holds this many agents' caches
KIND = {"none": "cold", "shared": "cold", "disk": "restored", "hot": "resident"}
WAYS = ("kvsnap", "plain")
WAY_NAMES = {"kvsnap": "kvsnap", "plain": "plain mlx-lm"}


@dataclass
class Turn:
    round: int
    agent: str
    source: str  # kvsnap: hot, disk, shared or none; plain: none
    prompt_tokens: int
    computed_tokens: int
    reused_tokens: int
    ttft_s: float
    total_s: float
    reply: str


# --------------------------------------------------------------- the command


def add_command(commands) -> None:
    """Add ``demo`` to an argparse subparsers object."""
    p = commands.add_parser(
        "demo", help="a team of agents, with kvsnap and with plain mlx-lm, compared",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--quick", action="store_true",
                   help="3 agents x 2 rounds with short texts (under a minute)")
    p.add_argument("--model", default=models.DEFAULT_MODEL,
                   help=f"built-in name, mlx-lm directory or .gguf file (default {models.DEFAULT_MODEL})")
    p.add_argument("--out", type=Path, default=Path("kvsnap-demo"),
                   help="folder for demo.png and demo.json (default ./kvsnap-demo)")
    p.add_argument("--budget", default=None,
                   help=f"kvsnap's KV memory budget, e.g. 30MB (default: room for {BUDGET_AGENTS} agents)")
    p.add_argument("--rounds", type=int, default=None,
                   help=f"rounds of the discussion (default {DEFAULT['rounds']}, --quick {QUICK['rounds']})")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of the table")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from kvsnap.memory import parse_bytes

    cfg = dict(QUICK if args.quick else DEFAULT)
    if args.rounds is not None:
        if not 1 <= args.rounds <= 50:
            raise InvalidArgumentError(f"--rounds: must be between 1 and 50, got {args.rounds}", "rounds")
        cfg["rounds"] = args.rounds
    budget = None if args.budget is None else parse_bytes(args.budget, "--budget")
    out = Path(args.out).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InvalidArgumentError(f"--out: cannot create the folder {out}: {e.strerror}", "out") from e

    from rich.console import Console

    console = Console(stderr=True)
    with console.status(f"loading {args.model} (downloaded and converted on first use)"):
        if isinstance(args.model, str) and args.model in models.BUILTIN_MODELS:
            models.pull(args.model)
        model, tokenizer = models.load(args.model)
    team, text_source = build_team(tokenizer, cfg)
    with tempfile.TemporaryDirectory(prefix="kvsnap-demo-store-") as store:
        result = run_demo(model, tokenizer, team, cfg, budget, Path(store), console)
    result.update(model=str(args.model), text_source=text_source, quick=bool(args.quick))
    png, json_path = out / "demo.png", out / "demo.json"
    result["png"], result["json"] = str(png.resolve()), str(json_path.resolve())
    json_path.write_text(json.dumps(result, indent=1))
    plot(result, png)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print_tables(result)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m kvsnap.demo ...``, as ``kvsnap demo ...``."""
    from kvsnap.cli import reexec_with_openblas

    if argv is None:
        reexec_with_openblas(["-m", "kvsnap.demo", *sys.argv[1:]])
    parser = argparse.ArgumentParser(prog="kvsnap")
    add_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["demo", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.run(args)
    except KvsnapError as e:
        print(f"kvsnap: error: {e}", file=sys.stderr)
        return 1


# ------------------------------------------------------------------ the team


def source_text(name: str) -> tuple[str, str]:
    """The text called ``name`` and where it came from."""
    path = LICENSE_DIR / name
    if path.is_file():
        return path.read_text(encoding="utf-8", errors="replace"), str(path)
    module = importlib.import_module(TEXTS[name])
    return pydoc.render_doc(module, renderer=pydoc.plaintext), f"pydoc {TEXTS[name]}"


def first_tokens(tokenizer, text: str, n: int) -> str:
    """The text of ``text``'s first ``n`` tokens (all of it if shorter)."""
    ids = tokenizer.encode(text[: 8 * n], add_special_tokens=False)
    return tokenizer.decode(ids[:n]).strip()


def build_team(tokenizer, cfg: dict) -> tuple[list[dict], dict]:
    """Each agent's id and system prompt, and where the texts came from."""
    members = TEAM[: cfg["agents"]]
    names = ", ".join(agent for agent, _, _ in members)
    text, origin = source_text(PREAMBLE_TEXT)
    sources = {"preamble": origin}
    preamble = (
        f"You are one of {len(members)} agents who review the licenses of a software release "
        f"together: {names}. Each round you read what the team said in the previous round and "
        "answer in one short sentence. Background every agent shares:\n\n"
        + first_tokens(tokenizer, text, cfg["preamble_tokens"])
    )
    team = []
    for agent, role, doc in members:
        text, origin = source_text(doc)
        sources[agent] = origin
        own = first_tokens(tokenizer, text, cfg["own_tokens"])
        team.append({"id": agent, "system": f"{preamble}\n\nYou are {role}. Your reference document:\n\n{own}"})
    return team, sources


def user_message(round_: int, rounds: int, last: dict[str, str]) -> str:
    """Round ``round_``'s message (1-based), quoting the previous round's replies."""
    if not last:
        return (f"Round 1 of {rounds}. Start the review: what should the team check first in "
                "your document? One sentence.")
    said = "\n".join(f"- {agent}: {' '.join(reply.split()) or '(nothing)'}" for agent, reply in last.items())
    return f"Round {round_} of {rounds}. In round {round_ - 1} the team said:\n{said}\nYour next point, in one sentence."


def speaking_order(team: list[dict], round_: int) -> list[dict]:
    """Odd rounds from the planner down, even rounds back up."""
    return team if round_ % 2 else team[::-1]


# --------------------------------------------------------------- the two ways


class KvsnapWay:
    """One AgentMemory for the whole team."""

    def __init__(self, model, tokenizer, budget: int, store: Path, max_tokens: int):
        from kvsnap.memory import AgentMemory

        self.memory = AgentMemory(model, tokenizer, path=store, budget=budget)
        self.max_tokens = max_tokens
        self.peak_bytes = 0

    def turn(self, round_: int, agent: str, messages: list[dict]) -> Turn:
        t0 = time.perf_counter()
        r = self.memory.generate(agent, messages, max_tokens=self.max_tokens, temperature=0.0)
        total = time.perf_counter() - t0
        self.peak_bytes = max(self.peak_bytes, self.memory.stats()["bytes_in_use"])
        u = r.usage
        return Turn(round_, agent, r.source, u.prompt_tokens, u.computed_tokens, u.cached_tokens,
                    r.timings.ttft_s, total, r.text)

    def finish(self) -> dict:
        stats = self.memory.stats()
        self.memory.close()
        return {"peak_bytes": self.peak_bytes, "budget_bytes": stats["budget_bytes"],
                "disk_bytes": stats["disk_bytes"], "stats": stats}


class PlainWay:
    """mlx-lm without a cache between turns: every turn prefills the whole conversation."""

    def __init__(self, model, tokenizer, max_tokens: int):
        from mlx_lm.sample_utils import make_sampler

        self.model, self.tokenizer, self.max_tokens = model, tokenizer, max_tokens
        self.sampler = make_sampler(temp=0.0)
        self.eos_ids = set(getattr(tokenizer, "eos_token_ids", None) or [])
        self.peak_bytes = 0
        self.final_bytes: dict[str, int] = {}  # each agent's float cache after its last turn

    def turn(self, round_: int, agent: str, messages: list[dict]) -> Turn:
        from mlx_lm import stream_generate
        from mlx_lm.models.cache import make_prompt_cache

        from kvsnap.memory import render_chat

        t0 = time.perf_counter()
        ids = self.tokenizer.encode(render_chat(self.tokenizer, messages), add_special_tokens=False)
        cache = make_prompt_cache(self.model)
        tokens, ttft = [], None
        for r in stream_generate(self.model, self.tokenizer, ids, max_tokens=self.max_tokens,
                                 sampler=self.sampler, prompt_cache=cache):
            if ttft is None:
                ttft = time.perf_counter() - t0
            tokens.append(r.token)
        total = time.perf_counter() - t0
        nbytes = sum(c.nbytes for c in cache)
        self.peak_bytes = max(self.peak_bytes, nbytes)
        self.final_bytes[agent] = nbytes
        text = self.tokenizer.decode([t for t in tokens if t not in self.eos_ids])
        return Turn(round_, agent, "none", len(ids), len(ids), 0, ttft or total, total, text)

    def finish(self) -> dict:
        return {"peak_bytes": self.peak_bytes, "all_agents_bytes": sum(self.final_bytes.values()),
                "disk_bytes": 0}


def default_budget(model, tokenizer, team: list[dict], cfg: dict) -> int:
    """What BUDGET_AGENTS agents at their largest context (replies at
    max_tokens) may need: their blocks and one spare block each."""
    from kvsnap.cache import make_cache
    from kvsnap.memory import render_chat

    arena = make_cache(model).sequences[0].arena
    filler = " ".join(["word"] * cfg["max_tokens"])
    last = {a["id"]: filler for a in team}
    largest = 0
    for a in team:
        messages = [{"role": "system", "content": a["system"]}]
        for r in range(1, cfg["rounds"] + 1):
            messages.append({"role": "user", "content": user_message(r, cfg["rounds"], last if r > 1 else {})})
            messages.append({"role": "assistant", "content": filler})
        ids = tokenizer.encode(render_chat(tokenizer, messages[:-1]), add_special_tokens=False)
        largest = max(largest, len(ids) + cfg["max_tokens"])
    blocks = -(-largest // arena.block_tokens) + 1
    return BUDGET_AGENTS * blocks * arena.slot_bytes


def warm_up(model) -> None:
    """One small forward pass on each kind of cache, so neither way's first
    turn pays one-time setup costs."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from kvsnap.cache import make_cache, route_attention

    route_attention(model)
    for cache in (make_prompt_cache(model), make_cache(model)):
        mx.eval(model(mx.array([[1, 2, 3, 4, 5, 6, 7, 8]]), cache=cache))
    mx.clear_cache()


def run_demo(model, tokenizer, team: list[dict], cfg: dict, budget: int | None, store: Path, console) -> dict:
    """Both ways through every round, turn by turn; the summary and every turn."""
    rounds = cfg["rounds"]
    budget = default_budget(model, tokenizer, team, cfg) if budget is None else budget
    warm_up(model)
    ways = {"kvsnap": KvsnapWay(model, tokenizer, budget, store, cfg["max_tokens"]),
            "plain": PlainWay(model, tokenizer, cfg["max_tokens"])}
    conversations = {w: {a["id"]: [{"role": "system", "content": a["system"]}] for a in team} for w in WAYS}
    turns: dict[str, list[Turn]] = {w: [] for w in WAYS}
    console.print(
        f"[bold]kvsnap demo[/]: {len(team)} agents x {rounds} rounds, {cfg['max_tokens']} tokens per reply; "
        f"kvsnap budget {budget / 1e6:.1f} MB, store {store}"
    )
    start = time.perf_counter()
    try:
        play_rounds(team, rounds, ways, conversations, turns, console)
    finally:
        finished = {w: ways[w].finish() for w in WAYS}
    return summarize(turns, finished, cfg, budget, time.perf_counter() - start)


def play_rounds(team, rounds, ways, conversations, turns, console) -> None:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    with Progress(SpinnerColumn(), TextColumn("{task.description:<14}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=console) as progress:
        bars = {w: progress.add_task(WAY_NAMES[w], total=rounds * len(team), status="") for w in WAYS}
        for r in range(1, rounds + 1):
            last = {w: {t.agent: t.reply for t in turns[w] if t.round == r - 1} for w in WAYS}
            for agent in speaking_order(team, r):
                for w in WAYS:
                    progress.update(bars[w], status=f"round {r}: {agent['id']} ...")
                    messages = conversations[w][agent["id"]]
                    messages.append({"role": "user", "content": user_message(r, rounds, last[w])})
                    turn = ways[w].turn(r, agent["id"], messages)
                    messages.append({"role": "assistant", "content": turn.reply})
                    turns[w].append(turn)
                    where = f"{KIND[turn.source]}, " if w == "kvsnap" else ""
                    progress.update(bars[w], advance=1, status=(
                        f"round {r}: {agent['id']} {where}TTFT {turn.ttft_s:.2f} s, "
                        f"{turn.computed_tokens} computed / {turn.reused_tokens} reused"))
            progress.console.print("  " + round_line(r, turns))


def round_line(r: int, turns: dict[str, list[Turn]]) -> str:
    parts = []
    for w in WAYS:
        done = [t for t in turns[w] if t.round == r]
        kinds = ""
        if w == "kvsnap":
            kinds = " (" + ", ".join(f"{n} {k}" for k, n in kind_counts(done).items() if n) + ")"
        parts.append(f"{WAY_NAMES[w]} TTFT median {statistics.median(t.ttft_s for t in done):.2f} s{kinds}")
    return f"round {r}: " + "; ".join(parts)


def kind_counts(turns: list[Turn]) -> dict[str, int]:
    counts = {"cold": 0, "restored": 0, "resident": 0}
    for t in turns:
        counts[KIND[t.source]] += 1
    return counts


# ------------------------------------------------------------------- results


def summarize(turns: dict[str, list[Turn]], finished: dict, cfg: dict, budget: int, wall: float) -> dict:
    rounds = []
    for r in range(1, cfg["rounds"] + 1):
        row = {"round": r}
        for w in WAYS:
            done = [t for t in turns[w] if t.round == r]
            row[w] = {"ttft_median_s": statistics.median(t.ttft_s for t in done),
                      "ttft_max_s": max(t.ttft_s for t in done),
                      "computed_tokens": sum(t.computed_tokens for t in done),
                      "reused_tokens": sum(t.reused_tokens for t in done),
                      "turns": kind_counts(done)}
        rounds.append(row)
    ways = {}
    for w in WAYS:
        ts = turns[w]
        by_kind = {k: [t.ttft_s for t in ts if KIND[t.source] == k] for k in ("cold", "restored", "resident")}
        ways[w] = {
            "total_s": sum(t.total_s for t in ts),
            "prompt_tokens": sum(t.prompt_tokens for t in ts),
            "computed_tokens": sum(t.computed_tokens for t in ts),
            "reused_tokens": sum(t.reused_tokens for t in ts),
            "turns": kind_counts(ts),
            "ttft_median_s": {k: statistics.median(v) if v else None for k, v in by_kind.items()},
            "ttft_median_later_rounds_s": statistics.median(t.ttft_s for t in ts if t.round > 1)
            if cfg["rounds"] > 1 else None,
            **finished[w],
        }
    k, p = ways["kvsnap"], ways["plain"]
    later = (p["ttft_median_later_rounds_s"] / k["ttft_median_later_rounds_s"]
             if cfg["rounds"] > 1 and k["ttft_median_later_rounds_s"] else None)
    return {
        "config": {**cfg, "budget_bytes": budget},
        "rounds": rounds,
        "ways": ways,
        "speedup_total": p["total_s"] / k["total_s"],
        "speedup_ttft_later_rounds": later,
        "wall_s": wall,
        "turns": {w: [asdict(t) for t in turns[w]] for w in WAYS},
    }


def _ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1e3:,.0f} ms"


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def print_tables(result: dict) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(120, Console().width))
    k, p = result["ways"]["kvsnap"], result["ways"]["plain"]
    cfg = result["config"]
    per_round = Table(title=f"{cfg['agents']} agents x {cfg['rounds']} rounds on {result['model']}: "
                      "time to first token per round (median over agents)", box=box.SIMPLE_HEAD)
    for name, justify in (("round", "left"), ("kvsnap TTFT", "right"), ("cold/restored/resident", "center"),
                          ("kvsnap computed/reused", "right"), ("plain TTFT", "right"),
                          ("plain computed", "right")):
        per_round.add_column(name, justify=justify, no_wrap=True)
    for row in result["rounds"]:
        kv, pl = row["kvsnap"], row["plain"]
        n = kv["turns"]
        per_round.add_row(f"round {row['round']}", _ms(kv["ttft_median_s"]),
                          f"{n['cold']}/{n['restored']}/{n['resident']}",
                          f"{kv['computed_tokens']:,}/{kv['reused_tokens']:,}", _ms(pl["ttft_median_s"]),
                          f"{pl['computed_tokens']:,}")
    console.print(per_round)

    summary = Table(title="kvsnap vs plain mlx-lm (re-prefill every round)", box=box.SIMPLE_HEAD)
    summary.add_column("")
    summary.add_column("kvsnap", justify="right")
    summary.add_column("plain mlx-lm", justify="right")
    t = k["ttft_median_s"]
    summary.add_row("TTFT median: cold (plain: every turn)", _ms(t["cold"]), _ms(p["ttft_median_s"]["cold"]))
    summary.add_row("TTFT median: restored from disk", _ms(t["restored"]), "-")
    summary.add_row("TTFT median: resident", _ms(t["resident"]), "-")
    summary.add_row("turns cold/restored/resident",
                    f"{k['turns']['cold']}/{k['turns']['restored']}/{k['turns']['resident']}",
                    f"{p['turns']['cold']}/0/0")
    summary.add_row("prompt tokens computed", f"{k['computed_tokens']:,}", f"{p['computed_tokens']:,}")
    summary.add_row("prompt tokens reused", f"{k['reused_tokens']:,}", f"{p['reused_tokens']:,}")
    summary.add_row("KV memory, peak", f"{_mb(k['peak_bytes'])} (budget {_mb(k['budget_bytes'])})",
                    f"{_mb(p['peak_bytes'])} (one agent)")
    summary.add_row("KV memory to keep every agent", "-", _mb(p["all_agents_bytes"]))
    summary.add_row("disk used", _mb(k["disk_bytes"]), _mb(p["disk_bytes"]))
    summary.add_row("total time", f"{k['total_s']:.1f} s", f"{p['total_s']:.1f} s")
    later = result["speedup_ttft_later_rounds"]
    summary.add_row("speedup", f"{result['speedup_total']:.1f}x total"
                    + (f", {later:.1f}x TTFT after round 1" if later else ""), "-")
    console.print(summary)
    console.print(f"chart: {result['png']}\nresults: {result['json']}")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    rounds = [row["round"] for row in result["rounds"]]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for w, color in (("plain", "C1"), ("kvsnap", "C0")):
        a.plot(rounds, [row[w]["ttft_median_s"] for row in result["rounds"]], marker="o", color=color,
               label=f"{WAY_NAMES[w]} (median)")
    for kind, marker, color in (("cold", "s", "C3"), ("restored", "^", "C2"), ("resident", "o", "C9")):
        pts = [(t["round"], t["ttft_s"]) for t in result["turns"]["kvsnap"] if KIND[t["source"]] == kind]
        if pts:
            a.scatter(*zip(*pts), marker=marker, color=color, alpha=0.7, zorder=3, label=f"kvsnap turn: {kind}")
    a.set(yscale="log", xlabel="round", ylabel="time to first token (s)",
          title=f"TTFT per round ({result['model']}, {result['config']['agents']} agents)")
    a.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    a.yaxis.set_major_formatter(ScalarFormatter())
    a.yaxis.set_minor_formatter(NullFormatter())
    a.set_xticks(rounds)
    a.legend(fontsize=8, loc="best")
    width = 0.38
    for i, (w, color) in enumerate((("kvsnap", "C0"), ("plain", "C1"))):
        xs = [r + (i - 0.5) * width for r in rounds]
        computed = [row[w]["computed_tokens"] for row in result["rounds"]]
        reused = [row[w]["reused_tokens"] for row in result["rounds"]]
        b.bar(xs, computed, width, color=color, label=f"{WAY_NAMES[w]}: computed")
        if any(reused):
            b.bar(xs, reused, width, bottom=computed, color=color, alpha=0.3, hatch="//",
                  label=f"{WAY_NAMES[w]}: reused")
    k, p = result["ways"]["kvsnap"], result["ways"]["plain"]
    b.set(xlabel="round", ylabel="prompt tokens",
          title=f"Prompt tokens per round; total {k['total_s']:.0f} s vs {p['total_s']:.0f} s "
                f"({result['speedup_total']:.1f}x)")
    b.set_xticks(rounds)
    b.set_ylim(0, b.get_ylim()[1] * 1.3)  # room for the legend
    b.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
