"""Secrets never leak: run with known secret values through the ways out, find none of them.

The secrets: the SASL password, the TLS key password and the admin token. The ways out:
``--check``, configuration errors, start-up failures (a wrong CA, a broker that refuses SASL),
logs at DEBUG (text and JSON), a crash traceback at exit, ``/healthz``, ``/readyz``,
``/metrics``, ``/admin/*`` answers and the DLQ records' headers. The embedded broker has no SASL,
so SASL is exercised up to the broker's refusal: the client is built with the password and
its failure is logged and retried.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from certs import issue, make_ca, tls_broker
from support import RunningService, base_config, json_records, produce, read_topic, service_process

from streamer.cli import main
from streamer.config import load_config
from streamer.kafka.broker import create_topics, free_port
from streamer.kafka.client import producer_kwargs

SASL_PASSWORD = "sasl-pw-Qx7rT2"
KEY_PASSWORD = "key-pw-Lm4vW9"
ADMIN_TOKEN = "admin-tok-Hc3kP8"
SECRETS = (SASL_PASSWORD, KEY_PASSWORD, ADMIN_TOKEN)
SECRET_ENV = {
    "STREAMER_KAFKA__SECURITY__SASL_PASSWORD": SASL_PASSWORD,
    "STREAMER_KAFKA__SECURITY__SSL_KEY_PASSWORD": KEY_PASSWORD,
    "STREAMER_HTTP__ADMIN_TOKEN": ADMIN_TOKEN,
}


def assert_no_secret(text: str | bytes, where: str) -> None:
    data = text.decode(errors="replace") if isinstance(text, bytes) else text
    for secret in SECRETS:
        assert secret not in data, f"a secret leaked into {where}"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    server_ca, client_ca, other = (make_ca(d, n) for n in ("server-ca", "client-ca", "other"))
    server, server_key = issue(server_ca, d, "server")
    client, client_key = issue(client_ca, d, "client", client=True, key_password=KEY_PASSWORD)
    return {
        "server_ca": server_ca.pem,
        "client_ca": client_ca.pem,
        "other_ca": other.pem,
        "server": server,
        "server_key": server_key,
        "client": client,
        "client_key": client_key,
    }


def secure(pki: dict[str, Path], cafile: str = "server_ca") -> dict[str, Any]:
    """SASL over mutual TLS; the passwords themselves come from the environment."""
    return {
        "protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_username": "streamer",
        "ssl_cafile": str(pki[cafile]),
        "ssl_certfile": str(pki["client"]),
        "ssl_keyfile": str(pki["client_key"]),
    }


def test_check_output_masks_every_secret(
    tiny_model: Path,
    pki: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for key, value in SECRET_ENV.items():
        monkeypatch.setenv(key, value)
    path = tmp_path / "secure.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "kafka": {"security": secure(pki)},
                "model": {"path": str(tiny_model)},
                "http": {"admin": True},
            }
        )
    )
    assert main(["run", "--config", str(path), "--check"]) == 0
    out = capsys.readouterr().out
    assert_no_secret(out, "streamer run --check")
    assert out.count('"**********"') == 3  # each secret is there, masked
    cfg = load_config(path)
    assert_no_secret(repr(cfg), "repr(config)")
    assert_no_secret(str(cfg.kafka.security), "str(kafka.security)")
    assert_no_secret(cfg.model_dump_json(), "the config as JSON")


BAD_CONFIGS = {  # case: (file, what the message must still say)
    # PyYAML quotes the offending line; the message must not
    "yaml syntax": (
        f'kafka:\n  security:\n    sasl_password: "{SASL_PASSWORD}\n    x: [\n',
        "not valid YAML: found unexpected end of stream at line 5",
    ),
    "yaml mapping": (
        f"http:\n  admin_token: {ADMIN_TOKEN}: x\n",
        "mapping values are not allowed here at line 2",
    ),
    "misspelled key": (
        f"kafka:\n  security:\n    sasl_passwrd: {SASL_PASSWORD}\n",
        "kafka.security.sasl_passwrd: unknown key",
    ),
    "wrong type": (
        f"kafka:\n  security:\n    ssl_key_password: [{KEY_PASSWORD}]\n",
        "kafka.security.ssl_key_password: Input should be a valid string",
    ),
    "wrong section": (
        f"http:\n  admin_token: {{nested: {ADMIN_TOKEN}}}\n  port: {ADMIN_TOKEN}\n",
        "http.port: Input should be a valid integer",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_config_errors_never_echo_secrets(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text, expected = BAD_CONFIGS[case]
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["run", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert expected in err and str(path) in err  # it still says what is wrong, and where
    assert_no_secret(err, f"the error for a bad config ({case})")


def test_environment_errors_never_echo_secrets(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("STREAMER_KAFKA__SECURITY", f'{{"sasl_password": "{SASL_PASSWORD}"')
    assert main(["run"]) == 2
    err = capsys.readouterr().err
    assert "STREAMER_KAFKA__SECURITY" in err or "environment" in err
    assert_no_secret(err, "the error for a bad environment variable")


async def wait_for_line(log: Path, proc: subprocess.Popen, marker: bytes) -> None:
    """Until ``marker`` is in the process's output (or it exits, which fails the test)."""
    while marker not in await asyncio.to_thread(log.read_bytes):
        assert proc.poll() is None, await asyncio.to_thread(log.read_text)
        await asyncio.sleep(0.2)


async def get(port: int, path: str, token: str | None = None) -> tuple[int, bytes, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}{path}", headers=headers) as resp:
            return resp.status, await resp.read(), str(dict(resp.headers))


async def test_failed_start_ups_print_no_secret(
    tmp_path: Path, tiny_model: Path, pki: dict[str, Path]
) -> None:
    async with tls_broker(
        tmp_path, pki["server"], pki["server_key"], client_ca=pki["client_ca"]
    ) as bootstrap:
        # 1. a CA that did not sign the broker's certificate: start-up fails, named, exit 1
        raw = base_config(bootstrap, tiny_model, "secrets-in", log={"level": "DEBUG"})
        raw["kafka"]["security"] = secure(pki, cafile="other_ca")
        raw["http"] = {"host": "127.0.0.1", "port": free_port(), "admin": True}
        config = tmp_path / "wrong-ca.yaml"
        config.write_text(yaml.safe_dump(raw))
        proc = service_process(config, env=SECRET_ENV)
        assert await asyncio.to_thread(proc.wait, 120) == 1
        out = config.with_suffix(".log").read_text()
        assert "fatal: TlsError" in out and "kafka.security.ssl_cafile" in out
        assert "certificate verify failed" in out
        assert "Traceback" not in out  # a message that says what to fix, not a stack
        assert_no_secret(out, "the output of a start-up that failed on the CA")

        # 2. TLS is right but the broker refuses SASL: retried (logged) until SIGTERM; the HTTP
        # server answers meanwhile. JSON logs this time.
        port = free_port()
        raw["kafka"]["security"] = secure(pki)
        raw["http"]["port"] = port
        raw["log"] = {"level": "DEBUG", "json_format": True}
        config = tmp_path / "sasl.yaml"
        config.write_text(yaml.safe_dump(raw))
        log = config.with_suffix(".log")
        proc = service_process(config, env=SECRET_ENV)
        try:
            await wait_for_line(log, proc, b"cannot reach Kafka")
            answers = [
                await get(port, "/healthz"),
                await get(port, "/readyz"),
                await get(port, "/metrics"),
                await get(port, "/admin/models"),
                await get(port, "/admin/models", token="not-the-token"),
                await get(port, "/admin/models", token=ADMIN_TOKEN),
            ]
            assert [a[0] for a in answers] == [200, 503, 200, 401, 401, 200]
            for status, body, headers in answers:
                assert_no_secret(body, f"an HTTP answer ({status})")
                assert_no_secret(headers, f"HTTP headers ({status})")
            await wait_for_line(log, proc, b"refused: wrong bearer token")
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(proc.wait, 60) == 0  # SIGTERM ends start-up too
        finally:
            proc.kill()
        out = log.read_text()
        assert "UnsupportedSaslMechanism" in out  # the SASL path really ran
        assert "/admin/models" in out and "127.0.0.1" in out
        assert_no_secret(out, "the output of a start-up refused by SASL")


async def test_a_running_service_leaks_no_secret(
    broker: str,
    topic: str,
    tiny_model: Path,
    pki: dict[str, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    await create_topics(broker, {topic: 1})
    port = free_port()
    raw = base_config(broker, tiny_model, topic)
    # the secrets are set though PLAINTEXT does not use them (the embedded broker has no SASL)
    raw["kafka"]["security"] = {
        "sasl_username": "streamer",
        "sasl_password": SASL_PASSWORD,
        "ssl_cafile": str(pki["server_ca"]),
        "ssl_certfile": str(pki["client"]),
        "ssl_keyfile": str(pki["client_key"]),
        "ssl_key_password": KEY_PASSWORD,
    }
    raw["http"] = {"host": "127.0.0.1", "port": port, "admin": True, "admin_token": ADMIN_TOKEN}
    cfg = load_config(None, **raw)
    values: list[bytes | None] = [*json_records(3), b"{not json", b'{"id": 9}']
    await produce(broker, topic, values, headers=[[("h", b"v")]] * len(values))
    async with RunningService(cfg) as svc:
        await svc.wait_done(len(values))
        answers = [
            await get(port, "/healthz"),
            await get(port, "/readyz"),
            await get(port, "/metrics"),
            await get(port, "/admin/models", token=ADMIN_TOKEN),
            await get(port, "/admin/models", token=ADMIN_TOKEN[:-1]),
        ]
        assert [a[0] for a in answers] == [200, 200, 200, 200, 401]
        for status, body, headers in answers:
            assert_no_secret(body, f"an HTTP answer ({status})")
            assert_no_secret(headers, f"HTTP headers ({status})")

        # a crash: a stage fails with a real client error (a SASL client the broker refuses)
        from aiokafka import AIOKafkaProducer

        sasl = load_config(
            None,
            kafka={
                "bootstrap_servers": broker,
                "security": {
                    "protocol": "SASL_PLAINTEXT",
                    "sasl_username": "streamer",
                    "sasl_password": SASL_PASSWORD,
                },
            },
        )
        producer = AIOKafkaProducer(**producer_kwargs(sasl.kafka))
        try:
            await producer.start()
        except Exception as exc:
            svc.service.pipeline.fail(RuntimeError(f"stage 'publish' failed: {exc}"), exc)
        finally:
            await producer.stop()
        assert await svc.stop() == 1
    dead = await read_topic(broker, f"{topic}.dlq", expect=2)
    assert len(dead) == 2
    for record in dead:
        assert_no_secret(repr(record.headers), "DLQ headers")
        assert_no_secret(record.value or b"", "a DLQ value")
    results = await read_topic(broker, f"{topic}.out", expect=3)
    for record in results:
        assert_no_secret(record.value, "a result")
    formatter = logging.Formatter("%(name)s %(message)s")  # with tracebacks, as logged
    formatted = "\n".join(formatter.format(r) for r in caplog.records)
    assert "Traceback" in formatted  # the crash was logged with its stack
    assert_no_secret(formatted, "the logs (the crash traceback included)")


def test_debug_logging_keeps_kafka_wire_logs_off(root_logging: None) -> None:
    """aiokafka logs every request at DEBUG, SASL PLAIN's (user, password) bytes included."""
    from streamer.observability.logs import setup_logging

    loggers = [logging.getLogger(n) for n in ("aiokafka", "kafka")]
    levels = [lg.level for lg in loggers]
    try:
        setup_logging("DEBUG")
        assert logging.getLogger("streamer").isEnabledFor(logging.DEBUG)
        assert not logging.getLogger("aiokafka.conn").isEnabledFor(logging.DEBUG)
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
