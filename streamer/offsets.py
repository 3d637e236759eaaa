"""The checkpoint: which offsets are safe to commit, per partition.

Every fetched record is *tracked* before any work starts on it and marked *done* only when the
broker has acknowledged its result or its DLQ record. The committable offset of a partition is
the lowest offset still outstanding (or the highest done + 1 when none is), so a commit never
runs ahead of a record whose output is not yet durable, however out of order acks arrive.

Order of a commit (Quix Streams' checkpoint): flush the producer, then commit ``offset + 1``
of the last contiguous done record. On revoke a partition's state is forgotten; a bumped
*generation* makes late acks for it harmless.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field

from streamer.records import TopicPartition


@dataclass
class _PartitionState:
    generation: int
    pending: deque[int] = field(default_factory=deque)  # tracked offsets, ascending
    done: set[int] = field(default_factory=set)  # done offsets still behind a pending one
    abandoned: set[int] = field(default_factory=set)  # left to the next owner: never done
    next_commit: int | None = None  # offset to commit (last contiguous done + 1)
    committed: int | None = None


class OffsetTracker:
    """Per-partition outstanding offsets; wakes waiters when work drains."""

    def __init__(self) -> None:
        self._parts: dict[TopicPartition, _PartitionState] = {}
        self._generation = 0
        self._in_flight = 0
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
                dropped += len(state.pending) - len(state.done) - len(state.abandoned)
        self._in_flight -= dropped
        self._changed.set()
        return dropped

    def generation(self, tp: TopicPartition) -> int | None:
        state = self._parts.get(tp)
        return state.generation if state else None

    # -- tracking -------------------------------------------------------------------------------
    def track(self, tp: TopicPartition, offset: int) -> int:
        """Register a fetched record; returns the generation to pass back to :meth:`done`."""
        state = self._parts.get(tp)
        if state is None:  # fetched before the assign callback ran: assign implicitly
            self.assign([tp])
            state = self._parts[tp]
        if state.pending and offset <= state.pending[-1]:
            raise ValueError(f"{tp}: offset {offset} tracked out of order")
        state.pending.append(offset)
        self._in_flight += 1
        return state.generation

    def done(self, tp: TopicPartition, offset: int, generation: int) -> bool:
        """Mark a record's output as acknowledged. False if its partition was revoked since."""
        state = self._parts.get(tp)
        if state is None or state.generation != generation:
            return False
        if offset in state.done or offset in state.abandoned:
            return True
        state.done.add(offset)
        self._in_flight -= 1
        pending = state.pending
        while pending and pending[0] in state.done:
            off = pending.popleft()
            state.done.discard(off)
            state.next_commit = off + 1
        self._changed.set()
        return True

    def abandon(self, tp: TopicPartition, offset: int, generation: int) -> None:
        """Give up on a record (its partition is being revoked): it no longer counts as in
        flight, but stays pending, so no commit passes it and the next owner reprocesses it."""
        state = self._parts.get(tp)
        if state is None or state.generation != generation or offset in state.abandoned:
            return
        if offset in state.done:
            return
        state.abandoned.add(offset)
        self._in_flight -= 1
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

    def outstanding(self, tps: list[TopicPartition] | None = None) -> int:
        if tps is None:
            return self._in_flight
        total = 0
        for tp in tps:
            s = self._parts.get(tp)
            if s is not None:
                total += len(s.pending) - len(s.done) - len(s.abandoned)
        return total

    async def wait_changed(self) -> None:
        """Wait until some in-flight record completes (or a partition is forgotten)."""
        self._changed.clear()
        await self._changed.wait()

    async def wait_below(self, limit: int, tps: list[TopicPartition] | None = None) -> None:
        """Wait until fewer than ``limit`` records (of ``tps``) are outstanding."""
        while self.outstanding(tps) >= limit:
            await self.wait_changed()

    def partitions(self) -> list[TopicPartition]:
        return list(self._parts)
