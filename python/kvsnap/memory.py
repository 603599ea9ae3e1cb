"""AgentMemory: many agents' KV caches in one memory budget, on disk when
they do not fit, and reused across the phases of a conversation.

    memory = kvsnap.AgentMemory(model, tokenizer, budget="512MB")
    reply = memory.generate("planner", messages, max_tokens=200)
    reply.text, reply.usage.cached_tokens, reply.source

One arena budget (``kvsnap.Budget``) holds every agent's blocks, full-attention
and sliding-window layers alike. A request for an agent:

1. renders its prompt to token ids and matches them against the tokens the
   agent holds (its earlier prompts AND replies: a reply sent back verbatim is
   spliced back as the ids that were generated, see ``_prompt_ids``);
2. is admitted: the bytes it may need by its last token are reserved up
   front, evicting idle agents least recently used first (an admitted
   request never waits for memory again, so requests cannot deadlock);
3. wakes the agent from the store if it sleeps on disk, sharing full blocks
   that are already resident (same content hash) instead of reading them;
4. trims the cache to the common prefix, shares resident blocks for the new
   tokens where it can, prefills only the rest, in chunks that end on block
   boundaries (so a block's bytes depend only on its tokens), and decodes;
5. registers its full blocks in the resident index (an identical block held
   by another agent is shared, its own copy freed) and persists the new
   blocks and manifest to the store: eviction later only frees memory.
   The save happens before the Reply is handed out, so a turn whose Reply
   was received is on disk. If the save fails (a full disk, an I/O error),
   the request raises that error instead of yielding the Reply (the Reply
   rides on the exception as ``e.reply``); the turn is not lost: the agent
   keeps it in memory, stays resident (eviction skips an agent it cannot
   save) and is saved by its next turn, ``evict`` or ``close``. The store
   still holds the previous turn. ``stats()["save_errors"]`` counts these.

Each agent serves one request at a time; requests for different agents, from
any threads, are queued to one model thread (kvsnap.scheduler) that decodes
the agents generating at the same time together, in one ragged batch, and
interleaves arriving prompts' prefill chunks with the batch's steps. Waking an
agent from disk and saving it happen in the request's own thread, off the
step loop.
"""

from __future__ import annotations

import ctypes
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from kvsnap import models
from kvsnap._ext import Arena, Budget
from kvsnap.cache import PromptCache, layer_kinds, make_cache, route_attention
from kvsnap.errors import (
    AgentBusyError,
    AgentNotFoundError,
    BudgetExceededError,
    InvalidArgumentError,
    KvsnapError,
)
from kvsnap.scheduler import DONE, Request, Sampler, Scheduler
from kvsnap.store import GroupFormat, Store, _open_single_file, block_hashes, check_agent_id

SOURCES = ("hot", "disk", "shared", "none")
EPHEMERAL_KEPT = 4  # stateless requests' caches kept resident for sharing
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(value: int | str, name: str = "budget") -> int:
    """Bytes from an int or a string like "512MB", "1.5GiB", "1gb"."""
    if isinstance(value, bool):
        raise InvalidArgumentError(f"{name}: expected bytes or a size like '1GB', got {value!r}", name)
    if isinstance(value, (int, np.integer)):
        n = int(value)
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", value)
        unit = m.group(2).upper() if m else None
        if not m or unit not in _UNITS:
            raise InvalidArgumentError(
                f"{name}: {value!r} is not a size: use bytes or a number with KB, MB, GB, KiB, MiB or GiB",
                name,
            )
        n = int(float(m.group(1)) * _UNITS[unit])
    else:
        raise InvalidArgumentError(f"{name}: expected bytes or a size like '1GB', got {type(value).__name__}", name)
    if n <= 0:
        raise InvalidArgumentError(f"{name}: must be positive, got {value!r}", name)
    return n


@dataclass
class Usage:
    prompt_tokens: int  # tokens of the request's prompt
    cached_tokens: int  # prompt tokens not computed (reused from memory, disk or shared blocks)
    computed_tokens: int  # prompt tokens prefilled by this request
    completion_tokens: int = 0


@dataclass
class Timings:
    ttft_s: float  # request start to first token (admission, restore and prefill included)
    prefill_s: float
    decode_tokens_per_s: float
    restore_s: float = 0.0


@dataclass
class Reply:
    agent_id: str
    text: str
    tokens: list[int]  # generated token ids (an end-of-turn token included)
    finish_reason: str  # "stop" (end of turn or a stop string) or "length"
    usage: Usage
    source: str  # where the reused tokens came from: hot, disk, shared or none
    timings: Timings


@dataclass
class AgentInfo:
    agent_id: str
    resident: bool
    on_disk: bool
    n_tokens: int  # tokens whose K/V the agent holds (resident or on disk)
    resident_bytes: int  # arena bytes of its blocks (shared blocks counted whole)
    last_used: float | None  # time.time() of its last request in this process
    busy: bool


@dataclass
class _Agent:
    agent_id: str
    cache: PromptCache | None = None  # resident K/V, or None when only on disk
    history: list[int] = field(default_factory=list)  # every id seen: prompts and replies
    last_used: float = 0.0
    busy: bool = False
    dirty: bool = False  # resident state the store does not have yet
    target_bytes: int = 0  # admitted request: bytes it may hold by its end
    ephemeral: bool = False  # a request without an agent id: never persisted

    @property
    def resident(self) -> bool:
        return self.cache is not None

    def held_bytes(self) -> int:
        return 0 if self.cache is None else self.cache.nbytes


class _ResidentIndex:
    """Full-block content hash -> arena slot, for blocks some resident agent holds.

    Holds no reference: a slot leaves the index when its last holder lets go
    (or rewrites it), through ``BlockSequence.index``.
    """

    def __init__(self):
        self.slot_of: dict[str, int] = {}
        self.hash_of: dict[int, str] = {}

    def get(self, h: str) -> int | None:
        return self.slot_of.get(h)

    def add(self, h: str, slot: int) -> None:
        if h not in self.slot_of and slot not in self.hash_of:
            self.slot_of[h] = slot
            self.hash_of[slot] = h

    def drop_slot(self, arena: Arena, slot: int) -> None:
        h = self.hash_of.pop(slot, None)
        if h is not None:
            del self.slot_of[h]


class AgentMemory:
    """Persistent 4-bit KV memory for many agents of one model (see the module doc)."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        path: str | os.PathLike | None = None,
        budget: int | str = "1GB",
        bits: int = 4,
        group_size: int = 64,
        key_bits: int | None = None,
        block_tokens: int = 256,
        rotate: bool | None = None,
        key_offsets: bool | None = None,
        quality: str | None = None,
        prefill_chunk: int | None = None,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.prefill_chunk = block_tokens if prefill_chunk is None else prefill_chunk
        if (isinstance(self.prefill_chunk, bool) or not isinstance(self.prefill_chunk, int)
                or self.prefill_chunk <= 0 or block_tokens % self.prefill_chunk):
            raise InvalidArgumentError(
                f"prefill_chunk: must divide block_tokens ({block_tokens}) so chunks end on block "
                f"boundaries, got {prefill_chunk!r}",
                "prefill_chunk",
            )
        self.budget = Budget(parse_bytes(budget))
        route_attention(model)
        self._format = {"bits": bits, "group_size": group_size, "key_bits": key_bits,
                        "block_tokens": block_tokens, "rotate": rotate, "key_offsets": key_offsets, "quality": quality,
                        "tokenizer": tokenizer}
        # One empty cache makes the arenas (and checks the format against the model).
        probe = make_cache(model, budget=self.budget, **self._format)
        self.arena = probe.sequences[0].arena if probe.sequences and probe.sequences[0].window is None else None
        self.window_arena = next((s.arena for s in probe.sequences if s.window is not None), None)
        self.window = next((s.window for s in probe.sequences if s.window is not None), None)
        self._full_format = next(
            (GroupFormat.of(probe, s) for s in probe.sequences if s.window is None), None
        )
        self.store = Store(Path(path).expanduser() if path is not None else models.kvsnap_home() / "agents")
        self.model_fingerprint = models.model_fingerprint(model)
        self.context_length = _context_length(model)
        self.eos_ids = set(getattr(tokenizer, "eos_token_ids", None) or [])
        self._index = _ResidentIndex()
        self._agents: dict[str, _Agent] = {}
        self._lock = threading.RLock()  # agents, index, admission
        self._changed = threading.Condition(self._lock)
        self._scheduler = Scheduler(model, chunk_tokens=self.prefill_chunk, reserve=self._reserve)
        self._hits = dict.fromkeys(SOURCES, 0)
        self._computed = self._reused = 0
        self._evictions = self._restores = self._save_errors = 0
        self._ephemeral_count = 0
        if any(k == "foreign" for k, _ in layer_kinds(model)):
            raise InvalidArgumentError(
                "model: some layers keep mlx-lm caches kvsnap cannot persist; AgentMemory needs "
                "every layer served by kvsnap",
                "model",
            )

    # ------------------------------------------------------------------ requests

    def generate(self, agent_id: str | None, prompt, *, max_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, stop=None, wait: bool = True) -> Reply:
        """Continue agent ``agent_id`` with ``prompt`` and return its reply.

        ``prompt``: a list of chat messages (the tokenizer's chat template is
        applied), a string, or token ids: the WHOLE conversation so far; what
        the agent already holds is reused, only the new suffix is computed.
        ``agent_id=None``: a stateless request. Nothing is persisted; it reuses
        full blocks resident agents (and recent stateless requests) hold.
        ``wait=False``: raise AgentBusyError instead of waiting while the
        agent serves another request.
        """
        reply = None
        for piece in self.stream(agent_id, prompt, max_tokens=max_tokens, temperature=temperature,
                                 top_p=top_p, seed=seed, stop=stop, wait=wait):
            if isinstance(piece, Reply):
                reply = piece
        return reply

    def stream(self, agent_id: str | None, prompt, *, max_tokens: int, temperature: float = 0.0,
               top_p: float = 1.0, seed: int | None = None, stop=None, wait: bool = True,
               on_start: Callable[[str, Usage], None] | None = None) -> Iterator[str | Reply]:
        """As ``generate``, yielding text pieces as they are decoded, then the Reply.

        ``on_start(source, usage)``: called once the request is admitted and
        its reuse is known (before its prefill), with the source of the
        reused tokens and the prompt's usage (no completion tokens yet)."""
        if agent_id is not None:
            check_agent_id(agent_id)
        stops = _check_sampling(max_tokens, temperature, top_p, seed, stop)
        t0 = time.perf_counter()
        agent = self._acquire_ephemeral() if agent_id is None else self._acquire(agent_id, wait)
        try:
            yield from self._serve(agent, prompt, max_tokens, temperature, top_p, seed, stops, t0, on_start)
        finally:
            self._release(agent)

    def _serve(self, agent: _Agent, prompt, max_tokens, temperature, top_p, seed, stops, t0, on_start=None):
        if agent.resident or agent.history or agent.ephemeral:
            history = agent.history
        else:
            history = self._disk_tokens(agent.agent_id)
        ids = self._prompt_ids(prompt, history)
        if len(ids) >= self.context_length:
            raise InvalidArgumentError(
                f"prompt: {len(ids)} tokens do not fit the model's context of {self.context_length}",
                "prompt",
            )
        max_tokens = min(max_tokens, self.context_length - len(ids))
        final = len(ids) + max_tokens
        self._admit(agent, final)
        agent.last_used = time.time()
        source, restore_s = "hot" if agent.resident else "none", 0.0
        if not agent.resident and not agent.ephemeral and self._on_disk(agent.agent_id):
            t = time.perf_counter()
            self._restore(agent)
            restore_s, source = time.perf_counter() - t, "disk"
        cache = agent.cache if agent.resident else self._new_cache(agent)
        reused = self._reuse(agent, ids)
        if reused == 0:
            source = "none"
        adopted = self._adopt_shared(cache, ids)
        if adopted and reused == 0:
            source = "shared"
        reused = max(reused, adopted)
        computed = len(ids) - reused
        with self._lock:
            self._hits[source] += 1
            self._computed += computed
            self._reused += reused
        if on_start is not None:
            on_start(source, Usage(len(ids), reused, computed, 0))

        request = Request(cache, ids, max_tokens=max_tokens, sampler=Sampler(temperature, top_p, seed),
                          stops=stops, eos_ids=self.eos_ids, tokenizer=self.tokenizer)
        self._scheduler.submit(request)
        try:
            while (event := request.events.get()) is not DONE:
                if isinstance(event, BaseException):
                    self._drop_memory(agent)  # a forward pass failed: the disk has the last turn
                    raise event
                yield event
        finally:
            if event is not DONE and not isinstance(event, BaseException):
                # The caller stopped reading: end the request, keep what it computed.
                request.cancelled = True
                while (event := request.events.get()) is not DONE and not isinstance(event, BaseException):
                    pass
            # What the cache holds stays known: the prompt and the reply so
            # far (the last sampled token has no K/V yet).
            agent.history = list(ids) + request.generated
            agent.dirty = agent.resident
        if rest := request.unsent():
            yield rest
        t_first = request.t_first or time.perf_counter()
        decode_s = time.perf_counter() - t_first
        n = len(request.generated)
        reply = Reply(
            agent_id=agent.agent_id,
            text=request.text(),
            tokens=list(request.generated),
            finish_reason=request.finish or "length",
            usage=Usage(len(ids), reused, computed, n),
            source=source,
            timings=Timings(
                ttft_s=t_first - t0,
                prefill_s=t_first - (request.t_prefill or t_first),
                decode_tokens_per_s=(n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
                restore_s=restore_s,
            ),
        )
        try:
            self._finish_turn(agent)
        except (KvsnapError, OSError) as e:
            # Not on disk: the agent keeps the turn in memory (dirty) and saves it later.
            with self._lock:
                self._save_errors += 1
                agent.dirty = agent.resident
            e.reply = reply
            raise
        yield reply

    # ------------------------------------------------------------- prompt ids

    def _prompt_ids(self, prompt, history: list[int]) -> list[int]:
        """The request's token ids. Text that extends what the agent holds
        (its prompts and replies, decoded) keeps the agent's own ids for that
        part, so a reply sent back verbatim is never re-tokenized differently."""
        if isinstance(prompt, str):
            text, special = prompt, True
        elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
            text, special = render_chat(self.tokenizer, prompt), False
        elif isinstance(prompt, (list, tuple, np.ndarray, mx.array)):
            ids = np.asarray(prompt.tolist() if isinstance(prompt, mx.array) else prompt)
            if ids.ndim != 1 or ids.size == 0 or ids.dtype.kind not in "iu":
                raise InvalidArgumentError(
                    "prompt: must be chat messages (dicts with role and content), a string, "
                    "or a non-empty 1-D sequence of token ids",
                    "prompt",
                )
            vocab = _vocab_size(self.model)
            if ids.min() < 0 or ids.max() >= vocab:
                raise InvalidArgumentError(f"prompt: token ids must lie in [0, {vocab})", "prompt")
            return [int(t) for t in ids]
        else:
            raise InvalidArgumentError(
                f"prompt: must be chat messages, a string or token ids, got {type(prompt).__name__}",
                "prompt",
            )
        if not text:
            raise InvalidArgumentError("prompt: is empty", "prompt")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate (JSON allows "\ud800"); the tokenizer cannot take it
            raise InvalidArgumentError(
                f"prompt: is not valid Unicode text ({e.reason} at character {e.start})", "prompt"
            ) from None
        if history:
            known = self.tokenizer.decode(history, skip_special_tokens=False)
            if known and text.startswith(known) and "\ufffd" not in known[-1:]:
                rest = text[len(known):]
                return list(history) + (self.tokenizer.encode(rest, add_special_tokens=False) if rest else [])
        ids = self.tokenizer.encode(text, add_special_tokens=special)
        if not ids:
            raise InvalidArgumentError("prompt: tokenizes to no tokens", "prompt")
        return list(ids)

    # ------------------------------------------------------- agents and budget

    def _acquire(self, agent_id: str, wait: bool) -> _Agent:
        with self._lock:
            agent = self._agents.get(agent_id)
            if agent is None:
                agent = self._agents[agent_id] = _Agent(agent_id)
            while agent.busy:
                if not wait:
                    raise AgentBusyError(f"agent {agent_id!r} is serving another request", agent_id)
                self._changed.wait()
                agent = self._agents.setdefault(agent_id, agent)
            agent.busy = True
            return agent

    def _acquire_ephemeral(self) -> _Agent:
        with self._lock:
            self._ephemeral_count += 1
            agent_id = f"~stateless-{self._ephemeral_count}"  # '~' is not allowed in agent ids
            agent = self._agents[agent_id] = _Agent(agent_id, busy=True, ephemeral=True)
            return agent

    def _release(self, agent: _Agent) -> None:
        with self._lock:
            agent.busy = False
            agent.target_bytes = 0
            if agent.ephemeral:
                # Kept resident (evictable, never saved) so that later stateless
                # requests can share its full blocks; only the newest few.
                kept = [a for a in self._agents.values() if a.ephemeral and not a.busy and a.resident]
                for old in sorted(kept, key=lambda a: a.last_used)[: max(0, len(kept) - EPHEMERAL_KEPT)]:
                    self._evict(old)
                if not agent.resident:
                    self._agents.pop(agent.agent_id, None)
            elif not agent.resident and not agent.history and not self._on_disk(agent.agent_id):
                self._agents.pop(agent.agent_id, None)  # a request that failed before any state
            self._changed.notify_all()

    def _need_bytes(self, n_tokens: int) -> int:
        """Arena bytes an agent holding n_tokens needs at most (both groups,
        plus one block for copying a shared partial block)."""
        need = 0
        if self.arena is not None:
            bt = self.arena.block_tokens
            need += (-(-n_tokens // bt) + 1) * self.arena.slot_bytes
        if self.window_arena is not None:
            bt = self.window_arena.block_tokens
            live = min(-(-n_tokens // bt), -(-(self.window + bt) // bt) + 1)
            need += live * self.window_arena.slot_bytes
        return need

    def _outstanding(self) -> int:
        return sum(max(0, a.target_bytes - a.held_bytes()) for a in self._agents.values() if a.busy)

    def _admit(self, agent: _Agent, final_tokens: int) -> None:
        """Reserve what the request may allocate by its last token, evicting
        idle agents (least recently used first); raise if it cannot fit even alone."""
        need = self._need_bytes(final_tokens)
        if need > self.budget.limit:
            raise BudgetExceededError(
                f"agent {agent.agent_id!r}: a request of {final_tokens} tokens (prompt + max_tokens) needs "
                f"up to {need} bytes of KV blocks; the budget is {self.budget.limit} bytes: raise the "
                "budget or lower max_tokens",
                need=need, budget=self.budget.limit,
            )
        unsaved: set[str] = set()  # idle agents whose save failed: kept resident
        with self._lock:
            while True:
                extra = max(0, need - agent.held_bytes())
                if self.budget.used + self._outstanding() + extra <= self.budget.limit:
                    agent.target_bytes = need
                    return
                victim = self._lru_idle(exclude=agent, skip=unsaved)
                if victim is not None:
                    try:
                        self._evict(victim)
                    except (KvsnapError, OSError) as e:
                        self._save_errors += 1
                        unsaved.add(victim.agent_id)
                        save_error = e
                    continue
                if any(a.busy and a is not agent for a in self._agents.values()):
                    self._changed.wait()  # an admitted request always finishes
                    continue
                if unsaved:
                    raise save_error  # memory is held by agents the store cannot take now
                raise BudgetExceededError(
                    f"agent {agent.agent_id!r}: needs {extra} more bytes of KV blocks but only "
                    f"{self.budget.limit - self.budget.used} of the {self.budget.limit}-byte budget are free "
                    "and no idle agent is left to evict",
                    need=need, budget=self.budget.limit,
                )

    def _lru_idle(self, exclude: _Agent, skip: set[str] = frozenset()) -> _Agent | None:
        idle = [a for a in self._agents.values()
                if a.resident and not a.busy and a is not exclude and a.agent_id not in skip]
        # Stateless requests' caches go first: they are not saved, only kept for sharing.
        return min(idle, key=lambda a: (not a.ephemeral, a.last_used), default=None)

    def _evict(self, agent: _Agent) -> None:
        """Free an idle agent's memory (its state is on disk already)."""
        if agent.dirty and not agent.ephemeral:
            self._persist(agent)
        agent.cache.release()
        agent.cache = None
        if agent.ephemeral:
            self._agents.pop(agent.agent_id, None)
        self._evictions += 1
        _trim_heap()

    def _new_cache(self, agent: _Agent) -> PromptCache:
        cache = make_cache(self.model, arena=self.arena, window_arena=self.window_arena, **self._format)
        for s in cache.sequences:
            s.index = self._index if s.window is None else None
        agent.cache = cache
        return cache

    def _restore(self, agent: _Agent) -> None:
        with self._lock:
            cache = self.store.load_agent(
                agent.agent_id, model=self.model, tokenizer=self.tokenizer, arena=self.arena,
                window_arena=self.window_arena, resident=self._index.get,
            )
            for s in cache.sequences:
                s.index = self._index if s.window is None else None
            agent.cache = cache
            if agent.history[: len(cache.tokens)] != cache.tokens:
                agent.history = list(cache.tokens)
            agent.dirty = False
            self._restores += 1
            self._register(cache)

    def _disk_tokens(self, agent_id: str) -> list[int]:
        try:
            return self.store.agent_tokens(agent_id).tolist()
        except AgentNotFoundError:
            return []

    def _on_disk(self, agent_id: str) -> bool:
        return self.store.agent_path(agent_id).exists()

    # ------------------------------------------------------------ the K/V path

    def _reuse(self, agent: _Agent, ids: list[int]) -> int:
        """Trim the agent's cache to what the request shares with it; returns
        the tokens kept (at least one prompt token is always computed)."""
        cache = agent.cache
        held = cache.tokens
        n = 0
        limit = min(len(held), len(ids) - 1)
        while n < limit and held[n] == ids[n]:
            n += 1
        if n < cache.offset and not cache.can_trim_to(n):
            n = 0  # the window layers no longer hold what position n needs: recompute
        if n < cache.offset:
            with self._lock:
                if n == 0:
                    cache.release()
                else:
                    cache.trim(cache.offset - n)
                del cache.tokens[n:]
        return n

    def _adopt_shared(self, cache: PromptCache, ids: list[int]) -> int:
        """Share resident full blocks of other agents for the prompt's next
        whole blocks; returns the tokens the cache holds afterwards (0: none
        adopted). Only for models without sliding-window layers: those would
        still need a forward pass over the shared tokens."""
        if self.window_arena is not None or self.arena is None:
            return 0
        seq = cache.sequences[0]
        bt = seq.block_tokens
        start = cache.offset
        if start % bt:
            return 0
        hashes = block_hashes(np.asarray(ids[: (len(ids) - 1) // bt * bt]), self.model_fingerprint, self._full_format)
        adopted = 0
        with self._lock:
            for b in range(start // bt, len(hashes)):
                slot = self._index.get(hashes[b])
                if slot is None:
                    break
                seq.adopt(slot)
                adopted += 1
            if adopted:
                for c in cache:
                    c.offset = start + adopted * bt
                cache.tokens = list(ids[: cache.offset])
        return cache.offset if adopted else 0

    def _reserve(self, cache: PromptCache, n_tokens: int) -> None:
        """Blocks for positions [0, n_tokens) before a forward pass (admitted: they fit)."""
        with self._lock:
            cache.reserve(n_tokens)

    def _drop_memory(self, agent: _Agent) -> None:
        """Forget an agent's resident state (after a failed forward pass, or
        before it is deleted or replaced by an import)."""
        with self._lock:
            if agent.cache is not None:
                agent.cache.release()
                agent.cache = None
            agent.history = []
            agent.dirty = False

    def _register(self, cache: PromptCache) -> None:
        """Index the cache's full blocks; hold an identical resident block
        instead of its own copy where one exists."""
        if self.arena is None or not cache.tokens:
            return
        seq = next(s for s in cache.sequences if s.window is None)
        hashes = block_hashes(np.asarray(cache.tokens[: cache.offset]), self.model_fingerprint, self._full_format)
        with self._lock:
            for b, h in enumerate(hashes):
                slot = self._index.get(h)
                if slot is None:
                    self._index.add(h, seq.blocks[b])
                elif slot != seq.blocks[b]:
                    seq.replace(b, slot)

    def _finish_turn(self, agent: _Agent) -> None:
        self._register(agent.cache)
        if not agent.ephemeral:
            self._persist(agent)

    def _persist(self, agent: _Agent) -> None:
        cache = agent.cache
        self.store.save_agent(
            agent.agent_id, cache, tokens=cache.tokens, model=self.model, tokenizer=self.tokenizer
        )
        agent.dirty = False

    # ------------------------------------------------------------ management

    def evict(self, agent_id: str, *, wait: bool = True) -> None:
        """Write the agent to disk (if needed) and free its memory."""
        agent = self._acquire_existing(agent_id, wait)
        try:
            with self._lock:
                if agent.resident:
                    self._evict(agent)
        finally:
            self._release(agent)

    def forget(self, agent_id: str, *, wait: bool = True) -> None:
        """Drop the agent from memory and from disk (its blocks no other agent uses go too)."""
        agent = self._acquire_existing(agent_id, wait)
        try:
            with self._lock:
                self._drop_memory(agent)
                if self._on_disk(agent_id):
                    self.store.delete_agent(agent_id)
                    self.store.gc()
        finally:
            self._release(agent)
            with self._lock:
                if not agent.busy:
                    self._agents.pop(agent_id, None)

    def _acquire_existing(self, agent_id: str, wait: bool) -> _Agent:
        check_agent_id(agent_id)
        with self._lock:
            known = agent_id in self._agents and (self._agents[agent_id].resident or self._agents[agent_id].history)
            if not known and not self._on_disk(agent_id):
                raise AgentNotFoundError(f"no agent {agent_id!r} in memory or in {self.store.path}")
        return self._acquire(agent_id, wait)

    def count_tokens(self, prompt) -> int:
        """Tokens of a prompt (chat messages, a string or ids), as a request would see them."""
        return len(self._prompt_ids(prompt, []))

    def history(self, agent_id: str) -> list[int]:
        """The token ids whose K/V the agent holds (its prompts and replies so far)."""
        check_agent_id(agent_id)
        with self._lock:
            agent = self._agents.get(agent_id)
            if agent is not None and agent.resident:
                return list(agent.cache.tokens)
        return self.store.agent_tokens(agent_id).tolist()

    def export(self, agent_id: str, path: str | os.PathLike, *, wait: bool = True) -> int:
        """Write the agent as one verified single-file snapshot; returns its bytes."""
        agent = self._acquire_existing(agent_id, wait)
        try:
            with self._lock:
                if agent.resident and agent.dirty:
                    self._persist(agent)
            return self.store.export_agent(agent_id, path)
        finally:
            self._release(agent)

    def import_agent(self, path: str | os.PathLike, agent_id: str | None = None, *, wait: bool = True) -> str:
        """Add the agent of a single-file snapshot (``export``, ``kvsnap.save``)
        as ``agent_id`` (default: the id it was saved under), replacing an agent
        of that id. Refused (ModelMismatchError) if made with another model."""
        snapshot = _open_single_file(path)
        with snapshot.file:
            snapshot.check_model(self.model, self.tokenizer)
            agent_id = check_agent_id(snapshot.agent_id if agent_id is None else agent_id)
        agent = self._acquire(agent_id, wait)
        try:
            with self._lock:
                self._drop_memory(agent)
                self.store.import_agent(path, agent_id)
            return agent_id
        finally:
            self._release(agent)

    def agents(self) -> list[str]:
        """Every agent, resident or on disk."""
        with self._lock:
            hot = {a.agent_id for a in self._agents.values() if a.resident and not a.ephemeral}
        return sorted(hot | set(self.store.list_agents()))

    def info(self, agent_id: str) -> AgentInfo:
        check_agent_id(agent_id)
        with self._lock:
            agent = self._agents.get(agent_id)
            on_disk = self._on_disk(agent_id)
            if (agent is None or not agent.resident) and not on_disk:
                raise AgentNotFoundError(f"no agent {agent_id!r} in memory or in {self.store.path}")
            if agent is not None and agent.resident:
                n = agent.cache.offset
            else:
                n = self.store.agent_info(agent_id).n_tokens
            return AgentInfo(
                agent_id=agent_id,
                resident=agent is not None and agent.resident,
                on_disk=on_disk,
                n_tokens=n,
                resident_bytes=agent.held_bytes() if agent is not None else 0,
                last_used=agent.last_used if agent is not None and agent.last_used else None,
                busy=agent is not None and agent.busy,
            )

    def stats(self) -> dict:
        """Agents resident and on disk, budget and bytes in use, shared blocks,
        disk bytes, hits per source, tokens computed vs reused."""
        with self._lock:
            hot = sorted(a.agent_id for a in self._agents.values() if a.resident and not a.ephemeral)
            arenas = [a for a in (self.arena, self.window_arena) if a is not None]
            shared = self.arena.stats()["slots_shared"] if self.arena is not None else 0
            disk_agents = self.store.list_agents()
            return {
                "agents_resident": len(hot),
                "agents_on_disk": len(disk_agents),
                "resident": hot,
                "budget_bytes": self.budget.limit,
                "bytes_in_use": self.budget.used,
                "blocks_in_use": sum(a.stats()["slots_used"] for a in arenas),
                "blocks_shared": shared,
                "blocks_indexed": len(self._index.slot_of),
                "disk_bytes": _folder_bytes(self.store.path),
                "disk_blocks": len(self.store.block_files()),
                "hits": dict(self._hits),
                "tokens_computed": self._computed,
                "tokens_reused": self._reused,
                "evictions": self._evictions,
                "restores": self._restores,
                "save_errors": self._save_errors,
                "decode_steps": self._scheduler.steps,
                "batch_size_mean": float(np.mean(sizes)) if (sizes := self._scheduler.batch_sizes) else 0.0,
            }

    def close(self) -> None:
        """Persist what is not on disk yet and release every agent's memory.
        An agent that cannot be saved does not keep the others from being
        saved; the first such error is raised at the end."""
        self._scheduler.close()
        errors = []
        with self._lock:
            for agent in list(self._agents.values()):
                if agent.resident and not agent.busy:
                    try:
                        self._evict(agent)
                    except (KvsnapError, OSError) as e:
                        self._save_errors += 1
                        errors.append(e)
            self.store.close()
        if errors:
            raise errors[0]

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------ helpers


def render_chat(tokenizer, messages: Sequence[dict]) -> str:
    """The prompt text of a conversation, ready for the assistant's turn.

    The tokenizer's chat template when it has one. Gemma base models have
    none; for them Gemma's turn format is used (system text joins the first
    user turn, as Gemma's own template does). Other tokenizers without a
    template are refused: pass a string or token ids instead.
    """
    for m in messages:
        if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise InvalidArgumentError("prompt: each message needs a string 'role' and 'content'", "prompt")
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    if "<start_of_turn>" in vocab:
        out, system = ["<bos>"], []
        for m in messages:
            role, content = m["role"], m["content"]
            if role == "system":
                system.append(content)
                continue
            if system and role == "user":
                content = "\n\n".join(system + [content])
                system = []
            turn = "model" if role == "assistant" else "user"
            out.append(f"<start_of_turn>{turn}\n{content}<end_of_turn>\n")
        if system:
            out.append("<start_of_turn>user\n" + "\n\n".join(system) + "<end_of_turn>\n")
        out.append("<start_of_turn>model\n")
        return "".join(out)
    raise InvalidArgumentError(
        "prompt: this tokenizer has no chat template; pass the prompt as a string or token ids", "prompt"
    )


def _check_sampling(max_tokens, temperature, top_p, seed, stop) -> list[str]:
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer)) or max_tokens <= 0:
        raise InvalidArgumentError(f"max_tokens: must be a positive integer, got {max_tokens!r}", "max_tokens")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature < 1e4:
        raise InvalidArgumentError(f"temperature: must be a number >= 0, got {temperature!r}", "temperature")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise InvalidArgumentError(f"top_p: must be in (0, 1], got {top_p!r}", "top_p")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise InvalidArgumentError(f"seed: must be a non-negative integer or None, got {seed!r}", "seed")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if not all(isinstance(s, str) and s for s in stops) or len(stops) > 16:
        raise InvalidArgumentError("stop: must be a non-empty string or a list of up to 16 of them", "stop")
    return stops


def _trim_heap() -> None:
    """Give freed heap memory back to the OS. The arena's slots are madvised
    when freed; what else a turn allocated (MLX buffers, numpy copies) stays in
    glibc's per-thread heaps (the model thread's among them) until trimmed."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc():
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _load_libc()


def _context_length(model) -> int:
    args = getattr(model, "args", None)
    return int(getattr(args, "max_position_embeddings", None) or 1 << 20)


def _vocab_size(model) -> int:
    return int(getattr(getattr(model, "args", None), "vocab_size", None) or 1 << 31)


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


__all__ = ["AgentInfo", "AgentMemory", "Reply", "Timings", "Usage", "parse_bytes", "render_chat"]
