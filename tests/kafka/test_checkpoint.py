"""Offset tracker: gaps, out-of-order acks, revocation."""

from __future__ import annotations

import asyncio

import pytest

from streamer.kafka.checkpoint import OffsetTracker
from streamer.stream.records import TopicPartition

TP = TopicPartition("t", 0)
TP1 = TopicPartition("t", 1)


def test_commits_only_contiguous_done_prefix() -> None:
    t = OffsetTracker()
    gens = {o: t.track(TP, o) for o in (0, 1, 2, 3)}
    t.done(TP, 2, gens[2])
    t.done(TP, 3, gens[3])
    assert t.committable() == {}  # 0 and 1 still outstanding
    t.done(TP, 0, gens[0])
    assert t.committable() == {TP: 1}
    t.done(TP, 1, gens[1])
    assert t.committable() == {TP: 4}
    assert t.in_flight == 0


def test_gaps_in_offsets_are_fine() -> None:
    t = OffsetTracker()
    g = t.track(TP, 10)
    t.track(TP, 15)  # compaction / transaction markers leave gaps
    t.done(TP, 10, g)
    assert t.committable() == {TP: 11}
    t.done(TP, 15, g)
    assert t.committable() == {TP: 16}


def test_mark_committed_hides_unchanged() -> None:
    t = OffsetTracker()
    g = t.track(TP, 0)
    t.done(TP, 0, g)
    t.mark_committed(t.committable())
    assert t.committable() == {}


def test_partitions_are_independent() -> None:
    t = OffsetTracker()
    g0 = t.track(TP, 0)
    g1 = t.track(TP1, 5)
    t.done(TP1, 5, g1)
    assert t.committable() == {TP1: 6}
    assert t.outstanding([TP]) == 1
    t.done(TP, 0, g0)
    assert t.committable() == {TP: 1, TP1: 6}


def test_duplicate_ack_counts_once() -> None:
    t = OffsetTracker()
    g = t.track(TP, 0)
    t.track(TP, 1)
    t.done(TP, 1, g)
    t.done(TP, 1, g)
    assert t.in_flight == 1


def test_out_of_order_tracking_is_a_bug() -> None:
    t = OffsetTracker()
    t.track(TP, 5)
    with pytest.raises(ValueError):
        t.track(TP, 4)


def test_late_ack_after_revoke_is_ignored() -> None:
    t = OffsetTracker()
    g = t.track(TP, 0)
    assert t.forget([TP]) == 1
    assert t.in_flight == 0
    t.assign([TP])
    assert t.done(TP, 0, g) is False  # old generation
    assert t.committable() == {}


def test_abandoned_records_block_commit_but_not_drain() -> None:
    t = OffsetTracker()
    g = t.track(TP, 0)
    t.track(TP, 1)
    t.track(TP, 2)
    t.done(TP, 0, g)
    t.abandon(TP, 1, g)  # never processed: the next owner must redo it
    t.done(TP, 2, g)
    assert t.outstanding([TP]) == 0
    assert t.committable() == {TP: 1}


async def test_wait_below_wakes_on_done() -> None:
    t = OffsetTracker()
    g = t.track(TP, 0)
    t.track(TP, 1)
    waiter = asyncio.ensure_future(t.wait_below(1))
    await asyncio.sleep(0)
    t.done(TP, 0, g)
    await asyncio.sleep(0)
    assert not waiter.done()
    t.done(TP, 1, g)
    await asyncio.wait_for(waiter, 1)
