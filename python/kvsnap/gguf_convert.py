"""Convert a GGUF file (llama.cpp's format) to an mlx-lm model directory.

The directory holds what ``mlx_lm.utils.load`` reads: ``config.json``, float32
weights in ``model.safetensors`` under mlx-lm's parameter names, and a
``tokenizer.json`` + ``tokenizer_config.json`` rebuilt from the GGUF metadata.

Supported: the ``llama`` architecture (SmolLM2 and other llama-family models),
``qwen2`` (Qwen2 / Qwen2.5: llama plus Q/K/V biases) and ``gemma3`` (text
only), with byte-level BPE (``gpt2``) or SentencePiece BPE (``llama``)
tokenizers. Anything else is refused with a ModelLoadError.

What llama.cpp changes on the way in, and is undone here:
- every tensor's dims are stored in reverse order (the ``gguf`` reader already
  gives numpy order);
- the rows of llama Q and K projections are permuted into an interleaved
  rotary layout (qwen2 ones are not: llama.cpp keeps Qwen's layout);
- Gemma 3 RMSNorm weights are stored as (1 + w), mlx-lm adds the 1 itself;
- Gemma 3 settings the file does not carry (local rope base, the sliding /
  global layer pattern, the query scale) are filled in with Gemma 3's values.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from kvsnap.errors import ModelLoadError

# Bumped when the output of convert() changes; recorded next to converted models.
CONVERTER_VERSION = 1

# llama.cpp token types (gguf.TokenType)
NORMAL, CONTROL, USER_DEFINED, BYTE = 1, 3, 4, 6

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "gemma3")

# Per-layer GGUF tensor name -> mlx-lm name under model.layers.N.
LLAMA_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

GEMMA3_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

# Gemma 3 values that GGUF files do not store (they match every Gemma 3 size).
GEMMA3_ROPE_LOCAL_BASE = 10_000.0
GEMMA3_SLIDING_WINDOW_PATTERN = 6  # five sliding-window layers, then one global

# How byte-level BPE vocabularies split text into words, by `tokenizer.ggml.pre`
# (llama.cpp's name for the pre-tokenizer):
# - "gpt2", "default": GPT-2's regex;
# - "smollm": GPT-2's regex after splitting off every digit;
# - "qwen2": Qwen2's own regex (case-insensitive contractions, one digit per
#   word, a word may start with one punctuation character, newline runs kept
#   apart), on NFC-normalized text.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BYTE_LEVEL_PRE_TOKENIZERS = ("gpt2", "default", "smollm", "qwen2")


def convert(gguf_path: str | Path, out_dir: str | Path) -> dict:
    """Write the mlx-lm model directory for ``gguf_path`` into the existing
    directory ``out_dir``; returns the config written to config.json."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    reader = open_gguf(gguf_path)
    meta = read_metadata(reader, gguf_path)
    arch = meta["general.architecture"]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"{gguf_path}: GGUF architecture {arch!r} is not supported "
            f"(kvsnap converts: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    tensor_names = {t.name for t in reader.tensors}
    config = model_config(meta, tensor_names, gguf_path)
    weights = convert_weights(reader, config, gguf_path)
    if "model.embed_tokens.weight" not in weights:
        raise ModelLoadError(f"{gguf_path}: no token_embd.weight tensor")
    config["vocab_size"] = int(weights["model.embed_tokens.weight"].shape[0])  # may pad the vocab
    tokenizer, tokenizer_config = build_tokenizer(meta, gguf_path)

    # Each numpy array is dropped once MLX holds its copy: the float32 weights
    # are in memory once, not twice (2.5 GB for Qwen2.5-0.5B).
    arrays = {name: mx.array(weights.pop(name)) for name in list(weights)}
    mx.save_safetensors(str(out_dir / "model.safetensors"), arrays, metadata={"format": "mlx"})
    tokenizer.save(str(out_dir / "tokenizer.json"))
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config)
    _write_json(out_dir / "config.json", config)
    return config


# ------------------------------------------------------------------ reading


def open_gguf(path: Path):
    """A gguf.GGUFReader over ``path``; a file that is not a complete GGUF is
    refused here rather than failing halfway through the conversion."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, IndexError, ... on bad bytes
        raise ModelLoadError(
            f"{path} is not a readable GGUF file: truncated or corrupt? (the gguf reader said: {e})"
        ) from e
    size = path.stat().st_size
    for t in reader.tensors:
        end = t.data_offset + t.n_bytes
        if end > size:
            raise ModelLoadError(
                f"{path} is truncated: tensor {t.name} ends at byte {end} but the file "
                f"has {size} bytes; download or copy the file again"
            )
    return reader


def read_metadata(reader, path: Path) -> dict[str, Any]:
    """Every metadata field as a Python value (arrays as lists)."""
    meta = {}
    for key, field in reader.fields.items():
        try:
            meta[key] = field.contents()
        except Exception as e:
            raise ModelLoadError(f"{path}: cannot read GGUF metadata field {key} ({e})") from e
    for key in ("general.architecture", "tokenizer.ggml.model", "tokenizer.ggml.tokens"):
        if key not in meta:
            raise ModelLoadError(f"{path}: GGUF metadata has no {key}")
    return meta


def model_config(meta: dict, tensor_names: set[str], path: Path) -> dict:
    """mlx-lm's config.json for the model the metadata describes."""
    arch = meta["general.architecture"]

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ModelLoadError(f"{path}: GGUF metadata has no {arch}.{key}")
        return value

    if get("rope.scaling.type", "none") not in ("none", ""):
        raise ModelLoadError(
            f"{path}: rope scaling {get('rope.scaling.type')!r} is not supported by the converter"
        )
    n_heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    head_dim = int(meta.get(f"{arch}.attention.key_length") or hidden // n_heads)
    tokens = meta["tokenizer.ggml.tokens"]
    config = {
        "hidden_size": hidden,
        "num_hidden_layers": int(get("block_count")),
        "intermediate_size": int(get("feed_forward_length")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(get("attention.head_count_kv", n_heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": int(get("context_length")),
        "rope_theta": float(get("rope.freq_base", 10_000.0)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
    }
    if arch == "llama":
        config.update(model_type="llama", architectures=["LlamaForCausalLM"])
        if "rope_freqs.weight" in tensor_names:
            raise ModelLoadError(f"{path}: llama 3 style rope_freqs are not supported")
    elif arch == "qwen2":
        # The instruct models end a turn with <|im_end|> (the file's EOS) and a
        # text with <|endoftext|>; Qwen's generation_config stops at both.
        eos = [config["eos_token_id"]]
        if "<|endoftext|>" in tokens and tokens.index("<|endoftext|>") not in eos:
            eos.append(tokens.index("<|endoftext|>"))
        config.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"], eos_token_id=eos)
    elif arch == "gemma3":
        # A base Gemma 3 also stops at <end_of_turn>, as its generation_config says.
        eos = [config["eos_token_id"]]
        if "<end_of_turn>" in tokens:
            eos.append(tokens.index("<end_of_turn>"))
        config.update(
            model_type="gemma3_text",
            architectures=["Gemma3ForCausalLM"],
            eos_token_id=eos,
            rope_local_base_freq=GEMMA3_ROPE_LOCAL_BASE,
            sliding_window=int(get("attention.sliding_window")),
            sliding_window_pattern=GEMMA3_SLIDING_WINDOW_PATTERN,
            query_pre_attn_scalar=head_dim,
        )
    return config


# ------------------------------------------------------------------ weights


def convert_weights(reader, config: dict, path: Path) -> dict[str, np.ndarray]:
    """float32 numpy weights under mlx-lm's names."""
    from gguf.quants import dequantize

    gemma = config["model_type"] == "gemma3_text"
    rotary_permuted = config["model_type"] == "llama"
    layer_names = GEMMA3_LAYER_NAMES if gemma else LLAMA_LAYER_NAMES
    weights = {}
    for t in reader.tensors:
        name = mlx_name(t.name, layer_names)
        if name is None:
            raise ModelLoadError(f"{path}: unexpected tensor {t.name} for {config['model_type']}")
        try:
            w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        except NotImplementedError as e:
            raise ModelLoadError(
                f"{path}: tensor {t.name} has type {t.tensor_type.name}, which the gguf "
                f"package cannot dequantize"
            ) from e
        w = w.reshape(tuple(int(d) for d in reversed(t.shape)))
        if gemma and t.name.endswith("norm.weight"):
            w = w - 1.0
        elif rotary_permuted and name.endswith("q_proj.weight"):
            w = unpermute_rotary(w, config["num_attention_heads"])
        elif rotary_permuted and name.endswith("k_proj.weight"):
            w = unpermute_rotary(w, config["num_key_value_heads"])
        weights[name] = np.ascontiguousarray(w)
    return weights


def mlx_name(gguf_name: str, layer_names: dict[str, str]) -> str | None:
    """The mlx-lm parameter name of a GGUF tensor, None if it has none."""
    base, _, kind = gguf_name.rpartition(".")  # kind: weight / bias
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in layer_names:
        return f"model.layers.{parts[1]}.{layer_names[parts[2]]}.{kind}"
    if base in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[base]}.{kind}"
    return None


def unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's permutation of Q/K projection rows: within each head,
    rows were reordered from [first half | second half] of the rotary pairs to
    interleaved (x0, x_{d/2}, x1, ...); mlx-lm (like Hugging Face) uses halves."""
    rows = w.shape[0]
    head_dim = rows // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---------------------------------------------------------------- tokenizer


def build_tokenizer(meta: dict, path: Path):
    """(tokenizers.Tokenizer, tokenizer_config dict) from the GGUF metadata."""
    from tokenizers import AddedToken

    kind = meta["tokenizer.ggml.model"]
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if kind == "gpt2":
        tokenizer = _byte_level_bpe(meta, tokens, path)
    elif kind == "llama":
        tokenizer = _sentencepiece_bpe(meta, tokens, types, path)
    else:
        raise ModelLoadError(
            f"{path}: GGUF tokenizer model {kind!r} is not supported (kvsnap rebuilds "
            "'gpt2' byte-level BPE and 'llama' SentencePiece BPE tokenizers)"
        )

    # Control tokens (<|im_start|>, <eos>, ...) are special; user-defined ones
    # (Gemma's "\n\n", "<table>", runs of spaces) are matched whole in the text,
    # as llama.cpp does, but are ordinary text when decoding.
    tokenizer.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, k in zip(tokens, types)
            if k == CONTROL
        ]
    )
    tokenizer.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, k in zip(tokens, types)
            if k == USER_DEFINED
        ]
    )
    _add_bos_eos(tokenizer, meta, tokens)

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(meta.get(f"{meta['general.architecture']}.context_length", 8192)),
    }
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    return tokenizer, {k: v for k, v in config.items() if v is not None}


def _byte_level_bpe(meta: dict, tokens: list[str], path: Path):
    """GPT-2 style byte-level BPE: the file has the vocabulary in the byte
    alphabet and the merges in rank order."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in BYTE_LEVEL_PRE_TOKENIZERS:
        raise ModelLoadError(
            f"{path}: byte-level pre-tokenizer {pre!r} is not supported "
            f"(known: {', '.join(sorted(BYTE_LEVEL_PRE_TOKENIZERS))})"
        )
    if "tokenizer.ggml.merges" not in meta:
        raise ModelLoadError(f"{path}: byte-level BPE vocabulary without tokenizer.ggml.merges")
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    vocab = {t: i for i, t in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    if pre == "qwen2":
        tokenizer.normalizer = normalizers.NFC()
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if pre == "smollm":
            byte_level = pre_tokenizers.Sequence(
                [pre_tokenizers.Digits(individual_digits=True), byte_level]
            )
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece_bpe(meta: dict, tokens: list[str], types: list[int], path: Path):
    """SentencePiece BPE as Gemma has it: spaces become U+2581 (no space is
    prepended), pieces merge by score, characters outside the vocabulary fall
    back to <0xNN> byte tokens.

    The file has scores but no merges. SentencePiece always applies the
    adjacent merge whose result has the highest score, so ranking every
    (left, right) split of every normal piece by that piece's score gives the
    same result with the `tokenizers` BPE model."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    if meta.get("tokenizer.ggml.add_space_prefix", True):
        raise ModelLoadError(
            f"{path}: SentencePiece vocabularies with a space prefix (Llama 2 style) are not "
            "supported by the converter; Gemma-style ones are"
        )
    if "tokenizer.ggml.scores" not in meta:
        raise ModelLoadError(f"{path}: SentencePiece vocabulary without tokenizer.ggml.scores")
    scores = meta["tokenizer.ggml.scores"]
    vocab = {t: i for i, t in enumerate(tokens)}
    mergeable = {t for t, k in zip(tokens, types) if k == NORMAL}
    ranked = []
    for piece, kind, score in zip(tokens, types, scores):
        if kind != NORMAL:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                ranked.append((-score, vocab[piece], cut, left, right))
    ranked.sort()
    merges = [(left, right) for _, _, _, left, right in ranked]
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    tokenizer = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            unk_token=tokens[unk_id] if unk_id is not None else None,
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    tokenizer.normalizer = normalizers.Replace(" ", "\u2581")
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    return tokenizer


def _add_bos_eos(tokenizer, meta: dict, tokens: list[str]) -> None:
    """Put the BOS / EOS the file asks for into the tokenizer's post-processor,
    so every user of tokenizer.json (mlx-lm, transformers) adds them."""
    from tokenizers import processors

    add_bos = meta.get("tokenizer.ggml.add_bos_token", False)
    add_eos = meta.get("tokenizer.ggml.add_eos_token", False)
    if not (add_bos or add_eos):
        return
    specials = []
    single, pair = "$A:0", "$A:0 $B:1"
    if add_bos:
        bos = tokens[meta["tokenizer.ggml.bos_token_id"]]
        specials.append((bos, meta["tokenizer.ggml.bos_token_id"]))
        single, pair = f"{bos}:0 {single}", f"{bos}:0 $A:0 {bos}:1 $B:1"
    if add_eos:
        eos = tokens[meta["tokenizer.ggml.eos_token_id"]]
        specials.append((eos, meta["tokenizer.ggml.eos_token_id"]))
        single = f"{single} {eos}:0"
        pair = pair.replace("$A:0", f"$A:0 {eos}:0").replace("$B:1", f"$B:1 {eos}:1")
    tokenizer.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=specials
    )


def _write_json(path: Path, value: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, ensure_ascii=False)
        f.write("\n")
