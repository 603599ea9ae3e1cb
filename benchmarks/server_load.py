"""A bounded load test of `kvsnap serve` on loopback.

    python benchmarks/server_load.py [--clients 16] [--agents 8] [--seconds 120] [--url URL]

Starts a server (SmolLM2-135M, a temporary store) unless --url is given.
Each client thread talks to one agent (client i to agent i % agents, so
agents are shared by several clients) in a growing conversation: every turn
sends the whole conversation so far plus a new user message carrying a
marker unique to the client and turn, streamed, with greedy decoding. After
the time is up, each agent's history (GET /v1/agents/{id}?history=true) must
be exactly the conversation of the last request served for it: its markers,
in order, and its reply — no lost or interleaved state. Records requests,
HTTP statuses, latency p50/p95 (whole request and first token), and tokens/s.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

MODEL = "smollm2-135m"
SYSTEM = ("You are one of several assistants of a small team. Answer each message in one short sentence, "
          "then stop.")
TOPICS = ["the garden", "the budget", "the schedule", "the report", "the trip", "the kitchen", "the code",
          "the music"]
MARKER = re.compile(r"\[c(\d+)t(\d+)\]")


@dataclass
class Turn:
    client: int
    agent: str
    markers: list[str]  # every marker of the conversation sent and received, in order
    reply: str
    status: int
    started: float
    first_token: float | None
    finished: float
    completion_tokens: int


@dataclass
class Load:
    turns: list[Turn] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(store: Path, budget: str = "512MB") -> tuple[subprocess.Popen, str, Path]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = store.parent / "server.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvsnap.cli", "serve", "--model", MODEL, "--store", str(store), "--port",
         str(port), "--budget", budget, "--log-level", "warning"],
        stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {log.read_text()}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url, log
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"the server did not start: {log.read_text()}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def client_loop(url: str, client: int, agent: str, until: float, load: Load, max_tokens: int,
                turns_per_conversation: int) -> None:
    messages: list[dict] = [{"role": "system", "content": SYSTEM}]
    turn = 0
    with httpx.Client(timeout=300) as http:
        while time.time() < until:
            if len(messages) > 2 * turns_per_conversation:  # start over: bounded contexts
                messages = messages[:1]
            marker = f"[c{client}t{turn}]"
            messages.append({"role": "user",
                             "content": f"{marker} Say one thing about {TOPICS[(client + turn) % len(TOPICS)]}."})
            body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "stream": True,
                    "stream_options": {"include_usage": True}}
            started, first, pieces, usage, status = time.perf_counter(), None, [], None, 0
            try:
                with http.stream("POST", url + "/v1/chat/completions", json=body,
                                 headers={"X-Agent-Id": agent}) as r:
                    status = r.status_code
                    if status != 200:
                        r.read()
                        raise RuntimeError(f"HTTP {status}: {r.text[:300]}")
                    for line in r.iter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            raise RuntimeError(f"error in stream: {chunk['error']}")
                        if chunk.get("usage"):
                            usage = chunk["usage"]
                        for choice in chunk["choices"]:
                            if choice["delta"].get("content"):
                                first = first or time.perf_counter()
                                pieces.append(choice["delta"]["content"])
            except (httpx.HTTPError, RuntimeError) as e:
                with load.lock:
                    load.errors.append(f"client {client} turn {turn}: {e}")
                    load.turns.append(Turn(client, agent, [], "", status, started, None, time.perf_counter(), 0))
                messages.pop()
                turn += 1
                continue
            reply = "".join(pieces)
            markers = markers_in("".join(m["content"] for m in messages) + reply)  # replies may echo one
            with load.lock:
                load.turns.append(Turn(client, agent, markers, reply, status, started, first,
                                       time.perf_counter(), usage["completion_tokens"] if usage else 0))
            messages.append({"role": "assistant", "content": reply})
            turn += 1


def markers_in(text: str) -> list[str]:
    return [f"[c{c}t{t}]" for c, t in MARKER.findall(text)]


def check_histories(url: str, load: Load) -> list[str]:
    """Each agent's history is the conversation of the last request served for it."""
    problems = []
    by_agent: dict[str, Turn] = {}
    for t in sorted((t for t in load.turns if t.status == 200 and t.markers), key=lambda t: t.finished):
        by_agent[t.agent] = t
    for agent, last in sorted(by_agent.items()):
        info = httpx.get(url + f"/v1/agents/{agent}", params={"history": "true"}, timeout=60).json()
        text = info["text"]
        held = markers_in(text)
        if held != last.markers:
            problems.append(f"{agent}: holds markers {held}, its last request sent {last.markers}")
        elif last.reply and last.reply[:20] not in text[text.rfind(last.markers[-1]):]:
            problems.append(f"{agent}: its last reply {last.reply[:40]!r} is not in its history")
    return problems


def run_load(url: str, *, clients: int, agents: int, seconds: float, max_tokens: int = 12,
             turns_per_conversation: int = 8) -> dict:
    load = Load()
    t0 = time.perf_counter()
    until = time.time() + seconds
    threads = [threading.Thread(target=client_loop, args=(url, c, f"load-{c % agents}", until, load, max_tokens,
                                                          turns_per_conversation)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    ok = [t for t in load.turns if t.status == 200 and t.markers]
    latency = [t.finished - t.started for t in ok]
    ttft = [t.first_token - t.started for t in ok if t.first_token]
    statuses: dict[str, int] = {}
    for t in load.turns:
        statuses[str(t.status)] = statuses.get(str(t.status), 0) + 1
    problems = check_histories(url, load)
    metrics = httpx.get(url + "/metrics", timeout=30).text
    batch = re.search(r"^kvsnap_batch_size (\S+)$", metrics, re.MULTILINE)
    tokens = sum(t.completion_tokens for t in ok)
    return {
        "clients": clients, "agents": agents, "seconds": round(elapsed, 1), "requests": len(load.turns),
        "completed": len(ok), "statuses": statuses, "errors": load.errors[:20],
        "server_errors": sum(n for s, n in statuses.items() if s.startswith("5")),
        "latency_p50_s": statistics.median(latency) if latency else None,
        "latency_p95_s": float(np.percentile(latency, 95)) if latency else None,
        "ttft_p50_s": statistics.median(ttft) if ttft else None,
        "ttft_p95_s": float(np.percentile(ttft, 95)) if ttft else None,
        "completion_tokens": tokens, "tokens_per_s": tokens / elapsed,
        "history_problems": problems,
        "mean_decode_batch": float(batch.group(1)) if batch else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--agents", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--max-tokens", type=int, default=12)
    parser.add_argument("--url", default=None, help="a running server (default: start one)")
    parser.add_argument("--quick", action="store_true", help="20 seconds")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    args = parser.parse_args()
    if args.quick:
        args.seconds = 20
    proc = None
    with tempfile.TemporaryDirectory() as tmp:
        url = args.url
        if url is None:
            proc, url, _ = start_server(Path(tmp) / "store")
        try:
            result = run_load(url, clients=args.clients, agents=args.agents, seconds=args.seconds,
                              max_tokens=args.max_tokens)
        finally:
            if proc is not None:
                stop_server(proc)
    print(f"{'clients':>8} {'agents':>7} {'seconds':>8} {'requests':>9} {'5xx':>4} {'p50 s':>7} {'p95 s':>7} "
          f"{'TTFT p50':>9} {'TTFT p95':>9} {'tok/s':>7} {'batch':>6} {'state ok':>9}")
    r = result
    print(f"{r['clients']:>8} {r['agents']:>7} {r['seconds']:>8} {r['completed']:>9} {r['server_errors']:>4} "
          f"{r['latency_p50_s']:>7.2f} {r['latency_p95_s']:>7.2f} {r['ttft_p50_s']:>9.2f} {r['ttft_p95_s']:>9.2f} "
          f"{r['tokens_per_s']:>7.1f} {r['mean_decode_batch'] or 0:>6.2f} {not r['history_problems']!s:>9}")
    for p in r["history_problems"]:
        print("STATE PROBLEM:", p)
    for e in r["errors"]:
        print("ERROR:", e)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "server_load.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out / 'server_load.json'}")
    if r["server_errors"] or r["history_problems"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
