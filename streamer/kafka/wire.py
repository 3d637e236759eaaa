"""What a topic's log holds, record batch by record batch, as the broker serves it.

Consumers decompress batches before anyone sees them, and aiokafka keeps no producer byte
counters, so "is this topic compressed, and how much smaller is it" is answered here with raw
``Fetch`` requests: the bytes of each record batch exactly as the broker stores and sends them,
its codec from the batch header (the low three bits of ``attributes``) and its record count.
For the bench's compression rows and the tests that check compressed batches reach the broker.
"""

from __future__ import annotations

import struct
from collections import Counter
from dataclasses import dataclass, field

# Record batch v2 header (Kafka's DefaultRecordBatch): baseOffset int64, batchLength int32,
# partitionLeaderEpoch int32, magic int8, crc uint32, attributes int16, lastOffsetDelta int32,
# firstTimestamp int64, maxTimestamp int64, producerId int64, producerEpoch int16,
# baseSequence int32, recordCount int32.
_HEADER = struct.Struct(">qiibIhiqqqhii")
_LOG_OVERHEAD = 12  # baseOffset + batchLength: batchLength counts the bytes after them
CODEC_NAMES = {0: "none", 1: "gzip", 2: "snappy", 3: "lz4", 4: "zstd"}


@dataclass(frozen=True, slots=True)
class BatchInfo:
    partition: int
    base_offset: int
    records: int
    size_bytes: int  # the whole batch, header included, as stored (compressed)
    codec: str


@dataclass
class TopicLog:
    """Every batch of a topic, from its log start to the high watermark at the time read."""

    topic: str
    batches: list[BatchInfo] = field(default_factory=list)

    @property
    def records(self) -> int:
        return sum(b.records for b in self.batches)

    @property
    def size_bytes(self) -> int:
        return sum(b.size_bytes for b in self.batches)

    @property
    def bytes_per_record(self) -> float:
        return self.size_bytes / self.records if self.records else 0.0

    def codecs(self) -> Counter[str]:
        """Record batches per codec."""
        return Counter(b.codec for b in self.batches)


def parse_batches(partition: int, data: bytes, start: int) -> tuple[list[BatchInfo], int]:
    """The whole record batches in ``data`` at or after offset ``start``, and the offset to
    fetch next (a batch cut off at the end of a response is fetched again whole)."""
    out: list[BatchInfo] = []
    pos, next_offset = 0, start
    while pos + _HEADER.size <= len(data):
        base, length, _epoch, magic, _crc, attrs, last_delta, *_, count = _HEADER.unpack_from(
            data, pos
        )
        size = _LOG_OVERHEAD + length
        if pos + size > len(data):
            break  # partial batch: the broker cut the response at max_bytes
        if magic != 2:
            raise ValueError(f"record batch magic {magic} at offset {base}: only v2 is read here")
        if base + last_delta >= start:  # a broker may return a batch that begins earlier
            out.append(BatchInfo(partition, base, count, size, CODEC_NAMES.get(attrs & 7, "?")))
        next_offset = max(next_offset, base + last_delta + 1)
        pos += size
    return out, next_offset


async def read_topic_log(
    bootstrap: str, topic: str, *, max_bytes: int = 8 * 1024 * 1024, **client_kwargs: object
) -> TopicLog:
    """Fetch every batch of ``topic`` (each partition from offset 0 to its high watermark)."""
    from aiokafka import TopicPartition
    from aiokafka.client import AIOKafkaClient
    from aiokafka.errors import for_code
    from aiokafka.protocol.fetch import FetchRequest

    client = AIOKafkaClient(bootstrap_servers=bootstrap, **client_kwargs)  # type: ignore[arg-type]
    await client.bootstrap()
    log = TopicLog(topic)
    try:
        client.add_topic(topic)
        await client.force_metadata_update()
        partitions = sorted(client.cluster.partitions_for_topic(topic) or ())
        if not partitions:
            raise ValueError(f"topic {topic} has no partitions (does it exist?)")
        for p in partitions:
            leader = client.cluster.leader_for_partition(TopicPartition(topic, p))
            offset = 0
            while True:
                # min_bytes 1: some brokers (tansu) answer min_bytes 0 with no partitions at all
                request = FetchRequest(100, 1, max_bytes, 0, [(topic, [(p, offset, max_bytes)])])
                response = await client.send(leader, request)
                ((_, parts),) = response.topics
                ((_partition, error, highwater, *_, data),) = parts
                if error:
                    raise for_code(error)(f"fetching {topic}[{p}] at offset {offset}")
                batches, offset = parse_batches(p, data or b"", offset)
                log.batches.extend(batches)
                if offset >= highwater or not batches:
                    break
    finally:
        await client.close()
    return log
