"""Micro-batching by size, token budget and time, grouping records of similar length.

Records wait as :class:`Rows`, column-wise (numpy), so a fetch of hundreds of records is one
append and a batch one selection: the event loop does no Python work per record here.

A batch is released when any of these holds:

* ``max_batch_size`` records of one model are waiting, or their tokens reach ``max_batch_tokens``;
* the oldest waiting record has waited ``max_wait_ms`` (monotonic clock);
* nothing more is on its way (``upstream_idle()``), so a record never waits for a batch that
  will not fill — at low load latency is one batch time, at high load batches fill;
* the batcher is closed (drain).

A batch never mixes models (or versions). With ``ordered`` (``batching.order: partition``, the
default) it is the longest run of the oldest waiting records, in arrival order, that fits the
padded-token budget (rows × longest row): records of a partition arrive in offset order, so
results leave in input order per partition, and per key. Without it, a batch is built around the
*oldest* waiting record (so none starves) from its neighbours of the same model in length order:
the largest window that fits the budget, and among those the one that pads least.
The neighbours considered are the oldest ``POOL_BATCHES × max_batch_size`` waiting rows of that
model (at least the whole oldest fetch): enough to group lengths well, while the cost of taking
a batch stays the same however many records wait behind them.
Waiting uses an event, never a sleep loop.

**Priority** (``put(rows, priority=True)``, the HTTP API's rows): they wait in groups of their
own, per model version, and are released at once, ahead of everything else: a query waits at
most for the batch that is running (no ``max_wait_ms``, no backlog ahead of it). The next batch
is taken from the priority group whose oldest row waited longest, by the same rules. With
``priority_fill`` it is filled up with the oldest waiting stream rows of the same version (in
arrival order) while the size and token limits leave room: right where a batch's time hardly
grows with its rows (a GPU), so the query pays nothing and the stream loses no batch; wrong where
it grows with its tokens (a CPU), where the query would wait for the stream rows while a batch
of the query alone costs the stream only the query's own tokens. Priority rows come first.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

_EMPTY_OBJ = np.empty(0, dtype=object)
POOL_BATCHES = 4  # candidates for a batch: the oldest this many batches' worth of rows


@dataclass(slots=True)
class Rows:
    """Tokenized records bound to one model version, one numpy column per field.

    ``chunks[i]`` is the :class:`~streamer.stream.records.Chunk` row ``i`` came from and
    ``index[i]`` its position there; ``ids[i]`` its token ids; ``record_ids[i]`` the id field of
    its JSON value; ``trace[i]`` ``None`` or its ``(traceparent, tracestate)`` header bytes.
    A row of no tokens is a tombstone (a null value passed on as a delete, ``input.on_tombstone:
    pass``): it skips the model but keeps its place; text is never empty (decoding refuses it).
    """

    bound: Any  # the registry's Loaded model version every row is bound to
    chunks: np.ndarray  # object
    index: np.ndarray  # int64
    ids: np.ndarray  # object: list[int] per row
    lengths: np.ndarray  # int64
    record_ids: np.ndarray  # object
    trace: np.ndarray  # object
    arrived: np.ndarray  # float64, monotonic time of arrival in the batcher
    tokenize_ns: np.ndarray  # int64 (n, 2): wall-clock span of its tokenize call
    fetched_at: np.ndarray  # float64, monotonic time its chunk was fetched

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def tokens(self) -> int:
        return int(self.lengths.sum())

    def take(self, idx: np.ndarray) -> Rows:
        """The rows at ``idx`` (integer positions or a boolean mask), as a new Rows."""
        return Rows(self.bound, *[getattr(self, name)[idx] for name in _COLUMNS])

    @staticmethod
    def concat(parts: list[Rows]) -> Rows:
        if len(parts) == 1:
            return parts[0]
        return Rows(
            parts[0].bound,
            *[np.concatenate([getattr(p, name) for p in parts]) for name in _COLUMNS],
        )

    @staticmethod
    def empty(bound: Any) -> Rows:
        return Rows(
            bound,
            _EMPTY_OBJ,
            np.empty(0, np.int64),
            _EMPTY_OBJ,
            np.empty(0, np.int64),
            _EMPTY_OBJ,
            _EMPTY_OBJ,
            np.empty(0, np.float64),
            np.empty((0, 2), np.int64),
            np.empty(0, np.float64),
        )


_COLUMNS = tuple(f.name for f in fields(Rows)[1:])


class BatcherClosed(Exception):
    """Raised by :meth:`Batcher.next_batch` once closed and empty."""


class _Pending:
    """One model's waiting rows, in arrival order (so the oldest is row 0)."""

    __slots__ = ("parts", "rows", "tokens")

    def __init__(self) -> None:
        self.parts: list[Rows] = []
        self.rows = 0
        self.tokens = 0

    def merged(self) -> Rows:
        if len(self.parts) > 1:
            self.parts = [Rows.concat(self.parts)]
        return self.parts[0]

    def head(self, n: int) -> Rows:
        """The oldest parts holding at least ``n`` rows, merged into one; later parts untouched."""
        i, total = 0, 0
        while i < len(self.parts) and total < n:
            total += len(self.parts[i])
            i += 1
        if i > 1:
            self.parts[:i] = [Rows.concat(self.parts[:i])]
        return self.parts[0]

    def oldest(self) -> float:
        return float(self.parts[0].arrived[0])


class Batcher:
    def __init__(
        self,
        *,
        max_batch_size: int,
        max_batch_tokens: int,
        max_wait_ms: float,
        upstream_idle: Callable[[], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
        ordered: bool = False,
        priority_fill: bool = True,
    ) -> None:
        if max_batch_size < 1 or max_batch_tokens < 1:
            raise ValueError("max_batch_size and max_batch_tokens must be >= 1")
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_ms / 1000.0
        self.ordered = ordered
        self.priority_fill = priority_fill
        self._upstream_idle = upstream_idle
        self._clock = clock
        self._groups: dict[Hashable, _Pending] = {}  # by model version, in first-arrival order
        self._priority: dict[Hashable, _Pending] = {}  # the same, for priority rows
        self._wakeup = asyncio.Event()
        self._closed = False

    def __len__(self) -> int:
        return sum(g.rows for g in (*self._groups.values(), *self._priority.values()))

    @property
    def pending_tokens(self) -> int:
        return sum(g.tokens for g in (*self._groups.values(), *self._priority.values()))

    @property
    def pending_priority(self) -> int:
        """Priority rows waiting (the HTTP API's)."""
        return sum(g.rows for g in self._priority.values())

    def put(self, rows: Rows, *, priority: bool = False) -> None:
        """Add a block of rows (one model version); they arrive now. ``priority`` rows go
        ahead of every stream row (see the module's docstring)."""
        if self._closed:
            raise BatcherClosed("batcher is closed")
        if not len(rows):
            return
        rows.arrived = np.full(len(rows), self._clock())
        groups = self._priority if priority else self._groups
        group = groups.get(id(rows.bound))
        if group is None:
            group = groups[id(rows.bound)] = _Pending()
        group.parts.append(rows)
        group.rows += len(rows)
        group.tokens += rows.tokens
        self._wakeup.set()

    def poke(self) -> None:
        """Re-evaluate flush conditions (e.g. upstream just became idle)."""
        self._wakeup.set()

    def close(self) -> None:
        """No more input: pending records flush without waiting, then BatcherClosed."""
        self._closed = True
        self._wakeup.set()

    def remove_if(self, predicate: Callable[[Any], bool]) -> list[Rows]:
        """Take out waiting stream rows whose chunk matches ``predicate`` (e.g. revoked
        partitions); priority rows come from no partition and are never asked about."""
        gone = []
        for key, group in list(self._groups.items()):
            rows = group.merged()
            verdict = {id(c): predicate(c) for c in set(rows.chunks.tolist())}
            mask = np.fromiter((verdict[id(c)] for c in rows.chunks), bool, len(rows))
            if not mask.any():
                continue
            gone.append(rows.take(mask))
            self._replace(key, rows.take(~mask))
        return gone

    def _replace(self, key: Hashable, rows: Rows) -> None:
        if not len(rows):
            del self._groups[key]
            return
        group = self._groups[key]
        group.parts, group.rows, group.tokens = [rows], len(rows), rows.tokens

    def _oldest_group(self) -> tuple[Hashable, _Pending]:
        return min(self._groups.items(), key=lambda kv: kv[1].oldest())

    def _ready(self) -> bool:
        if self._priority:
            return True
        if not self._groups:
            return False
        if self._closed:
            return True
        for g in self._groups.values():
            if g.rows >= self.max_batch_size or g.tokens >= self.max_batch_tokens:
                return True
        if self._clock() >= self._oldest_group()[1].oldest() + self.max_wait_s:
            return True
        return self._upstream_idle is not None and self._upstream_idle()

    async def next_batch(self) -> Rows:
        """Wait for a batch per the rules above and take it out."""
        while True:
            if self._ready():
                return self._take()
            if self._closed:
                raise BatcherClosed("batcher is closed")
            self._wakeup.clear()
            timeout = None
            if self._groups:
                deadline = self._oldest_group()[1].oldest() + self.max_wait_s
                timeout = max(0.0, deadline - self._clock())
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout)
            except TimeoutError:
                pass

    def _take(self) -> Rows:
        if self._priority:
            return self._take_priority()
        key, group = self._oldest_group()
        return self._take_from(self._groups, key, group)

    def _take_priority(self) -> Rows:
        """A batch of the longest-waiting priority group; with ``priority_fill``, filled up with
        the oldest stream rows of the same version (in arrival order, so ``ordered`` holds)."""
        key, group = min(self._priority.items(), key=lambda kv: kv[1].oldest())
        first = self._take_from(self._priority, key, group)
        stream = self._groups.get(key)
        room = self.max_batch_size - len(first)
        if stream is None or room <= 0 or not self.priority_fill:
            return first
        head = stream.head(room)
        k = fill(np.maximum(first.lengths, 1), np.maximum(head.lengths[:room], 1), self)
        if not k:
            return first
        extra = head if k == len(head) else head.take(slice(0, k))
        if k < len(head):
            stream.parts[0] = head.take(slice(k, None))
        else:
            del stream.parts[0]
        stream.rows -= k
        stream.tokens -= extra.tokens
        if not stream.parts:
            del self._groups[key]
        return Rows.concat([first, extra])

    def _take_from(self, groups: dict[Hashable, _Pending], key: Hashable, group: _Pending) -> Rows:
        if self.ordered:
            return self._take_prefix(groups, key, group)
        limit = self.max_batch_size * POOL_BATCHES
        head = group.head(limit)
        pool = head if len(head) <= limit else head.take(slice(0, limit))
        lengths = np.maximum(pool.lengths, 1)
        if (
            len(pool) == group.rows
            and len(pool) <= self.max_batch_size
            and len(pool) * int(lengths.max()) <= self.max_batch_tokens
        ):
            batch = head  # everything waiting fits: no sorting, no copies
            rest = None
        else:
            order = np.argsort(lengths, kind="stable")
            picked = order[window(lengths[order], int(np.flatnonzero(order == 0)[0]), self)]
            batch = pool.take(picked)
            keep = np.ones(len(head), bool)
            keep[picked] = False
            rest = head.take(keep)
        if rest is not None and len(rest):
            group.parts[0] = rest
        else:
            del group.parts[0]
        group.rows -= len(batch)
        group.tokens -= batch.tokens
        if not group.parts:
            del groups[key]
        return batch

    def _take_prefix(
        self, groups: dict[Hashable, _Pending], key: Hashable, group: _Pending
    ) -> Rows:
        """In arrival order: the longest run of the oldest rows that fits (:func:`prefix`).
        Only the batch's rows are copied (every column, object arrays included): the part it
        ends in is split with views, the rows that stay behind are not merged or copied."""
        parts, limit = group.parts, self.max_batch_size
        n, i = 0, 0
        while i < len(parts) and n < limit:
            n += len(parts[i])
            i += 1
        if i == 1:
            lengths = parts[0].lengths
        else:
            lengths = np.concatenate([p.lengths for p in parts[:i]])
        k = prefix(np.maximum(lengths, 1), self)
        taken, left = [], k
        while left:
            part = parts[0]
            if len(part) <= left:
                taken.append(part)
                del parts[0]
                left -= len(part)
            else:
                taken.append(part.take(slice(0, left)))
                parts[0] = part.take(slice(left, None))
                left = 0
        batch = Rows.concat(taken)
        group.rows -= len(batch)
        group.tokens -= batch.tokens
        if not parts:
            del groups[key]
        return batch


def fill(first: np.ndarray, more: np.ndarray, limits: Batcher) -> int:
    """How many of ``more`` (in order) join a batch of rows of lengths ``first`` within
    ``max_batch_size`` and the padded-token budget. Monotone: rows and width only grow."""
    room = min(len(more), limits.max_batch_size - len(first))
    if room <= 0:
        return 0
    widest = np.maximum(np.maximum.accumulate(more[:room]), int(first.max()))
    fits = (len(first) + np.arange(1, room + 1)) * widest <= limits.max_batch_tokens
    return int(fits.sum())


def prefix(lengths: np.ndarray, limits: Batcher) -> int:
    """How many of the oldest rows (in arrival order) make the batch: the longest run whose
    padded size (rows × its longest row) fits the token budget, at most ``max_batch_size`` rows
    (at least one). Vectorized with a running maximum."""
    n = min(len(lengths), limits.max_batch_size)
    if n * int(lengths[:n].max()) <= limits.max_batch_tokens:
        return n  # all of them fit (the usual case): no running maximum needed
    widest = np.maximum.accumulate(lengths[:n])
    fits = np.arange(1, n + 1) * widest <= limits.max_batch_tokens
    return int(np.flatnonzero(fits)[-1]) + 1 if fits[0] else 1


def window(sorted_lengths: np.ndarray, p: int, limits: Batcher) -> slice:
    """The slice of ``sorted_lengths`` (ascending) that makes the batch around position ``p``.

    The largest window containing ``p`` whose padded size (rows × its longest row) fits the
    token budget, at most ``max_batch_size`` rows (at least the one row ``p``); among windows of
    that size the one that adds the least padding. Vectorized: a window of ``k`` rows containing
    ``p`` fits iff the leftmost such window does, ``k × L[max(k-1, p)] ≤ budget``.
    """
    n = len(sorted_lengths)
    budget = limits.max_batch_tokens
    k_max = min(limits.max_batch_size, n)
    ks = np.arange(1, k_max + 1)
    fits = ks * sorted_lengths[np.maximum(ks - 1, p)] <= budget
    k = int(np.flatnonzero(fits)[-1]) + 1 if fits.any() else 1
    lo_min, lo_max = max(0, p - k + 1), min(p, n - k)
    los = np.arange(lo_min, lo_max + 1)
    widths = sorted_lengths[los + k - 1]
    cs = np.concatenate(([0], np.cumsum(sorted_lengths)))
    padding = (k * widths - (cs[los + k] - cs[los])).astype(np.float64)
    padding[k * widths > budget] = np.inf
    lo = int(los[int(np.argmin(padding))]) if k > 1 else p
    return slice(lo, lo + k)
