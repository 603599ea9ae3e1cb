"""Snapshots on disk: the block store and single-file exports, on real files.

Bit-exact restores on SmolLM2 (a real model) and on small random-weight
models of each family; sharing and incremental saves; every refusal the
store promises. Corruption, fuzzing and crash tests live in
test_store_corruption.py and test_store_crash.py.
"""

from __future__ import annotations

import fcntl
import os
import stat
import time
from pathlib import Path

import kvsnap
import mlx.core as mx
import numpy as np
import pytest
import safetensors.numpy
from kvsnap import cache as kc
from kvsnap import store as st
from kvsnap.cache import make_cache
from kvsnap.errors import (
    AgentNotFoundError,
    CorruptSnapshotError,
    FormatMismatchError,
    InvalidAgentIdError,
    InvalidArgumentError,
    MissingBlockError,
    ModelMismatchError,
    StoreError,
    UnsupportedVersionError,
)
from kvsnap.models import load as load_model
from kvsnap.tensorfile import TensorFile, write_file
from mlx_lm.models.cache import load_prompt_cache
from small_models import prompt, small_model

TEXT = Path("/usr/share/common-licenses/GPL-3").read_text()
ARCHS = ["llama", "qwen2", "qwen3", "gemma3"]


def run(model, tokens, cache) -> mx.array:
    out = model(mx.array(tokens)[None], cache=cache)
    mx.eval(out)
    return out


def filled(model, n: int, *, block_tokens: int = 16, seed: int = 0, **kwargs):
    tokens = prompt(n, seed).tolist()
    cache = make_cache(model, block_tokens=block_tokens, **kwargs)
    for i in range(0, n, 64):  # in chunks, so sliding-window layers free blocks
        run(model, tokens[i : i + 64], cache)
    return cache, tokens


@pytest.fixture(scope="module")
def llama():
    return small_model("llama")


@pytest.fixture
def store(tmp_path):
    with st.Store(tmp_path / "store") as s:
        yield s


def test_smollm2_restored_cache_gives_identical_tokens_and_logits(tmp_path):
    """Acceptance: 3,000 tokens saved and loaded into fresh arenas (store and
    single file); the next 32 greedy tokens and their logits are identical to
    the run that kept the cache in memory."""
    model, tokenizer = load_model("smollm2-135m")
    ids = tokenizer.encode(TEXT)[:3000]
    assert len(ids) == 3000
    cache = make_cache(model)
    for i in range(0, len(ids), 512):
        last = run(model, ids[i : i + 512], cache)[0, -1]
    with st.Store(tmp_path / "store") as store:
        store.save_agent("reader", cache, tokens=ids, model=model, tokenizer=tokenizer)
        restored = store.load_agent("reader", model=model, tokenizer=tokenizer)
    kvsnap.save(cache, tmp_path / "reader.safetensors", tokens=ids, model=model, tokenizer=tokenizer)
    exported = kvsnap.load(tmp_path / "reader.safetensors", model=model, tokenizer=tokenizer)
    assert restored.tokens == exported.tokens == ids
    assert restored.sequences[0].arena is not cache.sequences[0].arena

    caches = [cache, restored, exported]
    lasts = [last, last, last]
    for _ in range(32):
        picks = [int(mx.argmax(x).item()) for x in lasts]
        assert picks[1] == picks[0] and picks[2] == picks[0]
        lasts = [run(model, [picks[0]], c)[0, -1] for c in caches]
        np.testing.assert_array_equal(np.array(lasts[1]), np.array(lasts[0]))
        np.testing.assert_array_equal(np.array(lasts[2]), np.array(lasts[0]))


@pytest.mark.parametrize("arch", ARCHS)
def test_restore_is_bit_exact_on_each_family(arch, tmp_path):
    model = small_model(arch)
    cache, tokens = filled(model, 150)  # gemma3: windowed layers have freed blocks
    with st.Store(tmp_path) as store:
        store.save_agent("a", cache, tokens=tokens, model=model)
        restored = store.load_agent("a", model=model)
    kvsnap.save(cache, tmp_path / "a.safetensors", tokens=tokens, model=model)
    exported = kvsnap.load(tmp_path / "a.safetensors", model=model)
    if arch == "gemma3":
        window = next(s for s in cache.sequences if s.window)
        assert window.blocks[0] == -1  # the snapshot holds the live window only
        assert [b >= 0 for b in restored.sequences[1].blocks] == [b >= 0 for b in window.blocks]
    nxt = prompt(20, seed=5).tolist()
    want = run(model, nxt, cache)
    for other in (restored, exported):
        np.testing.assert_array_equal(np.array(run(model, nxt, other)), np.array(want))


def test_8bit_and_6bit_keys_and_unrotated_formats_round_trip(llama, tmp_path):
    for kwargs in ({"key_bits": 8}, {"key_bits": 6}, {"rotate": False, "group_size": 32}, {"bits": 8}):
        cache, tokens = filled(llama, 70, **kwargs)
        kvsnap.save(cache, tmp_path / "x.safetensors", tokens=tokens, model=llama)
        back = kvsnap.load(tmp_path / "x.safetensors", model=llama)
        a = back.sequences[0].arena
        assert (a.key_bits, a.bits, a.group_size) == (
            kwargs.get("key_bits", kwargs.get("bits", 4)), kwargs.get("bits", 4), kwargs.get("group_size", 64)
        )
        assert back.sequences[0].rotate == kwargs.get("rotate", True)
        nxt = prompt(3, seed=9).tolist()
        np.testing.assert_array_equal(np.array(run(llama, nxt, back)), np.array(run(llama, nxt, cache)))


def test_longer_conversation_writes_only_new_blocks_and_prefixes_are_shared(llama, store):
    cache, tokens = filled(llama, 40)  # 2 full blocks + tail of 8
    first = store.save_agent("a", cache, tokens=tokens, model=llama)
    assert (first.n_tokens, first.new_blocks, len(first.blocks)) == (40, 2, 2)
    created = store.agent_info("a").created_at
    time.sleep(1.05)  # timestamps have whole seconds: the next save's updated_at differs
    more = prompt(30, seed=1).tolist()
    run(llama, more, cache)
    second = store.save_agent("a", cache, tokens=tokens + more, model=llama)
    assert second.new_blocks == 2 and second.blocks[:2] == first.blocks  # 70 tokens: 4 blocks
    assert len(list(store.blocks_dir.iterdir())) == 4
    assert store.agent_info("a").n_tokens == 70
    assert store.agent_info("a").created_at == created  # kept across saves
    assert store.agent_info("a").updated_at > created

    other, _ = filled(llama, 40)  # same 40-token prefix: shares both blocks
    assert store.save_agent("b", other, tokens=tokens, model=llama).new_blocks == 0
    diverged, d_tokens = filled(llama, 40, seed=3)
    assert store.save_agent("c", diverged, tokens=d_tokens, model=llama).new_blocks == 2
    assert store.list_agents() == ["a", "b", "c"]
    assert store.verify() == []


def test_delete_and_gc_remove_only_unreferenced_blocks(llama, store):
    cache, tokens = filled(llama, 40)
    store.save_agent("a", cache, tokens=tokens, model=llama)
    other, o_tokens = filled(llama, 48, seed=7)
    store.save_agent("b", other, tokens=o_tokens, model=llama)
    assert store.gc() == (0, 0)
    store.delete_agent("b")
    assert store.list_agents() == ["a"]
    removed, freed = store.gc()
    assert removed == 3 and freed > 0
    assert sorted(p.name for p in store.blocks_dir.iterdir()) == sorted(
        f"{h}.safetensors" for h in store.put_blocks(cache, tokens=tokens, model=llama)
    )
    store.load_agent("a", model=llama)
    with pytest.raises(AgentNotFoundError, match="'b'"):
        store.delete_agent("b")


def test_files_are_private(llama, store, tmp_path):
    cache, tokens = filled(llama, 20)
    store.save_agent("a", cache, tokens=tokens, model=llama)
    kvsnap.save(cache, tmp_path / "one.safetensors", tokens=tokens, model=llama)
    for d in (store.path, store.blocks_dir, store.agents_dir):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
    for f in [*store.blocks_dir.iterdir(), *store.agents_dir.iterdir(), tmp_path / "one.safetensors"]:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600


def test_single_file_is_plain_safetensors(llama, tmp_path):
    cache, tokens = filled(llama, 40)
    path = tmp_path / "agent.safetensors"
    size = kvsnap.save(cache, path, tokens=tokens, model=llama)
    assert size == path.stat().st_size
    plain = safetensors.numpy.load_file(path)
    assert plain["tokens"].tolist() == tokens
    assert len(plain) == 1 + 6 * 3  # tokens; 2 inline blocks and the tail, 6 arrays each
    assert plain["blocks.0.keys"].dtype == np.uint32
    assert plain["blocks.0.keys"].shape == (4, 2, 16, 8)  # layers, KV heads, tokens, words
    assert plain["tail.values.scales"].shape == (4, 2, 8, 1)
    loaded = mx.load(str(path))
    assert set(loaded) == set(plain)
    np.testing.assert_array_equal(np.array(loaded["blocks.1.values"]), plain["blocks.1.values"])
    views = cache.sequences[0].arena.block_views(cache.sequences[0].blocks[1])
    np.testing.assert_array_equal(plain["blocks.1.keys.biases"], views[2])


def test_missing_block_is_refused_and_nothing_is_left_allocated(llama, store):
    cache, tokens = filled(llama, 50)
    result = store.save_agent("a", cache, tokens=tokens, model=llama)
    missing = store.block_path(result.blocks[1])
    missing.unlink()
    arena = kvsnap.Arena(4, 2, 64, block_tokens=16, budget_bytes=1 << 22)
    with pytest.raises(MissingBlockError, match=missing.name) as e:
        store.load_agent("a", model=llama, arena=arena)
    assert e.value.path == str(missing)
    assert arena.stats()["slots_used"] == 0
    assert [p for p, _ in store.verify()] == [store.agent_path("a")]


def test_another_model_is_refused(llama, store, tmp_path):
    cache, tokens = filled(llama, 20)
    store.save_agent("a", cache, tokens=tokens, model=llama)
    kvsnap.save(cache, tmp_path / "a.safetensors", tokens=tokens, model=llama)
    retrained = small_model("llama")  # same architecture, other weights
    retrained.model.norm.weight = retrained.model.norm.weight * 1.01
    for other in (small_model("qwen2"), retrained):
        with pytest.raises(ModelMismatchError, match="another model"):
            store.load_agent("a", model=other)
        with pytest.raises(ModelMismatchError, match="a.safetensors"):
            kvsnap.load(tmp_path / "a.safetensors", model=other)


def test_another_quantization_format_is_refused(llama, store):
    cache, tokens = filled(llama, 20)
    store.save_agent("a", cache, tokens=tokens, model=llama)
    for kwargs in ({"bits": 8}, {"group_size": 32}, {"block_tokens": 32}):
        arena = kvsnap.Arena(4, 2, 64, **{"block_tokens": 16, **kwargs}, budget_bytes=1 << 22)
        with pytest.raises(FormatMismatchError, match=next(iter(kwargs))):
            store.load_agent("a", model=llama, arena=arena)


def test_another_format_version_is_refused(llama, store):
    cache, tokens = filled(llama, 20)
    store.save_agent("a", cache, tokens=tokens, model=llama)
    path = store.agent_path("a")
    with TensorFile(path) as f:
        tensors = [(name, f.read(name)) for name in f.tensors]
        meta = {k: v for k, v in f.metadata.items() if not k.startswith("xxh3.")}
    write_file(path, tensors, {**meta, "format_version": "2"})
    with pytest.raises(UnsupportedVersionError, match="version '2'"):
        store.load_agent("a", model=llama)


@pytest.mark.parametrize("bad", ["../evil", "a/b", "", ".hidden", "-x", "a\\b", "..", "a..b", "x" * 129, "a\0b", 7])
def test_agent_ids_that_are_not_plain_names_are_refused(bad, llama, store):
    cache, tokens = filled(llama, 4)
    for call in (
        lambda: store.save_agent(bad, cache, tokens=tokens, model=llama),
        lambda: store.load_agent(bad, model=llama),
        lambda: store.delete_agent(bad),
    ):
        with pytest.raises(InvalidAgentIdError, match="not a valid agent id"):
            call()
    assert list(store.agents_dir.iterdir()) == []
    assert not (store.path.parent / "evil.safetensors").exists()


def test_bad_arguments_are_named(llama, store, tmp_path):
    cache, tokens = filled(llama, 10)
    with pytest.raises(InvalidArgumentError, match="9 token ids for a cache holding 10") as e:
        store.save_agent("a", cache, tokens=tokens[:9], model=llama)
    assert e.value.argument == "tokens"
    with pytest.raises(InvalidArgumentError, match=r"\[0, 500\)"):
        store.save_agent("a", cache, tokens=[10_000] * 10, model=llama)
    with pytest.raises(InvalidArgumentError, match="not a kvsnap cache"):
        store.save_agent("a", [None] * 4, tokens=tokens, model=llama)
    with pytest.raises(AgentNotFoundError, match="no agent 'nobody'"):
        store.load_agent("nobody", model=llama)
    with pytest.raises(StoreError, match="no such file"):
        kvsnap.load(tmp_path / "absent.safetensors", model=llama)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(StoreError, match="not a kvsnap store"):
        st.Store(tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"


def test_store_manifest_and_export_are_not_confused(llama, store, tmp_path):
    cache, tokens = filled(llama, 20)
    store.save_agent("a", cache, tokens=tokens, model=llama)
    with pytest.raises(StoreError, match="Store.load_agent"):
        kvsnap.load(store.agent_path("a"), model=llama)


def test_temporary_files_of_killed_writers_are_cleaned_on_open(llama, tmp_path):
    with st.Store(tmp_path) as s:
        cache, tokens = filled(llama, 40)
        s.save_agent("a", cache, tokens=tokens, model=llama)
    leftovers = [tmp_path / "blocks" / ".tmp-1-x.safetensors", tmp_path / "agents" / ".tmp-1-a.safetensors"]
    for p in leftovers:
        p.write_bytes(b"half a file")
    # A read-only store cleans nothing; its verify and listings skip what
    # killed writers left (those files never became part of the store).
    ro = st.Store(tmp_path, create=False, read_only=True)
    assert ro.verify() == []
    assert all(not p.name.startswith(".") for p in ro.block_files()) and ro.block_files()
    assert sorted(ro.block_bytes()) == sorted(p.name[: -len(".safetensors")] for p in ro.block_files())
    assert ro.list_agents() == ["a"]
    assert all(p.exists() for p in leftovers)
    # A live writer holds the store's lock shared: its temporary files stay.
    fd = os.open(tmp_path / "lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_SH)
    st.Store(tmp_path).close()
    assert all(p.exists() for p in leftovers)
    os.close(fd)
    with st.Store(tmp_path) as s:
        assert not any(p.exists() for p in leftovers)
        assert s.verify() == []
        s.load_agent("a", model=llama)


def test_mlx_lm_prompt_cache_files_round_trip(llama, tmp_path):
    cache, tokens = filled(llama, 40, rotate=False)
    path = tmp_path / "mlx.safetensors"
    st.export_mlx(cache, path, tokens=tokens)
    mlx_caches, meta = load_prompt_cache(str(path), return_metadata=True)
    assert [c.offset for c in mlx_caches] == [40] * 4
    assert meta["kvsnap_tokens"] == ",".join(map(str, tokens))
    back = st.import_mlx(path, model=llama, block_tokens=16)
    assert back.tokens == tokens
    nxt = prompt(5, seed=2).tolist()
    np.testing.assert_array_equal(np.array(run(llama, nxt, back)), np.array(run(llama, nxt, cache)))
    mx.save_safetensors(str(tmp_path / "hostile.safetensors"), {"0.0": mx.zeros(1)},
                        metadata={"1.0": "load_prompt_cache"})
    with pytest.raises(StoreError, match="not an mlx-lm prompt cache"):
        st.import_mlx(tmp_path / "hostile.safetensors", model=llama)


def test_docs_format_is_enough_to_read_a_snapshot(llama, tmp_path):
    """A reader written from docs/FORMAT.md alone (json, numpy, xxhash) checks
    the checksums and dequantizes keys equal to what kvsnap holds."""
    import json

    import xxhash

    # Keys stored without kvsnap's key offsets (those live outside the file).
    cache, tokens = filled(llama, 40, key_offsets=False)
    path = tmp_path / "agent.safetensors"
    kvsnap.save(cache, path, tokens=tokens, model=llama)
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header_bytes, data = raw[8 : 8 + n], raw[8 + n :]
    key = b'"xxh3.__header__":"'
    at = header_bytes.index(key) + len(key)
    zeroed = header_bytes[:at] + b"0" * 16 + header_bytes[at + 16 :]
    header = json.loads(header_bytes)
    meta = header.pop("__metadata__")
    assert format(xxhash.xxh3_64_intdigest(zeroed), "016x") == meta["xxh3.__header__"]
    dtypes = {"U32": np.uint32, "F16": np.float16, "I32": np.int32}
    tensors = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        assert format(xxhash.xxh3_64_intdigest(data[begin:end]), "016x") == meta[f"xxh3.{name}"]
        tensors[name] = np.frombuffer(data[begin:end], dtypes[entry["dtype"]]).reshape(entry["shape"])
    assert max(e["data_offsets"] for e in header.values())[1] == len(data)
    assert tensors["tokens"].tolist() == tokens

    group = json.loads(meta["groups"])[0]
    assert group["key_offsets"] == ""
    bits, gs, d = group["key_bits"], group["group_size"], group["head_dim"]
    blocks = meta["blocks"].split(",")
    assert len(blocks) == 40 // group["block_tokens"] and meta["blocks_inline"] == "1"
    parts = [f"blocks.{b}.keys" for b in range(len(blocks))] + ["tail.keys"]
    layer = group["layers"].index(1)  # model layer 1
    packed = np.concatenate([tensors[p][layer] for p in parts], axis=1)  # [H, T, D*bits/32]
    scales = np.concatenate([tensors[p + ".scales"][layer] for p in parts], axis=1).astype(np.float32)
    biases = np.concatenate([tensors[p + ".biases"][layer] for p in parts], axis=1).astype(np.float32)
    j = np.arange(d)
    q = (packed[..., j * bits // 32] >> ((j * bits) % 32).astype(np.uint32)) & ((1 << bits) - 1)
    keys = q * np.repeat(scales, gs, axis=-1) + np.repeat(biases, gs, axis=-1)
    assert group["rotation"] == "hadamard"
    h = np.array([[1.0]])
    while h.shape[0] < d:
        h = np.block([[h, h], [h, -h]])
    keys = keys @ (h / np.sqrt(d))  # H is symmetric and its own inverse
    want = kc.to_mlx(cache, quantized=False)[1].keys[0, :, :40]
    np.testing.assert_allclose(keys, np.array(want), rtol=1e-4, atol=1e-4)


def test_store_command_lists_verifies_and_collects(llama, store, capsys):
    from kvsnap.cli import main

    cache, tokens = filled(llama, 40)
    result = store.save_agent("planner", cache, tokens=tokens, model=llama)
    where = str(store.path)
    assert main(["store", "list", where]) == 0
    assert "planner\t40 tokens\t2 blocks" in capsys.readouterr().out
    assert main(["store", "verify", where]) == 0
    assert "every file verified" in capsys.readouterr().out
    damaged = store.block_path(result.blocks[1])
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 1
    damaged.write_bytes(bytes(data))
    assert main(["store", "verify", where]) == 1
    out = capsys.readouterr().out
    assert f"BAD  {damaged}" in out and "2 damaged file(s)" in out
    assert main(["store", "rm", where, "../x"]) == 1
    assert "not a valid agent id" in capsys.readouterr().err
    assert main(["store", "export", where, "planner", str(store.path.parent / "p.safetensors")]) == 1
    assert "checksum mismatch" in capsys.readouterr().err  # the damaged block is refused
    assert main(["store", "rm", where, "planner"]) == 0
    assert main(["store", "gc", where]) == 0
    assert "removed 2 unreferenced block file(s)" in capsys.readouterr().out
    assert list(store.blocks_dir.iterdir()) == []
    kvsnap.save(cache, store.path.parent / "p.safetensors", tokens=tokens, model=llama)
    assert main(["store", "import", where, str(store.path.parent / "p.safetensors"), "--as", "copy"]) == 0
    assert "imported copy: 40 tokens, 2 new block file(s)" in capsys.readouterr().out
    assert main(["store", "export", where, "copy", str(store.path.parent / "q.safetensors")]) == 0
    assert (store.path.parent / "q.safetensors").stat().st_size > 0


def test_a_window_that_misses_recent_tokens_is_refused(tmp_path):
    """A (checksum-valid) manifest whose sliding-window rows start too late
    would leave the window layers reading freed blocks: refused at load."""
    model = small_model("gemma3")  # window 48
    cache, tokens = filled(model, 150)
    with st.Store(tmp_path) as store:
        store.save_agent("a", cache, tokens=tokens, model=model)
        path = store.agent_path("a")
        with TensorFile(path) as f:
            meta = {k: v for k, v in f.metadata.items() if not k.startswith("xxh3.")}
            start = int(meta["window_start"])
            late = ((150 - 48) // 16 + 1) * 16  # the first block start after position n - window
            tensors = [
                (name, np.ascontiguousarray(f.read(name)[:, :, late - start :]) if name.startswith("window.")
                 else f.read(name))
                for name in f.tensors
            ]
        write_file(path, tensors, {**meta, "window_start": str(late)})
        with pytest.raises(CorruptSnapshotError, match="window_start"):
            store.load_agent("a", model=model)


def test_agents_move_between_stores_as_single_files(llama, tmp_path):
    cache, tokens = filled(llama, 40)
    with st.Store(tmp_path / "here") as here, st.Store(tmp_path / "there") as there:
        here.save_agent("a", cache, tokens=tokens, model=llama)
        size = here.export_agent("a", tmp_path / "a.safetensors")
        assert size == (tmp_path / "a.safetensors").stat().st_size
        result = there.import_agent(tmp_path / "a.safetensors", "b")
        assert (result.n_tokens, result.new_blocks) == (40, 2)
        assert there.import_agent(tmp_path / "a.safetensors").new_blocks == 0  # as "a": blocks shared
        assert there.list_agents() == ["a", "b"] and there.verify() == []
        nxt = prompt(4, seed=4).tolist()
        want = np.array(run(llama, nxt, cache))
        for restored in (kvsnap.load(tmp_path / "a.safetensors", model=llama), there.load_agent("b", model=llama)):
            np.testing.assert_array_equal(np.array(run(llama, nxt, restored)), want)
        with pytest.raises(StoreError, match="not a single-file snapshot"):
            there.import_agent(there.agent_path("a"))
        with pytest.raises(InvalidAgentIdError):
            there.import_agent(tmp_path / "a.safetensors", "../c")
