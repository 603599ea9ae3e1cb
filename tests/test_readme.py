"""The README's examples run as written: the library's Python blocks on
SmolLM2-135M, and the server's curl command and client code against a real
`kvsnap serve` (only the address and the folders changed)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from serving import Served

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def section(title: str) -> str:
    start = README.index(f"## {title}")
    return README[start : README.index("\n## ", start + 1)]


def blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.DOTALL)


def test_the_library_examples_run(tmp_path):
    code = "\n".join(blocks(section("The library"), "python")).replace("~/agents", str(tmp_path / "agents"))
    code += "\nassert reply.usage.cached_tokens > 0 and cache.tokens == ids\nprint('README OK')\n"
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=False, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "README OK" in run.stdout
    assert (tmp_path / "planner.safetensors").is_file()


def test_the_server_examples_run(tmp_path):
    served = Served(tmp_path / "store")
    try:
        text = section("The server")
        (curl,) = [b for b in blocks(text, "bash") if b.startswith("curl")]
        curl = curl.replace("localhost:8080", served.url.removeprefix("http://"))
        run = subprocess.run(["bash", "-c", curl], check=False, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0 and '"chat.completion"' in run.stdout, run.stdout + run.stderr
        (client_code,) = blocks(text, "python")
        code = client_code.replace("http://localhost:8080", served.url)
        code += "\nassert r.choices[0].message.content and m.content[0].text\n"
        code += "assert r.usage.prompt_tokens_details.cached_tokens > 0  # the curl request's prompt\n"
        run = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
    finally:
        served.stop()
