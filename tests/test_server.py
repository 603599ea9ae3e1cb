"""The HTTP server: real `kvsnap serve` processes on loopback ports, driven by
the openai and anthropic clients and by raw HTTP (httpx).

SmolLM2-135M, greedy decoding: the same conversation gives the same reply
whether the agent stayed in memory, was evicted, or came back after a
restart or an export/import.
"""

from __future__ import annotations

import json
import time

import anthropic
import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serving import SMOLLM as MODEL
from serving import Served, tiny_model_dir

SYSTEM = (
    "You are the planner of a small team. You read the task, split it into steps and hand each step "
    "to the right specialist. Keep answers short."
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Served(tmp_path_factory.mktemp("served") / "store")
    yield s
    s.stop()


def chat(client: openai.OpenAI, agent: str | None, messages: list[dict], max_tokens: int = 12, **kw):
    """(reply text, usage, raw response headers)."""
    headers = {"X-Agent-Id": agent} if agent else {}
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=messages, max_tokens=max_tokens, extra_headers=headers, **kw
    )
    completion = raw.parse()
    return completion.choices[0].message.content, completion.usage, raw.headers


def conversation(*turns: str) -> list[dict]:
    """System prompt, then user/assistant turns alternating (user first)."""
    out = [{"role": "system", "content": SYSTEM}]
    for i, t in enumerate(turns):
        out.append({"role": "user" if i % 2 == 0 else "assistant", "content": t})
    return out


# ------------------------------------------------------------------- OpenAI


def test_openai_client_second_request_reuses_the_first(server):
    client = server.openai()
    first = conversation("Plan a birthday party in three steps.")
    text1, usage1, headers1 = chat(client, "oa-planner", first)
    assert text1 and usage1.completion_tokens > 0
    assert usage1.prompt_tokens_details.cached_tokens == 0
    assert headers1["x-kvsnap-cache-source"] == "none"
    second = conversation("Plan a birthday party in three steps.", text1, "Now make step two cheaper.")
    text2, usage2, headers2 = chat(client, "oa-planner", second)
    assert text2
    # Everything of the first request was reused: its prompt and its reply
    # (minus the reply's last token, whose K/V is computed with the new turn).
    assert usage2.prompt_tokens_details.cached_tokens >= usage1.prompt_tokens + usage1.completion_tokens - 1
    assert usage2.prompt_tokens_details.cached_tokens < usage2.prompt_tokens
    assert headers2["x-kvsnap-cache-source"] == "hot"
    assert int(headers2["x-kvsnap-cached-tokens"]) == usage2.prompt_tokens_details.cached_tokens


def test_openai_streaming_gives_the_same_text_and_usage(server):
    client = server.openai()
    messages = conversation("List two risks of the plan.")
    text, usage, _ = chat(client, "oa-plain", messages, max_tokens=16)
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=16, stream=True,
        stream_options={"include_usage": True}, extra_headers={"X-Agent-Id": "oa-streamed"},
    )
    pieces, finish, streamed_usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            streamed_usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == text
    assert finish in ("stop", "length")
    assert streamed_usage.completion_tokens == usage.completion_tokens
    assert streamed_usage.prompt_tokens == usage.prompt_tokens


def test_the_user_field_names_the_agent_and_no_name_is_stateless(server):
    client = server.openai()
    messages = conversation("Name one tool the team needs.")
    client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, user="oa-by-user")
    agents = httpx.get(server.url + "/v1/agents").json()["data"]
    assert "oa-by-user" in {a["id"] for a in agents}
    before = {a["id"] for a in agents}
    text, _, headers = chat(client, None, conversation("Say hello."))
    assert text
    assert "x-kvsnap-agent-id" not in headers
    assert {a["id"] for a in httpx.get(server.url + "/v1/agents").json()["data"]} == before


def test_stateless_requests_share_the_blocks_of_a_long_common_prompt(server):
    client = server.openai()
    long_system = " ".join(["Each step of the plan names its owner, its deadline and its budget."] * 40)
    first = [{"role": "system", "content": long_system}, {"role": "user", "content": "Plan a fair."}]
    _, usage1, _ = chat(client, None, first, max_tokens=2)
    assert usage1.prompt_tokens > 300
    second = [{"role": "system", "content": long_system}, {"role": "user", "content": "Plan a concert."}]
    _, usage2, headers = chat(client, None, second, max_tokens=2)
    assert headers["x-kvsnap-cache-source"] == "shared"
    assert usage2.prompt_tokens_details.cached_tokens >= 256  # the whole blocks of the common prompt
    assert usage2.prompt_tokens_details.cached_tokens < usage2.prompt_tokens


# ---------------------------------------------------------------- Anthropic


def test_anthropic_client_messages_streaming_and_count_tokens(server):
    client = server.anthropic()
    user = [{"role": "user", "content": "Plan a birthday party in three steps."}]
    first = client.messages.create(model=MODEL, system=SYSTEM, messages=user, max_tokens=12,
                                   metadata={"user_id": "an-planner"})
    assert first.content[0].type == "text" and first.content[0].text
    assert first.usage.cache_read_input_tokens == 0
    assert first.stop_reason in ("end_turn", "max_tokens")
    counted = client.messages.count_tokens(model=MODEL, system=SYSTEM, messages=user)
    assert counted.input_tokens == first.usage.input_tokens
    follow = [*user, {"role": "assistant", "content": first.content[0].text},
              {"role": "user", "content": [{"type": "text", "text": "Make step two cheaper."}]}]
    with client.messages.stream(model=MODEL, system=[{"type": "text", "text": SYSTEM}], messages=follow,
                                max_tokens=12, extra_headers={"X-Agent-Id": "an-planner"}) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == final.content[0].text and streamed
    total_prompt = final.usage.input_tokens + final.usage.cache_read_input_tokens
    assert final.usage.cache_read_input_tokens >= first.usage.input_tokens + first.usage.output_tokens - 1
    assert total_prompt == client.messages.count_tokens(model=MODEL, system=SYSTEM, messages=follow).input_tokens
    # The same two requests without streaming, on another agent: the same
    # replies. (The same forward passes: recomputing the conversation in one
    # prefill is not bit-equal on every BLAS, e.g. OpenBLAS's FMA kernels on
    # AMD Zen 3 round a row differently in matmuls of other row counts, and
    # a near tie in greedy decoding can then go the other way.)
    again = client.messages.create(model=MODEL, system=SYSTEM, messages=user, max_tokens=12,
                                   metadata={"user_id": "an-plain"})
    assert again.content[0].text == first.content[0].text
    plain = client.messages.create(model=MODEL, system=SYSTEM, messages=follow, max_tokens=12,
                                   metadata={"user_id": "an-plain"})
    assert plain.usage.cache_read_input_tokens == final.usage.cache_read_input_tokens
    assert plain.content[0].text == streamed


def test_anthropic_stop_sequences(server):
    client = server.anthropic()
    user = [{"role": "user", "content": "Describe a lighthouse in two sentences."}]
    free = client.messages.create(model=MODEL, messages=user, max_tokens=24)
    text = free.content[0].text
    words = text.split()
    assert len(words) >= 4, text
    stop = words[len(words) // 2]  # a word from the middle of the reply
    cut = client.messages.create(model=MODEL, messages=user, max_tokens=24, stop_sequences=["@@@", stop])
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    assert cut.content[0].text == text[: text.index(stop)]


# ---------------------------------------------------- eviction, restart, export


def test_evicted_and_restarted_agents_resume_from_disk_with_the_same_output(tmp_path):
    store = tmp_path / "store"
    s = Served(store)
    try:
        client = s.openai()
        turn1 = conversation("Plan a garden in three steps.")
        for agent in ("kept", "evicted"):
            reply1, _, _ = chat(client, agent, turn1)
        turn2 = conversation("Plan a garden in three steps.", reply1, "What should be planted first?")
        r = httpx.delete(s.url + "/v1/agents/evicted", params={"evict_only": "true"})
        assert r.status_code == 200 and r.json()["resident"] is False and r.json()["on_disk"] is True
        kept2, _, h_kept = chat(client, "kept", turn2)
        evicted2, usage, h_evicted = chat(client, "evicted", turn2)
        assert h_kept["x-kvsnap-cache-source"] == "hot"
        assert h_evicted["x-kvsnap-cache-source"] == "disk"
        assert usage.prompt_tokens_details.cached_tokens > 0
        assert evicted2 == kept2
        turn3 = conversation("Plan a garden in three steps.", reply1, "What should be planted first?",
                             kept2, "And what needs the most water?")
        reference, _, _ = chat(client, "kept", turn3)
    finally:
        s.stop()
    s = Served(store)
    try:
        resumed, usage, headers = chat(s.openai(), "evicted", turn3)
        assert headers["x-kvsnap-cache-source"] == "disk"
        assert usage.prompt_tokens_details.cached_tokens > 0
        assert resumed == reference
        ids = {a["id"] for a in httpx.get(s.url + "/v1/agents").json()["data"]}
        assert {"kept", "evicted"} <= ids
    finally:
        s.stop()


def test_export_from_one_server_and_import_into_another(server, tmp_path):
    client = server.openai()
    turn1 = conversation("Plan a trip to the sea in three steps.")
    reply1, _, _ = chat(client, "traveller", turn1)
    exported = httpx.get(server.url + "/v1/agents/traveller/export")
    assert exported.status_code == 200 and len(exported.content) > 1000
    turn2 = conversation("Plan a trip to the sea in three steps.", reply1, "What do we pack?")
    here, _, _ = chat(client, "traveller", turn2)
    other = Served(tmp_path / "fresh-store")
    try:
        r = httpx.put(other.url + "/v1/agents/imported", content=exported.content)
        assert r.status_code == 201, r.text
        assert r.json()["on_disk"] is True and r.json()["n_tokens"] > 0
        there, usage, headers = chat(other.openai(), "imported", turn2)
        assert headers["x-kvsnap-cache-source"] == "disk"
        assert usage.prompt_tokens_details.cached_tokens >= r.json()["n_tokens"] - 1
        assert there == here
        # A damaged snapshot is refused and the agent is left as it was.
        damaged = bytearray(exported.content)
        damaged[len(damaged) // 2] ^= 0xFF
        bad = httpx.put(other.url + "/v1/agents/imported", content=bytes(damaged))
        assert bad.status_code == 422, bad.text
        assert "imported" in httpx.get(other.url + "/v1/agents/imported").json()["id"]
    finally:
        other.stop()


def test_a_snapshot_of_another_model_is_refused_on_import(server, tmp_path):
    tiny = Served(tmp_path / "tiny-store", model=str(tiny_model_dir(tmp_path / "tiny-model")))
    try:
        body = {"model": "tiny-model", "messages": [{"role": "user", "content": "Hello there."}], "max_tokens": 2}
        assert httpx.post(tiny.url + "/v1/chat/completions", json=body, headers={"X-Agent-Id": "stranger"},
                          timeout=60).status_code == 200
        exported = httpx.get(tiny.url + "/v1/agents/stranger/export").content
    finally:
        tiny.stop()
    r = httpx.put(server.url + "/v1/agents/stranger", content=exported)
    assert r.status_code == 409, r.text
    assert "another model" in r.json()["error"]["message"]
    assert httpx.get(server.url + "/v1/agents/stranger").status_code == 404  # nothing was imported


def test_delete_forgets_the_agent(server):
    chat(server.openai(), "doomed", conversation("Say yes."), max_tokens=2)
    assert httpx.delete(server.url + "/v1/agents/doomed").json()["deleted"] is True
    r = httpx.get(server.url + "/v1/agents/doomed")
    assert r.status_code == 404 and "doomed" in r.json()["error"]["message"]
    assert not (server.store / "agents" / "doomed.safetensors").exists()


# ----------------------------------------------------------------- bad input


def post(server, path, body, headers=None):
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.url + path, content=content, headers={"content-type": "application/json",
                                                                   **(headers or {})}, timeout=30)


GOOD = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


@pytest.mark.parametrize(
    ("path", "body", "headers", "status", "names"),
    [
        ("/v1/chat/completions", b"{not json", None, 400, "JSON"),
        ("/v1/chat/completions", b"[1, 2]", None, 400, "object"),
        ("/v1/chat/completions", {**GOOD, "messages": "hi"}, None, 400, "messages"),
        ("/v1/chat/completions", {**GOOD, "messages": []}, None, 400, "messages"),
        ("/v1/chat/completions", {**GOOD, "messages": [{"role": "user", "content": ""}]}, None, 400, "empty"),
        ("/v1/chat/completions", {**GOOD, "messages": [{"role": "wizard", "content": "x"}]}, None, 400, "role"),
        ("/v1/chat/completions", {**GOOD, "model": "gpt-9"}, None, 404, "gpt-9"),
        ("/v1/chat/completions", {**GOOD, "model": 7}, None, 400, "model"),
        ("/v1/chat/completions", {**GOOD, "max_tokens": 0}, None, 400, "max_tokens"),
        ("/v1/chat/completions", {**GOOD, "max_tokens": -3}, None, 400, "max_tokens"),
        ("/v1/chat/completions", {**GOOD, "max_tokens": 10**9}, None, 400, "context"),
        ("/v1/chat/completions", {**GOOD, "max_tokens": "ten"}, None, 400, "max_tokens"),
        ("/v1/chat/completions", {**GOOD, "temperature": 7}, None, 400, "temperature"),
        ("/v1/chat/completions", {**GOOD, "top_p": 0}, None, 400, "top_p"),
        ("/v1/chat/completions", {**GOOD, "stop": [1]}, None, 400, "stop"),
        ("/v1/chat/completions", {**GOOD, "n": 3}, None, 400, "n"),
        ("/v1/chat/completions", {**GOOD, "messages": [{"role": "user", "content": "x" * 200_000}]},
         None, 400, "context"),
        ("/v1/chat/completions", GOOD, {"X-Agent-Id": "a/b"}, 400, "agent"),
        ("/v1/chat/completions", GOOD, {"X-Agent-Id": ".."}, 400, "agent"),
        ("/v1/chat/completions", {**GOOD, "user": "u" * 1_000_000}, None, 400, "agent"),
        ("/v1/chat/completions", b"{" + b" " * (9 << 20) + b"}", None, 413, "limit"),
        ("/v1/messages", {**GOOD, "max_tokens": 0}, None, 400, "max_tokens"),
        ("/v1/messages", {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}, None, 400, "max_tokens"),
        ("/v1/messages", {"model": MODEL, "max_tokens": 4, "messages": [
            {"role": "user", "content": [{"type": "image", "source": {}}]}]}, None, 400, "image"),
        ("/v1/messages", {"model": MODEL, "max_tokens": 4, "messages": []}, None, 400, "messages"),
        ("/v1/messages", {"model": "claude-9", "max_tokens": 4, "messages": GOOD["messages"]}, None, 404, "claude-9"),
        ("/v1/nowhere", GOOD, None, 404, "/v1/nowhere"),
    ],
)
def test_bad_requests_get_a_4xx_naming_the_problem(server, path, body, headers, status, names):
    r = post(server, path, body, headers)
    assert r.status_code == status, r.text
    error = r.json()
    if path.startswith("/v1/messages"):
        assert error["type"] == "error" and names.lower() in error["error"]["message"].lower()
    else:
        assert names.lower() in error["error"]["message"].lower()
        assert error["error"]["type"]
    assert httpx.get(server.url + "/health").status_code == 200


def test_oversized_headers_and_bad_agent_paths_are_refused(server):
    r = httpx.post(server.url + "/v1/chat/completions", json=GOOD, headers={"X-Agent-Id": "a" * 20_000})
    assert r.status_code == 400 and "agent_id" in r.json()["error"]["message"]
    # Headers over the HTTP parser's limit (64 KiB) are refused before any
    # route runs: a 400, or the connection closed while the client still writes.
    try:
        status = httpx.post(server.url + "/v1/chat/completions", json=GOOD,
                            headers={"X-Agent-Id": "a" * 1_000_000}).status_code
    except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError):
        status = None
    assert status is None or 400 <= status < 500
    assert httpx.get(server.url + "/v1/agents/..").status_code in (400, 404)
    r = httpx.get(server.url + "/v1/agents/%2E%2E")
    assert r.status_code in (400, 404) and "error" in r.json()
    r = httpx.get(server.url + "/v1/agents/no-such-agent")
    assert r.status_code == 404 and "no-such-agent" in r.json()["error"]["message"]
    r = httpx.request("PATCH", server.url + "/v1/agents/x")
    assert r.status_code == 405 and "PATCH" in r.json()["error"]["message"]
    assert httpx.put(server.url + "/v1/agents/x", content=b"not a snapshot").status_code == 422
    assert httpx.get(server.url + "/health").status_code == 200


def test_a_client_that_disconnects_mid_stream_leaves_its_agent_consistent(server):
    messages = conversation("Write a long story about a lighthouse keeper.")
    body = {"model": MODEL, "messages": messages, "max_tokens": 400, "stream": True}
    got = 0
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                      headers={"X-Agent-Id": "leaver"}, timeout=60) as r:
        for line in r.iter_lines():
            got += line.startswith("data:")
            if got >= 5:
                break  # hang up
    # The request ends at its next token: the agent is free again, and holds
    # the prompt and the reply so far.
    deadline = time.time() + 30
    while (info := httpx.get(server.url + "/v1/agents/leaver", params={"history": "true"}).json())["busy"]:
        assert time.time() < deadline, "the request went on after its client left"
        time.sleep(0.1)
    # Its next request continues from that state.
    _, usage, headers = chat(server.openai(), "leaver", messages, max_tokens=3)
    assert headers["x-kvsnap-cache-source"] == "hot"
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1
    held = len(info["tokens"]) - usage.prompt_tokens  # reply tokens it had when its client left
    assert 4 <= held < 400
    after = httpx.get(server.url + "/v1/agents/leaver", params={"history": "true"}).json()
    # (the reply's last token gets its K/V with the next turn)
    assert len(after["tokens"]) == usage.prompt_tokens + usage.completion_tokens - 1
    assert after["tokens"][: usage.prompt_tokens] == info["tokens"][: usage.prompt_tokens]


# ------------------------------------------------------------- key, metrics


def test_api_key_is_required_for_everything_but_health(tmp_path):
    s = Served(tmp_path / "store", "--api-key", "sesame")
    try:
        for method, path in (("GET", "/v1/models"), ("GET", "/v1/agents"), ("GET", "/v1/agents/x"),
                             ("GET", "/metrics"), ("POST", "/v1/chat/completions"), ("POST", "/v1/messages"),
                             ("DELETE", "/v1/agents/x"), ("GET", "/v1/agents/x/export")):
            r = httpx.request(method, s.url + path, json=GOOD)
            assert r.status_code == 401, (path, r.text)
            r = httpx.request(method, s.url + path, json=GOOD, headers={"Authorization": "Bearer wrong"})
            assert r.status_code == 401, (path, r.text)
        with pytest.raises(openai.AuthenticationError):
            s.openai(api_key="wrong").chat.completions.create(model=MODEL, messages=GOOD["messages"], max_tokens=2)
        with pytest.raises(anthropic.AuthenticationError):
            s.anthropic(api_key="wrong").messages.create(model=MODEL, messages=GOOD["messages"], max_tokens=2)
        assert s.openai(api_key="sesame").chat.completions.create(
            model=MODEL, messages=GOOD["messages"], max_tokens=2, user="keyed").choices[0].message.content
        assert s.anthropic(api_key="sesame").messages.create(
            model=MODEL, messages=GOOD["messages"], max_tokens=2).content
        r = httpx.get(s.url + "/v1/agents", headers={"x-api-key": "sesame"})
        assert r.status_code == 200 and [a["id"] for a in r.json()["data"]] == ["keyed"]
        assert httpx.get(s.url + "/health").status_code == 200
    finally:
        s.stop()


def test_metrics_are_prometheus_text_with_the_runtime_figures(server):
    chat(server.openai(), "metered", conversation("Say yes."), max_tokens=3)
    chat(server.openai(), "metered", conversation("Say yes.", "Yes.", "Say no."), max_tokens=3)
    r = httpx.get(server.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    value = {f.name: f.samples[0].value for f in families.values() if len(f.samples) == 1}
    assert value["kvsnap_agents_resident"] >= 1
    assert value["kvsnap_budget_bytes"] == 256 * 10**6
    assert 0 < value["kvsnap_budget_bytes_in_use"] <= value["kvsnap_budget_bytes"]
    hits = {s.labels["source"]: s.value for s in families["kvsnap_prompt_cache_hits"].samples
            if s.name.endswith("_total")}
    assert hits["hot"] >= 1 and hits["none"] >= 1
    tokens = {s.labels["kind"]: s.value for s in families["kvsnap_prompt_tokens"].samples
              if s.name.endswith("_total")}
    assert tokens["reused"] > 0 and tokens["computed"] > 0
    ttft = {s.name: s.value for s in families["kvsnap_ttft_seconds"].samples}
    assert ttft["kvsnap_ttft_seconds_count"] >= 2
    assert families["kvsnap_inter_token_latency_seconds"].samples
    assert value["kvsnap_batch_size"] >= 1


def test_models_and_health(server):
    models = server.openai().models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"

