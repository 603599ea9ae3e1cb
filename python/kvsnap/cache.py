"""Drop-in quantized KV caches for mlx-lm models, stored in arena blocks.

``make_cache(model)`` returns a prompt cache (one entry per layer) that mlx-lm
uses like its own: ``mlx_lm.generate``, ``stream_generate(prompt_cache=...)``
and ``model(tokens, cache=cache)`` all work unchanged. Each layer cache writes
its new keys/values with ``kvsnap.kv_write`` and answers the model's attention
call with ``kvsnap.attention`` over its blocks, never holding float K/V.

Layers are grouped by kind. Full-attention layers share one block table per
sequence (a block holds ``block_tokens`` tokens for every layer of the group);
sliding-window layers (Gemma 3) form a second group with its own arena, so the
blocks that fall out of the window can be freed. Layers kvsnap cannot serve
(recurrent state, latent caches) keep mlx-lm's cache; ``make_cache`` lists them
in ``PromptCache.foreign_layers``.

Routing: mlx-lm model files call ``scaled_dot_product_attention`` imported from
``mlx_lm.models.base``. ``make_cache`` rebinds that name in the model's own
module(s) to a function that sends calls whose cache is a kvsnap cache to the
fused kernel and every other call to mlx-lm's function, unchanged. Importing
kvsnap changes nothing; only the modules of models given to ``make_cache`` are
touched.

The rest of mlx-lm's prompt-cache contract: ``make_mask`` makes the masks
``KVCache`` makes; ``copy.deepcopy(cache)`` and ``cache.copy()`` share the full
blocks (copy-on-write), so mlx-lm's ``LRUPromptCache`` can hold kvsnap caches;
``update_and_fetch`` returns only the new keys and values (``make_cache``
refuses models whose attention code needs more, see ``kvsnap.model_audit``).
mlx-lm's ``save_prompt_cache`` writes each layer's ``state`` under the name of
its class and ``load_prompt_cache`` finds that class in mlx-lm's own module:
layers whose K/V an mlx-lm class can hold are of a kvsnap class named after it
(``QuantizedKVCache``, ``RotatingKVCache`` below) and load as mlx-lm's; saving
any other layer is refused before anything is written.
"""

from __future__ import annotations

import copy
import sys
import weakref
from collections.abc import Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.models import base as mlx_base
from mlx_lm.models import cache as mlx_cache

from kvsnap import model_audit, ops
from kvsnap._ext import Arena, Budget
from kvsnap.errors import InvalidArgumentError, SlotError, UnsupportedModelError
from kvsnap.offsets import GroupOffsets, KeyOffsets
from kvsnap.offsets import for_model as offsets_for_model

DEFAULT_BUDGET_BYTES = 2 << 30  # virtual: the arena's pages are touched only when used
ACCURATE_KEY_BITS = 6  # quality="accurate": 5.5 bits per element at g64 (benchmarks/RESULTS.md)


def hadamard(x: mx.array) -> mx.array:
    """Orthonormal Hadamard transform of the last axis (its own inverse).

    Attention is unchanged when queries, keys and values are all rotated by
    the same orthogonal matrix (and the output rotated back), but quantizing
    rotated K/V spreads the few large channels of a head over all of them, so
    4-bit groups lose far less (QuaRot-style). See benchmarks/accuracy.py.
    """
    return mx.hadamard_transform(x, scale=x.shape[-1] ** -0.5)


def store_form(seq, layer: int, keys: mx.array, values: mx.array, positions: mx.array, end: int):
    """The keys and values as a group stores them: key offsets removed
    (``positions`` [B, L] of the tokens, all below ``end``), then rotated.
    As array ops: the reference for what kv_write's ``form`` computes per
    token in the kernel (``write_blocks``), and for GPU streams."""
    if seq.offsets is not None:
        keys = seq.offsets.layers[layer].remove(keys, positions, end)
    return (hadamard(keys), hadamard(values)) if seq.rotate else (keys, values)


def write_blocks(seq, layer: int, keys: mx.array, values: mx.array, table, offsets: list[int], *,
                 counts=None, after=()) -> mx.array:
    """ops.kv_write of keys/values [B, Hkv, L, D] (token l of sequence b at
    position offsets[b] + l) in the group's stored form (``store_form``),
    which the kernel computes per token."""
    return ops.kv_write(
        seq.arena, layer, keys, values, table, offsets, counts=counts, after=after,
        form=_write_form(seq, layer, max(offsets, default=0) + keys.shape[2]),
    )


def _write_form(seq, layer: int, end: int) -> dict | None:
    lo = None if seq.offsets is None else seq.offsets.layers[layer]
    if lo is None:
        return {"rotate": True} if seq.rotate else None
    return {**lo.write_form(end), "rotate": seq.rotate}


def _scaled_queries(lo, queries: mx.array) -> mx.array:
    """Queries times the key scale of their KV head (keys were divided by it),
    as array ops (the kernel does it itself: attention's ``query_scale``)."""
    return queries if lo is None or lo.scale is None else ops.scale_queries(queries, lo.scale)


def attend_blocks(seq, layer: int, queries, table, lengths: list[int], scale: float, window, after):
    """kvsnap.attention of queries [B, Hq, L, D] over a group's blocks, with
    the group's rotation, key scale and key-offset correction, all in the
    kernel (the correction is a score bias it computes from each query row
    and a per-position table)."""
    rotate = seq.rotate
    lo = None if seq.offsets is None else seq.offsets.layers[layer]
    bias = None if lo is None else lo.kernel_bias(rotate, max(lengths, default=0))
    return ops.attention(
        seq.arena, layer, queries, table, lengths, scale=scale, causal=True, window=window, bias=bias,
        after=after, rotate=rotate, query_scale=None if lo is None else lo.query_scale(),
    )


def can_rotate(head_dim: int) -> bool:
    """Whether mx.hadamard_transform handles this head_dim (powers of two here)."""
    return head_dim > 0 and head_dim & (head_dim - 1) == 0


class BlockSequence:
    """The block table of one sequence for one group of layers.

    ``index`` (optional) is told about slots this sequence lets go of: an
    object with ``drop_slot(slot)``, called when a slot's last reference goes
    or when a block is about to be written again (a resident index of shared
    blocks must then forget it). ``siblings`` are the block sequences of the
    same prompt cache (every group), reserved together before a forward pass.
    """

    def __init__(
        self,
        arena: Arena,
        window: int | None = None,
        rotate: bool = False,
        offsets: GroupOffsets | None = None,
    ):
        self.arena = arena
        self.window = window
        self.rotate = rotate  # K/V/Q are stored and attended in a Hadamard basis
        self.offsets = offsets  # key offsets removed before quantizing (kvsnap.offsets)
        self.blocks: list[int] = []  # arena slot per block; -1 once freed
        self.layers: list[KVSnapCache] = []
        self.index = None
        self.siblings: list[BlockSequence] = [self]
        self.owner = None  # weak reference to the PromptCache holding this sequence
        self.version = 0  # bumped whenever the block table changes
        # Array masks the model made from this group's layers (make_mask), by window.
        self.masks: dict[int | None, tuple[mx.array, int, int]] = {}
        self._table: np.ndarray | None = None  # built once per change, not per layer

    @property
    def block_tokens(self) -> int:
        return self.arena.block_tokens

    def _changed(self) -> None:
        self._table = None
        self.version += 1

    def __del__(self):
        # A sequence dropped without release() (a copy mlx-lm's LRUPromptCache
        # evicted, a batch's row) gives its references back; pending ops keep
        # their slots pinned.
        try:
            for slot in self.blocks:
                if slot >= 0:
                    self._drop(slot)
            self.blocks = []
        except (SlotError, TypeError, AttributeError):  # interpreter shutdown: the arena goes too
            return

    def share(self) -> BlockSequence:
        """A sequence holding the same blocks (one more reference each); a
        block either one writes to later is copied first (``make_writable``)."""
        self._settle()  # the twin's layers know nothing of this one's pending writes
        twin = BlockSequence(self.arena, self.window, self.rotate, self.offsets)
        for slot in self.blocks:
            if slot >= 0:
                self.arena.incref(slot)
        twin.blocks = list(self.blocks)
        twin.index = self.index
        return twin

    def make_writable(self, start: int, stop: int) -> None:
        """Copy the shared blocks positions [start, stop) fall in (copy on write)."""
        bt = self.block_tokens
        for b in range(start // bt, min(len(self.blocks), -(-stop // bt))):
            if self.blocks[b] >= 0 and self.arena.refcount(self.blocks[b]) > 1:
                self._make_private(b)

    def move_to(self, arena: Arena) -> None:
        """Copy this sequence's blocks into another arena of the same format."""
        if arena is self.arena:
            return
        self._settle()
        moved = []
        try:
            for slot in self.blocks:
                if slot < 0:
                    moved.append(-1)
                    continue
                new = arena.alloc()
                moved.append(new)
                for dst, src in zip(arena.block_views(new), self.arena.block_views(slot)):
                    dst[...] = src
        except BaseException:
            for slot in moved:
                if slot >= 0:
                    arena.decref(slot)
            raise
        for slot in self.blocks:
            if slot >= 0:
                self._drop(slot)
        self.arena, self.blocks, self.index = arena, moved, None
        self._changed()

    def blocks_for(self, n_tokens: int) -> int:
        """Blocks positions [0, n_tokens) span."""
        return -(-n_tokens // self.block_tokens)

    def reserve(self, n_tokens: int) -> list[int]:
        """Allocate blocks so that positions [0, n_tokens) have a slot; returns
        the new slots. All or nothing: on ArenaFullError none are kept."""
        new = []
        try:
            while len(self.blocks) * self.block_tokens < n_tokens:
                self.blocks.append(self.arena.alloc())
                new.append(self.blocks[-1])
        except BaseException:
            self.unreserve(new)
            raise
        if new:
            self._changed()
        return new

    def unreserve(self, slots: list[int]) -> None:
        """Give back the last blocks ``reserve`` returned (never written)."""
        for slot in reversed(slots):
            assert self.blocks and self.blocks[-1] == slot
            self.blocks.pop()
            self._drop(slot)
        self._changed()

    def reserve_all(self, n_tokens: int) -> None:
        """Reserve positions [0, n_tokens) in every group of the cache, all or
        nothing: a forward pass never finds the arena full half way."""
        done = []
        try:
            for seq in self.siblings:
                done.append((seq, seq.reserve(n_tokens)))
        except BaseException:
            for seq, slots in done:
                seq.unreserve(slots)
            raise

    def _drop(self, slot: int) -> None:
        if self.arena.decref(slot) == 0 and self.index is not None:
            self.index.drop_slot(self.arena, slot)

    def _settle(self) -> None:
        # Bytes are about to be copied on the host: pending writes (and reads) first.
        pending = [x for c in self.layers for x in (c._write, c._read) if x is not None]
        if pending:
            mx.eval(pending)

    def _settle_reads(self) -> None:
        # Pending reads of this sequence's slots run before they are let go.
        pending = [c._read for c in self.layers if c._read is not None]
        if pending:
            mx.eval(pending)

    def release_outside_window(self, next_position: int) -> None:
        """Free blocks no query at ``next_position`` or later can see.

        Keeps ``window`` tokens before ``next_position`` (one more than the
        next query sees), so the window can be handed to mlx-lm's
        RotatingKVCache whole.
        """
        first_needed = next_position - self.window
        dead = [
            i
            for i, slot in enumerate(self.blocks)
            if slot >= 0 and (i + 1) * self.block_tokens <= first_needed
        ]
        if not dead:
            return
        self._settle_reads()
        for i in dead:
            self._drop(self.blocks[i])
            self.blocks[i] = -1
        self._changed()

    def first_live_position(self) -> int:
        for i, slot in enumerate(self.blocks):
            if slot >= 0:
                return i * self.block_tokens
        return len(self.blocks) * self.block_tokens

    def can_trim_to(self, n_tokens: int) -> bool:
        """Whether the sequence still holds what a query at ``n_tokens`` sees."""
        if self.window is None or n_tokens == 0:
            return True
        return self.first_live_position() <= max(0, n_tokens - self.window)

    def truncate(self, n_tokens: int) -> None:
        """Free the blocks past the first ``n_tokens`` positions. A partial
        last block will be written again: it is made private first (copied
        when shared) and forgotten by the index."""
        keep = self.blocks_for(n_tokens)
        if keep < len(self.blocks):
            self._settle_reads()
            for slot in self.blocks[keep:]:
                if slot >= 0:
                    self._drop(slot)
            del self.blocks[keep:]
            self._changed()
        if n_tokens % self.block_tokens and self.blocks and self.blocks[-1] >= 0:
            self._make_private(len(self.blocks) - 1)

    def _make_private(self, b: int) -> None:
        slot = self.blocks[b]
        if self.arena.refcount(slot) > 1:
            self._settle()
            copy = self.arena.alloc()
            for dst, src in zip(self.arena.block_views(copy), self.arena.block_views(slot)):
                dst[...] = src
            self._drop(slot)
            self.blocks[b] = copy
            self._changed()
        elif self.index is not None:
            self.index.drop_slot(self.arena, slot)

    def adopt(self, slot: int) -> None:
        """Append a full block held elsewhere (shared: one more reference)."""
        self.arena.incref(slot)
        self.blocks.append(slot)
        self._changed()

    def replace(self, b: int, slot: int) -> None:
        """Hold ``slot`` (an identical full block held elsewhere) instead of block b's own."""
        if self.blocks[b] == slot:
            return
        self._settle_reads()
        self.arena.incref(slot)
        self._drop(self.blocks[b])
        self.blocks[b] = slot
        self._changed()

    def release(self) -> None:
        """Give every block back to the arena."""
        self._settle_reads()
        for slot in self.blocks:
            if slot >= 0:
                self._drop(slot)
        self.blocks = []
        self._changed()

    def table(self) -> np.ndarray:
        if self._table is None:
            self._table = np.array([self.blocks], dtype=np.int32).reshape(1, len(self.blocks))
        return self._table

    @property
    def slots(self) -> list[int]:
        """The live slots this sequence holds."""
        return [b for b in self.blocks if b >= 0]

    def fork(self, n_tokens: int) -> BlockSequence:
        """A new sequence holding positions [0, n_tokens) of this one: its full
        blocks shared (one more reference each), a partial last block copied
        (written again by whichever side goes on). Settle pending writes first.
        All or nothing: on ArenaFullError nothing is held."""
        out = BlockSequence(self.arena, window=self.window, rotate=self.rotate, offsets=self.offsets)
        out.index = self.index
        keep = self.blocks_for(n_tokens)
        try:
            for b, slot in enumerate(self.blocks[:keep]):
                if slot >= 0 and b == keep - 1 and n_tokens % self.block_tokens:
                    tail = self.arena.alloc()
                    out.blocks.append(tail)
                    for dst, src in zip(self.arena.block_views(tail), self.arena.block_views(slot)):
                        dst[...] = src
                elif slot >= 0:
                    self.arena.incref(slot)
                    out.blocks.append(slot)
                else:
                    out.blocks.append(-1)
        except BaseException:
            out.release()
            raise
        return out


class KVSnapCache:
    """One layer's cache: quantized K/V in arena blocks, attended in place.

    What mlx-lm's model code gets from it:

    - ``update_and_fetch(keys, values)`` writes the new tokens' K/V into the
      blocks and returns them as given: the NEW keys and values only, where
      mlx-lm's ``KVCache`` returns the whole history. The attention call that
      follows (``scaled_dot_product_attention(..., cache=self)``) reads the
      history from the blocks and ignores them. The families kvsnap serves
      (llama/mistral, qwen2, qwen3, gemma3) pass the returned arrays to that
      call and use them for nothing else; ``make_cache`` refuses a model whose
      attention code uses them otherwise (``kvsnap.model_audit``).
    - ``make_mask`` returns what ``KVCache.make_mask`` returns at the same
      offset. The kernel masks by position (and window) itself, so attention
      takes ``None``, ``"causal"`` or an array this cache's layers made for
      the step; any other mask array is refused.
    - ``state`` is what mlx-lm evaluates after each prefill chunk and what its
      ``save_prompt_cache`` writes. Here it finishes the pending writes and
      makes ``save_prompt_cache`` raise (this class: rotated K/V or keys and
      values of different bit widths, which no mlx-lm class holds); the
      subclasses ``QuantizedKVCache`` and ``RotatingKVCache`` give mlx-lm's
      state instead.
    - A layer is copied only with its whole prompt cache (``PromptCache.copy``).
    """

    def __init__(self, seq: BlockSequence, layer: int, window: int | None = None):
        self.seq = seq
        self.layer = layer
        self.window = window
        self.offset = 0
        self.leader = False  # the model's first kvsnap layer reserves for every group
        self._write: mx.array | None = None  # token of the last kv_write
        self._read: mx.array | None = None  # output of the last attention
        seq.layers.append(self)

    # What mlx-lm's quantized path reads: kvsnap caches are quantized caches.
    @property
    def bits(self) -> int:
        return self.seq.arena.bits

    @property
    def group_size(self) -> int:
        return self.seq.arena.group_size

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """Write the new tokens' keys/values [1, n_kv_heads, n_new, head_dim]
        after the ones held; returns them unchanged (not the history)."""
        if keys.ndim != 4 or keys.shape[0] != 1:
            raise InvalidArgumentError(
                f"keys: kvsnap's drop-in cache holds one sequence (batch 1), got shape {keys.shape}; "
                "batched decoding goes through kvsnap's batch API",
                "keys",
            )
        n_new = keys.shape[2]
        if self.window is not None and self.seq.layers[0] is self:
            self.seq.release_outside_window(self.offset)
        if self.leader:
            # Every group's blocks for this step, before any layer writes: an
            # ArenaFullError here leaves the whole cache as it was. Blocks
            # this step writes that are shared (a copy of the cache) are copied.
            self.seq.reserve_all(self.offset + n_new)
            for s in self.seq.siblings:
                s.make_writable(self.offset, self.offset + n_new)
        after = [] if self._read is None else [self._read]
        self._write = write_blocks(self.seq, self.layer, keys, values, self.seq.table(), [self.offset], after=after)
        self.offset += n_new
        return keys, values  # unused by the routed attention, which reads the blocks

    def attend(self, queries: mx.array, *, scale: float, mask) -> mx.array:
        """The model's attention for the queries of the last update."""
        if isinstance(mask, mx.array):
            self._check_mask(mask, queries.shape[2])
        elif mask is not None and not (isinstance(mask, str) and mask == "causal"):
            raise InvalidArgumentError(f"mask: unknown mask {mask!r}", "mask")
        after = [] if self._write is None else [self._write]
        out = attend_blocks(
            self.seq, self.layer, queries, self.seq.table(), [self.offset], scale, self.window, after
        )
        self._read = out
        return out

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None):
        """The mask ``KVCache.make_mask`` makes for ``n`` queries at this offset:
        None, "causal" or a bool array [n, offset + n] (always one with a window)."""
        mask = mlx_cache.create_attention_mask(
            n, offset=self.offset, return_array=return_array, window_size=window_size
        )
        if isinstance(mask, mx.array):
            self.seq.masks[window_size] = (mask, self.offset, n)
        return mask

    def _check_mask(self, mask: mx.array, n: int) -> None:
        """Accept a mask array only if this cache's make_mask made it for this
        step, with this layer's window: it then says what the kernel does."""
        made = [(w, rec) for s in self.seq.siblings for w, rec in s.masks.items() if rec[0] is mask]
        if not made:
            raise InvalidArgumentError(
                "mask: kvsnap caches mask by position (causal, sliding window) in the kernel; "
                "an attention mask array other than the one their make_mask made is not supported",
                "mask",
            )
        window, (_, offset, n_made) = made[0]
        if window != self.window or n_made != n or offset + n != self.offset:
            raise InvalidArgumentError(
                f"mask: made for {n_made} queries at position {offset} with window {window}; this "
                f"layer attends {n} queries at position {self.offset - n} with window {self.window}",
                "mask",
            )

    def merge(self, caches):
        """mlx-lm's batching: one batch cache layer over these per-sequence
        layers (kvsnap.batch; the batch shares their blocks)."""
        from kvsnap.batch import merge_layer  # batch builds on this module

        return merge_layer(caches)

    @property
    def state(self):
        # mx.eval(state) finishes the writes (mlx-lm's generate runs it after
        # each prefill chunk); save_prompt_cache is refused (_NotSavable).
        pending = () if self._write is None else (self._write,)
        return (*pending, _NotSavable(self))

    @state.setter
    def state(self, value):
        _refuse_state()

    @classmethod
    def from_state(cls, state):
        _refuse_state()

    @property
    def meta_state(self):
        return (str(self.offset), str(self.layer), str(self.window or 0))

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = min(self.offset, max(0, int(n)))
        target = self.offset - n
        # Every layer holds the same tokens: refuse before any layer changes.
        stale = [s for s in self.seq.siblings if not s.can_trim_to(target)]
        if stale:
            raise InvalidArgumentError(
                f"n: cannot trim {n} tokens: the sliding-window layers no longer hold the "
                f"{stale[0].window} tokens before position {target} (their blocks left the window); "
                "recompute the sequence from the start instead",
                "n",
            )
        self.offset = target
        self.seq.truncate(max(c.offset for c in self.seq.layers))
        return n

    def size(self) -> int:
        return self.offset

    def empty(self) -> bool:
        return self.offset == 0

    @property
    def nbytes(self) -> int:
        """Bytes of this layer's K/V for the tokens held (quantized, with scales)."""
        a = self.seq.arena
        scales = 2 * 2 * (a.head_dim // a.group_size)  # float16 scale and bias per group
        per_token = a.n_kv_heads * (a.head_dim * (a.key_bits + a.bits) // 8 + 2 * scales)
        return per_token * self.offset

    def __deepcopy__(self, memo):
        raise InvalidArgumentError(
            "cache: a kvsnap layer cache shares its blocks with the other layers of its group; "
            "copy the whole prompt cache: copy.deepcopy(prompt_cache) or prompt_cache.copy()",
            "cache",
        )


class QuantizedKVCache(KVSnapCache):
    """A full-attention layer whose K/V mlx-lm's ``QuantizedKVCache`` can hold as
    stored (not rotated; keys and values of one bit width), named after it.

    ``state`` is that mlx-lm class's state holding this layer's bytes as they
    are, so ``save_prompt_cache`` writes it whole under this name and
    ``load_prompt_cache`` returns mlx-lm's ``QuantizedKVCache``, bit-exact
    (``from_mlx`` makes a kvsnap cache of it again). Reading ``state`` copies
    the layer's K/V out of the arena; mlx-lm's generate does once per prefill
    chunk (benchmarks/RESULTS.md).
    """

    @property
    def state(self):
        return _mlx_layer(self, quantized=True).state

    @state.setter
    def state(self, value):
        _refuse_state()


class RotatingKVCache(KVSnapCache):
    """A sliding-window layer, named after mlx-lm's ``RotatingKVCache``.

    ``state`` is that mlx-lm class's state holding the window, dequantized to
    float32 (and rotated back when stored rotated), so ``load_prompt_cache``
    returns mlx-lm's ``RotatingKVCache`` attending the same keys and values.
    """

    @property
    def state(self):
        return _mlx_layer(self, quantized=True).state

    @state.setter
    def state(self, value):
        _refuse_state()


def _refuse_state():
    raise InvalidArgumentError(
        "state: a kvsnap cache is not rebuilt from a state; mlx-lm's load_prompt_cache returns "
        "mlx-lm caches, which kvsnap.cache.from_mlx(model, caches) turns into a kvsnap cache",
        "state",
    )


class _NotSavable:
    """Stands in the ``state`` of a layer no mlx-lm cache class can hold.

    ``mx.eval`` skips it. mlx-lm's ``save_prompt_cache`` refuses any state entry
    that is not an array or a scalar and formats it into its ValueError, before
    writing anything; formatting this one raises kvsnap's error instead.
    """

    def __init__(self, layer: KVSnapCache):
        a = layer.seq.arena
        if layer.seq.rotate:
            self.reason = "its layers hold keys and values in a Hadamard-rotated basis"
            self.export = "kvsnap.store.export_mlx(cache, path) (rotated back and re-quantized)"
        else:
            self.reason = f"its layers hold {a.key_bits}-bit keys with {a.bits}-bit values"
            self.export = "kvsnap.store.export_mlx(cache, path, quantized=False) (float K/V)"

    def __repr__(self) -> str:
        return f"<kvsnap layer state mlx-lm cannot hold: {self.reason}>"

    def __format__(self, spec: str) -> str:
        raise InvalidArgumentError(
            f"cache: mlx-lm's save_prompt_cache cannot save this kvsnap cache: {self.reason}, "
            "which no mlx-lm cache class holds. Save it with "
            "kvsnap.save(cache, path, tokens=ids, model=model) (bit-exact; kvsnap.load reads it "
            f"back) or write an mlx-lm file with {self.export}; caches made with "
            "make_cache(..., rotate=False) and one bit width save through mlx-lm",
            "cache",
        )


class PromptCache(list):
    """The per-layer caches of one sequence, as mlx-lm expects (a list).

    Adds what kvsnap knows: the block tables, arena bytes used, the layers it
    left to mlx-lm, and the token ids held (kept by ``record_tokens``; mlx-lm
    itself does not pass token ids to caches).
    """

    def __init__(self, layers, sequences: Sequence[BlockSequence], foreign_layers: Sequence[int]):
        super().__init__(layers)
        self.sequences = list(sequences)
        self.foreign_layers = list(foreign_layers)
        self.tokens: list[int] = []
        for s in self.sequences:
            s.siblings = self.sequences
            s.owner = weakref.ref(self)
        leader = next((c for c in layers if isinstance(c, KVSnapCache)), None)
        if leader is not None:
            leader.leader = True

    @property
    def offset(self) -> int:
        return max((c.offset for c in self if isinstance(c, KVSnapCache)), default=0)

    def can_trim_to(self, n_tokens: int) -> bool:
        """Whether trimming to ``n_tokens`` keeps every layer exact (see ``trim``)."""
        return all(s.can_trim_to(n_tokens) for s in self.sequences)

    def reserve(self, n_tokens: int) -> None:
        """Allocate every group's blocks for positions [0, n_tokens), all or nothing."""
        if self.sequences:
            self.sequences[0].reserve_all(n_tokens)

    def record_tokens(self, token_ids: Sequence[int]) -> None:
        """Note token ids that were fed through the model with this cache."""
        self.tokens.extend(int(t) for t in token_ids)

    def trim(self, n: int) -> int:
        """Drop the last ``n`` tokens of every layer; returns how many were dropped.

        On a model with sliding-window layers a trim that reaches before the
        window they still hold raises InvalidArgumentError (nothing changes).
        """
        trimmed = mlx_cache.trim_prompt_cache(self, n)
        if trimmed:
            del self.tokens[max(0, len(self.tokens) - trimmed) :]
        return trimmed

    @property
    def block_tables(self) -> list[list[int]]:
        return [list(s.blocks) for s in self.sequences]

    @property
    def nbytes(self) -> int:
        """Arena bytes held by this cache's blocks."""
        return sum(s.arena.slot_bytes * len(s.slots) for s in self.sequences)

    def _settle(self) -> None:
        """Finish every pending write and read of this cache."""
        pending = [x for c in self if isinstance(c, KVSnapCache) for x in (c._write, c._read) if x is not None]
        if pending:
            mx.eval(pending)

    def copy(self) -> PromptCache:
        """An independent cache holding the same tokens, cheaply: each group's
        full blocks are shared (one more reference) and its partial last block
        is copied, so the copy costs at most one block per layer group. Writes
        to either cache never show in the other: a shared block is never
        written (a trim into one copies it first). Layers left to mlx-lm are
        deep-copied. ``copy.deepcopy(cache)`` does the same.
        """
        self._settle()
        forks = []
        try:
            for s in self.sequences:
                forks.append(s.fork(max((c.offset for c in s.layers), default=0)))
        except BaseException:
            for f in forks:
                f.release()
            raise
        return self.over(forks)

    def over(self, sequences: Sequence[BlockSequence]) -> PromptCache:
        """A cache of the same layers and tokens over other block sequences
        (one per group, in order: forks or shares of this cache's own)."""
        seq_of = {id(s): t for s, t in zip(self.sequences, sequences)}
        layers = []
        for c in self:
            if isinstance(c, KVSnapCache):
                twin = type(c)(seq_of[id(c.seq)], c.layer, window=c.window)
                twin.offset = c.offset
                layers.append(twin)
            else:
                layers.append(copy.deepcopy(c))
        out = PromptCache(layers, list(sequences), self.foreign_layers)
        out.tokens = list(self.tokens)
        return out

    def __deepcopy__(self, memo) -> PromptCache:
        out = self.copy()
        memo[id(self)] = out
        return out

    def release(self) -> None:
        """Return every block to its arena (the cache is empty afterwards)."""
        for s in self.sequences:
            s.release()
        for c in self:
            if isinstance(c, KVSnapCache):
                c.offset = 0
                c._write = c._read = None
        self.tokens = []


def _attention_modules(model) -> list:
    layers = getattr(model, "layers", None)
    if layers is None:
        raise UnsupportedModelError(
            f"{_model_type(model)}: kvsnap cannot find the model's layers (no .layers)"
        )
    return [getattr(layer, "self_attn", None) for layer in layers]


def _model_type(model) -> str:
    args = getattr(model, "args", None)
    return getattr(args, "model_type", None) or type(model).__module__


def _kv_geometry(attn) -> tuple[int, int] | None:
    """(n_kv_heads, head_dim) of an mlx-lm attention module, or None."""
    n_kv = getattr(attn, "n_kv_heads", None)
    if not isinstance(n_kv, int) or n_kv <= 0:
        return None
    head_dim = getattr(attn, "head_dim", None)
    k_proj = getattr(attn, "k_proj", None)
    if not isinstance(head_dim, int) and k_proj is not None:
        head_dim = k_proj.weight.shape[0] // n_kv
    return (n_kv, head_dim) if isinstance(head_dim, int) else None


def layer_kinds(model) -> list[tuple[str, int | None]]:
    """Per layer: ("full", None), ("window", W) or ("foreign", None)."""
    caches = model.make_cache() if hasattr(model, "make_cache") else [mlx_cache.KVCache() for _ in model.layers]
    attn = _attention_modules(model)
    kinds = []
    for i, c in enumerate(caches):
        served = attn[i] is not None and _kv_geometry(attn[i]) is not None
        if type(c) is mlx_cache.KVCache and served:
            kinds.append(("full", None))
        elif type(c) is mlx_cache.RotatingKVCache and c.keep == 0 and served:
            kinds.append(("window", int(c.max_size)))
        else:
            kinds.append(("foreign", None))
    return kinds


def _routed_sdpa(original):
    def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks=None):
        if isinstance(cache, KVSnapCache) or getattr(cache, "kvsnap_batch", False):
            if sinks is not None:
                raise UnsupportedModelError("kvsnap's attention does not support attention sinks")
            return cache.attend(queries, scale=scale, mask=mask)
        return original(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)

    scaled_dot_product_attention.kvsnap_original = original
    return scaled_dot_product_attention


_ROUTED: set[type] = set()  # model classes whose modules are routed (walking a model takes ms)


def route_attention(model) -> None:
    """Send the model's attention calls with kvsnap caches to kvsnap's kernel."""
    if type(model) in _ROUTED:
        return
    modules = {type(m).__module__ for _, m in model.named_modules()} | {type(model).__module__}
    routed = 0
    for name in modules:
        module = sys.modules.get(name)
        fn = getattr(module, "scaled_dot_product_attention", None)
        if fn is None:
            continue
        if not hasattr(fn, "kvsnap_original"):
            if fn is not mlx_base.scaled_dot_product_attention:
                continue  # a model-specific attention kvsnap does not know
            module.scaled_dot_product_attention = _routed_sdpa(fn)
        routed += 1
    if not routed:
        raise UnsupportedModelError(
            f"{_model_type(model)}: the model's attention does not call mlx-lm's "
            "scaled_dot_product_attention, so kvsnap cannot serve its cache"
        )
    _ROUTED.add(type(model))


def make_cache(
    model,
    *,
    bits: int = 4,
    group_size: int = 64,
    block_tokens: int = 256,
    arena: Arena | None = None,
    window_arena: Arena | None = None,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
    budget: Budget | None = None,
    rotate: bool | None = None,
    key_bits: int | None = None,
    key_offsets: bool | KeyOffsets | None = None,
    tokenizer=None,
    quality: str | None = None,
) -> PromptCache:
    """A kvsnap prompt cache for ``model`` (an mlx-lm model), one entry per layer.

    Full-attention layers store their blocks in ``arena``, sliding-window
    layers (Gemma 3) in ``window_arena``; arenas not given are created,
    sharing ``budget`` (a ``kvsnap.Budget``; by default one of
    ``budget_bytes``), so both groups count against one budget. A given arena
    must match the model's geometry and the quantization.

    ``rotate``: store K/V in a Hadamard-rotated basis (same attention, much
    smaller quantization error). None: on when head_dim is a power of two.
    Rotated caches convert to mlx-lm's quantized caches only by re-quantizing.

    ``key_bits``: bits of the keys (4, 6 or 8) when they differ from ``bits``
    (the values'). Keys carry the outlier channels: 6-bit keys with 4-bit
    values cost 5.5 bits per element at g64 and keep perplexity within 1% of
    float on the built-in models where 4-bit keys do not
    (benchmarks/RESULTS.md). The integer kernels widen 6-bit codes to bytes
    as they load them (about the speed of 8-bit keys).

    ``key_offsets``: remove the model's key offsets (and balance its key
    channels) before quantizing (kvsnap.offsets: calibrated once per model
    and cached; attention is unchanged, 4-bit keys lose much less). False:
    store keys as they are. None (default): on, except with rotate=False
    (mlx-lm's own layout). A ``KeyOffsets`` is used as given.

    ``quality``: "default" (4-bit keys and values, 4.5 bits per element) or
    "accurate" (6-bit keys, 5.5 bits per element: within 1% of float
    perplexity on the built-in models, benchmarks/RESULTS.md); it sets
    ``key_bits`` when that is not given. ``tokenizer``: calibrate on kvsnap's
    built-in text with it (kvsnap.models.load registers its tokenizer);
    without one, on a fixed pseudo-random token sequence.
    """
    if quality not in (None, "default", "accurate"):
        raise InvalidArgumentError(f"quality: 'default' or 'accurate', got {quality!r}", "quality")
    if key_bits is None and quality == "accurate":
        key_bits = ACCURATE_KEY_BITS
    key_bits = bits if key_bits is None else key_bits
    if key_offsets is None:
        key_offsets = rotate is not False
    kinds = layer_kinds(model)
    attn = _attention_modules(model)
    route_attention(model)
    model_audit.check_history_unused(model, [attn[i] for i, (k, _) in enumerate(kinds) if k != "foreign"])

    def geometry(indices):
        shapes = {_kv_geometry(attn[i]) for i in indices}
        if len(shapes) != 1:
            raise UnsupportedModelError(
                f"{_model_type(model)}: layers differ in KV heads / head_dim {sorted(shapes)}; "
                "kvsnap's arena needs one geometry per layer group"
            )
        return shapes.pop()

    def rotation(head_dim):
        if rotate is None:
            return can_rotate(head_dim)
        if rotate and not can_rotate(head_dim):
            raise InvalidArgumentError(
                f"rotate: head_dim {head_dim} is not a power of two; use rotate=False", "rotate"
            )
        return bool(rotate)

    if budget is None and (arena is None or window_arena is None):
        shared = arena or window_arena
        budget = shared.budget if shared is not None else Budget(budget_bytes)

    def new_arena(n_layers, n_kv_heads, head_dim):
        return Arena(
            n_layers, n_kv_heads, head_dim, block_tokens=block_tokens, bits=bits,
            group_size=group_size, budget=budget, key_bits=key_bits,
        )

    full = [i for i, (k, _) in enumerate(kinds) if k == "full"]
    windowed = [i for i, (k, _) in enumerate(kinds) if k == "window"]
    foreign = [i for i, (k, _) in enumerate(kinds) if k == "foreign"]
    if isinstance(key_offsets, KeyOffsets):
        model_offsets = key_offsets
    elif key_offsets is True:
        model_offsets = offsets_for_model(model, attn, sorted(full + windowed), tokenizer)
    elif key_offsets is False or key_offsets is None:
        model_offsets = None
    else:
        raise InvalidArgumentError(
            f"key_offsets: True, False or a kvsnap.offsets.KeyOffsets, got {key_offsets!r}", "key_offsets"
        )
    layers: list = [None] * len(kinds)
    sequences = []

    if full:
        n_kv_heads, head_dim = geometry(full)
        if arena is None:
            arena = new_arena(len(full), n_kv_heads, head_dim)
        else:
            _check_arena(arena, len(full), n_kv_heads, head_dim, bits, key_bits, group_size)
        seq = BlockSequence(
            arena, rotate=rotation(head_dim), offsets=model_offsets and model_offsets.group(full)
        )
        sequences.append(seq)
        # Layers mlx-lm's QuantizedKVCache can hold are saved by mlx-lm as one.
        layer_cls = KVSnapCache if seq.rotate or key_bits != bits or seq.offsets else QuantizedKVCache
        for j, i in enumerate(full):
            layers[i] = layer_cls(seq, j)
    if windowed:
        windows = {kinds[i][1] for i in windowed}
        if len(windows) != 1:
            raise UnsupportedModelError(f"{_model_type(model)}: several sliding windows {sorted(windows)}")
        window = windows.pop()
        n_kv_heads, head_dim = geometry(windowed)
        if window_arena is None:
            window_arena = new_arena(len(windowed), n_kv_heads, head_dim)
        else:
            _check_arena(window_arena, len(windowed), n_kv_heads, head_dim, bits, key_bits, group_size)
        seq = BlockSequence(
            window_arena, window=window, rotate=rotation(head_dim),
            offsets=model_offsets and model_offsets.group(windowed),
        )
        sequences.append(seq)
        for j, i in enumerate(windowed):
            layers[i] = RotatingKVCache(seq, j, window=window)
    if foreign:
        mlx_caches = model.make_cache() if hasattr(model, "make_cache") else None
        for i in foreign:
            layers[i] = mlx_caches[i] if mlx_caches is not None else mlx_cache.KVCache()
    return PromptCache(layers, sequences, foreign)


def _check_arena(
    arena: Arena, n_layers: int, n_kv_heads: int, head_dim: int, bits: int, key_bits: int, group_size: int
):
    want = {
        "n_layers": n_layers, "n_kv_heads": n_kv_heads, "head_dim": head_dim, "bits": bits,
        "key_bits": key_bits, "group_size": group_size,
    }
    got = {k: getattr(arena, k) for k in want}
    if got != want:
        bad = ", ".join(f"{k}={got[k]} (model needs {want[k]})" for k in want if got[k] != want[k])
        raise InvalidArgumentError(f"arena: does not fit this model: {bad}", "arena")


def _layer_arrays(seq: BlockSequence, layer: int, start: int, stop: int):
    """The six arrays of one layer for positions [start, stop), [1, H, T, ...]."""
    bt = seq.block_tokens
    parts: list[list] = [[] for _ in range(6)]
    for blk in range(start // bt, -(-stop // bt)):
        slot = seq.blocks[blk]
        arrays = seq.arena.read_block(slot, layer)
        lo = max(start, blk * bt) - blk * bt
        hi = min(stop, (blk + 1) * bt) - blk * bt
        for i in range(6):
            parts[i].append(arrays[i][:, lo:hi])
    out = []
    for i in range(6):
        x = np.concatenate(parts[i], axis=1)[None]
        out.append(mx.array(x) if i % 3 == 0 else mx.array(x.view(np.float16)))
    return out


def to_mlx(prompt_cache: PromptCache, *, quantized: bool = True) -> list:
    """mlx-lm caches holding the same tokens as ``prompt_cache``.

    Full-attention layers become ``QuantizedKVCache`` (the stored bytes as they
    are: packed data and float16 scales, bit-exact; a rotated cache is
    rotated back and re-quantized) or, with ``quantized=False``, float32
    ``KVCache``. Sliding-window layers become
    float32 ``RotatingKVCache`` holding the window. Layers kvsnap left to mlx-lm
    are returned as they are.
    """
    prompt_cache._settle()
    if quantized and any(s.arena.key_bits != s.arena.bits for s in prompt_cache.sequences):
        raise InvalidArgumentError(
            "quantized: mlx-lm's QuantizedKVCache has one bit width for keys and values; "
            "this cache's differ: use quantized=False",
            "quantized",
        )
    return [_mlx_layer(c, quantized) if isinstance(c, KVSnapCache) else c for c in prompt_cache]


def _mlx_layer(c: KVSnapCache, quantized: bool):
    """The mlx-lm cache holding what layer ``c`` holds (see ``to_mlx``)."""
    if c._write is not None:
        mx.eval(c._write)  # the layer's writes, each ordered after the one before
    seq, a = c.seq, c.seq.arena
    if c.offset == 0:
        if c.window is not None:
            return mlx_cache.RotatingKVCache(max_size=c.window)
        return mlx_cache.QuantizedKVCache(a.group_size, a.bits) if quantized else mlx_cache.KVCache()
    start = 0 if c.window is None else max(0, c.offset - c.window)
    kp, ks, kb, vp, vs, vb = _layer_arrays(seq, c.layer, start, c.offset)
    if c.window is None and quantized and not seq.rotate and seq.offsets is None:
        q = mlx_cache.QuantizedKVCache(group_size=a.group_size, bits=a.bits)
        q.keys, q.values, q.offset = (kp, ks, kb), (vp, vs, vb), c.offset
        return q
    keys = mx.dequantize(kp, ks.astype(mx.float32), kb.astype(mx.float32), group_size=a.group_size, bits=a.key_bits)
    values = mx.dequantize(vp, vs.astype(mx.float32), vb.astype(mx.float32), group_size=a.group_size, bits=a.bits)
    if seq.rotate:
        keys, values = hadamard(keys), hadamard(values)
    if seq.offsets is not None:
        lo = seq.offsets.layers[c.layer]
        keys = keys if lo.scale is None else keys * lo.scale[None, :, None, :]
        keys = keys + lo.shift(mx.arange(start, c.offset)[None], c.offset)
    if c.window is None and quantized:
        q = mlx_cache.QuantizedKVCache(group_size=a.group_size, bits=a.bits)
        q.keys = mx.quantize(keys, group_size=a.group_size, bits=a.bits)
        q.values = mx.quantize(values, group_size=a.group_size, bits=a.bits)
        q.offset = c.offset
        return q
    if c.window is None:
        f = mlx_cache.KVCache()
        f.state = (keys, values, c.offset)
        return f
    r = mlx_cache.RotatingKVCache(max_size=c.window)
    r.state = (keys, values, c.offset, 0, c.window, keys.shape[2])
    return r


def from_mlx(
    model,
    caches: Sequence,
    *,
    block_tokens: int = 256,
    bits: int | None = None,
    group_size: int | None = None,
    arena: Arena | None = None,
    rotate: bool | None = None,
    key_offsets: bool | None = None,
    key_bits: int | None = None,
) -> PromptCache:
    """A kvsnap prompt cache holding what mlx-lm caches ``caches`` hold.

    ``QuantizedKVCache`` layers are copied as stored (packed data bit-exact;
    scales and biases rounded to float16, exact when they already were);
    bits and group size are taken from them. Float ``KVCache`` layers are
    quantized on the way in. ``RotatingKVCache`` layers fill the sliding-window
    layers with the window they hold. ``rotate`` as in ``make_cache``, except
    that it defaults to off when copying quantized caches (to stay bit-exact);
    so does ``key_offsets``. ``key_bits`` as in ``make_cache`` (quantized
    caches are re-quantized when their keys' bits differ).
    """
    if len(caches) != len(model.layers):
        raise InvalidArgumentError(
            f"caches: {len(caches)} layer caches for a model of {len(model.layers)} layers", "caches"
        )
    quantized = [c for c in caches if isinstance(c, mlx_cache.QuantizedKVCache)]
    if quantized:
        formats = {(c.bits, c.group_size) for c in quantized}
        if len(formats) != 1:
            raise InvalidArgumentError(f"caches: mixed quantization formats {sorted(formats)}", "caches")
        q_bits, q_group = formats.pop()
        if (bits or q_bits) != q_bits or (group_size or q_group) != q_group:
            raise InvalidArgumentError(
                f"bits/group_size: the caches hold {q_bits}-bit groups of {q_group}; "
                "converting between quantization formats is not supported",
                "bits",
            )
        bits, group_size = q_bits, q_group
        rotate = False if rotate is None else rotate
        key_offsets = False if key_offsets is None else key_offsets
    out = make_cache(
        model, bits=bits or 4, group_size=group_size or 64, block_tokens=block_tokens, arena=arena,
        rotate=rotate, key_offsets=True if key_offsets is None else key_offsets, key_bits=key_bits,
    )
    for i, (src, dst) in enumerate(zip(caches, out)):
        if not isinstance(dst, KVSnapCache):
            out[i] = src
            continue
        if src.empty() if hasattr(src, "empty") else src.offset == 0:
            continue
        exact = not dst.seq.rotate and not dst.seq.offsets and dst.seq.arena.key_bits == dst.seq.arena.bits
        if isinstance(src, mlx_cache.QuantizedKVCache) and exact:
            _copy_quantized(dst, src)
        elif isinstance(src, mlx_cache.QuantizedKVCache):
            n = src.offset
            k, v = (mx.dequantize(*(x[..., :n, :] for x in t), group_size=src.group_size, bits=src.bits)
                    for t in (src.keys, src.values))
            dst.update_and_fetch(k, v)
        elif isinstance(src, mlx_cache.RotatingKVCache) and dst.window is not None:
            n = min(src.offset, src.max_size)
            keys = src._temporal_order(src.keys)[..., -n:, :]  # oldest to newest
            values = src._temporal_order(src.values)[..., -n:, :]
            dst.offset = src.offset - n
            dst.seq.blocks.extend([-1] * (dst.offset // dst.seq.block_tokens - len(dst.seq.blocks)))
            dst.update_and_fetch(keys, values)
        elif type(src) is mlx_cache.KVCache and dst.window is None:
            n = src.offset
            dst.update_and_fetch(src.keys[..., :n, :], src.values[..., :n, :])
        else:
            raise InvalidArgumentError(
                f"caches: layer {i} holds a {type(src).__name__}, which does not fit a "
                f"{'sliding-window' if dst.window else 'full-attention'} kvsnap layer",
                "caches",
            )
    out._settle()
    return out


def _copy_quantized(dst: KVSnapCache, src) -> None:
    """Write a QuantizedKVCache's stored rows into dst's blocks, as they are."""
    seq = dst.seq
    n = src.offset
    seq.reserve(n)
    arrays = [np.array(x[0, :, :n]) for x in (*src.keys, *src.values)]
    for i in (1, 2, 4, 5):
        arrays[i] = arrays[i].astype(np.float16)
    bt = seq.block_tokens
    for blk in range(-(-n // bt)):
        lo, hi = blk * bt, min(n, (blk + 1) * bt)
        block = list(seq.arena.read_block(seq.blocks[blk], dst.layer))
        for i in range(6):
            part = arrays[i][:, lo:hi]
            block[i][:, : hi - lo] = part.view(np.uint16) if i % 3 else part
        seq.arena.write_block(seq.blocks[blk], dst.layer, block)
    dst.offset = n
