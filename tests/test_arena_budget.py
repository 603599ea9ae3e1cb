"""Arena memory over time: one byte budget shared by arenas, freed slots given
back to the OS, pending ops holding their slots (pins), and no writes into
shared blocks."""

from __future__ import annotations

import gc
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import kvsnap
import mlx.core as mx
import numpy as np
import pytest
from conftest import TOL, reference_attention, rel_error, to_f64, to_mx
from kvsnap.errors import ArenaFullError, InvalidArgumentError

D, H, BT = 64, 2, 16


def slot_bytes_of(*geometry, **kwargs) -> int:
    return kvsnap.Arena(*geometry, **kwargs, budget_bytes=1 << 24).slot_bytes


SLOT = slot_bytes_of(1, H, D, block_tokens=BT)


def small_arena(n_slots: int) -> kvsnap.Arena:
    """An arena of exactly n_slots slots of H KV heads, head_dim D, BT-token blocks."""
    return kvsnap.Arena(1, H, D, block_tokens=BT, budget_bytes=n_slots * SLOT)


def written_block(keys: mx.array) -> list[np.ndarray]:
    """The six arrays of a slot after kv_write(keys, keys) into a fresh arena."""
    shadow = small_arena(1)
    slot = shadow.alloc()
    mx.eval(kvsnap.kv_write(shadow, 0, keys, keys, [[slot]], [0]))
    return shadow.read_block(slot, 0)


def assert_block_equal(arena: kvsnap.Arena, slot: int, want: list[np.ndarray]) -> None:
    for i, (got, expected) in enumerate(zip(arena.read_block(slot, 0), want)):
        np.testing.assert_array_equal(got, expected, err_msg=f"slot {slot} array {i}")


def random_keys(rng, tokens: int = BT) -> mx.array:
    return to_mx(rng.normal(size=(1, H, tokens, D)))


# ------------------------------------------------------------------ budget


def test_budget_properties_and_validation():
    assert kvsnap.Budget is kvsnap._ext.Budget
    budget = kvsnap.Budget(1 << 20)
    assert (budget.limit, budget.used, budget.free) == (1 << 20, 0, 1 << 20)
    for bad in (0, -1):
        with pytest.raises(InvalidArgumentError) as e:
            kvsnap.Budget(bad)
        assert e.value.argument == "limit_bytes"


def test_arenas_of_two_geometries_share_one_budget():
    # Both arenas could map the whole budget; together they get no more.
    budget = kvsnap.Budget(40 * SLOT + 123)
    small = kvsnap.Arena(1, H, D, block_tokens=BT, budget=budget)
    big = kvsnap.Arena(2, 4, 128, block_tokens=64, budget=budget)
    assert big.slot_bytes > 3 * small.slot_bytes
    assert small.n_slots == budget.limit // small.slot_bytes
    assert big.n_slots == budget.limit // big.slot_bytes
    assert small.budget is budget and big.budget is budget

    held = {small: [], big: []}
    turn = [big, small, small]
    i = 0
    while True:
        arena = turn[i % 3]
        try:
            held[arena].append(arena.alloc())
        except ArenaFullError as e:
            used = sum(len(slots) * a.slot_bytes for a, slots in held.items())
            assert str(e) == (
                f"budget of {budget.limit} bytes is spent: {used} in use, a slot needs "
                f"{arena.slot_bytes}; free blocks or raise the budget"
            )
            break
        i += 1
    used = len(held[small]) * small.slot_bytes + len(held[big]) * big.slot_bytes
    assert budget.used == used <= budget.limit < used + arena.slot_bytes
    assert budget.free == budget.limit - used
    assert small.stats()["bytes_used"] + big.stats()["bytes_used"] == used
    # Small slots may still fit where a big one does not; freeing a big slot
    # makes room for one more.
    while budget.free >= small.slot_bytes:
        held[small].append(small.alloc())
    with pytest.raises(ArenaFullError, match="budget of"):
        small.alloc()
    before = budget.used
    big.decref(held[big].pop())
    assert budget.used == before - big.slot_bytes
    held[big].append(big.alloc())
    assert budget.used == before
    for arena, slots in held.items():
        for slot in slots:
            arena.decref(slot)
    assert budget.used == 0


def test_arena_needs_budget_bytes_or_a_budget():
    with pytest.raises(InvalidArgumentError) as e:
        kvsnap.Arena(1, H, D, block_tokens=BT)
    assert e.value.argument == "budget_bytes"
    with pytest.raises(InvalidArgumentError) as e:
        kvsnap.Arena(1, H, D, block_tokens=BT, budget=kvsnap.Budget(SLOT - 1))
    assert e.value.argument == "budget" and str(SLOT) in str(e.value)
    # Both: budget_bytes caps this arena, the shared budget caps them all.
    budget = kvsnap.Budget(100 * SLOT)
    capped = kvsnap.Arena(1, H, D, block_tokens=BT, budget_bytes=3 * SLOT, budget=budget)
    assert capped.n_slots == 3 and capped.budget is budget
    slots = [capped.alloc() for _ in range(3)]
    assert budget.used == 3 * SLOT
    with pytest.raises(ArenaFullError, match="all 3 slots"):
        capped.alloc()
    for slot in slots:
        capped.decref(slot)
    assert budget.used == 0


def test_an_arena_without_a_budget_has_its_own():
    arena = small_arena(5)
    budget = arena.budget
    assert isinstance(budget, kvsnap.Budget) and arena.budget is budget
    assert budget.limit == 5 * SLOT
    slots = [arena.alloc() for _ in range(5)]
    assert budget.used == 5 * SLOT and budget.free == 0
    with pytest.raises(ArenaFullError, match="arena is full: all 5 slots"):
        arena.alloc()
    arena.decref(slots[0])
    assert budget.used == 4 * SLOT


def test_dropping_an_arena_gives_its_slots_bytes_back():
    budget = kvsnap.Budget(10 * SLOT)
    arena = kvsnap.Arena(1, H, D, block_tokens=BT, budget=budget)
    for _ in range(4):
        arena.alloc()
    assert budget.used == 4 * SLOT
    del arena
    gc.collect()
    assert budget.used == 0


# ------------------------------------------------------- memory to the OS


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(sys.platform != "linux", reason="reads RSS from /proc (madvise DONTNEED)")
def test_freed_slots_go_back_to_the_os():
    # 200 slots of 288 KiB (58 MB) filled through writable views, then freed:
    # the pages must leave the process, not wait on the free list.
    budget = kvsnap.Budget(1 << 31)  # 2 GiB of address space, none of it touched yet
    arena = kvsnap.Arena(4, 2, 128, block_tokens=256, budget=budget)
    slots = [arena.alloc() for _ in range(200)]
    before = resident_bytes()
    for slot in slots:
        for view in arena.block_views(slot):
            view[...] = 7
    added = resident_bytes() - before
    assert added >= 0.9 * 200 * arena.slot_bytes
    for slot in slots:
        arena.decref(slot)
    dropped = before + added - resident_bytes()
    assert dropped >= 0.8 * added, f"wrote {added} bytes, only {dropped} went back"


def test_a_slot_taken_again_after_it_was_given_back_works(rng):
    arena = small_arena(4)
    slots = [arena.alloc() for _ in range(4)]
    for slot in slots:
        for view in arena.block_views(slot):
            view[...] = 7
        arena.decref(slot)
    slot = arena.alloc()
    if sys.platform == "linux":
        # MADV_DONTNEED: the old bytes are gone, the pages read as zeros.
        assert all(not a.any() for a in arena.read_block(slot, 0))
    views = arena.block_views(slot)
    pattern = [np.arange(v.size, dtype=np.uint32).astype(v.dtype).reshape(v.shape) for v in views]
    for view, values in zip(views, pattern):
        view[...] = values
    for got, values in zip(arena.read_block(slot, 0), pattern):
        np.testing.assert_array_equal(got, values[0].view(got.dtype))
    keys = random_keys(rng)
    mx.eval(kvsnap.kv_write(arena, 0, keys, keys, [[slot]], [0]))
    assert_block_equal(arena, slot, written_block(keys))


# ------------------------------------------------------------------- pins


def test_pending_write_into_a_freed_slot_does_not_reach_its_next_owner(rng):
    # Owner 1 writes X lazily, then frees its slot; owner 2 gets a slot and
    # writes Y. When owner 1's write finally runs it must not land in owner
    # 2's block: the pending write holds its slot until it is gone.
    arena = small_arena(2)
    x, y = random_keys(rng), random_keys(rng)
    first = arena.alloc()
    pending = kvsnap.kv_write(arena, 0, x, x, [[first]], [0])  # not evaluated
    assert arena.decref(first) == 0
    second = arena.alloc()
    mx.eval(kvsnap.kv_write(arena, 0, y, y, [[second]], [0]))
    mx.eval(pending)
    assert_block_equal(arena, second, written_block(y))
    assert second != first


def test_a_pinned_slot_is_not_handed_out_when_it_is_the_last_one(rng):
    arena = small_arena(1)
    x = random_keys(rng)
    slot = arena.alloc()
    pending = kvsnap.kv_write(arena, 0, x, x, [[slot]], [0])
    arena.decref(slot)
    with pytest.raises(ArenaFullError, match="1 freed but held by pending kvsnap ops"):
        arena.alloc()
    mx.eval(pending)
    del pending
    gc.collect()
    assert arena.alloc() == slot


def test_pending_read_of_a_freed_slot_still_sees_its_data(rng):
    arena = small_arena(2)
    x, y = random_keys(rng), random_keys(rng)
    first = arena.alloc()
    mx.eval(kvsnap.kv_write(arena, 0, x, x, [[first]], [0]))
    q = to_mx(rng.normal(size=(1, 4, 1, D)))
    pending = kvsnap.attention(arena, 0, q, [[first]], [BT], scale=0.125)
    arena.decref(first)
    second = arena.alloc()
    mx.eval(kvsnap.kv_write(arena, 0, y, y, [[second]], [0]))
    mx.eval(pending)
    # The read saw x, as when it was built, not the next owner's y.
    shadow = small_arena(1)
    slot = shadow.alloc()
    mx.eval(kvsnap.kv_write(shadow, 0, x, x, [[slot]], [0]))
    expected = kvsnap.attention(shadow, 0, q, [[slot]], [BT], scale=0.125)
    assert rel_error(pending, to_f64(expected)) <= TOL["float32"]


def test_pins_last_as_long_as_the_pending_ops(rng):
    arena = small_arena(4)
    budget = arena.budget
    a, b = arena.alloc(), arena.alloc()
    keys = random_keys(rng, 2 * BT)
    write = kvsnap.kv_write(arena, 0, keys, keys, [[a, b]], [0])
    q = to_mx(rng.normal(size=(1, 4, 1, D)))
    read = kvsnap.attention(arena, 0, q, [[a, b]], [2 * BT], scale=0.125, after=[write])
    assert (arena.pins(a), arena.pins(b)) == (2, 2)
    arena.decref(a)
    arena.decref(b)
    s = arena.stats()
    assert (s["slots_used"], s["slots_pinned_free"], s["slots_free"]) == (2, 2, 2)
    assert arena.refcount(a) == 0 and budget.used == 2 * SLOT  # still charged
    # No new op may use them: they are not allocated any more.
    with pytest.raises(InvalidArgumentError, match="not allocated"):
        kvsnap.kv_write(arena, 0, keys, keys, [[a, b]], [0])
    assert [arena.alloc(), arena.alloc()] == [2, 3]
    with pytest.raises(ArenaFullError, match="2 freed but held"):
        arena.alloc()
    mx.eval(read)
    kf, vf = to_f64(keys), to_f64(keys)
    ref = reference_attention(to_f64(q), kf, vf, 0.125, causal=True)
    assert rel_error(read, ref) <= 0.2  # 4-bit K/V against float: the data is there
    # Evaluated: the graph is detached and the work is done, the pins are gone.
    assert (arena.pins(a), arena.pins(b)) == (0, 0)
    del write, read
    gc.collect()
    s = arena.stats()
    assert (s["slots_used"], s["slots_pinned_free"], s["slots_free"]) == (2, 0, 2)
    assert budget.used == 2 * SLOT
    assert sorted([arena.alloc(), arena.alloc()]) == [a, b]


def test_an_op_dropped_unevaluated_lets_its_slots_go(rng):
    arena = small_arena(1)
    keys = random_keys(rng)
    slot = arena.alloc()
    pending = kvsnap.kv_write(arena, 0, keys, keys, [[slot]], [0])
    arena.decref(slot)
    assert arena.stats()["slots_pinned_free"] == 1
    del pending
    gc.collect()
    assert arena.pins(slot) == 0 and arena.stats()["slots_used"] == 0
    assert arena.budget.used == 0


def test_threads_freeing_slots_under_pending_ops_keep_the_budget_exact(rng):
    # Each thread (its own CPU stream) frees its slot before the write runs,
    # so the slot is released by the stream thread when the write is done,
    # while the other threads allocate from the same budget.
    budget = kvsnap.Budget(2 * SLOT)  # three threads, two slots: they wait on each other
    arenas = [kvsnap.Arena(1, H, D, block_tokens=BT, budget=budget) for _ in range(3)]
    keys = random_keys(rng)

    def work(arena):
        done = 0
        while done < 60:
            try:
                slot = arena.alloc()
            except ArenaFullError:
                continue  # the other threads' slots are on their way back
            token = kvsnap.kv_write(arena, 0, keys, keys, [[slot]], [0])
            arena.decref(slot)
            mx.eval(token)
            done += 1

    with ThreadPoolExecutor(len(arenas)) as pool:
        for done in [pool.submit(work, a) for a in arenas]:
            done.result(timeout=120)  # re-raises a thread's exception here
    gc.collect()
    assert budget.used == 0
    assert all(a.stats()["slots_used"] == 0 for a in arenas)


# ----------------------------------------------------------- shared blocks


def test_kv_write_into_a_shared_block_is_refused(rng):
    arena = small_arena(4)
    own, shared = arena.alloc(), arena.alloc()
    arena.incref(shared)  # another sequence holds it too (a common prefix)
    keys = random_keys(rng, 2 * BT)
    with pytest.raises(InvalidArgumentError) as e:
        kvsnap.kv_write(arena, 0, keys, keys, [[own, shared]], [0])
    assert e.value.argument == "block_table"
    assert str(e.value).startswith(
        f"block_table: block 1 of sequence 0: slot {shared} is shared by 2 holders; "
        "kvsnap never writes into a shared block (copy it first)"
    )
    assert arena.pins(own) == arena.pins(shared) == 0  # nothing held by the refused op
    # Positions inside the private block only are fine; so is a read of both.
    short = random_keys(rng)
    mx.eval(kvsnap.kv_write(arena, 0, short, short, [[own, shared]], [0]))
    assert_block_equal(arena, own, written_block(short))
    arena.decref(shared)
    mx.eval(kvsnap.kv_write(arena, 0, keys, keys, [[own, shared]], [0]))


def test_write_block_refuses_a_shared_slot():
    arena = small_arena(2)
    slot = arena.alloc()
    block = arena.read_block(slot, 0)
    arena.incref(slot)
    with pytest.raises(InvalidArgumentError) as e:
        arena.write_block(slot, 0, block)
    assert e.value.argument == "slot"
    assert f"slot {slot} is shared by 2 holders" in str(e.value)
    arena.decref(slot)
    arena.write_block(slot, 0, block)
