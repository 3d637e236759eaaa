"""Batch-level produce: partitions as send() picks them, order kept, each callback once."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest
from aiokafka.errors import KafkaConnectionError, MessageSizeTooLargeError
from aiokafka.producer.message_accumulator import BatchBuilder
from support import read_topic

from streamer.config import KafkaConfig
from streamer.kafka.broker import create_topics
from streamer.kafka.publisher import Outgoing, Publisher


class Calls:
    """Counts each record's callbacks, so 'exactly once' can be checked."""

    def __init__(self) -> None:
        self.delivered: Counter[int] = Counter()
        self.rejected: dict[int, BaseException] = {}
        self.fatal: list[BaseException] = []

    def msg(self, topic: str, i: int, key: bytes | None, value: bytes) -> Outgoing:
        def delivered() -> None:
            self.delivered[i] += 1

        def rejected(exc: BaseException) -> None:
            assert i not in self.rejected
            self.rejected[i] = exc

        return Outgoing(topic, key, value, [("n", str(i).encode())], delivered, rejected)


@pytest.mark.integration
async def test_send_many_matches_send_partitions_order_and_callbacks(
    broker: str, topic: str
) -> None:
    batched, single = f"{topic}.many", f"{topic}.one"
    await create_topics(broker, {batched: 4, single: 4})
    calls = Calls()
    # 16 KB record batches: a 64-record call fills several per partition
    kafka = KafkaConfig(bootstrap_servers=broker, batch_size=16_384)
    pub = Publisher(kafka, on_fatal=calls.fatal.append)
    await pub.start()
    n = 300
    keys = [None if i % 10 == 0 else f"key-{i % 37}".encode() for i in range(n)]
    # ~3 KB values: a 64-record call spans several 16 KB record batches per partition
    values = [f"{i:05d}".encode() + b"x" * 3000 for i in range(n)]
    try:
        for start in range(0, n, 64):
            await pub.send_many(
                [
                    calls.msg(batched, i, keys[i], values[i])
                    for i in range(start, min(n, start + 64))
                ]
            )
        for i in range(n):
            await pub.send(calls.msg(single, n + i, keys[i], values[i]))
        await asyncio.wait_for(pub.flush(), 30)
        assert pub.unacked == 0
    finally:
        await pub.stop()
    assert not calls.fatal and not calls.rejected
    assert calls.delivered == Counter(range(2 * n))  # every callback exactly once

    got_many = await read_topic(broker, batched, expect=n)
    got_one = await read_topic(broker, single, expect=n)
    assert len(got_many) == n and len(got_one) == n
    where_many = {int(m.value[:5]): m.partition for m in got_many}
    where_one = {int(m.value[:5]): m.partition for m in got_one}
    for i in range(n):
        if keys[i] is not None:
            assert where_many[i] == where_one[i], f"key {keys[i]!r} moved partition"
    assert len(set(where_many.values())) == 4  # keys spread over every partition
    for p in range(4):  # order within each partition is the order of the calls
        seq = [
            int(m.value[:5]) for m in sorted(got_many, key=lambda m: m.offset) if m.partition == p
        ]
        assert seq == sorted(seq)
    assert {dict(m.headers)["n"] for m in got_many} == {str(i).encode() for i in range(n)}


@pytest.mark.integration
async def test_send_many_hands_back_a_record_over_the_request_size(broker: str, topic: str) -> None:
    await create_topics(broker, {topic: 2})
    calls = Calls()
    pub = Publisher(
        KafkaConfig(bootstrap_servers=broker, max_request_size=4096), on_fatal=calls.fatal.append
    )
    await pub.start()
    try:
        msgs = [calls.msg(topic, i, b"k%d" % i, b"v" * 100) for i in range(10)]
        msgs.insert(5, calls.msg(topic, 99, b"big", b"v" * 10_000))
        await pub.send_many(msgs)
        await asyncio.wait_for(pub.flush(), 30)
    finally:
        await pub.stop()
    assert set(calls.rejected) == {99}
    assert isinstance(calls.rejected[99], MessageSizeTooLargeError)
    assert calls.delivered == Counter(range(10)) and not calls.fatal


class FakeCluster:
    def partitions_for_topic(self, topic: str) -> set[int]:
        return {0, 1, 2}

    def available_partitions_for_topic(self, topic: str) -> set[int]:
        return {0, 1, 2}


class FlakyProducer:
    """Fails its first batches with ``errors`` (in turn), then acknowledges everything."""

    def __init__(self, errors: list[BaseException]) -> None:
        self.errors = errors
        self.client = type("Client", (), {"cluster": FakeCluster()})()
        self.batches: list[tuple[int, int]] = []  # (partition, records)
        self.singles = 0

    async def partitions_for(self, topic: str) -> set[int]:
        return {0, 1, 2}

    def create_batch(self) -> BatchBuilder:
        return BatchBuilder(16384, 0)

    async def send_batch(self, batch: BatchBuilder, topic: str, *, partition: int) -> Any:
        fut = asyncio.get_running_loop().create_future()
        self.batches.append((partition, batch._relative_offset))
        if self.errors:
            fut.set_exception(self.errors.pop(0))
        else:
            fut.set_result(None)
        return fut

    async def send(
        self, topic: str, value: Any = None, key: Any = None, headers: Any = None
    ) -> Any:
        self.singles += 1
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut

    async def flush(self) -> None:
        return None


async def test_send_many_retries_a_failed_batch_and_splits_a_too_large_one() -> None:
    calls = Calls()
    pub = Publisher(KafkaConfig(retry_backoff_ms=10), on_fatal=calls.fatal.append)
    fake = FlakyProducer([KafkaConnectionError("down"), MessageSizeTooLargeError("batch")])
    pub._producer = fake  # type: ignore[assignment]
    await pub.send_many([calls.msg("t", i, b"same-key", b"v") for i in range(8)])
    await asyncio.wait_for(pub.flush(), 10)
    # retried as a batch after the outage, then sent one by one when the batch was too large
    assert [b[1] for b in fake.batches] == [8, 8] and fake.singles == 8
    assert len({b[0] for b in fake.batches}) == 1  # one key, one partition
    assert calls.delivered == Counter(range(8)) and not calls.rejected and not calls.fatal
    assert pub.unacked == 0


async def test_send_many_fatal_error_reaches_on_fatal_for_each_record() -> None:
    calls = Calls()
    pub = Publisher(KafkaConfig(retry_backoff_ms=10), on_fatal=calls.fatal.append)
    pub._producer = FlakyProducer([ValueError("corrupt")])  # type: ignore[assignment]
    await pub.send_many([calls.msg("t", i, b"k", b"v") for i in range(3)])
    await asyncio.wait_for(pub.flush(), 10)
    assert len(calls.fatal) == 3 and not calls.delivered and pub.unacked == 0
