"""Ragged batches of kvsnap caches: several sequences in one forward pass.

``batch_cache(prompt_caches)`` returns a per-layer list for an mlx-lm model
call over B sequences at once (``model(tokens[B, L], cache=batch)``): each
sequence keeps its own blocks, block tables and offset (RoPE takes
``cache.offset`` as an array of shape [B], as with mlx-lm's BatchKVCache);
one ``kv_write`` and one ``attention`` per layer serve the whole batch, each
sequence at its own length — no padding copies of K/V, no left padding.

Prompts of different lengths are right-padded to a common L; ``prepare(
lengths=...)`` says how many tokens of each row are real and only those are
written (the padded queries see nothing they could spoil and are dropped).

The same class is what mlx-lm's ``BatchGenerator`` / ``batch_generate`` need
of a cache: ``KVSnapCache.merge`` builds a batch from per-sequence caches
(sharing their blocks; a block either side writes later is copied first),
and ``filter``, ``extend``, ``extract``, ``prepare``, ``finalize``, ``trim``,
``make_mask``, ``state`` and ``copy.deepcopy`` work as mlx-lm calls them.
mlx-lm calls these per layer; the batch acts once, on its first layer's
call (the calls come for every layer, in order).
"""

from __future__ import annotations

import copy

import mlx.core as mx
import numpy as np

from kvsnap.cache import BlockSequence, KVSnapCache, PromptCache, attend_blocks, write_blocks
from kvsnap.errors import InvalidArgumentError


class _Group:
    """One layer group (full attention or sliding window) across the batch."""

    def __init__(self, seqs: list[BlockSequence]):
        self.seqs = seqs
        self._table: np.ndarray | None = None
        self._versions: tuple = ()

    @property
    def arena(self):
        return self.seqs[0].arena

    @property
    def window(self):
        return self.seqs[0].window

    @property
    def rotate(self) -> bool:
        return self.seqs[0].rotate

    def table(self) -> np.ndarray:
        """[B, max_blocks] slots; rows are padded with 0 past their own blocks
        (never read: each row is used only up to its own length)."""
        versions = tuple((id(s), s.version) for s in self.seqs)
        if self._table is None or versions != self._versions:
            width = max((len(s.blocks) for s in self.seqs), default=0)
            table = np.zeros((len(self.seqs), max(width, 1)), dtype=np.int32)
            for b, s in enumerate(self.seqs):
                table[b, : len(s.blocks)] = s.blocks
            self._table, self._versions = table, versions
        return self._table


class _Batch:
    """B sequences (each one prompt cache's layers), and what a step needs."""

    def __init__(self, members: list[PromptCache], owned: bool):
        self.members = members
        self.owned = owned  # the batch holds its own references (mlx-lm path)
        self._check()
        self.pending: list[int] | None = None  # real tokens left per row (right padding)
        self.step_counts: list[int] | None = None
        self.extracted: dict[int, PromptCache] = {}
        self._build()

    def _check(self) -> None:
        if not self.members:
            return
        lead = self.members[0]
        def form(s):
            return (s.window, s.rotate, s.arena.block_tokens, s.offsets and s.offsets.digest)

        shape = [form(s) for s in lead.sequences]
        for m in self.members[1:]:
            if [form(s) for s in m.sequences] != shape or len(m) != len(lead):
                raise InvalidArgumentError(
                    "caches: a batch needs caches of one model and one format (layer groups, "
                    "windows, rotation, key offsets and block size differ)",
                    "caches",
                )
        for g in range(len(lead.sequences)):
            for m in self.members[1:]:
                m.sequences[g].move_to(lead.sequences[g].arena)  # one arena per group and batch

    def _build(self) -> None:
        n_groups = len(self.members[0].sequences) if self.members else 0
        self.groups = [_Group([m.sequences[g] for m in self.members]) for g in range(n_groups)]
        self.extracted = {}

    def __len__(self) -> int:
        return len(self.members)

    def group_of(self, layer: int) -> tuple[_Group, list[KVSnapCache]]:
        caches = [m[layer] for m in self.members]
        seq = caches[0].seq
        g = self.members[0].sequences.index(seq)
        return self.groups[g], caches

    def begin_step(self, n_new: int) -> None:
        """Before the first layer writes: every row's blocks for this step, in
        every group, all or nothing; blocks written this step made private."""
        counts = [n_new] * len(self.members)
        if self.pending is not None:
            counts = [max(0, min(n_new, p)) for p in self.pending]
            self.pending = [p - c for p, c in zip(self.pending, counts)]
        self.step_counts = counts
        done = []
        try:
            for m in self.members:
                offset = m.offset
                for s in m.sequences:
                    if s.window is not None:
                        s.release_outside_window(offset)
                m.reserve(offset + n_new)
                done.append(m)
                for s in m.sequences:
                    s.make_writable(offset, offset + n_new)
        except BaseException:
            for m in done:  # blocks past each row's end are not part of its state
                for s in m.sequences:
                    s.truncate(m.offset)
            raise

    def filter(self, keep: list[int]) -> None:
        keep = [int(i) for i in keep]
        dropped = [m for i, m in enumerate(self.members) if i not in set(keep)]
        self.members = [self.members[i] for i in keep]
        if self.pending is not None:
            self.pending = [self.pending[i] for i in keep]
        if self.owned:
            for m in dropped:
                m.release()
        self._build()

    def extend(self, other: _Batch) -> None:
        if other is self:
            return
        if self.members and other.members:
            for g, group in enumerate(self.groups):
                for m in other.members:
                    m.sequences[g].move_to(group.arena)
        self.members = self.members + other.members
        if self.pending is not None or other.pending is not None:
            raise InvalidArgumentError("extend: a batch cannot grow in the middle of a padded prompt", "other")
        other.members = []
        other._build()
        self._build()

    def extract(self, idx: int) -> PromptCache:
        """An independent cache of row idx (blocks shared, copied on write)."""
        if idx not in self.extracted:
            self.extracted[idx] = share(self.members[idx])
        return self.extracted[idx]

    def release(self) -> None:
        if self.owned:
            for m in self.members:
                m.release()
        self.members = []
        self._build()

    def __deepcopy__(self, memo):
        twin = _Batch.__new__(_Batch)
        memo[id(self)] = twin
        twin.members = [share(m) for m in self.members]
        twin.owned = True
        twin.pending = None if self.pending is None else list(self.pending)
        twin.step_counts = None
        twin._build()
        return twin


def share(cache: PromptCache) -> PromptCache:
    """A prompt cache holding the same tokens as ``cache``, sharing its blocks
    by reference count (writes to either copy the block first)."""
    return cache.over([s.share() for s in cache.sequences])


class BatchLayerCache:
    """One layer of a batch: what an mlx-lm attention layer is given as its cache."""

    kvsnap_batch = True  # kvsnap's attention routing serves it

    def __init__(self, batch: _Batch, layer: int, leader: bool):
        self.batch = batch
        self.layer = layer  # model layer index
        self.leader = leader  # the first layer: acts for the whole batch
        self._write: mx.array | None = None
        self._read: mx.array | None = None
        self._lengths: list[int] = []

    # -- what the model reads
    @property
    def offset(self) -> mx.array:
        return mx.array([m[self.layer].offset for m in self.batch.members], dtype=mx.int32)

    @property
    def bits(self) -> int:
        return self.batch.members[0][self.layer].bits

    @property
    def group_size(self) -> int:
        return self.batch.members[0][self.layer].group_size

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        batch = self.batch
        B, _, L, _ = keys.shape
        if B != len(batch):
            raise InvalidArgumentError(f"keys: batch of {B} rows for a cache of {len(batch)} sequences", "keys")
        if self.leader:
            batch.begin_step(L)
        group, caches = batch.group_of(self.layer)
        offsets = [c.offset for c in caches]
        counts = batch.step_counts or [L] * B
        after = [c._read for c in caches if c._read is not None]
        write = write_blocks(group.seqs[0], caches[0].layer, keys, values, group.table(), offsets,
                             counts=counts, after=after)
        self._lengths = [o + L for o in offsets]
        for c, n in zip(caches, counts):
            c.offset += n
            c._write = write
        self._write = write
        return keys, values

    def attend(self, queries: mx.array, *, scale: float, mask) -> mx.array:
        if mask is not None and not isinstance(mask, str):
            raise InvalidArgumentError(
                "mask: kvsnap caches apply causal and sliding-window masking themselves; "
                "an explicit mask array is not supported",
                "mask",
            )
        group, caches = self.batch.group_of(self.layer)
        after = [] if self._write is None else [self._write]
        out = attend_blocks(
            group.seqs[0], caches[0].layer, queries, group.table(), self._lengths, scale,
            caches[0].window, after,
        )
        self._read = out
        for c in caches:
            c._read = out
        return out

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None):
        return None if n == 1 else "causal"  # the kernel masks by position and window

    @property
    def state(self):
        return () if self._write is None else (self._write,)

    # -- what mlx-lm's BatchGenerator calls
    def prepare(self, *, left_padding=None, lengths=None, right_padding=None):
        if left_padding is not None and any(int(p) for p in np.asarray(left_padding).reshape(-1)):
            raise InvalidArgumentError(
                "left_padding: kvsnap batches are ragged and never left-padded; right-pad and pass lengths",
                "left_padding",
            )
        if self.leader and lengths is not None:
            lengths = [int(n) for n in np.asarray(lengths).reshape(-1)]
            if len(lengths) != len(self.batch):
                raise InvalidArgumentError(f"lengths: {len(lengths)} entries for {len(self.batch)} rows", "lengths")
            self.batch.pending = lengths

    def finalize(self):
        if self.leader:
            self.batch.pending = self.batch.step_counts = None
            for m in self.batch.members:
                for s in m.sequences:
                    s.truncate(m.offset)  # blocks reserved for padding

    def filter(self, batch_indices):
        if self.leader:
            self.batch.filter(np.asarray(batch_indices).reshape(-1).tolist())

    def extend(self, other: BatchLayerCache):
        if self.leader:  # moves other's sequences here; other's later layers find it empty
            self.batch.extend(other.batch)

    def extract(self, idx: int) -> KVSnapCache:
        return self.batch.extract(int(idx))[self.layer]

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = max(0, int(n))
        if self.leader:
            for m in self.batch.members:
                m.trim(min(n, m.offset))
        return n

    def size(self) -> int:
        return max((m.offset for m in self.batch.members), default=0)

    def empty(self) -> bool:
        return self.size() == 0

    @property
    def nbytes(self) -> int:
        return sum(m[self.layer].nbytes for m in self.batch.members)

    def __deepcopy__(self, memo):
        twin = BatchLayerCache(copy.deepcopy(self.batch, memo), self.layer, self.leader)
        memo[id(self)] = twin
        return twin


def batch_cache(caches: list[PromptCache], *, owned: bool = False) -> list[BatchLayerCache]:
    """One forward pass over several prompt caches (one per sequence, same
    model and format): the per-layer caches to give the model. With
    ``owned=False`` (the default) the batch updates the given caches in place
    and never releases them; with ``owned=True`` it holds its own references."""
    if not caches:
        raise InvalidArgumentError("caches: a batch needs at least one cache", "caches")
    for c in caches:
        if not isinstance(c, PromptCache) or c.foreign_layers:
            raise InvalidArgumentError("caches: each must be a kvsnap prompt cache of kvsnap layers only", "caches")
    batch = _Batch(list(caches), owned)
    return [BatchLayerCache(batch, i, i == 0) for i in range(len(caches[0]))]


_MERGING: dict[tuple, list[BatchLayerCache]] = {}


def merge_layer(caches: list[KVSnapCache]) -> BatchLayerCache:
    """``KVSnapCache.merge``: mlx-lm merges per layer; the batch is built at
    the first layer (sharing every layer's blocks) and handed out per layer."""
    owners = []
    for c in caches:
        owner = c.seq.owner() if c.seq.owner is not None else None
        if owner is None:
            raise InvalidArgumentError("caches: merge needs caches made by kvsnap.make_cache", "caches")
        owners.append(owner)
    key = tuple(id(o) for o in owners)
    index = next(i for i, c in enumerate(owners[0]) if c is caches[0])
    if index == 0 or key not in _MERGING:
        _MERGING[key] = batch_cache([share(o) for o in owners], owned=True)
    layers = _MERGING[key]
    if index == len(layers) - 1:
        del _MERGING[key]
    return layers[index]
