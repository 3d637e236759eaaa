"""The pipeline end to end against the embedded broker (real TCP) with tiny models."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest
from support import (
    POISON_WORD,
    RunningService,
    base_config,
    committed,
    json_records,
    produce,
    read_topic,
    wait_committed,
)

from streamer.config import load_config
from streamer.kafka.broker import create_topics
from streamer.models.hf import HFTextModel

pytestmark = pytest.mark.integration


async def test_every_record_gets_exactly_one_result(
    broker: str, topic: str, tiny_model: Path
) -> None:
    await create_topics(broker, {topic: 3})
    n = 300
    values = json_records(n)
    keys = [f"key-{i}".encode() for i in range(n)]
    await produce(broker, topic, values, keys=keys)
    cfg = load_config(None, **base_config(broker, tiny_model, topic))
    async with RunningService(cfg) as svc:
        await svc.wait_done(n)
    assert svc.exit_code == 0
    out = await read_topic(broker, f"{topic}.out", expect=n, settle_s=0.5)
    assert len(out) == n
    sources = set()
    for m in out:
        doc = orjson.loads(m.value)
        src = doc["source"]
        sources.add((src["partition"], src["offset"]))
        assert m.key == f"key-{doc['id']}".encode()  # key = input key; id copied
        assert doc["model"]["name"] == "tiny" and doc["model"]["version"] == "1"
        assert doc["model"]["fingerprint"].startswith("sha256:")
        assert len(doc["result"]["embedding"]) == 32
        assert src["topic"] == topic
    assert len(sources) == n  # one result per input record, none twice
    # committed = end of each partition: everything published was committed
    per_part: dict[int, int] = {}
    for p, _ in sources:
        per_part[p] = per_part.get(p, 0) + 1
    assert await committed(broker, f"g-{topic}", topic) == per_part


async def test_bad_records_go_to_the_dlq_and_good_ones_flow(
    broker: str, topic: str, tiny_model: Path
) -> None:
    await create_topics(broker, {topic: 1})
    bad = {
        b"{not json": "InvalidJson",
        b"[1, 2, 3]": "NotAnObject",
        b'{"id": 1}': "MissingText",
        b'{"text": 42}': "TextNotAString",
        b'{"text": ""}': "EmptyText",
        b"\xff\xfe\xfa": "InvalidUtf8",
        b'{"text": "' + b"x" * 3000 + b'"}': "RecordTooLarge",
    }
    good = json_records(20)
    values = [*good[:10], *bad, *good[10:]]
    headers = [[("custom", b"kept")] for _ in values]
    await produce(
        broker, topic, values, keys=[b"k%d" % i for i in range(len(values))], headers=headers
    )
    cfg = load_config(
        None, **base_config(broker, tiny_model, topic, input={"max_record_bytes": 2000})
    )
    async with RunningService(cfg) as svc:
        await svc.wait_done(len(values))
    results = await read_topic(broker, f"{topic}.out", expect=20, settle_s=0.3)
    dlq = await read_topic(broker, f"{topic}.dlq", expect=len(bad), settle_s=0.3)
    assert len(results) == 20
    assert len(dlq) == len(bad)
    seen = {}
    for m in dlq:
        h = {k: v.decode() for k, v in m.headers}
        assert h["custom"] == "kept"  # original headers unchanged
        assert h["streamer.error.stage"] == "decode"
        assert h["streamer.source.topic"] == topic
        assert h["streamer.source.partition"] == "0"
        offset = int(h["streamer.source.offset"])
        assert values[offset] == m.value  # value unchanged
        assert m.key == b"k%d" % offset  # key unchanged
        assert h["streamer.error.message"]
        seen[m.value] = h["streamer.error.class"]
    assert seen == bad
    dead = svc.service.telemetry.metrics.dead_lettered
    assert dead.labels(topic, "InvalidJson")._value.get() == 1


async def test_trace_context_continues(broker: str, topic: str, tiny_model: Path) -> None:
    await create_topics(broker, {topic: 1})
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    tp = f"00-{trace}-00f067aa0ba902b7-01"
    await produce(
        broker,
        topic,
        json_records(3),
        headers=[[("traceparent", tp.encode()), ("tracestate", b"vendor=x")], [], []],
    )
    cfg = load_config(None, **base_config(broker, tiny_model, topic))
    async with RunningService(cfg) as svc:
        await svc.wait_done(3)
    out = await read_topic(broker, f"{topic}.out", expect=3)
    by_offset = {orjson.loads(m.value)["source"]["offset"]: dict(m.headers) for m in out}
    parent = by_offset[0]["traceparent"].decode()
    assert parent.split("-")[1] == trace  # same trace
    assert parent.split("-")[2] != "00f067aa0ba902b7"  # a new span
    assert by_offset[0]["tracestate"] == b"vendor=x"
    assert "traceparent" not in by_offset[1]


class PoisonModel(HFTextModel):
    """Fails on any batch holding the poison token: the batch must be split to find it."""

    def load(self) -> None:
        super().load()
        self.poison_id = self._backend.token_to_id(POISON_WORD)

    def forward(self, batch: list[list[int]]):
        if any(self.poison_id in row for row in batch):
            raise RuntimeError("poisoned input")
        return super().forward(batch)


async def test_inference_failure_dead_letters_only_the_culprit(
    broker: str, topic: str, tiny_model: Path
) -> None:
    await create_topics(broker, {topic: 1})
    values = json_records(30)
    values[13] = orjson.dumps({"id": 13, "text": f"hello {POISON_WORD} world"})
    await produce(broker, topic, values)
    cfg = load_config(
        None,
        **base_config(
            broker, tiny_model, topic, batching={"max_batch_size": 32, "max_wait_ms": 200}
        ),
    )
    async with RunningService(cfg, model_factory=PoisonModel) as svc:
        await svc.wait_done(30)
    results = await read_topic(broker, f"{topic}.out", expect=29, settle_s=0.3)
    dlq = await read_topic(broker, f"{topic}.dlq", expect=1, settle_s=0.3)
    assert len(results) == 29
    assert len(dlq) == 1
    h = {k: v.decode() for k, v in dlq[0].headers}
    assert h["streamer.error.class"] == "InferenceFailed"
    assert h["streamer.error.stage"] == "inference"
    assert h["streamer.source.offset"] == "13"
    assert "poisoned input" in h["streamer.error.message"]


async def test_classification_results(broker: str, topic: str, tiny_classifier: Path) -> None:
    await create_topics(broker, {topic: 1})
    await produce(broker, topic, json_records(5))
    cfg = load_config(
        None,
        **base_config(
            broker,
            tiny_classifier,
            topic,
            model={"task": "text-classification", "return_all_scores": True},
        ),
    )
    async with RunningService(cfg) as svc:
        await svc.wait_done(5)
    out = await read_topic(broker, f"{topic}.out", expect=5)
    for m in out:
        res = orjson.loads(m.value)["result"]
        assert res["label"] in ("negative", "positive")
        assert 0.5 <= res["score"] <= 1.0
        assert abs(sum(res["scores"].values()) - 1.0) < 1e-5
        assert res["scores"][res["label"]] == pytest.approx(res["score"])


async def test_flood_keeps_in_flight_bounded(broker: str, topic: str, tiny_model: Path) -> None:
    await create_topics(broker, {topic: 2})
    n = 4000
    await produce(broker, topic, json_records(n))
    limit = 64
    cfg = load_config(
        None, **base_config(broker, tiny_model, topic, batching={"max_in_flight": limit})
    )
    peak = 0
    paused_seen = False
    svc = RunningService(cfg)
    tracker = svc.service.pipeline.tracker
    consumer = svc.service.pipeline.consumer

    def sample(*_: object) -> None:
        nonlocal peak, paused_seen
        peak = max(peak, tracker.in_flight)
        paused_seen = paused_seen or consumer.paused

    svc.service.telemetry.subscribe(sample)
    orig_fetched = svc.service.telemetry.fetched

    def fetched(*args):  # sample right after each fetch, when in-flight is highest
        orig_fetched(*args)
        sample()

    svc.service.telemetry.fetched = fetched  # type: ignore[method-assign]
    largest = 0  # records in the largest record batch fetched: a fetch takes whole batches
    orig_fetch = consumer.fetch

    async def fetch(*args, **kw):
        nonlocal largest
        out = await orig_fetch(*args, **kw)
        largest = max([largest] + [b.count for v in out.values() for b in v])
        return out

    consumer.fetch = fetch  # type: ignore[method-assign]
    async with svc:
        await svc.wait_done(n, timeout_s=120)
    assert svc.service.telemetry.outputs() == (n, 0)
    assert 0 < peak <= limit + largest, (peak, largest)
    assert largest < n / 4  # the producer made several batches: the bound above is a bound
    assert paused_seen


class SlowModel(HFTextModel):
    """The tiny model is too fast to see two members share work: 30 ms per batch."""

    def forward(self, batch: list[list[int]]):
        import time

        time.sleep(0.03)
        return super().forward(batch)


async def test_two_consumers_share_partitions_and_lose_nothing_when_one_leaves(
    broker: str, topic: str, tiny_model: Path
) -> None:
    await create_topics(broker, {topic: 4})
    n = 600
    await produce(broker, topic, json_records(n))
    cfg = load_config(
        None,
        **base_config(
            broker, tiny_model, topic, batching={"max_in_flight": 32, "max_batch_size": 8}
        ),
    )
    a = RunningService(cfg, model_factory=SlowModel)
    b = RunningService(cfg, model_factory=SlowModel)
    await a.__aenter__()
    await b.__aenter__()
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while loop.time() < deadline:
            pa = a.service.pipeline.consumer.assignment()
            pb = b.service.pipeline.consumer.assignment()
            if pa and pb:
                break
            await asyncio.sleep(0.1)
        assert pa and pb and not set(pa) & set(pb)  # shared, disjoint
        assert len(pa) + len(pb) == 4
        await b.wait_done(20)
        await b.stop()  # one leaves mid-stream; the other takes over its partitions
        done_b = b.service.telemetry.outputs()
        # until the group has committed every record (counting a's outputs would stop too
        # early if it redoes a few of b's: at-least-once; records b gave up on at its drain
        # are a's to do)
        await wait_committed(broker, f"g-{topic}", topic, n)
    finally:
        await a.stop()
    out = await read_topic(broker, f"{topic}.out", expect=n, settle_s=0.5)
    sources = {
        (orjson.loads(m.value)["source"]["partition"], orjson.loads(m.value)["source"]["offset"])
        for m in out
    }
    assert len(sources) == n  # nothing lost
    assert done_b[0] > 0 and a.service.telemetry.outputs()[0] > 0


async def test_too_long_inputs_can_go_to_the_dlq(broker: str, topic: str, tiny_model: Path) -> None:
    await create_topics(broker, {topic: 1})
    long_text = " ".join(["hello"] * 100)
    await produce(broker, topic, [orjson.dumps({"text": long_text}), *json_records(3)])
    cfg = load_config(
        None,
        **base_config(
            broker, tiny_model, topic, input={"on_too_long": "dlq"}, model={"max_length": 16}
        ),
    )
    async with RunningService(cfg) as svc:
        await svc.wait_done(4)
    dlq = await read_topic(broker, f"{topic}.dlq", expect=1)
    h = {k: v.decode() for k, v in dlq[0].headers}
    assert h["streamer.error.class"] == "TextTooLong"
    assert h["streamer.error.stage"] == "tokenize"
    assert "max_length=16" in h["streamer.error.message"]
    assert svc.service.telemetry.outputs()[0] == 3


async def test_broker_outage_is_retried_and_nothing_is_committed_ahead(
    tmp_path: Path, tiny_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Cut every connection mid-stream with a TCP proxy, restore it, and lose nothing."""
    from support import proxied_broker

    async with proxied_broker() as (bootstrap, proxy):
        topic = "outage"
        await create_topics(bootstrap, {topic: 2})
        n = 3000
        await produce(bootstrap, topic, json_records(n))
        cfg = load_config(
            None,
            **base_config(
                bootstrap,
                tiny_model,
                topic,
                kafka={
                    "request_timeout_ms": 4000,
                    "session_timeout_ms": 3000,
                    "retry_backoff_ms": 50,
                    "max_retry_backoff_ms": 500,
                },
                batching={"max_in_flight": 128},
            ),
        )
        caplog.set_level("WARNING")
        async with RunningService(cfg, model_factory=SlowModel) as svc:
            await svc.wait_done(200)
            await proxy.cut()
            published_at_cut = svc.service.telemetry.outputs()[0]
            await asyncio.sleep(3)  # the outage
            # nothing can be acknowledged while the broker is away
            assert svc.service.telemetry.outputs()[0] <= published_at_cut + 128
            await proxy.start()
            await svc.wait_done(n, timeout_s=120)
        out = await read_topic(bootstrap, f"{topic}.out", expect=n, settle_s=0.5)
        assert len({(m.partition, orjson.loads(m.value)["source"]["offset"]) for m in out}) <= n
        srcs = {
            (
                orjson.loads(m.value)["source"]["partition"],
                orjson.loads(m.value)["source"]["offset"],
            )
            for m in out
        }
        assert len(srcs) == n  # nothing lost
        offsets = await committed(bootstrap, f"g-{topic}", topic)
        assert sum(c or 0 for c in offsets.values()) == n
        assert any(
            "retrying" in r.getMessage()
            or "Unable to" in r.getMessage()
            or "failed" in r.getMessage()
            for r in caplog.records
        )


class SmallMemoryModel(HFTextModel):
    """Raises CUDA's out-of-memory error for batches over 300 padded tokens (on CPU)."""

    def forward(self, batch: list[list[int]]):
        import torch

        if len(batch) * max(len(r) for r in batch) > 300:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return super().forward(batch)


async def test_out_of_memory_splits_lowers_the_budget_and_restores_it(
    broker: str, topic: str, tiny_model: Path
) -> None:
    await create_topics(broker, {topic: 1})
    n = 300
    await produce(broker, topic, json_records(n, words=12))
    cfg = load_config(
        None,
        **base_config(
            broker,
            tiny_model,
            topic,
            batching={
                "max_batch_size": 64,
                "max_batch_tokens": 2048,
                "max_wait_ms": 100,
                "oom_cooldown_s": 1.0,
            },
        ),
    )
    async with RunningService(cfg, model_factory=SmallMemoryModel) as svc:
        await svc.wait_done(n)
        batcher = svc.service.pipeline.batcher
        metrics = svc.service.telemetry.metrics
        assert metrics.oom._value.get() > 0  # reported
        lowered = batcher.max_batch_tokens
        assert lowered < 2048  # lowered for a while ...
        for _ in range(50):
            if batcher.max_batch_tokens == 2048:
                break
            await asyncio.sleep(0.1)
        assert batcher.max_batch_tokens == 2048  # ... then restored
    assert svc.service.telemetry.outputs() == (n, 0)  # the stream went on, whole


async def test_keyless_results_overflowing_a_record_batch_move_on_to_other_partitions(
    broker: str, topic: str, tiny_model: Path
) -> None:
    """Keyless inputs, record batches of ~3 results (kafka.max_request_size 2 KB): a batch's
    results move on from one output partition to the next as each record batch fills, as
    Kafka's sticky partitioner does, and every result arrives once."""
    await create_topics(broker, {topic: 1, f"{topic}.out": 4})
    n = 64
    await produce(broker, topic, json_records(n))  # no keys
    cfg = load_config(
        None, **base_config(broker, tiny_model, topic, kafka={"max_request_size": 2048})
    )
    async with RunningService(cfg) as svc:
        await svc.wait_done(n)
    assert svc.exit_code == 0
    out = await read_topic(broker, f"{topic}.out", expect=n, settle_s=0.5)
    assert sorted(orjson.loads(m.value)["id"] for m in out) == list(range(n))
    assert all(m.key is None for m in out)
    assert len({m.partition for m in out}) == 4  # not one sticky partition per batch
