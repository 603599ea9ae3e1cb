"""Faults while writing: a save that fails part way loses nothing.

The store's writer makes its OS calls through kvsnap.tensorfile.OS_CALLS;
``os_calls`` swaps some for a ``with`` block. Each test here makes the n-th
call of one kind fail (a short write then ENOSPC or EIO, a failing fsync, a
failing rename, a failing folder fsync, no room to create the temporary
file), for every n a save reaches. After each fault:

- the error is a ``StoreWriteError`` naming the file and the OS error, with
  its errno (``StoreFullError`` for ENOSPC);
- no temporary file is left in the store;
- every agent loads, verifies, and holds its previous snapshot (or, when
  only the folder fsync after the manifest's rename failed, the new one);
- the next save without a fault succeeds.

Then a real full disk: a 4 MB tmpfs, where saves fail with ENOSPC and the
earlier snapshots stay loadable.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from pathlib import Path

import kvsnap
import mlx.core as mx
import numpy as np
import pytest
from kvsnap import store as st
from kvsnap import tensorfile
from kvsnap.cache import make_cache
from kvsnap.errors import StoreFullError, StoreWriteError
from small_models import prompt, small_model

FAULTS_INJECTED = []  # (kind, n) of every fault injected, for docs/RELIABILITY.md


@pytest.fixture(scope="module", autouse=True)
def report_faults():
    yield
    print(f"\nfaults injected: {len(FAULTS_INJECTED)}")  # the figure in docs/RELIABILITY.md (pytest -s)


@pytest.fixture(scope="module")
def llama():
    return small_model("llama")


def fed(model, tokens: list[int]):
    cache = make_cache(model, block_tokens=16)
    for i in range(0, len(tokens), 64):
        mx.eval(model(mx.array(tokens[i : i + 64])[None], cache=cache))
    return cache


class Fault:
    """Makes the n-th call of one OS call fail with ``err``; a failing writev
    first writes part of its data (what a disk filling up does). Counts file
    fsyncs only."""

    def __init__(self, call: str, n: int, err: int):
        self.call, self.n, self.err, self.seen = call, n, err, 0
        self.real = getattr(tensorfile.OS_CALLS, call)
        self.fired = False

    def __call__(self, *args):
        if self.call == "fsync" and stat.S_ISDIR(os.fstat(args[0]).st_mode):
            return self.real(*args)  # folders: test_a_failed_folder_fsync_is_reported
        self.seen += 1
        if self.seen == self.n and self.call == "writev":
            fd, views = args
            half = bytes(views[0][: max(1, len(views[0]) // 2)])
            return self.real(fd, [half])  # a short write; the loop comes back for the rest
        if self.seen == self.n + (self.call == "writev"):
            self.fired = True
            raise OSError(self.err, os.strerror(self.err))
        return self.real(*args)


def count_calls(call: str, action) -> int:
    fault = Fault(call, 1 << 60, errno.EIO)  # never fires: counts
    with tensorfile.os_calls(**{call: fault}):
        action()
    return fault.seen


def temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(tensorfile.TMP_PREFIX)]


def snapshot_state(store: st.Store, model) -> dict[str, list[int]]:
    """Each agent's tokens, after loading it and verifying every file."""
    assert store.verify() == []
    return {a: store.load_agent(a, model=model).tokens for a in store.list_agents()}


KINDS = [
    ("writev", errno.ENOSPC),
    ("writev", errno.EIO),
    ("fsync", errno.EIO),
    ("replace", errno.EIO),
    ("open", errno.ENOSPC),
]


@pytest.mark.parametrize(("call", "err"), KINDS, ids=[f"{c}-{errno.errorcode[e]}" for c, e in KINDS])
def test_a_failed_save_keeps_every_previous_snapshot(call, err, llama, tmp_path):
    tokens = {a: prompt(90, seed=s).tolist() for s, a in enumerate(("a", "b"))}
    with st.Store(tmp_path / "store") as store:
        for a, t in tokens.items():
            store.save_agent(a, fed(llama, t[:40]), tokens=t[:40], model=llama)
        before = snapshot_state(store, llama)
        longer = fed(llama, tokens["a"])  # 90 tokens: 3 new blocks and a manifest to write
        short = fed(llama, tokens["a"][:40])

        def reset():  # agent a back at 40 tokens, its later blocks gone
            store.save_agent("a", short, tokens=tokens["a"][:40], model=llama)
            store.gc()

        def save():
            return store.save_agent("a", longer, tokens=tokens["a"], model=llama)

        reset()
        n_calls = count_calls(call, save)
        assert n_calls >= 4  # 3 blocks and a manifest
        for n in range(1, n_calls + 1):
            reset()
            fault = Fault(call, n, err)
            with tensorfile.os_calls(**{call: fault}), pytest.raises(StoreWriteError) as e:
                save()
            assert fault.fired
            FAULTS_INJECTED.append((call, n))
            assert e.value.errno == err
            assert isinstance(e.value, StoreFullError) == (err == errno.ENOSPC)
            assert os.strerror(err) in str(e.value) and e.value.path is not None
            assert str(e.value).startswith(e.value.path)
            assert temporaries(tmp_path) == []
            after = snapshot_state(store, llama)
            assert after == before
            # The agent is still saved at its next turn.
            assert save().n_tokens == 90
            assert snapshot_state(store, llama)["a"] == tokens["a"]


def test_a_failed_folder_fsync_is_reported(llama, tmp_path):
    """The fsync of a folder after a rename: the error is reported; the
    snapshot is the old or the new one, whole."""
    t = prompt(90, seed=3).tolist()
    with st.Store(tmp_path / "store") as store:
        store.save_agent("a", fed(llama, t[:40]), tokens=t[:40], model=llama)
        longer = fed(llama, t)
        real = tensorfile.OS_CALLS.fsync
        for target in ("blocks", "agents"):
            def fsync(fd, target=target):
                if os.readlink(f"/proc/self/fd/{fd}").endswith(f"/{target}"):
                    raise OSError(errno.EIO, os.strerror(errno.EIO))
                return real(fd)

            with tensorfile.os_calls(fsync=fsync), pytest.raises(StoreWriteError, match="fsync the folder") as e:
                store.save_agent("a", longer, tokens=t, model=llama)
            FAULTS_INJECTED.append(("fsync_dir", target))
            assert e.value.path == str(tmp_path / "store" / target) and e.value.errno == errno.EIO
            assert temporaries(tmp_path) == []
            assert snapshot_state(store, llama)["a"] in (t[:40], t)


def test_a_failed_export_keeps_the_file_it_replaces(llama, tmp_path):
    t = prompt(60, seed=4).tolist()
    path = tmp_path / "a.safetensors"
    kvsnap.save(fed(llama, t[:20]), path, tokens=t[:20], model=llama)
    longer = fed(llama, t)
    for call in ("writev", "fsync", "replace"):
        with tensorfile.os_calls(**{call: Fault(call, 1, errno.ENOSPC)}), pytest.raises(StoreFullError):
            kvsnap.save(longer, path, tokens=t, model=llama)
        FAULTS_INJECTED.append(("export " + call, 1))
        assert kvsnap.load(path, model=llama).tokens == t[:20]
        assert temporaries(tmp_path) == []


# ------------------------------------------------------------ a real full disk


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB tmpfs (needs root and mount permission; skipped otherwise)."""
    where = tmp_path / "disk"
    where.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a 4 MB tmpfs needs root; this test runs as an ordinary user")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(where)],
                          check=False, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"this machine does not allow mounting a tmpfs: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def test_a_full_disk_fails_saves_cleanly(llama, small_disk):
    store = st.Store(small_disk / "store")
    saved = {}
    full = None
    for i in range(40):  # ~0.3 MB per agent: the disk fills before 20
        t = prompt(400, seed=10 + i).tolist()
        try:
            store.save_agent(f"agent{i}", fed(llama, t), tokens=t, model=llama)
        except StoreFullError as e:
            full = e
            break
        saved[f"agent{i}"] = t
    assert full is not None, "4 MB did not fill up"
    assert full.errno == errno.ENOSPC and "No space left on device" in str(full)
    assert len(saved) >= 5
    print(f"\nthe 4 MB disk was full after {len(saved)} agents")
    assert temporaries(small_disk) == []
    assert store.verify() == []
    for a, t in saved.items():
        assert store.load_agent(a, model=llama).tokens == t
    # Room made by deleting an agent: the failed agent is saved at its next turn.
    store.delete_agent("agent0")
    store.gc()
    t = prompt(400, seed=10 + len(saved)).tolist()
    assert store.save_agent(f"agent{len(saved)}", fed(llama, t), tokens=t, model=llama).n_tokens == 400
    assert store.verify() == []
    np.testing.assert_array_equal(store.agent_tokens(f"agent{len(saved)}"), t)
