"""The API's keys: refused when they cannot work, the token never printed."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamer.config import ConfigError, load_config


def test_the_api_is_off_by_default_with_its_limits() -> None:
    http = load_config(None).http
    assert http.api is False
    assert (http.api_max_concurrent, http.api_max_inputs, http.api_max_body_bytes) == (
        64,
        256,
        1_048_576,
    )
    assert http.api_token_value() is None  # open unless a token is set


def test_the_token_is_a_secret_read_from_a_value_or_a_file(tmp_path: Path) -> None:
    cfg = load_config(None, http={"api": True, "api_token": "s3cret-api"})
    assert "s3cret-api" not in repr(cfg) and "s3cret-api" not in cfg.model_dump_json()
    assert cfg.http.api_token_value() == "s3cret-api"
    token_file = tmp_path / "token"
    token_file.write_text("from-a-file\n")
    cfg = load_config(None, http={"api": True, "api_token_file": str(token_file)})
    token_file.write_text("rotated\n")
    assert cfg.http.api_token_value() == "rotated"  # re-read per request


@pytest.mark.parametrize(
    ("http", "runtime", "message"),
    [
        ({"api": True, "api_token": "  "}, {}, "api_token is empty"),
        ({"api": True, "api_token_file": "/nonexistent/token"}, {}, "does not exist"),
        ({"api": True, "port": 0}, {}, "http.port is 0"),
        ({"api": True, "api_max_concurrent": 0}, {}, "api_max_concurrent"),
        ({"api": True}, {"processes": 2, "cpu_affinity": [0, 0]}, "runtime.processes: 1"),
    ],
)
def test_settings_that_cannot_work_stop_start_up(http: dict, runtime: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, http=http, runtime=runtime)
