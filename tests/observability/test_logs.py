"""Structured logs carry the current trace and span ids."""

from __future__ import annotations

import logging

import orjson
from opentelemetry.sdk.trace import TracerProvider

from streamer.observability.logs import setup_logging


def test_json_logs_carry_trace_and_span_ids(capsys) -> None:
    setup_logging("INFO", json_format=True)
    try:
        tracer = TracerProvider().get_tracer("t")
        with tracer.start_as_current_span("work") as span:
            logging.getLogger("streamer.test").info("inside %s", "a span")
        logging.getLogger("streamer.test").warning("outside")
        lines = [orjson.loads(x) for x in capsys.readouterr().err.strip().splitlines()]
        inside, outside = lines[-2], lines[-1]
        ctx = span.get_span_context()
        assert inside["message"] == "inside a span" and inside["level"] == "INFO"
        assert inside["trace_id"] == format(ctx.trace_id, "032x")
        assert inside["span_id"] == format(ctx.span_id, "016x")
        assert "trace_id" not in outside
    finally:
        logging.getLogger().handlers.clear()
