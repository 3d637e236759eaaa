"""Gathering a stage call's outgoing records into one :class:`OutBatch` per topic-partition.

Used on the prepare thread (dead letters of undecodable records), on the encode thread (results,
and dead letters of records the model failed on) and, rarely, on the loop (a record the broker
refused). Records are partitioned here, off the loop, as the producer would partition them.
"""

from __future__ import annotations

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

    def _group(self, parts: Partitions, key: bytes | None, dead: bool, size: int) -> OutBatch:
        keyless = self._keyless.get(parts.topic)
        if keyless is None:
            keyless = self._keyless[parts.topic] = parts.sticky()
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
            out = OutBatch(
                parts.topic,
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
            self._groups[where] = out
        return out

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
        size += sum((len(v) if v else 0) + 8 for _, v in headers)
        out = self._group(self._dest.results, key, False, size)
        out.keys.append(key)
        out.values.append(value)
        out.headers.append(headers)
        out.chunks.append(chunk)
        out.rows.append(i)

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
