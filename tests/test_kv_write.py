"""kv_write stores exactly what mx.quantize computes, where it should, and
nothing else.

New slots are poisoned (0xFF bytes), so every byte of the arena is either
written by kv_write (and must equal mx.quantize's packed ints and its scales
and biases rounded to float16) or must still be poison.
"""

from __future__ import annotations

import math

import kvsnap
import mlx.core as mx
import numpy as np
import pytest
from conftest import (
    MX_DTYPES,
    arena_kv,
    dequantize,
    f16_bits_to_f64,
    reference_attention,
    rel_error,
    to_f64,
    to_mx,
)
from kernel_isa import attention_tol

pytestmark = pytest.mark.usefixtures("poison")

POISON_WORD = np.uint32(0xFFFFFFFF)
POISON_HALF = np.uint16(0xFFFF)


def quantize_f16(x: mx.array, bits: int, gs: int):
    """mx.quantize on the float32 values of x; scales/biases as float16 bits.

    mx.quantize has no group size 16; a 16-group is quantized as the 32-group
    [g, g] (same min and max, so the same scale, bias and integers), keeping
    the first half of its words.
    """
    x = x.astype(mx.float32)
    if gs == 16:
        *lead, D = x.shape
        g = x.reshape(*lead, D // 16, 16)
        packed, scales, biases = mx.quantize(
            mx.concatenate([g, g], axis=-1).reshape(*lead, 2 * D), group_size=32, bits=bits
        )
        words = 16 * bits // 32
        packed = packed.reshape(*lead, D // 16, 2 * words)[..., :words].reshape(
            *lead, D * bits // 32
        )
    else:
        packed, scales, biases = mx.quantize(x, group_size=gs, bits=bits)
    half = lambda a: np.array(a).astype(np.float16).view(np.uint16)
    return np.array(packed), half(scales), half(biases)


def dequantized_f64(x: mx.array, bits: int, gs: int) -> np.ndarray:
    """float64 values of x after quantization with float16 scales/biases."""
    p, s, b = quantize_f16(x, bits, gs)
    return dequantize(p, f16_bits_to_f64(s), f16_bits_to_f64(b), bits, gs)


class Expected:
    """The bytes every (slot, layer) of an arena should hold: poison until a
    write says otherwise."""

    def __init__(self, arena: kvsnap.Arena, slots):
        self.arena = arena
        H, bt, D = arena.n_kv_heads, arena.block_tokens, arena.head_dim
        W, G = D * arena.bits // 32, D // arena.group_size
        self.data = {
            (s, layer): [
                np.full((H, bt, n), fill, dtype=type(fill))
                for n, fill in [(W, POISON_WORD), (G, POISON_HALF), (G, POISON_HALF)] * 2
            ]
            for s in slots
            for layer in range(arena.n_layers)
        }

    def write(self, layer, keys, values, table, offsets):
        """Record kv_write(arena, layer, keys, values, table, offsets)."""
        a = self.arena
        k = quantize_f16(keys, a.bits, a.group_size)
        v = quantize_f16(values, a.bits, a.group_size)
        L = keys.shape[2]
        for b, off in enumerate(offsets):
            for l in range(L):
                pos = off + l
                arrays = self.data[(int(table[b][pos // a.block_tokens]), layer)]
                for i, src in enumerate(k + v):
                    arrays[i][:, pos % a.block_tokens] = src[b, :, l]

    def check(self):
        for (slot, layer), want in self.data.items():
            got = self.arena.read_block(slot, layer)
            for i in range(6):
                assert got[i].dtype == want[i].dtype
                np.testing.assert_array_equal(
                    got[i], want[i], err_msg=f"slot {slot} layer {layer} array {i}"
                )


def random_kv(rng, shape, dtype, scale=2.0):
    k = to_mx(rng.normal(0.0, scale, size=shape), MX_DTYPES[dtype])
    v = to_mx(rng.normal(0.0, 1.0, size=shape) + 0.5, MX_DTYPES[dtype])
    return k, v


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize(
    "bits,gs", [(4, 16), (4, 32), (4, 64), (4, 128), (8, 16), (8, 32), (8, 64), (8, 128)]
)
def test_kv_write_matches_mx_quantize(rng, dtype, bits, gs):
    # Three sequences, each in its own shuffled slots, at offsets that start
    # mid-block and cross block boundaries (16-token blocks, 20 new tokens).
    arena = kvsnap.Arena(2, 2, 128, block_tokens=16, bits=bits, group_size=gs, budget_bytes=1 << 26)
    slots = [arena.alloc() for _ in range(12)]
    rng.shuffle(slots)
    table = np.array(slots).reshape(3, 4)
    offsets = [0, 13, 37]
    keys, values = random_kv(rng, (3, 2, 20, 128), dtype)
    expected = Expected(arena, slots)
    token = kvsnap.kv_write(arena, 1, keys, values, table, offsets)
    mx.eval(token)
    expected.write(1, keys, values, table, offsets)
    expected.check()


def test_kv_write_edge_values(rng):
    # Constant groups (zero range), all zeros, one-signed groups, a huge
    # outlier, tiny values: the quantizer's special cases, vs mx.quantize.
    D = 64
    rows = np.zeros((8, D), dtype=np.float32)
    rows[1] = 3.25
    rows[2] = -7.0
    rows[3] = rng.uniform(0.5, 2.0, D)
    rows[4] = -rng.uniform(0.5, 2.0, D)
    rows[5] = rng.normal(size=D)
    rows[5, 3] = 1e4
    rows[6] = rng.normal(size=D) * 1e-6
    rows[7, ::2] = 1.0
    keys = mx.array(rows.reshape(1, 1, 8, D))
    values = mx.array(-rows[::-1].copy().reshape(1, 1, 8, D))
    for bits, gs in [(4, 16), (8, 16), (4, 32), (8, 64)]:
        arena = kvsnap.Arena(
            1, 1, D, block_tokens=8, bits=bits, group_size=gs, budget_bytes=1 << 20
        )
        slot = arena.alloc()
        expected = Expected(arena, [slot])
        mx.eval(kvsnap.kv_write(arena, 0, keys, values, [[slot]], [0]))
        expected.write(0, keys, values, [[slot]], [0])
        expected.check()


def test_kv_write_touches_only_its_layer(rng):
    arena = kvsnap.Arena(3, 2, 64, block_tokens=16, budget_bytes=1 << 24)
    slots = [arena.alloc() for _ in range(3)]
    table = [slots]
    expected = Expected(arena, slots)
    k0, v0 = random_kv(rng, (1, 2, 40, 64), "float32")
    mx.eval(kvsnap.kv_write(arena, 0, k0, v0, table, [5]))
    expected.write(0, k0, v0, table, [5])
    expected.check()  # layers 1 and 2 still poison
    k2, v2 = random_kv(rng, (1, 2, 30, 64), "float32")
    mx.eval(kvsnap.kv_write(arena, 2, k2, v2, table, [0]))
    expected.write(2, k2, v2, table, [0])
    expected.check()  # layer 0 unchanged, layer 1 still poison


def test_decode_appends_equal_one_write(rng):
    # Token-by-token appends across a block boundary store the same bytes as
    # one write of all the tokens.
    D, n = 64, 23
    one = kvsnap.Arena(1, 2, D, block_tokens=8, budget_bytes=1 << 22)
    step = kvsnap.Arena(1, 2, D, block_tokens=8, budget_bytes=1 << 22)
    t1 = [[one.alloc() for _ in range(3)]]
    t2 = [[step.alloc() for _ in range(3)]]
    keys, values = random_kv(rng, (1, 2, n, D), "float16")
    mx.eval(kvsnap.kv_write(one, 0, keys, values, t1, [0]))
    tokens = [
        kvsnap.kv_write(step, 0, keys[:, :, i : i + 1], values[:, :, i : i + 1], t2, [i])
        for i in range(n)
    ]
    mx.eval(tokens)
    for s1, s2 in zip(t1[0], t2[0]):
        for a, b in zip(one.read_block(s1, 0), step.read_block(s2, 0)):
            np.testing.assert_array_equal(a, b)


def test_kv_write_strided_input(rng):
    # A [B, L, H, D] buffer seen as [B, H, L, D] is written like its copy.
    arena = kvsnap.Arena(1, 4, 64, block_tokens=16, budget_bytes=1 << 22)
    slots = [arena.alloc() for _ in range(4)]
    table = np.array(slots).reshape(2, 2)
    k = mx.swapaxes(to_mx(rng.normal(size=(2, 20, 4, 64))), 1, 2)
    v = mx.swapaxes(to_mx(rng.normal(size=(2, 20, 4, 64))), 1, 2)
    expected = Expected(arena, slots)
    mx.eval(kvsnap.kv_write(arena, 0, k, v, table, [3, 10]))
    expected.write(0, k, v, table, [3, 10])
    expected.check()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_write_then_attention_sees_the_data(rng, dtype):
    # Nothing is evaluated between the write and the read: the token in
    # `after` alone orders them. The reference dequantizes mx.quantize's
    # output, independent of the arena.
    D, Hkv, gs, bits = 64, 2, 32, 4
    arena = kvsnap.Arena(2, Hkv, D, block_tokens=32, bits=bits, group_size=gs, budget_bytes=1 << 24)
    table = np.array([[arena.alloc() for _ in range(3)] for _ in range(2)])
    T = 70
    keys, values = random_kv(rng, (2, Hkv, T, D), dtype)
    token = kvsnap.kv_write(arena, 1, keys, values, table, [0, 0])
    q = to_mx(rng.normal(size=(2, 4, 3, D)))
    out = kvsnap.attention(arena, 1, q, table, [T, T - 10], scale=1 / math.sqrt(D), after=[token])
    mx.eval(out)
    ref = reference_attention(
        to_f64(q),
        dequantized_f64(keys, bits, gs),
        dequantized_f64(values, bits, gs),
        1 / math.sqrt(D),
        lengths=[T, T - 10],
        causal=True,
    )
    assert rel_error(out, ref) <= attention_tol("float32")


def test_read_before_later_write_sees_old_data(rng):
    # read 1 -> write 2 (after read 1) -> read 2 (after write 2), all
    # evaluated together: read 1 sees the first data, read 2 the second.
    D = 64
    arena = kvsnap.Arena(1, 1, D, block_tokens=16, budget_bytes=1 << 22)
    table = [[arena.alloc(), arena.alloc()]]
    k1, v1 = random_kv(rng, (1, 1, 20, D), "float32")
    k2, v2 = random_kv(rng, (1, 1, 20, D), "float32")
    q = to_mx(rng.normal(size=(1, 2, 1, D)))
    w1 = kvsnap.kv_write(arena, 0, k1, v1, table, [0])
    r1 = kvsnap.attention(arena, 0, q, table, [20], scale=0.125, after=[w1])
    w2 = kvsnap.kv_write(arena, 0, k2, v2, table, [0], after=[r1])
    r2 = kvsnap.attention(arena, 0, q, table, [20], scale=0.125, after=[w2])
    mx.eval(r1, r2)

    def ref(k, v):
        kf, vf = dequantized_f64(k, 4, 64), dequantized_f64(v, 4, 64)
        return reference_attention(to_f64(q), kf, vf, 0.125, causal=True)

    assert rel_error(r1, ref(k1, v1)) <= attention_tol("float32")
    assert rel_error(r2, ref(k2, v2)) <= attention_tol("float32")
    assert np.max(np.abs(np.array(r1) - np.array(r2))) > 1e-2


@pytest.mark.parametrize("key_bits,bits", [(8, 4), (4, 8), (6, 4), (6, 8)])
def test_keys_and_values_at_different_bits(key_bits, bits, poison):
    # 8- or 6-bit keys with 4-bit values (or the other mixes): each half is
    # exactly what mx.quantize gives at its own bits (6 bits: codes straddle
    # words), and attention reads both right.
    D, H, T, bt = 64, 2, 40, 16
    arena = kvsnap.Arena(1, H, D, block_tokens=bt, bits=bits, key_bits=key_bits, group_size=32,
                         budget_bytes=1 << 20)
    assert (arena.key_bits, arena.bits) == (key_bits, bits)
    slots = [arena.alloc() for _ in range(3)]
    k, v = mx.random.normal((1, H, T, D)), mx.random.normal((1, H, T, D))
    token = kvsnap.kv_write(arena, 0, k, v, [slots], [0])
    q = mx.random.normal((1, 4, 3, D))
    out = kvsnap.attention(arena, 0, q, [slots], [T], scale=0.125, after=[token])
    mx.eval(out)
    for x, b, first in ((k, key_bits, 0), (v, bits, 3)):
        wq, sq, _ = mx.quantize(x, group_size=32, bits=b)
        for blk, slot in enumerate(slots):
            got = arena.read_block(slot, 0)
            n = min(bt, T - blk * bt)
            np.testing.assert_array_equal(got[first][:, :n], np.array(wq[0, :, blk * bt : blk * bt + n]))
            np.testing.assert_array_equal(
                got[first + 1][:, :n],
                np.array(sq[0, :, blk * bt : blk * bt + n].astype(mx.float16)).view(np.uint16),
            )
    kf, vf = arena_kv(arena, 0, slots, T)
    ref = reference_attention(to_f64(q), kf[None], vf[None], 0.125, causal=True)
    assert rel_error(out, ref) < attention_tol("float32")


# ------------------------------------------- counts: right-padded prompt batches


def fill_random_bytes(arena: kvsnap.Arena, slots, rng) -> dict[int, list[np.ndarray]]:
    """Overwrite every byte of the slots' six arrays (all layers) with random
    bytes through block_views; returns a copy of each slot's bytes."""
    pattern = {}
    for slot in slots:
        views = arena.block_views(int(slot))
        for v in views:
            v[...] = rng.integers(0, 256, v.nbytes, dtype=np.uint8).view(v.dtype).reshape(v.shape)
        pattern[int(slot)] = [v.view(np.uint8).copy() for v in views]
    return pattern


def slot_bytes(arena: kvsnap.Arena, slot: int, layer: int) -> list[np.ndarray]:
    """The six arrays of (slot, layer) as raw bytes, read with read_block."""
    return [np.ascontiguousarray(a).view(np.uint8) for a in arena.read_block(int(slot), layer)]


def real_blocks_table(arena: kvsnap.Arena, offsets, counts) -> np.ndarray:
    """A block table whose row b names fresh slots for the blocks of positions
    offsets[b] .. offsets[b] + counts[b] - 1 only (-1 elsewhere): as wide as
    the longest real sequence needs, shorter than offsets[b] + L."""
    bt = arena.block_tokens
    width = max(-(-(o + c) // bt) for o, c in zip(offsets, counts))
    table = np.full((len(offsets), width), -1, dtype=np.int32)
    for b, (o, c) in enumerate(zip(offsets, counts)):
        for blk in range(o // bt, -(-(o + c) // bt)) if c else ():
            table[b, blk] = arena.alloc()
    return table


@pytest.mark.parametrize(
    "dtype,key_bits,bits", [("float32", 4, 4), ("bfloat16", 8, 4), ("float16", 4, 8)]
)
def test_counts_write_what_each_sequence_writes_alone(rng, dtype, key_bits, bits):
    # Four prompts right-padded to L = 20 (counts L, 0, 7 and 16; offsets
    # mid-block, across block boundaries), written in one batch into layer 1,
    # versus each prompt's real tokens written alone into a twin arena. The
    # padding is random, not zeros: written, it would show.
    L, offsets, counts = 20, [0, 13, 37, 5], [20, 0, 7, 16]
    twins = [
        kvsnap.Arena(2, 2, 64, block_tokens=16, bits=bits, key_bits=key_bits, group_size=32,
                     budget_bytes=1 << 22)
        for _ in range(2)
    ]
    batched, alone = twins
    tables = [real_blocks_table(arena, offsets, counts) for arena in twins]
    np.testing.assert_array_equal(tables[0], tables[1])  # the same slot ids in both
    table = tables[0]
    assert table.shape[1] * 16 < 37 + L  # sequence 2's row is too short for all L tokens
    slots = table[table >= 0]
    pattern_seed = int(rng.integers(1 << 31))
    pattern = fill_random_bytes(batched, slots, np.random.default_rng(pattern_seed))
    fill_random_bytes(alone, slots, np.random.default_rng(pattern_seed))
    keys, values = random_kv(rng, (4, 2, L, 64), dtype)

    mx.eval(kvsnap.kv_write(batched, 1, keys, values, table, offsets, counts=counts))
    for b, (o, c) in enumerate(zip(offsets, counts)):
        if c:
            k, v = keys[b : b + 1, :, :c], values[b : b + 1, :, :c]
            mx.eval(kvsnap.kv_write(alone, 1, k, v, table[b : b + 1], [o]))

    for slot in slots:
        for layer in (0, 1):
            for i, (got, want) in enumerate(
                zip(slot_bytes(batched, slot, layer), slot_bytes(alone, slot, layer))
            ):
                np.testing.assert_array_equal(
                    got, want, err_msg=f"slot {slot} layer {layer} array {i}"
                )
    # Every row outside the real tokens keeps its bytes: the padded positions,
    # the rows before the offsets, layer 0.
    bt = batched.block_tokens
    for b, (o, c) in enumerate(zip(offsets, counts)):
        for blk in np.flatnonzero(table[b] >= 0):
            slot = int(table[b, blk])
            real = [p % bt for p in range(o, o + c) if p // bt == blk]
            kept = [r for r in range(bt) if r not in real]
            views = [v.view(np.uint8) for v in batched.block_views(slot)]
            for i, (now, before) in enumerate(zip(views, pattern[slot])):
                np.testing.assert_array_equal(now[0], before[0], err_msg=f"slot {slot} layer 0")
                np.testing.assert_array_equal(
                    now[1][:, kept], before[1][:, kept], err_msg=f"slot {slot} array {i}"
                )
                assert not np.array_equal(now[1][:, real], before[1][:, real])


def test_a_table_covering_only_the_real_tokens_is_enough(rng):
    # Sequence 1 is a 5-token prompt padded to L = 24; its real tokens stay in
    # its first block. Past them, its row ends (at offset 10, 24 tokens would
    # need 3 blocks), or names a shared block or a freed slot (at offset 4).
    arena = kvsnap.Arena(1, 2, 64, block_tokens=16, budget_bytes=1 << 22)
    first = [arena.alloc(), arena.alloc()]
    own, shared, freed = arena.alloc(), arena.alloc(), arena.alloc()
    arena.incref(shared)  # a common prefix held by another sequence too
    arena.decref(freed)
    cases = [
        (np.array([first, [own, -1]]), [0, 10], "sequence 1 needs 3 blocks"),
        (np.array([first, [own, shared]]), [0, 4], f"slot {shared} is shared by 2 holders"),
        (np.array([first, [own, freed]]), [0, 4], "not allocated"),
    ]
    keys, values = random_kv(rng, (2, 2, 24, 64), "float32")
    shared_before = slot_bytes(arena, shared, 0)
    for table, offsets, refusal in cases:
        # Without counts all 24 tokens are real: the table is refused, as before.
        with pytest.raises(kvsnap.errors.InvalidArgumentError, match=refusal) as e:
            kvsnap.kv_write(arena, 0, keys, values, table, offsets)
        assert e.value.argument == "block_table"
        token = kvsnap.kv_write(arena, 0, keys, values, table, offsets, counts=[24, 5])
        # The pending op pins the slots it writes, and only those.
        assert [arena.pins(s) for s in (*first, own, shared)] == [1, 1, 1, 0]
        mx.eval(token)
        del token
    # What it wrote is what writes of the 5 real tokens alone write.
    twin = kvsnap.Arena(1, 2, 64, block_tokens=16, budget_bytes=1 << 22)
    twin_own = twin.alloc()
    k, v = keys[1:, :, :5], values[1:, :, :5]
    mx.eval([kvsnap.kv_write(twin, 0, k, v, [[twin_own]], [o]) for o in (10, 4)])
    for got, want in zip(slot_bytes(arena, own, 0), slot_bytes(twin, twin_own, 0)):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(slot_bytes(arena, shared, 0), shared_before):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    "counts,problem",
    [
        ([24], "has 1 entries for a batch of 2"),
        ([24, 5, 0], "has 3 entries for a batch of 2"),
        ([], "has 0 entries for a batch of 2"),
        ([24, -1], "entry 1 is -1"),
        ([25, 5], "entry 0 is 25; each must be in 0 .. L = 24"),
        ([24.0, 5.0], "1-D list of integers"),
        ([[24, 5]], "1-D list of integers"),
        ([24, 2**40], "do not fit in int32"),
    ],
)
def test_bad_counts_are_refused(rng, counts, problem):
    arena = kvsnap.Arena(1, 2, 64, block_tokens=16, budget_bytes=1 << 22)
    table = [[arena.alloc(), arena.alloc()], [arena.alloc(), arena.alloc()]]
    keys, values = random_kv(rng, (2, 2, 24, 64), "float32")
    with pytest.raises(kvsnap.errors.InvalidArgumentError, match=problem) as e:
        kvsnap.kv_write(arena, 0, keys, values, table, [0, 0], counts=counts)
    assert e.value.argument == "counts"
    assert str(e.value).startswith("counts: ")
