"""Hostile files in and around a store are refused with a clear error, and
nothing outside the store's folder is read or written.

- a symlinked ``blocks/`` or ``agents/`` folder, a symlinked manifest or
  block file planted in the store;
- token ids outside the model's vocabulary in a (checksum-valid) manifest;
- a snapshot of another model renamed into place;
- agent ids crafted for traversal;
- a fuzzed block file (hypothesis: wrong dtypes, shapes, huge declared
  sizes, truncation, all with valid checksums) through the real loader:
  always a kvsnap.errors exception, never a crash, hang or other exception;
- files 0600 in 0700 folders, even in a folder made by the user.
"""

from __future__ import annotations

import json
import shutil
import stat

import mlx.core as mx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs
from kvsnap import store as st
from kvsnap.cache import make_cache
from kvsnap.errors import (
    CorruptSnapshotError,
    InvalidAgentIdError,
    KvsnapError,
    ModelMismatchError,
    StoreError,
)
from kvsnap.tensorfile import TensorFile, write_file
from small_models import VOCAB, prompt, small_model

FUZZ_CASES = 200


@pytest.fixture(scope="module")
def llama():
    return small_model("llama")


def fed(model, tokens):
    cache = make_cache(model, block_tokens=16)
    mx.eval(model(mx.array(tokens)[None], cache=cache))
    return cache


@pytest.fixture
def saved(llama, tmp_path):
    """A store with agent "a" (40 tokens), and a folder outside it."""
    tokens = prompt(40).tolist()
    store = st.Store(tmp_path / "store")
    store.save_agent("a", fed(llama, tokens), tokens=tokens, model=llama)
    outside = tmp_path / "outside"
    outside.mkdir()
    return store, outside, tokens


def snapshot_of(folder):
    return sorted((p.relative_to(folder), p.read_bytes()) for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("which", ["blocks", "agents"])
def test_a_symlinked_folder_is_refused(which, saved, llama):
    store, outside, tokens = saved
    real = store.path / which
    shutil.copytree(real, outside / which)
    shutil.rmtree(real)
    real.symlink_to(outside / which)
    before = snapshot_of(outside)
    calls = [
        lambda s: s.load_agent("a", model=llama),
        lambda s: s.save_agent("b", fed(llama, tokens), tokens=tokens, model=llama),
        lambda s: s.gc(),
        lambda s: s.delete_agent("a"),
        lambda s: s.verify(),
        lambda s: s.list_agents(),
    ]
    for call in calls:
        with pytest.raises(StoreError, match=f"{which}: is a symbolic link"):
            call(store)
    with pytest.raises(StoreError, match="symbolic link"):
        st.Store(store.path)
    with pytest.raises(StoreError, match="symbolic link"):
        st.Store(store.path, read_only=True)
    assert snapshot_of(outside) == before  # nothing read into the store, nothing written


def test_a_symlinked_manifest_or_block_is_refused(saved, llama, tmp_path):
    store, outside, tokens = saved
    manifest = store.agent_path("a")
    secret = outside / "a.safetensors"
    shutil.copy(manifest, secret)
    manifest.unlink()
    manifest.symlink_to(secret)
    with pytest.raises(StoreError, match="symbolic link"):
        store.load_agent("a", model=llama)
    with pytest.raises(StoreError, match="symbolic link"):
        store.agent_info("a")
    # Saving the agent replaces the link by a real file; the target is untouched.
    before = secret.read_bytes()
    store.save_agent("a", fed(llama, tokens), tokens=tokens, model=llama)
    assert not manifest.is_symlink() and secret.read_bytes() == before
    block = store.block_path(store.agent_info("a").blocks[0])
    shutil.copy(block, outside / block.name)
    block.unlink()
    block.symlink_to(outside / block.name)
    with pytest.raises(StoreError, match="symbolic link"):
        store.load_agent("a", model=llama)
    assert [p for p, _ in store.verify()] == [block, manifest]
    store.save_agent("a", fed(llama, tokens), tokens=tokens, model=llama)  # rewrites the block in place
    assert not block.is_symlink() and store.verify() == []


def test_token_ids_outside_the_vocabulary_are_refused(saved, llama):
    store, _, _ = saved
    path = store.agent_path("a")
    with TensorFile(path) as f:
        tensors = {name: f.read(name) for name in f.tensors}
        meta = {k: v for k, v in f.metadata.items() if not k.startswith("xxh3.")}
    for bad in (VOCAB, -1, 2**31 - 1):
        tensors["tokens"][-1] = bad  # in the tail: block hashes still match
        write_file(path, list(tensors.items()), meta)
        with pytest.raises(CorruptSnapshotError, match="outside the model's vocabulary"):
            store.load_agent("a", model=llama)


def test_a_snapshot_of_another_model_renamed_into_place_is_refused(saved, llama, tmp_path):
    store, _, tokens = saved
    qwen = small_model("qwen2")
    with st.Store(tmp_path / "other") as other:
        other.save_agent("a", fed(qwen, tokens), tokens=tokens, model=qwen)
        for block in other.blocks_dir.iterdir():
            shutil.copy(block, store.blocks_dir / block.name)
        shutil.copy(other.agent_path("a"), store.agent_path("a"))
    with pytest.raises(ModelMismatchError, match="another model"):
        store.load_agent("a", model=llama)


@pytest.mark.parametrize(
    "bad", ["../../etc/passwd", "/etc/passwd", "a/../../b", "..\\..\\x", "a\nb", "é", "a" * 200, "~root", "a\0"]
)
def test_agent_ids_crafted_for_traversal_are_refused(bad, saved, llama):
    store, outside, tokens = saved
    for call in (
        lambda: store.load_agent(bad, model=llama),
        lambda: store.save_agent(bad, fed(llama, tokens[:8]), tokens=tokens[:8], model=llama),
        lambda: store.agent_info(bad),
        lambda: store.export_agent(bad, outside / "x.safetensors"),
        lambda: store.delete_agent(bad),
    ):
        with pytest.raises(InvalidAgentIdError, match="not a valid agent id"):
            call()
    assert list(outside.iterdir()) == [] and store.list_agents() == ["a"]


def test_files_are_0600_in_0700_folders(llama, tmp_path):
    where = tmp_path / "mine"
    where.mkdir(mode=0o755)  # a folder the user made, readable by others
    tokens = prompt(40).tolist()
    with st.Store(where) as store:
        store.save_agent("a", fed(llama, tokens), tokens=tokens, model=llama)
        store.export_agent("a", tmp_path / "a.safetensors")
    for d in (where, where / "blocks", where / "agents"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    for f in [*where.rglob("*.safetensors"), where / "lock", where / "kvsnap-store.json", tmp_path / "a.safetensors"]:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f


# ---------------------------------------------------------------- fuzzing

json_scalars = hs.none() | hs.booleans() | hs.integers(-(2**70), 2**70) | hs.floats() | hs.text(max_size=8)
dtypes = hs.sampled_from(["U32", "F16", "I32", "F32", "U8", "BF16", "", "u32"]) | json_scalars
shapes = hs.lists(hs.integers(-2, 2**62), max_size=5) | json_scalars


@pytest.fixture(scope="module")
def block_store(llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-store")
    tokens = prompt(40).tolist()
    with st.Store(root / "store") as store:
        result = store.save_agent("a", fed(llama, tokens), tokens=tokens, model=llama)
    block = root / "store" / "blocks" / f"{result.blocks[0]}.safetensors"
    return root / "store", block, block.read_bytes()


def _signed(header: dict, meta: dict, data: bytes, declared: int | None) -> bytes:
    """A file whose header checksum is valid, so the loader's structural checks are reached."""
    import xxhash

    def encode(h):
        text = json.dumps(h, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
        return text + b" " * (-(8 + len(text)) % 64)

    header = {**header, "__metadata__": {**meta, "xxh3.__header__": "0" * 16}}
    header["__metadata__"]["xxh3.__header__"] = format(xxhash.xxh3_64_intdigest(encode(header)), "016x")
    text = encode(header)
    n = len(text) if declared is None else declared
    return n.to_bytes(8, "little") + text + data


@settings(max_examples=FUZZ_CASES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
          database=None)
@given(data=hs.data())
def test_fuzz_block_files_through_the_loader(data, block_store, llama):
    """Mutated tensor tables (dtype, shape, offsets, names), metadata, declared
    header lengths and truncations of a block file, with valid checksums."""
    root, block, original = block_store
    n = int.from_bytes(original[:8], "little")
    header = json.loads(original[8 : 8 + n])
    meta = {k: v for k, v in header.pop("__metadata__").items() if k != "xxh3.__header__"}
    body = original[8 + n :]
    names = sorted(header)
    starts = {name: header[name]["data_offsets"][0] for name in names}
    for _ in range(data.draw(hs.integers(1, 3))):
        name = data.draw(hs.sampled_from(names))
        what = data.draw(hs.sampled_from(["dtype", "shape", "offsets", "drop", "rename", "meta", "huge"]))
        entry = header.get(name)
        if entry is None:
            continue
        if what == "dtype":
            entry["dtype"] = data.draw(dtypes)
        elif what == "shape":
            entry["shape"] = data.draw(shapes)
        elif what == "offsets":
            entry["data_offsets"] = data.draw(hs.lists(hs.integers(-5, 2**64), max_size=3) | json_scalars)
        elif what == "huge":
            start = starts[name]
            size = data.draw(hs.integers(2**31, 2**63))
            entry.update(shape=[size // 4], data_offsets=[start, start + size], dtype="U32")
        elif what == "drop":
            del header[name]
        elif what == "rename":
            header[data.draw(hs.text(max_size=12))] = header.pop(name)
        else:
            key = data.draw(hs.sampled_from(sorted(meta)))
            meta[key] = data.draw(hs.text(max_size=30) | hs.integers().map(str))
    cut = data.draw(hs.none() | hs.integers(0, len(body)))
    declared = data.draw(hs.none() | hs.integers(0, 2**64 - 1))
    block.write_bytes(_signed(header, meta, body[:cut] if cut is not None else body, declared))
    try:
        with st.Store(root) as store:
            try:
                cache = store.load_agent("a", model=llama)
            except KvsnapError:
                return
            # A load may only succeed with the true content (e.g. only
            # unread metadata changed): then it holds the saved tokens.
            assert cache.offset == 40
    finally:
        block.write_bytes(original)
