"""Batcher: deterministic tests (an injected clock, or timeouts so long only size/tokens flush)."""

from __future__ import annotations

import asyncio
import itertools

import numpy as np
import pytest
from support import Msg

from streamer.stream.batcher import POOL_BATCHES, Batcher, BatcherClosed, Rows, window
from streamer.stream.records import Chunk, TopicPartition

HOUR_MS = 3_600_000.0


class Model:
    """Stands in for a loaded model version: rows are grouped by its identity."""

    def __init__(self, name: str) -> None:
        self.name = name


MODEL = Model("m")
_offsets = itertools.count()


IN0 = TopicPartition("in", 0)


def chunk(n: int, tp: TopicPartition = IN0) -> Chunk:
    messages = [Msg(next(_offsets)) for _ in range(n)]
    return Chunk(tp, 1, messages, fetched_at=0.0, remaining=n)


def rows(lengths: list[int], bound: object = MODEL, source: Chunk | None = None) -> Rows:
    """A block of rows with these token counts; row ``i``'s id is ``[i, i, ...]``-ish."""
    n = len(lengths)
    source = source or chunk(n)
    ids = np.empty(n, dtype=object)
    ids[:] = [[source.messages[i].offset] * length for i, length in enumerate(lengths)]
    return Rows(
        bound,
        np.array([source] * n, dtype=object),
        np.arange(n, dtype=np.int64),
        ids,
        np.array(lengths, dtype=np.int64),
        np.array([f"id-{source.messages[i].offset}" for i in range(n)], dtype=object),
        np.full(n, None, dtype=object),
        np.zeros(n),
        np.zeros((n, 2), np.int64),
        np.zeros(n),
    )


def ids_of(batch: Rows) -> list[str]:
    return batch.record_ids.tolist()


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(**kw) -> Batcher:
    args: dict = dict(max_batch_size=4, max_batch_tokens=10_000, max_wait_ms=HOUR_MS)
    args.update(kw)
    return Batcher(**args)


async def settle() -> None:
    """Let the waiter run up to its next wait (a few loop turns; no time passes)."""
    for _ in range(5):
        await asyncio.sleep(0)


async def drain_async(b: Batcher) -> list[Rows]:
    b.close()
    out = []
    while True:
        try:
            out.append(await b.next_batch())
        except BatcherClosed:
            return out


def test_rows_take_and_concat_keep_columns_together() -> None:
    r = rows([3, 1, 2])
    assert len(r) == 3 and r.tokens == 6
    picked = r.take(np.array([2, 0]))
    assert picked.lengths.tolist() == [2, 3] and picked.index.tolist() == [2, 0]
    assert picked.bound is MODEL
    assert len(picked.ids[0]) == 2
    masked = r.take(np.array([False, True, False]))
    assert masked.lengths.tolist() == [1]
    both = Rows.concat([picked, masked])
    assert both.lengths.tolist() == [2, 3, 1] and both.tokenize_ns.shape == (3, 2)
    assert len(Rows.empty(MODEL)) == 0 and Rows.empty(MODEL).tokens == 0


async def test_flushes_on_size_only() -> None:
    b = make()
    b.put(rows([5, 5, 5]))
    waiter = asyncio.ensure_future(b.next_batch())
    await settle()
    assert not waiter.done()  # 3 < 4 and the timeout is an hour
    b.put(rows([5]))
    batch = await asyncio.wait_for(waiter, 5)
    assert len(batch) == 4
    assert len(b) == 0 and b.pending_tokens == 0


async def test_one_block_over_the_size_flushes_in_several_batches() -> None:
    b = make()
    b.put(rows([5] * 10))
    sizes = [len(await b.next_batch()), len(await b.next_batch())]
    assert sizes == [4, 4] and len(b) == 2  # the last two wait for more (or for the clock)


async def test_flushes_on_token_budget() -> None:
    b = make(max_batch_size=100, max_batch_tokens=20)
    b.put(rows([8, 8]))
    waiter = asyncio.ensure_future(b.next_batch())
    await settle()
    assert not waiter.done()  # 16 tokens waiting < 20
    b.put(rows([8]))
    batch = await asyncio.wait_for(waiter, 5)
    # padded tokens may not exceed the budget: 2 rows x 8 = 16 <= 20, 3 x 8 = 24 > 20
    assert len(batch) == 2
    assert len(b) == 1 and b.pending_tokens == 8


async def test_flushes_after_max_wait_of_the_oldest_with_fake_clock() -> None:
    clock = Clock()
    b = make(max_wait_ms=50, clock=clock)
    b.put(rows([3]))
    assert not b._ready()
    clock.now += 0.030
    b.put(rows([3]))  # arrives later: does not push the deadline back
    clock.now += 0.019
    assert not b._ready()
    clock.now += 0.002
    assert b._ready()
    assert len(await b.next_batch()) == 2


async def test_waiting_batch_is_released_when_the_clock_passes_max_wait() -> None:
    clock = Clock()
    b = make(max_wait_ms=HOUR_MS, clock=clock)
    b.put(rows([3]))
    waiter = asyncio.ensure_future(b.next_batch())
    await settle()
    b.poke()  # re-evaluated before the deadline: still waits
    await settle()
    assert not waiter.done()
    clock.now += 3600.001
    b.poke()
    assert len(await asyncio.wait_for(waiter, 5)) == 1


async def test_max_wait_real_clock_wakes_without_new_input() -> None:
    b = make(max_wait_ms=1)
    b.put(rows([3]))
    # nothing pokes the batcher: its own timeout (the oldest record's deadline) wakes it
    batch = await asyncio.wait_for(b.next_batch(), 30)
    assert len(batch) == 1 and len(b) == 0


async def test_flushes_when_upstream_idle() -> None:
    idle = [False]
    b = make(upstream_idle=lambda: idle[0])
    b.put(rows([3]))
    waiter = asyncio.ensure_future(b.next_batch())
    await settle()
    assert not waiter.done()
    idle[0] = True
    b.poke()
    assert len(await asyncio.wait_for(waiter, 5)) == 1


async def test_groups_similar_lengths_around_the_oldest() -> None:
    b = make(max_batch_size=3)
    # oldest is a 10-token record; the 9/11/13 ones should join it, not the 100s
    b.put(rows([10]))
    b.put(rows([100, 9, 101, 11, 13]))
    batch = await b.next_batch()
    lengths = sorted(batch.lengths.tolist())
    assert 10 in lengths and len(lengths) == 3
    assert set(lengths) <= {9, 10, 11, 13}
    assert lengths == [9, 10, 11]  # pads least: 3 x 11 - 30 = 3 (10, 11, 13 would pad 5)


async def test_the_oldest_never_starves() -> None:
    b = make(max_batch_size=4, max_batch_tokens=64)
    b.put(rows([60]))  # long, oldest: a batch of short rows would pad much less without it
    b.put(rows([2] * 8))
    first = await b.next_batch()
    assert first.lengths.tolist() == [60]  # alone (4 x 60 > 64), but first
    b.put(rows([50]))
    for _ in range(2):
        assert (await b.next_batch()).lengths.tolist() == [2, 2, 2, 2]
    assert (await drain_async(b))[0].lengths.tolist() == [50]


async def test_candidates_are_the_oldest_pool_of_rows() -> None:
    """Neighbours come from the oldest POOL_BATCHES x max_batch_size rows: a perfect match far
    behind them waits its turn, and rows behind the pool are not touched (merged or copied)."""
    b = make(max_batch_size=2)
    pool = 2 * POOL_BATCHES
    b.put(rows([10] + [50] * (pool - 1)))  # the oldest fetch: the pool
    late = rows([10])
    b.put(late)  # matches the oldest exactly, but behind the pool
    batch = await b.next_batch()
    assert batch.lengths.tolist() == [10, 50]
    assert b._groups[id(MODEL)].parts[-1] is late  # behind the pool: untouched
    seen = [batch] + await drain_async(b)
    assert sum(len(x) for x in seen) == pool + 1


async def test_everything_waiting_that_fits_goes_as_is() -> None:
    b = make(max_batch_size=8)
    block = rows([3, 9, 4])
    b.put(block)
    b.close()
    assert await b.next_batch() is block  # no sort, no copy
    assert len(b) == 0 and b.pending_tokens == 0


async def test_single_record_over_budget_still_goes_alone() -> None:
    b = make(max_batch_size=8, max_batch_tokens=16)
    b.put(rows([64, 2]))
    first = await b.next_batch()
    assert first.lengths.tolist() == [64]
    assert len(b) == 1


@pytest.mark.parametrize("seed", range(10))
async def test_every_batch_respects_size_and_token_budget(seed: int) -> None:
    rng = np.random.default_rng(seed)
    b = make(max_batch_size=6, max_batch_tokens=64)
    put = 0
    for _ in range(8):
        lengths = rng.integers(1, 40, size=int(rng.integers(1, 9))).tolist()
        b.put(rows(lengths))
        put += len(lengths)
    seen = []
    for batch in await drain_async(b):
        assert 1 <= len(batch) <= 6
        assert len(batch) == 1 or len(batch) * int(batch.lengths.max()) <= 64
        seen += ids_of(batch)
    assert len(seen) == put and len(set(seen)) == put  # every row exactly once


def test_window_is_the_largest_that_fits_and_pads_least() -> None:
    """Against brute force over every window (run of the length order) that contains ``p``."""
    rng = np.random.default_rng(7)
    for _ in range(300):
        n = int(rng.integers(1, 8))
        lengths = np.sort(rng.integers(1, 20, size=n))
        p = int(rng.integers(0, n))
        limits = make(
            max_batch_size=int(rng.integers(1, 6)), max_batch_tokens=int(rng.integers(8, 60))
        )
        got = window(lengths, p, limits)
        assert got.start <= p < got.stop
        k = got.stop - got.start
        best_k, best_pad = 1, None
        for size in range(1, min(n, limits.max_batch_size) + 1):
            for lo in range(max(0, p - size + 1), min(p, n - size) + 1):
                chosen = lengths[lo : lo + size]
                if size > 1 and size * chosen.max() > limits.max_batch_tokens:
                    continue
                pad = size * chosen.max() - chosen.sum()
                if size > best_k or (size == best_k and (best_pad is None or pad < best_pad)):
                    best_k, best_pad = size, pad
        assert k == best_k, (lengths, p, limits.max_batch_size, limits.max_batch_tokens)
        chosen = lengths[got]
        if k > 1:
            assert k * chosen.max() <= limits.max_batch_tokens
            assert k * chosen.max() - chosen.sum() == best_pad


async def test_close_drains_then_raises() -> None:
    b = make()
    b.put(rows([1]))
    b.close()
    assert len(await b.next_batch()) == 1
    with pytest.raises(BatcherClosed):
        await b.next_batch()
    with pytest.raises(BatcherClosed):
        b.put(rows([1]))


async def test_close_wakes_a_waiting_consumer() -> None:
    b = make()
    waiter = asyncio.ensure_future(b.next_batch())
    await settle()
    assert not waiter.done()
    b.close()
    with pytest.raises(BatcherClosed):
        await asyncio.wait_for(waiter, 5)


async def test_empty_blocks_are_ignored() -> None:
    b = make()
    b.put(Rows.empty(MODEL))
    assert len(b) == 0 and not b._ready()


async def test_remove_if_takes_rows_of_matching_chunks_out() -> None:
    b = make(max_batch_size=100)
    keep_tp, gone_tp = TopicPartition("in", 0), TopicPartition("in", 1)
    other = Model("other")
    b.put(rows([2, 3], source=chunk(2, keep_tp)))
    b.put(rows([4, 5, 6], source=chunk(3, gone_tp)))
    b.put(rows([7], bound=other, source=chunk(1, gone_tp)))
    b.put(rows([1], bound=other, source=chunk(1, keep_tp)))
    gone = b.remove_if(lambda c: c.tp == gone_tp)
    assert sorted(sorted(g.lengths.tolist()) for g in gone) == [[4, 5, 6], [7]]
    assert all(c.tp == gone_tp for g in gone for c in g.chunks)
    assert {g.bound.name for g in gone} == {"m", "other"}
    assert len(b) == 3 and b.pending_tokens == 6
    assert b.remove_if(lambda c: False) == []
    left = await drain_async(b)
    assert sorted(x for batch in left for x in batch.lengths.tolist()) == [1, 2, 3]
    assert all(c.tp == keep_tp for batch in left for c in batch.chunks)


async def test_remove_if_can_empty_a_group() -> None:
    b = make()
    b.put(rows([2, 2]))
    gone = b.remove_if(lambda c: True)
    assert [len(g) for g in gone] == [2]
    assert len(b) == 0 and not b._ready()


def test_rejects_bad_limits() -> None:
    with pytest.raises(ValueError):
        make(max_batch_size=0)
    with pytest.raises(ValueError):
        make(max_batch_tokens=0)


async def test_never_mixes_models() -> None:
    a, b_model = Model("a"), Model("b")
    b = make(max_batch_size=3)
    blocks = [rows([5], a), rows([5], b_model), rows([5], a), rows([5, 5], b_model)]
    owner = {rid: r.bound for r in blocks for rid in ids_of(r)}
    for r in blocks:
        b.put(r)
    # model b has 3 rows waiting, so a batch is due; it is built around the oldest row
    # (model a), from model a only
    batch = await b.next_batch()
    assert batch.bound is a and len(batch) == 2
    rest = await drain_async(b)
    assert [(r.bound.name, len(r)) for r in rest] == [("b", 3)]
    for r in [batch, *rest]:
        assert {owner[rid] for rid in ids_of(r)} == {r.bound}  # one model per batch


async def test_ordered_batches_are_runs_of_the_oldest_in_arrival_order() -> None:
    """batching.order: partition — no length grouping: a batch is the longest run of the oldest
    rows that fits the budget, so rows leave in the order they came."""
    b = make(max_batch_size=4, max_batch_tokens=40, ordered=True)
    b.put(rows([3, 30, 2, 2, 9, 1, 1]))
    first = await b.next_batch()
    assert first.lengths.tolist() == [3]  # 2 x 30 > 40: the long one goes next, alone
    b.close()
    rest = await drain_async(b)
    assert [x.lengths.tolist() for x in rest] == [[30], [2, 2, 9, 1], [1]]
    order = [*ids_of(first), *(i for x in rest for i in ids_of(x))]
    assert order == sorted(order, key=lambda s: int(s.split("-")[1]))


@pytest.mark.parametrize("seed", range(5))
async def test_ordered_never_reorders_and_respects_the_limits(seed: int) -> None:
    rng = np.random.default_rng(seed)
    b = make(max_batch_size=5, max_batch_tokens=64, ordered=True)
    for _ in range(6):
        b.put(rows(rng.integers(1, 40, size=int(rng.integers(1, 9))).tolist()))
    seen = []
    for batch in await drain_async(b):
        assert 1 <= len(batch) <= 5
        assert len(batch) == 1 or len(batch) * int(batch.lengths.max()) <= 64
        seen += ids_of(batch)
    assert seen == sorted(seen, key=lambda s: int(s.split("-")[1]))


async def test_ordered_batches_span_blocks_and_split_the_last_one_with_columns_aligned() -> None:
    """A batch takes whole blocks, then the start of the one it ends in; what stays behind is
    counted and comes next, every column of a row still together."""
    b = make(max_batch_size=5, max_batch_tokens=10_000, ordered=True)
    blocks = [rows([1, 2, 3]), rows([4, 5, 6, 7]), rows([8, 9, 10, 11])]
    for block in blocks:
        b.put(block)
    first = await b.next_batch()
    assert first.lengths.tolist() == [1, 2, 3, 4, 5]
    assert len(b) == 6 and b.pending_tokens == 6 + 7 + 8 + 9 + 10 + 11
    b.close()
    rest = await drain_async(b)
    assert [x.lengths.tolist() for x in rest] == [[6, 7, 8, 9, 10], [11]]
    for batch in [first, *rest]:
        columns = (ids_of(batch), batch.ids.tolist(), batch.lengths.tolist())
        for rid, ids, n in zip(*columns, strict=True):
            assert ids == [int(rid.split("-")[1])] * n  # id, tokens and length of one row
    assert len(b) == 0
