"""W3C trace context (``traceparent``) helpers used when no tracer is configured.

With OpenTelemetry enabled the record span's own context goes into the result instead; these
helpers keep the user's trace going either way (same trace id, new span id).
"""

from __future__ import annotations

import re
import secrets

_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


def parse_traceparent(value: str | None) -> tuple[str, str, str] | None:
    """(trace_id, parent_span_id, flags) of a valid header, else None."""
    if not value:
        return None
    m = _TRACEPARENT.match(value.strip().lower())
    if not m or m.group(1) == "ff":
        return None
    trace_id, span_id, flags = m.group(2), m.group(3), m.group(4)
    if trace_id == "0" * 32 or span_id == "0" * 16:
        return None
    return trace_id, span_id, flags


def child_traceparent(value: str | None) -> str | None:
    """A traceparent for a new span in the same trace, or None when the input had none."""
    parsed = parse_traceparent(value)
    if parsed is None:
        return None
    trace_id, _, flags = parsed
    return f"00-{trace_id}-{secrets.token_hex(8)}-{flags}"
