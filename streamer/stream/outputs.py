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


class Outputs:
    """One stage call's outgoing records, grouped by (topic, partition)."""

    def __init__(self, dest: Destinations, model: str = "") -> None:
        self._dest = dest
        self._model = model
        self._groups: dict[tuple[str, int], OutBatch] = {}
        self._keyless: dict[str, int] = {}
        self.spans: list[Any] = []  # ended once every batch of this call is acknowledged

    def _group(self, parts: Partitions, key: bytes | None, dead: bool) -> OutBatch:
        keyless = self._keyless.get(parts.topic)
        if keyless is None:
            keyless = self._keyless[parts.topic] = parts.sticky()
        partition = parts.for_key(key, keyless)
        out = self._groups.get((parts.topic, partition))
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
            self._groups[(parts.topic, partition)] = out
        return out

    def _too_large(self, key: bytes | None, value: bytes | None, headers: Headers) -> bool:
        limit = self._dest.max_request_size
        if value is not None and len(value) + _SIZE_MARGIN < limit:
            return False
        return record_size(key, value, headers) > limit

    def result(self, chunk: Chunk, i: int, value: bytes, headers: Headers) -> None:
        key = chunk.messages[i].key
        if self._too_large(key, value, headers):
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
        out = self._group(self._dest.results, key, dead=False)
        out.keys.append(key)
        out.values.append(value)
        out.headers.append(headers)
        out.chunks.append(chunk)
        out.rows.append(i)

    def dead_letter(self, chunk: Chunk, i: int, err: RecordError, drop_value: bool = False) -> None:
        """The input record unchanged, plus the reason in headers (without its value when even
        the DLQ would refuse it: the reason still arrives, and the stream goes on)."""
        m = chunk.messages[i]
        headers = dlq_headers(m, chunk.tp, err)
        value = m.value
        if drop_value or self._too_large(m.key, value, headers):
            value = None
            headers.append(("streamer.error.value_dropped", b"true"))
        out = self._group(self._dest.dlq, m.key, dead=True)
        out.keys.append(m.key)
        out.values.append(value)
        out.headers.append(headers)
        out.chunks.append(chunk)
        out.rows.append(i)
        assert out.errors is not None
        out.errors.append(err)

    def batches(self) -> list[OutBatch]:
        """The batches, accounting precomputed and (with a builder factory) built."""
        outs = [o.finish(self._dest.builder_factory) for o in self._groups.values()]
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
