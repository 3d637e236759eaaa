"""The checkpoint: which offsets are safe to commit, per partition, tracked per fetched chunk.

Every fetched chunk (one partition's records from one fetch) is *tracked* before any work starts
on it; each of its outputs (a result or a DLQ record) counts it down when the broker has
acknowledged it. The committable offset of a partition is the ``end`` (next offset) of the
newest chunk of the unbroken run of finished chunks at its head, so a commit never runs ahead of
a record whose output is not yet durable, however out of order acks arrive. Work is counted per
chunk, not per record: a fetch of 500 records is one append here, an acknowledged batch one
subtraction per chunk it touches.

Order of a commit (Quix Streams' checkpoint): flush the producer, then commit. On revoke a
partition's state is forgotten; a bumped *generation* makes late acks for it harmless.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from streamer.kafka.consumer import RawBatch
from streamer.stream.records import Chunk, TopicPartition


@dataclass
class _PartitionState:
    generation: int
    chunks: deque[Chunk] = field(default_factory=deque)  # tracked, in offset order
    last_tracked: int = -1
    next_commit: int | None = None  # offset to commit (last finished offset + 1)
    committed: int | None = None
    outstanding: int = 0  # records whose outputs are neither acknowledged nor abandoned


class OffsetTracker:
    """Per-partition chunks in flight; wakes waiters when work drains."""

    def __init__(self) -> None:
        self._parts: dict[TopicPartition, _PartitionState] = {}
        self._generation = 0
        self._in_flight = 0
        self._held = 0  # records of tracked chunks not yet passed by the commit point
        self._changed = asyncio.Event()  # set whenever in-flight work completes

    # -- assignment -------------------------------------------------------------------------
    def assign(self, tps: list[TopicPartition]) -> None:
        for tp in tps:
            if tp not in self._parts:
                self._generation += 1
                self._parts[tp] = _PartitionState(self._generation)

    def forget(self, tps: list[TopicPartition]) -> int:
        """Drop revoked partitions. Returns how many of their records were still in flight."""
        dropped = 0
        for tp in tps:
            state = self._parts.pop(tp, None)
            if state is not None:
                dropped += state.outstanding
                for chunk in state.chunks:
                    chunk.abandoned = True
                    self._held -= chunk.count
        self._in_flight -= dropped
        self._changed.set()
        return dropped

    def generation(self, tp: TopicPartition) -> int | None:
        state = self._parts.get(tp)
        return state.generation if state else None

    def current(self, chunk: Chunk) -> bool:
        """False once the chunk's partition was revoked (or re-assigned) since it was fetched."""
        state = self._parts.get(chunk.tp)
        return state is not None and state.generation == chunk.generation and not chunk.abandoned

    # -- tracking -------------------------------------------------------------------------------
    def track(self, tp: TopicPartition, fetched: list[Any], fetched_at: float, ns: int) -> Chunk:
        """Register one partition's fetch as a chunk (before any work starts): its record
        batches unparsed (:class:`~streamer.kafka.consumer.RawBatch`) or, from tools and tests,
        its records."""
        state = self._parts.get(tp)
        if state is None:  # fetched before the assign callback ran: assign implicitly
            self.assign([tp])
            state = self._parts[tp]
        if isinstance(fetched[0], RawBatch):
            chunk = Chunk(tp, state.generation, [], fetched_at, ns, raw=fetched)
        else:
            chunk = Chunk(tp, state.generation, fetched, fetched_at, ns)
        if chunk.first <= state.last_tracked:
            raise ValueError(f"{tp}: offset {chunk.first} tracked out of order")
        n = chunk.remaining = chunk.count
        state.chunks.append(chunk)
        state.last_tracked = chunk.last
        state.outstanding += n
        self._in_flight += n
        self._held += n
        return chunk

    def recount(self, chunk: Chunk, n: int) -> bool:
        """The chunk holds ``n`` records, not the ``count`` its offsets said (compaction removed
        some from inside a batch): correct the counts, as if tracked so. True if that finished
        it (all of its records were gone)."""
        delta, chunk.count = n - chunk.count, n
        chunk.remaining += delta
        state = self._parts.get(chunk.tp)
        if state is None or state.generation != chunk.generation:
            return False
        state.outstanding += delta
        self._in_flight += delta
        self._held += delta
        return chunk.remaining <= 0 and self._advance(state)

    def done(self, chunk: Chunk, n: int = 1) -> bool:
        """``n`` of the chunk's outputs were acknowledged. False if its partition was revoked."""
        state = self._parts.get(chunk.tp)
        if state is None or state.generation != chunk.generation:
            return False
        chunk.remaining -= n
        state.outstanding -= n
        self._in_flight -= n
        if chunk.remaining <= 0:
            self._advance(state)
        self._changed.set()
        return True

    def _advance(self, state: _PartitionState) -> bool:
        """Move the commit point past the finished chunks at the head. True if it moved."""
        chunks = state.chunks
        moved = False
        while chunks and chunks[0].remaining <= 0 and not chunks[0].abandoned:
            passed = chunks.popleft()
            state.next_commit = passed.end
            self._held -= passed.count
            moved = True
        if moved:
            self._changed.set()
        return moved

    def abandon(self, chunk: Chunk, n: int) -> None:
        """Give up on ``n`` of the chunk's records (its partition is being revoked): they no
        longer count as in flight, but the chunk stays pending, so no commit passes it and the
        next owner processes it again."""
        state = self._parts.get(chunk.tp)
        if state is None or state.generation != chunk.generation:
            return
        chunk.abandoned = True
        chunk.remaining -= n
        state.outstanding -= n
        self._in_flight -= n
        self._changed.set()

    # -- committing -----------------------------------------------------------------------------
    def committable(self) -> dict[TopicPartition, int]:
        """Offsets (next to read) that moved since the last :meth:`mark_committed`."""
        return {
            tp: s.next_commit
            for tp, s in self._parts.items()
            if s.next_commit is not None and s.next_commit != s.committed
        }

    def committed(self, tp: TopicPartition) -> int | None:
        state = self._parts.get(tp)
        return state.committed if state else None

    def mark_committed(self, offsets: dict[TopicPartition, int]) -> None:
        for tp, off in offsets.items():
            state = self._parts.get(tp)
            if state is not None:
                state.committed = off

    # -- waiting ------------------------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def held(self) -> int:
        """Records tracked and not yet behind the commit point: in flight, plus finished ones
        waiting behind an unfinished record of their partition (what memory holds)."""
        return self._held

    def oldest_fetched_at(self) -> float | None:
        """Monotonic fetch time of the oldest record not yet behind the commit point."""
        heads = [s.chunks[0].fetched_at for s in self._parts.values() if s.chunks]
        return min(heads) if heads else None

    def outstanding(self, tps: list[TopicPartition] | None = None) -> int:
        if tps is None:
            return self._in_flight
        return sum(s.outstanding for tp in tps if (s := self._parts.get(tp)) is not None)

    async def wait_changed(self) -> None:
        """Wait until some in-flight record completes (or a partition is forgotten)."""
        self._changed.clear()
        await self._changed.wait()

    async def wait_below(self, limit: int, tps: list[TopicPartition] | None = None) -> None:
        """Wait until fewer than ``limit`` records (of ``tps``) are outstanding."""
        while self.outstanding(tps) >= limit:
            await self.wait_changed()

    async def wait_held_below(self, limit: int) -> None:
        """Wait until fewer than ``limit`` records are held (see :attr:`held`)."""
        while self._held >= limit:
            await self.wait_changed()

    def partitions(self) -> list[TopicPartition]:
        return list(self._parts)
