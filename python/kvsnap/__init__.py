"""kvsnap: persistent 4-bit KV memory for multi-agent LLM inference on MLX."""

from kvsnap import errors
from kvsnap._ext import Arena
from kvsnap.ops import attention, kv_write, q4_attention

__version__ = "0.1.0"

__all__ = ["Arena", "attention", "errors", "kv_write", "q4_attention"]
