"""``kafka.compression_type`` through the running service and the real broker: the record batches
the publisher prebuilds are stored compressed (the codec read from each batch header, as the
broker serves it), read back as the same results, and smaller than the records they hold."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from support import RunningService, base_config, json_records, produce, read_topic

from streamer.config import load_config
from streamer.kafka.broker import create_topics
from streamer.kafka.wire import read_topic_log

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("codec", ["none", "gzip", "snappy", "lz4", "zstd"])
async def test_service_output_is_compressed_on_the_broker(
    broker: str, topic: str, tiny_model: Path, codec: str
) -> None:
    n = 120
    over = base_config(broker, tiny_model, topic)
    over["kafka"]["compression_type"] = codec
    await create_topics(broker, {topic: 2, f"{topic}.out": 2, f"{topic}.dlq": 1})
    await produce(broker, topic, [*json_records(n), b"{not json"])
    async with RunningService(load_config(None, **over)) as svc:
        await svc.wait_done(n + 1, timeout_s=90)
        assert svc.service.telemetry.outputs() == (n, 1)

    out = await read_topic(broker, f"{topic}.out", expect=n)
    assert sorted(orjson.loads(m.value)["id"] for m in out) == list(range(n))
    (dead,) = await read_topic(broker, f"{topic}.dlq", expect=1)
    assert dead.value == b"{not json"

    log = await read_topic_log(broker, f"{topic}.out")
    assert log.records == n
    assert set(log.codecs()) == {codec}, log.codecs()  # every batch, as the broker stores it
    assert set((await read_topic_log(broker, f"{topic}.dlq")).codecs()) == {codec}
    payload = sum(len(m.value) + len(m.key or b"") for m in out)
    if codec == "none":
        assert log.size_bytes > payload  # batch and record headers on top
    else:
        # float JSON compresses with every codec: fewer bytes stored than the values alone
        assert log.size_bytes < payload, (log.size_bytes, payload)


def _batch(base_offset: int, n: int, codec: int) -> bytes:
    from aiokafka.record.default_records import DefaultRecordBatchBuilder

    builder = DefaultRecordBatchBuilder(
        magic=2,
        compression_type=codec,
        is_transactional=False,
        producer_id=-1,
        producer_epoch=-1,
        base_sequence=-1,
        batch_size=1 << 20,
    )
    for i in range(n):
        builder.append(i, timestamp=0, key=None, value=b"x" * 100, headers=[])
    data = bytearray(builder.build())
    data[0:8] = base_offset.to_bytes(8, "big")  # the broker assigns offsets; the CRC skips them
    return bytes(data)


@pytest.mark.parametrize("codec", [0, 1, 4])
def test_parse_batches_reads_headers_and_refetches_a_cut_batch(codec: int) -> None:
    from streamer.kafka.wire import CODEC_NAMES, parse_batches

    first, second = _batch(0, 5, codec), _batch(5, 3, codec)
    batches, next_offset = parse_batches(0, first + second, 0)
    assert [(b.base_offset, b.records, b.size_bytes) for b in batches] == [
        (0, 5, len(first)),
        (5, 3, len(second)),
    ]
    assert {b.codec for b in batches} == {CODEC_NAMES[codec]} and next_offset == 8
    # a response cut inside the second batch: only the whole one, and fetch again from 5
    batches, next_offset = parse_batches(0, first + second[:20], 0)
    assert [b.base_offset for b in batches] == [0] and next_offset == 5
    # a batch that began before the offset asked for is skipped
    assert parse_batches(0, first + second, 5)[0][0].base_offset == 5
