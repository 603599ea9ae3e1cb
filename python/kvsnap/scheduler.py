"""The step loop: one model thread runs every request's forward passes.

Requests from many threads are queued to it. Each turn of the loop runs at
most one prefill chunk (of the oldest request still prefilling: a long
prompt is cut into chunks that end on block boundaries, so it never stalls
the others for long: while more requests decode than wait for their prefill,
the chunk is halved until it takes at most STALL decode steps, as measured so
far, down to MIN_CHUNK tokens; with more prompts waiting than requests
decoding, full chunks serve the many first tokens sooner), then ONE decode step for every request that is
generating — a ragged batch (kvsnap.batch): each sequence at its own
length, the model's weights read once per step for all of them. Requests
join the batch when their prefill is done and leave when they finish.
Sampling (temperature, top_p, seed, stop strings) is per request.

Memory is the caller's business: ``reserve(cache, n_tokens)`` is called
before every forward pass and must give the cache the blocks it needs (the
runtime admitted the request with room for all of them).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable

import mlx.core as mx

from kvsnap.batch import batch_cache
from kvsnap.cache import PromptCache

DONE = object()  # the last event of a request
MIN_CHUNK = 16  # the smallest prefill chunk while others decode (tokens)
STALL = 1.5  # a prefill chunk may delay the others' next token by this many of their steps
EMA = 0.3  # weight of the newest timing in the running estimates


class Sampler:
    """Greedy at temperature 0; otherwise top-p sampling with its own key."""

    def __init__(self, temperature: float, top_p: float, seed: int | None):
        self.temperature, self.top_p = temperature, top_p
        self.key = mx.random.key(seed if seed is not None else int.from_bytes(os.urandom(4), "little"))

    def __call__(self, logits: mx.array) -> int:
        logits = logits.reshape(-1).astype(mx.float32)
        if self.temperature == 0:
            return int(mx.argmax(logits).item())
        logits = logits / self.temperature
        self.key, sub = mx.random.split(self.key)
        if self.top_p < 1.0:
            order = mx.argsort(-logits)
            probs = mx.softmax(logits[order])
            keep = (mx.cumsum(probs) - probs) < self.top_p  # the most likely token always stays
            masked = mx.where(keep, logits[order], -mx.inf)
            return int(order[mx.random.categorical(masked, key=sub)].item())
        return int(mx.random.categorical(logits, key=sub).item())


def find_stop(text: str, stops: list[str], start: int = 0) -> int | None:
    """Where the first stop string begins in text (searching from near start)."""
    best = None
    for s in stops:
        i = text.find(s, max(0, start - len(s)))
        if i >= 0 and (best is None or i < best):
            best = i
    return best


class Request:
    """One generation: the cache holds ids[:cache.offset]; the loop computes
    the rest, then samples up to max_tokens. Events (text pieces, then DONE
    or an exception) go to ``events``."""

    def __init__(self, cache: PromptCache, ids: list[int], *, max_tokens: int, sampler: Sampler,
                 stops: list[str], eos_ids: set[int], tokenizer):
        self.cache, self.ids = cache, ids
        self.max_tokens, self.sampler, self.stops = max_tokens, sampler, stops
        self.eos_ids, self.tokenizer = eos_ids, tokenizer
        self.events: queue.Queue = queue.Queue()
        self.generated: list[int] = []
        self.finish: str | None = None
        self.cancelled = False
        self.t_prefill = self.t_first = None
        self._sent = 0
        self._holdback = max((len(s) for s in stops), default=1) - 1

    @property
    def prefilling(self) -> bool:
        return self.cache.offset < len(self.ids)

    def on_token(self, token: int) -> None:
        """A sampled token: stream what text is final, decide whether to stop."""
        self.generated.append(token)
        if self.t_first is None:
            self.t_first = time.perf_counter()
        if token in self.eos_ids:
            self.finish = "stop"
            return
        text = self.tokenizer.decode(self.generated)
        if self.stops and find_stop(text, self.stops, self._sent) is not None:
            self.finish = "stop"
            return
        safe = len(text.rstrip("\ufffd")) - self._holdback
        if safe > self._sent:
            self.events.put(text[self._sent : safe])
            self._sent = safe
        if len(self.generated) >= self.max_tokens:
            self.finish = "length"

    def text(self) -> str:
        """The reply's text: end-of-turn tokens left out, cut at a stop string."""
        text = self.tokenizer.decode([t for t in self.generated if t not in self.eos_ids])
        cut = find_stop(text, self.stops)
        return text if cut is None else text[:cut]

    def unsent(self) -> str:
        return self.text()[self._sent :]


class Scheduler:
    """The model thread (started on the first request)."""

    def __init__(self, model, *, chunk_tokens: int, reserve: Callable[[PromptCache, int], None]):
        self.model, self.chunk_tokens, self.reserve = model, chunk_tokens, reserve
        self._cv = threading.Condition()
        self._pending: list[Request] = []
        self._active: list[Request] = []
        self._thread: threading.Thread | None = None
        self._stop = False
        self.steps = 0  # decode steps run
        self.batch_sizes: list[int] = []  # requests per decode step (recent)
        self.chunk_sizes: list[int] = []  # tokens per prefill chunk (recent)
        self._token_s: float | None = None  # prefill seconds per token (running estimate)
        self._step_s: float | None = None  # seconds per decode step (running estimate)

    def submit(self, request: Request) -> None:
        with self._cv:
            if self._stop:
                raise RuntimeError("the scheduler is closed")
            self._pending.append(request)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="kvsnap-model", daemon=True)
                self._thread.start()
            self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._active and not self._stop:
                    self._cv.wait()
                if self._stop:
                    for r in self._pending + self._active:
                        r.events.put(RuntimeError("the memory was closed while this request ran"))
                    return
                self._active += self._pending
                self._pending = []
            self._turn()

    def _turn(self) -> None:
        for r in [r for r in self._active if r.cancelled]:
            self._end(r)
        prefilling = [r for r in self._active if r.prefilling]
        decoding = [r for r in self._active if not r.prefilling and r.finish is None and r.generated]
        if prefilling:
            protect = len(decoding) > len(prefilling)  # the decoding batch outnumbers the waiting prompts
            self._guarded([prefilling[0]], self._prefill_chunk, self._chunk_tokens(protect))
        decoding = [r for r in self._active if not r.prefilling and r.finish is None and r.generated]
        if decoding:
            self._guarded(decoding, self._decode_step)
        for r in [r for r in self._active if r.finish is not None]:
            self._end(r)

    def _chunk_tokens(self, protect_decoding: bool) -> int:
        """The next prefill chunk: the full chunk, or, to protect a decoding
        batch's inter-token latency, halved until it costs at most STALL of its steps."""
        chunk = self.chunk_tokens
        if not protect_decoding or self._token_s is None or self._step_s is None:
            return chunk
        while chunk > MIN_CHUNK and chunk % 2 == 0 and chunk * self._token_s > STALL * self._step_s:
            chunk //= 2
        return chunk

    @staticmethod
    def _ema(old: float | None, new: float) -> float:
        return new if old is None else (1 - EMA) * old + EMA * new

    def _guarded(self, requests: list[Request], step, *args) -> None:
        try:
            step(requests, *args)
        except Exception as e:  # noqa: BLE001 (handed to the requests' threads)
            for r in requests:
                r.events.put(e)
                self._active.remove(r)

    def _end(self, r: Request) -> None:
        self._active.remove(r)
        r.events.put(DONE)

    def _prefill_chunk(self, requests: list[Request], chunk: int) -> None:
        (r,) = requests
        t = time.perf_counter()
        if r.t_prefill is None:
            r.t_prefill = t
        pos = r.cache.offset
        end = min(len(r.ids), (pos // chunk + 1) * chunk)  # chunk divides block_tokens: ends on block edges
        self.reserve(r.cache, end)
        logits = self.model(mx.array([r.ids[pos:end]]), cache=r.cache)[:, -1, :]
        mx.eval(logits)
        self._token_s = self._ema(self._token_s, (time.perf_counter() - t) / (end - pos))
        self.chunk_sizes = (self.chunk_sizes + [end - pos])[-1000:]
        r.cache.tokens = list(r.ids[:end])
        if end == len(r.ids):
            r.on_token(r.sampler(logits))

    def _decode_step(self, requests: list[Request]) -> None:
        t = time.perf_counter()
        for r in requests:
            self.reserve(r.cache, r.cache.offset + 1)
        tokens = mx.array([[r.generated[-1]] for r in requests])
        cache = requests[0].cache if len(requests) == 1 else batch_cache([r.cache for r in requests])
        logits = self.model(tokens, cache=cache)[:, -1, :]
        mx.eval(logits)
        self._step_s = self._ema(self._step_s, time.perf_counter() - t)
        self.steps += 1
        self.batch_sizes = (self.batch_sizes + [len(requests)])[-1000:]
        for b, r in enumerate(requests):
            r.cache.tokens.append(r.generated[-1])
            r.on_token(r.sampler(logits[b]))
