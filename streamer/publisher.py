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
from collections.abc import Callable
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    RecordTooLargeError,
)

from streamer.config import KafkaConfig
from streamer.kafka_client import producer_kwargs
from streamer.records import Headers

log = logging.getLogger(__name__)

TOO_LARGE = (MessageSizeTooLargeError, RecordTooLargeError)


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
        backoff = self._cfg.retry_backoff_ms / 1000
        while True:
            try:
                await self._producer.start()
                return
            except KafkaError as exc:
                if not _retriable(exc):
                    raise
                log.warning(
                    "producer cannot reach Kafka at %s (%s); retrying in %.1fs",
                    self._cfg.bootstrap_servers,
                    exc,
                    backoff,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._cfg.max_retry_backoff_ms / 1000)

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

    def _delivered(self, msg: Outgoing, fut: asyncio.Future) -> None:
        exc = None if fut.cancelled() else fut.exception()
        if fut.cancelled():
            exc = asyncio.CancelledError("delivery cancelled (producer stopping)")
        if exc is not None and _retriable(exc):
            task = asyncio.get_running_loop().create_task(self._retry(msg, exc))
            self._retries.add(task)
            task.add_done_callback(self._retry_done)
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
        delay = (
            min(
                self._cfg.retry_backoff_ms * 2 ** min(msg.attempt, 16),
                self._cfg.max_retry_backoff_ms,
            )
            / 1000
        )
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
        task = asyncio.get_running_loop().create_task(self._enqueue(msg))
        self._retries.add(task)
        task.add_done_callback(self._retry_done)

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
