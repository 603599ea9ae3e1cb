"""The block arena: slot bookkeeping against a Python model, misuse that must
raise instead of corrupting memory, and geometry validation."""

from __future__ import annotations

import gc
import math
import random
import subprocess
import sys
import textwrap

import kvsnap
import mlx.core as mx
import numpy as np
import pytest
from conftest import arena_kv, reference_attention, rel_error, to_f64, to_mx
from kernel_isa import attention_tol
from kvsnap.errors import ArenaFullError, InvalidArgumentError, KvsnapError, SlotError


def raw_slot_bytes(n_layers, n_kv_heads, head_dim, block_tokens, bits, group_size):
    """Bytes of data in one slot: K and V, packed ints and float16 scales/biases."""
    rows = n_kv_heads * block_tokens
    return n_layers * 2 * (rows * head_dim * bits // 8 + 2 * rows * (head_dim // group_size) * 2)


class Model:
    """What the arena's bookkeeping should be."""

    def __init__(self, arena: kvsnap.Arena):
        self.arena = arena
        self.n = arena.n_slots
        self.rc = [0] * self.n

    def check_stats(self):
        s = self.arena.stats()
        used = sum(1 for r in self.rc if r > 0)
        slot_bytes = s["slot_bytes"]
        assert s == {
            "slots_total": self.n,
            "slots_used": used,
            "slots_free": self.n - used,
            "slots_shared": sum(1 for r in self.rc if r > 1),
            "slots_pinned_free": 0,
            "slot_bytes": slot_bytes,
            "bytes_total": self.n * slot_bytes,
            "bytes_used": used * slot_bytes,
        }


def test_random_operations_match_model():
    # 100k random operations, valid and invalid, on a small arena that fills
    # up often; stats() checked after every one, every refcount now and then.
    arena = kvsnap.Arena(2, 2, 64, block_tokens=16, budget_bytes=37 * 4096 * 8)
    model = Model(arena)
    assert model.n >= 8
    rnd = random.Random(1234)
    n_full = n_errors = 0
    for i in range(100_000):
        live = [s for s, r in enumerate(model.rc) if r > 0]
        op = rnd.random()
        if op < 0.35:
            if len(live) == model.n:
                with pytest.raises(ArenaFullError):
                    arena.alloc()
                n_full += 1
            else:
                slot = arena.alloc()
                assert 0 <= slot < model.n and model.rc[slot] == 0
                model.rc[slot] = 1
        elif op < 0.55 and live:
            slot = rnd.choice(live)
            model.rc[slot] += 1
            assert arena.incref(slot) == model.rc[slot]
        elif op < 0.9 and live:
            slot = rnd.choice(live)
            model.rc[slot] -= 1
            assert arena.decref(slot) == model.rc[slot]
        else:
            # Misuse: a free slot or one out of range. Nothing may change.
            free = [s for s, r in enumerate(model.rc) if r == 0]
            bad = rnd.choice(free + [-1, model.n, model.n + 7, -(2**40), 2**40])
            method = rnd.choice([arena.incref, arena.decref])
            with pytest.raises(SlotError):
                method(bad)
            n_errors += 1
        model.check_stats()
        if i % 97 == 0:
            assert [arena.refcount(s) for s in range(model.n)] == model.rc
    assert n_full > 100 and n_errors > 1000  # both paths were exercised


def test_full_arena_then_free():
    arena = kvsnap.Arena(1, 1, 64, budget_bytes=1 << 20)
    n = arena.n_slots
    slots = [arena.alloc() for _ in range(n)]
    assert sorted(slots) == list(range(n))
    with pytest.raises(ArenaFullError) as e:
        arena.alloc()
    assert isinstance(e.value, KvsnapError)
    assert arena.stats()["slots_free"] == 0
    assert arena.decref(slots[3]) == 0
    assert arena.alloc() == slots[3]
    with pytest.raises(ArenaFullError):
        arena.alloc()


def test_shared_slot_freed_by_last_reference():
    arena = kvsnap.Arena(1, 1, 64, budget_bytes=1 << 20)
    s = arena.alloc()
    assert arena.incref(s) == 2 and arena.incref(s) == 3
    assert arena.stats()["slots_shared"] == 1
    assert arena.decref(s) == 2 and arena.decref(s) == 1
    assert arena.stats()["slots_shared"] == 0 and arena.stats()["slots_used"] == 1
    assert arena.decref(s) == 0
    assert arena.refcount(s) == 0 and arena.stats()["slots_used"] == 0


def test_misuse_raises_slot_error():
    arena = kvsnap.Arena(2, 1, 64, budget_bytes=1 << 20)
    n = arena.n_slots
    s = arena.alloc()
    arena.read_block(s, 1)
    arena.decref(s)
    with pytest.raises(SlotError, match="double free"):
        arena.decref(s)
    with pytest.raises(SlotError, match=str(s)):
        arena.incref(s)
    with pytest.raises(SlotError, match=str(s)):
        arena.read_block(s, 0)
    for bad in (-1, n, 10**12):
        for call in (arena.incref, arena.decref, arena.refcount, lambda x: arena.read_block(x, 0)):
            with pytest.raises(SlotError, match="out of range"):
                call(bad)
    assert issubclass(SlotError, KvsnapError)
    assert arena.stats()["slots_used"] == 0


def test_read_block_layer_out_of_range():
    arena = kvsnap.Arena(2, 1, 64, budget_bytes=1 << 20)
    s = arena.alloc()
    for layer in (-1, 2):
        with pytest.raises(InvalidArgumentError) as e:
            arena.read_block(s, layer)
        assert e.value.argument == "layer"


@pytest.mark.parametrize(
    "geometry",
    [
        {
            "n_layers": 3,
            "n_kv_heads": 2,
            "head_dim": 64,
            "block_tokens": 256,
            "bits": 4,
            "group_size": 64,
        },
        {
            "n_layers": 1,
            "n_kv_heads": 8,
            "head_dim": 80,
            "block_tokens": 16,
            "bits": 8,
            "group_size": 16,
        },
        {
            "n_layers": 26,
            "n_kv_heads": 4,
            "head_dim": 256,
            "block_tokens": 256,
            "bits": 4,
            "group_size": 128,
        },
    ],
)
def test_budget_and_properties(geometry):
    raw = raw_slot_bytes(**geometry)
    budget = 10 * raw + 12345
    arena = kvsnap.Arena(
        geometry["n_layers"],
        geometry["n_kv_heads"],
        geometry["head_dim"],
        block_tokens=geometry["block_tokens"],
        bits=geometry["bits"],
        group_size=geometry["group_size"],
        budget_bytes=budget,
    )
    for name, value in geometry.items():
        assert getattr(arena, name) == value
    s = arena.stats()
    assert arena.slot_bytes == s["slot_bytes"] >= raw
    assert arena.n_slots == s["slots_total"] == budget // arena.slot_bytes >= 1
    assert s["bytes_total"] <= budget < s["bytes_total"] + arena.slot_bytes
    slot = arena.alloc()
    shapes = [a.shape for a in arena.read_block(slot, geometry["n_layers"] - 1)]
    H, bt, D = geometry["n_kv_heads"], geometry["block_tokens"], geometry["head_dim"]
    W, G = D * geometry["bits"] // 32, D // geometry["group_size"]
    assert shapes == [(H, bt, W), (H, bt, G), (H, bt, G)] * 2
    assert [a.dtype for a in arena.read_block(slot, 0)] == [np.uint32, np.uint16, np.uint16] * 2


BASE = {
    "n_layers": 2,
    "n_kv_heads": 2,
    "head_dim": 64,
    "block_tokens": 256,
    "bits": 4,
    "group_size": 64,
    "budget_bytes": 1 << 24,
}


@pytest.mark.parametrize(
    "change,argument",
    [
        ({"n_layers": 0}, "n_layers"),
        ({"n_layers": -3}, "n_layers"),
        ({"n_kv_heads": 0}, "n_kv_heads"),
        ({"head_dim": 0}, "head_dim"),
        ({"head_dim": -64}, "head_dim"),
        ({"head_dim": 512}, "head_dim"),
        ({"head_dim": 320}, "head_dim"),
        ({"block_tokens": 0}, "block_tokens"),
        ({"bits": 3}, "bits"),
        ({"bits": 2}, "bits"),
        ({"bits": 16}, "bits"),
        ({"bits": 6}, "bits"),  # 6 bits: keys only
        ({"key_bits": 5}, "key_bits"),
        ({"key_bits": 16}, "key_bits"),
        ({"group_size": 8}, "group_size"),
        ({"group_size": 48}, "group_size"),
        ({"group_size": 256}, "group_size"),
        ({"head_dim": 80, "group_size": 64}, "group_size"),
        ({"head_dim": 96, "group_size": 64}, "group_size"),
        ({"budget_bytes": 0}, "budget_bytes"),
        ({"budget_bytes": -1}, "budget_bytes"),
        ({"budget_bytes": 4096}, "budget_bytes"),
    ],
)
def test_geometry_validation(change, argument):
    kwargs = {**BASE, **change}
    n_layers, n_kv_heads, head_dim = (
        kwargs.pop("n_layers"),
        kwargs.pop("n_kv_heads"),
        kwargs.pop("head_dim"),
    )
    with pytest.raises(InvalidArgumentError) as e:
        kvsnap.Arena(n_layers, n_kv_heads, head_dim, **kwargs)
    assert e.value.argument == argument
    assert argument in str(e.value)


def test_budget_one_byte_short_of_a_slot():
    arena = kvsnap.Arena(1, 2, 64, budget_bytes=1 << 22)
    slot_bytes = arena.slot_bytes
    assert kvsnap.Arena(1, 2, 64, budget_bytes=slot_bytes).n_slots == 1
    with pytest.raises(InvalidArgumentError) as e:
        kvsnap.Arena(1, 2, 64, budget_bytes=slot_bytes - 1)
    assert e.value.argument == "budget_bytes"


def test_pending_ops_keep_the_arena_alive(rng):
    # Dropping the last Python reference before the lazy graph runs must not
    # free the memory the write and the read use.
    D = 64
    arena = kvsnap.Arena(1, 2, D, block_tokens=16, budget_bytes=1 << 22)
    table = [[arena.alloc(), arena.alloc()]]
    keys = to_mx(rng.normal(size=(1, 2, 20, D)))
    q = to_mx(rng.normal(size=(1, 2, 1, D)))
    token = kvsnap.kv_write(arena, 0, keys, keys, table, [0])
    out = kvsnap.attention(arena, 0, q, table, [20], scale=0.125, after=[token])
    shadow = kvsnap.Arena(1, 2, D, block_tokens=16, budget_bytes=1 << 22)
    shadow_table = [[shadow.alloc(), shadow.alloc()]]
    mx.eval(kvsnap.kv_write(shadow, 0, keys, keys, shadow_table, [0]))
    del arena, token
    gc.collect()
    mx.eval(out)
    kf, vf = arena_kv(shadow, 0, shadow_table[0], 20)
    ref = reference_attention(to_f64(q), kf[None], vf[None], 0.125, causal=True)
    assert rel_error(out, ref) <= attention_tol("float32")
    assert math.isfinite(float(np.abs(np.array(out)).max()))


def test_dropping_the_last_arena_reference_during_a_pending_op_does_not_deadlock():
    # The kernels hold the arena while they run; the last reference can then be
    # released on an MLX stream thread while the Python thread waits for that
    # stream with the GIL held (mx.synchronize, mx.clear_cache). Releasing it
    # must not need the GIL. Run in a child so a deadlock fails, not hangs.
    code = textwrap.dedent(
        """
        import mlx.core as mx, kvsnap
        for _ in range(20):
            arena = kvsnap.Arena(1, 2, 64, block_tokens=16, budget_bytes=1 << 20)
            slot = arena.alloc()
            k = mx.random.normal((1, 2, 16, 64))
            token = kvsnap.kv_write(arena, 0, k, k, [[slot]], [0])
            out = kvsnap.attention(arena, 0, mx.random.normal((1, 4, 1, 64)), [[slot]], [16],
                                   scale=0.125, after=[token])
            mx.async_eval(out)
            del arena, token
            mx.clear_cache()
            mx.synchronize()
            assert out.shape == (1, 4, 1, 64)
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
