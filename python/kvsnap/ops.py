"""Python entry points of kvsnap's primitives.

``kv_write`` quantizes new keys/values into arena slots; ``attention`` reads
them back through a block table with the fused quantized kernel;
``q4_attention`` runs the same kernel over contiguous MLX-layout triples (what
``mx.quantize`` returns and mlx-lm's ``QuantizedKVCache`` holds).

They run on the CPU stream unless given another. A GPU stream needs a build
with the Metal kernels (macOS); there, the first GPU call of each op runs
its self-check (kvsnap.metal) and, if the kernel disagrees with the CPU
kernel, that op uses its fallback for the rest of the process. Builds
without Metal kernels (Linux) refuse GPU streams with
``DeviceUnsupportedError``.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import numpy as np

from kvsnap import _ext, metal
from kvsnap.errors import DeviceUnsupportedError, InvalidArgumentError

Triple = Sequence[mx.array]


def _int_table(value, name: str) -> np.ndarray:
    """A [B, max_blocks] int32 table from a list, numpy or mx array."""
    try:
        table = np.asarray(value)
    except Exception as e:
        raise InvalidArgumentError(f"{name}: not an integer table ({e})", name) from e
    if table.ndim != 2 or not np.issubdtype(table.dtype, np.integer):
        raise InvalidArgumentError(
            f"{name}: must be a 2-D integer table (B, max_blocks), got "
            f"shape {table.shape} dtype {table.dtype}",
            name,
        )
    if table.size and (table.min() < np.iinfo(np.int32).min or table.max() > np.iinfo(np.int32).max):
        raise InvalidArgumentError(f"{name}: values do not fit in int32", name)
    return np.ascontiguousarray(table, dtype=np.int32)


def _int_list(value, name: str) -> list[int]:
    """A list of Python ints from a list, numpy or mx array."""
    arr = np.asarray(value)
    if arr.ndim == 1 and arr.size == 0:
        return []
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise InvalidArgumentError(
            f"{name}: must be a 1-D list of integers, got shape {arr.shape} dtype {arr.dtype}",
            name,
        )
    if arr.size and (arr.min() < np.iinfo(np.int32).min or arr.max() > np.iinfo(np.int32).max):
        raise InvalidArgumentError(f"{name}: values do not fit in int32", name)
    return [int(x) for x in arr]


def _check_array(value, name: str) -> None:
    if not isinstance(value, mx.array):
        raise InvalidArgumentError(f"{name}: must be an mlx array, got {type(value).__name__}", name)


def _is_gpu(stream) -> bool:
    device = stream.device if isinstance(stream, mx.Stream) else stream
    device_type = device.type if isinstance(device, mx.Device) else device
    return device_type == mx.gpu


def _stream(stream, op: str):
    """The stream to run on: the CPU unless told otherwise. A GPU stream is
    refused by builds without the Metal kernels."""
    if stream is None:
        return mx.cpu
    if _is_gpu(stream) and not metal.kernels_built():
        raise DeviceUnsupportedError(
            f"{op}: this kvsnap build has no GPU kernels (they are built on macOS only); "
            "run it on the CPU stream (mx.cpu)"
        )
    return stream


def _metal_fallback(stream, op: str) -> bool:
    """True when a GPU call of `op` must take its fallback (self-check failed)."""
    return _is_gpu(stream) and not metal.use_metal_kernel(op)


def kv_write(
    arena: _ext.Arena,
    layer: int,
    keys: mx.array,
    values: mx.array,
    block_table,
    offsets,
    *,
    counts=None,
    after: Sequence[mx.array] = (),
    stream=None,
    form: dict[str, mx.array] | None = None,
) -> mx.array:
    """Quantize keys/values ``[B, n_kv_heads, L, head_dim]`` into the arena.

    Token ``l`` of sequence ``b`` goes to position ``offsets[b] + l``, i.e. slot
    ``block_table[b][pos // block_tokens]`` at row ``pos % block_tokens``.
    ``counts`` (one int per sequence, ``0 <= counts[b] <= L``; default ``L``
    for each) is how many of the L tokens are real: prompts of different
    lengths prefilled in one batch are right-padded to a common L, and
    sequence ``b`` writes only its first ``counts[b]`` tokens. Padded tokens
    are neither quantized nor written, and only the blocks of the real tokens
    are checked (live, not shared), so ``block_table[b]`` needs to cover
    ``offsets[b] + counts[b]`` positions only.
    Returns a token array: pass it in ``after`` of the reads that must see the
    write. ``after`` here lists earlier reads of the same slots that must run
    before this write.

    ``form`` (CPU streams): the rows are quantized in kvsnap's stored form
    instead of as given, computed per token in the kernel: a dict of
    ``rotate`` (bool) and float32 arrays ``key_scale`` [n_kv_heads, D],
    ``shift_const`` [n_kv_heads, D], ``shift_w`` [n_kv_heads, E, D] with
    ``shift_table`` [> last position / 32, E, 32] (attention's bias_table
    layout; any may be left out). The key of KV head h at position p is
    stored as ``H((k - shift_const[h] - sum_e shift_table[p // 32, e, p % 32]
    * shift_w[h, e]) / key_scale[h])`` and a value as
    ``H(v)``, H the orthonormal Hadamard transform if ``rotate`` (else
    none): kvsnap.cache.store_form's key offsets and rotation.
    """
    _check_array(keys, "keys")
    _check_array(values, "values")
    stream = _stream(stream, "kv_write")
    if _metal_fallback(stream, "kv_write"):
        stream = mx.cpu  # the CPU kernel; the arena is unified memory
    return _ext.kv_write(
        arena,
        int(layer),
        keys,
        values,
        _int_table(block_table, "block_table"),
        _int_list(offsets, "offsets"),
        None if counts is None else _int_list(counts, "counts"),
        list(after),
        stream,
        **_form_args(form),
    )


_FORM_KEYS = ("rotate", "key_scale", "shift_const", "shift_w", "shift_table")


def _form_args(form) -> dict:
    if form is None:
        return {}
    if not isinstance(form, dict) or any(k not in _FORM_KEYS for k in form):
        raise InvalidArgumentError(f"form: a dict with keys among {', '.join(_FORM_KEYS)}, got {sorted(form) if isinstance(form, dict) else type(form).__name__}", "form")
    for k, v in form.items():
        if k == "rotate":
            if not isinstance(v, bool):
                raise InvalidArgumentError(f"rotate: must be a bool, got {type(v).__name__}", "rotate")
        elif v is not None:
            _check_array(v, k)
    return form


def attention(
    arena: _ext.Arena,
    layer: int,
    queries: mx.array,
    block_table,
    lengths,
    *,
    scale: float,
    causal: bool = True,
    window: int | None = None,
    mask: mx.array | None = None,
    bias: tuple[mx.array, mx.array] | None = None,
    after: Sequence[mx.array] = (),
    stream=None,
    rotate: bool = False,
    query_scale: mx.array | None = None,
) -> mx.array:
    """Fused quantized attention over arena blocks.

    ``queries`` is ``[B, n_heads, L, head_dim]``; sequence ``b`` holds
    ``lengths[b]`` tokens in the blocks of ``block_table[b]``. With ``causal``
    the L queries are the last L positions of each sequence, each seeing the
    keys up to its own position; ``window`` limits a query to the last
    ``window`` keys (sliding-window layers). ``mask``: float scores added
    before the softmax, broadcastable to ``[B, n_heads, L, max(lengths)]``
    (kvsnap.offsets' correction). ``bias``: ``(bias_w, bias_table)``, float32
    ``[n_kv_heads, E, head_dim]`` and ``[>= max(lengths) / 32, E, 32]`` (the
    table in blocks of 32 key positions), a low-rank score bias: the score of
    query row q (of KV head h) and key t gains ``sum_e (scale * q .
    bias_w[h, e]) * bias_table[t // 32, e, t % 32]`` (kvsnap.offsets'
    correction, computed in the kernel; on a GPU stream as a mask).
    ``rotate`` and ``query_scale`` (float32 ``[n_kv_heads, head_dim]``): the
    basis kv_write's ``form`` stored the K/V in; each query row is multiplied
    by the query_scale row of its KV head and Hadamard-rotated, and the
    output rotated back (in the kernel on CPU streams). Returns ``[B,
    n_heads, L, head_dim]`` in the queries' dtype.
    """
    if not isinstance(rotate, bool):
        raise InvalidArgumentError(f"rotate: must be a bool, got {type(rotate).__name__}", "rotate")
    if query_scale is not None:
        _check_array(query_scale, "query_scale")
    if (rotate or query_scale is not None) and _is_gpu(_stream(stream, "attention")):
        return _attention_in_basis(arena, layer, queries, block_table, lengths, rotate, query_scale, scale=scale,
                                   causal=causal, window=window, mask=mask, bias=bias, after=after, stream=stream)
    _check_array(queries, "queries")
    if mask is not None:
        _check_array(mask, "mask")
    if bias is not None:
        if not isinstance(bias, (tuple, list)) or len(bias) != 2:
            raise InvalidArgumentError("bias: must be a (bias_w, bias_table) pair of mlx arrays", "bias")
        for name, x in zip(("bias_w", "bias_table"), bias):
            _check_array(x, name)
    if window is not None and (not isinstance(window, int) or window <= 0):
        raise InvalidArgumentError(f"window: must be a positive int or None, got {window!r}", "window")
    stream = _stream(stream, "attention")
    table, lengths = _int_table(block_table, "block_table"), _int_list(lengths, "lengths")
    args = (arena, int(layer), queries, table, lengths, float(scale), bool(causal), int(window or 0))
    if bias is not None and _is_gpu(stream):
        mask = _bias_mask(queries, bias, max(lengths, default=0), float(scale), mask)
        bias = None
    if _metal_fallback(stream, "attention"):
        # Checks the arguments as the kernel would (and discards the result),
        # then runs the writes it must follow: the fallback reads the arena now.
        _ext.attention(*args, list(after), mx.cpu, mask=mask)
        mx.eval(list(after))
        return metal.fallback_attention(*args, stream=stream, additive=mask)
    form = {"rotate": rotate, "query_scale": query_scale}
    if bias is None:
        return _ext.attention(*args, list(after), stream, mask=mask, **form)
    return _ext.attention(*args, list(after), stream, mask=mask, bias_w=bias[0], bias_table=bias[1], **form)


def scale_queries(queries: mx.array, query_scale: mx.array) -> mx.array:
    """Queries [B, Hq, L, D] times the query_scale row [n_kv_heads, D] of
    their KV head, as array ops (what attention's ``query_scale`` does)."""
    B, Hq, L, D = queries.shape
    hkv = query_scale.shape[0] if query_scale.ndim == 2 else 0
    if query_scale.shape != (hkv, D) or hkv == 0 or Hq % hkv:
        raise InvalidArgumentError(
            f"query_scale: must have shape (n_kv_heads, {D}), got {tuple(query_scale.shape)}", "query_scale"
        )
    q = queries.reshape(B, hkv, Hq // hkv, L, D) * query_scale[None, :, None, None, :].astype(queries.dtype)
    return q.reshape(B, Hq, L, D)


def _attention_in_basis(arena, layer, queries, block_table, lengths, rotate, query_scale, **kw) -> mx.array:
    """attention's ``rotate`` and ``query_scale`` as array ops around it (GPU streams)."""
    q = queries if query_scale is None else scale_queries(queries, query_scale)
    if rotate:
        q = mx.hadamard_transform(q, scale=q.shape[-1] ** -0.5)
    out = attention(arena, layer, q, block_table, lengths, **kw)
    return mx.hadamard_transform(out, scale=out.shape[-1] ** -0.5) if rotate else out


def _bias_mask(queries: mx.array, bias, n_keys: int, scale: float, mask: mx.array | None) -> mx.array:
    """The score bias as a float mask [B, n_heads, L, n_keys] (plus ``mask``)."""
    w, table = bias
    if w.ndim != 3 or table.ndim != 3 or queries.shape[1] % max(1, w.shape[0]) or table.shape[0] * 32 < n_keys:
        raise InvalidArgumentError(
            f"bias: shapes {tuple(w.shape)} and {tuple(table.shape)} do not fit queries "
            f"{tuple(queries.shape)} over {n_keys} keys", "bias")
    B, Hq, L, D = queries.shape
    hkv = w.shape[0]
    q = queries.astype(mx.float32).reshape(B, hkv, (Hq // hkv) * L, D)
    coef = (q * scale) @ mx.transpose(w, (0, 2, 1))  # [B, Hkv, G * L, E]
    table = mx.transpose(table, (1, 0, 2)).reshape(table.shape[1], -1)  # [E, positions]
    out = (coef @ table[:, :n_keys]).reshape(B, Hq, L, n_keys)
    return out if mask is None else out + mask


def q4_attention(
    queries: mx.array,
    keys: Triple,
    values: Triple,
    *,
    scale: float,
    mask: None | str | mx.array = None,
    group_size: int = 64,
    bits: int = 4,
    stream=None,
) -> mx.array:
    """Fused attention over contiguous quantized K/V triples.

    ``keys`` and ``values`` are ``(packed, scales, biases)`` of shape
    ``[B, n_kv_heads, T, ...]`` as ``mx.quantize`` lays them out. ``mask`` is
    None, ``"causal"`` (the L queries are the last L of T positions), or a
    boolean (True = attend) or additive array broadcastable to
    ``[B, n_heads, L, T]``.
    """
    _check_array(queries, "queries")
    for name, triple in (("keys", keys), ("values", values)):
        if not isinstance(triple, (tuple, list)) or not all(isinstance(x, mx.array) for x in triple):
            raise InvalidArgumentError(f"{name}: must be a (packed, scales, biases) tuple of mlx arrays", name)
    causal = False
    mask_array = None
    if isinstance(mask, str):
        if mask != "causal":
            raise InvalidArgumentError(f"mask: the only string mask is 'causal', got {mask!r}", "mask")
        causal = True
    elif mask is not None:
        _check_array(mask, "mask")
        mask_array = mask
    stream = _stream(stream, "q4_attention")
    args = (queries, list(keys), list(values), float(scale), causal, mask_array,
            int(group_size), int(bits))
    if _metal_fallback(stream, "q4_attention"):
        _ext.q4_attention(*args, mx.cpu)  # checks the arguments; never evaluated
        return metal.fallback_q4_attention(
            queries, keys, values, float(scale), mask, int(group_size), int(bits), stream=stream
        )
    return _ext.q4_attention(*args, stream)
