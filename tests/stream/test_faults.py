"""Faults that must stop the service loudly rather than drain the topic into the DLQ or hang:
a systemic model failure (the breaker), a send retried past ``kafka.delivery_timeout_ms``, a
broker gone at shutdown. Against the embedded broker over TCP."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from support import (
    POISON_WORD,
    RunningService,
    base_config,
    committed,
    json_records,
    produce,
    proxied_broker,
    read_topic,
)
from test_pipeline import PoisonModel  # fails on any batch holding the poison word

from streamer.config import load_config
from streamer.kafka.broker import create_topics
from streamer.models.hf import HFTextModel
from streamer.stream.pipeline import BreakerTripped

pytestmark = pytest.mark.integration


class BrokenModel(HFTextModel):
    """Once warm, every forward fails the same way, as after a sticky CUDA error."""

    broken = False

    def warmup(self, *args, **kwargs):
        seconds = super().warmup(*args, **kwargs)
        self.broken = True
        return seconds

    def forward(self, batch: list[list[int]]):
        if self.broken:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return super().forward(batch)


async def test_a_systemic_failure_trips_the_breaker_instead_of_emptying_the_topic(
    broker: str, topic: str, tiny_model: Path
) -> None:
    n = 3000
    await create_topics(broker, {topic: 2})
    await produce(broker, topic, json_records(n))
    cfg = load_config(
        None,
        **base_config(
            broker,
            tiny_model,
            topic,
            breaker={"window_records": 100, "failure_ratio": 0.5},
            batching={"max_in_flight": 256},
        ),
    )
    svc = RunningService(cfg, model_factory=BrokenModel)
    async with svc:
        failure = await asyncio.wait_for(svc.service.pipeline.wait_failed(), 60)
        ok, reason = svc.service._liveness()
    assert isinstance(failure, BreakerTripped)
    assert "InferenceFailed" in str(failure) and "illegal memory access" in str(failure)
    assert not ok and "breaker tripped" in reason
    assert svc.exit_code == 1
    dlq = await read_topic(broker, f"{topic}.dlq", expect=n, timeout_s=3, settle_s=0.5)
    assert 100 <= len(dlq) < n // 2  # a window (and what was in flight), not the topic
    offsets = await committed(broker, f"g-{topic}", topic)
    assert sum(c or 0 for c in offsets.values()) <= len(dlq)  # nothing committed unpublished


async def test_poison_at_one_percent_every_one_reaches_the_dlq_and_the_stream_goes_on(
    broker: str, topic: str, tiny_model: Path
) -> None:
    n = 2000
    values = json_records(n)
    poisoned = set(range(50, n, 100))  # 1 %
    for i in poisoned:
        values[i] = values[i].replace(b'"text":"', f'"text":"{POISON_WORD} '.encode())
    await create_topics(broker, {topic: 2})
    await produce(broker, topic, values)
    cfg = load_config(None, **base_config(broker, tiny_model, topic))
    async with RunningService(cfg, model_factory=PoisonModel) as svc:
        await svc.wait_done(n, timeout_s=120)
    assert svc.exit_code == 0 and svc.service.pipeline.failure is None
    dlq = await read_topic(broker, f"{topic}.dlq", expect=len(poisoned), settle_s=0.5)
    assert len(dlq) == len(poisoned)
    assert {dict(m.headers)["streamer.error.class"] for m in dlq} == {b"InferenceFailed"}
    results = await read_topic(broker, f"{topic}.out", expect=n - len(poisoned), settle_s=0.3)
    assert len(results) == n - len(poisoned)


async def test_a_send_retried_past_the_delivery_timeout_stops_the_service_loudly(
    tiny_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The broker goes away for good mid-stream: retries stop at kafka.delivery_timeout_ms, the
    service exits 1 with a message that names the key, and the shutdown (final commit, leaving
    the group) is bounded by the grace period instead of hanging on a broker that is gone."""
    async with proxied_broker() as (bootstrap, proxy):
        topic = "gone"
        await create_topics(bootstrap, {topic: 1})
        await produce(bootstrap, topic, json_records(400))
        cfg = load_config(
            None,
            **base_config(
                bootstrap,
                tiny_model,
                topic,
                kafka={
                    "request_timeout_ms": 4000,
                    "session_timeout_ms": 3000,
                    "delivery_timeout_ms": 1000,
                    "retry_backoff_ms": 50,
                    "max_retry_backoff_ms": 200,
                },
                runtime={"shutdown_grace_s": 5},
            ),
        )
        caplog.set_level("WARNING")
        svc = RunningService(cfg)
        async with svc:
            await svc.wait_done(50)
            await proxy.cut()  # and never back
            await produce_nothing()
            failure = await asyncio.wait_for(svc.service.pipeline.wait_failed(), 60)
        assert svc.exit_code == 1
        assert "kafka.delivery_timeout_ms=1000" in str(failure)
        # a shutdown step that needs the broker gave up, whichever way the client ended it
        # (timed out, failed, or cancelled inside aiokafka), and the shutdown went on
        gave_up = [
            r.getMessage()
            for r in caplog.records
            if r.name == "streamer.stream.pipeline" and r.getMessage().endswith("; going on")
        ]
        assert gave_up, caplog.text


async def produce_nothing() -> None:
    """Let the loop run while the cut takes effect."""
    await asyncio.sleep(0)


class SlowTokenizer(HFTextModel):
    """Decoding and tokenizing a fetch takes 1.5 s: fetches queue up in front of it."""

    def tokenize(self, texts: list[str]):
        import time

        time.sleep(1.5)
        return super().tokenize(texts)


async def test_fetches_still_queued_at_shutdown_are_given_up_not_waited_for(
    broker: str, topic: str, tiny_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGTERM with fetches queued in front of a slow prepare stage: they are given up at once
    (left uncommitted, whole), so the drain finishes within the grace period instead of
    running out of it (4 queued fetches x 1.5 s > 4 s); everything published is committed."""
    n = 3000
    await create_topics(broker, {topic: 4})
    await produce(broker, topic, json_records(n))
    cfg = load_config(
        None,
        **base_config(
            broker,
            tiny_model,
            topic,
            kafka={"fetch_max_records": 50},
            batching={"max_in_flight": 3000},
            runtime={"shutdown_grace_s": 4},
        ),
    )
    caplog.set_level("INFO")
    async with RunningService(cfg, model_factory=SlowTokenizer) as svc:
        await svc.wait_done(10)
        await asyncio.sleep(1.0)  # the fetch loop fills the prepare queue meanwhile
    assert svc.exit_code == 0
    assert "grace period ran out" not in caplog.text
    out = await read_topic(broker, f"{topic}.out", expect=n, timeout_s=3, settle_s=0.5)
    assert 0 < len(out) < n
    offsets = await committed(broker, f"g-{topic}", topic)
    assert sum(c or 0 for c in offsets.values()) == len(out)  # drained exactly
