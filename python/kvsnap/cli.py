"""The ``kvsnap`` command.

    kvsnap models pull [NAME]          download and convert a built-in model
    kvsnap generate --model NAME --prompt TEXT [--max-tokens N] [--key-bits 8]
                                       greedy generation with kvsnap's 4-bit cache

MLX's Linux CPU wheels bundle a slow reference BLAS. When Debian's OpenBLAS
is installed (libopenblas0-pthread) and not yet loaded, the command re-runs
itself once with it in LD_PRELOAD (measured: float32 matmuls ~15x faster, same
results). Set KVSNAP_NO_PRELOAD=1 to keep the bundled BLAS.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

from kvsnap import models
from kvsnap.errors import KvsnapError


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


def pull(args: argparse.Namespace) -> None:
    print(models.pull(args.name))


def generate(args: argparse.Namespace) -> None:
    from mlx_lm import stream_generate

    from kvsnap.cache import make_cache

    model, tokenizer = models.load(args.model)
    prompt_cache = make_cache(model, key_bits=args.key_bits)
    prompt = args.prompt
    if tokenizer.chat_template is not None:
        messages = [{"role": "user", "content": args.prompt}]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    response = None
    for response in stream_generate(
        model, tokenizer, prompt, max_tokens=args.max_tokens, prompt_cache=prompt_cache
    ):
        print(response.text, end="", flush=True)
    print()
    if response is not None:
        print(
            f"kvsnap: prompt {response.prompt_tokens} tokens, {response.prompt_tps:.1f} tok/s; "
            f"generation {response.generation_tokens} tokens, "
            f"{response.generation_tps:.1f} tok/s",
            file=sys.stderr,
        )


def store_command(args: argparse.Namespace) -> int:
    from kvsnap.store import Store

    with Store(args.path) as store:
        if args.store_command == "list":
            for agent_id in store.list_agents():
                info = store.agent_info(agent_id)
                print(f"{agent_id}\t{info.n_tokens} tokens\t{info.n_blocks} blocks\tupdated {info.updated_at}")
        elif args.store_command == "verify":
            problems = store.verify()
            for path, fault in problems:
                print(f"BAD  {path}: {fault}")
            print(f"{len(problems)} damaged file(s)" if problems else "every file verified")
            return 1 if problems else 0
        elif args.store_command == "gc":
            removed, freed = store.gc()
            print(f"removed {removed} unreferenced block file(s), {freed} bytes")
        elif args.store_command == "rm":
            store.delete_agent(args.agent)
        elif args.store_command == "export":
            size = store.export_agent(args.agent, args.file)
            print(f"wrote {args.file} ({size} bytes)")
        elif args.store_command == "import":
            result = store.import_agent(args.file, args.agent)
            print(f"imported {result.agent_id}: {result.n_tokens} tokens, {result.new_blocks} new block file(s)")
    return 0


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
        "--key-bits", type=int, choices=(4, 8), default=None,
        help="bits of the cached keys (default: 4, like the values; 8 is more accurate)",
    )
    gen.set_defaults(run=generate)

    store_cmd = commands.add_parser("store", help="inspect and maintain a snapshot store")
    store_sub = store_cmd.add_subparsers(dest="store_command", required=True)
    for name, text in (
        ("list", "the agents and how many tokens each holds"),
        ("verify", "re-read and re-hash every file (exit status 1 if any is damaged)"),
        ("gc", "delete block files no agent references"),
        ("rm", "delete an agent's snapshot (its blocks go at the next gc)"),
        ("export", "write an agent as one self-contained file"),
        ("import", "add the agent of a single file to the store"),
    ):
        sub = store_sub.add_parser(name, help=text)
        sub.add_argument("path", help="the store's folder")
        if name in ("rm", "export"):
            sub.add_argument("agent", help="the agent id")
        if name in ("export", "import"):
            sub.add_argument("file", help="the single file (.safetensors)")
        if name == "import":
            sub.add_argument("--as", dest="agent", default=None, help="agent id (default: the file's)")
        sub.set_defaults(run=store_command)
    return p


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        reexec_with_openblas()
    args = parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except KvsnapError as e:
        print(f"kvsnap: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
