"""The two chat APIs the server speaks: OpenAI Chat Completions and Anthropic
Messages. Request bodies in, AgentMemory arguments out; Replies in, response
bodies and stream events out. No I/O here (kvsnap.server does the HTTP).

Usage is reported as kvsnap measured it: OpenAI's
``usage.prompt_tokens_details.cached_tokens`` and Anthropic's
``usage.cache_read_input_tokens`` are the prompt tokens that were not
computed (reused from memory, disk or another agent's blocks); Anthropic's
``input_tokens`` are the ones that were.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from kvsnap.memory import Reply, Usage
from kvsnap.scheduler import find_stop

MAX_STOPS = 16


class APIError(Exception):
    """A request the server refuses: HTTP status, error type, message, the parameter at fault."""

    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code


def invalid(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


@dataclass
class ChatRequest:
    """One generation request, in kvsnap's terms."""

    model: str
    messages: list[dict]  # {"role": system|user|assistant, "content": str}
    max_tokens: int | None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False  # OpenAI stream_options.include_usage
    agent_id: str | None = None  # from the body (user / metadata.user_id); the header wins


# --------------------------------------------------------------------- checks


def _get(body: dict, name: str, kinds: tuple[type, ...], what: str, default=None, *, required=False):
    value = body.get(name, default)
    if value is None:
        if required:
            raise invalid(f"{name}: is required", name)
        return default
    if isinstance(value, bool) and bool not in kinds:
        raise invalid(f"{name}: must be {what}, got a boolean", name)
    if not isinstance(value, kinds):
        raise invalid(f"{name}: must be {what}, got {type(value).__name__}", name)
    return value


def _number(body: dict, name: str, default: float, low: float, high: float, *, open_low=False) -> float:
    value = float(_get(body, name, (int, float), "a number", default))
    if not (low < value if open_low else low <= value) or value > high:
        lo = "(" if open_low else "["
        raise invalid(f"{name}: must be in {lo}{low}, {high}], got {value}", name)
    return value


def _max_tokens(body: dict, names: tuple[str, ...], context: int, *, required: bool) -> int | None:
    for name in names:
        value = _get(body, name, (int,), "an integer")
        if value is None:
            continue
        if value <= 0:
            raise invalid(f"{name}: must be at least 1, got {value}", name)
        if value > context:
            raise invalid(f"{name}: {value} is beyond the model's context of {context} tokens", name)
        return value
    if required:
        raise invalid(f"{names[0]}: is required", names[0])
    return None


def _stops(value, name: str) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise invalid(f"{name}: must be a non-empty string or a list of them", name)
    if len(stops) > MAX_STOPS:
        raise invalid(f"{name}: at most {MAX_STOPS} stop sequences, got {len(stops)}", name)
    return stops


def _seed(body: dict) -> int | None:
    seed = _get(body, "seed", (int,), "an integer")
    if seed is not None and not 0 <= seed < 2**63:
        raise invalid(f"seed: must be in [0, 2**63), got {seed}", "seed")
    return seed


def _text(content, where: str, *, allow_empty=False) -> str:
    """A message's content: a string, or a list of text blocks joined."""
    if isinstance(content, str):
        text = content
    elif isinstance(content, list):
        parts = []
        for i, block in enumerate(content):
            if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
                kind = block.get("type") if isinstance(block, dict) else type(block).__name__
                raise invalid(f"{where}[{i}]: only text content blocks are supported, got {kind!r}", where)
            parts.append(block["text"])
        text = "".join(parts)
    else:
        raise invalid(f"{where}: must be a string or a list of text blocks", where)
    if not text and not allow_empty:
        raise invalid(f"{where}: is empty", where)
    return text


# --------------------------------------------------------------------- OpenAI

OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def openai_request(body: dict, context: int) -> ChatRequest:
    model = _get(body, "model", (str,), "a string", required=True)
    raw = _get(body, "messages", (list,), "a list of messages", required=True)
    if not raw:
        raise invalid("messages: must hold at least one message", "messages")
    messages = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise invalid(f"{where}: must be an object with role and content", "messages")
        role = m.get("role")
        if not isinstance(role, str) or role not in OPENAI_ROLES:  # (a list or dict role is unhashable)
            raise invalid(f"{where}.role: must be one of {', '.join(OPENAI_ROLES)}, got {role!r}", "messages")
        messages.append({"role": OPENAI_ROLES[role],
                         "content": _text(m.get("content"), f"{where}.content", allow_empty=role == "assistant")})
    n = _get(body, "n", (int,), "an integer", 1)
    if n != 1:
        raise invalid(f"n: only n=1 is supported, got {n}", "n")
    options = _get(body, "stream_options", (dict,), "an object", {})
    user = _get(body, "user", (str,), "a string")
    return ChatRequest(
        model=model,
        messages=messages,
        max_tokens=_max_tokens(body, ("max_completion_tokens", "max_tokens"), context, required=False),
        temperature=_number(body, "temperature", 0.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, open_low=True),
        seed=_seed(body),
        stop=_stops(body.get("stop"), "stop"),
        stream=bool(_get(body, "stream", (bool,), "a boolean", False)),
        include_usage=bool(_get(options, "include_usage", (bool,), "a boolean", False)),
        agent_id=user or None,
    )


def openai_usage(usage: Usage) -> dict:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


class OpenAIStream:
    """The server-sent events of one streamed chat completion (dicts for
    sse-starlette): ``start()``, ``text(piece)`` per piece, then ``end(reply)``
    or ``error(e)``."""

    def __init__(self, model: str, include_usage: bool):
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model, self.include_usage = model, include_usage

    def _chunk(self, delta: dict, finish: str | None = None) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}

    def start(self) -> list[dict]:
        return _sse([self._chunk({"role": "assistant", "content": ""})])

    def text(self, piece: str) -> list[dict]:
        return _sse([self._chunk({"content": piece})])

    def end(self, reply: Reply) -> list[dict]:
        out = [self._chunk({}, reply.finish_reason)]
        if self.include_usage:
            out.append({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                        "model": self.model, "choices": [], "usage": openai_usage(reply.usage)})
        return [*_sse(out), {"data": "[DONE]"}]

    def error(self, e: APIError) -> list[dict]:
        return [*_sse([openai_error(e)]), {"data": "[DONE]"}]


def _sse(items) -> list[dict]:
    """Server-sent events: a JSON object each, or (event name, JSON object) pairs."""
    return [{"event": i[0], "data": json.dumps(i[1])} if isinstance(i, tuple) else {"data": json.dumps(i)}
            for i in items]


def openai_response(model: str, reply: Reply) -> dict:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                     "finish_reason": reply.finish_reason, "logprobs": None}],
        "usage": openai_usage(reply.usage),
    }


def openai_error(e: APIError) -> dict:
    return {"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}}


# ------------------------------------------------------------------ Anthropic

ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                         404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                         529: "overloaded_error"}


def anthropic_messages(body: dict) -> list[dict]:
    """The conversation of a Messages request (system prompt first)."""
    raw = _get(body, "messages", (list,), "a list of messages", required=True)
    if not raw:
        raise invalid("messages: must hold at least one message", "messages")
    system = body.get("system")
    messages = []
    if system is not None:
        text = _text(system, "system", allow_empty=True)
        if text:
            messages.append({"role": "system", "content": text})
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise invalid(f"{where}: must be an object with role and content", "messages")
        role = m.get("role")
        if role not in ("user", "assistant"):
            raise invalid(f"{where}.role: must be 'user' or 'assistant', got {role!r}", "messages")
        messages.append({"role": role, "content": _text(m.get("content"), f"{where}.content",
                                                         allow_empty=role == "assistant")})
    return messages


def anthropic_request(body: dict, context: int) -> ChatRequest:
    model = _get(body, "model", (str,), "a string", required=True)
    messages = anthropic_messages(body)
    if _get(body, "top_k", (int,), "an integer") is not None:
        raise invalid("top_k: is not supported (use temperature and top_p)", "top_k")
    metadata = _get(body, "metadata", (dict,), "an object", {})
    user = _get(metadata, "user_id", (str,), "a string")
    return ChatRequest(
        model=model,
        messages=messages,
        max_tokens=_max_tokens(body, ("max_tokens",), context, required=True),
        temperature=_number(body, "temperature", 0.0, 0.0, 1.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, open_low=True),
        seed=_seed(body),
        stop=_stops(body.get("stop_sequences"), "stop_sequences"),
        stream=bool(_get(body, "stream", (bool,), "a boolean", False)),
        agent_id=user or None,
    )


def _stop_reason(reply: Reply, stops: list[str], tokenizer, eos_ids: set[int]) -> tuple[str, str | None]:
    if reply.finish_reason == "length":
        return "max_tokens", None
    text = tokenizer.decode([t for t in reply.tokens if t not in eos_ids])
    cut = find_stop(text, stops)
    if cut is not None:
        return "stop_sequence", next(s for s in stops if text.startswith(s, cut))
    return "end_turn", None


def anthropic_usage(usage: Usage) -> dict:
    return {"input_tokens": usage.computed_tokens, "output_tokens": usage.completion_tokens,
            "cache_read_input_tokens": usage.cached_tokens, "cache_creation_input_tokens": 0}


def anthropic_response(model: str, reply: Reply, stops, tokenizer, eos_ids) -> dict:
    reason, sequence = _stop_reason(reply, stops, tokenizer, eos_ids)
    return {
        "id": f"msg_{uuid.uuid4().hex}",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": reply.text}],
        "stop_reason": reason,
        "stop_sequence": sequence,
        "usage": anthropic_usage(reply.usage),
    }


class AnthropicStream:
    """The server-sent events of one streamed message, as OpenAIStream's.
    ``usage``: the prompt's (known once the request is admitted)."""

    def __init__(self, model: str, usage: Usage, stops: list[str], tokenizer, eos_ids: set[int]):
        self.id = f"msg_{uuid.uuid4().hex}"
        self.model, self.usage, self.stops, self.tokenizer, self.eos_ids = model, usage, stops, tokenizer, eos_ids

    def start(self) -> list[dict]:
        message = {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
                   "stop_reason": None, "stop_sequence": None, "usage": anthropic_usage(self.usage)}
        return _sse([
            ("message_start", {"type": "message_start", "message": message}),
            ("content_block_start", {"type": "content_block_start", "index": 0,
                                     "content_block": {"type": "text", "text": ""}}),
            ("ping", {"type": "ping"}),
        ])

    def text(self, piece: str) -> list[dict]:
        return _sse([("content_block_delta", {"type": "content_block_delta", "index": 0,
                                              "delta": {"type": "text_delta", "text": piece}})])

    def end(self, reply: Reply) -> list[dict]:
        reason, sequence = _stop_reason(reply, self.stops, self.tokenizer, self.eos_ids)
        return _sse([
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ("message_delta", {"type": "message_delta",
                               "delta": {"stop_reason": reason, "stop_sequence": sequence},
                               "usage": {"output_tokens": reply.usage.completion_tokens}}),
            ("message_stop", {"type": "message_stop"}),
        ])

    def error(self, e: APIError) -> list[dict]:
        return _sse([("error", anthropic_error(e))])


def anthropic_error(e: APIError) -> dict:
    kind = e.kind if e.kind != "invalid_request_error" else ANTHROPIC_ERROR_TYPES.get(e.status, "api_error")
    if e.status >= 500:
        kind = "api_error"
    return {"type": "error", "error": {"type": kind, "message": e.message}}
