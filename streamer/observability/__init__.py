"""Observability: Prometheus metrics, OpenTelemetry tracing and trace context, the telemetry
hooks the stages call, logging and the HTTP server (probes, metrics, admin)."""
