"""The publish stage: results and dead letters out, one record batch per partition at a time.

An :class:`OutBatch` is built off the event loop (records appended to aiokafka's batch builder on
a stage thread) and handed over whole: the loop does ``send_batch`` (enqueue) and gets one
delivery future per batch (aiokafka's two-stage send), whose callback reports the broker's
acknowledgement for every record in it — what lets their input offsets be committed.

Retriable failures (broker unreachable, leader moving, timeouts) are retried with exponential
backoff, forever, logged, and the offsets stay uncommitted meanwhile. A batch the broker rejects
as too large is split into single records; a record too large on its own is handed back
(``on_rejected``) so it can be dead-lettered. Anything else is fatal and fails the service
through ``on_fatal`` rather than being dropped.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    RecordTooLargeError,
)
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from streamer.config import KafkaConfig
from streamer.kafka.client import Backoff, backoff_s, producer_kwargs
from streamer.kafka.murmur2 import murmur2_many
from streamer.kafka.produce import install as flat_produce
from streamer.stream.records import Chunk, Headers, RecordError

log = logging.getLogger(__name__)

TOO_LARGE = (MessageSizeTooLargeError, RecordTooLargeError)
_PARTITIONER = DefaultPartitioner()  # what AIOKafkaProducer uses unless told otherwise


def record_size(key: bytes | None, value: bytes | None, headers: Headers) -> int:
    return DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers)


def _outcome(fut: asyncio.Future) -> BaseException | None:
    """A delivery future's error (cancelled counts as one), or None when acknowledged."""
    if fut.cancelled():
        return asyncio.CancelledError("delivery cancelled (producer stopping)")
    return fut.exception()


class DeliveryTimedOut(KafkaError):
    """Retriable errors went on past ``kafka.delivery_timeout_ms``: fatal, loudly."""

    retriable = False


def _retriable(exc: BaseException) -> bool:
    return isinstance(exc, KafkaTimeoutError) or bool(getattr(exc, "retriable", False))


class SendEvents(Protocol):
    """What the publisher reports for metrics (the service's telemetry)."""

    def send_retried(self, topic: str) -> None: ...

    def send_failed(self, topic: str, kind: str, records: int) -> None: ...


@dataclass(frozen=True, slots=True)
class Partitions:
    """A topic's partitions as the producer's metadata has them, for picking them off the loop.

    ``for_key`` picks as ``send()`` would (the default partitioner: murmur2 of the key, as the
    Java client); keyless records of one call share one random available partition (sticky, as
    Kafka's own producer does) until its record batch is full, then move on to the next."""

    topic: str
    every: list[int]
    available: list[int]

    def sticky(self) -> int:
        return _PARTITIONER(None, self.every, self.available)

    def after(self, partition: int) -> int:
        """The next available partition after ``partition`` (cyclic)."""
        available = self.available
        return next((p for p in available if p > partition), available[0])

    def for_key(self, key: bytes | None, keyless: int) -> int:
        return keyless if key is None else _PARTITIONER(key, self.every, self.available)

    def for_keys(self, keys: list[bytes]) -> list[int]:
        """``for_key`` of each key (none None), hashed together (see :mod:`.murmur2`)."""
        every = np.asarray(self.every)
        return every[(murmur2_many(keys) & 0x7FFFFFFF) % len(every)].tolist()


@dataclass(slots=True, eq=False)
class OutBatch:
    """Records for one topic-partition, built on a stage thread, sent as one record batch.

    Per record: ``keys``/``values``/``headers`` (kept so the rare resend paths can rebuild it),
    and where it came from (``chunks[i]``, ``rows[i]``: its input record), ``errors[i]`` for a
    dead letter. Per batch, precomputed for the acknowledgement: ``counts`` (outputs per input
    chunk), ``labels`` (outputs per (input topic, model or DLQ reason)), the fetch times and the
    input timestamps of its records (latency metrics without a Python call per record).
    """

    topic: str
    partition: int
    dead_letters: bool  # True: records for the DLQ (``errors`` set)
    keys: list[bytes | None]
    values: list[bytes | None]
    headers: list[Headers]
    chunks: list[Chunk]
    rows: list[int]
    errors: list[RecordError] | None = None
    model: str = ""  # the model that made the results (results only)
    version: str = ""  # ... and its version (set by the pipeline, for the metrics' labels)
    builder: Any = None  # a closed aiokafka BatchBuilder, or None: build on send
    counts: dict[Chunk, int] = field(default_factory=dict)
    labels: dict[tuple[str, str], int] = field(default_factory=dict)
    fetched_at: np.ndarray | None = None
    timestamps_ms: np.ndarray | None = None
    spans: list[Any] = field(default_factory=list)  # ended when acknowledged
    acked_at: float = 0.0  # monotonic time of the broker's acknowledgement
    attempt: int = 0
    failing_since: float | None = None  # monotonic time of the first retriable failure

    def __len__(self) -> int:
        return len(self.values)

    def finish(
        self, builder_factory: Callable[[], Any] | None = None, prebuild: bool = False
    ) -> OutBatch:
        """Precompute the per-batch accounting (on the stage thread) and build the batch."""
        counts: dict[Chunk, int] = {}
        for c in self.chunks:
            counts[c] = counts.get(c, 0) + 1
        self.counts = counts
        labels: dict[tuple[str, str], int] = {}
        if self.errors is not None:
            for c, err in zip(self.chunks, self.errors, strict=True):
                key = (c.tp.topic, err.error_class)
                labels[key] = labels.get(key, 0) + 1
        else:
            for c, n in counts.items():
                key = (c.tp.topic, self.model)
                labels[key] = labels.get(key, 0) + n
        self.labels = labels
        self.fetched_at = np.fromiter((c.fetched_at for c in self.chunks), np.float64, len(self))
        self.timestamps_ms = np.fromiter(
            (c.messages[i].timestamp for c, i in zip(self.chunks, self.rows, strict=True)),
            np.float64,
            len(self),
        )
        if builder_factory is not None:
            self.builder = self.build(builder_factory, prebuild)
        return self

    def build(self, builder_factory: Callable[[], Any], prebuild: bool = False) -> Any:
        """A closed BatchBuilder holding every record, or None if they do not fit one.

        ``prebuild`` also serialises it (CRC, compression) here, off the loop: aiokafka's
        sender would otherwise do that on the event loop when it sends the batch
        (``BatchBuilder._build`` caches the buffer). Not with idempotence, where the sender
        writes the producer id into the batch first."""
        builder = builder_factory()
        for k, v, h in zip(self.keys, self.values, self.headers, strict=True):
            if builder.append(key=k, value=v, timestamp=None, headers=h) is None:
                return None  # over the builder's size: the loop sends it in pieces
        builder.close()
        if prebuild:
            builder._build()
        return builder

    def result_labels(self) -> dict[tuple[str, str, str], int]:
        """Results per (input topic, model, version): the published counter's labels."""
        return {(topic, model, self.version): n for (topic, model), n in self.labels.items()}

    def split(self) -> list[OutBatch]:
        """One batch per record (to find the one a broker refuses as too large)."""
        return [self.select([i]) for i in range(len(self))]

    def select(self, idx: list[int]) -> OutBatch:
        return OutBatch(
            self.topic,
            self.partition,
            self.dead_letters,
            [self.keys[i] for i in idx],
            [self.values[i] for i in idx],
            [self.headers[i] for i in idx],
            [self.chunks[i] for i in idx],
            [self.rows[i] for i in idx],
            None if self.errors is None else [self.errors[i] for i in idx],
            self.model,
            version=self.version,
            attempt=self.attempt,
            failing_since=self.failing_since,
        ).finish()


class Publisher:
    def __init__(
        self,
        cfg: KafkaConfig,
        *,
        on_acked: Callable[[OutBatch], None],
        on_rejected: Callable[[OutBatch, BaseException], None],
        on_fatal: Callable[[BaseException], None],
        events: SendEvents | None = None,
    ) -> None:
        self._cfg = cfg
        self._on_acked = on_acked
        self._on_rejected = on_rejected
        self._on_fatal = on_fatal
        self._events = events
        self._producer: AIOKafkaProducer | None = None
        self._retries: set[asyncio.Task[None]] = set()
        self._unacked = 0  # records sent and not yet acknowledged or handed back
        self._metadata_updates = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def start(self) -> None:
        self._producer = AIOKafkaProducer(**producer_kwargs(self._cfg))
        flat_produce(self._producer)  # one copy of the results' bytes per request, not six
        self._producer.client.cluster.add_listener(self._metadata_updated)
        backoff = Backoff(self._cfg)
        while True:
            try:
                await self._producer.start()
                return
            except KafkaError as exc:
                if not _retriable(exc):
                    raise
                await backoff.wait("producer", exc)

    @property
    def producer(self) -> AIOKafkaProducer:
        assert self._producer is not None, "start() first"
        return self._producer

    @property
    def unacked(self) -> int:
        return self._unacked

    @property
    def metadata_updates(self) -> int:
        """Metadata updates the producer received: what :meth:`partitions` returns for a topic
        changes only when this does."""
        return self._metadata_updates

    def _metadata_updated(self, _cluster: Any) -> None:
        self._metadata_updates += 1

    def builder_factory(self) -> Callable[[], BatchBuilder]:
        """Makes empty record batches of up to ``max_request_size`` bytes with the producer's
        compression; callable from a stage thread. (``create_batch()`` would cap them at
        ``batch_size``, made for ``send()``'s lingering batches, not for whole batches.)"""
        capacity = self._cfg.max_request_size
        # aiokafka keeps the compression codec only on its accumulator
        compression = getattr(self.producer._message_accumulator, "_compression_type", 0)
        return functools.partial(BatchBuilder, capacity, compression, is_transactional=False)

    @property
    def prebuild(self) -> bool:
        """Whether stage threads may serialise record batches (see :meth:`OutBatch.build`)."""
        return not self._cfg.enable_idempotence

    async def partitions(self, topic: str) -> Partitions:
        """The topic's partitions, waiting for metadata (backing off while Kafka is away)."""
        producer = self.producer
        cluster = producer.client.cluster
        every = cluster.partitions_for_topic(topic)
        attempt = 0
        since = time.monotonic()
        while not every:
            try:
                await producer.partitions_for(topic)
            except KafkaError as exc:
                if not _retriable(exc):
                    raise
                attempt += 1
                if (late := self._timed_out(topic, since, attempt, exc)) is not None:
                    raise late from exc
                await self._sleep(topic, exc, attempt)
            every = cluster.partitions_for_topic(topic)
        available = cluster.available_partitions_for_topic(topic) or every
        return Partitions(topic, sorted(every), sorted(available))

    # -- sending --------------------------------------------------------------------------------
    async def send(self, out: OutBatch) -> None:
        """Enqueue one batch; ``on_acked``/``on_rejected`` run when the broker answers."""
        self._unacked += len(out)
        self._idle.clear()
        await self._submit(out)

    def send_soon(self, out: OutBatch) -> None:
        """Send from synchronous code (a delivery callback); the task is owned and watched."""
        self._unacked += len(out)
        self._idle.clear()
        self._watch(self._submit(out))

    async def _submit(self, out: OutBatch) -> None:
        producer = self.producer
        if len(out) == 1:
            # aiokafka's batch builder takes a first record of any size and send_batch() does
            # not check it (send() would): refuse it here, as send() does, to hand it back.
            size = record_size(out.keys[0], out.values[0], out.headers[0])
            if size > self._cfg.max_request_size:
                self._reject(
                    out,
                    MessageSizeTooLargeError(
                        f"record of {size} bytes is over kafka.max_request_size="
                        f"{self._cfg.max_request_size}"
                    ),
                )
                return
        builder, out.builder = out.builder, None
        if builder is None:
            builder = out.build(self.builder_factory())
            if builder is None:  # larger than one record batch: halves until they fit
                if len(out) == 1:
                    self._reject(out, RecordTooLargeError("record larger than kafka.batch_size"))
                    return
                half = len(out) // 2
                first, second = (
                    out.select(list(range(half))),
                    out.select(list(range(half, len(out)))),
                )
                first.spans, second.spans = out.spans, []
                await self._submit(first)
                await self._submit(second)
                return
        while True:
            try:
                fut = await producer.send_batch(builder, out.topic, partition=out.partition)
            except TOO_LARGE as exc:
                self._rejected(out, exc)
                return
            except KafkaError as exc:  # not queued (queue full, producer closed): the lot
                if not _retriable(exc):
                    self._fatal(out, exc)
                    return
                out.attempt += 1
                out.failing_since = out.failing_since or time.monotonic()
                late = self._timed_out(out.topic, out.failing_since, out.attempt, exc)
                if late is not None:
                    self._fatal(out, late)
                    return
                await self._sleep(out.topic, exc, out.attempt)
                builder = out.build(self.builder_factory())
                continue
            fut.add_done_callback(lambda f, o=out: self._delivered(o, f))
            return

    def _delivered(self, out: OutBatch, fut: asyncio.Future) -> None:
        exc = _outcome(fut)
        if exc is None:
            self._done(out, self._on_acked)
        elif _retriable(exc):
            self._watch(self._retry(out, exc))
        elif isinstance(exc, TOO_LARGE):
            self._rejected(out, exc)
        else:
            self._fatal(out, exc)

    def _rejected(self, out: OutBatch, exc: BaseException) -> None:
        if len(out) > 1:
            # The batch as a whole is over a limit: one by one, only the records that are too
            # large themselves are handed back.
            log.warning(
                "%s[%d] refused a batch of %d as too large (%s); sending one by one",
                out.topic,
                out.partition,
                len(out),
                type(exc).__name__,
            )
            self._unacked -= len(out)
            for i, single in enumerate(out.split()):
                if i == 0:
                    single.spans = out.spans
                self.send_soon(single)
            return
        self._reject(out, exc)

    def _reject(self, out: OutBatch, exc: BaseException) -> None:
        if self._events is not None:
            self._events.send_failed(out.topic, "rejected", len(out))
        self._done(out, lambda o: self._on_rejected(o, exc))

    async def _retry(self, out: OutBatch, exc: BaseException) -> None:
        out.attempt += 1
        out.failing_since = out.failing_since or time.monotonic()
        late = self._timed_out(out.topic, out.failing_since, out.attempt, exc)
        if late is not None:
            self._fatal(out, late)
            return
        await self._sleep(out.topic, exc, out.attempt)
        await self._submit(out)

    def _fatal(self, out: OutBatch, exc: BaseException) -> None:
        log.error("publish to %s failed for good: %s: %s", out.topic, type(exc).__name__, exc)
        if self._events is not None:
            self._events.send_failed(out.topic, "fatal", len(out))
        self._done(out, lambda _o: self._on_fatal(exc))

    def _done(self, out: OutBatch, fn: Callable[[OutBatch], None]) -> None:
        try:
            fn(out)
        except Exception as cb_exc:  # a failing callback must not vanish
            self._on_fatal(cb_exc)
        finally:  # after the callbacks, which may send more (a DLQ copy)
            self._unacked -= len(out)
            if self._unacked <= 0:
                self._idle.set()

    def _watch(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a retry as an owned task whose failure reaches ``on_fatal``."""
        task = asyncio.get_running_loop().create_task(coro)
        self._retries.add(task)
        task.add_done_callback(self._retry_done)

    def _retry_done(self, task: asyncio.Task[None]) -> None:
        self._retries.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._on_fatal(task.exception())  # type: ignore[arg-type]

    def _timed_out(
        self, topic: str, since: float, attempt: int, exc: BaseException
    ) -> DeliveryTimedOut | None:
        """The error to stop with once retrying has gone on past the delivery timeout."""
        elapsed = time.monotonic() - since
        if elapsed * 1000 < self._cfg.delivery_timeout_ms:
            return None
        return DeliveryTimedOut(
            f"publishing to {topic} kept failing for {elapsed:.0f}s over {attempt} attempts "
            f"(last: {type(exc).__name__}: {exc}); gave up after kafka.delivery_timeout_ms="
            f"{self._cfg.delivery_timeout_ms}: check that the topic exists (or the broker "
            "creates topics) and has a leader; offsets past it were not committed"
        )

    async def _sleep(self, topic: str, exc: BaseException, attempt: int) -> None:
        delay = backoff_s(self._cfg, attempt) * random.uniform(0.8, 1.0)
        log.warning(
            "publish to %s failed (%s: %s); attempt %d, retrying in %.1fs — offsets stay "
            "uncommitted until it succeeds",
            topic,
            type(exc).__name__,
            exc,
            attempt,
            delay,
        )
        if self._events is not None:
            self._events.send_retried(topic)
        await asyncio.sleep(delay)

    async def send_raw(self, topic: str, value: bytes) -> None:
        """Produce one record and wait for its ack (span export); no offset depends on it."""
        await self.producer.send_and_wait(topic, value=value)

    async def flush(self) -> None:
        """Wait until every batch sent so far is acknowledged (or handed back)."""
        if self._producer is not None:
            await self._producer.flush()
        await self._idle.wait()

    async def stop(self, timeout_s: float | None = None) -> None:
        """Stop the producer; with ``timeout_s``, give up on a broker that does not answer
        (what was not acknowledged is not committed, so it is published again after a
        restart)."""
        for task in list(self._retries):
            task.cancel()
        if self._producer is not None:
            try:
                await asyncio.wait_for(self._producer.stop(), timeout_s)
            except TimeoutError:
                log.warning("the producer did not stop within %.0fs; going on", timeout_s)
