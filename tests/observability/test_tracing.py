"""Traces: a real OTLP/HTTP receiver decodes what the service exports (opentelemetry-proto)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
from support import RunningService, base_config, json_records, produce, read_topic

from streamer.config import load_config
from streamer.kafka.broker import create_topics, free_port

pytestmark = pytest.mark.integration

TRACE_IDS = [f"{i:02x}" * 16 for i in range(1, 6)]
PARENT_IDS = [f"{i + 16:02x}" * 8 for i in range(1, 6)]


class OtlpReceiver:
    """Accepts OTLP/HTTP protobuf on /v1/traces and keeps every span."""

    def __init__(self) -> None:
        self.spans: list[PbSpan] = []
        self.port = free_port()
        self._runner: web.AppRunner | None = None

    async def _traces(self, request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        req = ExportTraceServiceRequest.FromString(await request.read())
        for rs in req.resource_spans:
            attrs = {a.key: a.value.string_value for a in rs.resource.attributes}
            assert attrs["service.name"] == "streamer-test"
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


def attrs(span: PbSpan) -> dict:
    out = {}
    for a in span.attributes:
        v = a.value
        out[a.key] = (
            v.string_value
            if v.HasField("string_value")
            else (v.int_value if v.HasField("int_value") else v.bool_value)
        )
    return out


async def test_spans_follow_messaging_conventions_and_continue_the_trace(
    broker: str, topic: str, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await create_topics(broker, {topic: 1})
    values = json_records(5)
    values[4] = b"not json"  # one dead letter
    headers = [
        [("traceparent", f"00-{TRACE_IDS[i]}-{PARENT_IDS[i]}-01".encode())] for i in range(5)
    ]
    keys = [f"k{i}".encode() for i in range(5)]
    await produce(broker, topic, values, keys=keys, headers=headers)
    async with OtlpReceiver() as receiver:
        # the standard variables alone turn export on
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{receiver.port}")
        monkeypatch.setenv("OTEL_SERVICE_NAME", "streamer-test")
        cfg = load_config(
            None,
            **base_config(broker, tiny_model, topic, batching={"max_wait_ms": 300}),
        )
        async with RunningService(cfg) as svc:
            await svc.wait_done(5)
        # run() flushed the batch span processor before returning
        spans = receiver.spans
    results = await read_topic(broker, f"{topic}.out", expect=4)
    by_name: dict[str, list[PbSpan]] = {}
    for s in spans:
        by_name.setdefault(s.name, []).append(s)
    process = by_name[f"process {topic}"]
    batch_spans = [s for s in process if attrs(s).get("messaging.batch.message_count")]
    record_spans = [s for s in process if "messaging.kafka.offset" in attrs(s)]
    assert batch_spans and len(record_spans) == 5

    # batch span: CONSUMER, links (not a parent) to each producer context, conventions
    linked = set()
    for b in batch_spans:
        assert b.kind == PbSpan.SPAN_KIND_CONSUMER
        assert not b.parent_span_id
        a = attrs(b)
        assert a["messaging.system"] == "kafka"
        assert a["messaging.operation.type"] == "process"
        assert a["messaging.operation.name"] == "process"
        assert a["messaging.destination.name"] == topic
        assert a["messaging.consumer.group.name"] == f"g-{topic}"
        assert a["streamer.model.name"] == "tiny" and a["streamer.model.version"] == "1"
        assert a["streamer.model.fingerprint"].startswith("sha256:")
        assert a["streamer.batch.padded_tokens"] >= a["streamer.batch.tokens"] > 0
        for link in b.links:
            linked.add((link.trace_id.hex(), link.span_id.hex()))
        children = {s.name for s in spans if s.parent_span_id == b.span_id}
        assert {"tokenize", "inference", "publish"} <= children
        inference = next(
            s for s in spans if s.parent_span_id == b.span_id and s.name == "inference"
        )
        assert attrs(inference)["streamer.device"] == "cpu"
        assert attrs(inference)["streamer.dtype"] == "float32"
    assert linked == {(TRACE_IDS[i], PARENT_IDS[i]) for i in range(4)}

    # record spans: children of the incoming context, Kafka attributes
    by_offset = {attrs(s)["messaging.kafka.offset"]: s for s in record_spans}
    for i in range(5):
        s = by_offset[i]
        assert s.trace_id.hex() == TRACE_IDS[i]
        assert s.parent_span_id.hex() == PARENT_IDS[i]
        assert s.kind == PbSpan.SPAN_KIND_CONSUMER
        a = attrs(s)
        assert a["messaging.destination.partition.id"] == "0"
        assert a["messaging.kafka.message.key"] == f"k{i}"
    bad = by_offset[4]
    assert bad.status.code == bad.status.STATUS_CODE_ERROR
    assert attrs(bad)["error.type"] == "InvalidJson"

    # a PRODUCER span per published record batch, results and the dead letter alike
    sends = [s for s in spans if s.name.startswith("send ")]
    assert {s.name for s in sends} == {f"send {topic}.out", f"send {topic}.dlq"}
    for s in sends:
        a = attrs(s)
        assert s.kind == PbSpan.SPAN_KIND_PRODUCER
        assert a["messaging.system"] == "kafka" and a["messaging.operation.type"] == "send"
        assert a["messaging.destination.name"] == s.name.removeprefix("send ")
        assert a["messaging.batch.message_count"] >= 1
        assert a["streamer.dead_letters"] == s.name.endswith(".dlq")
    publish_ids = {s.span_id for s in spans if s.name == "publish"}
    result_sends = [s for s in sends if s.name.endswith(".out")]
    assert all(s.parent_span_id in publish_ids for s in result_sends)
    assert sum(attrs(s)["messaging.batch.message_count"] for s in result_sends) == 4

    # each result's traceparent is its record span: same trace, that span's id
    for m in results:
        offset = orjson.loads(m.value)["source"]["offset"]
        tp = dict(m.headers)["traceparent"].decode().split("-")
        assert tp[1] == TRACE_IDS[offset]
        assert tp[2] == by_offset[offset].span_id.hex()


async def test_spans_can_be_exported_to_a_kafka_topic(
    broker: str, topic: str, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    await create_topics(broker, {topic: 1, f"{topic}.spans": 1})
    await produce(broker, topic, json_records(3))
    cfg = load_config(
        None,
        **base_config(
            broker,
            tiny_model,
            topic,
            tracing={
                "kafka_export": True,
                "kafka_topic": f"{topic}.spans",
                "service_name": "streamer-kafka",
            },
        ),
    )
    async with RunningService(cfg) as svc:
        await svc.wait_done(3)
    msgs = await read_topic(broker, f"{topic}.spans", expect=1, settle_s=0.5)
    names = []
    for m in msgs:
        req = ExportTraceServiceRequest.FromString(m.value)  # otlp_proto encoding
        for rs in req.resource_spans:
            service = {a.key: a.value.string_value for a in rs.resource.attributes}
            assert service["service.name"] == "streamer-kafka"
            for ss in rs.scope_spans:
                names.extend(s.name for s in ss.spans)
    assert f"process {topic}" in names and "inference" in names


async def test_record_spans_can_be_switched_off(
    broker: str, topic: str, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await create_topics(broker, {topic: 1})
    tp = f"00-{TRACE_IDS[0]}-{PARENT_IDS[0]}-01"
    await produce(broker, topic, json_records(2), headers=[[("traceparent", tp.encode())]] * 2)
    async with OtlpReceiver() as receiver:
        monkeypatch.setenv("OTEL_SERVICE_NAME", "streamer-test")
        cfg = load_config(
            None,
            **base_config(
                broker,
                tiny_model,
                topic,
                tracing={"endpoint": f"http://127.0.0.1:{receiver.port}", "record_span_ratio": 0.0},
            ),
        )
        async with RunningService(cfg) as svc:
            await svc.wait_done(2)
        await asyncio.sleep(0)
        spans = receiver.spans
    assert spans  # batch spans still exported
    assert not [s for s in spans if "messaging.kafka.offset" in attrs(s)]
    out = await read_topic(broker, f"{topic}.out", expect=2)
    for m in out:  # the trace still goes on (new span id in the same trace)
        assert dict(m.headers)["traceparent"].decode().split("-")[1] == TRACE_IDS[0]


async def test_otlp_grpc_export(
    broker: str, topic: str, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    received: list[str] = []

    class Servicer(trace_service_pb2_grpc.TraceServiceServicer):
        async def Export(self, request, context):
            for rs in request.resource_spans:
                for ss in rs.scope_spans:
                    received.extend(s.name for s in ss.spans)
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
        await create_topics(broker, {topic: 1})
        await produce(broker, topic, json_records(3))
        cfg = load_config(None, **base_config(broker, tiny_model, topic))
        async with RunningService(cfg) as svc:
            assert "OTLP grpc" in svc.service.telemetry.tracing.describe()
            await svc.wait_done(3)
    finally:
        await server.stop(None)
    assert f"process {topic}" in received and "inference" in received


@pytest.mark.parametrize(
    ("env", "otlp", "console"),
    [
        (
            {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318"},
            False,
            False,
        ),
        ({"OTEL_TRACES_EXPORTER": "console"}, False, True),
        (
            {
                "OTEL_TRACES_EXPORTER": "otlp,console",
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318",
            },
            True,
            True,
        ),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318"}, True, False),
        ({}, False, False),
    ],
)
def test_otel_traces_exporter_values_are_honoured(env: dict, otlp: bool, console: bool) -> None:
    from streamer.config import TracingConfig
    from streamer.observability.tracing import Tracing

    t = Tracing(TracingConfig(), env=env)
    assert (t.otlp, t.console, t.enabled) == (otlp, console, otlp or console)
    if console:
        assert "console" in t.describe()


def test_an_unknown_traces_exporter_is_refused() -> None:
    from streamer.config import TracingConfig
    from streamer.observability.tracing import Tracing

    with pytest.raises(ValueError, match="OTEL_TRACES_EXPORTER=zipkin"):
        Tracing(TracingConfig(), env={"OTEL_TRACES_EXPORTER": "zipkin"})
