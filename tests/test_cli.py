"""The ``kvsnap`` command, run as a user runs it (a subprocess), on real stores
made by real saves of a small random-weight model, and on SmolLM2 for
``generate``: outputs, ``--json`` documents, exit statuses, one-line errors,
and that reading a store never creates or changes anything."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from kvsnap import store as st
from kvsnap.cache import make_cache
from kvsnap.models import model_fingerprint
from small_models import prompt, small_model

REPO = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).parent / "fixtures" / "bench-copies-quick.json"


def kvsnap(*args: str, check: int | None = 0) -> subprocess.CompletedProcess:
    """Run the command; the environment is the test session's (OpenBLAS
    preloaded by conftest, so the command does not re-execute itself)."""
    proc = subprocess.run(
        [sys.executable, "-m", "kvsnap.cli", *map(str, args)], capture_output=True, text=True, timeout=300, check=False
    )
    if check is not None:
        assert proc.returncode == check, (proc.returncode, proc.stdout, proc.stderr)
    return proc


def kvsnap_json(*args: str, check: int = 0) -> dict:
    proc = kvsnap(*args, "--json", check=check)
    return json.loads(proc.stdout)  # exactly one JSON document on stdout


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvsnap: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def tree(folder: Path) -> dict:
    """Every file under folder with its size and modification time."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
    }


def fill(model, tokens: list[int]):
    cache = make_cache(model, block_tokens=16)
    for i in range(0, len(tokens), 64):
        mx.eval(model(mx.array(tokens[i : i + 64])[None], cache=cache))
    return cache


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A store: agent a (70 tokens, 4 blocks), b (the first 40 of a's tokens:
    shares a's 2 first blocks), c (40 other tokens, 2 blocks of its own);
    and a's single-file export."""
    model = small_model("llama")
    root = tmp_path_factory.mktemp("cli")
    a_tokens = prompt(40, 0).tolist() + prompt(30, 1).tolist()
    with st.Store(root / "store") as store:
        store.save_agent("a", fill(model, a_tokens), tokens=a_tokens, model=model)
        store.save_agent("b", fill(model, a_tokens[:40]), tokens=a_tokens[:40], model=model)
        c_tokens = prompt(40, 3).tolist()
        store.save_agent("c", fill(model, c_tokens), tokens=c_tokens, model=model)
        store.export_agent("a", root / "a.safetensors")
    return root, model_fingerprint(model)


@pytest.fixture
def copy(made, tmp_path):
    """A private copy of the store and the export (for tests that change them)."""
    root, _ = made
    shutil.copytree(root / "store", tmp_path / "store")
    shutil.copy(root / "a.safetensors", tmp_path / "a.safetensors")
    return tmp_path


def test_store_list_text_and_json(made):
    root, _ = made
    data = kvsnap_json("store", "list", root / "store")
    assert [(a["agent_id"], a["n_tokens"], a["n_blocks"]) for a in data["agents"]] == [
        ("a", 70, 4), ("b", 40, 2), ("c", 40, 2)
    ]
    text = kvsnap("store", "list", root / "store").stdout.splitlines()
    assert [line.split("\t")[:3] for line in text] == [
        ["a", "70 tokens", "4 blocks"], ["b", "40 tokens", "2 blocks"], ["c", "40 tokens", "2 blocks"]
    ]


def test_read_only_commands_never_create_a_store(tmp_path):
    missing = tmp_path / "typo"
    for args in (("store", "list", missing), ("store", "verify", missing), ("inspect", missing),
                 ("store", "export", missing, "a", tmp_path / "out.safetensors"),
                 ("store", "gc", missing), ("store", "rm", missing, "a")):
        line = one_error_line(kvsnap(*args, check=None))
        assert str(missing) in line
        assert not missing.exists()
    other = tmp_path / "photos"  # an existing folder that is not a store
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"meow")
    for args in (("store", "list", other), ("store", "verify", other), ("inspect", other)):
        assert "not a kvsnap store" in one_error_line(kvsnap(*args, check=None))
    assert tree(other) == {"cat.jpg": (4, (other / "cat.jpg").stat().st_mtime_ns)}
    empty = tmp_path / "empty"
    empty.mkdir()
    one_error_line(kvsnap("store", "list", empty, check=None))
    assert list(empty.iterdir()) == []


def test_reading_a_store_changes_nothing(copy):
    before = tree(copy / "store")
    kvsnap("store", "list", copy / "store")
    kvsnap("store", "verify", copy / "store")
    kvsnap("inspect", copy / "store")
    kvsnap("inspect", copy / "store" / "agents" / "b.safetensors")
    kvsnap("store", "export", copy / "store", "b", copy / "b.safetensors")
    assert tree(copy / "store") == before


def test_inspect_store(made):
    root, fingerprint = made
    store = root / "store"
    data = kvsnap_json("inspect", store)
    assert data["kind"] == "store"
    assert [(a["agent_id"], a["n_tokens"], a["n_blocks"]) for a in data["agents"]] == [
        ("a", 70, 4), ("b", 40, 2), ("c", 40, 2)
    ]
    size = {p.stem: p.stat().st_size for p in (store / "blocks").iterdir()}
    a_blocks = st.file_info(store / "agents" / "a.safetensors").blocks
    assert data["agents"][0]["bytes"] == (store / "agents" / "a.safetensors").stat().st_size + sum(
        size[h] for h in a_blocks
    )
    assert data["model_fingerprints"] == [fingerprint]
    assert [(g["kind"], g["bits"], g["key_bits"], g["group_size"], g["block_tokens"]) for g in data["formats"]] == [
        ("full", 4, 4, 64, 16)
    ]
    assert data["blocks"]["files"] == 6 and data["blocks"]["bytes"] == sum(size.values())
    assert data["blocks"]["shared"] == 2 and data["blocks"]["unreferenced"] == 0
    assert [(s["hash"], s["agents"]) for s in data["shared_blocks"]] == sorted((h, ["a", "b"]) for h in a_blocks[:2])
    assert data["disk_bytes"] == sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
    assert data["verification"] == {"checked": True, "ok": True, "damaged": []}

    text = kvsnap("inspect", store).stdout
    assert f"model fingerprint: {fingerprint}" in text
    assert "blocks: 6 files" in text and "2 shared by several agents" in text
    assert "verification: every file verified" in text
    unverified = kvsnap_json("inspect", store, "--no-verify")
    assert unverified["verification"]["checked"] is False and unverified["agents"] == data["agents"]


def test_inspect_exported_file_and_manifest(made):
    root, fingerprint = made
    data = kvsnap_json("inspect", root / "a.safetensors")
    assert data["kind"] == "single file"
    [agent] = data["agents"]
    assert (agent["agent_id"], agent["n_tokens"], agent["n_blocks"]) == ("a", 70, 4)
    assert agent["bytes"] == data["disk_bytes"] == (root / "a.safetensors").stat().st_size
    assert data["model_fingerprints"] == [fingerprint] and data["blocks"]["inline"] == 4
    assert data["verification"]["ok"] is True

    path = root / "store" / "agents" / "b.safetensors"
    manifest = kvsnap_json("inspect", path)
    assert (manifest["kind"], manifest["path"]) == ("manifest", str(path))
    assert [a["agent_id"] for a in manifest["agents"]] == ["b"]
    assert manifest["blocks"]["files"] == 2 and manifest["verification"]["ok"] is True
    # b's two blocks are a's first two: shared, counted against the whole store
    assert manifest["blocks"]["shared"] == 2 and all(s["agents"] == ["a", "b"] for s in manifest["shared_blocks"])


def test_damaged_files_are_named_and_exit_1(copy):
    block = min((copy / "store" / "blocks").iterdir())
    data = bytearray(block.read_bytes())
    data[-100] ^= 0x01  # one bit of tensor data
    block.write_bytes(bytes(data))

    verify = kvsnap_json("store", "verify", copy / "store", check=1)
    assert verify["ok"] is False
    bad = {Path(d["path"]).name for d in verify["damaged"]}
    assert block.name in bad
    text = kvsnap("store", "verify", copy / "store", check=1).stdout
    assert f"BAD  {block}" in text and "damaged file(s)" in text

    inspect = kvsnap_json("inspect", copy / "store", check=1)
    assert {Path(d["path"]).name for d in inspect["verification"]["damaged"]} == bad
    assert f"BAD  {block}" in kvsnap("inspect", copy / "store", check=1).stdout

    manifest = copy / "store" / "agents" / "c.safetensors"
    data = bytearray(manifest.read_bytes())
    data[20] ^= 0x01  # one bit of its header
    manifest.write_bytes(bytes(data))
    inspect = kvsnap_json("inspect", copy / "store", check=1)
    assert str(manifest) in {d["path"] for d in inspect["verification"]["damaged"]}
    assert [a["agent_id"] for a in inspect["agents"]] == ["a", "b"]
    assert str(manifest) in one_error_line(kvsnap("inspect", manifest, check=None))

    export = copy / "a.safetensors"
    data = bytearray(export.read_bytes())
    data[-100] ^= 0x01
    export.write_bytes(bytes(data))
    single = kvsnap_json("inspect", export, check=1)
    [damage] = single["verification"]["damaged"]
    assert damage["path"] == str(export) and "checksum" in damage["fault"]


def test_writing_commands_json(copy, tmp_path):
    store = copy / "store"
    assert kvsnap_json("store", "rm", store, "c") == {"store": str(store), "removed": "c"}
    gc = kvsnap_json("store", "gc", store)
    assert gc["removed_files"] == 2 and gc["freed_bytes"] > 0
    out = tmp_path / "b.safetensors"
    exported = kvsnap_json("store", "export", store, "b", out)
    assert exported == {"agent_id": "b", "file": str(out), "bytes": out.stat().st_size}
    fresh = tmp_path / "new-store"  # import may create the store
    imported = kvsnap_json("store", "import", fresh, out, "--as", "bee")
    assert (imported["agent_id"], imported["n_tokens"], imported["new_blocks"]) == ("bee", 40, 2)
    assert [a["agent_id"] for a in kvsnap_json("store", "list", fresh)["agents"]] == ["bee"]


def test_errors_are_one_line(copy, tmp_path):
    store = copy / "store"
    assert "no agent 'zed'" in one_error_line(kvsnap("store", "rm", store, "zed", check=None))
    assert "no agent 'zed'" in one_error_line(kvsnap("store", "export", store, "zed", tmp_path / "z", check=None))
    junk = tmp_path / "junk.safetensors"
    junk.write_text("not a snapshot\n")
    assert str(junk) in one_error_line(kvsnap("inspect", junk, check=None))
    assert str(junk) in one_error_line(kvsnap("store", "import", store, junk, check=None))
    nowhere = tmp_path / "no" / "such" / "dir" / "a.safetensors"  # an OSError from the write
    assert "No such file or directory" in one_error_line(kvsnap("store", "export", store, "a", nowhere, check=None))
    assert "bad/id" in one_error_line(kvsnap("store", "import", store, copy / "a.safetensors", "--as", "bad/id",
                                             check=None))
    assert "unknown built-in model" in one_error_line(kvsnap("models", "pull", "nope-1b", check=None))


def test_models_pull_and_generate_json():
    pulled = kvsnap_json("models", "pull", "smollm2-135m")
    assert Path(pulled["path"]).is_dir() and pulled["model"] == "smollm2-135m"
    out = kvsnap_json("generate", "--model", "smollm2-135m", "--prompt", "Name a color.", "--max-tokens", "5")
    assert isinstance(out["text"], str) and out["text"]
    assert out["usage"]["prompt_tokens"] > 3 and 1 <= out["usage"]["completion_tokens"] <= 5


def results_md_copy(tmp_path: Path) -> Path:
    """A benchmarks folder: the repository's RESULTS.md and copies.py, and in
    out/ the report of a real `copies.py --quick` run (tests/fixtures)."""
    folder = tmp_path / "benchmarks"
    (folder / "out").mkdir(parents=True)
    shutil.copy(REPO / "benchmarks" / "RESULTS.md", folder)
    shutil.copy(REPO / "benchmarks" / "copies.py", folder)
    shutil.copy(FIXTURE, folder / "out" / "copies.json")
    return folder


def outside_markers(text: str, name: str) -> str:
    begin, end = f"<!-- bench:{name}:begin -->", f"<!-- bench:{name}:end -->"
    return text[: text.index(begin)] + text[text.index(end) :]


def test_bench_updates_results_md_between_its_markers(tmp_path):
    folder = results_md_copy(tmp_path)
    before = (folder / "RESULTS.md").read_text()
    data = kvsnap_json("bench", "copies", "--no-run", "--dir", folder)
    assert data["updated"] == ["copies"]
    after = (folder / "RESULTS.md").read_text()
    assert outside_markers(after, "copies") == outside_markers(before, "copies")  # hand-written text kept
    region = after[after.index("<!-- bench:copies:begin -->") : after.index("<!-- bench:copies:end -->")]
    report = json.loads(FIXTURE.read_text())
    table = [line for line in region.splitlines() if line.startswith("| smollm2-135m")]
    assert len(table) == len(report["rows"]) == 6
    assert "| smollm2-135m | 4,000 | kvsnap | 1 | 26,542,080 | 1 | 1.365 |" in table[0]
    for target in report["targets"]:
        assert f"- PASS — {target['target']}: {target['value']}" in region
    assert "[out/copies.json](out/copies.json)" in region
    kvsnap("bench", "copies", "--no-run", "--dir", folder)
    assert (folder / "RESULTS.md").read_text() == after  # regenerating is stable

    (folder / "out" / "copies.json").unlink()
    assert "no JSON from an earlier run" in one_error_line(kvsnap("bench", "copies", "--no-run", "--dir", folder,
                                                                  check=None))
    assert "no benchmark 'nope'" in one_error_line(kvsnap("bench", "nope", "--dir", folder, check=None))
    assert "no such folder" in one_error_line(kvsnap("bench", "--dir", tmp_path / "absent", check=None))


def test_bench_renders_targets_with_a_status(tmp_path):
    """attention.py, decode.py and accuracy.py report targets as status
    (PASS, MISS, n/a) with measured, goal and unit, not met/value: each is
    shown with its own status and numbers (they once all read "MISS" with
    no value)."""
    folder = results_md_copy(tmp_path)
    report = json.loads(FIXTURE.read_text())
    report["targets"] = [
        {"target": "decode 16K: 15x sdpa", "measured": 15.45, "goal": 15.0, "unit": "x", "status": "PASS"},
        {"target": "decode 32K: 50% of bandwidth", "measured": 0.255, "goal": 0.5, "unit": "fraction", "status": "MISS"},
        {"target": "decode 4K: 1.3x mlx-lm", "measured": None, "goal": 1.3, "unit": "x", "status": "n/a"},
    ]
    (folder / "out" / "copies.json").write_text(json.dumps(report))
    kvsnap("bench", "copies", "--no-run", "--dir", folder)
    text = (folder / "RESULTS.md").read_text()
    region = text[text.index("<!-- bench:copies:begin -->") : text.index("<!-- bench:copies:end -->")]
    assert "- PASS — decode 16K: 15x sdpa: 15.4x (goal 15x)" in region
    assert "- **MISS** — decode 32K: 50% of bandwidth: 0.255 fraction (goal 0.5 fraction)" in region
    assert "- n/a — decode 4K: 1.3x mlx-lm: not run (goal 1.3x)" in region


def test_bench_runs_scripts_and_reports_failures(tmp_path):
    """The runner on two tiny scripts written here (the real benchmarks take
    minutes): arguments passed, output logged, a failure named with its log,
    exit status 1, and only the successful benchmark's region updated."""
    folder = results_md_copy(tmp_path)
    (folder / "tiny.py").write_text(
        "import argparse, json, pathlib, sys\n"
        "p = argparse.ArgumentParser(); p.add_argument('--out', type=pathlib.Path)\n"
        "p.add_argument('--quick', action='store_true'); a = p.parse_args()\n"
        "print('tiny is running')\n"
        "(a.out / 'tiny.json').write_text(json.dumps({'rows': [{'quick': a.quick, 'argv': len(sys.argv)}]}))\n"
    )
    (folder / "broken.py").write_text("import sys\nprint('about to fail')\nsys.exit(3)\n")
    proc = kvsnap("bench", "tiny", "broken", "--quick", "--dir", folder, "--json", check=1)
    data = json.loads(proc.stdout)
    tiny, broken = data["results"]
    assert tiny["ok"] and tiny["quick"] and tiny["json"] == str(folder / "out" / "tiny.json")
    assert (folder / "out" / "tiny.log").read_text() == "tiny is running\n"
    assert (broken["ok"], broken["returncode"]) == (False, 3)
    assert data["updated"] == ["tiny"]
    results = (folder / "RESULTS.md").read_text()
    assert "## tiny (generated)" in results and "| yes | 4 |" in results
    assert "bench:broken" not in results
    text = kvsnap("bench", "broken", "--dir", folder, check=1)
    assert "broken: FAILED (exit status 3)" in text.stdout and "about to fail" in text.stdout


def test_help_lists_the_commands():
    out = kvsnap("--help").stdout
    for command in ("models", "generate", "store", "inspect", "bench"):
        assert command in out
