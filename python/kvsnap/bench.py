"""``kvsnap bench``: run the repository's benchmark scripts and keep
benchmarks/RESULTS.md's generated tables in step with their JSON.

Each script ``benchmarks/NAME.py`` writes ``out/NAME.json`` (and usually
``out/NAME.png``). RESULTS.md is hand-written; inside it, each benchmark's
section holds a marked region that only this module writes:

    <!-- bench:NAME:begin -->
    ... generated from out/NAME.json ...
    <!-- bench:NAME:end -->

The region gets the run's machine line, a table of the JSON's rows, its
targets and links to the JSON and PNG. Everything outside the markers is
kept byte for byte; a benchmark without markers gets a new section at the end.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import kvsnap
from kvsnap.console import emit, interactive, progress, wants_json
from kvsnap.errors import InvalidArgumentError, KvsnapError

# In RESULTS.md's order; any other NAME.py of the folder can be named explicitly.
BENCHMARKS = ("attention", "decode", "accuracy", "restore", "copies", "agents", "batch")
# Where a JSON keeps its table rows, when not under "rows": a list of dicts,
# or a dict of dicts (one row per key).
TABLE_KEYS = {"agents": "summary", "batch": "throughput"}


class BenchError(KvsnapError):
    """The benchmarks cannot be found or run."""


def _target_line(t: dict) -> str:
    """A target as "STATUS — what: value". Scripts report either met/value or
    status (PASS, MISS, n/a) with measured, goal and unit."""
    if "status" not in t:
        return f"{'PASS' if t.get('met') else '**MISS**'} — {t['target']}: {t.get('value', '')}"
    status = {"PASS": "PASS", "MISS": "**MISS**"}.get(t["status"], t["status"])
    unit = t.get("unit") or ""
    unit = unit if unit in ("", "x", "%") else " " + unit
    value = "not run" if t.get("measured") is None else f"{t['measured']:.3g}{unit}"
    if t.get("goal") is not None:
        value += f" (goal {t['goal']:.3g}{unit})"
    return f"{status} — {t['target']}: {value}"


def benchmarks_dir(given: Path | None) -> Path:
    """``given``, or the benchmarks/ folder of the checkout kvsnap runs from."""
    if given is not None:
        folder = given.expanduser()
        if not folder.is_dir():
            raise BenchError(f"{folder}: no such folder")
        return folder
    folder = Path(kvsnap.__file__).resolve().parents[2] / "benchmarks"
    if not (folder / "bench_common.py").is_file():
        raise BenchError(
            f"no benchmarks folder at {folder}: kvsnap is installed without its repository's "
            "benchmarks/; run from a source checkout (pip install -e) or pass --dir"
        )
    return folder


def scripts(folder: Path, names: list[str]) -> list[Path]:
    """The scripts to run: ``names`` (each must be NAME.py in ``folder``), or
    every known benchmark the folder has."""
    if not names:
        found = [folder / f"{n}.py" for n in BENCHMARKS if (folder / f"{n}.py").is_file()]
        if not found:
            raise BenchError(f"{folder}: none of the benchmark scripts {', '.join(BENCHMARKS)} is there")
        return found
    out = []
    for name in names:
        path = folder / f"{name.removesuffix('.py')}.py"
        if not path.is_file() or path.name == "bench_common.py":
            have = sorted(p.stem for p in folder.glob("*.py") if p.name != "bench_common.py")
            raise InvalidArgumentError(f"no benchmark {name!r} in {folder} (there: {', '.join(have)})", "names")
        out.append(path)
    return out


def command(script: Path, out: Path, quick: bool) -> list[str]:
    """The script's command line: ``--out`` and ``--quick`` for the scripts that take them."""
    text = script.read_text()
    cmd = [sys.executable, str(script)]
    if "add_out_argument" in text or re.search(r"[\"']--out[\"']", text):
        cmd += ["--out", str(out)]
    if quick and re.search(r"[\"']--quick[\"']", text):
        cmd.append("--quick")
    return cmd


def run_script(args: argparse.Namespace, script: Path, out: Path, index: int, count: int) -> dict:
    """Run one script, its output into out/NAME.log; what happened, as a dict."""
    name, log = script.stem, out / f"{script.stem}.log"
    cmd = command(script, out, args.quick)
    shown = " ".join([script.name, *cmd[2:]])
    if not interactive(args) and not wants_json(args):
        print(f"kvsnap bench: [{index}/{count}] {shown}", file=sys.stderr, flush=True)
    start = time.time()
    with progress(args, f"[{index}/{count}] {shown}"), open(log, "w") as log_file:
        proc = subprocess.run(cmd, stdout=log_file, stderr=subprocess.STDOUT, cwd=script.parent, check=False)
    seconds = time.time() - start
    json_path, png_path = out / f"{name}.json", out / f"{name}.png"
    fresh = json_path.is_file() and json_path.stat().st_mtime >= start
    return {
        "name": name, "command": cmd, "ok": proc.returncode == 0 and fresh, "returncode": proc.returncode,
        "seconds": round(seconds, 1), "log": str(log), "json": str(json_path) if fresh else None,
        "png": str(png_path) if png_path.is_file() and png_path.stat().st_mtime >= start else None,
        "quick": "--quick" in cmd,
    }


# ---- RESULTS.md ------------------------------------------------------------------------------


def _cell(value) -> str | None:
    """A value as a table cell; None for values that are not scalars."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    if isinstance(value, str):
        return value.replace("|", "\\|").replace("\n", " ")
    if isinstance(value, list) and all(not isinstance(v, (list, dict)) for v in value):
        return ", ".join(_cell(v) for v in value)
    return None


def table_rows(name: str, report: dict) -> list[dict]:
    rows = report.get(TABLE_KEYS.get(name, "rows"))
    if isinstance(rows, dict):
        rows = [{"name": k, **v} for k, v in rows.items() if isinstance(v, dict)]
    return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []


def markdown_table(rows: list[dict]) -> list[str]:
    """A markdown table of the rows' scalar fields, columns in order of first appearance."""
    columns: list[str] = []
    for row in rows:
        for key, value in row.items():
            if key not in columns and _cell(value) is not None:
                columns.append(key)
    if not columns:
        return []
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [_cell(row.get(c)) for c in columns]
        lines.append("| " + " | ".join("" if c is None else c for c in cells) + " |")
    return lines


def render(name: str, json_path: Path, results_md: Path, quick: bool | None = None) -> str:
    """The generated region of benchmark ``name`` (markers excluded)."""
    try:
        report = json.loads(json_path.read_text())
    except ValueError as e:
        raise BenchError(f"{json_path}: not valid JSON ({e})") from None
    if not isinstance(report, dict):
        raise BenchError(f"{json_path}: not a benchmark report (a JSON object)")
    rel_json = _relative(json_path, results_md.parent)
    when = datetime.fromtimestamp(json_path.stat().st_mtime).strftime("%Y-%m-%d %H:%M")
    lines = [f"<!-- generated by `kvsnap bench` from {rel_json}; edits between these markers are replaced -->"]
    m = report.get("machine") or {}
    facts = [f"Generated run of {when}"]
    if m.get("cpu"):
        facts.append(f"{m['cpu']} x{m.get('cpu_count', '?')}")
    if isinstance(m.get("load_average_at_start"), list) and m["load_average_at_start"]:
        facts.append(f"load average {m['load_average_at_start'][0]:.2f} at start")
    if m.get("kvsnap"):
        facts.append(f"kvsnap {m['kvsnap']} ({m.get('kvsnap_isa', '?')}, {m.get('kvsnap_threads', '?')} threads)")
    if "openblas_preloaded" in m:
        facts.append("OpenBLAS preloaded" if m["openblas_preloaded"] else "without OpenBLAS")
    if quick:
        facts.append("**--quick** (smoke-test sizes)")
    lines += ["", "; ".join(facts) + ".", ""]
    rows = markdown_table(table_rows(name, report))
    lines += [*rows, ""] if rows else []
    targets = [t for t in report.get("targets") or [] if isinstance(t, dict) and "target" in t]
    for t in targets:
        lines.append(f"- {_target_line(t)}")
    if targets:
        lines.append("")
    links = [f"JSON: [{rel_json}]({rel_json})"]
    png = json_path.with_suffix(".png")
    if png.is_file():
        rel_png = _relative(png, results_md.parent)
        links.append(f"plot: [{rel_png}]({rel_png})")
    lines += ["; ".join(links) + ".", ""]
    return "\n".join(lines)


def _relative(path: Path, base: Path) -> str:
    try:
        return path.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return str(path)


def update_results(results_md: Path, name: str, region: str) -> None:
    """Replace benchmark ``name``'s marked region of RESULTS.md by ``region``
    (a new section at the end when the file has no markers for it)."""
    text = results_md.read_text() if results_md.exists() else "# Benchmark results\n"
    begin, end = f"<!-- bench:{name}:begin -->", f"<!-- bench:{name}:end -->"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    block = f"{begin}\n{region.strip()}\n{end}"
    found = len(pattern.findall(text))
    if found > 1:
        raise BenchError(f"{results_md}: the markers of {name!r} occur {found} times; keep one pair")
    if found:
        text = pattern.sub(lambda _: block, text)
    elif begin in text or end in text:
        raise BenchError(f"{results_md}: {begin} without its {end} (or the reverse)")
    else:
        text = text.rstrip("\n") + f"\n\n## {name} (generated)\n\n{block}\n"
    tmp = results_md.with_name(f".{results_md.name}.tmp")
    tmp.write_text(text)
    tmp.replace(results_md)


# ---- the command ------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    folder = benchmarks_dir(args.dir)
    out = folder / "out"
    results_md = folder / "RESULTS.md"
    todo = scripts(folder, args.names)
    out.mkdir(exist_ok=True)
    results = []
    for i, script in enumerate(todo, 1):
        if args.no_run:
            json_path = out / f"{script.stem}.json"
            if not json_path.is_file():
                raise BenchError(f"{json_path}: no JSON from an earlier run of {script.name}")
            png = out / f"{script.stem}.png"
            results.append({"name": script.stem, "ok": True, "json": str(json_path),
                            "png": str(png) if png.is_file() else None, "quick": None})
        else:
            results.append(run_script(args, script, out, i, len(todo)))
    updated = []
    if not args.no_update:
        for r in results:
            if r["ok"]:
                update_results(results_md, r["name"], render(r["name"], Path(r["json"]), results_md, r["quick"]))
                updated.append(r["name"])
    data = {"dir": str(folder), "results_md": str(results_md), "results": results, "updated": updated}
    emit(args, data, _print_results)
    return 0 if all(r["ok"] for r in results) else 1


def _print_results(d: dict) -> None:
    for r in d["results"]:
        if r["ok"]:
            took = f" in {r['seconds']} s" if "seconds" in r else ""
            print(f"{r['name']}: ok{took}, {r['json']}" + (f", {r['png']}" if r["png"] else ""))
        else:
            why = f"exit status {r['returncode']}" if r["returncode"] else "no JSON written"
            print(f"{r['name']}: FAILED ({why}) after {r['seconds']} s; its output: {r['log']}")
            try:
                tail = Path(r["log"]).read_text(errors="replace").strip().splitlines()[-5:]
            except OSError:
                tail = []
            for line in tail:
                print(f"    {line}")
    if d["updated"]:
        print(f"updated {d['results_md']}: {', '.join(d['updated'])}")
