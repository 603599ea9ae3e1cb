"""Damaged and hostile snapshot files are refused with a clear error, never
half-loaded, never a crash.

- every single-bit flip in the header of a block file; flips at sampled
  positions of the length prefix, header, metadata and data of a block file,
  a manifest and a single-file export, each through the real loaders;
- truncation at random lengths, and bytes appended;
- fuzzing (hypothesis, 11,000 cases): random bytes as headers, random JSON
  headers, and manifests with valid checksums but mutated metadata or tensors.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import string

import kvsnap
import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs
from kvsnap import store as st
from kvsnap.cache import make_cache
from kvsnap.errors import CorruptSnapshotError, KvsnapError, StoreError
from kvsnap.tensorfile import TensorFile, write_file
from small_models import prompt, small_model


def fuzz(examples: int):
    return settings(
        max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
        database=None,
    )


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    """A store with one agent (40 tokens: 2 blocks and a tail) and its export."""
    root = tmp_path_factory.mktemp("snapshot")
    model = small_model("llama")
    tokens = prompt(40).tolist()
    cache = make_cache(model, block_tokens=16)
    mx.eval(model(mx.array(tokens)[None], cache=cache))
    with st.Store(root / "store") as store:
        result = store.save_agent("a", cache, tokens=tokens, model=model)
    kvsnap.save(cache, root / "export.safetensors", tokens=tokens, model=model)
    return {
        "root": root,
        "model": model,
        "block": root / "store" / "blocks" / f"{result.blocks[0]}.safetensors",
        "manifest": root / "store" / "agents" / "a.safetensors",
        "export": root / "export.safetensors",
    }


def loads(snapshot, which: str):
    """Load through the loader that reads the file `which`."""
    model = snapshot["model"]
    if which == "export":
        return kvsnap.load(snapshot["export"], model=model)
    with st.Store(snapshot["root"] / "store") as store:
        return store.load_agent("a", model=model)


def header_end(path) -> int:
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def flip(path, position: int, bit: int) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        byte = os.pread(fd, 1, position)[0]
        os.pwrite(fd, bytes([byte ^ (1 << bit)]), position)
    finally:
        os.close(fd)


def test_every_bit_flip_in_a_block_header_is_refused(snapshot):
    path = snapshot["block"]
    for position in range(header_end(path)):
        for bit in range(8):
            flip(path, position, bit)
            try:
                with pytest.raises(CorruptSnapshotError), TensorFile(path) as f:
                    f.verify()
            finally:
                flip(path, position, bit)
    with TensorFile(path) as f:
        f.verify()


@pytest.mark.parametrize("which", ["block", "manifest", "export"])
def test_sampled_bit_flips_are_refused_by_the_loaders(which, snapshot):
    path = snapshot[which]
    size, end = path.stat().st_size, header_end(path)
    text = path.read_bytes()[8:end]
    metadata = json.dumps(json.loads(text)["__metadata__"], sort_keys=True, separators=(",", ":"))
    meta_start = 8 + text.index(b'"__metadata__":') + len('"__metadata__":')
    meta_end = meta_start + len(metadata)
    rng = random.Random(which)
    positions = (
        list(range(8))  # the length prefix
        + rng.sample([*range(8, meta_start), *range(meta_end, end)], 60)  # tensor entries, padding
        + rng.sample(range(meta_start, meta_end), 60)  # metadata
        + list(range(end - (len(text) - len(text.rstrip())), end))  # every padding byte
        + rng.sample(range(end, size), 80)  # tensor data
    )
    for position in positions:
        bit = rng.randrange(8)
        flip(path, position, bit)
        try:
            with pytest.raises(StoreError) as e:
                loads(snapshot, which)
            assert path.name in str(e.value), f"flip at {position}: {e.value}"
        finally:
            flip(path, position, bit)
    assert loads(snapshot, which).offset == 40


@pytest.mark.parametrize("which", ["block", "manifest", "export"])
def test_truncated_or_extended_files_are_refused(which, snapshot, tmp_path):
    path = snapshot[which]
    original = path.read_bytes()
    rng = random.Random(which)
    try:
        for length in [0, 7, 8, 9, header_end(path) - 1, header_end(path), len(original) - 1] + rng.sample(
            range(len(original)), 40
        ):
            path.write_bytes(original[:length])
            with pytest.raises(CorruptSnapshotError, match=path.name):
                loads(snapshot, which)
        path.write_bytes(original + b"\0")
        with pytest.raises(CorruptSnapshotError, match="after the last tensor"):
            loads(snapshot, which)
    finally:
        path.write_bytes(original)
    assert loads(snapshot, which).offset == 40


def test_refused_loads_leave_the_arena_as_they_found_it(snapshot):
    arena = kvsnap.Arena(4, 2, 64, block_tokens=16, budget_bytes=1 << 22)
    path = snapshot["block"]
    flip(path, path.stat().st_size - 1, 0)  # last byte of the last tensor of block 0
    try:
        with st.Store(snapshot["root"] / "store") as store:
            with pytest.raises(CorruptSnapshotError, match="checksum mismatch"):
                store.load_agent("a", model=snapshot["model"], arena=arena)
            assert arena.stats()["slots_used"] == 0
            assert [p.name for p, _ in store.verify()] == [path.name, "a.safetensors"]
    finally:
        flip(path, path.stat().st_size - 1, 0)


# ---- fuzzing ----------------------------------------------------------------------

json_values = hs.recursive(
    hs.none() | hs.booleans() | hs.integers(-(2**70), 2**70) | hs.floats() | hs.text(max_size=12),
    lambda inner: hs.lists(inner, max_size=4) | hs.dictionaries(hs.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
tensor_entries = hs.fixed_dictionaries(
    {
        "dtype": hs.sampled_from(["U32", "F16", "I32", "F32", "BOOL", "x"]) | json_values,
        "shape": hs.lists(hs.integers(-2, 40), max_size=4) | json_values,
        "data_offsets": hs.lists(hs.integers(-2, 600), min_size=2, max_size=2) | json_values,
    }
) | json_values
headers = hs.dictionaries(
    hs.text(alphabet=string.ascii_letters + "._", max_size=10),
    tensor_entries,
    max_size=5,
).map(lambda d: d if "__metadata__" not in d else {**d, "__metadata__": {"k": "v"}})


def _write_raw(path, header: bytes, length: int | None, data: bytes) -> None:
    n = len(header) if length is None else length
    path.write_bytes(n.to_bytes(8, "little", signed=False) + header + data)


@fuzz(5000)
@given(
    header=hs.binary(max_size=300),
    length=hs.none() | hs.integers(0, 2**64 - 1),
    data=hs.binary(max_size=64),
)
def test_fuzz_random_header_bytes(header, length, data, tmp_path_factory):
    path = tmp_path_factory.getbasetemp() / "fuzz-raw.safetensors"
    _write_raw(path, header, length, data)
    with pytest.raises(CorruptSnapshotError), TensorFile(path) as f:
        f.verify()


def canonical_with_checksum(header: dict) -> bytes:
    """A header carrying a valid xxh3.__header__, made as docs/FORMAT.md says."""
    import xxhash

    def encode(h):
        text = json.dumps(h, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
        return text + b" " * (-(8 + len(text)) % 64)

    meta = {**header.get("__metadata__", {}), "xxh3.__header__": "0" * 16}
    header = {**header, "__metadata__": meta}
    meta["xxh3.__header__"] = format(xxhash.xxh3_64_intdigest(encode(header)), "016x")
    return encode(header)


@fuzz(3000)
@given(header=headers, data=hs.binary(max_size=600), pad=hs.integers(0, 70), signed=hs.booleans())
def test_fuzz_json_headers(header, data, pad, signed, tmp_path_factory):
    """Random JSON headers; half of them with a valid header checksum, so the
    structural checks of the tensor entries are reached."""
    path = tmp_path_factory.getbasetemp() / "fuzz-json.safetensors"
    if signed:
        text = canonical_with_checksum(header)
    else:
        text = json.dumps(header, sort_keys=True, separators=(",", ":"), allow_nan=True).encode() + b" " * pad
    _write_raw(path, text, None, data)
    try:
        with TensorFile(path) as f:
            f.verify()
    except CorruptSnapshotError:
        return
    # Only a file with no tensors at all can be valid without their checksums.
    assert signed and set(header) <= {"__metadata__"} and data == b""


def _manifest_parts(snapshot):
    with TensorFile(snapshot["manifest"]) as f:
        tensors = [(name, f.read(name)) for name in f.tensors]
        meta = {k: v for k, v in f.metadata.items() if not k.startswith("xxh3.")}
    return tensors, meta


metadata_values = hs.text(max_size=20) | json_values.map(lambda v: json.dumps(v))


@fuzz(3000)
@given(data=hs.data())
def test_fuzz_manifests_with_valid_checksums(data, snapshot, tmp_path_factory):
    """A hostile writer can produce any content with correct checksums: the
    loader must still refuse what does not make sense, or load a consistent cache."""
    work = tmp_path_factory.getbasetemp() / "fuzz-store"
    if not work.exists():
        shutil.copytree(snapshot["root"] / "store", work)
    tensors, meta = _manifest_parts(snapshot)
    keys = sorted(meta)
    for key in data.draw(hs.lists(hs.sampled_from(keys), min_size=1, max_size=3, unique=True)):
        action = data.draw(hs.sampled_from(["replace", "delete", "number", "group"]))
        if action == "delete":
            del meta[key]
        elif action == "number":
            meta[key] = str(data.draw(hs.integers(-(2**40), 2**40)))
        elif action == "group":
            groups = json.loads(_manifest_parts(snapshot)[1]["groups"])
            field = data.draw(hs.sampled_from(sorted(groups[0])))
            groups[0][field] = data.draw(json_values)
            meta["groups"] = json.dumps(groups)
        else:
            meta[key] = data.draw(metadata_values)
    if data.draw(hs.booleans()):
        i = data.draw(hs.integers(0, len(tensors) - 1))
        name, array = tensors[i]
        cut = data.draw(hs.integers(0, max(array.shape[-1] - 1, 0)))
        tensors[i] = (name, np.ascontiguousarray(array[..., :cut]))
    write_file(work / "agents" / "a.safetensors", tensors, meta)
    with st.Store(work) as store:
        try:
            cache = store.load_agent("a", model=snapshot["model"])
        except KvsnapError:
            return
        assert cache.offset == len(cache.tokens) == 40
