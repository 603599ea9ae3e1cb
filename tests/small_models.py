"""Small random-weight mlx-lm models of each family kvsnap serves (seeded:
the same weights, hence the same model fingerprint, in every process)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from mlx_lm.models import gemma3_text, llama, qwen2, qwen3

VOCAB = 500


def small_model(kind: str):
    mx.random.seed(1)
    common = {"hidden_size": 128, "num_hidden_layers": 4, "intermediate_size": 256, "vocab_size": VOCAB}
    if kind in ("llama", "mistral"):
        args = llama.ModelArgs(
            model_type=kind, num_attention_heads=8, num_key_value_heads=2, rms_norm_eps=1e-5,
            head_dim=64, tie_word_embeddings=True, **common,
        )
        model = llama.Model(args)
    elif kind == "qwen2":
        args = qwen2.ModelArgs(
            model_type="qwen2", num_attention_heads=2, num_key_value_heads=1, rms_norm_eps=1e-6,
            tie_word_embeddings=True, **common,
        )
        model = qwen2.Model(args)
    elif kind == "qwen3":
        args = qwen3.ModelArgs(
            model_type="qwen3", num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
            head_dim=64, tie_word_embeddings=True, max_position_embeddings=4096, rope_theta=10000.0,
            **common,
        )
        model = qwen3.Model(args)
    elif kind == "gemma3":
        args = gemma3_text.ModelArgs(
            model_type="gemma3_text", num_attention_heads=4, head_dim=64, rms_norm_eps=1e-6,
            num_key_value_heads=1, sliding_window=48, sliding_window_pattern=2,
            **{**common, "num_hidden_layers": 4},
        )
        model = gemma3_text.Model(args)
    else:
        raise ValueError(kind)
    mx.eval(model.parameters())
    return model


def prompt(n: int, seed: int = 0) -> mx.array:
    return mx.array(np.random.RandomState(seed).randint(0, VOCAB, n))
