"""Run the arm64 NEON sdot kernels ("neon-dotprod") on an x86-64 machine.

Cross-compiles the CPU kernels (csrc/cpu/*.cpp minus the x86 ones: they use
neither MLX nor Python) for aarch64 Linux, the NEON integer kernels with
``-march=armv8.2-a+dotprod`` as the CMake build does, together with
tools/kernel_check.cpp, a standalone driver that runs every kernel set the
(emulated) CPU has against the float kernels ("generic") on a grid of cases
(4/8-bit keys and values, group sizes 32/64/128, head dims 64/128, GQA,
decode and causal prefill, a window, float and bool masks). The binary runs
under qemu user-mode emulation, so this checks results, not speed, and not
real arm64 hardware. The tolerance is the one the tests hold integer kernel
sets to (INT_DOT_TOL in tests/kernel_isa.py).

    python tools/check_neon.py [--build-dir DIR]

Needs aarch64-linux-gnu-g++ and qemu-aarch64 (Debian: g++-aarch64-linux-gnu,
qemu-user). Exit status 0 when every case is within the tolerance, 1 when
one is not or a build step fails, 2 when the tools are missing.
"""

from __future__ import annotations

import argparse
import ast
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CPU_DIR = ROOT / "csrc" / "cpu"
DRIVER = ROOT / "tools" / "kernel_check.cpp"
CROSS_CXX = "aarch64-linux-gnu-g++"
SYSROOT = Path("/usr/aarch64-linux-gnu")
FLAGS = ["-std=c++20", "-O3", "-ffp-contract=fast", "-Wall"]
# The sources and the flags CMakeLists.txt gives them on arm64 Linux.
SOURCES = {
    "dispatch.cpp": ["-DKVSNAP_HAVE_NEON_DOTPROD"],
    "thread_pool.cpp": [],
    "kernels_generic.cpp": [],
    "kernels_neon_dotprod.cpp": ["-march=armv8.2-a+dotprod"],
}


def int_dot_tolerance() -> float:
    """INT_DOT_TOL from tests/kernel_isa.py (read, not imported: that needs kvsnap)."""
    tree = ast.parse((ROOT / "tests" / "kernel_isa.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "INT_DOT_TOL" for t in node.targets
        ):
            return float(ast.literal_eval(node.value))
    raise SystemExit("tools/check_neon.py: no INT_DOT_TOL in tests/kernel_isa.py")


def qemu() -> str | None:
    return shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")


def compile_one(cxx: str, source: Path, extra: list[str], obj: Path) -> str:
    """The compiler's messages if it failed, else ''."""
    r = subprocess.run(
        [cxx, *FLAGS, *extra, "-c", str(source), "-o", str(obj)],
        capture_output=True,
        text=True,
        check=False,
    )
    return "" if r.returncode == 0 else f"{source.name}:\n{r.stderr}"


def build(cxx: str, out_dir: Path) -> Path:
    """Cross-compiles the kernels and the driver (two at a time); the binary's path."""
    jobs = [(CPU_DIR / name, extra) for name, extra in SOURCES.items()] + [(DRIVER, [])]
    objs = [out_dir / (src.stem + ".o") for src, _ in jobs]
    with ThreadPoolExecutor(max_workers=2) as pool:
        errors = list(
            pool.map(lambda job: compile_one(cxx, job[0][0], job[0][1], job[1]), zip(jobs, objs))
        )
    failed = [e for e in errors if e]
    if failed:
        raise SystemExit("tools/check_neon.py: cross-compiling failed:\n" + "\n".join(failed))
    binary = out_dir / "kernel_check"
    r = subprocess.run(
        [cxx, *map(str, objs), "-o", str(binary), "-lpthread"],
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        raise SystemExit(f"tools/check_neon.py: linking failed:\n{r.stderr}")
    return binary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--build-dir", type=Path, help="keep the objects here (default: a temp dir)"
    )
    args = parser.parse_args()

    cxx, emulator = shutil.which(CROSS_CXX), qemu()
    if cxx is None or emulator is None:
        missing = [n for n, p in ((CROSS_CXX, cxx), ("qemu-aarch64", emulator)) if p is None]
        print(
            f"tools/check_neon.py: {' and '.join(missing)} not found; on Debian/Ubuntu: "
            "apt-get install -y g++-aarch64-linux-gnu qemu-user",
            file=sys.stderr,
        )
        return 2
    tolerance = int_dot_tolerance()
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = args.build_dir or Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        binary = build(cxx, out_dir)
        # "neon-dotprod" must be there: qemu's default CPU has the dot product.
        # An x86-64 LD_PRELOAD (the OpenBLAS of the tests) means nothing to an arm64 binary.
        env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
        r = subprocess.run(
            [emulator, "-L", str(SYSROOT), str(binary), str(tolerance), "neon-dotprod"],
            capture_output=True,
            text=True,
            check=False,
            env=env,
        )
    print(r.stdout, end="")
    print(r.stderr, end="", file=sys.stderr)
    return 0 if r.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
