"""The consume stage: an aiokafka group member with manual commits and a rebalance listener.

Nothing here decides *what* to commit: :mod:`streamer.kafka.checkpoint` does. This module
fetches, pauses and resumes partitions for backpressure, and forwards rebalance events to the
pipeline, awaiting its revoke handler so that in-flight work of a revoked partition is finished
and committed before it is released.

A fetch hands over the broker's *record batches* unparsed (:class:`RawBatch`): aiokafka's
``getmany`` would build a ``ConsumerRecord`` per record on the event loop, a quarter of the
loop's time per record in a profile of the whole pipeline. Here the loop does a few attribute
reads per record batch (offsets, CRC, transaction markers, as aiokafka's own per-batch checks)
and the records are read out, decompressed included, on the prepare thread
(:meth:`RawBatch.records`). Only this consumer gets record batches: the fetcher's records
factory picks them by a marker key deserializer (see :func:`_install`), so every other aiokafka
consumer in the process is untouched.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener
from aiokafka import TopicPartition as KafkaTP
from aiokafka.consumer import fetcher as _fetcher
from aiokafka.errors import CommitFailedError, CorruptRecordException, KafkaError

from streamer.config import KafkaConfig
from streamer.kafka.client import Backoff, consumer_kwargs
from streamer.stream.records import TopicPartition

log = logging.getLogger(__name__)

PartitionsHandler = Callable[[list[TopicPartition]], Awaitable[None]]


class RawBatch:
    """One record batch as fetched, for offsets ``[first, end)``: ``end`` is the batch's next
    offset (what a commit past it names, compacted tail included). ``count`` is the number of
    records from the offsets, exact unless the topic is compacted; :meth:`records` says."""

    __slots__ = ("_batch", "_parsed", "count", "end", "first")

    def __init__(self, batch: Any, first: int, end: int, parsed: list[Any] | None = None):
        self._batch, self._parsed = batch, parsed
        self.first, self.end = first, end
        self.count = len(parsed) if parsed is not None else end - first

    def records(self) -> list[Any]:
        """The records (``offset``, ``key``, ``value``, ``headers``, ``timestamp``), read out of
        the batch (decompressing it) on the calling thread. Once: the batch is let go after."""
        if self._parsed is None:
            first = self.first
            self._parsed = [r for r in self._batch if r.offset >= first]
            self._batch = None
        return self._parsed


def _raw_key(key: bytes | None) -> bytes | None:  # pragma: no cover - never called
    """The marker that asks the fetcher for record batches (see :func:`_install`)."""
    return key


class _RawBatches(_fetcher.PartitionRecords):
    """aiokafka's per-partition fetch result, yielding one :class:`RawBatch` per record batch
    instead of one ``ConsumerRecord`` per record; the checks are aiokafka's own, per batch:
    CRC, aborted transactions (read_committed), control batches, and the position
    (``next_fetch_offset``) moved past each batch handed out."""

    def _unpack_records(self):  # type: ignore[no-untyped-def]
        records = self._records
        while records.has_next():
            batch = records.next_batch()
            if self._check_crcs and not batch.validate_crc():
                raise CorruptRecordException(f"Invalid CRC - {self._tp}")
            if self._isolation_level == _fetcher.READ_COMMITTED and batch.producer_id is not None:
                self._consume_aborted_up_to(batch.base_offset)
                if batch.is_control_batch and self._contains_abort_marker(batch):
                    self._aborted_producers.discard(batch.producer_id)
                if batch.is_transactional and batch.producer_id in self._aborted_producers:
                    self.next_fetch_offset = batch.next_offset
                    continue
            if batch.is_control_batch:
                self.next_fetch_offset = batch.next_offset
                continue
            first, end = self.next_fetch_offset, batch.next_offset
            if end <= first:  # wholly before the position (an old compressed message set)
                continue
            self.next_fetch_offset = end
            if batch.magic >= 2 and batch.base_offset >= first:
                yield RawBatch(batch, batch.base_offset, end)
                continue
            # Rare: an old message format, or a fetch that starts inside a batch (a position
            # another client committed mid-batch): read it here, to count exactly.
            parsed = [r for r in batch if r.offset >= first]
            if parsed:
                yield RawBatch(None, parsed[0].offset, end, parsed)


_installed = False


def _install() -> None:
    """Route aiokafka's fetcher through :func:`_partition_records` (once per process)."""
    global _installed
    if not _installed:
        original = _fetcher.PartitionRecords

        def _partition_records(tp: Any, records: Any, aborted: Any, offset: int, key, *rest):  # type: ignore[no-untyped-def]
            cls = _RawBatches if key is _raw_key else original
            return cls(tp, records, aborted, offset, key, *rest)

        _fetcher.PartitionRecords = _partition_records  # type: ignore[assignment,misc]
        _installed = True


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
        self._per_batch = 0.0  # records in the largest record batch lately (see fetch)
        self.paused = False

    async def start(self) -> None:
        """Connect and subscribe; the group join follows in aiokafka's coordinator task."""
        backoff = Backoff(self._cfg)
        _install()
        while True:
            kwargs = consumer_kwargs(self._cfg)
            kwargs["key_deserializer"] = _raw_key  # record batches, not records: see above
            consumer = AIOKafkaConsumer(**kwargs)
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

    async def fetch(
        self, max_records: int, timeout_ms: int
    ) -> dict[TopicPartition, list[RawBatch]]:
        """One ``getmany``: each partition's record batches, unparsed, at most about
        ``max_records`` records. aiokafka counts batches, not records, so this asks for as many
        batches as fit at the largest batch size seen lately, and at least one: a fetch is at
        most one record batch over (the producer's ``batch.size``), never more."""
        per_batch = self._per_batch
        items = max(1, int(max_records // per_batch)) if per_batch else 1  # 0: not known yet
        fetched = await self.client.getmany(timeout_ms=timeout_ms, max_records=items)
        out = {TopicPartition(k.topic, k.partition): v for k, v in fetched.items() if v}
        if out:  # the largest batch lately: a new larger one counts at once, then decays
            largest = max(b.count for v in out.values() for b in v)
            self._per_batch = max(float(largest), 0.9 * self._per_batch, 1.0)
        return out

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
