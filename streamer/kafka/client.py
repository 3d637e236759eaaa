"""Connection settings shared by the consumer, the producer and the admin client.

Secrets (SASL password, key password, OAUTHBEARER tokens) are resolved here, when a client is
built, and never logged: the config holds them as ``SecretStr``, file paths or variable names.

``kafka.consumer`` / ``kafka.producer`` pass any other AIOKafkaConsumer/AIOKafkaProducer keyword
through unchanged. They are checked against the client's own signature (``inspect.signature``),
so a typo fails at start-up with the list of valid keys. A key streamer sets itself is refused,
never silently overridden: either a curated ``kafka.*`` key owns it (validated with the others,
shown by ``--check``), or it would break a guarantee (offsets committed only after the output is
acknowledged by all in-sync replicas), and the message says which.
"""

from __future__ import annotations

import asyncio
import difflib
import functools
import inspect
import logging
from typing import Any

from pydantic import TypeAdapter, ValidationError

from streamer.config import KafkaConfig
from streamer.kafka.tls import TLS_PROTOCOLS, check_tls

log = logging.getLogger(__name__)


def backoff_s(cfg: KafkaConfig, attempt: int) -> float:
    """Seconds before retry ``attempt`` (0-based): ``retry_backoff_ms`` doubling, capped."""
    return min(cfg.retry_backoff_ms * 2 ** min(attempt, 16), cfg.max_retry_backoff_ms) / 1000


class Backoff:
    """Exponential backoff for reconnects: ``retry_backoff_ms`` doubling up to the maximum.

    Over TLS, each wait ends with the start-up TLS check again until one server passes it:
    aiokafka reports a refused certificate as an unreachable broker, so a certificate problem
    met only after the first check could not reach a server (a broker or TLS proxy that starts
    after us) would otherwise be retried forever with no reason given. The check raises
    :class:`~streamer.kafka.tls.TlsError`, which names the key to fix.
    """

    def __init__(self, cfg: KafkaConfig) -> None:
        self._cfg = cfg
        self._attempt = 0
        self._tls_verified = False

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
        if self._cfg.security.protocol in TLS_PROTOCOLS and not self._tls_verified:
            self._tls_verified = bool(await check_tls(self._cfg))


# -- compression ----------------------------------------------------------------------------------
CODECS = ("none", "gzip", "snappy", "lz4", "zstd")


def check_codec(codec: str) -> None:
    """Raise ValueError (what to install) when aiokafka cannot compress with ``codec`` here."""
    if codec in ("none", "gzip"):
        return
    from aiokafka import codec as codecs

    if not getattr(codecs, f"has_{codec}")():
        raise ValueError(
            f"{codec} needs the cramjam package, which aiokafka uses for lz4, snappy and zstd: "
            "pip install cramjam (a dependency of streamer; reinstall it), or choose gzip/none"
        )


# -- pass-through settings ------------------------------------------------------------------------
_RAW_BYTES = "the pipeline works on raw bytes (input.format decodes them)"
_NO_TXN = (
    "the publisher sends its own non-transactional record batches (offsets are committed after "
    "acknowledgement: at-least-once, not exactly-once)"
)
_SHARED_OWN = {
    "loop": "not a setting (the running event loop is used)",
    "bootstrap_servers": "use kafka.bootstrap_servers",
    "client_id": "use kafka.client_id",
    "request_timeout_ms": "use kafka.request_timeout_ms",
    "retry_backoff_ms": "use kafka.retry_backoff_ms",
    "api_version": "deprecated by aiokafka (versions are negotiated per connection)",
    "security_protocol": "use kafka.security.protocol",
    "ssl_context": "use kafka.security.ssl_* (streamer builds and checks the SSL context)",
    "sasl_mechanism": "use kafka.security.sasl_mechanism",
    "sasl_plain_username": "use kafka.security.sasl_username",
    "sasl_plain_password": "use kafka.security.sasl_password or sasl_password_file",
    "sasl_oauth_token_provider": "use kafka.security.sasl_oauth_token_provider (module:callable)",
}
OWN: dict[str, dict[str, str]] = {
    "consumer": {
        **_SHARED_OWN,
        "topics": "use kafka.input_topics",
        "group_id": "use kafka.group_id",
        "group_instance_id": "use kafka.group_instance_id",
        "partition_assignment_strategy": "use kafka.partition_assignment_strategy",
        "auto_offset_reset": "use kafka.auto_offset_reset",
        "session_timeout_ms": "use kafka.session_timeout_ms",
        "heartbeat_interval_ms": "use kafka.heartbeat_interval_ms",
        "max_poll_interval_ms": "use kafka.max_poll_interval_ms",
        "rebalance_timeout_ms": "set to kafka.max_poll_interval_ms (a revoke may drain that long)",
        "fetch_max_wait_ms": "use kafka.fetch_max_wait_ms",
        "max_poll_records": "use kafka.fetch_max_records",
        "enable_auto_commit": "always false: streamer commits an offset only once the "
        "input's result or dead letter is acknowledged; auto-commit would commit records not "
        "yet published, lost if the process dies",
        "auto_commit_interval_ms": "auto-commit is off; kafka.commit_interval_ms paces "
        "streamer's own commits",
        "isolation_level": "always read_committed, so aborted transactional input is "
        "never processed",
        "key_deserializer": _RAW_BYTES,
        "value_deserializer": _RAW_BYTES,
    },
    "producer": {
        **_SHARED_OWN,
        "acks": "always all: an input offset is committed once its output is "
        "acknowledged; with acks 0 or 1 an acknowledged output can still be lost with its "
        "leader, after its input was committed",
        "enable_idempotence": "use kafka.enable_idempotence",
        "linger_ms": "use kafka.linger_ms",
        "max_request_size": "use kafka.max_request_size",
        "max_batch_size": "use kafka.batch_size",
        "compression_type": "use kafka.compression_type",
        "partitioner": "results are partitioned by their key (murmur2, as Kafka's own "
        "producer) when they are built, off the event loop",
        "transactional_id": _NO_TXN,
        "transaction_timeout_ms": _NO_TXN,
        "key_serializer": _RAW_BYTES,
        "value_serializer": _RAW_BYTES,
    },
}
# Parameters whose aiokafka default is None: the type a value must have.
_NONE_DEFAULT_TYPES: dict[str, type] = {"client_rack": str, "sasl_kerberos_domain_name": str}


@functools.cache
def client_parameters(kind: str) -> dict[str, inspect.Parameter]:
    """The keyword parameters of AIOKafkaConsumer (``kind="consumer"``) or AIOKafkaProducer."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    cls = AIOKafkaConsumer if kind == "consumer" else AIOKafkaProducer
    return {
        name: p
        for name, p in inspect.signature(cls).parameters.items()
        if p.kind is not inspect.Parameter.VAR_POSITIONAL
    }


def passthrough_keys(kind: str) -> list[str]:
    """The keys ``kafka.<kind>`` accepts: the client's parameters streamer does not set."""
    return sorted(set(client_parameters(kind)) - set(OWN[kind]))


def check_passthrough(kind: str, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` checked against the client's signature and coerced to its parameters' types
    (so ``STREAMER_KAFKA__CONSUMER__FETCH_MAX_BYTES=1000`` becomes an int). ValueError names
    each bad key and what to do instead."""
    params = client_parameters(kind)
    cls = "AIOKafkaConsumer" if kind == "consumer" else "AIOKafkaProducer"
    problems: list[str] = []
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key in OWN[kind]:
            problems.append(f"{key}: refused, streamer sets it itself ({OWN[kind][key]})")
            continue
        if key not in params:
            close = difflib.get_close_matches(key, list(params), n=1)
            problems.append(
                f"{key}: not a parameter of aiokafka's {cls}"
                + (f" (did you mean {close[0]}?)" if close else "")
                + "; valid keys: "
                + ", ".join(passthrough_keys(kind))
            )
            continue
        default = params[key].default
        want = _NONE_DEFAULT_TYPES.get(key) if default is None else type(default)
        if want is None:
            problems.append(f"{key}: aiokafka gives it no default to check a value against")
            continue
        if want is int and isinstance(value, bool):
            problems.append(f"{key}: expects an integer, got {value!r}")
            continue
        try:
            out[key] = TypeAdapter(want).validate_python(value)
        except ValidationError:
            problems.append(f"{key}: expects {want.__name__} (like its default), got {value!r}")
    if problems:
        raise ValueError("; ".join(problems))
    return out


# -- the clients' keyword arguments ---------------------------------------------------------------
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
        if sec.sasl_mechanism == "OAUTHBEARER":
            from streamer.kafka.oauth import token_provider

            # ConfigError names the key when the file, variable or hook is not usable
            kwargs["sasl_oauth_token_provider"] = token_provider(sec)
        else:
            kwargs["sasl_plain_username"] = sec.sasl_username
            kwargs["sasl_plain_password"] = sec.password()
    return kwargs


def assignors(names: list[str]) -> tuple[type, ...]:
    """aiokafka's assignor classes for ``kafka.partition_assignment_strategy`` names."""
    from aiokafka.coordinator.assignors.range import RangePartitionAssignor
    from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
    from aiokafka.coordinator.assignors.sticky.sticky_assignor import StickyPartitionAssignor

    by_name: dict[str, type] = {
        "range": RangePartitionAssignor,
        "roundrobin": RoundRobinPartitionAssignor,
        "sticky": StickyPartitionAssignor,
    }
    return tuple(by_name[n] for n in dict.fromkeys(names))


def consumer_kwargs(cfg: KafkaConfig) -> dict[str, Any]:
    kwargs = {
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
        "partition_assignment_strategy": assignors(cfg.partition_assignment_strategy),
    }
    if cfg.group_instance_id is not None:
        kwargs["group_instance_id"] = cfg.group_instance_id
    return {**kwargs, **cfg.consumer}  # disjoint: check_passthrough refuses streamer's keys


def producer_kwargs(cfg: KafkaConfig) -> dict[str, Any]:
    kwargs = {
        **client_kwargs(cfg),
        "acks": "all",
        "enable_idempotence": cfg.enable_idempotence,
        "linger_ms": cfg.linger_ms,
        "max_request_size": cfg.max_request_size,
        "max_batch_size": min(cfg.batch_size, cfg.max_request_size),
        "compression_type": None if cfg.compression_type == "none" else cfg.compression_type,
    }
    return {**kwargs, **cfg.producer}
