"""The arm64 NEON sdot kernels ("neon-dotprod"), run under qemu.

This project has no arm64 machine: tools/check_neon.py cross-compiles the
CPU kernels for aarch64 and runs them under qemu user-mode emulation
against the float kernels, within the integer sets' tolerance. CI (.ci/run)
installs the cross compiler and qemu, so on x86-64 Linux their absence is a
failure, not a skip.
"""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECK = ROOT / "tools" / "check_neon.py"

pytestmark = pytest.mark.skipif(
    not (sys.platform.startswith("linux") and platform.machine() == "x86_64"),
    reason="the NEON check cross-compiles from x86-64 Linux",
)


def test_neon_dotprod_kernels_match_the_float_kernels_under_qemu():
    r = subprocess.run(
        [sys.executable, str(CHECK)], capture_output=True, text=True, check=False, timeout=600
    )
    assert r.returncode != 2, (
        "the NEON check needs a cross compiler and qemu (.ci/run installs them): "
        "apt-get install -y g++-aarch64-linux-gnu qemu-user\n" + r.stderr
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "neon-dotprod: " in r.stdout and "kernel_check: ok" in r.stdout, r.stdout
