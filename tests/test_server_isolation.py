"""Per-key isolation, prompt text never stored, and a full disk, through a
real `kvsnap serve` on loopback (the small random-weight model of
tests/serving.py).

- ``--api-key`` given several times: each key owns its agents. Another key's
  client gets a 404 for them (read, continue, list, export, delete, import),
  as for an agent that does not exist, and no error names the namespace.
- A snapshot holds token ids, not the prompt's text.
- The store's disk full (a 3 MB tmpfs): the turn that cannot be saved gets a
  507 (non-streamed) or an error event in place of its final event
  (streamed); the server goes on serving; the agent keeps the turn in
  memory and saves it with its next turn, which survives a SIGKILL.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import httpx
import pytest
from kvsnap.store import Store
from serving import Served, tiny_model_dir

NAMESPACE = re.compile(r"k[0-9a-f]{16}\.")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return str(tiny_model_dir(tmp_path_factory.mktemp("models") / "tiny-llama"))


def ask(served: Served, model: str, agent: str | None, text: str, key: str | None = None, **body):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if agent:
        headers["X-Agent-Id"] = agent
    return httpx.post(served.url + "/v1/chat/completions", headers=headers, timeout=120,
                      json={"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 6,
                            **body})


def as_key(key: str) -> dict:
    return {"x-api-key": key}


def test_each_key_sees_only_its_own_agents(tiny, tmp_path):
    store = tmp_path / "store"
    s = Served(store, "--api-key", "alpha-key", "--api-key", "beta-key", model=tiny)
    try:
        assert ask(s, tiny, "planner", "Plan the garden.", "alpha-key").status_code == 200
        assert ask(s, tiny, "secret", "The vault code is one two three.", "alpha-key").status_code == 200
        r = ask(s, tiny, "planner", "Plan the kitchen, a longer plan with more words.", "beta-key")
        assert r.status_code == 200 and r.headers["x-kvsnap-agent-id"] == "planner"
        alpha = httpx.get(s.url + "/v1/agents/secret", params={"history": "true"}, headers=as_key("alpha-key"))
        assert alpha.status_code == 200 and alpha.json()["id"] == "secret" and "vault" in alpha.json()["text"]
        # Same name, two agents: each key's "planner" holds its own conversation.
        a_plan = httpx.get(s.url + "/v1/agents/planner", params={"history": "true"}, headers=as_key("alpha-key"))
        b_plan = httpx.get(s.url + "/v1/agents/planner", params={"history": "true"}, headers=as_key("beta-key"))
        assert "garden" in a_plan.json()["text"] and "kitchen" not in a_plan.json()["text"]
        assert "kitchen" in b_plan.json()["text"] and "garden" not in b_plan.json()["text"]

        beta = as_key("beta-key")
        listed = httpx.get(s.url + "/v1/agents", headers=beta).json()["data"]
        assert [a["id"] for a in listed] == ["planner"]
        assert sorted(a["id"] for a in httpx.get(s.url + "/v1/agents", headers=as_key("alpha-key")).json()["data"]) \
            == ["planner", "secret"]
        for method, path in (("GET", "/v1/agents/secret"), ("GET", "/v1/agents/secret?history=true"),
                             ("GET", "/v1/agents/secret/export"), ("DELETE", "/v1/agents/secret"),
                             ("DELETE", "/v1/agents/secret?evict_only=true")):
            r = httpx.request(method, s.url + path, headers=beta)
            assert r.status_code == 404, (method, path, r.text)
            assert "secret" in r.json()["error"]["message"] and not NAMESPACE.search(r.text)
        # A missing agent and another key's agent get the same answer.
        nowhere = httpx.get(s.url + "/v1/agents/nowhere", headers=beta)
        assert nowhere.status_code == 404
        assert nowhere.json()["error"]["code"] == httpx.get(s.url + "/v1/agents/secret", headers=beta) \
            .json()["error"]["code"]
        # "Continuing" another key's agent starts one of one's own: nothing reused, nothing read.
        r = ask(s, tiny, "secret", "The vault code is one two three.", "beta-key")
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert r.headers["x-kvsnap-cache-source"] == "none"
        # Importing over that name, deleting it: beta's own agent; alpha's is untouched.
        exported = httpx.get(s.url + "/v1/agents/planner/export", headers=beta)
        assert exported.status_code == 200
        assert httpx.put(s.url + "/v1/agents/secret", content=exported.content, headers=beta).status_code == 201
        assert httpx.delete(s.url + "/v1/agents/secret", headers=beta).status_code == 200
        again = httpx.get(s.url + "/v1/agents/secret", params={"history": "true"}, headers=as_key("alpha-key"))
        assert again.status_code == 200 and again.json()["tokens"] == alpha.json()["tokens"]
        # Errors name the client's id, never the namespace.
        r = ask(s, tiny, "x" * 120, "Hi", "beta-key")
        assert r.status_code == 400 and "110 characters" in r.text and not NAMESPACE.search(r.text)
    finally:
        s.stop()
    assert not any(p.name.startswith(("planner", "secret")) for p in (store / "agents").iterdir())
    # The namespaces depend on the keys, not on their order.
    s = Served(store, "--api-key", "beta-key", "--api-key", "alpha-key", model=tiny)
    try:
        r = httpx.get(s.url + "/v1/agents/secret", params={"history": "true"}, headers=as_key("alpha-key"))
        assert r.status_code == 200 and r.json()["tokens"] == alpha.json()["tokens"]
        assert httpx.get(s.url + "/v1/agents/secret", headers=as_key("beta-key")).status_code == 404
    finally:
        s.stop()


def test_prompt_text_is_not_stored(tiny, tmp_path):
    store = tmp_path / "store"
    s = Served(store, model=tiny)
    secret = "XYZZY-PLUGH-4711 the password is swordfish"
    try:
        assert ask(s, tiny, "keeper", f"Remember this: {secret}.").status_code == 200
        exported = httpx.get(s.url + "/v1/agents/keeper/export").content
        held = httpx.get(s.url + "/v1/agents/keeper", params={"history": "true"}).json()
        assert secret in held["text"]  # the agent holds it, as token ids
    finally:
        s.stop()
    files = [p for p in store.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    for needle in ("XYZZY", "swordfish"):
        for data in [p.read_bytes() for p in files] + [exported]:
            assert needle.encode() not in data and needle.encode("utf-16-le") not in data


# ------------------------------------------------------------------ full disk


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)],
                       check=False, capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()}): the full-disk test needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(folder: Path) -> Path:
    """Take every free byte of the filesystem."""
    filler = folder / "filler"
    with filler.open("wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler


def test_full_disk_gives_507_and_the_turn_is_saved_with_the_next(tiny, small_disk, tmp_path):
    store = small_disk / "store"
    s = Served(store, model=tiny, log=tmp_path / "server.log")
    try:
        for agent in ("writer", "streamer", "bystander"):
            assert ask(s, tiny, agent, f"[{agent} t0] Start.").status_code == 200
        on_disk = {a: Store(store, create=False, read_only=True).agent_tokens(a).tolist()
                   for a in ("writer", "streamer")}
        filler = fill(small_disk)
        # Non-streamed: a 507 naming the full disk.
        r = ask(s, tiny, "writer", "[writer t0] Start. [writer t1] Go on, please, with more words.")
        assert r.status_code == 507, r.text
        assert r.json()["error"]["code"] == "disk_full" and "disk is full" in r.json()["error"]["message"]
        # Streamed: the text, then an error event instead of the final event.
        body = {"model": tiny, "max_tokens": 6, "stream": True, "messages": [
            {"role": "user", "content": "[streamer t0] Start. [streamer t1] Go on, please, with more words."}]}
        events = []
        with httpx.stream("POST", s.url + "/v1/chat/completions", json=body, headers={"X-Agent-Id": "streamer"},
                          timeout=120) as stream:
            assert stream.status_code == 200
            events = [json.loads(line[6:]) for line in stream.iter_lines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
        assert events[-1]["error"]["code"] == "disk_full"
        assert not any(c.get("choices") and c["choices"][0]["finish_reason"] for c in events)
        # The server goes on serving: other agents (from memory), stateless requests, the agents API.
        assert ask(s, tiny, None, "Hello").status_code == 200
        held = httpx.get(s.url + "/v1/agents/writer", params={"history": "true"}).json()
        assert held["resident"] and "[writer t1]" in held["text"]  # the turn is kept in memory
        metrics = httpx.get(s.url + "/metrics").text
        assert float(re.search(r"^kvsnap_save_errors_total (\S+)$", metrics, re.MULTILINE).group(1)) >= 2
        # The store still holds the previous turn of each agent, intact.
        disk = Store(store, create=False, read_only=True)
        assert {a: disk.agent_tokens(a).tolist() for a in on_disk} == on_disk
        assert not [p for p in store.rglob("*") if ".tmp" in p.name or p.name.startswith(".")]
        # Space again: the next turn saves everything, including the unsaved turn.
        filler.unlink()
        r = ask(s, tiny, "writer", "[writer t0] Start. [writer t1] Go on, please, with more words. [writer t2] End.")
        assert r.status_code == 200, r.text
        want = httpx.get(s.url + "/v1/agents/writer", params={"history": "true"}).json()["tokens"]
    finally:
        s.kill()
    assert Store(store, create=False, read_only=True).verify() == []
    s = Served(store, model=tiny, log=tmp_path / "server.log")
    try:
        got = httpx.get(s.url + "/v1/agents/writer", params={"history": "true"}).json()
        assert got["tokens"] == want and "[writer t1]" in got["text"] and "[writer t2]" in got["text"]
    finally:
        s.stop()
