"""Connection settings shared by the consumer, the producer and the admin client.

Secrets (SASL password, key password) are resolved here, when a client is built, and never
logged: the config holds them as ``SecretStr`` or as file paths.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from streamer.config import KafkaConfig

log = logging.getLogger(__name__)


def backoff_s(cfg: KafkaConfig, attempt: int) -> float:
    """Seconds before retry ``attempt`` (0-based): ``retry_backoff_ms`` doubling, capped."""
    return min(cfg.retry_backoff_ms * 2 ** min(attempt, 16), cfg.max_retry_backoff_ms) / 1000


class Backoff:
    """Exponential backoff for reconnects: ``retry_backoff_ms`` doubling up to the maximum."""

    def __init__(self, cfg: KafkaConfig) -> None:
        self._cfg = cfg
        self._attempt = 0

    async def wait(self, what: str, exc: BaseException) -> None:
        delay = backoff_s(self._cfg, self._attempt)
        self._attempt += 1
        log.warning(
            "%s cannot reach Kafka at %s (%s); retrying in %.1fs",
            what,
            self._cfg.bootstrap_servers,
            exc,
            delay,
        )
        await asyncio.sleep(delay)


def client_kwargs(cfg: KafkaConfig) -> dict[str, Any]:
    sec = cfg.security
    kwargs: dict[str, Any] = {
        "bootstrap_servers": cfg.bootstrap_servers,
        "client_id": cfg.client_id,
        "request_timeout_ms": cfg.request_timeout_ms,
        "retry_backoff_ms": cfg.retry_backoff_ms,
        "security_protocol": sec.protocol,
    }
    if sec.protocol in ("SSL", "SASL_SSL"):
        from streamer.kafka.tls import ssl_context

        kwargs["ssl_context"] = ssl_context(sec)  # TlsError names the key when files are bad
    if sec.protocol.startswith("SASL"):
        kwargs["sasl_mechanism"] = sec.sasl_mechanism
        kwargs["sasl_plain_username"] = sec.sasl_username
        kwargs["sasl_plain_password"] = sec.password()
    return kwargs


def consumer_kwargs(cfg: KafkaConfig) -> dict[str, Any]:
    return {
        **client_kwargs(cfg),
        "group_id": cfg.group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": cfg.auto_offset_reset,
        "session_timeout_ms": cfg.session_timeout_ms,
        "heartbeat_interval_ms": cfg.heartbeat_interval_ms,
        "max_poll_interval_ms": cfg.max_poll_interval_ms,
        "rebalance_timeout_ms": cfg.max_poll_interval_ms,
        "isolation_level": "read_committed",
        "fetch_max_wait_ms": cfg.fetch_max_wait_ms,
    }


def producer_kwargs(cfg: KafkaConfig) -> dict[str, Any]:
    return {
        **client_kwargs(cfg),
        "acks": "all",
        "enable_idempotence": cfg.enable_idempotence,
        "linger_ms": cfg.linger_ms,
        "max_request_size": cfg.max_request_size,
        "max_batch_size": min(cfg.batch_size, cfg.max_request_size),
    }
