"""Fetches handed over as the broker's record batches, read out on the prepare thread: the
per-batch checks aiokafka makes per record (position, aborted transactions, control batches),
counts from offsets corrected where compaction left gaps, and, against the broker, a group
whose committed offset lies inside a record batch."""

from __future__ import annotations

import struct
from pathlib import Path

import orjson
from aiokafka import AIOKafkaConsumer
from aiokafka import TopicPartition as KafkaTP
from aiokafka.consumer.fetcher import READ_COMMITTED
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.memory_records import MemoryRecords
from support import RunningService, base_config, produce, read_topic, wait_committed

from streamer.config import load_config
from streamer.kafka.broker import create_topics
from streamer.kafka.checkpoint import OffsetTracker
from streamer.kafka.consumer import RawBatch, _raw_key, _RawBatches
from streamer.stream.records import TopicPartition

KTP = KafkaTP("in", 0)
TP = TopicPartition("in", 0)


def batch(
    base: int, deltas: list[int], *, producer_id: int = -1, control: bytes | None = None
) -> bytes:
    """One v2 record batch at ``base`` with records at ``base + delta`` (gaps: compaction)."""
    b = DefaultRecordBatchBuilder(
        magic=2,
        compression_type=0,
        is_transactional=producer_id >= 0,
        producer_id=producer_id,
        producer_epoch=0 if producer_id >= 0 else -1,
        base_sequence=-1,
        batch_size=1 << 20,
    )
    for d in deltas:
        key = control if control is not None else b"k%d" % (base + d)
        b.append(d, timestamp=1_000 + d, key=key, value=b"v%d" % (base + d), headers=[])
    buf = bytearray(b.build())
    buf[0:8] = struct.pack(">q", base)  # the base offset is the broker's to set (not in the CRC)
    if control is not None:
        attrs = struct.unpack_from(">h", buf, 21)[0] | 0x20  # the control bit (CRC unchecked)
        struct.pack_into(">h", buf, 21, attrs)
    return bytes(buf)


def fetched(data: bytes, fetch_offset: int, aborted: list | None = None) -> tuple[list, int]:
    records = _RawBatches(
        KTP, MemoryRecords(data), aborted, fetch_offset, _raw_key, None, False, READ_COMMITTED
    )
    out = list(records)
    return out, records.next_fetch_offset


def test_one_item_per_batch_and_the_position_past_it() -> None:
    out, position = fetched(batch(0, [0, 1, 2]) + batch(3, [0, 1]), 0)
    assert [(b.first, b.end, b.count) for b in out] == [(0, 3, 3), (3, 5, 2)]
    assert position == 5
    assert [r.offset for r in out[0].records()] == [0, 1, 2]
    assert [r.value for r in out[1].records()] == [b"v3", b"v4"]
    assert out[1].records() is out[1].records()  # read out once


def test_a_fetch_starting_inside_a_batch_skips_what_was_before() -> None:
    out, position = fetched(batch(0, [0, 1, 2, 3]) + batch(4, [0, 1]), 2)
    assert [(b.first, b.end, b.count) for b in out] == [(2, 4, 2), (4, 6, 2)]
    assert [r.offset for r in out[0].records()] == [2, 3]
    assert position == 6


def test_aborted_transactions_and_control_batches_are_skipped() -> None:
    abort_marker = struct.pack(">hh", 0, 0)  # version 0, type 0: ABORT
    data = (
        batch(0, [0, 1])
        + batch(2, [0, 1], producer_id=7)  # aborted
        + batch(4, [0], producer_id=7, control=abort_marker)
        + batch(5, [0, 1])
    )
    out, position = fetched(data, 0, aborted=[(7, 2)])
    assert [(b.first, b.end) for b in out] == [(0, 2), (5, 7)]
    assert position == 7


def test_compaction_gaps_are_recounted_and_can_finish_a_chunk() -> None:
    out, _ = fetched(batch(10, [0, 3, 4]), 10)  # 10, 13, 14: five offsets, three records
    (raw,) = out
    assert (raw.first, raw.end, raw.count) == (10, 15, 5)
    t = OffsetTracker()
    chunk = t.track(TP, out, 1.0, 1)
    assert (chunk.first, chunk.end, t.in_flight, t.held) == (10, 15, 5, 5)
    assert chunk.unpack() == 3 and [m.offset for m in chunk.messages] == [10, 13, 14]
    assert not t.recount(chunk, 3)
    assert (chunk.remaining, t.in_flight, t.held) == (3, 3, 3)
    t.done(chunk, 3)
    assert t.committable() == {TP: 15} and t.held == 0  # past the compacted tail

    empty, _ = fetched(batch(20, [0]), 20)
    gone = t.track(TP, empty, 1.0, 1)
    assert t.recount(gone, 0)  # every record compacted away: finished, committable
    assert t.committable() == {TP: 21} and t.in_flight == 0 and t.held == 0


def test_records_already_read_count_exactly() -> None:
    raw = RawBatch(None, 4, 9, parsed=["a", "b"])
    assert raw.count == 2 and raw.records() == ["a", "b"]


async def test_a_group_committed_inside_a_batch_resumes_there(
    broker: str, topic: str, tiny_model: Path
) -> None:
    """Another client committed offset 3 of a 10-record batch: the records before it are not
    processed again, the rest are, and the commit ends at the batch's end."""
    await create_topics(broker, {topic: 1})
    n = 10
    values = [orjson.dumps({"id": i, "text": f"record number {i}"}) for i in range(n)]
    await produce(broker, topic, values)  # one producer call: one record batch
    cfg = load_config(None, **base_config(broker, tiny_model, topic))
    group = cfg.kafka.group_id
    other = AIOKafkaConsumer(bootstrap_servers=broker, group_id=group, enable_auto_commit=False)
    other.assign([KafkaTP(topic, 0)])
    await other.start()
    try:
        await other.commit({KafkaTP(topic, 0): 3})
    finally:
        await other.stop()
    svc = RunningService(cfg)
    seen: list[tuple[int, int, int]] = []
    fetch = svc.service.pipeline.consumer.fetch

    async def spy(*args, **kw):
        out = await fetch(*args, **kw)
        seen.extend((b.first, b.end, b.count) for v in out.values() for b in v)
        return out

    svc.service.pipeline.consumer.fetch = spy  # type: ignore[method-assign]
    async with svc:
        await svc.wait_done(n - 3, timeout_s=60)
        assert await wait_committed(broker, group, topic, n) == {0: n}
    assert seen == [(3, n, n - 3)]  # the batch from offset 0, read from 3 on and counted exactly
    out = await read_topic(broker, cfg.kafka.output_topic, expect=n - 3, settle_s=0.5)
    assert sorted(orjson.loads(m.value)["id"] for m in out) == list(range(3, n))
