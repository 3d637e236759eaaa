"""The pipeline's destinations (the producer's partitions of the output and DLQ topics) are
looked up once and again only after a metadata update, not twice per batch."""

from __future__ import annotations

from types import SimpleNamespace

from streamer.kafka.publisher import Partitions
from streamer.stream.pipeline import Pipeline


class _Publisher:
    def __init__(self) -> None:
        self.metadata_updates = 0
        self.prebuild = True
        self.lookups: list[str] = []
        self.partition_count = 2

    async def partitions(self, topic: str) -> Partitions:
        self.lookups.append(topic)
        every = list(range(self.partition_count))
        return Partitions(topic, every, every)

    def builder_factory(self) -> None:
        return None


async def test_destinations_are_looked_up_again_only_after_a_metadata_update() -> None:
    pub = _Publisher()
    kafka = SimpleNamespace(output_topic="out", dlq_topic="dlq", max_request_size=1000)
    stage = SimpleNamespace(publisher=pub, cfg=SimpleNamespace(kafka=kafka), _dests={})

    first = await Pipeline._destinations(stage, True)  # type: ignore[arg-type]
    assert pub.lookups == ["out", "dlq"] and first.results is not None
    assert stage._dests[True] == (0, first)  # what _rejected's DLQ fallback reads
    again = await Pipeline._destinations(stage, True)  # type: ignore[arg-type]
    dlq_only = await Pipeline._destinations(stage, False)  # type: ignore[arg-type]
    assert again is first and dlq_only.results is None
    assert pub.lookups == ["out", "dlq", "dlq"]  # the DLQ-only kind once, then cached too
    assert await Pipeline._destinations(stage, False) is dlq_only  # type: ignore[arg-type]

    pub.metadata_updates += 1  # e.g. the output topic gained partitions
    pub.partition_count = 4
    pub.lookups.clear()
    fresh = await Pipeline._destinations(stage, True)  # type: ignore[arg-type]
    assert pub.lookups == ["out", "dlq"] and fresh is not first
    assert fresh.results is not None and fresh.results.every == [0, 1, 2, 3]
