"""How the ``kvsnap`` command talks to its user: results on stdout (text, or
one JSON document with ``--json``), progress and errors on stderr.

A subcommand follows the convention with two calls:

    def run(args) -> int:
        with progress(args, "working", total=len(items)) as advance:
            for item in items:
                ...
                advance()
        emit(args, {"done": len(items)}, lambda d: print(f"{d['done']} done"))
        return 0

``add_json_argument(subparser)`` gives it the ``--json`` flag. Progress bars
show only when stderr is a terminal and the output is not JSON, so scripts
and tests see clean streams.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def add_json_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")


def wants_json(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "json", False))


def _plain(value: Any) -> Any:
    """JSON's view of the values kvsnap's results hold."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def emit(args: argparse.Namespace, data: Any, human: Callable[[Any], None]) -> None:
    """Print a command's result: ``data`` as JSON with ``--json``, else ``human(data)``."""
    if wants_json(args):
        json.dump(data, sys.stdout, indent=2, default=_plain)
        sys.stdout.write("\n")
        sys.stdout.flush()
    else:
        human(data)


def error(message: str) -> int:
    """Report a user error as one line on stderr; returns the exit status (1)."""
    line = " ".join(str(message).split())  # multi-line messages (pip's tail) become one line
    print(f"kvsnap: error: {line}", file=sys.stderr, flush=True)
    return 1


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def interactive(args: argparse.Namespace) -> bool:
    """Whether to draw progress: a terminal on stderr and no ``--json``."""
    return not wants_json(args) and sys.stderr.isatty()


@contextmanager
def progress(args: argparse.Namespace, description: str, total: int | None = None) -> Iterator[Callable[..., None]]:
    """A progress bar on stderr (a spinner with the elapsed time when ``total``
    is None). Yields ``update(done=None, total=None)``: no arguments advances
    by one; ``done``/``total`` set the position (for callbacks that report
    both). Draws nothing unless ``interactive(args)``."""
    if not interactive(args):
        yield lambda done=None, total=None: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    columns = [SpinnerColumn(), TextColumn("{task.description}")]
    if total is not None:
        columns += [BarColumn(), MofNCompleteColumn()]
    columns.append(TimeElapsedColumn())
    with Progress(*columns, console=_stderr_console(), transient=True) as bar:
        task = bar.add_task(description, total=total)

        def update(done: int | None = None, total: int | None = None) -> None:
            if done is None and total is None:
                bar.advance(task)
            else:
                bar.update(task, completed=done, total=total)

        yield update


def human_bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def table(rows: list[list[Any]], header: list[str], indent: str = "") -> None:
    """Print rows as aligned columns under a header (plain text: greppable, no
    box drawing); nothing when there are no rows."""
    if not rows:
        return
    cells = [header, *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for r in cells:
        print(indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
