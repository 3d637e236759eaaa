"""The stream's spans (only when tracing is on: with it off, nothing here runs).

* ``process {topic}`` CONSUMER span per batch, *linked* to every record's producer context,
  with ``tokenize``, ``inference`` and ``publish`` children;
* a ``process {topic}`` span per record (sampled by ``tracing.record_span_ratio``), a child of
  the record's incoming ``traceparent``, whose context the result carries on.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Link, Span, SpanKind

from streamer.observability.tracing import Tracing
from streamer.stream.batcher import Rows
from streamer.stream.records import Chunk, ModelInfo


def _text(value: bytes | None) -> str | None:
    return value.decode("latin-1") if value is not None else None


def record_span(tracing: Tracing, group_id: str, chunk: Chunk, i: int, context: Any) -> Span | None:
    """The per-record span (or None when not sampled); ``context`` is the record's
    ``(traceparent, tracestate)`` header bytes or None."""
    if not tracing.sample_record():
        return None
    m = chunk.messages[i]
    attrs: dict[str, Any] = {
        "messaging.system": "kafka",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": chunk.tp.topic,
        "messaging.consumer.group.name": group_id,
        "messaging.destination.partition.id": str(chunk.tp.partition),
        "messaging.kafka.offset": m.offset,
    }
    if m.key is not None:
        attrs["messaging.kafka.message.key"] = m.key.decode("utf-8", "replace")
    parent = tracing.extract(_text(context[0]), _text(context[1])) if context else None
    return tracing.start_span(
        f"process {chunk.tp.topic}",
        kind=SpanKind.CONSUMER,
        parent=parent,
        attributes=attrs,
        start_ns=chunk.fetched_ns or None,
    )


def batch_span(
    tracing: Tracing, group_id: str, batch: Rows, tokens: int, padded: int, info: ModelInfo
) -> Span:
    """``process {topic}``: CONSUMER, linked to each record's producer context (and to each
    HTTP request's SERVER span, for the API's rows: their chunks are requests, no topic)."""
    chunks = list(dict.fromkeys(batch.chunks.tolist()))
    topics = sorted({c.tp.topic for c in chunks if isinstance(c, Chunk)}) or ["http"]
    links = []
    for context in batch.trace.tolist():
        if context is None:
            continue
        ctx = tracing.extract(_text(context[0]), _text(context[1]))
        if ctx is not None:
            links.append(Link(trace.get_current_span(ctx).get_span_context()))
    attrs = {
        "messaging.system": "kafka",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": topics[0] if len(topics) == 1 else ",".join(topics),
        "messaging.consumer.group.name": group_id,
        "messaging.batch.message_count": len(batch),
        "streamer.model.name": info.name,
        "streamer.model.version": info.version,
        "streamer.model.fingerprint": info.fingerprint,
        "streamer.batch.tokens": tokens,
        "streamer.batch.padded_tokens": padded,
    }
    name = f"process {topics[0]}" if len(topics) == 1 else "process"
    start = min(c.fetched_ns for c in chunks) or None
    span = tracing.start_span(
        name, kind=SpanKind.CONSUMER, links=links, attributes=attrs, start_ns=start
    )
    t_start, t_end = int(batch.tokenize_ns[:, 0].min()), int(batch.tokenize_ns[:, 1].max())
    if t_start:
        tracing.start_span("tokenize", parent=span, start_ns=t_start).end(end_time=t_end)
    return span


def send_span(tracing: Tracing, out: Any, parent: Span | None) -> Span:
    """``send {topic}``: PRODUCER, one per published record batch (results and dead letters),
    ended when the broker acknowledges it."""
    attrs: dict[str, Any] = {
        "messaging.system": "kafka",
        "messaging.operation.type": "send",
        "messaging.operation.name": "send",
        "messaging.destination.name": out.topic,
        "messaging.destination.partition.id": str(out.partition),
        "messaging.batch.message_count": len(out),
        "streamer.dead_letters": bool(out.dead_letters),
    }
    return tracing.start_span(
        f"send {out.topic}", kind=SpanKind.PRODUCER, parent=parent, attributes=attrs
    )
