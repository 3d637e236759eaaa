"""Batcher: deterministic tests (huge timeouts so only size/tokens flush, or a fake clock)."""

from __future__ import annotations

import asyncio

import pytest

from streamer.stream.batcher import Batcher, BatcherClosed

HUGE = 3_600_000.0


def make(**kw) -> Batcher[tuple[str, int]]:
    args = dict(max_batch_size=4, max_batch_tokens=10_000, max_wait_ms=HUGE)
    args.update(kw)
    return Batcher(length_of=lambda item: item[1], **args)


async def test_flushes_on_size_only() -> None:
    b = make()
    for i in range(3):
        b.put((f"r{i}", 5))
    waiter = asyncio.ensure_future(b.next_batch())
    await asyncio.sleep(0.01)
    assert not waiter.done()  # 3 < 4 and the timeout is huge
    b.put(("r3", 5))
    batch = await asyncio.wait_for(waiter, 1)
    assert sorted(x[0] for x in batch) == ["r0", "r1", "r2", "r3"]
    assert len(b) == 0


async def test_flushes_on_token_budget() -> None:
    b = make(max_batch_size=100, max_batch_tokens=20)
    b.put(("a", 8))
    b.put(("b", 8))
    waiter = asyncio.ensure_future(b.next_batch())
    await asyncio.sleep(0.01)
    assert not waiter.done()  # 16 tokens waiting < 20
    b.put(("c", 8))
    batch = await asyncio.wait_for(waiter, 1)
    # padded tokens may not exceed the budget: 2 rows x 8 = 16 <= 20, 3 x 8 = 24 > 20
    assert len(batch) == 2
    assert len(b) == 1


async def test_flushes_after_max_wait_with_fake_clock() -> None:
    now = [100.0]
    b = make(max_wait_ms=50, clock=lambda: now[0])
    b.put(("a", 3))
    assert not b._ready()
    now[0] += 0.049
    assert not b._ready()
    now[0] += 0.002
    assert b._ready()
    assert [x[0] for x in await b.next_batch()] == ["a"]


async def test_max_wait_real_clock_wakes_without_new_input() -> None:
    b = make(max_wait_ms=20)
    b.put(("a", 3))
    batch = await asyncio.wait_for(b.next_batch(), 2)
    assert batch == [("a", 3)]


async def test_flushes_when_upstream_idle() -> None:
    idle = [False]
    b = make(upstream_idle=lambda: idle[0])
    b.put(("a", 3))
    waiter = asyncio.ensure_future(b.next_batch())
    await asyncio.sleep(0.01)
    assert not waiter.done()
    idle[0] = True
    b.poke()
    assert await asyncio.wait_for(waiter, 1) == [("a", 3)]


async def test_groups_similar_lengths_around_the_oldest() -> None:
    b = make(max_batch_size=3)
    # oldest is a 10-token record; the 9/11/12 ones should join it, not the 100s
    for item in [("old", 10), ("x1", 100), ("n9", 9), ("x2", 101), ("n11", 11), ("n12", 12)]:
        b.put(item)
    batch = await b.next_batch()
    names = {x[0] for x in batch}
    assert "old" in names
    assert names <= {"old", "n9", "n11", "n12"}
    assert len(batch) == 3


async def test_single_record_over_budget_still_goes_alone() -> None:
    b = make(max_batch_size=8, max_batch_tokens=16)
    b.put(("huge", 64))
    b.put(("small", 2))
    first = await b.next_batch()
    assert first == [("huge", 64)]


async def test_close_drains_then_raises() -> None:
    b = make()
    b.put(("a", 1))
    b.close()
    assert await b.next_batch() == [("a", 1)]
    with pytest.raises(BatcherClosed):
        await b.next_batch()
    with pytest.raises(BatcherClosed):
        b.put(("b", 1))


async def test_remove_if_takes_items_out() -> None:
    b = make()
    for i in range(3):
        b.put((f"p{i % 2}-{i}", 2))
    gone = b.remove_if(lambda item: item[0].startswith("p1"))
    assert [g[0] for g in gone] == ["p1-1"]
    assert len(b) == 2
    assert b.pending_tokens == 4


def test_rejects_bad_limits() -> None:
    with pytest.raises(ValueError):
        make(max_batch_size=0)


async def test_never_mixes_groups() -> None:
    b: Batcher[tuple[str, int, str]] = Batcher(
        max_batch_size=3,
        max_batch_tokens=10_000,
        max_wait_ms=HUGE,
        length_of=lambda item: item[1],
        group_of=lambda item: item[2],
    )
    for i, model in enumerate(["a", "b", "a", "b", "b"]):
        b.put((f"r{i}", 5, model))
    # group b is full (3 records), so a batch is due; it is built around the oldest record
    # (group a), from group a only
    batch = await b.next_batch()
    assert [x[0] for x in batch] == ["r0", "r2"]
    b.close()
    rest = []
    while True:
        try:
            rest.append(await b.next_batch())
        except BatcherClosed:
            break
    for group in [batch, *rest]:
        assert len({x[2] for x in group}) == 1  # one model per batch
    assert sum(len(g) for g in [batch, *rest]) == 5
