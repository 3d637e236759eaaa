"""Offset tracker, per fetched chunk: gaps, out-of-order acks, revocation, abandoned work."""

from __future__ import annotations

import asyncio
import random

import pytest
from support import Msg

from streamer.kafka.checkpoint import OffsetTracker
from streamer.stream.records import Chunk, TopicPartition

TP = TopicPartition("t", 0)
TP1 = TopicPartition("t", 1)


def msgs(*offsets: int) -> list[Msg]:
    return [Msg(o) for o in offsets]


def track(t: OffsetTracker, tp: TopicPartition, *offsets: int) -> Chunk:
    return t.track(tp, msgs(*offsets), 1.0, 1_000)


def test_track_makes_a_chunk_of_the_fetch() -> None:
    t = OffsetTracker()
    chunk = t.track(TP, msgs(3, 4, 5), 12.5, 777)
    assert (chunk.tp, chunk.first, chunk.last) == (TP, 3, 5)
    assert (chunk.fetched_at, chunk.fetched_ns, chunk.remaining) == (12.5, 777, 3)
    assert chunk.where(1) == "t[0]@4"
    assert t.in_flight == 3 and t.outstanding([TP]) == 3
    assert t.partitions() == [TP]  # tracked before the assign callback ran: assigned implicitly
    assert t.current(chunk)


def test_commits_only_the_finished_run_of_chunks_at_the_head() -> None:
    t = OffsetTracker()
    a, b, c = track(t, TP, 0, 1), track(t, TP, 2, 3), track(t, TP, 4, 5)
    t.done(b, 2)
    t.done(c, 2)
    assert t.committable() == {}  # chunk a (0, 1) still outstanding
    t.done(a, 1)
    assert t.committable() == {}  # half a chunk is not a commit: record 1 is outstanding
    t.done(a, 1)
    assert t.committable() == {TP: 6}
    assert t.in_flight == 0


def test_commit_moves_chunk_by_chunk() -> None:
    t = OffsetTracker()
    a, b = track(t, TP, 0, 1, 2), track(t, TP, 3)
    t.done(a, 3)
    assert t.committable() == {TP: 3}
    t.done(b)
    assert t.committable() == {TP: 4}


def test_gaps_in_offsets_are_fine() -> None:
    t = OffsetTracker()
    a = track(t, TP, 10, 15)  # compaction / transaction markers leave gaps
    b = track(t, TP, 20)
    t.done(a, 2)
    assert t.committable() == {TP: 16}
    t.done(b)
    assert t.committable() == {TP: 21}


def test_mark_committed_hides_unchanged() -> None:
    t = OffsetTracker()
    a = track(t, TP, 0)
    t.done(a)
    t.mark_committed(t.committable())
    assert t.committable() == {}
    assert t.committed(TP) == 1
    b = track(t, TP, 1)
    t.done(b)
    assert t.committable() == {TP: 2}


def test_partitions_are_independent() -> None:
    t = OffsetTracker()
    a = track(t, TP, 0)
    b = track(t, TP1, 5)
    t.done(b)
    assert t.committable() == {TP1: 6}
    assert t.outstanding([TP]) == 1 and t.outstanding([TP1]) == 0
    t.done(a)
    assert t.committable() == {TP: 1, TP1: 6}


def test_out_of_order_tracking_is_a_bug() -> None:
    t = OffsetTracker()
    track(t, TP, 5, 6)
    with pytest.raises(ValueError):
        track(t, TP, 6, 7)  # overlaps the last chunk
    with pytest.raises(ValueError):
        track(t, TP, 4)
    track(t, TP1, 0)  # another partition has its own order


@pytest.mark.parametrize("seed", range(20))
def test_random_out_of_order_acks_never_commit_past_an_outstanding_record(seed: int) -> None:
    """Acks in any order, in any pieces: the commit is always the end of the finished head."""
    rng = random.Random(seed)
    t = OffsetTracker()
    chunks, offset = [], 0
    for _ in range(12):
        offset += rng.randint(0, 3)  # gaps
        n = rng.randint(1, 6)
        chunks.append(t.track(TP, msgs(*range(offset, offset + n)), 0.0, 0))
        offset += n
    acks = []  # (chunk index, count) pieces, shuffled across chunks
    for k, c in enumerate(chunks):
        left = len(c.messages)
        while left:
            piece = rng.randint(1, left)
            acks.append((k, piece))
            left -= piece
    rng.shuffle(acks)
    acked = [0] * len(chunks)
    for k, piece in acks:
        assert t.done(chunks[k], piece)
        acked[k] += piece
        finished = 0
        while finished < len(chunks) and acked[finished] == len(chunks[finished].messages):
            finished += 1
        expected = chunks[finished - 1].last + 1 if finished else None
        assert t.committable().get(TP) == expected
        if finished < len(chunks):  # never past the first record still outstanding
            assert expected is None or expected <= chunks[finished].first
    assert t.committable() == {TP: chunks[-1].last + 1}
    assert t.in_flight == 0


def test_late_ack_after_revoke_is_ignored() -> None:
    t = OffsetTracker()
    t.assign([TP])
    old = track(t, TP, 0, 1)
    assert t.forget([TP]) == 2
    assert t.in_flight == 0 and t.partitions() == []
    assert not t.current(old)
    t.assign([TP])  # owned again: a new generation
    assert t.done(old, 2) is False  # the old generation's ack changes nothing
    assert t.committable() == {} and t.in_flight == 0
    new = track(t, TP, 0, 1)  # the new owner fetches from the committed offset again
    assert t.current(new) and not t.current(old)
    assert t.done(new, 2) is True
    assert t.committable() == {TP: 2}


def test_assigning_an_owned_partition_again_keeps_its_generation() -> None:
    t = OffsetTracker()
    t.assign([TP])
    gen = t.generation(TP)
    chunk = track(t, TP, 0)
    t.assign([TP, TP1])
    assert t.generation(TP) == gen and t.current(chunk)
    assert t.generation(TP1) != gen
    assert t.done(chunk)
    assert t.committable() == {TP: 1}


def test_abandoned_records_block_commit_but_not_drain() -> None:
    t = OffsetTracker()
    a, b, c = track(t, TP, 0), track(t, TP, 1, 2, 3), track(t, TP, 4)
    t.done(a)
    t.done(b, 1)  # one of b's outputs made it ...
    t.abandon(b, 2)  # ... the other two were never processed: the next owner must redo them
    assert not t.current(b)
    t.done(c)
    assert t.outstanding([TP]) == 0 and t.in_flight == 0
    assert t.committable() == {TP: 1}  # never past b


def test_late_ack_of_an_abandoned_chunk_still_counts_down_but_never_commits() -> None:
    t = OffsetTracker()
    a = track(t, TP, 0, 1, 2)
    t.abandon(a, 2)  # two rows were waiting in the batcher; one was already being encoded
    assert t.outstanding([TP]) == 1
    assert t.done(a, 1)  # its result still arrives while the partition is being revoked
    assert t.outstanding([TP]) == 0
    assert t.committable() == {}


def test_abandon_after_revoke_is_ignored() -> None:
    t = OffsetTracker()
    a = track(t, TP, 0, 1)
    t.forget([TP])
    t.abandon(a, 2)
    assert t.in_flight == 0


def test_forget_abandons_waiting_chunks_and_returns_outstanding() -> None:
    t = OffsetTracker()
    a, b = track(t, TP, 0, 1), track(t, TP1, 0)
    t.done(a, 1)
    assert t.forget([TP, TopicPartition("other", 0)]) == 1
    assert a.abandoned and not t.current(a)
    assert t.in_flight == 1 and t.current(b)


async def test_wait_below_wakes_on_done() -> None:
    t = OffsetTracker()
    a = track(t, TP, 0, 1)
    waiter = asyncio.ensure_future(t.wait_below(1))
    await asyncio.sleep(0)
    t.done(a, 1)
    await asyncio.sleep(0)
    assert not waiter.done()  # one record still outstanding
    t.done(a, 1)
    await asyncio.wait_for(waiter, 5)


async def test_wait_below_for_some_partitions_and_on_forget() -> None:
    t = OffsetTracker()
    a, b = track(t, TP, 0), track(t, TP1, 0)
    only_tp = asyncio.ensure_future(t.wait_below(1, [TP]))
    everything = asyncio.ensure_future(t.wait_below(1))
    await asyncio.sleep(0)
    t.done(a)
    await asyncio.wait_for(only_tp, 5)  # TP1 still outstanding does not matter to it
    await asyncio.sleep(0)
    assert not everything.done()
    assert t.outstanding() == 1 and t.current(b)
    t.forget([TP1])  # a revoke drains the partition too
    await asyncio.wait_for(everything, 5)


def test_held_counts_finished_records_stuck_behind_an_unfinished_one() -> None:
    """A stuck send holds its partition's commit; what finished behind it is still held (and
    bounds fetching), and the oldest one's fetch time is what the age metric reports."""
    t = OffsetTracker()
    stuck = t.track(TP, msgs(0), 5.0, 1)
    later = t.track(TP, msgs(1, 2, 3), 6.0, 2)
    other = t.track(TP1, msgs(0, 1), 7.0, 3)
    t.done(later, 3)
    t.done(other, 2)
    assert t.in_flight == 1 and t.held == 4  # 1 stuck + 3 finished behind it; TP1 passed
    assert t.oldest_fetched_at() == 5.0
    t.done(stuck)
    assert t.held == 0 and t.oldest_fetched_at() is None
    again = t.track(TP1, msgs(2, 3), 8.0, 4)
    assert t.held == 2
    t.forget([TP1])
    assert t.held == 0 and not t.current(again)


async def test_wait_held_below_wakes_when_the_stuck_record_finishes() -> None:
    t = OffsetTracker()
    stuck = t.track(TP, msgs(0), 1.0, 1)
    t.done(t.track(TP, msgs(1, 2), 1.0, 1), 2)
    waiter = asyncio.ensure_future(t.wait_held_below(2))
    await asyncio.sleep(0)
    assert not waiter.done()
    t.done(stuck)
    await asyncio.wait_for(waiter, 1)
