"""Configuration: one frozen, validated object built once at start-up.

Sources, highest priority first: environment variables (``STREAMER_`` prefix, ``__`` between
levels, e.g. ``STREAMER_KAFKA__BOOTSTRAP_SERVERS``), then the YAML file, then the defaults below.
Nothing reads the environment at import time: :func:`load_config` does, when called.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

ENV_PREFIX = "STREAMER_"


class ConfigError(Exception):
    """Bad configuration: the message names each bad key and what is allowed."""


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SecurityConfig(_Section):
    """Kafka transport security. Secrets come from files or the environment, never the log."""

    protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    ssl_key_password: SecretStr | None = None
    ssl_check_hostname: bool = True
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    sasl_password_file: Path | None = Field(
        default=None, description="file holding the SASL password (e.g. a mounted Secret)"
    )

    @model_validator(mode="after")
    def _check(self) -> SecurityConfig:
        if self.protocol.startswith("SASL"):
            if not self.sasl_username:
                raise ValueError(f"sasl_username is required when protocol is {self.protocol}")
            if self.sasl_password is None and self.sasl_password_file is None:
                raise ValueError(
                    "set sasl_password (e.g. STREAMER_KAFKA__SECURITY__SASL_PASSWORD) or "
                    "sasl_password_file when protocol is " + self.protocol
                )
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile", "sasl_password_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name}: file {path} does not exist")
        return self

    def password(self) -> str | None:
        """The SASL password, read from its file at the moment it is needed."""
        if self.sasl_password is not None:
            return self.sasl_password.get_secret_value()
        if self.sasl_password_file is not None:
            return Path(self.sasl_password_file).read_text().strip()
        return None


class KafkaConfig(_Section):
    bootstrap_servers: str = "127.0.0.1:9092"
    group_id: str = "streamer"
    client_id: str = "streamer"
    input_topics: list[str] = Field(default_factory=lambda: ["texts"], min_length=1)
    output_topic: str = "texts.embeddings"
    dlq_topic: str = "texts.dlq"
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    session_timeout_ms: int = Field(default=30_000, ge=1_000)
    heartbeat_interval_ms: int = Field(default=3_000, ge=100)
    max_poll_interval_ms: int = Field(default=300_000, ge=1_000)
    fetch_max_records: int = Field(default=500, ge=1, description="records per getmany call")
    enable_idempotence: bool = Field(
        default=False,
        description="on for real clusters; the embedded broker has no producer ids",
    )
    linger_ms: int = Field(default=5, ge=0)
    request_timeout_ms: int = Field(default=40_000, ge=1_000)
    retry_backoff_ms: int = Field(default=200, ge=10)
    max_retry_backoff_ms: int = Field(default=10_000, ge=10)
    commit_interval_ms: int = Field(default=200, ge=0)
    max_request_size: int = Field(default=1_048_576, ge=1024)
    security: SecurityConfig = SecurityConfig()

    @field_validator("bootstrap_servers")
    @classmethod
    def _servers(cls, value: str) -> str:
        for server in value.split(","):
            host, _, port = server.strip().rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"'{server}' is not host:port (e.g. 127.0.0.1:9092)")
        return value

    @model_validator(mode="after")
    def _topics(self) -> KafkaConfig:
        loops = {self.output_topic, self.dlq_topic} & set(self.input_topics)
        if loops:
            raise ValueError(f"topic(s) {sorted(loops)} are both input and output: a loop")
        if self.heartbeat_interval_ms >= self.session_timeout_ms:
            raise ValueError("heartbeat_interval_ms must be below session_timeout_ms")
        if self.request_timeout_ms <= self.session_timeout_ms:
            raise ValueError(
                f"request_timeout_ms ({self.request_timeout_ms}) must exceed session_timeout_ms "
                f"({self.session_timeout_ms}): a group join waits that long and would time out"
            )
        return self


class InputConfig(_Section):
    format: Literal["json", "text"] = "json"
    text_field: str = Field(default="text", min_length=1, description="dotted path into JSON")
    id_field: str | None = "id"
    max_record_bytes: int = Field(default=1_000_000, ge=1)
    on_too_long: Literal["truncate", "dlq"] = Field(
        default="truncate", description="what to do with inputs longer than model.max_length"
    )


class ModelConfig(_Section):
    name: str = "minilm"
    version: str = "unversioned"
    path: Path | None = Field(
        default=None, description="local directory with weights and tokenizer (no hub access)"
    )
    task: Literal["feature-extraction", "text-classification"] = "feature-extraction"
    pooling: Literal["mean", "cls"] = "mean"
    normalize: bool = True
    return_all_scores: bool = False
    max_length: int = Field(default=256, ge=2)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"

    @field_validator("path")
    @classmethod
    def _path(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        if not value.is_dir():
            raise ValueError(f"{value} is not a directory (weights + tokenizer files expected)")
        if not (value / "config.json").is_file():
            raise ValueError(f"{value} has no config.json: not a Hugging Face model directory")
        return value


class BatchingConfig(_Section):
    max_batch_size: int = Field(default=64, ge=1)
    max_wait_ms: float = Field(default=20, ge=0)
    max_batch_tokens: int = Field(
        default=8192, ge=2, description="padded tokens (rows x longest row) per batch"
    )
    max_in_flight: int = Field(
        default=1024, ge=1, description="records held between fetch and commit before pausing"
    )


class RuntimeConfig(_Section):
    torch_threads: int | None = Field(default=None, ge=1, description="default: usable cores")
    torch_interop_threads: int = Field(default=1, ge=1)
    cpu_affinity: list[int] | None = None
    shutdown_grace_s: float = Field(default=25, gt=0)

    @field_validator("cpu_affinity")
    @classmethod
    def _affinity(cls, value: list[int] | None) -> list[int] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("an empty list pins to nothing; leave it unset instead")
        available = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
        missing = [c for c in value if available and c not in available]
        if missing:
            raise ValueError(f"cores {missing} are not available (usable: {sorted(available)})")
        return value


class OutputConfig(_Section):
    embedding_encoding: Literal["float"] = "float"


class HttpConfig(_Section):
    """The health/metrics HTTP server (``/healthz``, ``/readyz``, ``/metrics``)."""

    host: str = "0.0.0.0"
    port: int = Field(default=8080, ge=0, le=65535, description="0 turns the server off")
    stuck_after_s: float = Field(
        default=120, gt=0, description="/healthz fails when one batch runs longer than this"
    )


class TracingConfig(_Section):
    """OpenTelemetry. The standard OTEL_* variables apply; these keys override them."""

    enabled: bool | None = Field(
        default=None, description="default: on when OTEL_EXPORTER_OTLP_ENDPOINT is set"
    )
    endpoint: str | None = Field(default=None, description="OTLP base URL, e.g. http://otel:4318")
    protocol: Literal["grpc", "http/protobuf"] | None = None
    service_name: str | None = None
    record_span_ratio: float = Field(
        default=1.0, ge=0.0, le=1.0, description="share of records with their own span (0 = off)"
    )
    kafka_export: bool = Field(default=False, description="also export spans to a Kafka topic")
    kafka_topic: str = "otlp_spans"


class LogConfig(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_format: bool = False


class StreamerConfig(BaseSettings):
    """The whole service configuration (see README.md for every key)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        frozen=True,
        extra="forbid",
        case_sensitive=False,
    )

    kafka: KafkaConfig = KafkaConfig()
    input: InputConfig = InputConfig()
    model: ModelConfig = ModelConfig()
    batching: BatchingConfig = BatchingConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    output: OutputConfig = OutputConfig()
    http: HttpConfig = HttpConfig()
    tracing: TracingConfig = TracingConfig()
    log: LogConfig = LogConfig()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment overrides the file (init kwargs carry the YAML).
        return env_settings, init_settings

    def require_model_path(self) -> Path:
        if self.model.path is None:
            raise ConfigError(
                "model.path: not set. Point it at a local model directory "
                "(config file or STREAMER_MODEL__PATH), e.g. the one `streamer demo` uses."
            )
        return self.model.path


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; README.md lists every key)"
        elif e["type"] == "missing":
            msg = "required"
        lines.append(f"  {key}: {msg}")
    env_keys = sorted(k for k in os.environ if k.upper().startswith(ENV_PREFIX))
    if env_keys:
        lines.append("  (environment overrides in effect: " + ", ".join(env_keys) + ")")
    return "\n".join(lines)


def load_config(path: str | Path | None = None, **overrides: Any) -> StreamerConfig:
    """Read the YAML file (if any), apply environment overrides, validate once.

    Raises :class:`ConfigError` with a message that names each bad key.
    """
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        data = loaded
        source = str(p)
    _deep_merge(data, overrides)
    try:
        return StreamerConfig(**data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None
    except SettingsError as exc:  # e.g. STREAMER_HTTP=x: a section given as a plain value
        raise ConfigError(
            f"invalid configuration from the environment: {exc}. Set leaf keys such as "
            f"{ENV_PREFIX}HTTP__PORT=8080, with __ between levels."
        ) from None


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value
