"""The command line: help that helps, config errors that say what to do, `streamer broker`."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from streamer.cli import main


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("run", "broker", "demo", "bench", "check-model"):
        assert command in out
    assert "STREAMER_KAFKA__BOOTSTRAP_SERVERS" in out


def test_run_check_prints_the_effective_config(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("STREAMER_MODEL__PATH", str(tiny_model))
    monkeypatch.setenv("STREAMER_KAFKA__SECURITY__SASL_PASSWORD", "hunter2")
    assert main(["run", "--config", "configs/secure.yaml", "--check"]) == 0
    out = capsys.readouterr().out
    assert '"protocol": "SASL_SSL"' in out
    assert "hunter2" not in out  # secrets are never printed


def test_bad_config_exits_2_with_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("batching:\n  max_batch_size: -1\n")
    assert main(["run", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "batching.max_batch_size" in err and "greater than or equal to 1" in err


def test_missing_model_path_says_what_to_set(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run"]) == 2
    assert "STREAMER_MODEL__PATH" in capsys.readouterr().err


def test_broker_command_prints_its_address_and_stops_on_sigterm() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamer", "broker", "--port", "0", "--topic", "a:2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(2)]
        assert lines[0].startswith("embedded broker ready: bootstrap servers 127.0.0.1:"), lines
        assert "a (2 partitions)" in lines[1], lines
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        proc.kill()
