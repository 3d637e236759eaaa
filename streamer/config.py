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
    ValidationInfo,
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
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] = "PLAIN"
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    sasl_password_file: Path | None = Field(
        default=None, description="file holding the SASL password (e.g. a mounted Secret)"
    )
    sasl_oauth_token_file: Path | None = Field(
        default=None,
        description="OAUTHBEARER: file holding the token, re-read at each token request (a "
        "rotated file is used from the next connection on)",
    )
    sasl_oauth_token_env: str | None = Field(
        default=None,
        description="OAUTHBEARER: name of an environment variable holding the token",
    )
    sasl_oauth_token_provider: str | None = Field(
        default=None,
        description="OAUTHBEARER: module:callable returning an aiokafka AbstractTokenProvider "
        "(a hook for cloud IAM signers such as MSK IAM)",
    )
    sasl_oauth_extensions: dict[str, str] = Field(
        default_factory=dict,
        description="OAUTHBEARER SASL extensions sent with a token from a file or variable "
        "(e.g. logicalCluster, identityPoolId)",
    )

    @model_validator(mode="after")
    def _check(self) -> SecurityConfig:
        oauth = [
            name
            for name in (
                "sasl_oauth_token_file",
                "sasl_oauth_token_env",
                "sasl_oauth_token_provider",
            )
            if getattr(self, name) is not None
        ]
        oauthbearer = self.protocol.startswith("SASL") and self.sasl_mechanism == "OAUTHBEARER"
        if oauthbearer and len(oauth) != 1:
            raise ValueError(
                "sasl_mechanism OAUTHBEARER needs exactly one token source: sasl_oauth_token_file "
                "(a mounted, rotated token), sasl_oauth_token_env or sasl_oauth_token_provider "
                "(module:callable)" + (f"; got {len(oauth)}: {oauth}" if oauth else "")
            )
        if (oauth or self.sasl_oauth_extensions) and not oauthbearer:
            raise ValueError(
                f"{oauth or ['sasl_oauth_extensions']} only apply with protocol SASL_SSL or "
                "SASL_PLAINTEXT and sasl_mechanism OAUTHBEARER"
            )
        if self.sasl_oauth_extensions and self.sasl_oauth_token_provider is not None:
            raise ValueError(
                "sasl_oauth_extensions go with sasl_oauth_token_file or sasl_oauth_token_env; "
                "a sasl_oauth_token_provider returns its own from extensions()"
            )
        if self.sasl_oauth_token_env is not None and not self.sasl_oauth_token_env.strip():
            raise ValueError("sasl_oauth_token_env: name an environment variable")
        if self.protocol.startswith("SASL") and not oauthbearer:
            if not self.sasl_username:
                raise ValueError(f"sasl_username is required when protocol is {self.protocol}")
            if self.sasl_password is None and self.sasl_password_file is None:
                raise ValueError(
                    "set sasl_password (e.g. STREAMER_KAFKA__SECURITY__SASL_PASSWORD) or "
                    "sasl_password_file when protocol is " + self.protocol
                )
        if self.ssl_keyfile is not None and self.ssl_certfile is None:
            raise ValueError(
                "ssl_keyfile is set but ssl_certfile is not: a client certificate needs both"
            )
        for name in (
            "ssl_cafile",
            "ssl_certfile",
            "ssl_keyfile",
            "sasl_password_file",
            "sasl_oauth_token_file",
        ):
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
    fetch_max_wait_ms: int = Field(
        default=500,
        ge=0,
        description="longest the broker may hold a fetch when no data is there (Kafka's "
        "fetch.max.wait.ms); the embedded broker holds it this long even when data arrives",
    )
    enable_idempotence: bool = Field(
        default=False,
        description="on for real clusters; the embedded broker has no producer ids",
    )
    linger_ms: int = Field(default=5, ge=0)
    request_timeout_ms: int = Field(default=40_000, ge=1_000)
    retry_backoff_ms: int = Field(default=200, ge=10)
    max_retry_backoff_ms: int = Field(default=10_000, ge=10)
    delivery_timeout_ms: int = Field(
        default=120_000,
        ge=1_000,
        description="how long a publish may keep retrying retriable errors (no leader, a "
        "missing topic) before the service stops with an error (Kafka's delivery.timeout.ms)",
    )
    commit_interval_ms: int = Field(default=200, ge=0)
    max_request_size: int = Field(default=1_048_576, ge=1024)
    batch_size: int = Field(
        default=262_144,
        ge=1024,
        description="producer record batch per partition, bytes (Kafka's batch.size; capped by "
        "max_request_size): 16 KB holds only 3 float-encoded embeddings",
    )
    compression_type: Literal["none", "gzip", "snappy", "lz4", "zstd"] = Field(
        default="none",
        description="codec of the record batches streamer produces (results, dead letters); "
        "the readers of those topics decompress them (lz4/snappy/zstd: cramjam)",
    )
    group_instance_id: str | None = Field(
        default=None,
        description="static group membership (KIP-345): a stable id per instance, e.g. the pod "
        "name; a restart within session_timeout_ms gets its partitions back without a "
        "rebalance. runtime.processes > 1 suffixes it with -<worker>",
    )
    partition_assignment_strategy: list[Literal["range", "roundrobin", "sticky"]] = Field(
        default_factory=lambda: ["roundrobin"],
        min_length=1,
        description="assignors in order of preference (a comma-separated string works too); "
        "every member of a group must share one",
    )
    consumer: dict[str, Any] = Field(
        default_factory=dict,
        description="pass-through AIOKafkaConsumer settings (checked against its parameters); "
        "keys streamer sets itself are refused with the key to use instead",
    )
    producer: dict[str, Any] = Field(
        default_factory=dict,
        description="pass-through AIOKafkaProducer settings, checked the same way",
    )
    security: SecurityConfig = SecurityConfig()

    @field_validator("compression_type")
    @classmethod
    def _codec(cls, value: str) -> str:
        from streamer.kafka.client import check_codec

        check_codec(value)
        return value

    @field_validator("group_instance_id")
    @classmethod
    def _instance_id(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("an empty id is no id: leave it unset, or use e.g. the pod name")
        return value

    @field_validator("partition_assignment_strategy", mode="before")
    @classmethod
    def _assignors(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list) and "cooperative-sticky" in value:
            raise ValueError(
                "cooperative-sticky (incremental rebalancing) is not implemented by aiokafka; "
                "use sticky: it keeps assignments across rebalances, revoking eagerly"
            )
        return value

    @field_validator("consumer", "producer")
    @classmethod
    def _passthrough(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        from streamer.kafka.client import check_passthrough

        return check_passthrough(str(info.field_name), value)

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
    on_tombstone: Literal["pass", "dlq", "skip"] = Field(
        default="pass",
        description="a record with a null value (a delete on a compacted topic): pass = a "
        "tombstone on the output topic (same key, null value, in order), dlq, or skip",
    )


class PinsConfig(_Section):
    """Pins for a model directory: per-file sha256 (hex) and/or the manifest hash.

    The manifest hash is the model's fingerprint (``streamer check-model PATH`` prints it):
    a sha256 over the names and bytes of the weight, config and tokenizer files.
    """

    files: dict[str, str] = Field(default_factory=dict, description="relative path -> sha256")
    manifest_sha256: str | None = None

    @field_validator("files")
    @classmethod
    def _hex(cls, value: dict[str, str]) -> dict[str, str]:
        for name, digest in value.items():
            d = digest.removeprefix("sha256:").lower()
            if len(d) != 64 or any(c not in "0123456789abcdef" for c in d):
                raise ValueError(f"pin for {name} is not a sha256 hex digest")
        return {k: v.removeprefix("sha256:").lower() for k, v in value.items()}


class RoutingConfig(_Section):
    """Which model serves a record: its header, else its topic, else the default."""

    header: str = "streamer.model"
    by_topic: dict[str, str] = Field(default_factory=dict, description="input topic -> model")
    default: str | None = Field(default=None, description="default: the first model")


class ModelConfig(_Section):
    name: str = "minilm"
    version: str = "unversioned"
    path: Path | None = Field(
        default=None,
        description="local directory with weights and tokenizer (no hub access), or "
        "models:/NAME/VERSION from an MLflow registry (mlflow extra)",
    )
    task: Literal["feature-extraction", "text-classification"] = "feature-extraction"
    pooling: Literal["mean", "cls", "max", "mean_sqrt_len", "weightedmean", "lasttoken"] | None = (
        Field(
            default=None,
            description="default: the folder's sentence-transformers Pooling module "
            "(modules.json), else mean; set, it overrides the folder (with a warning)",
        )
    )
    normalize: bool | None = Field(
        default=None,
        description="L2-normalise embeddings; default: whether the folder's modules.json has a "
        "Normalize module, else true; set, it overrides the folder (with a warning)",
    )
    prompt: str | None = Field(
        default=None,
        description="literal prefix prepended to every text before tokenization (e.g. "
        "'query: '); '' for none; excludes prompt_name",
    )
    prompt_name: str | None = Field(
        default=None,
        description="a prompt from the folder's config_sentence_transformers.json prompts; "
        "default: its default_prompt_name, if any",
    )
    return_all_scores: bool = False
    max_length: int = Field(default=256, ge=2)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    backend: Literal["torch", "onnxruntime", "openvino", "null"] = Field(
        default="torch",
        description="onnxruntime/openvino: exported once, cached on disk; null: a zero-cost "
        "stand-in whose outputs mean nothing, for measuring the pipeline (streamer bench)",
    )
    quantize: Literal["none", "int8"] = Field(
        default="none", description="int8: dynamic quantization of the linear layers (CPU)"
    )
    onnx_cache_dir: Path | None = Field(
        default=None, description="exported models; default $XDG_CACHE_HOME/streamer/onnx"
    )
    pins: PinsConfig = Field(
        default_factory=lambda: PinsConfig(),
        description="expected sha256 of files (or of the manifest): refuse to start on mismatch",
    )
    width_multiple: int | None = Field(
        default=None,
        ge=1,
        description="pad each batch's width up to a multiple of this (capped at max_length), "
        "so batches repeat a few shapes; default: 32 on CUDA, 1 (exact widths) on the CPU",
    )
    row_buckets: list[int] | None = Field(
        default=None,
        description="pad a batch of r rows with dummy rows up to the smallest bucket >= r "
        "(more rows than the largest bucket: no row padding); default: on CUDA the powers of "
        "two up to batching.max_batch_size plus max_batch_size itself, on the CPU none",
    )
    cuda_graphs: bool = Field(
        default=True,
        description="on CUDA (torch backend), capture one CUDA graph per warmed shape and "
        "replay it (other shapes run eagerly); ignored on the CPU",
    )
    allow_pickle: bool = Field(
        default=False,
        description="load pickle-based weights (.bin/.pt/.pth/.pkl) when a directory has no "
        "safetensors; unpickling can run arbitrary code, so only for trusted files",
    )

    @field_validator("name", "version")
    @classmethod
    def _no_at(cls, value: str) -> str:
        if "@" in value or not value.strip():
            raise ValueError(f"'{value}' must be non-empty and contain no '@' (name@version)")
        return value

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @field_validator("row_buckets")
    @classmethod
    def _row_buckets(cls, value: list[int] | None) -> list[int] | None:
        if value is None:
            return None
        if not value:
            raise ValueError(
                "an empty list buckets nothing; leave row_buckets unset for the default, or give "
                "row counts such as [8, 32, 64]"
            )
        bad = [b for b in value if b < 1]
        if bad:
            raise ValueError(f"row buckets must be at least 1 row, got {bad}")
        return sorted(set(value))  # order and repeats do not matter: a bucket is a bound

    @field_validator("path")
    @classmethod
    def _path(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        if str(value).startswith("models:"):  # MLflow registry: resolved when loading
            return value
        if not value.is_dir():
            raise ValueError(f"{value} is not a directory (weights + tokenizer files expected)")
        if not (value / "config.json").is_file():
            raise ValueError(f"{value} has no config.json: not a Hugging Face model directory")
        return value

    @model_validator(mode="after")
    def _one_prompt(self) -> ModelConfig:
        if self.prompt is not None and self.prompt_name is not None:
            raise ValueError(
                "set model.prompt (a literal prefix) or model.prompt_name (one of the folder's "
                "prompts), not both"
            )
        return self

    @model_validator(mode="after")
    def _backend_combo(self) -> ModelConfig:
        half = self.dtype in ("float16", "bfloat16")
        if self.quantize == "int8" and (self.device == "cuda" or half):
            raise ValueError(
                "quantize: int8 is dynamic quantization for CPUs; on CUDA use dtype float16 or "
                "bfloat16 with quantize: none (device auto picks the CPU for int8)"
            )
        ov_bf16 = self.backend == "openvino" and self.dtype == "bfloat16"
        if self.backend != "torch" and half and not ov_bf16:
            raise ValueError(
                f"backend {self.backend} runs the float32 export (openvino also bfloat16); "
                f"dtype {self.dtype} needs backend: torch"
            )
        if self.backend == "openvino" and (self.device == "cuda" or self.quantize == "int8"):
            raise ValueError(
                "backend openvino runs float32/bfloat16 on the CPU here; for int8 use backend "
                "onnxruntime or torch, for CUDA backend torch"
            )
        return self


class BatchingConfig(_Section):
    max_batch_size: int = Field(default=64, ge=1)
    max_wait_ms: float = Field(default=20, ge=0)
    max_batch_tokens: int = Field(
        default=8192, ge=2, description="padded tokens (rows x longest row) per batch"
    )
    max_in_flight: int = Field(
        default=1024,
        ge=1,
        description="records held between fetch and commit before pausing (a fetch takes whole "
        "record batches, so up to one batch over)",
    )
    oom_cooldown_s: float = Field(
        default=60, gt=0, description="how long a token budget lowered after OOM stays lowered"
    )
    order: Literal["partition", "none"] = Field(
        default="partition",
        description="partition: results leave in input order per partition (so per key); none: "
        "batches group similar lengths across the waiting records (less padding, faster, "
        "results of one key may overtake each other)",
    )


def usable_cores() -> list[int]:
    """The cores this process may run on (all of them where affinity is unknown)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


class BreakerConfig(_Section):
    """Stop, instead of dead-lettering everything, when most records fail the same way."""

    enabled: bool = True
    window_records: int = Field(
        default=500, ge=10, description="records (results and dead letters) the ratio is over"
    )
    failure_ratio: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="share of the window failing with one non-input reason that trips it",
    )


class RuntimeConfig(_Section):
    torch_threads: int | None = Field(default=None, ge=1, description="default: usable cores")
    torch_interop_threads: int = Field(default=1, ge=1)
    cpu_affinity: list[int] | None = None
    shutdown_grace_s: float = Field(default=25, gt=0)
    processes: int = Field(
        default=1,
        ge=1,
        description="worker processes in this pod, each its own group member (see docs/gpu.md)",
    )
    malloc_tuning: bool = Field(
        default=True,
        description="keep large buffers (produce requests, record batches) in glibc's heap "
        "instead of a fresh mmap each (see streamer/memory.py); MALLOC_* env vars win",
    )

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
    embedding_encoding: Literal["float", "base64-f16", "base64-f32"] = Field(
        default="float",
        description="float: JSON numbers; base64-f16/-f32: little-endian bytes (4x/2x smaller)",
    )


class HttpConfig(_Section):
    """The health/metrics HTTP server (``/healthz``, ``/readyz``, ``/metrics``)."""

    host: str = "0.0.0.0"
    port: int = Field(default=8080, ge=0, le=65535, description="0 turns the server off")
    stuck_after_s: float = Field(
        default=120, gt=0, description="/healthz fails when one batch runs longer than this"
    )
    admin: bool = Field(
        default=False,
        description="serve /admin/models and /admin/reload (load new model versions)",
    )
    admin_token: SecretStr | None = Field(
        default=None,
        description="bearer token the admin endpoints require (STREAMER_HTTP__ADMIN_TOKEN)",
    )
    admin_token_file: Path | None = Field(
        default=None, description="file holding the admin token (e.g. a mounted Secret)"
    )
    api: bool = Field(
        default=False,
        description="serve the inference API: /v1/embeddings (OpenAI), /embed, /predict and / "
        "(TEI, huggingface_hub), answered by the stream's models in its batches, first",
    )
    api_token: SecretStr | None = Field(
        default=None,
        description="bearer token the API requires when set (STREAMER_HTTP__API_TOKEN)",
    )
    api_token_file: Path | None = Field(
        default=None, description="file holding the API token (e.g. a mounted Secret)"
    )
    api_max_concurrent: int = Field(
        default=64, ge=1, description="API requests in flight; more get 429 with Retry-After"
    )
    api_max_inputs: int = Field(
        default=256, ge=1, description="texts in one API request; more get 413"
    )
    api_max_body_bytes: int = Field(
        default=1_048_576, ge=1024, description="largest API request body; larger get 413"
    )

    @model_validator(mode="after")
    def _admin_token(self) -> HttpConfig:
        # The admin endpoints load arbitrary model directories: never serve them unguarded.
        for key in ("admin_token", "api_token"):
            secret = getattr(self, key)
            if secret is not None and not secret.get_secret_value().strip():
                raise ValueError(f"{key} is empty: set a long random value, or leave it unset")
        for key in ("admin_token_file", "api_token_file"):
            if getattr(self, key) is None:
                continue
            path = Path(getattr(self, key))
            if not path.is_file():
                raise ValueError(f"{key}: file {path} does not exist")
            try:
                text = path.read_text()
            except OSError as exc:
                raise ValueError(f"{key}: cannot read {path} ({exc.strerror})") from None
            if not text.strip():
                raise ValueError(f"{key}: {path} is empty; put the token in it")
        if self.api and self.port == 0:
            raise ValueError(
                "http.api is true but http.port is 0 (the server is off): set http.port"
            )
        if self.admin and self.admin_token is None and self.admin_token_file is None:
            raise ValueError(
                "http.admin is true but no token guards /admin/*: set http.admin_token "
                "(e.g. STREAMER_HTTP__ADMIN_TOKEN) or http.admin_token_file (a mounted secret "
                "file), or set http.admin: false"
            )
        return self

    def token(self) -> str | None:
        """The admin token, read from its file when asked (a rotated file takes effect)."""
        if self.admin_token is not None:
            return self.admin_token.get_secret_value().strip()
        if self.admin_token_file is not None:
            return Path(self.admin_token_file).read_text().strip()
        return None

    def api_token_value(self) -> str | None:
        """The API token (None: the API is open), read from its file when asked."""
        if self.api_token is not None:
            return self.api_token.get_secret_value().strip()
        if self.api_token_file is not None:
            return Path(self.api_token_file).read_text().strip()
        return None


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
    breaker: BreakerConfig = BreakerConfig()
    model: ModelConfig = ModelConfig()
    models: list[ModelConfig] = Field(
        default_factory=list, description="several models; replaces `model` when given"
    )
    routing: RoutingConfig = RoutingConfig()
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

    @model_validator(mode="after")
    def _models(self) -> StreamerConfig:
        names = [m.name for m in self.model_list()]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"models: names must be unique, repeated: {dupes}")
        known = set(names)
        for topic, name in self.routing.by_topic.items():
            if name not in known:
                raise ValueError(f"routing.by_topic: {topic} -> '{name}' is not a model {names}")
        if self.routing.default is not None and self.routing.default not in known:
            raise ValueError(f"routing.default: '{self.routing.default}' is not a model {names}")
        n = self.runtime.processes
        if n > 1:
            cores = self.runtime.cpu_affinity or usable_cores()
            if n > len(cores):
                raise ValueError(
                    f"runtime.processes: {n} workers but {len(cores)} usable core(s) "
                    f"{sorted(cores)}; each worker needs a core of its own: lower it"
                )
            if self.http.admin:
                raise ValueError(
                    "http.admin: not served with runtime.processes > 1 (a swap would reach one "
                    "worker); change models with SIGHUP, which every worker re-reads"
                )
            if self.http.api:
                raise ValueError(
                    "http.api: not served with runtime.processes > 1 (each worker has its own "
                    "batches and port); run the API in a deployment with runtime.processes: 1"
                )
        return self

    def model_list(self) -> list[ModelConfig]:
        """The models this service loads: ``models`` when given, else ``model``."""
        return list(self.models) if self.models else [self.model]

    def require_model_path(self) -> Path | None:
        for i, m in enumerate(self.model_list()):
            if m.path is None and m.backend != "null":
                key = f"models.{i}.path" if self.models else "model.path"
                raise ConfigError(
                    f"{key}: not set. Point it at a local model directory "
                    "(config file or STREAMER_MODEL__PATH), e.g. the one `streamer demo` uses."
                )
        return self.model_list()[0].path


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


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """What is wrong and where, without PyYAML's snippet of the line (it may hold a secret)."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or "parse error"
    if mark is None:
        return str(problem)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"


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
            raise ConfigError(f"config file {p} is not valid YAML: {_yaml_problem(exc)}") from None
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
