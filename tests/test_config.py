"""Configuration: YAML + environment, validated once with messages that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamer.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_load() -> None:
    cfg = load_config(None)
    assert cfg.kafka.auto_offset_reset == "earliest"
    assert cfg.batching.max_batch_size == 64


def test_yaml_and_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = write(
        tmp_path, "kafka:\n  bootstrap_servers: a:1\n  group_id: g\nbatching:\n  max_wait_ms: 5\n"
    )
    monkeypatch.setenv("STREAMER_KAFKA__BOOTSTRAP_SERVERS", "b:2")
    monkeypatch.setenv("STREAMER_BATCHING__MAX_BATCH_SIZE", "8")
    cfg = load_config(p)
    assert cfg.kafka.bootstrap_servers == "b:2"  # env wins
    assert cfg.kafka.group_id == "g"  # file kept
    assert cfg.batching.max_batch_size == 8
    assert cfg.batching.max_wait_ms == 5


def test_config_is_frozen() -> None:
    cfg = load_config(None)
    with pytest.raises(Exception):  # noqa: B017 - pydantic raises ValidationError
        cfg.kafka.group_id = "x"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("kafka:\n  bootstrap_server: x:1\n", "kafka.bootstrap_server: unknown key"),
        ("input:\n  format: xml\n", "input.format: Input should be 'json' or 'text'"),
        ("batching:\n  max_batch_size: 0\n", "batching.max_batch_size"),
        ("kafka:\n  bootstrap_servers: nohost\n", "is not host:port"),
        ("model:\n  path: /does/not/exist\n", "model.path"),
        ("kafka:\n  input_topics: [a]\n  output_topic: a\n", "loop"),
        ("kafka:\n  security:\n    protocol: SASL_SSL\n", "sasl_username is required"),
        ("runtime:\n  cpu_affinity: [999]\n", "not available"),
        ("kafka:\n  request_timeout_ms: 5000\n", "must exceed session_timeout_ms"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert needle in str(info.value)


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "kafka: [unclosed\n"))


def test_secrets_are_never_printed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMER_KAFKA__SECURITY__PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("STREAMER_KAFKA__SECURITY__SASL_USERNAME", "u")
    monkeypatch.setenv("STREAMER_KAFKA__SECURITY__SASL_PASSWORD", "hunter2")
    cfg = load_config(None)
    assert "hunter2" not in repr(cfg)
    assert "hunter2" not in cfg.model_dump_json()
    assert cfg.kafka.security.password() == "hunter2"


def test_password_file(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    cfg = load_config(
        None,
        kafka={
            "security": {
                "protocol": "SASL_SSL",
                "sasl_username": "u",
                "sasl_mechanism": "SCRAM-SHA-512",
                "sasl_password_file": str(pw),
            }
        },
    )
    assert cfg.kafka.security.password() == "s3cret"


def test_shipped_configs_load(monkeypatch: pytest.MonkeyPatch, tiny_model: Path) -> None:
    files = sorted((REPO / "configs").glob("*.yaml"))
    assert files
    monkeypatch.setenv("STREAMER_MODEL__PATH", str(tiny_model))
    monkeypatch.setenv("STREAMER_KAFKA__SECURITY__SASL_PASSWORD", "from-a-secret")
    for f in files:
        load_config(f)


def test_environment_section_given_as_a_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMER_HTTP", "x")
    with pytest.raises(ConfigError, match="HTTP__PORT"):
        load_config(None)
