"""The built extension prefetches: the integer kernels ask for the next chunk
of keys and values while they work on this one (csrc/cpu/int_dot_rows.h,
prefetch_line). Without it a 32K decode call took 1.6x as long, and that
failure is silent: for four sessions GCC 12 emitted no instruction at all
for ``__builtin_prefetch`` in these loops and every result stayed right
(RESULTS.md, eighth session). This reads the machine code of the extension
that is installed, so a compiler or flag change that drops them fails here.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path

import pytest
from kvsnap import _ext

# prefetcht0 in the extension built here: 1456 (three x86 integer sets, each
# with its chunk loop instantiated for every key/value bit width and scale
# dtype, ~500 per set). A set that lost its prefetches takes away ~500.
MIN_PREFETCHES = 1000


@pytest.mark.skipif(platform.machine() != "x86_64", reason="reads x86-64 machine code")
def test_integer_kernels_hold_prefetch_instructions():
    objdump = shutil.which("objdump")
    assert objdump, "objdump (binutils, installed with g++) is needed to read the extension"
    so = Path(_ext.__file__)
    asm = subprocess.run(
        [objdump, "-d", "--no-show-raw-insn", str(so)], capture_output=True, text=True, check=True
    ).stdout
    count = sum(1 for line in asm.splitlines() if "\tprefetcht0" in line)
    assert count >= MIN_PREFETCHES, f"{so.name} holds {count} prefetcht0 instructions"
