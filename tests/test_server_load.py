"""The bounded load test of benchmarks/server_load.py, short: 16 concurrent
clients over 8 agents for 20 seconds against a real server on loopback. No
5xx, every request completes, and afterwards each agent's history is exactly
the conversation of the last request served for it (nothing lost, nothing
interleaved). The 2-minute run's figures are in benchmarks/RESULTS.md."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "server_load.py"


@pytest.fixture(scope="module")
def server_load():
    spec = importlib.util.spec_from_file_location("server_load", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["server_load"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_sixteen_clients_over_eight_agents(server_load, tmp_path):
    proc, url, log = server_load.start_server(tmp_path / "store")
    try:
        result = server_load.run_load(url, clients=16, agents=8, seconds=20, max_tokens=8)
    finally:
        server_load.stop_server(proc)
    assert result["errors"] == [], (result["errors"], log.read_text()[-3000:])
    assert result["server_errors"] == 0
    assert set(result["statuses"]) == {"200"}
    assert result["completed"] >= 16  # every client finished at least one turn
    assert result["history_problems"] == []
    assert result["mean_decode_batch"] > 1  # agents decoded together
