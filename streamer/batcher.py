"""Micro-batching by size, token budget and time, grouping records of similar length.

A batch is released when any of these holds:

* ``max_batch_size`` records are waiting, or their tokens reach ``max_batch_tokens``;
* the oldest waiting record has waited ``max_wait_ms`` (monotonic clock);
* nothing more is on its way (``upstream_idle()``), so a record never waits for a batch that
  will not fill — at low load latency is one batch time, at high load batches fill;
* the batcher is closed (drain).

A batch never mixes groups (models): it is built around the *oldest* waiting record (so none
starves) from its neighbours of the same group in length order, growing towards whichever side
adds the least padding, until the size limit or the padded-token budget (rows × longest row)
would be exceeded. Waiting uses an event, never a sleep loop.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import time
from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(slots=True)
class _Entry(Generic[T]):
    length: int
    seq: int
    arrived: float
    item: T
    group: Hashable = None

    def sort_key(self) -> tuple[int, int]:
        return (self.length, self.seq)


class BatcherClosed(Exception):
    """Raised by :meth:`Batcher.next_batch` once closed and empty."""


class Batcher(Generic[T]):
    def __init__(
        self,
        *,
        max_batch_size: int,
        max_batch_tokens: int,
        max_wait_ms: float,
        length_of: Callable[[T], int],
        upstream_idle: Callable[[], bool] | None = None,
        group_of: Callable[[T], Hashable] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_batch_size < 1 or max_batch_tokens < 1:
            raise ValueError("max_batch_size and max_batch_tokens must be >= 1")
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_ms / 1000.0
        self._length_of = length_of
        self._upstream_idle = upstream_idle
        self._group_of = group_of
        self._clock = clock
        self._group_rows: Counter[Hashable] = Counter()
        self._group_tokens: Counter[Hashable] = Counter()
        self._sorted: list[_Entry[T]] = []  # by (length, seq)
        self._tokens = 0
        self._seq = itertools.count()
        self._wakeup = asyncio.Event()
        self._closed = False

    def __len__(self) -> int:
        return len(self._sorted)

    @property
    def pending_tokens(self) -> int:
        return self._tokens

    def put(self, item: T) -> None:
        if self._closed:
            raise BatcherClosed("batcher is closed")
        group = self._group_of(item) if self._group_of is not None else None
        entry = _Entry(max(1, self._length_of(item)), next(self._seq), self._clock(), item, group)
        bisect.insort(self._sorted, entry, key=_Entry.sort_key)
        self._tokens += entry.length
        self._group_rows[group] += 1
        self._group_tokens[group] += entry.length
        self._wakeup.set()

    def put_many(self, items: list[T]) -> None:
        for item in items:
            self.put(item)

    def poke(self) -> None:
        """Re-evaluate flush conditions (e.g. upstream just became idle)."""
        self._wakeup.set()

    def close(self) -> None:
        """No more input: pending records flush without waiting, then BatcherClosed."""
        self._closed = True
        self._wakeup.set()

    def remove_if(self, predicate: Callable[[T], bool]) -> list[T]:
        """Take out waiting items (e.g. of revoked partitions) and return them."""
        keep, gone = [], []
        for e in self._sorted:
            (gone if predicate(e.item) else keep).append(e)
        self._sorted = keep
        self._tokens = sum(e.length for e in keep)
        for e in gone:
            self._forget(e)
        return [e.item for e in gone]

    def _forget(self, e: _Entry[T]) -> None:
        self._group_rows[e.group] -= 1
        self._group_tokens[e.group] -= e.length
        if self._group_rows[e.group] <= 0:
            del self._group_rows[e.group]
            del self._group_tokens[e.group]

    def _deadline(self) -> float:
        oldest = min(self._sorted, key=lambda e: e.seq)
        return oldest.arrived + self.max_wait_s

    def _ready(self) -> bool:
        if not self._sorted:
            return False
        if self._closed:
            return True
        for group, rows in self._group_rows.items():
            if rows >= self.max_batch_size or self._group_tokens[group] >= self.max_batch_tokens:
                return True
        if self._clock() >= self._deadline():
            return True
        return self._upstream_idle is not None and self._upstream_idle()

    async def next_batch(self) -> list[T]:
        """Wait for a batch per the rules above and take it out."""
        while True:
            if self._ready():
                return self._take()
            if self._closed:
                raise BatcherClosed("batcher is closed")
            self._wakeup.clear()
            timeout = None
            if self._sorted:
                timeout = max(0.0, self._deadline() - self._clock())
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout)
            except TimeoutError:
                pass

    def _take(self) -> list[T]:
        first = min(self._sorted, key=lambda e: e.seq)
        entries = [e for e in self._sorted if e.group == first.group]  # one group per batch
        oldest = entries.index(first)
        lo, hi = oldest, oldest + 1  # window [lo, hi) in length order
        longest = entries[oldest].length
        budget = self.max_batch_tokens
        while hi - lo < self.max_batch_size:
            rows = hi - lo + 1
            # Padding each candidate adds: a shorter row is padded up to the longest; a longer
            # row pads every row already in the batch up to itself.
            left = None
            if lo > 0 and rows * longest <= budget:
                left = longest - entries[lo - 1].length
            right = None
            if hi < len(entries) and rows * entries[hi].length <= budget:
                right = (hi - lo) * (entries[hi].length - longest)
            if left is None and right is None:
                break
            if right is None or (left is not None and left <= right):
                lo -= 1
            else:
                longest = entries[hi].length
                hi += 1
        taken = entries[lo:hi]
        gone = {id(e) for e in taken}
        self._sorted = [e for e in self._sorted if id(e) not in gone]
        self._tokens -= sum(e.length for e in taken)
        for e in taken:
            self._forget(e)
        return [e.item for e in taken]
