"""The publisher against the embedded broker over TCP: whole record batches out, one delivery
report per batch, partitions as ``send()`` picks them, too-large records handed back,
retriable failures retried, anything else fatal."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    NotLeaderForPartitionError,
    TopicAuthorizationFailedError,
)
from aiokafka.partitioner import DefaultPartitioner
from support import read_topic

from streamer.config import KafkaConfig
from streamer.kafka.broker import create_topics
from streamer.kafka.publisher import TOO_LARGE, OutBatch, Publisher
from streamer.stream.outputs import Destinations, Outputs
from streamer.stream.records import Chunk, TopicPartition

pytestmark = pytest.mark.integration


@dataclass
class Msg:
    offset: int
    key: bytes | None
    value: bytes | None = b"input"
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    timestamp: int = 1_700_000_000_000


def chunk(keys: list[bytes | None], partition: int = 0) -> Chunk:
    messages = [Msg(i, k) for i, k in enumerate(keys)]
    return Chunk(TopicPartition("in", partition), 1, messages, 0.0, remaining=len(keys))


class Reports:
    """What the publisher reported, per batch and per input record (``(chunk, row)``)."""

    def __init__(self) -> None:
        self.acked: list[OutBatch] = []
        self.rejected: list[tuple[OutBatch, BaseException]] = []
        self.fatal: list[BaseException] = []

    def publisher(self, cfg: KafkaConfig) -> Publisher:
        return Publisher(
            cfg,
            on_acked=self.acked.append,
            on_rejected=lambda out, exc: self.rejected.append((out, exc)),
            on_fatal=self.fatal.append,
        )

    def delivered(self) -> Counter[tuple[int, int]]:
        """How often each input record's output was acknowledged: (input partition, row)."""
        return Counter(
            (c.tp.partition, i) for o in self.acked for c, i in zip(o.chunks, o.rows, strict=True)
        )


def batch(topic: str, partition: int, keys: list[bytes | None], values: list[bytes]) -> OutBatch:
    """One OutBatch as the encode stage would hand it over (built on send)."""
    c = chunk(keys)
    n = len(keys)
    headers = [[("n", str(i).encode())] for i in range(n)]
    return OutBatch(
        topic, partition, False, keys, values, headers, [c] * n, list(range(n)), None, "m"
    ).finish()


async def started(reports: Reports, broker: str, **kafka: Any) -> Publisher:
    pub = reports.publisher(KafkaConfig(bootstrap_servers=broker, **kafka))
    await pub.start()
    return pub


async def test_batches_land_where_send_would_put_them_and_are_reported_once(
    broker: str, topic: str
) -> None:
    out_topic, ref_topic = f"{topic}.out", f"{topic}.ref"
    await create_topics(broker, {out_topic: 4, ref_topic: 4})
    reports = Reports()
    pub = await started(reports, broker)
    n, per_call = 300, 64
    keys = [None if i % 10 == 0 else f"key-{i % 37}".encode() for i in range(n)]
    values = [f"{i:05d}".encode() + b"x" * 300 for i in range(n)]
    sent: list[OutBatch] = []
    try:
        parts = await pub.partitions(out_topic)
        assert parts.every == [0, 1, 2, 3]
        for call, start in enumerate(range(0, n, per_call)):
            # half the calls serialise their record batches on "the stage thread", half on send
            factory = pub.builder_factory() if call % 2 else None
            dest = Destinations(parts, parts, 1_048_576, factory, pub.prebuild)
            c = chunk(keys, partition=call)
            out = Outputs(dest, model="m")
            for i in range(start, min(n, start + per_call)):
                out.result(c, i, values[i], [("n", str(i).encode())])
            for ob in out.batches():
                assert (ob.builder is not None) == bool(call % 2)
                sent.append(ob)
                await pub.send(ob)
        await asyncio.wait_for(pub.flush(), 60)
        assert pub.unacked == 0
    finally:
        await pub.stop()
    assert not reports.fatal and not reports.rejected
    # one report per batch sent, each exactly once, carrying its accounting
    assert Counter(map(id, reports.acked)) == Counter(map(id, sent))
    assert sum(sum(o.counts.values()) for o in reports.acked) == n
    assert all(o.labels == {("in", "m"): len(o)} for o in reports.acked)

    # the same keys through the producer's own send(): the partitions it picks
    producer = AIOKafkaProducer(bootstrap_servers=broker, acks="all")
    await producer.start()
    try:
        for i in range(n):
            if keys[i] is not None:
                await producer.send(ref_topic, values[i], key=keys[i])
        await producer.flush()
    finally:
        await producer.stop()
    got = await read_topic(broker, out_topic, expect=n)
    ref = await read_topic(broker, ref_topic, expect=n - n // 10)
    assert len(got) == n
    where = {int(m.value[:5]): m.partition for m in got}
    where_ref = {int(m.value[:5]): m.partition for m in ref}
    partitioner = DefaultPartitioner()
    for i in range(n):
        if keys[i] is not None:
            assert where[i] == where_ref[i], f"key {keys[i]!r} moved partition"
            assert where[i] == partitioner(keys[i], [0, 1, 2, 3], [0, 1, 2, 3])
    for start in range(0, n, per_call):  # keyless records of one call share a partition
        keyless = [i for i in range(start, min(n, start + per_call)) if keys[i] is None]
        assert len({where[i] for i in keyless}) == 1
    assert len(set(where.values())) == 4
    for p in range(4):  # order within each partition is the order of the calls
        seq = [int(m.value[:5]) for m in sorted(got, key=lambda m: m.offset) if m.partition == p]
        assert seq == sorted(seq)
    for m in got:
        assert int(dict(m.headers)["n"]) == int(m.value[:5])


async def test_a_record_over_the_limit_is_handed_back_and_the_rest_delivered(
    broker: str, topic: str
) -> None:
    await create_topics(broker, {topic: 2})
    reports = Reports()
    pub = await started(reports, broker, max_request_size=4096)
    values = [b"small-%d-" % i + b"v" * 100 for i in range(10)]
    values.insert(5, b"big-" + b"v" * 10_000)
    try:
        out = batch(topic, 1, [b"same-key"] * 11, values)
        await pub.send(out)
        await asyncio.wait_for(pub.flush(), 30)
        assert pub.unacked == 0
    finally:
        await pub.stop()
    assert not reports.fatal
    assert len(reports.rejected) == 1
    refused, exc = reports.rejected[0]
    assert refused.values == [values[5]] and refused.rows == [5]
    assert isinstance(exc, TOO_LARGE)
    assert reports.delivered() == Counter((0, i) for i in range(11) if i != 5)
    got = await read_topic(broker, topic, expect=10)
    assert sorted(m.value for m in got) == sorted(v for i, v in enumerate(values) if i != 5)
    assert {m.partition for m in got} == {1}


async def test_a_batch_over_the_request_size_is_sent_in_pieces(broker: str, topic: str) -> None:
    await create_topics(broker, {topic: 1})
    reports = Reports()
    pub = await started(reports, broker, max_request_size=4096)
    values = [b"%02d" % i + b"v" * 1000 for i in range(12)]  # 12 KB: three or more batches
    try:
        await pub.send(batch(topic, 0, [b"k"] * 12, values))
        await asyncio.wait_for(pub.flush(), 30)
    finally:
        await pub.stop()
    assert not reports.fatal and not reports.rejected
    assert len(reports.acked) > 1 and all(len(o) < 12 for o in reports.acked)
    assert reports.delivered() == Counter((0, i) for i in range(12))
    got = await read_topic(broker, topic, expect=12)
    assert [m.value for m in sorted(got, key=lambda m: m.offset)] == values  # order kept


class Faults:
    """Wraps the real producer's ``send_batch``: the next calls fail as scripted, before
    anything is sent (``("raise", exc)``: not even queued; ``("fail", exc)``: the delivery
    future fails), then everything goes to the real broker."""

    def __init__(self, pub: Publisher, script: list[tuple[str, BaseException]]) -> None:
        self.script = list(script)
        self.calls = 0
        self.real = pub.producer.send_batch
        pub.producer.send_batch = self.send_batch  # type: ignore[method-assign]

    async def send_batch(self, builder: Any, topic: str, *, partition: int) -> Any:
        self.calls += 1
        if self.script:
            how, exc = self.script.pop(0)
            if how == "raise":
                raise exc
            fut = asyncio.get_running_loop().create_future()
            fut.set_exception(exc)
            return fut
        return await self.real(builder, topic, partition=partition)


def record_backoff(pub: Publisher) -> list[int]:
    """The attempts the publisher backed off for (it still waits retry_backoff_ms)."""
    attempts: list[int] = []
    real = pub._sleep

    async def sleep(topic: str, exc: BaseException, attempt: int) -> None:
        attempts.append(attempt)
        await real(topic, exc, attempt)

    pub._sleep = sleep  # type: ignore[method-assign]
    return attempts


async def test_retriable_failures_are_retried_until_delivered(broker: str, topic: str) -> None:
    await create_topics(broker, {topic: 1})
    reports = Reports()
    pub = await started(reports, broker, retry_backoff_ms=10)
    faults = Faults(
        pub,
        [
            ("fail", KafkaConnectionError("connection lost")),
            ("fail", NotLeaderForPartitionError()),
            ("raise", KafkaTimeoutError("queue full")),
        ],
    )
    attempts = record_backoff(pub)
    values = [b"%d" % i for i in range(8)]
    try:
        out = batch(topic, 0, [b"k"] * 8, values)
        out.builder = pub.builder_factory()()  # a prebuilt batch is rebuilt for the retries
        for k, v, h in zip(out.keys, out.values, out.headers, strict=True):
            out.builder.append(key=k, value=v, timestamp=None, headers=h)
        out.builder.close()
        await pub.send(out)
        await asyncio.wait_for(pub.flush(), 30)
        assert pub.unacked == 0
    finally:
        await pub.stop()
    assert not reports.fatal and not reports.rejected
    assert attempts == [1, 2, 3] and faults.calls == 4
    assert [id(o) for o in reports.acked] == [id(out)]  # the batch, reported once
    got = await read_topic(broker, topic, expect=8)
    assert [m.value for m in sorted(got, key=lambda m: m.offset)] == values  # once each


async def test_a_batch_refused_as_too_large_is_resent_one_by_one(broker: str, topic: str) -> None:
    await create_topics(broker, {topic: 1})
    reports = Reports()
    pub = await started(reports, broker)
    faults = Faults(pub, [("fail", MessageSizeTooLargeError("the broker's limit is lower"))])
    try:
        await pub.send(batch(topic, 0, [b"k"] * 5, [b"%d" % i for i in range(5)]))
        await asyncio.wait_for(pub.flush(), 30)
        assert pub.unacked == 0
    finally:
        await pub.stop()
    assert not reports.fatal and not reports.rejected
    assert faults.calls == 6 and [len(o) for o in reports.acked] == [1] * 5
    assert reports.delivered() == Counter((0, i) for i in range(5))
    assert len(await read_topic(broker, topic, expect=5)) == 5


async def test_a_lone_record_refused_as_too_large_is_handed_back(broker: str, topic: str) -> None:
    await create_topics(broker, {topic: 1})
    reports = Reports()
    pub = await started(reports, broker)
    Faults(pub, [("fail", MessageSizeTooLargeError("too large"))])
    try:
        out = batch(topic, 0, [b"k"], [b"v"])
        await pub.send(out)
        await asyncio.wait_for(pub.flush(), 30)
        assert pub.unacked == 0
    finally:
        await pub.stop()
    assert [(id(o), type(e)) for o, e in reports.rejected] == [(id(out), MessageSizeTooLargeError)]
    assert not reports.acked and not reports.fatal


@pytest.mark.parametrize("how", ["fail", "raise"])
async def test_other_errors_are_fatal_once_per_batch(broker: str, topic: str, how: str) -> None:
    await create_topics(broker, {topic: 1})
    reports = Reports()
    pub = await started(reports, broker)
    error = TopicAuthorizationFailedError()
    Faults(pub, [(how, error)])
    try:
        await pub.send(batch(topic, 0, [b"k"] * 3, [b"a", b"b", b"c"]))
        await asyncio.wait_for(pub.flush(), 30)
        assert pub.unacked == 0
    finally:
        await pub.stop()
    assert reports.fatal == [error]
    assert not reports.acked and not reports.rejected


async def test_a_failing_callback_reaches_on_fatal(broker: str, topic: str) -> None:
    await create_topics(broker, {topic: 1})
    fatal: list[BaseException] = []

    def acked(out: OutBatch) -> None:
        raise RuntimeError("callback bug")

    pub = Publisher(
        KafkaConfig(bootstrap_servers=broker),
        on_acked=acked,
        on_rejected=lambda o, e: None,
        on_fatal=fatal.append,
    )
    await pub.start()
    try:
        await pub.send(batch(topic, 0, [b"k"], [b"v"]))
        await asyncio.wait_for(pub.flush(), 30)
        assert pub.unacked == 0
    finally:
        await pub.stop()
    assert [str(e) for e in fatal] == ["callback bug"]


async def test_an_outage_is_retried_and_every_record_delivered_once() -> None:
    """Cut every connection (a TCP proxy in front of a broker of its own), send, restore."""
    from support import proxied_broker

    async with proxied_broker() as (bootstrap, proxy):
        await create_topics(bootstrap, {"outage": 1})
        reports = Reports()
        pub = await started(
            reports,
            bootstrap,
            request_timeout_ms=1500,
            session_timeout_ms=1000,
            heartbeat_interval_ms=100,
            retry_backoff_ms=10,
            max_retry_backoff_ms=50,
        )
        failed = asyncio.Event()
        real = pub._sleep

        async def sleep(topic: str, exc: BaseException, attempt: int) -> None:
            failed.set()  # the publisher saw the outage and backs off
            await real(topic, exc, attempt)

        pub._sleep = sleep  # type: ignore[method-assign]
        values = [b"%d" % i for i in range(5)]
        try:
            await pub.partitions("outage")
            await proxy.cut()
            await pub.send(batch("outage", 0, [b"k"] * 5, values))
            await asyncio.wait_for(failed.wait(), 60)
            assert not reports.acked and pub.unacked == 5  # nothing is lost meanwhile
            await proxy.start()
            await asyncio.wait_for(pub.flush(), 60)
            assert pub.unacked == 0
        finally:
            await pub.stop()
        assert not reports.fatal and not reports.rejected
        assert reports.delivered() == Counter((0, i) for i in range(5))
        got = await read_topic(bootstrap, "outage", expect=5)
        assert [m.value for m in sorted(got, key=lambda m: m.offset)] == values


async def test_metadata_updates_are_counted(broker: str, topic: str) -> None:
    """What lets the pipeline keep its destinations until the producer's metadata changes."""
    await create_topics(broker, {topic: 2})
    pub = await started(Reports(), broker)
    try:
        assert pub.metadata_updates >= 1  # the producer's start fetched the cluster's
        assert (await pub.partitions(topic)).every == [0, 1]
        seen = pub.metadata_updates
        assert await pub.producer.client.force_metadata_update()
        assert pub.metadata_updates > seen
    finally:
        await pub.stop()
