"""``kvsnap serve``: an OpenAI- and Anthropic-compatible HTTP server over AgentMemory.

    kvsnap serve --model smollm2-135m --store ~/agents --budget 1GB --port 8080

Routes: ``POST /v1/chat/completions`` (OpenAI), ``POST /v1/messages`` and
``/v1/messages/count_tokens`` (Anthropic), ``GET /v1/models``; the agents:
``GET /v1/agents``, ``GET|PUT|DELETE /v1/agents/{id}``,
``GET /v1/agents/{id}/export``; ``GET /health``, ``GET /metrics`` (Prometheus).

An agent is named by the ``X-Agent-Id`` header (or OpenAI's ``user``,
Anthropic's ``metadata.user_id``): its KV memory persists across requests and
restarts, and each request computes only what the agent does not hold yet.
Without a name a request is stateless (it still shares resident blocks).
Requests of different agents decode together (kvsnap.scheduler); one agent's
requests are served one at a time.

API keys: with ``--api-key`` given once, every client holding the key sees
every agent. Given several times, each key owns its own agents: the server
stores them under a namespace derived from the key (``k<16 hex digits>.`` in
front of the id, never shown to clients), and a client of one key gets a 404
for any agent of another, as for an agent that does not exist. Each request runs AgentMemory.stream on a
thread of its own; its events cross to the event loop through a queue.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import hashlib
import hmac
import json
import logging
import os
import re
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from kvsnap import api
from kvsnap.api import APIError
from kvsnap.errors import (
    AgentBusyError,
    AgentNotFoundError,
    BudgetExceededError,
    CorruptSnapshotError,
    FormatMismatchError,
    InvalidArgumentError,
    KvsnapError,
    ModelMismatchError,
    StoreError,
    UnsupportedVersionError,
)
from kvsnap.memory import AgentMemory, Reply
from kvsnap.store import check_agent_id

log = logging.getLogger("kvsnap.server")

MAX_BODY = 8 << 20  # bytes of a JSON request
MAX_IMPORT = 4 << 30  # bytes of an imported snapshot
AGENT_HEADER = "x-agent-id"
NAMESPACE = re.compile(r"k[0-9a-f]{16}\.")  # a key's namespace, in front of its agents' ids
MAX_AGENT_ID = 128


def key_namespace(key: str) -> str:
    """The prefix of the agent ids a key owns (stable across restarts and key order)."""
    return "k" + hashlib.sha256(b"kvsnap agent namespace\0" + key.encode()).hexdigest()[:16] + "."


def _disk_full(e: BaseException) -> OSError | None:
    """The ENOSPC/EDQUOT error behind e (itself, or what it was raised from), if any."""
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return e
        if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
            return e
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def to_api_error(e: BaseException) -> APIError:
    """The HTTP status and message of an error raised while serving."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, AgentNotFoundError):
        return APIError(404, str(e), kind="not_found_error", code="agent_not_found")
    if isinstance(e, InvalidArgumentError):
        return APIError(400, str(e), param=e.argument)
    if isinstance(e, BudgetExceededError):
        return APIError(400, str(e), code="budget_exceeded")
    if isinstance(e, AgentBusyError):
        return APIError(409, str(e), code="agent_busy")
    if isinstance(e, ModelMismatchError):
        return APIError(409, str(e), code="model_mismatch")
    if isinstance(e, (CorruptSnapshotError, FormatMismatchError, UnsupportedVersionError)):
        return APIError(422, str(e), code="bad_snapshot")
    if _disk_full(e) is not None:
        return APIError(507, f"the store's disk is full; the agent keeps this turn in memory and saves it "
                             f"with its next one: {e}", kind="api_error", code="disk_full")
    if isinstance(e, StoreError):
        return APIError(500, str(e), kind="api_error", code="store_error")
    if isinstance(e, KvsnapError):
        return APIError(500, str(e), kind="api_error")
    log.exception("unexpected error while serving", exc_info=e)
    return APIError(500, f"internal error: {type(e).__name__}: {e}", kind="api_error")


def _anthropic_style(request: Request) -> bool:
    return request.url.path.startswith("/v1/messages")


def error_response(request: Request, e: APIError) -> JSONResponse:
    body = api.anthropic_error(e) if _anthropic_style(request) else api.openai_error(e)
    headers = {"www-authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(body, status_code=e.status, headers=headers)


# ---------------------------------------------------------------- metrics


class Metrics:
    """Prometheus metrics: the memory's own counters plus the server's latencies."""

    def __init__(self, memory: AgentMemory):
        self.memory = memory
        self.registry = CollectorRegistry()
        self.ttft = Histogram("kvsnap_ttft_seconds", "Request start to first token",
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
                              registry=self.registry)
        self.itl = Histogram("kvsnap_inter_token_latency_seconds", "Time between streamed text pieces",
                             buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
                             registry=self.registry)
        self.generated = Counter("kvsnap_generated_tokens", "Tokens generated", registry=self.registry)
        self.requests = Counter("kvsnap_requests", "Generation requests by API and HTTP status",
                                ["api", "status"], registry=self.registry)
        self.last_rate = 0.0
        self.registry.register(self)

    def collect(self):
        s = self.memory.stats()
        for name, help_, value in (
            ("kvsnap_agents_resident", "Agents whose KV cache is in memory", s["agents_resident"]),
            ("kvsnap_agents_on_disk", "Agents saved in the store", s["agents_on_disk"]),
            ("kvsnap_budget_bytes", "The KV memory budget", s["budget_bytes"]),
            ("kvsnap_budget_bytes_in_use", "KV memory in use", s["bytes_in_use"]),
            ("kvsnap_blocks_shared", "Blocks held by more than one agent", s["blocks_shared"]),
            ("kvsnap_disk_bytes", "Bytes of the store on disk", s["disk_bytes"]),
            ("kvsnap_batch_size", "Mean sequences per decode step (last 1000 steps)", s["batch_size_mean"]),
            ("kvsnap_decode_tokens_per_second", "Decode speed of the last finished request", self.last_rate),
        ):
            yield GaugeMetricFamily(name, help_, value=value)
        hits = CounterMetricFamily("kvsnap_prompt_cache_hits", "Requests by where their reused tokens came from",
                                   labels=["source"])
        for source, n in s["hits"].items():
            hits.add_metric([source], n)
        yield hits
        tokens = CounterMetricFamily("kvsnap_prompt_tokens", "Prompt tokens computed or reused", labels=["kind"])
        tokens.add_metric(["computed"], s["tokens_computed"])
        tokens.add_metric(["reused"], s["tokens_reused"])
        yield tokens
        yield CounterMetricFamily("kvsnap_evictions", "Agents evicted to disk", value=s["evictions"])
        yield CounterMetricFamily("kvsnap_restores", "Agents restored from disk", value=s["restores"])
        yield CounterMetricFamily("kvsnap_save_errors", "Saves that failed (the agent kept its turn in memory)",
                                  value=s["save_errors"])
        yield CounterMetricFamily("kvsnap_decode_steps", "Batched decode steps run", value=s["decode_steps"])

    def finished(self, reply: Reply) -> None:
        self.ttft.observe(reply.timings.ttft_s)
        self.generated.inc(reply.usage.completion_tokens)
        self.last_rate = reply.timings.decode_tokens_per_s


# ------------------------------------------------------------- one request


class Generation:
    """One AgentMemory.stream call on its own thread. Its events reach the
    event loop through a queue: ("start", source, usage), ("text", str),
    ("reply", Reply), ("error", exception), then ("end",). ``cancel()`` ends
    the request at its next token; the agent keeps what was computed."""

    def __init__(self, memory: AgentMemory, metrics: Metrics, agent_id: str | None, chat: api.ChatRequest,
                 max_tokens: int):
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self._cancelled = threading.Event()
        self._args = (memory, metrics, agent_id, chat, max_tokens)
        threading.Thread(target=self._work, name="kvsnap-request", daemon=True).start()

    def _put(self, *event) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop has closed: nobody is listening
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def _work(self) -> None:
        memory, metrics, agent_id, chat, max_tokens = self._args
        stream = memory.stream(
            agent_id, chat.messages, max_tokens=max_tokens, temperature=chat.temperature, top_p=chat.top_p,
            seed=chat.seed, stop=chat.stop, on_start=lambda source, usage: self._put("start", source, usage),
        )
        last = None
        try:
            for item in stream:
                if isinstance(item, Reply):
                    metrics.finished(item)
                    self._put("reply", item)
                    continue
                now = time.perf_counter()
                if last is not None:
                    metrics.itl.observe(now - last)
                last = now
                self._put("text", item)
                if self._cancelled.is_set():
                    break
        except BaseException as e:  # noqa: BLE001 (handed to the event loop)
            self._put("error", e)
        finally:
            try:
                stream.close()  # a cancelled request ends cleanly; its agent keeps its state
            finally:
                self._put("end")

    def cancel(self) -> None:
        self._cancelled.set()

    async def first(self) -> tuple:
        """The first event: ("start", ...) once admitted, or ("error", e)."""
        event = await self.events.get()
        if event[0] == "end":
            return ("error", RuntimeError("the request ended before it started"))
        return event

    async def rest(self):
        while (event := await self.events.get())[0] != "end":
            yield event


# ------------------------------------------------------------------ the app


class Server:
    def __init__(self, memory: AgentMemory, *, model_name: str, api_keys: list[str] | None = None,
                 max_body: int = MAX_BODY, max_import: int = MAX_IMPORT, default_max_tokens: int = 512):
        self.memory = memory
        self.model_names = {model_name, Path(model_name).name}
        self.model_name = model_name
        self.api_keys = [k.encode() for k in api_keys or []]
        # One key (or none): one namespace, the plain ids. Several: one namespace per key.
        self.namespaces = [key_namespace(k) if len(self.api_keys) > 1 else "" for k in api_keys or []]
        self.max_body, self.max_import = max_body, max_import
        self.default_max_tokens = default_max_tokens
        self.metrics = Metrics(memory)
        self.started = int(time.time())

    # -------------------------------------------------------------- plumbing

    def check_key(self, request: Request) -> str:
        """The namespace of the request's key ("" for the plain ids); 401 without a valid key."""
        if not self.api_keys:
            return ""
        given = request.headers.get("x-api-key")
        auth = request.headers.get("authorization", "")
        if given is None and auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        found = None
        if given is not None:
            for key, namespace in zip(self.api_keys, self.namespaces):
                if hmac.compare_digest(given.encode(), key):  # every key compared: no early exit
                    found = namespace
        if found is None:
            raise APIError(401, "missing or wrong API key (Authorization: Bearer KEY or x-api-key: KEY)",
                           kind="authentication_error", code="invalid_api_key")
        return found

    async def read_body(self, request: Request, limit: int) -> bytes:
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise APIError(400, f"content-length: {length!r} is not a number of bytes")
            if int(length) > limit:
                raise APIError(413, f"the body is {length} bytes; the limit is {limit}", kind="request_too_large")
        chunks, n = [], 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > limit:
                raise APIError(413, f"the body is over the limit of {limit} bytes", kind="request_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    async def read_json(self, request: Request) -> dict:
        raw = await self.read_body(request, self.max_body)
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise APIError(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise APIError(400, f"the body must be a JSON object, got {type(body).__name__}")
        return body

    def check_model(self, name: str) -> None:
        if name not in self.model_names:
            raise APIError(404, f"model: {name!r} is not served here; this server serves {self.model_name!r}",
                           kind="invalid_request_error", param="model", code="model_not_found")

    def agent_id(self, request: Request, from_body: str | None, namespace: str) -> str | None:
        """The internal id of the agent a generation request names (None: stateless)."""
        agent_id = request.headers.get(AGENT_HEADER) or from_body
        return None if agent_id is None else self._internal(agent_id, namespace)

    def path_agent(self, request: Request, namespace: str) -> str:
        return self._internal(request.path_params["agent_id"], namespace)

    @staticmethod
    def _internal(agent_id: str, namespace: str) -> str:
        try:
            check_agent_id(agent_id)
        except InvalidArgumentError as e:
            raise APIError(400, str(e)[:300], param="agent_id") from None
        if len(namespace) + len(agent_id) > MAX_AGENT_ID:
            raise APIError(400, f"agent_id: at most {MAX_AGENT_ID - len(namespace)} characters on this server, "
                                f"got {len(agent_id)}", param="agent_id")
        return namespace + agent_id

    def public(self, e: APIError) -> APIError:
        """The error as a client may see it: no key namespace in its message."""
        if len(self.api_keys) > 1:
            e.message = NAMESPACE.sub("", e.message)
        return e

    # ------------------------------------------------------------ generation

    async def generate(self, request: Request, style: str) -> Response:
        namespace = self.check_key(request)
        body = await self.read_json(request)
        context = self.memory.context_length
        chat = api.openai_request(body, context) if style == "openai" else api.anthropic_request(body, context)
        self.check_model(chat.model)
        agent_id = self.agent_id(request, chat.agent_id, namespace)
        max_tokens = chat.max_tokens or min(self.default_max_tokens, context)
        run = Generation(self.memory, self.metrics, agent_id, chat, max_tokens)
        kind, *rest = await run.first()
        if kind == "error":
            e = self.public(to_api_error(rest[0]))
            self.metrics.requests.labels(style, str(e.status)).inc()
            raise e
        source, usage = rest
        headers = {"x-kvsnap-cache-source": source, "x-kvsnap-cached-tokens": str(usage.cached_tokens)}
        if agent_id is not None:
            headers["x-kvsnap-agent-id"] = agent_id[len(namespace):]
        if chat.stream:
            self.metrics.requests.labels(style, "200").inc()
            stream = (api.OpenAIStream(self.model_name, chat.include_usage) if style == "openai" else
                      api.AnthropicStream(self.model_name, usage, chat.stop, self.memory.tokenizer,
                                          self.memory.eos_ids))
            events = self._events(run, stream)
            return EventSourceResponse(events, headers=headers, ping=15)
        try:
            reply = None
            async for kind, *rest in run.rest():
                if kind == "error":
                    raise self.public(to_api_error(rest[0]))
                if kind == "reply":
                    reply = rest[0]
        except APIError as e:
            self.metrics.requests.labels(style, str(e.status)).inc()
            raise
        finally:
            run.cancel()
        self.metrics.requests.labels(style, "200").inc()
        tokenizer, eos = self.memory.tokenizer, self.memory.eos_ids
        out = (api.openai_response(self.model_name, reply) if style == "openai"
               else api.anthropic_response(self.model_name, reply, chat.stop, tokenizer, eos))
        return JSONResponse(out, headers=headers)

    async def _events(self, run: Generation, stream: api.OpenAIStream | api.AnthropicStream):
        try:
            for event in stream.start():
                yield event
            async for kind, *rest in run.rest():
                if kind == "text":
                    events = stream.text(rest[0])
                elif kind == "reply":
                    events = stream.end(rest[0])
                else:
                    events = stream.error(self.public(to_api_error(rest[0])))
                for event in events:
                    yield event
        finally:
            run.cancel()  # the client went away (or the stream ended): free its place in the batch

    async def chat_completions(self, request: Request) -> Response:
        return await self.generate(request, "openai")

    async def messages(self, request: Request) -> Response:
        return await self.generate(request, "anthropic")

    async def count_tokens(self, request: Request) -> Response:
        self.check_key(request)
        body = await self.read_json(request)
        self.check_model(api._get(body, "model", (str,), "a string", required=True))
        messages = api.anthropic_messages(body)
        n = await run_in_threadpool(self.memory.count_tokens, messages)
        return JSONResponse({"input_tokens": n})

    async def models(self, request: Request) -> Response:
        self.check_key(request)
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": self.started, "owned_by": "kvsnap",
             "type": "model", "display_name": self.model_name,
             "context_length": self.memory.context_length}]})

    # ---------------------------------------------------------------- agents

    def _agent_json(self, agent_id: str, namespace: str, history: bool = False) -> dict:
        out = asdict(self.memory.info(agent_id))
        out["id"] = out.pop("agent_id")[len(namespace):]
        out["object"] = "agent"
        if history:
            tokens = self.memory.history(agent_id)
            out["tokens"] = tokens
            out["text"] = self.memory.tokenizer.decode(tokens, skip_special_tokens=False)
        return out

    async def list_agents(self, request: Request) -> Response:
        namespace = self.check_key(request)

        def listing():
            out = []
            for agent_id in self.memory.agents():
                if not agent_id.startswith(namespace):
                    continue  # another key's agent
                with contextlib.suppress(AgentNotFoundError):  # deleted meanwhile
                    out.append(self._agent_json(agent_id, namespace))
            return out

        return JSONResponse({"object": "list", "data": await run_in_threadpool(listing)})

    async def get_agent(self, request: Request) -> Response:
        namespace = self.check_key(request)
        agent_id = self.path_agent(request, namespace)
        history = request.query_params.get("history", "false").lower() in ("1", "true", "yes")
        return JSONResponse(await run_in_threadpool(self._agent_json, agent_id, namespace, history))

    async def delete_agent(self, request: Request) -> Response:
        namespace = self.check_key(request)
        agent_id = self.path_agent(request, namespace)
        name = agent_id[len(namespace):]
        evict_only = request.query_params.get("evict_only", "false").lower()
        if evict_only not in ("true", "false", "1", "0"):
            raise APIError(400, f"evict_only: must be true or false, got {evict_only!r}", param="evict_only")
        if evict_only in ("true", "1"):
            await run_in_threadpool(self.memory.evict, agent_id)
            return JSONResponse({"id": name, "object": "agent", "evicted": True,
                                 **{k: v for k, v in self._agent_json(agent_id, namespace).items() if k != "id"}})
        await run_in_threadpool(self.memory.forget, agent_id)
        return JSONResponse({"id": name, "object": "agent", "deleted": True})

    async def export_agent(self, request: Request) -> Response:
        namespace = self.check_key(request)
        agent_id = self.path_agent(request, namespace)
        folder = tempfile.mkdtemp(prefix="kvsnap-export-")
        path = Path(folder) / f"{agent_id[len(namespace):]}.safetensors"

        def cleanup():
            path.unlink(missing_ok=True)
            os.rmdir(folder)

        try:
            await run_in_threadpool(self.memory.export, agent_id, path)
        except BaseException:
            cleanup()
            raise
        return FileResponse(path, media_type="application/octet-stream", filename=path.name,
                            background=BackgroundTask(cleanup))

    async def import_agent(self, request: Request) -> Response:
        namespace = self.check_key(request)
        agent_id = self.path_agent(request, namespace)
        fd, name = tempfile.mkstemp(prefix="kvsnap-import-", suffix=".safetensors")
        try:
            with os.fdopen(fd, "wb") as f:
                n = 0
                async for chunk in request.stream():
                    n += len(chunk)
                    if n > self.max_import:
                        raise APIError(413, f"the snapshot is over the limit of {self.max_import} bytes",
                                       kind="request_too_large")
                    f.write(chunk)
            if n == 0:
                raise APIError(400, "the body is empty: send the snapshot file (GET /v1/agents/{id}/export)")
            await run_in_threadpool(self.memory.import_agent, name, agent_id)
        finally:
            Path(name).unlink(missing_ok=True)
        return JSONResponse(await run_in_threadpool(self._agent_json, agent_id, namespace), status_code=201)

    # ----------------------------------------------------------------- health

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.model_name})

    async def prometheus(self, request: Request) -> Response:
        self.check_key(request)
        text = await run_in_threadpool(generate_latest, self.metrics.registry)
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    # -------------------------------------------------------------------- app

    def app(self) -> Starlette:
        def handled(endpoint):
            async def run(request: Request) -> Response:
                try:
                    return await endpoint(request)
                except Exception as e:  # noqa: BLE001 (every error becomes an HTTP error body)
                    return error_response(request, self.public(to_api_error(e)))
            return run

        async def http_error(request: Request, e: HTTPException) -> Response:
            message = {404: f"no route {request.method} {request.url.path}",
                       405: f"{request.method} is not allowed on {request.url.path}"}.get(e.status_code, e.detail)
            kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
            return error_response(request, APIError(e.status_code, message, kind=kind))

        routes = [
            Route("/v1/chat/completions", handled(self.chat_completions), methods=["POST"]),
            Route("/v1/messages", handled(self.messages), methods=["POST"]),
            Route("/v1/messages/count_tokens", handled(self.count_tokens), methods=["POST"]),
            Route("/v1/models", handled(self.models), methods=["GET"]),
            Route("/v1/agents", handled(self.list_agents), methods=["GET"]),
            Route("/v1/agents/{agent_id}", handled(self.get_agent), methods=["GET"]),
            Route("/v1/agents/{agent_id}", handled(self.delete_agent), methods=["DELETE"]),
            Route("/v1/agents/{agent_id}", handled(self.import_agent), methods=["PUT"]),
            Route("/v1/agents/{agent_id}/export", handled(self.export_agent), methods=["GET"]),
            Route("/health", handled(self.health), methods=["GET"]),
            Route("/metrics", handled(self.prometheus), methods=["GET"]),
        ]

        @contextlib.asynccontextmanager
        async def lifespan(app):
            yield
            await run_in_threadpool(self.memory.close)

        return Starlette(routes=routes, exception_handlers={HTTPException: http_error}, lifespan=lifespan)


# ------------------------------------------------------------------ command


def add_command(commands) -> None:
    from kvsnap import models

    p = commands.add_parser("serve", help="serve agents over OpenAI- and Anthropic-compatible HTTP APIs")
    p.add_argument("--model", default=models.DEFAULT_MODEL,
                   help=f"built-in name, mlx-lm directory or .gguf file (default {models.DEFAULT_MODEL})")
    p.add_argument("--store", default=None, help="the agents' snapshot folder (default $KVSNAP_HOME/agents)")
    p.add_argument("--budget", default="1GB", help="KV memory for all agents, e.g. 512MB or 2GiB (default 1GB)")
    p.add_argument("--quality", default="default", choices=["default", "accurate"],
                   help="KV format: default (4-bit keys and values, 4.5 bits per element) or accurate "
                   "(6-bit keys, 5.5 bits per element: 1.22x the bytes)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--api-key", action="append", default=None,
                   help="require this key (Authorization: Bearer KEY or x-api-key); may be given several times")
    p.add_argument("--max-body", default="8MiB", help="largest JSON request body (default 8MiB)")
    p.add_argument("--default-max-tokens", type=int, default=512,
                   help="max_tokens of OpenAI requests that give none (default 512)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(run=serve)


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from kvsnap import models
    from kvsnap.memory import parse_bytes

    max_body = parse_bytes(args.max_body, "--max-body")
    budget = parse_bytes(args.budget, "--budget")
    if not 0 < args.port < 65536:
        raise InvalidArgumentError(f"--port: must be in 1..65535, got {args.port}", "port")
    if args.default_max_tokens <= 0:
        raise InvalidArgumentError("--default-max-tokens: must be positive", "default_max_tokens")
    model, tokenizer = models.load(args.model)
    memory = AgentMemory(model, tokenizer, path=args.store, budget=budget, quality=args.quality)
    server = Server(memory, model_name=str(args.model), api_keys=args.api_key, max_body=max_body,
                    default_max_tokens=args.default_max_tokens)
    print(f"kvsnap: serving {args.model} on http://{args.host}:{args.port} (store {memory.store.path}, "
          f"budget {budget} bytes{', API key required' if args.api_key else ''})", flush=True)
    uvicorn.run(server.app(), host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=10, h11_max_incomplete_event_size=64 << 10)
    return 0
