"""Kafka over TLS: the client settings against a broker behind a TLS terminator (stunnel).

The embedded broker's own TLS and SASL did not work (see the broker notes), so TLS is
terminated in front of it, as the notes suggest; SASL is covered by the client-settings test.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from pathlib import Path

import orjson
import pytest
from support import RunningService, base_config, json_records

from streamer.config import load_config
from streamer.kafka.broker import EmbeddedBroker, free_port
from streamer.kafka.client import client_kwargs

pytestmark = pytest.mark.integration


def make_certs(d: Path) -> tuple[Path, Path, Path]:
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    )
    run(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    )
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    run(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        "server.pem",
    )
    return d / "ca.pem", d / "server.pem", d / "server.key"


async def test_service_talks_tls_to_the_broker(tmp_path: Path, tiny_model: Path) -> None:
    stunnel = shutil.which("stunnel4") or shutil.which("stunnel")
    assert stunnel, "stunnel4 is needed for the TLS test: apt-get install stunnel4 (.ci/run does)"
    ca, cert, key = make_certs(tmp_path)
    tls_port = free_port()
    broker = EmbeddedBroker(advertised_port=tls_port)  # every client must come through TLS
    broker.start()
    conf = tmp_path / "stunnel.conf"
    conf.write_text(
        f"foreground = yes\npid =\n[kafka]\naccept = 127.0.0.1:{tls_port}\n"
        f"connect = 127.0.0.1:{broker.port}\ncert = {cert}\nkey = {key}\n"
    )
    tunnel = subprocess.Popen(  # noqa: ASYNC220 - Popen returns at once
        [stunnel, str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        bootstrap = f"127.0.0.1:{tls_port}"
        for _ in range(50):
            try:
                _, w = await asyncio.open_connection("127.0.0.1", tls_port)
                w.close()
                break
            except OSError:
                await asyncio.sleep(0.1)
        raw = base_config(bootstrap, tiny_model, "tls-in")
        raw["kafka"]["security"] = {"protocol": "SSL", "ssl_cafile": str(ca)}
        cfg = load_config(None, **raw)
        kwargs = client_kwargs(cfg.kafka)
        assert kwargs["security_protocol"] == "SSL"
        assert kwargs["ssl_context"].check_hostname

        from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

        producer = AIOKafkaProducer(**client_kwargs(cfg.kafka))
        await producer.start()
        for value in json_records(20):
            await producer.send("tls-in", value)
        await producer.flush()
        await producer.stop()
        async with RunningService(cfg) as svc:
            await svc.wait_done(20)
        reader = AIOKafkaConsumer(
            "tls-in.out", auto_offset_reset="earliest", **client_kwargs(cfg.kafka)
        )
        await reader.start()
        got = []
        for _ in range(20):
            for msgs in (await reader.getmany(timeout_ms=500)).values():
                got.extend(orjson.loads(m.value) for m in msgs)
            if len(got) >= 20:
                break
        await reader.stop()
        assert len(got) == 20

        # a client that does not trust the broker's CA cannot talk to it
        from aiokafka.errors import KafkaConnectionError

        untrusting = AIOKafkaProducer(
            bootstrap_servers=bootstrap,
            security_protocol="SSL",
            ssl_context=ssl.create_default_context(),
        )
        with pytest.raises(KafkaConnectionError):
            await asyncio.wait_for(untrusting.start(), 30)
        await untrusting.stop()
    finally:
        tunnel.terminate()
        tunnel.wait(5)
        broker.stop()


def test_sasl_settings_reach_the_client(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("from-a-file\n")
    cfg = load_config(
        None,
        kafka={
            "security": {
                "protocol": "SASL_PLAINTEXT",
                "sasl_mechanism": "SCRAM-SHA-256",
                "sasl_username": "svc",
                "sasl_password_file": str(pw),
            }
        },
    )
    kwargs = client_kwargs(cfg.kafka)
    assert kwargs["security_protocol"] == "SASL_PLAINTEXT"
    assert kwargs["sasl_mechanism"] == "SCRAM-SHA-256"
    assert kwargs["sasl_plain_username"] == "svc"
    assert kwargs["sasl_plain_password"] == "from-a-file"
    assert "ssl_context" not in kwargs
