"""Compile kvsnap's Metal code with a C++ compiler, on machines without Apple's.

Each .metal file is parsed and type-checked by g++ (or $CXX) with
``-fsyntax-only`` against csrc/metal/shim/metal_stdlib, a small stand-in for
the Metal standard library; every kernel template instantiation is checked.
The host side (csrc/metal/*.cpp, the primitives' eval_gpu) is checked the
same way against MLX's own Metal headers from the installed mlx package and
csrc/metal/shim/Metal/Metal.hpp, a stand-in for Apple's metal-cpp.
A typo, an unknown name, a wrong type or a new warning fails the check. It
does not run anything and cannot see Metal-only rules (address spaces,
attribute placement) nor whether metal-cpp's real signatures match the
stand-in's: only Apple's compilers (the macOS build) check those.

    python tools/check_metal.py [FILE.metal|FILE.cpp ...]   # default: csrc/metal/*

Exit status 0 when every file compiles, 1 otherwise (the compiler's messages
are printed), 2 when no C++ compiler is found.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METAL_DIR = ROOT / "csrc" / "metal"
SHIM_DIR = METAL_DIR / "shim"
FLAGS = [
    "-std=c++17",
    "-fsyntax-only",
    "-x",
    "c++",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-Wno-attributes",
]


def compiler() -> str | None:
    """$CXX if set, else g++ or clang++ from PATH."""
    if os.environ.get("CXX"):
        return os.environ["CXX"]
    return shutil.which("g++") or shutil.which("clang++")


def metal_sources() -> list[Path]:
    return sorted(METAL_DIR.glob("*.metal")) + sorted(METAL_DIR.glob("*.cpp"))


def mlx_include_dir() -> Path | None:
    """The include folder of the installed mlx package, if it has MLX's Metal headers."""
    spec = importlib.util.find_spec("mlx")
    if spec is None or not spec.submodule_search_locations:
        return None
    include = Path(spec.submodule_search_locations[0]) / "include"
    return include if (include / "mlx" / "backend" / "metal" / "device.h").exists() else None


def command(path: Path, cxx: str) -> list[str] | None:
    """The compile command of one file (None: a .cpp without MLX's headers).
    The include paths let a copy of a kernel outside csrc/metal (a test's
    planted error) find its headers."""
    includes = [f"-I{SHIM_DIR}", f"-I{METAL_DIR}", f"-I{ROOT / 'csrc'}"]
    if path.suffix == ".metal":
        return [cxx, *FLAGS, *includes, str(path)]
    mlx_include = mlx_include_dir()
    if mlx_include is None:
        return None
    # C++20 as in CMakeLists.txt; MLX's headers are -isystem so that only
    # kvsnap's own warnings count.
    host_flags = [f for f in FLAGS if f not in ("-std=c++17", "-x", "c++")]
    return [cxx, "-std=c++20", *host_flags, "-isystem", str(mlx_include), *includes, str(path)]


def check_file(path: Path, cxx: str) -> subprocess.CompletedProcess | None:
    """Compile one file through the shim; None when it cannot be checked here."""
    cmd = command(path, cxx)
    if cmd is None:
        return None
    return subprocess.run(cmd, check=False, capture_output=True, text=True)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    files = [Path(a) for a in args] or metal_sources()
    cxx = compiler()
    if cxx is None:
        print("check_metal: no C++ compiler (install g++ or set CXX)", file=sys.stderr)
        return 2
    if not files:
        print(f"check_metal: no .metal files in {METAL_DIR}", file=sys.stderr)
        return 1
    failed = 0
    for path in files:
        result = check_file(path, cxx)
        if result is None:
            print(f"skip   {path} (the installed mlx has no Metal headers)")
            continue
        status = "ok" if result.returncode == 0 else "FAILED"
        print(f"{status:6} {path}")
        if result.returncode != 0:
            failed += 1
            sys.stdout.write(result.stdout + result.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
