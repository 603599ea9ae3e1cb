"""What the benchmark scripts share: machine facts and the real text they read."""

from __future__ import annotations

import hashlib
import os
import platform
from importlib.metadata import version
from pathlib import Path

import kvsnap
import mlx.core as mx
from kvsnap import _ext

OUT_DIR = Path(__file__).resolve().parent / "out"

LICENSE_DIR = Path("/usr/share/common-licenses")
LICENSE_FILES = (
    "GPL-3",
    "GPL-2",
    "LGPL-2.1",
    "Apache-2.0",
    "Artistic",
    "MPL-2.0",
    "GFDL-1.3",
    "LGPL-3",
    "GPL-1",
    "LGPL-2",
    "MPL-1.1",
    "GFDL-1.2",
    "CC0-1.0",
    "BSD",
)


def blas_preloaded() -> list[str]:
    """OpenBLAS libraries mapped into this process other than numpy's own copy.

    MLX's CPU wheel calls whatever libblas.so.3 the loader resolved first, so a
    system OpenBLAS in the map means LD_PRELOAD put it in front of the slow
    reference BLAS bundled with the wheel.
    """
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/" in line}
    except OSError:
        return []
    return sorted(p for p in paths if "openblas" in p and "scipy_openblas" not in p)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(**extra) -> dict:
    """Facts about this run's machine and software, plus `extra`."""
    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "kvsnap": kvsnap.__version__,
        "kvsnap_isa": _ext.isa(),
        "kvsnap_threads": _ext.num_threads(),
        "mlx": mx.__version__,
        "mlx_lm": version("mlx-lm"),
        "openblas_preloaded": blas_preloaded(),
        **extra,
    }


def print_machine(machine: dict) -> None:
    """The lines every benchmark starts with: CPU, versions, whether OpenBLAS is in use."""
    print(f"cpu: {machine['cpu']} x{machine['cpu_count']}, load average {machine['load_average_at_start'][0]:.2f}")
    print(
        f"kvsnap {machine['kvsnap']} ({machine['kvsnap_isa']}, {machine['kvsnap_threads']} threads), "
        f"mlx {machine['mlx']}, mlx-lm {machine['mlx_lm']}"
    )
    blas = machine["openblas_preloaded"]
    if blas:
        print(f"OpenBLAS preloaded: yes ({', '.join(blas)})")
    else:
        print(
            "OpenBLAS preloaded: no -- WARNING: MLX's float matmuls use the slow reference BLAS of its "
            "wheel (~15-20x slower); run with "
            "LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"
        )


def license_text() -> tuple[str, dict]:
    """The license texts joined by blank lines, and a record of the files used."""
    parts, files = [], []
    for name in LICENSE_FILES:
        data = (LICENSE_DIR / name).read_bytes()
        parts.append(data.decode("utf-8"))
        files.append({"file": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    text = "\n\n".join(parts)
    record = {
        "directory": str(LICENSE_DIR),
        "files": files,
        "joined_with": "\\n\\n",
        "chars": len(text),
        "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
    }
    return text, record


def files_spanned(tokenizer, ids: list[int], record: dict) -> list[str]:
    """The license files the tokens `ids` (a prefix of the text) reach into."""
    chars = len(tokenizer.decode(ids))
    spanned, start = [], 0
    for f in record["files"]:
        if start >= chars:
            break
        spanned.append(f["file"])
        start += f["bytes"] + 2  # ASCII files: bytes == chars
    return spanned


def add_out_argument(parser) -> None:
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="folder for JSON and PNG")


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)
