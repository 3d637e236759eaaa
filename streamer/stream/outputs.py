"""Gathering a stage call's outgoing records into one :class:`OutBatch` per topic-partition.

Used on the prepare thread (dead letters of undecodable records), on the encode thread (results,
and dead letters of records the model failed on) and, rarely, on the loop (a record the broker
refused). Records are partitioned here, off the loop, as the producer would partition them.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from streamer.kafka.publisher import OutBatch, Partitions, record_size
from streamer.stream.codec import dlq_headers
from streamer.stream.records import Chunk, Headers, RecordError, ResultTooLarge

# A record this much under the request limit cannot be over it: skip the exact estimate.
_SIZE_MARGIN = 64 * 1024


@dataclass(frozen=True, slots=True)
class Destinations:
    """Where outputs go, as the producer's metadata had it when the stage call began."""

    results: Partitions | None
    dlq: Partitions
    max_request_size: int
    builder_factory: Callable[[], Any] | None = None  # None: the loop builds on send
    prebuild: bool = False  # serialise the record batch here too (not with idempotence)


class Outputs:
    """One stage call's outgoing records, grouped by (topic, partition)."""

    def __init__(self, dest: Destinations, model: str = "") -> None:
        self._dest = dest
        self._model = model
        self._groups: dict[tuple[str, int], OutBatch] = {}
        self._sizes: dict[tuple[str, int], int] = {}
        self._full: list[OutBatch] = []  # batches closed because the next record would not fit
        self._keyless: dict[str, int] = {}
        self._keyed: dict[bytes, int] = {}  # result keys' partitions, hashed together
        self.spans: list[Any] = []  # ended once every batch of this call is acknowledged

    def _sticky(self, parts: Partitions) -> int:
        """Where this call's keyless records for ``parts.topic`` go (picked on first use)."""
        keyless = self._keyless.get(parts.topic)
        if keyless is None:
            keyless = self._keyless[parts.topic] = parts.sticky()
        return keyless

    def _group(self, parts: Partitions, key: bytes | None, dead: bool, size: int) -> OutBatch:
        keyless = self._sticky(parts)
        if key is None:
            partition = keyless
        elif (known := self._keyed.get(key)) is not None and parts is self._dest.results:
            partition = known
        else:
            partition = parts.for_key(key, keyless)
        where = (parts.topic, partition)
        out = self._groups.get(where)
        if key is None and out is not None and len(parts.available) > 1 and self._over(where, size):
            # Keyless records move on to the next partition when their batch is full, as
            # Kafka's sticky partitioner does (KIP-480): a produce request carries one record
            # batch per partition, so the two batches go out in one request, not two.
            partition = self._keyless[parts.topic] = parts.after(partition)
            where = (parts.topic, partition)
            out = self._groups.get(where)
        if out is not None and self._over(where, size):
            self._full.append(out)
            out = None
        self._sizes[where] = (self._sizes.get(where, 0) if out is not None else 0) + size
        if out is None:
            out = self._groups[where] = self._new(parts.topic, partition, dead)
        return out

    def _new(self, topic: str, partition: int, dead: bool) -> OutBatch:
        return OutBatch(
            topic,
            partition,
            dead,
            [],
            [],
            [],
            [],
            [],
            [] if dead else None,
            "" if dead else self._model,
        )

    def _over(self, where: tuple[str, int], size: int) -> bool:
        """Whether ``size`` more bytes would take the batch at ``where`` past what one record
        batch carries: max_request_size, less a margin for the overhead."""
        return self._sizes[where] + size > self._dest.max_request_size * 0.9

    def _too_large(self, key: bytes | None, value: bytes | None, headers: Headers) -> bool:
        limit = self._dest.max_request_size
        if value is not None and len(value) + _SIZE_MARGIN < limit:
            return False
        return record_size(key, value, headers) > limit

    def expect(self, keys: list[bytes | None]) -> None:
        """The keys of results about to come: their partitions are hashed in one go (numpy),
        not one pure-Python murmur2 per record (~3.7 µs each)."""
        parts = self._dest.results
        keyed = [k for k in keys if k is not None]
        if parts is not None and keyed:
            self._keyed.update(zip(keyed, parts.for_keys(keyed), strict=True))

    def result(self, chunk: Chunk, i: int, value: bytes | None, headers: Headers) -> None:
        """A result (``value`` None: a tombstone, the input's delete passed on)."""
        key = chunk.messages[i].key
        if value is not None and self._too_large(key, value, headers):
            self.dead_letter(
                chunk,
                i,
                ResultTooLarge(
                    f"result of {len(value)} bytes is over kafka.max_request_size="
                    f"{self._dest.max_request_size}; raise it (and the output topic's "
                    "max.message.bytes)"
                ),
            )
            return
        assert self._dest.results is not None
        size = (len(value) if value else 0) + (len(key) if key else 0) + 64
        size += _headers_size(headers)
        out = self._group(self._dest.results, key, False, size)
        out.keys.append(key)
        out.values.append(value)
        out.headers.append(headers)
        out.chunks.append(chunk)
        out.rows.append(i)

    def results(
        self,
        chunks: list[Chunk],
        rows: list[int],
        keys: list[bytes | None],
        values: list[bytes],
        headers: list[Headers],
    ) -> None:
        """Many results (no tombstones), in order: the batches :meth:`result` would make, one
        call each, with the per-record work done per partition and per batch instead (the
        encode thread runs this for every record). Keys and no keys mixed in one call, or a
        result near the request limit, go through :meth:`result` one by one."""
        n = len(values)
        parts = self._dest.results
        if n == 0:
            return
        assert parts is not None
        self._sticky(parts)  # picked now, keyed or not, as _group does
        lengths = list(map(len, values))
        nokey = keys.count(None)
        if max(lengths) + _SIZE_MARGIN >= self._dest.max_request_size or 0 < nokey < n:
            for j in range(n):
                self.result(chunks[j], rows[j], values[j], headers[j])
            return
        sizes = [
            vl + (len(k) if k is not None else 0) + 64 + (_headers_size(h) if h else 0)
            for vl, k, h in zip(lengths, keys, headers, strict=True)
        ]
        columns = (keys, values, headers, chunks, rows)  # an OutBatch's, in _columns order
        if nokey:
            self._place(parts, None, sizes, columns)
            return
        known = self._keyed
        partitions = [known.get(k) for k in keys]  # type: ignore[arg-type]
        by: dict[int, list[int]] = {}
        for j, p in enumerate(partitions):
            if p is None:
                p = partitions[j] = parts.for_key(keys[j], 0)
            if (idx := by.get(p)) is None:
                by[p] = [j]
            else:
                idx.append(j)
        if len(by) == 1:
            self._place(parts, partitions[0], sizes, columns)
            return
        for p, idx in by.items():
            picked = tuple([column[j] for j in idx] for column in columns)
            self._place(parts, p, [sizes[j] for j in idx], picked)

    def _place(
        self, parts: Partitions, partition: int | None, sizes: list[int], columns: tuple[list, ...]
    ) -> None:
        """Records (``columns``: keys, values, headers, chunks, rows) for one partition
        (``None``: keyless, the sticky one), in order, as
        :meth:`_group` would place them one by one: each batch takes records while they fit
        under the cap; the record that does not fit closes it and starts the next, and keyless
        records first move on to the next partition, once per record (KIP-480)."""
        cap = self._dest.max_request_size * 0.9
        keyless = partition is None
        topic = parts.topic
        p = self._sticky(parts) if partition is None else partition
        cum = list(itertools.accumulate(sizes))
        n, pos, moved = len(sizes), 0, -1
        while pos < n:
            where = (topic, p)
            out = self._groups.get(where)
            base = cum[pos - 1] if pos else 0
            if out is not None:
                held = self._sizes[where]
                end = bisect.bisect_right(cum, cap - held + base, pos)
                if end == pos:  # record pos does not fit this batch
                    if keyless and moved != pos and len(parts.available) > 1:
                        p = self._keyless[topic] = parts.after(p)
                        moved = pos
                        continue
                    self._full.append(out)
                    out = None
            if out is None:  # a new batch takes its first record whatever its size
                out = self._groups[where] = self._new(topic, p, False)
                held = 0
                end = bisect.bisect_right(cum, cap + base, pos + 1)
            self._sizes[where] = held + cum[end - 1] - base
            whole = pos == 0 and end == n
            for into, column in zip(_columns(out), columns, strict=True):
                into.extend(column if whole else column[pos:end])
            pos = end

    def dead_letter(
        self,
        chunk: Chunk,
        i: int,
        err: RecordError,
        drop_value: bool = False,
        strip: bool = False,
    ) -> None:
        """The input record unchanged, plus the reason in headers. Without its value when even
        the DLQ would refuse it; then, if the key and headers alone are still too large (or
        ``strip``), without them too: the reason and the source still arrive, and the stream
        goes on."""
        m = chunk.messages[i]
        headers = dlq_headers(m, chunk.tp, err)
        value, key = m.value, m.key
        if drop_value or strip or self._too_large(key, value, headers):
            value = None
            headers.append(("streamer.error.value_dropped", b"true"))
            if strip or self._too_large(key, None, headers):
                key = None
                headers = [h for h in headers if h[0].startswith("streamer.")]
                headers.append(("streamer.error.key_and_headers_dropped", b"true"))
        size = (len(value) if value else 0) + (len(key) if key else 0) + 64
        size += sum(len(k) + (len(v) if v else 0) + 8 for k, v in headers)
        out = self._group(self._dest.dlq, key, True, size)
        out.keys.append(key)
        out.values.append(value)
        out.headers.append(headers)
        out.chunks.append(chunk)
        out.rows.append(i)
        assert out.errors is not None
        out.errors.append(err)

    def batches(self) -> list[OutBatch]:
        """The batches, accounting precomputed and (with a builder factory) built."""
        dest = self._dest
        outs = [o.finish(dest.builder_factory, dest.prebuild) for o in self._full]
        outs += [o.finish(dest.builder_factory, dest.prebuild) for o in self._groups.values()]
        if self.spans and outs:
            countdown = Countdown(len(outs), self.spans)
            for o in outs:
                o.spans.append(countdown)
        return outs


def _columns(out: OutBatch) -> tuple[list, ...]:
    return out.keys, out.values, out.headers, out.chunks, out.rows


def _headers_size(headers: Headers) -> int:
    return sum((len(v) if v else 0) + 8 for _, v in headers)


class Countdown:
    """Ends spans once all ``n`` batches of a stage call were acknowledged (``end()`` each)."""

    __slots__ = ("left", "spans")

    def __init__(self, n: int, spans: list[Any]) -> None:
        self.left, self.spans = n, spans

    def end(self) -> None:
        self.left -= 1
        if self.left == 0:
            for span in self.spans:
                span.end()
