"""``kvsnap demo --quick`` end to end: the real default model, a real store on
disk, the table a newcomer reads, the JSON and the PNG it writes."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys

import pytest

# The command under test (becomes [sys.executable, "-m", "kvsnap.cli", "demo"] once wired).
DEMO = [sys.executable, "-m", "kvsnap.cli", "demo"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_demo(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}  # rich wraps tables at the terminal width
    return subprocess.run([*DEMO, *args], capture_output=True, text=True, timeout=timeout, env=env,
                          check=False)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    proc = run_demo("--quick", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, out


def row(table: str, label: str) -> list[str]:
    """The numbers in the table row that starts with ``label``."""
    lines = [line for line in table.splitlines() if line.strip().startswith(label)]
    assert len(lines) == 1, (label, table)
    return re.findall(r"\d[\d,]*(?:\.\d+)?", lines[0][lines[0].index(label) + len(label):])


def number(text: str) -> float:
    return float(text.replace(",", ""))


def test_table_shows_both_ways_per_round(quick):
    proc, out = quick
    table = proc.stdout
    # Per round: kvsnap TTFT, cold/restored/resident, kvsnap computed/reused, plain TTFT, plain computed.
    r1, r2 = row(table, "round 1"), row(table, "round 2")
    assert len(r1) == len(r2) == 8, table
    kinds1, kinds2 = [int(x) for x in r1[1:4]], [int(x) for x in r2[1:4]]
    assert kinds1 == [3, 0, 0]  # everyone starts cold
    assert sum(kinds2) == 3 and kinds2[0] == 0  # later rounds resume from memory or disk
    assert number(r1[5]) == 0 < number(r2[5])  # round 2 reuses what round 1 computed
    assert number(r2[4]) < number(r2[7])  # kvsnap computes less than re-prefill

    computed, reused = row(table, "prompt tokens computed"), row(table, "prompt tokens reused")
    assert number(computed[0]) < number(computed[1])
    assert number(reused[0]) > 0 and number(reused[1]) == 0
    for label in ("TTFT median: cold", "TTFT median: restored from disk", "TTFT median: resident",
                  "KV memory, peak", "KV memory to keep every agent", "disk used", "total time", "speedup"):
        assert row(table, label), label
    assert f"chart: {(out / 'demo.png').resolve()}" in table
    assert "round 2" in proc.stderr  # the live progress went to stderr


def test_json_records_reuse_memory_and_disk(quick):
    _, out = quick
    result = json.loads((out / "demo.json").read_text())
    cfg = result["config"]
    kv, plain = result["ways"]["kvsnap"], result["ways"]["plain"]
    turns = result["turns"]
    assert len(turns["kvsnap"]) == len(turns["plain"]) == cfg["agents"] * cfg["rounds"]

    # Every later turn reuses at least the agent's whole previous prompt.
    first = {t["agent"]: t for t in turns["kvsnap"] if t["round"] == 1}
    for t in turns["kvsnap"]:
        assert t["computed_tokens"] + t["reused_tokens"] == t["prompt_tokens"]
        if t["round"] > 1:
            assert t["reused_tokens"] >= first[t["agent"]]["prompt_tokens"]
            assert t["source"] in ("hot", "disk")
    assert all(t["reused_tokens"] == 0 and t["computed_tokens"] == t["prompt_tokens"] for t in turns["plain"])
    assert kv["computed_tokens"] < plain["computed_tokens"]
    assert kv["computed_tokens"] + kv["reused_tokens"] == kv["prompt_tokens"]

    # The default budget holds only some agents: some were restored from disk.
    assert kv["turns"]["restored"] >= 1 and kv["turns"]["resident"] >= 1
    assert kv["stats"]["restores"] >= 1 and kv["stats"]["evictions"] >= 1
    assert 0 < kv["peak_bytes"] <= kv["budget_bytes"] == cfg["budget_bytes"]
    assert kv["budget_bytes"] < plain["all_agents_bytes"]
    assert kv["disk_bytes"] > 0 and plain["disk_bytes"] == 0
    assert result["speedup_total"] == pytest.approx(plain["total_s"] / kv["total_s"])
    assert all(t["ttft_s"] > 0 for w in ("kvsnap", "plain") for t in turns[w])


def test_png_is_written(quick):
    _, out = quick
    data = (out / "demo.png").read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 800 and height >= 300
    assert len(data) > 20_000  # two plots with text, not an empty canvas


def test_json_flag_prints_only_json(tmp_path):
    proc = run_demo("--quick", "--rounds", "1", "--json", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result == json.loads((tmp_path / "demo.json").read_text())
    assert result["config"]["rounds"] == 1 and len(result["rounds"]) == 1
    assert (tmp_path / "demo.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rounds", "0"], "--rounds: must be between 1 and 50"),
        (["--budget", "12XB"], "--budget: '12XB' is not a size"),
        (["--budget", "1MB"], "budget"),  # too small for one agent: found at the first turn
    ],
)
def test_bad_arguments_give_one_line_error(tmp_path, args, message):
    proc = run_demo("--quick", "--out", str(tmp_path), *args)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("kvsnap: error: ") and message in last, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
