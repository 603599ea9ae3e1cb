"""Snapshots of kvsnap caches on disk: a block store for many agents, and
single-file exports.

    store = Store("~/.cache/kvsnap/store")
    store.save_agent("planner", cache, tokens=tokens, model=model)
    cache = store.load_agent("planner", model=model)

    kvsnap.save(cache, "planner.safetensors", tokens=tokens, model=model)
    cache = kvsnap.load("planner.safetensors", model=model)

A store holds content-addressed block files (one per full block of
``block_tokens`` tokens: every full-attention layer, keys and values, as the
arena holds them) and one manifest per agent (its token ids, the hashes of its
blocks, the partial tail block, the sliding-window layers' live window). A
block's hash covers its parent's hash and its tokens, so agents with a common
prefix share block files, and saving a longer conversation of an agent writes
only its new blocks and a new manifest. A single-file export is a manifest
with its blocks inline. Every file is safetensors with a checksum per tensor
(kvsnap.tensorfile); loading reads block data straight into arena slots and
verifies it, so a restored cache holds exactly the bytes that were saved.
docs/FORMAT.md describes the format.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import re
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_unflatten
from mlx_lm.models import cache as mlx_cache

from kvsnap._ext import Arena
from kvsnap.cache import BlockSequence, KVSnapCache, PromptCache, from_mlx, make_cache, to_mlx
from kvsnap.errors import (
    AgentNotFoundError,
    CorruptSnapshotError,
    FormatMismatchError,
    InvalidAgentIdError,
    InvalidArgumentError,
    MissingBlockError,
    ModelMismatchError,
    StoreError,
    UnsupportedModelError,
    UnsupportedVersionError,
)
from kvsnap.models import model_fingerprint, tokenizer_fingerprint
from kvsnap.tensorfile import OS_CALLS, TMP_PREFIX, TensorFile, fsync_dir, write_error, write_file

FORMAT_VERSION = "1"
BLOCK_FORMAT = "kvsnap.block"
AGENT_FORMAT = "kvsnap.agent"
STORE_FORMAT = "kvsnap.store"
SUFFIX = ".safetensors"
ARRAYS = ("keys", "keys.scales", "keys.biases", "values", "values.scales", "values.biases")
AGENT_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class GroupFormat:
    """How one group of layers is stored: which layers, their geometry, quantization."""

    kind: str  # "full" (shared blocks) or "window" (sliding-window layers, in the manifest)
    layers: tuple[int, ...]  # model layer indices, in arena layer order
    n_kv_heads: int
    head_dim: int
    block_tokens: int
    bits: int  # of the values
    key_bits: int
    group_size: int
    rotation: str  # "hadamard" or "none"
    window: int  # sliding window in tokens; 0 for full attention
    key_offsets: str = ""  # kvsnap.offsets digest ("<mode>:<hash>"); "" for keys stored as they are

    @classmethod
    def of(cls, cache: PromptCache, seq: BlockSequence) -> GroupFormat:
        a = seq.arena
        layers = sorted(
            (c.layer, i) for i, c in enumerate(cache) if isinstance(c, KVSnapCache) and c.seq is seq
        )
        return cls(
            kind="full" if seq.window is None else "window",
            layers=tuple(i for _, i in layers),
            n_kv_heads=a.n_kv_heads,
            head_dim=a.head_dim,
            block_tokens=a.block_tokens,
            bits=a.bits,
            key_bits=a.key_bits,
            group_size=a.group_size,
            rotation="hadamard" if seq.rotate else "none",
            window=seq.window or 0,
            key_offsets=seq.offsets.digest if seq.offsets is not None else "",
        )

    @functools.lru_cache(maxsize=64)  # noqa: B019 (a handful of small, immortal formats)
    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str, where: TensorFile) -> GroupFormat:
        try:
            d = json.loads(text)
            g = cls(**{**d, "layers": tuple(d["layers"])})
        except (ValueError, TypeError, KeyError, RecursionError):
            raise where.corrupt(f"malformed layer group {text[:120]!r}") from None
        ints = (g.n_kv_heads, g.head_dim, g.block_tokens, g.bits, g.key_bits, g.group_size, g.window, *g.layers)
        if (
            g.kind not in ("full", "window")
            or g.rotation not in ("hadamard", "none")
            or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in ints)
            or g.bits not in (4, 8)
            or g.key_bits not in (4, 6, 8)
            or g.group_size not in (16, 32, 64, 128)
            or not 0 < g.head_dim <= 256
            or g.head_dim % g.group_size
            or not 0 < g.n_kv_heads <= 1024
            or not 0 < g.block_tokens <= 65536
            or (g.kind == "window") != (g.window > 0)
            or not g.layers
            or not isinstance(g.key_offsets, str)
            or len(g.key_offsets) > 64
        ):
            raise where.corrupt(f"malformed layer group {text[:120]!r}")
        return g

    def array_shapes(self, n_tokens: int) -> list[tuple[str, str, tuple[int, ...]]]:
        """(name, dtype, shape) of the six arrays of the group for n_tokens tokens."""
        lh, groups = (len(self.layers), self.n_kv_heads), self.head_dim // self.group_size
        out = []
        for name in ARRAYS:
            if name in ("keys", "values"):
                bits = self.key_bits if name == "keys" else self.bits
                out.append((name, "U32", (*lh, n_tokens, self.head_dim * bits // 32)))
            else:
                out.append((name, "F16", (*lh, n_tokens, groups)))
        return out


@dataclass(frozen=True)
class AgentInfo:
    """What a manifest says about an agent."""

    agent_id: str
    n_tokens: int
    n_blocks: int  # full blocks in the store
    created_at: str
    updated_at: str
    path: Path
    blocks: tuple[str, ...] = ()  # hashes of its full blocks, in order
    model_fingerprint: str = ""
    tokenizer_fingerprint: str = ""  # "" when the snapshot was saved without a tokenizer
    groups: tuple[GroupFormat, ...] = ()  # its layer groups' formats
    inline: bool = False  # blocks in the file itself (a single file), not in a store
    file_bytes: int = 0  # size of the manifest or single file


@dataclass(frozen=True)
class SaveResult:
    agent_id: str
    n_tokens: int
    blocks: tuple[str, ...]  # hashes of the agent's full blocks
    new_blocks: int  # block files this save wrote (the others were in the store)
    bytes_written: int


def block_hash(parent: str, tokens: np.ndarray, model_fp: str, group: GroupFormat) -> str:
    """The content address of a full block (40 hex digits; docs/FORMAT.md)."""
    digest = hashlib.blake2b(b"kvsnap.block.v1", digest_size=20)
    for part in (parent, model_fp, group.to_json()):
        digest.update(part.encode() + b"\0")
    digest.update(np.ascontiguousarray(tokens, dtype="<i4").tobytes())
    return digest.hexdigest()


def block_hashes(tokens: np.ndarray, model_fp: str, group: GroupFormat) -> list[str]:
    """The hashes of the full blocks of a sequence of tokens, each chained to its parent."""
    t = group.block_tokens
    hashes, parent = [], ""
    for b in range(len(tokens) // t):
        parent = block_hash(parent, tokens[b * t : (b + 1) * t], model_fp, group)
        hashes.append(parent)
    return hashes


def check_agent_id(agent_id: str) -> str:
    if not isinstance(agent_id, str) or not AGENT_ID.fullmatch(agent_id) or ".." in agent_id:
        raise InvalidAgentIdError(
            f"agent_id: {agent_id!r} is not a valid agent id: use 1-128 letters, digits, '_', "
            "'-' and '.', not starting with '.' or '-', without '..' or path separators"
        )
    return agent_id


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---- what a cache holds ------------------------------------------------------


class _Snapshot:
    """The parts of a settled cache a snapshot stores (views into its arena)."""

    def __init__(self, cache: PromptCache, tokens, model):
        if not isinstance(cache, PromptCache):
            raise InvalidArgumentError(
                "cache: not a kvsnap cache; make one with kvsnap.cache.make_cache or from_mlx", "cache"
            )
        busy = [i for i in cache.foreign_layers if not _empty(cache[i])]
        if busy:
            raise UnsupportedModelError(
                f"layers {busy} keep mlx-lm caches, which kvsnap snapshots do not hold"
            )
        offsets = {c.offset for c in cache if isinstance(c, KVSnapCache)}
        if len(offsets) > 1:
            raise InvalidArgumentError(
                f"cache: its layers hold different numbers of tokens {sorted(offsets)}; "
                "save between forward passes",
                "cache",
            )
        n = offsets.pop() if offsets else 0
        if tokens is None:
            tokens = cache.tokens
        tokens = _token_array(tokens, model)
        if len(tokens) != n:
            raise InvalidArgumentError(
                f"tokens: {len(tokens)} token ids for a cache holding {n} tokens", "tokens"
            )
        cache._settle()
        self.cache, self.tokens, self.n_tokens = cache, tokens, n
        self.model_fp = model_fingerprint(model)
        self.groups = [(GroupFormat.of(cache, s), s) for s in cache.sequences]

    def full(self) -> tuple[GroupFormat, BlockSequence] | None:
        return next(((g, s) for g, s in self.groups if g.kind == "full"), None)

    def block_hashes(self) -> list[str]:
        full = self.full()
        return [] if full is None else block_hashes(self.tokens, self.model_fp, full[0])

    def block_tensors(self, b: int, prefix: str = "") -> list[tuple[str, np.ndarray]]:
        _, seq = self.full()
        return [(prefix + name, v) for name, v in zip(ARRAYS, seq.arena.block_views(seq.blocks[b]))]

    def rows(self, group: GroupFormat, seq: BlockSequence, start: int, prefix: str):
        """The six arrays of positions [start, n_tokens) of a group (copies)."""
        t = group.block_tokens
        parts: list[list[np.ndarray]] = [[] for _ in ARRAYS]
        for b in range(start // t, -(-self.n_tokens // t)):
            lo, hi = max(start, b * t) - b * t, min(self.n_tokens, (b + 1) * t) - b * t
            for k, view in enumerate(seq.arena.block_views(seq.blocks[b])):
                parts[k].append(view[:, :, lo:hi])
        return [(prefix + name, np.ascontiguousarray(np.concatenate(p, axis=2))) for name, p in zip(ARRAYS, parts)]

    def agent_file(self, agent_id: str, tokenizer, created_at: str | None, inline: bool):
        """(tensors, metadata) of an agent manifest, or a self-contained export."""
        hashes = self.block_hashes()
        tensors = [("tokens", self.tokens)]
        meta = {
            "format": AGENT_FORMAT,
            "format_version": FORMAT_VERSION,
            "agent_id": agent_id,
            "model_fingerprint": self.model_fp,
            "tokenizer_fingerprint": "" if tokenizer is None else tokenizer_fingerprint(tokenizer),
            "n_tokens": str(self.n_tokens),
            "groups": json.dumps([json.loads(g.to_json()) for g, _ in self.groups], separators=(",", ":")),
            "blocks": ",".join(hashes),
            "blocks_inline": "1" if inline else "0",
            "window_start": "0",
            "created_at": created_at or _now(),
            "updated_at": _now(),
        }
        if inline:
            for b in range(len(hashes)):
                tensors += self.block_tensors(b, f"blocks.{b}.")
        for group, seq in self.groups:
            if group.kind == "full":
                start = len(hashes) * group.block_tokens
                if start < self.n_tokens:
                    tensors += self.rows(group, seq, start, "tail.")
            elif self.n_tokens:
                start = min(seq.first_live_position(), self.n_tokens)
                meta["window_start"] = str(start)
                if start < self.n_tokens:
                    tensors += self.rows(group, seq, start, "window.")
        return tensors, meta


def _empty(c) -> bool:
    return c.empty() if hasattr(c, "empty") else getattr(c, "offset", 0) == 0


def _vocab_size(model) -> int:
    return getattr(getattr(model, "args", None), "vocab_size", None) or (1 << 31)


def _token_array(tokens, model) -> np.ndarray:
    try:
        arr = np.asarray(tokens.tolist() if isinstance(tokens, mx.array) else tokens)
    except (TypeError, ValueError):
        raise InvalidArgumentError("tokens: must be a sequence of token ids", "tokens") from None
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise InvalidArgumentError(f"tokens: must be a 1-D sequence of integer ids, got shape {arr.shape}", "tokens")
    vocab = _vocab_size(model)
    if arr.size and (arr.min() < 0 or arr.max() >= vocab):
        raise InvalidArgumentError(f"tokens: ids must lie in [0, {vocab})", "tokens")
    return np.ascontiguousarray(arr, dtype="<i4")


# ---- reading ---------------------------------------------------------------------


class _AgentFile:
    """A validated agent manifest or export (header checks only; data read on demand)."""

    def __init__(self, f: TensorFile):
        self.file = f
        meta = f.metadata
        fmt, version = meta.get("format"), meta.get("format_version")
        if fmt != AGENT_FORMAT:
            raise f.corrupt(f"not a kvsnap agent file (format {fmt!r})")
        _check_version(f, version)
        try:
            self.agent_id = meta["agent_id"]
            self.model_fp = meta["model_fingerprint"]
            self.tokenizer_fp = meta["tokenizer_fingerprint"]
            self.n_tokens = int(meta["n_tokens"])
            self.window_start = int(meta["window_start"])
            self.inline = meta["blocks_inline"] == "1"
            group_list = json.loads(meta["groups"])
            self.blocks = meta["blocks"].split(",") if meta["blocks"] else []
            self.created_at, self.updated_at = meta["created_at"], meta["updated_at"]
        except (KeyError, ValueError, RecursionError):
            raise f.corrupt("agent metadata is missing or malformed") from None
        if not isinstance(group_list, list):
            raise f.corrupt("agent metadata 'groups' is not a list")
        self.groups = [GroupFormat.from_json(json.dumps(g), f) for g in group_list]
        kinds = [g.kind for g in self.groups]
        if len(set(kinds)) != len(kinds):
            raise f.corrupt("agent file lists a layer group twice")
        self.full = next((g for g in self.groups if g.kind == "full"), None)
        t = self.full.block_tokens if self.full else 0
        want_blocks = self.n_tokens // t if t else 0
        if len(self.blocks) != want_blocks or not all(re.fullmatch(r"[0-9a-f]{40}", h) for h in self.blocks):
            raise f.corrupt(f"agent file lists {len(self.blocks)} block hashes for {self.n_tokens} tokens")
        if not 0 <= self.window_start <= self.n_tokens:
            raise f.corrupt(f"window_start {self.window_start} is outside [0, {self.n_tokens}]")

    def tokens(self) -> np.ndarray:
        return self.file.read("tokens", dtype="I32", shape=(self.n_tokens,))

    def info(self) -> AgentInfo:
        return AgentInfo(
            self.agent_id, self.n_tokens, len(self.blocks), self.created_at, self.updated_at, self.file.path,
            blocks=tuple(self.blocks), model_fingerprint=self.model_fp, tokenizer_fingerprint=self.tokenizer_fp,
            groups=tuple(self.groups), inline=self.inline, file_bytes=self.file.size,
        )

    def verify_inline(self) -> None:
        """Re-hash every tensor of a single file and check its blocks' hashes
        against its tokens, model and format (what ``import_agent`` checks)."""
        self.file.verify()
        hashes = block_hashes(self.tokens(), self.model_fp, self.full) if self.full else []
        if hashes != self.blocks:
            raise self.file.corrupt("its block hashes do not match its tokens, model and format")

    def check_model(self, model, tokenizer) -> None:
        if self.model_fp != model_fingerprint(model):
            raise ModelMismatchError(
                f"{self.file.path}: the cache was made with another model (fingerprint "
                f"{self.model_fp}, this model's is {model_fingerprint(model)})",
                self.file.path,
            )
        if tokenizer is not None and self.tokenizer_fp and self.tokenizer_fp != tokenizer_fingerprint(tokenizer):
            raise ModelMismatchError(
                f"{self.file.path}: the cache was made with another tokenizer", self.file.path
            )


def _check_version(f: TensorFile, version: str | None) -> None:
    if version != FORMAT_VERSION:
        raise UnsupportedVersionError(
            f"{f.path}: format version {version!r}; this kvsnap reads version {FORMAT_VERSION}",
            f.path,
        )


def _read_rows(f: TensorFile, group: GroupFormat, seq: BlockSequence, start: int, stop: int, prefix: str):
    """Fill positions [start, stop) of a group's blocks from the file's tensors."""
    t = group.block_tokens
    blocks = range(start // t, -(-stop // t))
    views = {b: seq.arena.block_views(seq.blocks[b]) for b in blocks}
    for k, (name, dtype, shape) in enumerate(group.array_shapes(stop - start)):
        rows = f.read(prefix + name, dtype=dtype, shape=shape)
        for b in blocks:
            lo, hi = max(start, b * t), min(stop, (b + 1) * t)
            views[b][k][:, :, lo - b * t : hi - b * t] = rows[:, :, lo - start : hi - start]


def _read_block(f: TensorFile, seq: BlockSequence, b: int, prefix: str) -> None:
    """Read full block b into its slot: one preadv, six checksums."""
    f.read_into((prefix + name, v) for name, v in zip(ARRAYS, seq.arena.block_views(seq.blocks[b])))


def _restore(
    agent: _AgentFile, model, tokenizer, arena: Arena | None, open_block, window_arena: Arena | None = None,
    resident=None,
) -> PromptCache:
    """A cache holding what an agent file describes; ``open_block(b, hash)``
    returns (TensorFile, tensor name prefix, close?) for full block b.
    ``resident(hash)``, when given, returns the arena slot of an identical
    full block already in ``arena`` (or None): that block is shared instead
    of read."""
    agent.check_model(model, tokenizer)
    tokens = agent.tokens()
    vocab = _vocab_size(model)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab):
        raise agent.file.corrupt(
            f"token ids outside the model's vocabulary [0, {vocab}) (min {tokens.min()}, max {tokens.max()})"
        )
    if not agent.groups:
        raise agent.file.corrupt("agent file has no layer groups")
    lead = agent.full or agent.groups[0]
    if arena is not None and agent.full is not None:
        _check_arena_format(arena, agent.full, agent.file.path)
    try:
        cache = make_cache(
            model, bits=lead.bits, key_bits=lead.key_bits, group_size=lead.group_size,
            block_tokens=lead.block_tokens, arena=arena, window_arena=window_arena,
            rotate=lead.rotation == "hadamard", key_offsets=bool(lead.key_offsets), tokenizer=tokenizer,
        )
    except InvalidArgumentError as e:
        raise FormatMismatchError(f"{agent.file.path}: the snapshot's format does not fit this model: {e}",
                                  agent.file.path) from None
    try:
        got = [GroupFormat.of(cache, s) for s in cache.sequences]
        theirs, ours = lead.key_offsets, got[0].key_offsets
        if theirs != ours:
            raise FormatMismatchError(
                f"{agent.file.path}: the snapshot's keys were stored with key offsets {theirs or 'none'}; "
                f"this cache's are {ours or 'none'} (another calibration or kvsnap version): restore it "
                "where it was made, or re-prefill",
                agent.file.path,
            )
        if sorted(got, key=lambda g: g.kind) != sorted(agent.groups, key=lambda g: g.kind):
            raise ModelMismatchError(
                f"{agent.file.path}: the model's layer groups {got} differ from the file's {agent.groups}",
                agent.file.path,
            )
        n = agent.n_tokens
        for group, seq in zip(got, cache.sequences):
            t = group.block_tokens
            if group.kind == "full":
                for b, h in enumerate(agent.blocks):
                    slot = resident(h) if resident is not None else None
                    if slot is not None:
                        seq.adopt(slot)
                        continue
                    seq.reserve((b + 1) * t)
                    f, prefix, owned = open_block(b, h)
                    try:
                        if owned:
                            _check_block_file(f, h, agent, group, tokens[b * t : (b + 1) * t])
                        _read_block(f, seq, b, prefix)
                    finally:
                        if owned:
                            f.close()
                seq.reserve(n)
                if len(agent.blocks) * t < n:
                    _read_rows(agent.file, group, seq, len(agent.blocks) * t, n, "tail.")
            else:
                start = agent.window_start
                if start % t or start > max(0, n - group.window):
                    raise agent.file.corrupt(
                        f"window_start {start} leaves out part of the last {group.window} tokens"
                    )
                first = start // t
                seq.blocks.extend([-1] * first)
                seq.reserve(n)
                if start < n:
                    _read_rows(agent.file, group, seq, start, n, "window.")
        for c in cache:
            if isinstance(c, KVSnapCache):
                c.offset = n
        cache.tokens = tokens.tolist()
    except BaseException:
        cache.release()
        raise
    return cache


def _prefetch(paths) -> None:
    """Ask the kernel to start reading these files now (they are read one by
    one next; from a cold page cache the reads then overlap)."""
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue  # reported when the load gets to it
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)


def _check_arena_format(arena: Arena, group: GroupFormat, path) -> None:
    want = {
        "n_layers": len(group.layers), "n_kv_heads": group.n_kv_heads, "head_dim": group.head_dim,
        "block_tokens": group.block_tokens, "bits": group.bits, "key_bits": group.key_bits,
        "group_size": group.group_size,
    }
    bad = [f"{k}={getattr(arena, k)} (the snapshot has {v})" for k, v in want.items() if getattr(arena, k) != v]
    if bad:
        raise FormatMismatchError(f"{path}: the arena does not fit the snapshot: {', '.join(bad)}", path)


def _check_block_file(f: TensorFile, h: str, agent: _AgentFile, group: GroupFormat, tokens: np.ndarray) -> None:
    meta = f.metadata
    if meta.get("format") != BLOCK_FORMAT:
        raise f.corrupt(f"not a kvsnap block file (format {meta.get('format')!r})")
    _check_version(f, meta.get("format_version"))
    if meta.get("block_hash") != h:
        raise f.corrupt(f"holds block {meta.get('block_hash')!r}, the manifest wants {h}")
    if meta.get("model_fingerprint") != agent.model_fp or meta.get("group") != group.to_json():
        raise f.corrupt("block was made with another model or format than its manifest")
    stored = f.read("tokens", dtype="I32", shape=(group.block_tokens,))
    if not np.array_equal(stored, tokens):
        raise f.corrupt("block tokens differ from the manifest's")


# ---- single files ------------------------------------------------------------------


def save(cache: PromptCache, path: str | os.PathLike, *, tokens=None, model, tokenizer=None) -> int:
    """Write ``cache`` to ONE self-contained safetensors file; returns its size.

    ``tokens``: the token ids the cache holds (default: ``cache.tokens``).
    The file is written crash-safely (temporary name, fsync, rename) with mode
    0600, and is readable by ``safetensors`` and ``mx.load``.
    """
    snap = _Snapshot(cache, tokens, model)
    path = Path(path).expanduser()
    tensors, meta = snap.agent_file(path.stem if AGENT_ID.fullmatch(path.stem) else "export", tokenizer, None, True)
    size = write_file(path, tensors, meta)
    fsync_dir(path.parent)
    return size


def load(path: str | os.PathLike, *, model, tokenizer=None, arena: Arena | None = None) -> PromptCache:
    """The cache saved by ``save`` at ``path``, for ``model`` (verified)."""
    agent = _open_single_file(path)
    with agent.file as f:
        _prefetch([f.path])
        return _restore(agent, model, tokenizer, arena, lambda b, h: (f, f"blocks.{b}.", False))


def file_info(path: str | os.PathLike) -> AgentInfo:
    """What an agent file says about its agent: a single file (``save``,
    ``export_agent``) or a store's manifest. Reads the header only."""
    path = Path(path).expanduser()
    try:
        f = TensorFile(path)
    except FileNotFoundError:
        raise StoreError(f"{path}: no such file", path) from None
    with f:
        return _AgentFile(f).info()


def verify_file(path: str | os.PathLike) -> None:
    """Re-read and re-hash a single-file snapshot; raises ``StoreError`` (or a
    subclass) naming the fault. A store manifest is checked by ``Store.verify``."""
    agent = _open_single_file(path)
    with agent.file:
        agent.verify_inline()


def _open_single_file(path: str | os.PathLike) -> _AgentFile:
    """A validated single-file snapshot (an agent file with its blocks inline)."""
    path = Path(path).expanduser()
    try:
        f = TensorFile(path)
    except FileNotFoundError:
        raise StoreError(f"{path}: no such file", path) from None
    try:
        agent = _AgentFile(f)
        if not agent.inline:
            raise f.corrupt("is a store manifest, not a single-file snapshot: use Store.load_agent")
    except BaseException:
        f.close()
        raise
    return agent


# ---- the store ------------------------------------------------------------------------


class Store:
    """A folder of content-addressed block files and agent manifests.

    Layout: ``kvsnap-store.json`` (format marker), ``lock``, ``blocks/<hash>.safetensors``,
    ``agents/<agent id>.safetensors``. Readers and writers hold a shared lock
    on ``lock``; ``gc`` and the cleanup of a killed writer's temporary files
    hold it exclusively, so they never remove a file another process is
    writing or reading. Each operation locks through its own descriptor, so
    threads of one process exclude each other as processes do.

    The store reads and writes only inside its folder: ``blocks``, ``agents``
    and the files in them must not be symbolic links (refused with
    ``StoreError``). Folders are mode 0700, files 0600.

    ``create=False``: the store must exist already (no folder is made).
    ``read_only=True``: open an existing store without writing anything (no
    lock file, no cleanup); the methods that write raise ``StoreError``.
    """

    def __init__(self, path: str | os.PathLike, *, create: bool = True, read_only: bool = False):
        self.read_only = read_only
        self._verified: dict[str, tuple[int, int, int]] = {}  # block hash -> (inode, size, mtime) checked
        self.path = Path(path).expanduser()
        self.blocks_dir = self.path / "blocks"
        self.agents_dir = self.path / "agents"
        marker = self.path / "kvsnap-store.json"
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(f"{self.path}: not a folder", self.path)
        if read_only or not create:
            if not self.path.exists():
                raise StoreError(f"{self.path}: no such store (the folder does not exist)", self.path)
            if not marker.exists():
                raise StoreError(f"{self.path}: not a kvsnap store (no kvsnap-store.json)", self.path)
        if read_only:
            self._check_layout()
            self._check_marker(marker)
            return
        if self.path.is_dir() and not marker.exists() and not self._is_unfinished_store():
            raise StoreError(f"{self.path}: not a kvsnap store (no kvsnap-store.json) and not empty", self.path)
        for d in (self.path, self.blocks_dir, self.agents_dir):
            try:
                d.mkdir(mode=0o700, exist_ok=True)
            except OSError as e:
                raise write_error(d, "create the folder", e) from e
        self._check_layout()
        for d in (self.path, self.blocks_dir, self.agents_dir):
            if stat.S_IMODE(d.stat().st_mode) != 0o700:
                try:
                    d.chmod(0o700)  # snapshots are private to their user
                except OSError as e:
                    raise write_error(d, "make the folder private (mode 0700)", e) from e
        try:
            os.close(os.open(self.path / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600))
        except OSError as e:
            raise write_error(self.path / "lock", "create the lock file", e) from e
        if not marker.exists():
            self._write_marker(marker)
        self._check_marker(marker)
        self._clean_temporaries()

    def _check_layout(self) -> None:
        """Refuse a store whose ``blocks`` or ``agents`` (or ``lock``) is a symbolic
        link: kvsnap would read and write outside the store's folder."""
        for p in (self.blocks_dir, self.agents_dir, self.path / "lock"):
            try:
                mode = p.lstat().st_mode
            except FileNotFoundError:
                continue
            if stat.S_ISLNK(mode):
                raise StoreError(
                    f"{p}: is a symbolic link; a kvsnap store keeps its own files inside its folder "
                    "(replace the link by the folder or file it points to)",
                    p,
                )

    def _is_unfinished_store(self) -> bool:
        """Empty, or what a Store() killed before writing its marker leaves."""
        for p in self.path.iterdir():
            if p.name.startswith(TMP_PREFIX) or p.name == "lock":
                continue
            if p.name not in ("blocks", "agents") or not p.is_dir() or any(p.iterdir()):
                return False
        return True

    def _write_marker(self, marker: Path) -> None:
        tmp = marker.with_name(f"{TMP_PREFIX}{os.getpid()}-marker")
        try:
            fd = OS_CALLS.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w") as out:
                json.dump({"format": STORE_FORMAT, "format_version": FORMAT_VERSION}, out)
                out.flush()
                OS_CALLS.fsync(out.fileno())
            OS_CALLS.replace(tmp, marker)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise write_error(marker, "write the store marker", e) from e
        fsync_dir(self.path)

    def _check_marker(self, marker: Path) -> None:
        try:
            info = json.loads(marker.read_text())
            fmt, version = info["format"], info["format_version"]
        except (OSError, ValueError, KeyError, TypeError):
            raise CorruptSnapshotError(f"{marker}: unreadable store marker", marker) from None
        if fmt != STORE_FORMAT:
            raise CorruptSnapshotError(f"{marker}: not a kvsnap store marker", marker)
        if version != FORMAT_VERSION:
            raise UnsupportedVersionError(
                f"{marker}: store format version {version!r}; this kvsnap reads {FORMAT_VERSION}", marker
            )

    def close(self) -> None:
        """Nothing to release (each operation takes and drops its own lock);
        kept so a Store can be used in ``with``."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- locking
    @contextmanager
    def _locked(self, exclusive: bool = False, *, write: bool = False, wait: bool = True) -> Iterator[bool]:
        """Hold the store's lock (shared: readers and writers; exclusive: gc,
        cleanup) for a ``with`` block; yields False if ``wait=False`` and it is taken.

        A read-only store locks only when it can open the lock file (a store
        on read-only media, or another user's, has no writer of ours to exclude)."""
        if write and self.read_only:
            raise StoreError(f"{self.path}: the store was opened read-only", self.path)
        self._check_layout()
        try:
            fd = os.open(self.path / "lock", os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except (FileNotFoundError, PermissionError) as e:
            if not self.read_only:
                raise StoreError(f"{self.path / 'lock'}: cannot open the store's lock file: {e.strerror}",
                                 self.path) from None
            fd = -1  # a read-only store without a lock it may take: nothing to exclude
        except OSError as e:
            raise StoreError(f"{self.path / 'lock'}: cannot open the lock file: {e.strerror}", self.path) from e
        try:
            held = True
            if fd >= 0:
                try:
                    fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if wait else fcntl.LOCK_NB))
                except BlockingIOError:
                    held = False
            yield held
        finally:
            if fd >= 0:
                os.close(fd)  # releases the lock

    def _clean_temporaries(self) -> None:
        """Remove what killed writers left (only when no reader or writer is active)."""
        with self._locked(exclusive=True, write=True, wait=False) as held:
            if not held:
                return
            for d in (self.path, self.blocks_dir, self.agents_dir):
                for p in d.glob(f"{TMP_PREFIX}*"):
                    p.unlink(missing_ok=True)

    # -- paths
    def agent_path(self, agent_id: str) -> Path:
        return self.agents_dir / f"{check_agent_id(agent_id)}{SUFFIX}"

    def block_path(self, h: str) -> Path:
        return self.blocks_dir / f"{h}{SUFFIX}"

    # -- writing
    def put_blocks(self, cache: PromptCache, *, tokens=None, model) -> list[str]:
        """Store the cache's full blocks that the store lacks; returns all their hashes."""
        snap = _Snapshot(cache, tokens, model)
        with self._locked(write=True):
            hashes, _, _ = self._put_blocks(snap)
        return hashes

    def _put_blocks(self, snap: _Snapshot) -> tuple[list[str], int, int]:
        hashes = snap.block_hashes()
        written = nbytes = 0
        if hashes:
            group, _ = snap.full()
            for b in range(len(hashes)):
                n = self._write_block(hashes, b, snap.tokens, snap.model_fp, group, lambda b=b: snap.block_tensors(b))
                nbytes += n
                written += n > 0
            if written:
                fsync_dir(self.blocks_dir)
        return hashes, written, nbytes

    def _has_good_block(self, h: str, path: Path) -> bool:
        """Whether block file ``path`` exists and verifies (header, checksums,
        content hash). A file is re-checked when it changed since this Store
        last checked or wrote it; a damaged one is rewritten by the caller."""
        try:
            st_ = os.lstat(path)
        except FileNotFoundError:
            return False
        key = (st_.st_ino, st_.st_size, st_.st_mtime_ns)
        if self._verified.get(h) == key:
            return True
        try:
            self._verify_block_file(path)
        except StoreError:
            return False
        self._verified[h] = key
        return True

    def _write_block(self, hashes, b, tokens, model_fp, group, arrays) -> int:
        """Write block b's file unless the store has a good one; returns the bytes written."""
        path = self.block_path(hashes[b])
        if self._has_good_block(hashes[b], path):
            return 0
        t = group.block_tokens
        meta = {
            "format": BLOCK_FORMAT,
            "format_version": FORMAT_VERSION,
            "block_hash": hashes[b],
            "parent_hash": hashes[b - 1] if b else "",
            "model_fingerprint": model_fp,
            "group": group.to_json(),
            "first_position": str(b * t),
        }
        size = write_file(path, [("tokens", tokens[b * t : (b + 1) * t]), *arrays()], meta)
        st_ = os.lstat(path)
        self._verified[hashes[b]] = (st_.st_ino, st_.st_size, st_.st_mtime_ns)
        return size

    def save_agent(self, agent_id: str, cache: PromptCache, *, tokens=None, model, tokenizer=None) -> SaveResult:
        """Snapshot an agent's cache: its new blocks, then a new manifest.

        Crash-safe: until the manifest's rename, the agent's previous snapshot
        stays the one a load sees; blocks written before a crash are kept for
        reuse (or removed by ``gc``).
        """
        path = self.agent_path(agent_id)
        snap = _Snapshot(cache, tokens, model)
        with self._locked(write=True):
            hashes, written, nbytes = self._put_blocks(snap)
            created = self._created_at(path)
            tensors, meta = snap.agent_file(agent_id, tokenizer, created, inline=False)
            nbytes += write_file(path, tensors, meta)
            fsync_dir(self.agents_dir)
        return SaveResult(agent_id, snap.n_tokens, tuple(hashes), written, nbytes)

    def _created_at(self, path: Path) -> str | None:
        try:
            with TensorFile(path, follow_symlinks=False) as f:
                return f.metadata.get("created_at")
        except (FileNotFoundError, StoreError):
            return None

    # -- reading
    def _open_agent(self, agent_id: str) -> _AgentFile:
        path = self.agent_path(agent_id)
        try:
            f = TensorFile(path, follow_symlinks=False)
        except FileNotFoundError:
            raise AgentNotFoundError(f"{path}: the store has no agent {agent_id!r}", path) from None
        try:
            agent = _AgentFile(f)
            if agent.inline or agent.agent_id != agent_id:
                raise f.corrupt(f"is not the manifest of agent {agent_id!r}")
        except BaseException:
            f.close()
            raise
        return agent

    def load_agent(
        self, agent_id: str, *, model, tokenizer=None, arena: Arena | None = None,
        window_arena: Arena | None = None, resident=None,
    ) -> PromptCache:
        """The agent's cache as last saved, verified, in fresh arena slots.

        ``arena``/``window_arena``: where its full-attention and sliding-window
        blocks go (as in ``make_cache``). ``resident(hash)``: the slot in
        ``arena`` of an identical block already resident, shared instead of read.
        """
        with self._locked():
            agent = self._open_agent(agent_id)
            with agent.file:
                _prefetch(self.block_path(h) for h in agent.blocks if resident is None or resident(h) is None)
                return _restore(agent, model, tokenizer, arena, self._open_block, window_arena, resident)

    def agent_tokens(self, agent_id: str) -> np.ndarray:
        """The token ids an agent's snapshot holds (int32)."""
        with self._locked():
            agent = self._open_agent(agent_id)
            with agent.file:
                return agent.tokens()

    def _open_block(self, b: int, h: str):
        path = self.block_path(h)
        try:
            return TensorFile(path, follow_symlinks=False), "", True
        except FileNotFoundError:
            raise MissingBlockError(f"{path}: block {b} of the agent is missing from the store", path) from None

    def export_agent(self, agent_id: str, path: str | os.PathLike) -> int:
        """Write an agent as ONE self-contained file (what ``kvsnap.save`` writes),
        file to file, every byte verified; returns its size. No model needed."""
        path = Path(path).expanduser()
        with self._locked():
            tensors, meta = self._export_parts(agent_id)
        size = write_file(path, tensors, {**meta, "blocks_inline": "1"})
        fsync_dir(path.parent)
        return size

    def _export_parts(self, agent_id: str):
        agent = self._open_agent(agent_id)
        with agent.file:
            tokens = agent.tokens()
            tensors = [(name, agent.file.read(name)) for name in agent.file.tensors]
            for b, h in enumerate(agent.blocks):
                f, _, _ = self._open_block(b, h)
                with f:
                    t = agent.full.block_tokens
                    _check_block_file(f, h, agent, agent.full, tokens[b * t : (b + 1) * t])
                    tensors += [(f"blocks.{b}.{name}", f.read(name)) for name in ARRAYS]
            meta = {k: v for k, v in agent.file.metadata.items() if not k.startswith("xxh3.")}
        return tensors, meta

    def import_agent(self, path: str | os.PathLike, agent_id: str | None = None) -> SaveResult:
        """Add the agent of a single file (``kvsnap.save``, ``export_agent``) to the
        store, as ``agent_id`` (default: the id it was saved under). Its blocks
        are verified and their hashes recomputed; blocks the store has are kept."""
        agent = _open_single_file(path)
        with agent.file as f:
            agent_id = check_agent_id(agent.agent_id if agent_id is None else agent_id)
            tokens = agent.tokens()
            hashes = block_hashes(tokens, agent.model_fp, agent.full) if agent.full else []
            if hashes != agent.blocks:
                raise f.corrupt("its block hashes do not match its tokens, model and format")
            inline = [name for name in f.tensors if name.startswith("blocks.")]
            manifest = [(name, f.read(name)) for name in f.tensors if name not in inline]
            meta = {k: v for k, v in f.metadata.items() if not k.startswith("xxh3.")}
            meta.update(agent_id=agent_id, blocks_inline="0", updated_at=_now())
            with self._locked(write=True):
                written = nbytes = 0
                for b in range(len(hashes)):
                    n = self._write_block(
                        hashes, b, tokens, agent.model_fp, agent.full,
                        lambda b=b: [
                            (name, f.read(f"blocks.{b}.{name}", dtype=dtype, shape=shape))
                            for name, dtype, shape in agent.full.array_shapes(agent.full.block_tokens)
                        ],
                    )
                    nbytes += n
                    written += n > 0
                if written:
                    fsync_dir(self.blocks_dir)
                nbytes += write_file(self.agent_path(agent_id), manifest, meta)
                fsync_dir(self.agents_dir)
        return SaveResult(agent_id, agent.n_tokens, tuple(hashes), written, nbytes)

    def agent_info(self, agent_id: str) -> AgentInfo:
        with self._locked():
            agent = self._open_agent(agent_id)
            with agent.file:
                return agent.info()

    def block_files(self) -> list[Path]:
        """The store's block files, sorted; not the temporary files of writers
        (live, or killed before they could rename what they wrote)."""
        return sorted(p for p in self.blocks_dir.glob(f"*{SUFFIX}") if not p.name.startswith("."))

    def block_bytes(self) -> dict[str, int]:
        """The size in bytes of every block file in the store, by hash."""
        out = {}
        with self._locked():
            for p in self.block_files():
                try:
                    out[p.name[: -len(SUFFIX)]] = p.lstat().st_size
                except FileNotFoundError:
                    pass
        return out

    def list_agents(self) -> list[str]:
        with self._locked():
            return self._list_agents()

    def _list_agents(self) -> list[str]:
        return sorted(
            p.name[: -len(SUFFIX)]
            for p in self.agents_dir.glob(f"*{SUFFIX}")
            if not p.name.startswith(".") and AGENT_ID.fullmatch(p.name[: -len(SUFFIX)])
        )

    def delete_agent(self, agent_id: str) -> None:
        """Remove an agent's manifest (its blocks go at the next ``gc``)."""
        path = self.agent_path(agent_id)
        with self._locked(write=True):
            try:
                path.unlink()
            except FileNotFoundError:
                raise AgentNotFoundError(f"{path}: the store has no agent {agent_id!r}", path) from None
            fsync_dir(self.agents_dir)

    def gc(self) -> tuple[int, int]:
        """Delete block files no manifest references; returns (files, bytes) removed.

        Refuses (CorruptSnapshotError) when a manifest cannot be read, since the
        blocks it references are unknown.
        """
        with self._locked(exclusive=True, write=True):
            live: set[str] = set()
            for agent_id in self._list_agents():
                agent = self._open_agent(agent_id)
                with agent.file:
                    live.update(agent.blocks)
            removed = freed = 0
            for p in self.blocks_dir.iterdir():
                if p.name.startswith(TMP_PREFIX) or (p.name.endswith(SUFFIX) and p.name[: -len(SUFFIX)] not in live):
                    freed += p.lstat().st_size
                    p.unlink()
                    removed += 1
            if removed:
                fsync_dir(self.blocks_dir)
        return removed, freed

    def verify(
        self, agent_ids: list[str] | None = None, progress: Callable[[int, int], None] | None = None
    ) -> list[tuple[Path, str]]:
        """Re-read and re-hash every file; returns (path, fault) for each bad one.

        ``agent_ids``: only these agents' manifests and the block files they
        reference (default: every file of the store). ``progress(done, total)``
        is called as the files are checked."""
        with self._locked():
            return self._verify(agent_ids, progress)

    def _verify(self, agent_ids, progress) -> list[tuple[Path, str]]:
        if agent_ids is None:
            agent_ids = self._list_agents()
            block_files = self.block_files()
        else:
            wanted: set[str] = set()
            for agent_id in agent_ids:
                try:
                    agent = self._open_agent(agent_id)
                except StoreError:
                    continue  # reported below
                with agent.file:
                    wanted.update(agent.blocks)
            block_files = sorted(p for p in map(self.block_path, wanted) if p.exists())
        problems: list[tuple[Path, str]] = []
        good_blocks: set[str] = set()
        total = len(block_files) + len(agent_ids)
        for done, p in enumerate(block_files):
            if progress is not None:
                progress(done, total)
            try:
                good_blocks.add(self._verify_block_file(p))
            except StoreError as e:
                problems.append((p, str(e)))
        for done, agent_id in enumerate(agent_ids, len(block_files)):
            if progress is not None:
                progress(done, total)
            p = self.agent_path(agent_id)
            try:
                agent = self._open_agent(agent_id)
                with agent.file:
                    agent.file.verify()
                    missing = [h for h in agent.blocks if h not in good_blocks]
                    if missing:
                        raise MissingBlockError(
                            f"{p}: {len(missing)} of its blocks are missing or bad (first: {missing[0]})", p
                        )
            except StoreError as e:
                problems.append((p, str(e)))
        if progress is not None:
            progress(total, total)
        return problems

    def _verify_block_file(self, p: Path) -> str:
        """Re-hash block file p and check its content address; returns its hash."""
        with TensorFile(p, follow_symlinks=False) as f:
            f.verify()
            meta = f.metadata
            if meta.get("format") != BLOCK_FORMAT:
                raise f.corrupt("not a block file")
            _check_version(f, meta.get("format_version"))
            group = GroupFormat.from_json(meta.get("group", ""), f)
            tokens = f.read("tokens", dtype="I32", shape=(group.block_tokens,))
            h = block_hash(meta.get("parent_hash", ""), tokens, meta.get("model_fingerprint", ""), group)
            if h != meta.get("block_hash") or p.name != f"{h}{SUFFIX}":
                raise f.corrupt("content hash does not match the file name")
            return h


# ---- mlx-lm prompt cache files ------------------------------------------------------

_MLX_CLASSES = {"KVCache", "QuantizedKVCache", "RotatingKVCache"}


def export_mlx(cache: PromptCache, path: str | os.PathLike, *, tokens=None, quantized: bool = True) -> None:
    """Write ``cache`` as an mlx-lm ``save_prompt_cache`` file (see ``cache.to_mlx``).

    The token ids, when known, go in the file's metadata under ``kvsnap_tokens``.
    """
    tokens = cache.tokens if tokens is None else tokens
    meta = {"kvsnap_tokens": ",".join(str(int(t)) for t in tokens)} if len(tokens) == cache.offset else {}
    mlx_cache.save_prompt_cache(str(Path(path).expanduser()), to_mlx(cache, quantized=quantized), meta)


def import_mlx(path: str | os.PathLike, *, model, **make_cache_args) -> PromptCache:
    """A kvsnap cache holding what an mlx-lm ``save_prompt_cache`` file holds."""
    path = Path(path).expanduser()
    try:
        _, flat_meta = mx.load(str(path), return_metadata=True)
    except FileNotFoundError:
        raise StoreError(f"{path}: no such file", path) from None
    except (RuntimeError, ValueError) as e:  # what mx.load raises on malformed files
        raise CorruptSnapshotError(f"{path}: not a readable safetensors file ({e})", path) from None
    # mlx-lm's layout: metadata [user metadata, layer class names, scalar types]
    try:
        classes = tree_unflatten(list(flat_meta.items()))[1]
    except (ValueError, IndexError, KeyError, TypeError):
        classes = None
    if not isinstance(classes, list) or not classes or set(map(str, classes)) - _MLX_CLASSES:
        raise CorruptSnapshotError(
            f"{path}: not an mlx-lm prompt cache of {sorted(_MLX_CLASSES)} layers",
            path,
        )
    try:
        caches, meta = mlx_cache.load_prompt_cache(str(path), return_metadata=True)
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
        raise CorruptSnapshotError(f"{path}: malformed mlx-lm prompt cache ({type(e).__name__}: {e})", path) from None
    out = from_mlx(model, caches, **make_cache_args)
    text = meta.get("kvsnap_tokens", "") if isinstance(meta, dict) else ""
    try:
        tokens = [int(t) for t in text.split(",")] if text else []
    except ValueError:
        tokens = []
    if len(tokens) == out.offset:
        out.tokens = tokens
    return out


__all__ = [
    "AgentInfo", "GroupFormat", "SaveResult", "Store", "block_hash", "block_hashes", "check_agent_id",
    "export_mlx", "file_info", "import_mlx", "load", "save", "verify_file",
]
