"""The consume stage: an aiokafka group member with manual commits and a rebalance listener.

Nothing here decides *what* to commit: :mod:`streamer.kafka.checkpoint` does. This module
fetches (records stay aiokafka's own objects), pauses and resumes partitions for backpressure,
and forwards rebalance events to the pipeline, awaiting its revoke handler so that in-flight
work of a revoked partition is finished and committed before it is released.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener
from aiokafka import TopicPartition as KafkaTP
from aiokafka.errors import CommitFailedError, KafkaError

from streamer.config import KafkaConfig
from streamer.kafka.client import Backoff, consumer_kwargs
from streamer.stream.records import TopicPartition

log = logging.getLogger(__name__)

PartitionsHandler = Callable[[list[TopicPartition]], Awaitable[None]]


class _Listener(ConsumerRebalanceListener):
    def __init__(self, on_revoked: PartitionsHandler, on_assigned: PartitionsHandler) -> None:
        self._on_revoked = on_revoked
        self._on_assigned = on_assigned

    async def on_partitions_revoked(self, revoked: set[KafkaTP]) -> None:
        await self._on_revoked(sorted(TopicPartition(t.topic, t.partition) for t in revoked))

    async def on_partitions_assigned(self, assigned: set[KafkaTP]) -> None:
        await self._on_assigned(sorted(TopicPartition(t.topic, t.partition) for t in assigned))


class Consumer:
    def __init__(
        self,
        cfg: KafkaConfig,
        *,
        on_revoked: PartitionsHandler,
        on_assigned: PartitionsHandler,
    ) -> None:
        self._cfg = cfg
        self._listener = _Listener(on_revoked, on_assigned)
        self._consumer: AIOKafkaConsumer | None = None
        self.paused = False

    async def start(self) -> None:
        """Connect and subscribe; the group join follows in aiokafka's coordinator task."""
        backoff = Backoff(self._cfg)
        while True:
            consumer = AIOKafkaConsumer(**consumer_kwargs(self._cfg))
            consumer.subscribe(self._cfg.input_topics, listener=self._listener)
            self._consumer = consumer  # the listener may run before start() returns
            try:
                await consumer.start()
            except KafkaError as exc:
                self._consumer = None
                await consumer.stop()
                if not getattr(exc, "retriable", False):
                    raise
                await backoff.wait("consumer", exc)
                continue
            return

    @property
    def client(self) -> AIOKafkaConsumer:
        assert self._consumer is not None, "start() first"
        return self._consumer

    async def fetch(self, max_records: int, timeout_ms: int) -> dict[TopicPartition, list[Any]]:
        """One ``getmany``: each partition's records, as aiokafka returns them (no copy)."""
        batches = await self.client.getmany(timeout_ms=timeout_ms, max_records=max_records)
        return {TopicPartition(k.topic, k.partition): v for k, v in batches.items() if v}

    def assignment(self) -> list[TopicPartition]:
        return sorted(TopicPartition(t.topic, t.partition) for t in self.client.assignment())

    def pause_all(self) -> None:
        tps = list(self.client.assignment())
        if tps:
            self.client.pause(*tps)
        self.paused = True

    def resume_all(self) -> None:
        tps = list(self.client.paused())
        if tps:
            self.client.resume(*tps)
        self.paused = False

    def highwater(self, tp: TopicPartition) -> int | None:
        """High watermark from the last fetch response (right even where ListOffsets isn't)."""
        try:
            return self.client.highwater(KafkaTP(tp.topic, tp.partition))
        except Exception:  # not assigned (any more)
            return None

    async def committed_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        """The group's committed offsets, or the log start where none is committed yet."""
        out: dict[TopicPartition, int] = {}
        missing = []
        for tp in tps:
            ktp = KafkaTP(tp.topic, tp.partition)
            committed = await self.client.committed(ktp)
            if committed is None:
                missing.append(ktp)
            else:
                out[tp] = committed
        if missing:
            for ktp, off in (await self.client.beginning_offsets(missing)).items():
                out[TopicPartition(ktp.topic, ktp.partition)] = off
        return out

    async def commit(self, offsets: dict[TopicPartition, int]) -> bool:
        """Commit ``offsets`` (next offset to read). False if the group moved on meanwhile."""
        if not offsets:
            return True
        try:
            await self.client.commit(
                {KafkaTP(tp.topic, tp.partition): o for tp, o in offsets.items()}
            )
        except CommitFailedError as exc:
            log.warning("commit refused (the group rebalanced); will be redone: %s", exc)
            return False
        return True

    async def stop(self) -> None:
        """Leave the group (the next member gets the partitions without waiting a timeout)."""
        if self._consumer is not None:
            await self._consumer.stop()
