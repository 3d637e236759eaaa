"""The publish stage: results and dead letters out, each delivery reported back.

Two-stage send (aiokafka's own shape): ``send()`` enqueues and returns a delivery future; the
future's callback reports the broker's acknowledgement, which is what lets an input offset be
committed. Retriable failures (broker unreachable, leader moving, timeouts) are retried with
exponential backoff, forever, logged; a record the broker rejects as too large is handed back
to the caller (``on_rejected``) so it can be dead-lettered; anything else is fatal and fails the
service through ``on_fatal`` rather than being dropped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    RecordTooLargeError,
)
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from streamer.config import KafkaConfig
from streamer.kafka_client import Backoff, backoff_s, producer_kwargs
from streamer.records import Headers

log = logging.getLogger(__name__)

TOO_LARGE = (MessageSizeTooLargeError, RecordTooLargeError)
_PARTITIONER = DefaultPartitioner()  # what AIOKafkaProducer uses unless told otherwise


def _record_size(msg: Outgoing) -> int:
    return DefaultRecordBatchBuilder.estimate_size_in_bytes(msg.key, msg.value, msg.headers)


def _outcome(fut: asyncio.Future) -> BaseException | None:
    """A delivery future's error (cancelled counts as one), or None when acknowledged."""
    if fut.cancelled():
        return asyncio.CancelledError("delivery cancelled (producer stopping)")
    return fut.exception()


def _retriable(exc: BaseException) -> bool:
    return isinstance(exc, KafkaTimeoutError) or bool(getattr(exc, "retriable", False))


@dataclass(slots=True)
class Outgoing:
    topic: str
    key: bytes | None
    value: bytes | None
    headers: Headers
    on_delivered: Callable[[], None]
    on_rejected: Callable[[BaseException], None]
    attempt: int = 0


class Publisher:
    def __init__(self, cfg: KafkaConfig, on_fatal: Callable[[BaseException], None]) -> None:
        self._cfg = cfg
        self._on_fatal = on_fatal
        self._producer: AIOKafkaProducer | None = None
        self._retries: set[asyncio.Task[None]] = set()
        self._unacked = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def start(self) -> None:
        self._producer = AIOKafkaProducer(**producer_kwargs(self._cfg))
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
    def unacked(self) -> int:
        return self._unacked

    async def send(self, msg: Outgoing) -> None:
        """Enqueue one record; its callbacks run when the broker answers."""
        self._unacked += 1
        self._idle.clear()
        await self._enqueue(msg)

    async def _enqueue(self, msg: Outgoing) -> None:
        assert self._producer is not None, "start() first"
        while True:
            try:
                fut = await self._producer.send(
                    msg.topic, value=msg.value, key=msg.key, headers=msg.headers
                )
            except TOO_LARGE as exc:
                self._finish(msg, exc)
                return
            except KafkaError as exc:
                if not _retriable(exc):
                    self._finish(msg, exc)
                    return
                await self._backoff(msg, exc)
                continue
            fut.add_done_callback(lambda f, m=msg: self._delivered(m, f))
            return

    async def send_many(self, msgs: list[Outgoing]) -> None:
        """Enqueue a batch's records as one record batch per partition.

        aiokafka's ``create_batch()``/``send_batch()`` skip the per-record futures and calls of
        ``send()``. Partitions are picked as ``send()`` picks them (the default partitioner:
        murmur2 of the key, as the Java client), so a key lands where ``send()`` would put it;
        keyless records of one call share one random available partition (sticky, as Kafka's
        own producer does). Each record's callbacks run exactly once, when its batch is
        acknowledged, with ``send()``'s retry, too-large and fatal semantics.
        """
        if not msgs:
            return
        self._unacked += len(msgs)
        self._idle.clear()
        await self._enqueue_many(msgs)

    async def _enqueue_many(self, msgs: list[Outgoing]) -> None:
        assert self._producer is not None, "start() first"
        producer = self._producer
        groups: dict[tuple[str, int], list[Outgoing]] = {}
        for topic in dict.fromkeys(m.topic for m in msgs):
            mine = [m for m in msgs if m.topic == topic]
            failed = await self._wait_metadata(topic, mine)
            if failed is not None:
                for m in mine:
                    self._finish(m, failed)
                continue
            cluster = producer.client.cluster
            every = list(cluster.partitions_for_topic(topic))  # as send() passes them
            available = list(cluster.available_partitions_for_topic(topic))
            keyless = _PARTITIONER(None, every, available)
            for m in mine:
                p = keyless if m.key is None else _PARTITIONER(m.key, every, available)
                groups.setdefault((topic, p), []).append(m)
        limit = self._cfg.max_request_size
        for (topic, partition), group in groups.items():
            builder, members = producer.create_batch(), []
            for m in group:
                if _record_size(m) > limit:  # send() hands it back as too large, as before
                    await self._enqueue(m)
                    continue
                meta = builder.append(key=m.key, value=m.value, timestamp=None, headers=m.headers)
                if meta is None:  # full (an empty builder takes any record): the next one
                    await self._submit(builder, topic, partition, members)
                    builder, members = producer.create_batch(), []
                    builder.append(key=m.key, value=m.value, timestamp=None, headers=m.headers)
                members.append(m)
            if members:
                await self._submit(builder, topic, partition, members)

    async def _wait_metadata(self, topic: str, msgs: list[Outgoing]) -> BaseException | None:
        """Wait for the topic's partitions, backing off while Kafka is unreachable."""
        assert self._producer is not None, "start() first"
        while True:
            try:
                await self._producer.partitions_for(topic)
                return None
            except KafkaError as exc:
                if not _retriable(exc):
                    return exc
                await self._backoff_many(msgs, exc)

    async def _submit(
        self, builder: Any, topic: str, partition: int, members: list[Outgoing]
    ) -> None:
        assert self._producer is not None, "start() first"
        # A closed batch goes out at the sender's next turn: it is complete, and lingering would
        # hold back the next call's batch for this partition (send_batch waits for the drain).
        builder.close()
        while True:
            try:
                fut = await self._producer.send_batch(builder, topic, partition=partition)
            except KafkaError as exc:  # not queued (queue full, producer closed): the lot
                if not _retriable(exc):
                    for m in members:
                        self._finish(m, exc)
                    return
                await self._backoff_many(members, exc)
                continue
            fut.add_done_callback(lambda f, ms=members: self._batch_delivered(ms, f))
            return

    def _batch_delivered(self, msgs: list[Outgoing], fut: asyncio.Future) -> None:
        exc = _outcome(fut)
        if exc is not None and _retriable(exc):
            self._watch(self._retry_many(msgs, exc))
        elif isinstance(exc, TOO_LARGE) and len(msgs) > 1:
            # The batch as a whole is over a limit: one by one, only the records that are too
            # large themselves are handed back.
            self._watch(self._enqueue_each(msgs))
        else:
            for m in msgs:
                self._finish(m, exc)

    async def _retry_many(self, msgs: list[Outgoing], exc: BaseException) -> None:
        await self._backoff_many(msgs, exc)
        await self._enqueue_many(msgs)

    async def _enqueue_each(self, msgs: list[Outgoing]) -> None:
        for m in msgs:
            await self._enqueue(m)

    async def _backoff_many(self, msgs: list[Outgoing], exc: BaseException) -> None:
        """One backoff (and one log line) for a group of records that failed together."""
        await self._backoff(msgs[0], exc)
        for m in msgs[1:]:
            m.attempt = msgs[0].attempt

    def _watch(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a retry as an owned task whose failure reaches ``on_fatal``."""
        task = asyncio.get_running_loop().create_task(coro)
        self._retries.add(task)
        task.add_done_callback(self._retry_done)

    def _delivered(self, msg: Outgoing, fut: asyncio.Future) -> None:
        exc = _outcome(fut)
        if exc is not None and _retriable(exc):
            self._watch(self._retry(msg, exc))
            return
        self._finish(msg, exc)

    async def _retry(self, msg: Outgoing, exc: BaseException) -> None:
        await self._backoff(msg, exc)
        await self._enqueue(msg)

    def _retry_done(self, task: asyncio.Task[None]) -> None:
        self._retries.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._on_fatal(task.exception())  # type: ignore[arg-type]

    async def _backoff(self, msg: Outgoing, exc: BaseException) -> None:
        msg.attempt += 1
        delay = backoff_s(self._cfg, msg.attempt)
        log.warning(
            "publish to %s failed (%s: %s); attempt %d, retrying in %.1fs — offsets stay "
            "uncommitted until it succeeds",
            msg.topic,
            type(exc).__name__,
            exc,
            msg.attempt,
            delay,
        )
        await asyncio.sleep(delay)

    def _finish(self, msg: Outgoing, exc: BaseException | None) -> None:
        try:
            if exc is None:
                msg.on_delivered()
            elif isinstance(exc, TOO_LARGE):
                msg.on_rejected(exc)
            else:
                log.error(
                    "publish to %s failed for good: %s: %s", msg.topic, type(exc).__name__, exc
                )
                self._on_fatal(exc)
        except Exception as cb_exc:  # a failing callback must not vanish
            self._on_fatal(cb_exc)
        finally:  # after the callbacks, which may send more (a DLQ copy)
            self._unacked -= 1
            if self._unacked == 0:
                self._idle.set()

    def send_soon(self, msg: Outgoing) -> None:
        """Send from synchronous code (a delivery callback); the task is owned and watched."""
        self._unacked += 1
        self._idle.clear()
        self._watch(self._enqueue(msg))

    async def send_raw(self, topic: str, value: bytes) -> None:
        """Produce one record and wait for its ack (span export); no offset depends on it."""
        assert self._producer is not None, "start() first"
        await self._producer.send_and_wait(topic, value=value)

    async def flush(self) -> None:
        """Wait until every record sent so far is acknowledged (or handed back)."""
        if self._producer is not None:
            await self._producer.flush()
        await self._idle.wait()

    async def stop(self) -> None:
        for task in list(self._retries):
            task.cancel()
        if self._producer is not None:
            await self._producer.stop()
