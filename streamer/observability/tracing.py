"""OpenTelemetry tracing after the messaging semantic conventions for Kafka.

* one ``process {topic}`` CONSUMER span per batch, *linked* to every record's producer context
  (a batch has many causes), with ``tokenize``, ``inference`` and ``publish`` children;
* one span per record (sampled by ``tracing.record_span_ratio``), a child of the record's
  incoming ``traceparent``; its context is what the result carries on, so the user's trace goes
  on through streamer.

Export is OTLP (gRPC or HTTP/protobuf) through a batch span processor, configured the standard
way (``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_EXPORTER_OTLP_PROTOCOL``, ``OTEL_SERVICE_NAME``,
``OTEL_TRACES_SAMPLER``…) or from the config file; setting the endpoint variable alone turns it
on. Optionally spans also go to a Kafka topic as OTLP protobuf, the format the OpenTelemetry
Collector's Kafka receiver reads (``encoding: otlp_proto``).

The provider belongs to the service instance (never the global one), so two services in one
process (tests) keep their spans apart.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from streamer import __version__
from streamer.config import TracingConfig

log = logging.getLogger(__name__)

_PROPAGATOR = TraceContextTextMapPropagator()
_ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


def _protocol(cfg: TracingConfig, env: Mapping[str, str]) -> str:
    return (
        cfg.protocol
        or env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    )


def _otlp_exporter(cfg: TracingConfig, env: Mapping[str, str]) -> SpanExporter:
    protocol = _protocol(cfg, env)
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=cfg.endpoint) if cfg.endpoint else OTLPSpanExporter()
    if protocol != "http/protobuf":
        raise ValueError(f"OTLP protocol '{protocol}' is not supported: use grpc or http/protobuf")
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpExporter,
    )

    if cfg.endpoint:  # a base URL, like OTEL_EXPORTER_OTLP_ENDPOINT
        return HttpExporter(endpoint=cfg.endpoint.rstrip("/") + "/v1/traces")
    return HttpExporter()


class KafkaSpanExporter(SpanExporter):
    """OTLP protobuf ``ExportTraceServiceRequest`` per export, produced to a Kafka topic.

    Runs on the batch processor's thread and hands the send to the service's event loop.
    """

    def __init__(
        self,
        topic: str,
        send: Callable[[str, bytes], Awaitable[Any]],
        loop: asyncio.AbstractEventLoop,
        timeout_s: float = 10.0,
    ) -> None:
        self._topic, self._send, self._loop, self._timeout = topic, send, loop, timeout_s

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

        data = encode_spans(spans).SerializeToString()
        try:
            fut = asyncio.run_coroutine_threadsafe(self._send(self._topic, data), self._loop)
            fut.result(self._timeout)
        except Exception as exc:
            log.warning("span export to Kafka topic %s failed: %s", self._topic, exc)
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


class Tracing:
    """Spans for one service instance; every method is a cheap no-op when disabled."""

    def __init__(self, cfg: TracingConfig, *, env: Mapping[str, str] | None = None) -> None:
        self.cfg = cfg
        env = os.environ if env is None else env
        endpoint_set = bool(cfg.endpoint) or any(env.get(v) for v in _ENDPOINT_VARS)
        # OTEL_TRACES_EXPORTER as the SDK reads it: otlp (default), console, none; a list
        exporters = {
            e.strip().lower()
            for e in env.get("OTEL_TRACES_EXPORTER", "otlp").split(",")
            if e.strip()
        }
        unknown = exporters - {"otlp", "console", "none"}
        if unknown:
            raise ValueError(
                f"OTEL_TRACES_EXPORTER={env.get('OTEL_TRACES_EXPORTER')}: {sorted(unknown)} not "
                "supported here; use otlp, console or none"
            )
        if "none" in exporters:
            exporters = set()
        self.console = "console" in exporters
        wanted = cfg.enabled if cfg.enabled is not None else (endpoint_set or self.console)
        self.otlp = bool(wanted) and "otlp" in exporters and (endpoint_set or not self.console)
        self.console = bool(wanted) and self.console
        self.enabled = self.otlp or self.console or cfg.kafka_export
        self._env = env
        self.provider: TracerProvider | None = None
        self.tracer: trace.Tracer = trace.NoOpTracer()
        self.record_ratio = cfg.record_span_ratio
        if not self.enabled:
            return
        name = cfg.service_name or env.get("OTEL_SERVICE_NAME") or "streamer"
        resource = Resource.create({SERVICE_NAME: name, "service.version": __version__})
        self.provider = TracerProvider(resource=resource)  # sampler from OTEL_TRACES_SAMPLER
        if self.otlp:
            self.provider.add_span_processor(BatchSpanProcessor(_otlp_exporter(cfg, env)))
        if self.console:
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor

            self.provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
        self.tracer = self.provider.get_tracer("streamer", __version__)

    def describe(self) -> str:
        if not self.enabled:
            return "tracing off (set OTEL_EXPORTER_OTLP_ENDPOINT to turn it on)"
        where = []
        if self.otlp:
            endpoint = self.cfg.endpoint or next(
                (self._env[v] for v in _ENDPOINT_VARS if self._env.get(v)), "default endpoint"
            )
            where.append(f"OTLP {_protocol(self.cfg, self._env)} to {endpoint}")
        if self.console:
            where.append("the console (OTEL_TRACES_EXPORTER=console)")
        if self.cfg.kafka_export:
            where.append(f"Kafka topic {self.cfg.kafka_topic}")
        return "tracing to " + " and ".join(where)

    def attach_kafka(
        self, send: Callable[[str, bytes], Awaitable[Any]], loop: asyncio.AbstractEventLoop
    ) -> None:
        if self.provider is not None and self.cfg.kafka_export:
            exporter = KafkaSpanExporter(self.cfg.kafka_topic, send, loop)
            self.provider.add_span_processor(BatchSpanProcessor(exporter))

    async def shutdown(self) -> None:
        """Flush every pending span (off the loop: the Kafka exporter needs the loop)."""
        if self.provider is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.provider.shutdown)

    # -- spans --------------------------------------------------------------------------------
    @staticmethod
    def extract(traceparent: str | None, tracestate: str | None) -> Context | None:
        if not traceparent:
            return None
        carrier = {"traceparent": traceparent}
        if tracestate:
            carrier["tracestate"] = tracestate
        ctx = _PROPAGATOR.extract(carrier)
        span_ctx = trace.get_current_span(ctx).get_span_context()
        return ctx if span_ctx.is_valid else None

    @staticmethod
    def inject(span: Span) -> tuple[str | None, str | None]:
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
        return carrier.get("traceparent"), carrier.get("tracestate")

    def start_span(
        self,
        name: str,
        *,
        kind: SpanKind = SpanKind.INTERNAL,
        parent: Span | Context | None = None,
        links: Sequence[Link] = (),
        attributes: Mapping[str, Any] | None = None,
        start_ns: int | None = None,
    ) -> Span:
        ctx = trace.set_span_in_context(parent) if isinstance(parent, Span) else parent
        return self.tracer.start_span(
            name,
            context=ctx,
            kind=kind,
            links=links,
            attributes=attributes,
            start_time=start_ns,
        )

    def sample_record(self) -> bool:
        return self.enabled and (self.record_ratio >= 1.0 or random.random() < self.record_ratio)

    @staticmethod
    def fail(span: Span, error_type: str, message: str) -> None:
        span.set_attribute("error.type", error_type)
        span.set_status(Status(StatusCode.ERROR, message))


class TraceIdsFilter(logging.Filter):
    """Puts the current span's trace and span ids on every log record (for JSON logs)."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            record.trace_id = format(ctx.trace_id, "032x")
            record.span_id = format(ctx.span_id, "016x")
        return True
