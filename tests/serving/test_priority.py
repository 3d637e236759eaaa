"""The API under load, against a running service on the embedded broker: queries overtake a
backlog, overload is refused with 429, a hot swap answers each request with one version, and a
request's trace reaches the batch that served it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
from support import RunningService, base_config, build_tiny_model, json_records, produce

from streamer.config import load_config
from streamer.kafka.broker import create_topics, free_port
from streamer.models.hf import HFTextModel
from streamer.serving.requests import ApiRequest
from streamer.stream.batcher import Rows

pytestmark = pytest.mark.integration

ADMIN_TOKEN = "priority-admin-token"


class SlowModel(HFTextModel):
    """20 ms a batch: a backlog of 20,000 records lasts long enough to ask questions."""

    delay_s = 0.02

    def forward(self, batch: list[list[int]]) -> Any:
        time.sleep(self.delay_s)
        return super().forward(batch)


class VerySlowModel(SlowModel):
    delay_s = 0.5


def cosine(a: Any, b: Any) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


async def post(
    port: int, path: str, body: Any, headers: dict | None = None
) -> tuple[int, Any, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"http://127.0.0.1:{port}{path}", json=body, headers=headers) as r:
            return r.status, orjson.loads(await r.read()), r.headers


async def test_a_query_overtakes_a_backlog_of_twenty_thousand_records(
    broker: str, topic: str, tiny_model: Path
) -> None:
    await create_topics(broker, {topic: 2})
    n = 20_000
    await produce(broker, topic, json_records(n))
    port = free_port()
    cfg = load_config(
        None, **base_config(broker, tiny_model, topic, http={"port": port, "api": True})
    )
    svc = RunningService(cfg, model_factory=SlowModel)
    pipeline = svc.service.pipeline
    batcher = pipeline.batcher
    events: list[tuple[str, int]] = []  # ("query", stream rows waiting) / ("batch", rows)
    plain_put, plain_next = batcher.put, batcher.next_batch

    def put(rows: Rows, *, priority: bool = False) -> None:
        if priority:
            events.append(("query", len(batcher) - batcher.pending_priority))
        plain_put(rows, priority=priority)

    async def next_batch() -> Rows:
        batch = await plain_next()
        kind = "query batch" if isinstance(batch.chunks[0], ApiRequest) else "batch"
        events.append((kind, len(batch)))
        return batch

    batcher.put = put  # type: ignore[method-assign]
    batcher.next_batch = next_batch  # type: ignore[method-assign]
    committed_at_answer, done_at_answer = [], []
    async with svc:
        await svc.wait_done(500, timeout_s=120)  # the backlog is draining
        for i in range(5):
            status, body, _ = await post(
                port, "/v1/embeddings", {"model": "tiny", "input": f"query {i} hello world"}
            )
            assert status == 200 and body["model"] == "tiny@1"
            tracker = pipeline.tracker
            committed_at_answer.append(
                sum(tracker.committed(tp) or 0 for tp in tracker.partitions())
            )
            done_at_answer.append(sum(svc.service.telemetry.outputs()))
            await asyncio.sleep(0.05)
        waits = svc.service.telemetry.metrics.api_queue_wait.collect()[0].samples
    # every answer came while the backlog was far from drained
    assert max(committed_at_answer) < n / 2, committed_at_answer
    assert max(done_at_answer) < n / 2, done_at_answer
    # each query went into the very next batch, ahead of the stream rows already waiting; on
    # the CPU alone (no backlog rows to wait for), and the stream's batches went on full
    size = cfg.batching.max_batch_size
    assert not batcher.priority_fill
    queries = [i for i, e in enumerate(events) if e[0] == "query"]
    assert len(queries) == 5
    for i in queries:
        assert events[i][1] > 2 * size, events[i]  # FIFO would have waited for these
        after = next(e for e in events[i + 1 :] if e[0] != "query")
        assert after == ("query batch", 1), events[i : i + 3]
    assert ("batch", size) in events[queries[0] :]  # full stream batches in between
    count = next(s.value for s in waits if s.name.endswith("_count"))
    assert count == 5


async def test_overload_is_refused_with_429_and_retry_after(
    broker: str, topic: str, tiny_model: Path
) -> None:
    await create_topics(broker, {topic: 1})
    port = free_port()
    cfg = load_config(
        None,
        **base_config(
            broker, tiny_model, topic, http={"port": port, "api": True, "api_max_concurrent": 1}
        ),
    )
    async with RunningService(cfg, model_factory=VerySlowModel) as svc:
        answers = await asyncio.gather(
            *(post(port, "/embed", {"inputs": f"hello {i}"}) for i in range(4))
        )
        after = await post(port, "/embed", {"inputs": "hello again"})
        refused = svc.service.telemetry.metrics.api_requests.labels("embed", "429")._value.get()
    statuses = sorted(a[0] for a in answers)
    assert statuses == [200, 429, 429, 429]
    for status, body, headers in answers:
        if status == 429:
            assert headers["Retry-After"] == "1"
            assert "api_max_concurrent=1" in body["error"]["message"]
    assert after[0] == 200  # the slot is free again
    assert refused == 3


@pytest.fixture(scope="module")
def model_v2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """'Version 2' of the tiny model: same shape, other weights."""
    return build_tiny_model(tmp_path_factory.mktemp("v2") / "model", seed=9)


BURST = ["hello world", "the new release looks great", "support team answered emails"]


async def test_each_request_is_answered_by_one_version_during_a_hot_swap(
    broker: str, topic: str, tiny_model: Path, model_v2: Path
) -> None:
    await create_topics(broker, {topic: 1})
    port = free_port()
    http = {"port": port, "api": True, "admin": True, "admin_token": ADMIN_TOKEN}
    cfg = load_config(None, **base_config(broker, tiny_model, topic, http=http))
    ask = {"model": "tiny", "input": BURST, "encoding_format": "float"}
    answers: list[tuple[str, dict]] = []
    swapped = asyncio.Event()

    async def client() -> None:
        extra = 5
        while extra:
            status, body, headers = await post(port, "/v1/embeddings", ask)
            assert status == 200, body
            answers.append((headers["X-Streamer-Model-Version"], body))
            if swapped.is_set():
                extra -= 1

    async with RunningService(cfg):
        _, before, _ = await post(port, "/v1/embeddings", ask)
        burst = [asyncio.ensure_future(client()) for _ in range(4)]
        await asyncio.sleep(0.1)
        status, _, _ = await post(
            port,
            "/admin/models",
            {"name": "tiny", "version": "2", "path": str(model_v2)},
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        )
        assert status == 200
        swapped.set()
        await asyncio.gather(*burst)
        _, after, _ = await post(port, "/v1/embeddings", ask)
    refs = {
        "1": [d["embedding"] for d in before["data"]],
        "2": [d["embedding"] for d in after["data"]],
    }
    assert before["model"] == "tiny@1" and after["model"] == "tiny@2"
    for a, b in zip(refs["1"], refs["2"], strict=True):
        assert cosine(a, b) < 0.99  # the versions are told apart by their vectors
    assert {v for v, _ in answers} == {"1", "2"}
    for version, body in answers:
        assert body["model"] == f"tiny@{version}"  # header and body agree
        for i, item in enumerate(body["data"]):  # every vector from that one version
            assert cosine(item["embedding"], refs[version][i]) >= 0.9999


class OtlpReceiver:
    """Accepts OTLP/HTTP protobuf on /v1/traces and keeps every span."""

    def __init__(self) -> None:
        self.spans: list[PbSpan] = []
        self.port = free_port()
        self._runner: web.AppRunner | None = None

    async def _traces(self, request: web.Request) -> web.Response:
        req = ExportTraceServiceRequest.FromString(await request.read())
        for rs in req.resource_spans:
            for ss in rs.scope_spans:
                self.spans.extend(ss.spans)
        return web.Response(body=b"", content_type="application/x-protobuf")

    async def __aenter__(self) -> OtlpReceiver:
        app = web.Application()
        app.router.add_post("/v1/traces", self._traces)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


async def test_a_request_trace_is_continued_and_linked_from_its_batch(
    broker: str, topic: str, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await create_topics(broker, {topic: 1})
    trace_id, parent_id = "ab" * 16, "cd" * 8
    port = free_port()
    async with OtlpReceiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{receiver.port}")
        cfg = load_config(
            None, **base_config(broker, tiny_model, topic, http={"port": port, "api": True})
        )
        async with RunningService(cfg):
            status, _, _ = await post(
                port,
                "/embed",
                {"inputs": ["hello world", "new release"]},
                headers={"traceparent": f"00-{trace_id}-{parent_id}-01"},
            )
            assert status == 200
        spans = receiver.spans
    server = [s for s in spans if s.kind == PbSpan.SPAN_KIND_SERVER]
    assert len(server) == 1
    span = server[0]
    assert span.name == "POST /embed"
    assert span.trace_id.hex() == trace_id and span.parent_span_id.hex() == parent_id
    attrs = {a.key: a.value for a in span.attributes}
    assert attrs["http.response.status_code"].int_value == 200
    assert attrs["streamer.model.version"].string_value == "1"
    batches = [s for s in spans if s.kind == PbSpan.SPAN_KIND_CONSUMER]
    links = {(link.trace_id.hex(), link.span_id.hex()) for b in batches for link in b.links}
    assert (trace_id, span.span_id.hex()) in links
    inference = [s for s in spans if s.name == "inference"]
    assert inference  # the batch's own children, as for records
