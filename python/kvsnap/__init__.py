"""kvsnap: persistent 4-bit KV memory for multi-agent LLM inference on MLX."""

from kvsnap import errors
from kvsnap._ext import Arena, Budget
from kvsnap.ops import attention, kv_write, q4_attention
from kvsnap.store import Store, load, save

__version__ = "0.1.0"

__all__ = ["Arena", "Budget", "Store", "attention", "errors", "kv_write", "load", "q4_attention", "save"]
