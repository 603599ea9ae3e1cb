"""Hostile HTTP input against a real `kvsnap serve` (the small random-weight
model of tests/serving.py): hypothesis draws request bodies (any JSON,
valid requests with fields replaced by any JSON value, raw bytes), agent
ids crafted for traversal and random headers, for the OpenAI and Anthropic
routes. Every answer is a 200 with a well-formed completion, or a 4xx with
an OpenAI- or Anthropic-style error object; never a 5xx, never an
unexpected error in the server's log; the server keeps serving. Also:
oversized headers and bodies, deep nesting, huge numbers.
"""

from __future__ import annotations

import json
import socket

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serving import Served, tiny_model_dir

EXAMPLES = 100  # per route: 200 in all
ROUTES = ("/v1/chat/completions", "/v1/messages")
TRAVERSAL = ["..", "../x", "a/b", "a\\b", "%2e%2e", "%2F", ".hidden", "-x", "x" * 129, "x" * 200, "/etc/passwd",
             "C:\\x", "a..b", "~stateless-1", "ok-id", "ok.id_2", "a b"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    model = str(tiny_model_dir(folder / "tiny-llama"))
    s = Served(folder / "store", "--default-max-tokens", "4", "--max-body", "64KiB", model=model)
    yield s
    s.stop()
    log = s.log.read_text()
    assert "unexpected error" not in log and "Traceback" not in log, log[-3000:]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=10,
)
FIELDS = ["model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed",
          "stop", "stop_sequences", "stream", "stream_options", "n", "user", "metadata", "system", "content",
          "role"]


def good_body(served: Served, route: str) -> dict:
    return {"model": served.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}


@st.composite
def bodies(draw, route: str):
    kind = draw(st.sampled_from(["json", "mutated", "messages", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "json":
        return draw(json_values)
    body = {"model": "MODEL", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
    if kind == "mutated":
        for name in draw(st.lists(st.sampled_from(FIELDS) | st.text(max_size=8), min_size=1, max_size=4)):
            body[name] = draw(json_values)
    else:
        body["messages"] = draw(st.lists(st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "assistant", "system", "developer", "tool", "x"]) | json_values,
             "content": st.text(max_size=40) | json_values}), max_size=4))
    return body


def bounded(body, model: str):
    """The body with the real model name where it asked for one, and no long generations."""
    if isinstance(body, dict):
        if body.get("model") == "MODEL":
            body["model"] = model
        for name in ("max_tokens", "max_completion_tokens"):
            value = body.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and 4 < value <= 10**6:
                body[name] = 4  # valid but long: kept short (the context limit has its own test)
    return body


headers = st.fixed_dictionaries({}, optional={
    "X-Agent-Id": st.sampled_from(TRAVERSAL) | st.text(st.characters(min_codepoint=33, max_codepoint=126),
                                                       max_size=140),
    "content-type": st.sampled_from(["application/json", "text/plain", "", "multipart/form-data; boundary=x"]),
    "anthropic-version": st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=30),
    "Authorization": st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40),
})


def check(served: Served, route: str, body, hdrs: dict) -> None:
    body = bounded(body, served.model)
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    with httpx.stream("POST", served.url + route, content=content, headers=hdrs, timeout=120) as r:
        raw = r.read()
    assert r.status_code < 500, (r.status_code, raw[:500], body)
    if r.status_code == 200:
        if r.headers["content-type"].startswith("text/event-stream"):
            assert b"error" not in raw or b'"type": "error"' not in raw, raw[:500]
            return
        out = json.loads(raw)
        assert (out["choices"][0]["message"]["role"] == "assistant" if route.endswith("completions")
                else out["type"] == "message"), out
        return
    assert 400 <= r.status_code < 500, r.status_code
    error = json.loads(raw)
    if route.startswith("/v1/messages"):
        assert error["type"] == "error" and error["error"]["type"] and error["error"]["message"], error
    else:
        assert error["error"]["message"] and error["error"]["type"], error


@pytest.mark.parametrize("route", ROUTES)
def test_fuzzed_requests_get_a_200_or_a_4xx_error_object(served, route):
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(body=bodies(route), hdrs=headers)
    def run(body, hdrs):
        check(served, route, body, hdrs)

    run()
    assert httpx.get(served.url + "/health").status_code == 200
    r = httpx.post(served.url + route, json=good_body(served, route), timeout=120)
    assert r.status_code == 200, r.text


def test_oversized_and_deep_input_is_refused(served):
    url = served.url + "/v1/chat/completions"
    good = good_body(served, "/v1/chat/completions")
    # A body over --max-body, sent without a length (chunked): 413.
    r = httpx.post(url, content=iter([b"{" + b" " * (100 << 10) + b"}"]))
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    # A length that lies about the limit is refused before the body is read.
    with socket.create_connection(("127.0.0.1", served.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 99999999999\r\n\r\n{}")
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
    # Many headers: under the parser's limit they are served, over it refused.
    many = {f"x-h{i}": "v" * 40 for i in range(200)}
    assert httpx.post(url, json=good, headers=many, timeout=60).status_code == 200
    try:
        status = httpx.post(url, json=good, headers={f"x-h{i}": "v" * 100 for i in range(2000)}).status_code
    except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError):
        status = None
    assert status is None or 400 <= status < 500
    # Deep nesting, huge numbers, NaN, a huge string of digits.
    for raw in (b"[" * 50_000 + b"]" * 50_000, b'{"model": ' + b"[" * 5000 + b"]" * 5000 + b"}",
                json.dumps({**good, "temperature": 1e308}).encode(),
                json.dumps({**good, "temperature": float("nan")}).encode(),
                json.dumps({**good, "max_tokens": 10**400}).encode(),
                b'{"model": "m", "max_tokens": ' + b"9" * 50_000 + b"}",
                json.dumps({**good, "messages": [{"role": "user", "content": "\ud800"}]}).encode(),
                b"\xff\xfe{}", b""):
        r = httpx.post(url, content=raw, headers={"content-type": "application/json"}, timeout=60)
        assert 400 <= r.status_code < 500, (raw[:60], r.status_code, r.text[:300])
        assert r.json()["error"]["message"]
    assert httpx.get(served.url + "/health").status_code == 200
