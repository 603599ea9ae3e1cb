"""Smoothed keys: per-model key offsets removed, and key channels balanced, before quantizing.

Keys carry per-channel offsets (the same sign and size in nearly every token)
that inflate the range of every 4-bit group and so its rounding error. Since
q . (k - c) = q . k - q . c, subtracting one constant c from every key of a
KV head shifts all of a query's scores by the same amount, which softmax
cancels: attention is exactly unchanged (with masks and windows too).

kvsnap removes more than a constant. What is subtracted from the key of
position s of a KV head is

    c + R_s m + [s == 0] z

- c: a constant (the post-RoPE mean of what the rest leaves);
- R_s m: the model adds a constant m to every key before RoPE, which turns it
  by an angle that grows with the position, so after RoPE it is a different
  vector at each position. Only the PAIRS channel pairs where that rotating
  offset varies most are treated (m is zero elsewhere);
- z: the key of the first token (the attention sink, which most attention
  goes to) is far from the others; at position 0 it is subtracted as well.

The last two do not cancel in softmax: attention adds q . (R_s m + [s == 0] z)
back to the score of key s. That is a low-rank score bias the CPU kernels
compute themselves (kernel_bias): 2P + 1 coefficients per query row (q
dotted with the cos and sin components of each treated pair's offset, and
with z), times a table of cos and sin of each pair's angle per position and
a one at position 0: 2P + 1 multiply-adds per score, no mask in memory. On a
GPU stream the same bias is passed as a float mask (``correction`` is that
mask, kept as the reference the tests compare with).

Then the key channels are balanced: keys are stored divided by d and queries
multiplied by d (q . k unchanged), with d equal within each RoPE pair (so it
commutes with RoPE) and d = sqrt(key RMS / query RMS) per pair, which evens
out what a group's rounding error costs the scores.

On CPU streams all of it happens in the kernels, with no array op per layer:
kv_write removes the offsets and divides by d per token (``write_form``),
attention multiplies the queries by d (``query_scale``) and adds the
correction (``kernel_bias``). ``remove``, ``shift`` and ``correction`` are
the same as array ops (the reference the tests compare with, and GPU
streams).

RoPE is read from the model itself: each layer's rope module is probed on
unit vectors, which gives every channel's angle per position and its partner
channel, and the probe is checked against the module at far positions. A
layer whose rope is not such a rotation (or that has none kvsnap can find)
gets no rotating part; the format's mode says which parts are used.

The offsets are calibrated once per model from a built-in text
(kvsnap/data/calibration.txt, not part of any evaluation text) and cached
under $KVSNAP_HOME/offsets; without a tokenizer the calibration input is a
fixed pseudo-random token sequence instead. Their digest is part of the
cache's format, so a snapshot made with other offsets is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.models import cache as mlx_cache

CALIBRATION_TOKENS = 1024
FORMAT_VERSION = 1  # of the cached files and of the calibration (part of their name)
PAIRS = 8  # rotating channel pairs treated per layer ("pre" mode)
BALANCE = 0.5  # exponent of the key/query channel balance (0: none)
_PROBE_POSITIONS = (3, 517, 8191, 40000)
_DATA = Path(__file__).parent / "data" / "calibration.txt"

def register_tokenizer(model, tokenizer) -> None:
    """Tell make_cache(model) which tokenizer calibrates the model's offsets
    (kvsnap.models.load does)."""
    if tokenizer is not None:
        object.__setattr__(model, "_kvsnap_tokenizer", tokenizer)


@dataclass
class LayerOffsets:
    """Offsets of one attention layer: keys are stored as
    k_s - const - (cos(theta s) * m + sin(theta s) * jm)."""

    const: mx.array  # [Hkv, D] float32
    sink: mx.array | None = None  # [Hkv, D]: also subtracted at position 0 (the attention sink)
    m: mx.array | None = None  # [Hkv, D]: the rotating part, zero outside the treated pairs
    jm: mx.array | None = None  # [Hkv, D]: m turned a quarter turn within each pair
    theta: mx.array | None = None  # [D]: angle per position of each channel
    theta_pairs: mx.array | None = None  # [P]
    # [Hkv, D, 2P + 1]: q @ w = the cos and sin coefficients of each pair, and q . sink
    w: mx.array | None = None
    scale: mx.array | None = None  # [Hkv, D]: keys are stored divided by it, queries multiplied

    def remove(self, keys: mx.array, positions: mx.array, end: int) -> mx.array:
        """Keys [B, Hkv, L, D] at ``positions`` [B, L] (all below ``end``) as
        they are stored: (keys - shift) / scale."""
        keys = keys - self.shift(positions, end).astype(keys.dtype)
        return keys if self.scale is None else keys / self.scale[None, :, None, :].astype(keys.dtype)

    def shift(self, positions: mx.array, end: int) -> mx.array:
        """What is subtracted from keys at ``positions`` [B, L] (all below
        ``end``): [B, Hkv, L, D] (elementwise, from the same position table as
        the correction, so a sequence's keys are stored with the same bits
        alone or in a batch)."""
        out = self.const[None, :, None, :]
        if self.w is None:
            return out
        B, L = positions.shape
        table = self._table(end)
        at = mx.take(table, positions.reshape(-1).astype(mx.int32), axis=0).T.reshape(-1, B, 1, L, 1)
        basis = mx.transpose(self.w, (2, 0, 1))[:, None, :, None, :]  # [2P + 1, 1, Hkv, 1, D]
        return out + mx.sum(at * basis, axis=0)

    def correction(self, queries: mx.array, lengths: list[int], scale: float) -> mx.array | None:
        """Additive scores [B, Hq, L, max(lengths)]: scale times q . (what
        shift subtracted beyond the constant) for each key. None if only the
        constant is subtracted (softmax cancels it). Row b is computed alone
        (the same bits alone or in any batch) over its own lengths[b] keys."""
        if self.w is None:
            return None
        B, Hq, L, D = queries.shape
        hkv = self.w.shape[0]
        T = max(lengths)
        table = self._table(T)
        w = self._scaled_w(scale)
        if queries.dtype != mx.float32:
            queries = queries.astype(mx.float32)
        rows = []
        for b in range(B):
            q = (queries if B == 1 else queries[b]).reshape(hkv, (Hq // hkv) * L, D)
            n = max(0, lengths[b])
            row = ((q @ w) @ table[:n].T).reshape(1, Hq, L, n)
            if n < T:
                row = mx.concatenate([row, mx.zeros((1, Hq, L, T - n), dtype=row.dtype)], axis=3)
            rows.append(row)
        return rows[0] if B == 1 else mx.concatenate(rows, axis=0)

    def kernel_bias(self, rotate: bool, n_keys: int) -> tuple[mx.array, mx.array] | None:
        """The correction as kvsnap.attention's score bias, for queries as
        the kernel gets them (multiplied by the key scale, then rotated if
        ``rotate``) over keys at positions below ``n_keys``: (bias_w [Hkv,
        2P + 1, D], bias_table [>= n_keys / 32, 2P + 1, 32]). The kernel
        adds scale * (q . bias_w[e]) * bias_table[t // 32, e, t % 32] to the
        score of key t: what ``correction`` computes, without a mask."""
        if self.w is None:
            return None
        key = "_bias_w_rot" if rotate else "_bias_w"
        w = self.__dict__.get(key)
        if w is None:
            w = mx.transpose(self.w, (0, 2, 1))  # [Hkv, 2P + 1, D]
            if self.scale is not None:
                w = w / self.scale[:, None, :]
            if rotate:
                w = mx.hadamard_transform(w, scale=w.shape[-1] ** -0.5)
            w = mx.contiguous(w.astype(mx.float32))
            mx.eval(w)
            self.__dict__[key] = w
        return w, self._blocks(n_keys)

    def query_scale(self) -> mx.array | None:
        """kvsnap.ops.attention's ``query_scale``: queries are multiplied by
        the key scale (float32 [Hkv, D]; None without one)."""
        if self.scale is None:
            return None
        qs = self.__dict__.get("_query_scale")
        if qs is None:
            qs = mx.contiguous(self.scale.astype(mx.float32))
            mx.eval(qs)
            self.__dict__["_query_scale"] = qs
        return qs

    def write_form(self, end: int) -> dict[str, mx.array]:
        """``remove`` as kvsnap.ops.kv_write's ``form`` for keys at positions
        below ``end`` (the kernel computes it per token)."""
        form = self.__dict__.get("_form")
        if form is None:
            form = {"shift_const": self.const}
            if self.scale is not None:
                form["key_scale"] = self.scale
            if self.w is not None:
                form["shift_w"] = mx.transpose(self.w, (0, 2, 1))
            form = {k: mx.contiguous(v.astype(mx.float32)) for k, v in form.items()}
            mx.eval(form)
            self.__dict__["_form"] = form
        return form if self.w is None else {**form, "shift_table": self._blocks(end)}

    def _scaled_w(self, scale: float) -> mx.array:
        cached = self.__dict__.get("_w_scaled")
        if cached is None or cached[0] != scale:
            cached = (scale, scale * self.w)
            mx.eval(cached[1])
            self.__dict__["_w_scaled"] = cached
        return cached[1]

    def _table(self, n_keys: int) -> mx.array:
        """[>= n_keys, 2P + 1]: cos and sin of each pair's angle at positions
        0, 1, ..., and 1 at position 0 (the rows of ``_blocks``)."""
        blocks = self._blocks(n_keys)
        return mx.transpose(blocks, (0, 2, 1)).reshape(-1, blocks.shape[1])

    def _blocks(self, n_keys: int) -> mx.array:
        """The position table in the kernels' layout, blocks of 32 positions:
        [>= n_keys / 32, 2P + 1, 32] (a chunk of keys reads one run of
        memory); kept and grown by doubling (one per layer, shared by every
        cache of the model)."""
        table = self.__dict__.get("_positions")
        if table is None or table.shape[0] * 32 < n_keys:
            n = max(1024, 1 << (max(1, n_keys) - 1).bit_length())
            t = mx.arange(n, dtype=mx.float32)
            ang = t[None, :] * self.theta_pairs[:, None]
            first = (t == 0).astype(mx.float32)[None, :]
            rows = mx.concatenate([mx.cos(ang), mx.sin(ang), first], axis=0)  # [2P + 1, n]
            table = mx.contiguous(mx.transpose(rows.reshape(rows.shape[0], n // 32, 32), (1, 0, 2)))
            mx.eval(table)
            self.__dict__["_positions"] = table
        return table


@dataclass
class KeyOffsets:
    """A model's key offsets, per layer (None: a layer kvsnap does not hold)."""

    layers: list[LayerOffsets | None]
    mode: str  # "pre" (some layer has a rotating part) or "post"
    digest: str  # what the cache format records: "<mode>:<hash>"

    def group(self, model_layers: list[int]) -> GroupOffsets:
        return GroupOffsets(self, [self.layers[i] for i in model_layers])


@dataclass
class GroupOffsets:
    """The offsets of one layer group (one arena), by the group's layer index."""

    model: KeyOffsets
    layers: list[LayerOffsets]

    @property
    def digest(self) -> str:
        return self.model.digest


# ---------------------------------------------------------------- RoPE probe


def _rope_of(attn):
    rope = getattr(attn, "rope", None)
    return rope if callable(rope) else None


def probe_rope(rope, head_dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(theta [D], partner [D], sign [D]) such that rope(x, offset=s) =
    cos(theta s) x + sin(theta s) J x with (J x)[c] = sign[c] x[partner[c]];
    None if the module is not such a rotation (checked at far positions)."""
    D = head_dim
    eye = mx.eye(D, dtype=mx.float32).reshape(1, D, 1, D)  # D "heads" of one token
    try:
        r1 = np.array(rope(eye, offset=1).reshape(D, D), dtype=np.float64)
    except Exception:  # noqa: BLE001 - an unknown module: constant offsets only
        return None
    theta = np.zeros(D)
    partner = np.arange(D)
    sign = np.zeros(D)
    for c in range(D):
        row = r1[c].copy()
        cos = row[c]
        row[c] = 0.0
        p = int(np.argmax(np.abs(row)))
        sin = row[p]
        if abs(sin) < 1e-7:
            if abs(cos - 1.0) > 1e-6:
                return None
            continue  # not rotated
        theta[c] = np.arctan2(abs(sin), cos)
        partner[p] = c  # (J x)[p] takes x[c] ...
        sign[p] = np.sign(sin)  # ... with the sign of its sin term
    theta32 = theta.astype(np.float32)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 2, 1, D)).astype(np.float32)
    for s in _PROBE_POSITIONS:
        want = np.array(rope(mx.array(x), offset=s), dtype=np.float64)
        ang = np.float32(s) * theta32
        got = np.cos(ang) * x + np.sin(ang) * (sign * x[..., partner])
        if not np.allclose(got, want, atol=2e-3 * max(1.0, np.abs(want).max())):
            return None
    return theta32, partner, sign.astype(np.float32)


# ---------------------------------------------------------------- calibration


def _calibration_tokens(model, tokenizer) -> tuple[list[int], str]:
    if tokenizer is not None:
        ids = list(tokenizer.encode(_DATA.read_text(encoding="utf-8")))[:CALIBRATION_TOKENS]
        return ids, "text"
    vocab = _vocab_size(model)
    rng = np.random.default_rng(20261130)
    return rng.integers(0, vocab, CALIBRATION_TOKENS).tolist(), "random"


def _vocab_size(model) -> int:
    args = getattr(model, "args", None)
    v = getattr(args, "vocab_size", None)
    if isinstance(v, int) and v > 0:
        return v
    emb = getattr(getattr(model, "model", model), "embed_tokens", None)
    return int(emb.weight.shape[0]) if emb is not None else 256


class _QueryRecorder:
    """Wraps a layer's rope: the first call of each forward is the queries'."""

    def __init__(self, rope):
        self.rope, self.calls, self.queries = rope, 0, None

    def __call__(self, x, offset=0):
        if self.calls % 2 == 0:
            self.queries = x
        self.calls += 1
        return self.rope(x, offset=offset)


def calibrate(
    model,
    attn_modules: list,
    held: list[int],
    tokenizer=None,
    pairs: int = PAIRS,
    sinks: bool = True,
    balance: float = BALANCE,
) -> tuple[KeyOffsets, dict]:
    """Offsets for the layers ``held`` (model layer indices kvsnap caches),
    from one float forward over the calibration tokens."""
    ids, source = _calibration_tokens(model, tokenizer)
    caches = model.make_cache() if hasattr(model, "make_cache") else [mlx_cache.KVCache() for _ in attn_modules]
    float_caches = [mlx_cache.KVCache() if isinstance(c, (mlx_cache.KVCache, mlx_cache.RotatingKVCache)) else c
                    for c in caches]
    recorders = {}
    if balance:
        for i in held:
            rope = _rope_of(attn_modules[i])
            if rope is not None:
                recorders[i] = _QueryRecorder(rope)
                attn_modules[i].rope = recorders[i]
    try:
        model(mx.array(ids)[None], cache=float_caches)
    finally:
        for i, r in recorders.items():
            attn_modules[i].rope = r.rope
    layers: list[LayerOffsets | None] = [None] * len(attn_modules)
    for i in held:
        c = float_caches[i]
        keys = c.keys[0, :, : c.offset, :].astype(mx.float32)  # [Hkv, T, D], after RoPE
        T, D = keys.shape[1], keys.shape[2]
        rope = _rope_of(attn_modules[i])
        probe = probe_rope(rope, D) if rope is not None else None
        if probe is None:
            theta, partner, sign = np.zeros(D, np.float32), np.arange(D), np.zeros(D, np.float32)
        else:
            theta, partner, sign = probe
        pos = np.arange(T, dtype=np.float32)[:, None] * theta[None, :]
        cos, sin = mx.array(np.cos(pos)), mx.array(np.sin(pos))
        # Undo RoPE: the inverse rotation is cos x - sin J x.
        jk = keys[..., mx.array(partner)] * mx.array(sign)
        pre = keys * cos - jk * sin
        m_all = np.array(mx.mean(pre, axis=1))  # [Hkv, D]
        keep = _rotating_pairs(m_all, theta, partner, T, pairs if probe is not None else 0)
        m = np.where(keep[None, :], m_all, 0.0).astype(np.float32)
        m = np.array(_round(mx.array(m)))
        jm = (m[:, partner] * sign).astype(np.float32)
        rot = mx.cos(mx.array(pos))[None] * mx.array(m)[:, None, :] + mx.sin(mx.array(pos))[None] * mx.array(jm)[:, None, :]
        const = _round(mx.mean(keys - rot, axis=1))
        sink = _round(keys[:, 0] - rot[:, 0] - const) if sinks else None
        layers[i] = _layer_offsets(const, sink, m, jm, theta, partner, keep)
        if i in recorders and recorders[i].queries is not None:
            rest = keys - rot - const[:, None, :]
            if sink is not None:
                rest = mx.concatenate([rest[:, :1] - sink[:, None, :], rest[:, 1:]], axis=1)
            layers[i].scale = _balance(recorders[i].queries[0], rest, partner, balance)
    mode = "pre" if any(lo is not None and lo.m is not None for lo in layers) else "post"
    mode += "+sink" if sinks else ""
    mode += "+balance" if recorders else ""
    record = {"source": source, "tokens": len(ids), "mode": mode, "pairs": pairs, "balance": balance}
    return KeyOffsets(layers, mode, _digest(layers, mode)), record


def _balance(queries: mx.array, keys: mx.array, partner: np.ndarray, alpha: float) -> mx.array:
    """Per KV head and channel d [Hkv, D], equal within each RoPE pair, so
    that keys / d and queries * d have more even energies: d = (key RMS /
    query RMS) ** alpha per pair, geometric mean 1."""
    hkv, _, D = keys.shape
    q = queries.astype(mx.float32).reshape(hkv, -1, D)  # the query heads of each KV head
    eq = np.array(mx.mean(q * q, axis=1), dtype=np.float64)
    ek = np.array(mx.mean(keys * keys, axis=1), dtype=np.float64)
    eq, ek = eq + eq[:, partner], ek + ek[:, partner]  # pair energies (RoPE keeps them)
    d = (np.sqrt(ek / np.maximum(eq, 1e-12)) + 1e-12) ** alpha
    d = np.clip(d / np.exp(np.mean(np.log(d), axis=1, keepdims=True)), 1 / 16, 16)
    return _round(mx.array(d.astype(np.float32)))


def _rotating_pairs(m: np.ndarray, theta: np.ndarray, partner: np.ndarray, T: int, pairs: int) -> np.ndarray:
    """Channels of the ``pairs`` pairs whose rotating offset deviates most
    from its mean over the positions seen (summed over KV heads)."""
    D = m.shape[1]
    scores = []
    for c in range(D):
        p = int(partner[c])
        if p <= c or theta[c] == 0.0:
            continue
        energy = float(np.sum(m[:, c] ** 2 + m[:, p] ** 2))
        z = abs(np.mean(np.exp(1j * float(theta[c]) * np.arange(T)))) ** 2
        scores.append((energy * (1.0 - z), c, p))
    scores.sort(reverse=True)
    keep = np.zeros(D, dtype=bool)
    for _, c, p in scores[:pairs]:
        keep[c] = keep[p] = True
    return keep


def _layer_offsets(const, sink, m, jm, theta, partner, keep) -> LayerOffsets:
    hkv, D = m.shape
    pair_list = [(c, int(partner[c])) for c in range(D) if keep[c] and int(partner[c]) > c]
    P = len(pair_list)
    if P == 0 and sink is None:
        return LayerOffsets(const=const)
    w = np.zeros((hkv, D, 2 * P + 1), dtype=np.float32)
    for k, (a, b) in enumerate(pair_list):
        w[:, a, k], w[:, b, k] = m[:, a], m[:, b]
        w[:, a, P + k], w[:, b, P + k] = jm[:, a], jm[:, b]
    if sink is not None:
        w[:, :, 2 * P] = np.array(sink)
    out = LayerOffsets(
        const=const,
        sink=sink,
        w=mx.array(w),
        theta_pairs=mx.array(np.array([theta[a] for a, _ in pair_list], dtype=np.float32)),
    )
    if P:
        out.m, out.jm = mx.array(m), mx.array(jm)
        out.theta = mx.array(np.where(keep, theta, 0.0).astype(np.float32))
    return out


def _round(x: mx.array) -> mx.array:
    """float16-representable float32 (stable digests across machines)."""
    return x.astype(mx.float16).astype(mx.float32)


def _digest(layers: list[LayerOffsets | None], mode: str) -> str:
    h = hashlib.sha256(mode.encode())
    for lo in layers:
        if lo is None:
            h.update(b"-")
            continue
        for x in (getattr(lo, k) for k in _FIELDS):
            h.update(b"|" if x is None else np.array(x, dtype=np.float32).tobytes())
    return f"{mode}:{h.hexdigest()[:16]}"


# ---------------------------------------------------------------- cache on disk


def _path(fingerprint: str, source: str, pairs: int) -> Path:
    from kvsnap.models import kvsnap_home

    return kvsnap_home() / "offsets" / f"{fingerprint}-{source}-p{pairs}-v{FORMAT_VERSION}.npz"


def _save(path: Path, offsets: KeyOffsets, record: dict) -> None:
    arrays = {}
    for i, lo in enumerate(offsets.layers):
        if lo is None:
            continue
        for k in _FIELDS:
            if getattr(lo, k) is not None:
                arrays[f"{i}.{k}"] = np.array(getattr(lo, k))
    meta = {**record, "n_layers": len(offsets.layers), "mode": offsets.mode, "digest": offsets.digest}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, __meta__=np.array(json.dumps(meta)), **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load(path: Path, held: list[int]) -> KeyOffsets | None:
    """The cached offsets, or None if absent, unreadable or not for these layers."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["__meta__"]))
            layers: list[LayerOffsets | None] = [None] * int(meta["n_layers"])
            for i in held:
                if f"{i}.const" not in z:
                    return None
                layers[i] = LayerOffsets(
                    **{k: mx.array(z[f"{i}.{k}"]) for k in _FIELDS if f"{i}.{k}" in z}
                )
    except (OSError, ValueError, KeyError, IndexError, json.JSONDecodeError):
        return None
    offsets = KeyOffsets(layers, meta["mode"], meta["digest"])
    if _digest(layers, offsets.mode) != offsets.digest:
        return None  # damaged or written by other code: calibrate again
    return offsets


_FIELDS = ("const", "sink", "m", "jm", "theta", "theta_pairs", "w", "scale")
_MEMO: dict[tuple, KeyOffsets] = {}


def for_model(model, attn_modules: list, held: list[int], tokenizer=None, pairs: int = PAIRS) -> KeyOffsets:
    """The model's offsets: from memory, from $KVSNAP_HOME/offsets, or
    calibrated now (a second or two) and cached."""
    from kvsnap.models import model_fingerprint

    tokenizer = tokenizer if tokenizer is not None else getattr(model, "_kvsnap_tokenizer", None)
    source = "text" if tokenizer is not None else "random"
    # Known to this model object already (fingerprinting costs ~10 ms a call).
    seen = model.__dict__.setdefault("_kvsnap_offsets", {}) if hasattr(model, "__dict__") else {}
    if (source, pairs, tuple(held)) in seen:
        return seen[(source, pairs, tuple(held))]
    fp = model_fingerprint(model)
    key = (fp, source, pairs, tuple(held))
    if key in _MEMO:
        seen[key[1:]] = _MEMO[key]
        return _MEMO[key]
    path = _path(fp, source, pairs)
    offsets = _load(path, held)
    if offsets is None:
        offsets, record = calibrate(model, attn_modules, held, tokenizer, pairs)
        try:
            _save(path, offsets, {**record, "model_fingerprint": fp})
        except OSError:
            pass  # a read-only home: calibrate again next time
    _MEMO[key] = seen[key[1:]] = offsets
    return offsets
