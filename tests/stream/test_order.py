"""Results in input order per partition (so per key), and tombstones passed on in their place,
against the embedded broker: what a compacted topic or a vector-store upsert needs."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from support import RunningService, base_config, committed, json_records, produce, read_topic

from streamer.config import load_config
from streamer.kafka.broker import create_topics

pytestmark = pytest.mark.integration


def _values(n: int) -> list[bytes | None]:
    """Lengths that vary a lot, so length grouping would reorder them; every 7th a delete."""
    out: list[bytes | None] = []
    for i in range(n):
        if i % 7 == 3:
            out.append(None)
        else:
            words = " ".join(["word"] * (1 + (i * 13) % 40))
            out.append(orjson.dumps({"id": i, "text": f"{i} {words}"}))
    return out


async def test_results_keep_input_order_per_key_and_tombstones_pass_through(
    broker: str, topic: str, tiny_model: Path
) -> None:
    n, keys = 400, 10
    values = _values(n)
    key_of = [b"key-%d" % (i % keys) for i in range(n)]
    await create_topics(broker, {topic: 2, f"{topic}.out": 3})
    await produce(broker, topic, values, keys=key_of)
    cfg = load_config(
        None,
        **base_config(
            broker, tiny_model, topic, batching={"max_batch_size": 16, "max_wait_ms": 50}
        ),
    )
    assert cfg.batching.order == "partition" and cfg.input.on_tombstone == "pass"
    async with RunningService(cfg) as svc:
        await svc.wait_done(n)
    out = await read_topic(broker, f"{topic}.out", expect=n, settle_s=0.5)
    assert len(out) == n  # tombstones are outputs too
    dlq = await read_topic(broker, f"{topic}.dlq", expect=1, timeout_s=1)
    assert dlq == []
    per_key: dict[bytes, list[int]] = {}
    tombstones = 0
    for m in sorted(out, key=lambda m: (m.partition, m.offset)):  # output order per partition
        if m.value is None:
            tombstones += 1
            ident = None
        else:
            ident = orjson.loads(m.value)["id"]
        per_key.setdefault(m.key, []).append(ident)
    assert tombstones == sum(v is None for v in values)
    for key, got in per_key.items():
        want = [None if values[i] is None else i for i in range(n) if key_of[i] == key]
        assert got == want, key  # the input's order for this key, deletes in their place
    offsets = await committed(broker, f"g-{topic}", topic)
    assert sum(c or 0 for c in offsets.values()) == n


async def test_tombstones_can_be_skipped_or_dead_lettered(
    broker: str, topic: str, tiny_model: Path
) -> None:
    values: list[bytes | None] = [*json_records(3), None, *json_records(2, start=3), None]
    for mode, results, dead in (("skip", 5, 0), ("dlq", 5, 2)):
        t = f"{topic}-{mode}"
        await create_topics(broker, {t: 1})
        await produce(broker, t, values, keys=[b"k"] * len(values))
        cfg = load_config(None, **base_config(broker, tiny_model, t, input={"on_tombstone": mode}))
        async with RunningService(cfg) as svc:
            await svc.wait_done(results + dead)
        out = await read_topic(broker, f"{t}.out", expect=results + 1, timeout_s=2, settle_s=0.3)
        assert len(out) == results and all(m.value is not None for m in out)
        dlq = await read_topic(broker, f"{t}.dlq", expect=dead + 1, timeout_s=2, settle_s=0.3)
        assert len(dlq) == dead
        offsets = await committed(broker, f"g-{t}", t)
        assert sum(c or 0 for c in offsets.values()) == len(values)  # skipped ones committed


async def test_order_none_groups_lengths_and_still_loses_nothing(
    broker: str, topic: str, tiny_model: Path
) -> None:
    n = 300
    values = [v for v in _values(n) if v is not None]
    await create_topics(broker, {topic: 2})
    await produce(broker, topic, values, keys=[b"key-%d" % (i % 5) for i in range(len(values))])
    cfg = load_config(None, **base_config(broker, tiny_model, topic, batching={"order": "none"}))
    async with RunningService(cfg) as svc:
        await svc.wait_done(len(values))
    out = await read_topic(broker, f"{topic}.out", expect=len(values), settle_s=0.3)
    assert sorted(orjson.loads(m.value)["id"] for m in out) == sorted(
        orjson.loads(v)["id"] for v in values
    )
