"""Real `kvsnap serve` processes for the reliability tests: started on a free
loopback port, stopped with SIGTERM or killed with SIGKILL; and a small
random-weight model directory (SmolLM2's tokenizer, 4 layers of width 128)
that starts and answers several times faster than SmolLM2 itself."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import anthropic
import httpx
import mlx.core as mx
import openai
from kvsnap import models
from mlx.utils import tree_flatten
from mlx_lm.models import llama

SMOLLM = "smollm2-135m"


def tiny_model_dir(folder: Path) -> Path:
    """An mlx-lm model directory `kvsnap serve --model DIR` loads: a seeded
    random llama (same weights in every process), SmolLM2's tokenizer. Its output
    layer is scaled up so greedy choices are seldom near ties."""
    if (folder / "model.safetensors").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    source = models.model_path(SMOLLM)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, folder / name)
    config = {
        "model_type": "llama", "hidden_size": 128, "num_hidden_layers": 4, "intermediate_size": 256,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "rms_norm_eps": 1e-5,
        "vocab_size": 49152, "max_position_embeddings": 8192, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
    }
    mx.random.seed(12)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    model.lm_head.weight = mx.random.normal(model.lm_head.weight.shape) * 0.5
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """One `kvsnap serve` process on a loopback port."""

    def __init__(self, store: Path, *extra: str, model: str = SMOLLM, budget: str = "256MB",
                 log: Path | None = None):
        self.store, self.model = store, model
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log or store.parent / f"server-{self.port}.log"
        store.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kvsnap.cli", "serve", "--model", model, "--store", str(store),
                 "--port", str(self.port), "--budget", budget, "--log-level", "warning", *extra],
                stdout=out, stderr=subprocess.STDOUT,
            )
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        self.kill()
        raise AssertionError(f"the server did not start: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        """SIGTERM: uvicorn shuts down and the memory is closed (saved)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                raise AssertionError("the server did not stop within 60 s") from None

    def openai(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "unused"), max_retries=0, **kw)

    def anthropic(self, **kw) -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=self.url, api_key=kw.pop("api_key", "unused"), max_retries=0, **kw)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no save; only what is on disk survives."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=60)
