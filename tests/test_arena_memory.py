"""A budget the machine cannot back is refused when the arena is made.

The arena maps its budget with MAP_NORESERVE: address space only, so a
budget larger than the memory the process can get would fail late, as the
OOM killer ending the process at some kernel's write into a slot (on Linux,
faulting pages in early does not help: the kernel kills rather than fail
the fault). Arena creation therefore checks the budget (what of a shared
budget is not yet in use) against available RAM and free swap, within the
process's memory cgroup limit, and raises InvalidArgumentError naming both.

One test runs a child in a memory cgroup limited to 64 MB: a 1 GiB budget is
refused at creation; a 32 MB one is fully usable.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import kvsnap
import pytest
from kvsnap.errors import InvalidArgumentError

LIMIT = 64 << 20


def machine_memory() -> int:
    fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return sum(int(fields[k].split()[0]) * 1024 for k in ("MemTotal", "SwapTotal"))


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/meminfo")
def test_a_budget_larger_than_the_machine_is_refused_at_creation():
    too_much = 2 * machine_memory()
    with pytest.raises(InvalidArgumentError, match="more memory than this process can get") as e:
        kvsnap.Arena(4, 2, 128, block_tokens=256, budget_bytes=too_much)
    assert e.value.argument == "budget_bytes" and str(too_much) in str(e.value)
    with pytest.raises(InvalidArgumentError, match="more memory than this process can get") as e:
        kvsnap.Arena(4, 2, 128, block_tokens=256, budget=kvsnap.Budget(too_much))
    assert e.value.argument == "budget"


CHILD = textwrap.dedent("""
    import sys
    import kvsnap
    from kvsnap.errors import InvalidArgumentError
    print("ready", flush=True)
    sys.stdin.readline()  # moved into the limited cgroup meanwhile
    try:
        kvsnap.Arena(4, 2, 128, block_tokens=256, budget_bytes=1 << 30)
        print("created")
    except InvalidArgumentError as e:
        print("refused:", e)
    arena = kvsnap.Arena(4, 2, 128, block_tokens=256, budget_bytes=32 << 20)
    slots = [arena.alloc() for _ in range(arena.n_slots)]
    for s in slots:
        for view in arena.block_views(s):
            view[...] = 7  # every page of every slot touched
    print("filled", len(slots) * arena.slot_bytes, flush=True)
""")


def own_memory_cgroup() -> tuple[Path, str] | None:
    """(this process's memory cgroup folder, its limit file), v1 or v2."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "memory":
            return Path("/sys/fs/cgroup/memory") / path.lstrip("/"), "memory.limit_in_bytes"
        if controllers == "" and Path("/sys/fs/cgroup/cgroup.controllers").exists():
            return Path("/sys/fs/cgroup") / path.lstrip("/"), "memory.max"
    return None


@pytest.fixture
def limited_cgroup():
    """A child memory cgroup of this process's own, limited to 64 MB."""
    if sys.platform != "linux":
        pytest.skip("memory cgroups are Linux's")
    found = own_memory_cgroup()
    if found is None:
        pytest.skip("this process has no memory cgroup")
    parent, limit_file = found
    group = parent / f"kvsnap-test-{os.getpid()}"
    try:
        group.mkdir()
        (group / limit_file).write_text(str(LIMIT))
    except OSError as e:
        pytest.skip(f"cannot make a memory-limited cgroup here ({e.strerror}: {group})")
    try:
        yield group
    finally:
        group.rmdir()


def test_in_a_64mb_cgroup_a_1gib_budget_is_refused_and_32mb_works(limited_cgroup):
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready", child.stderr.read()
        (limited_cgroup / "cgroup.procs").write_text(str(child.pid))
        child.stdin.write("go\n")
        child.stdin.flush()
        out, err = child.communicate(timeout=120)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == 0, f"the child died ({child.returncode}): {err[-1500:]}"
    refused, filled = out.strip().splitlines()
    assert refused.startswith("refused: budget_bytes: 1073741824 bytes of budget is more memory")
    assert "memory cgroup" in refused
    assert int(filled.split()[1]) > 30 << 20
