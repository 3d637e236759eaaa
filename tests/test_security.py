"""Kafka over TLS: the client settings against a broker behind a TLS terminator (stunnel).

The embedded broker's own TLS and SASL did not work (see the broker notes), so TLS is
terminated in front of it, as the notes suggest; SASL is covered by the client-settings test.
Mutual TLS: stunnel demands a client certificate signed by a client CA; certificates (expired
ones too) are made in the test by tests/certs.py.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import ssl
import subprocess
from pathlib import Path

import orjson
import pytest
from certs import issue, make_ca, tls_broker
from support import RunningService, base_config, json_records

from streamer.app import Service
from streamer.config import KafkaConfig, StreamerConfig, load_config
from streamer.kafka.broker import EmbeddedBroker, free_port
from streamer.kafka.client import client_kwargs
from streamer.kafka.tls import TlsError, check_tls

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


# -- mutual TLS through stunnel, and start-up errors that name the problem ---------------------
KEY_PASSWORD = "client-key-passphrase-71c"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A server CA, a client CA, a CA nobody trusts, and certificates they signed."""
    d = tmp_path_factory.mktemp("pki")
    server_ca, client_ca, stranger = (make_ca(d, n) for n in ("server-ca", "client-ca", "other"))
    files = {"server_ca": server_ca.pem, "client_ca": client_ca.pem, "other_ca": stranger.pem}
    files["server"], files["server_key"] = issue(server_ca, d, "server")
    files["expired_server"], files["expired_server_key"] = issue(
        server_ca, d, "server-expired", expired=True
    )
    files["elsewhere_server"], files["elsewhere_server_key"] = issue(
        server_ca, d, "server-elsewhere", names=("kafka.example.internal",)
    )
    files["client"], files["client_key"] = issue(
        client_ca, d, "client", client=True, key_password=KEY_PASSWORD
    )
    files["expired_client"], files["expired_client_key"] = issue(
        client_ca, d, "client-expired", client=True, expired=True
    )
    files["stranger_client"], files["stranger_client_key"] = issue(
        stranger, d, "client-stranger", client=True
    )
    return files


def mtls(pki: dict[str, Path], client: str = "client", **extra: object) -> dict[str, object]:
    sec: dict[str, object] = {
        "protocol": "SSL",
        "ssl_cafile": str(pki["server_ca"]),
        "ssl_certfile": str(pki[client]),
        "ssl_keyfile": str(pki[f"{client}_key"]),
    }
    if client == "client":
        sec["ssl_key_password"] = KEY_PASSWORD
    return {**sec, **extra}


def kafka(bootstrap: str, security: dict[str, object]) -> KafkaConfig:
    return load_config(None, kafka={"bootstrap_servers": bootstrap, "security": security}).kafka


async def test_mutual_tls_consumes_and_produces(
    tmp_path: Path, tiny_model: Path, pki: dict[str, Path]
) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.errors import KafkaConnectionError

    async with tls_broker(
        tmp_path, pki["server"], pki["server_key"], client_ca=pki["client_ca"]
    ) as bootstrap:
        raw = base_config(bootstrap, tiny_model, "mtls-in")
        raw["kafka"]["security"] = mtls(pki)  # the client key is encrypted: ssl_key_password
        cfg = load_config(None, **raw)
        ctx = client_kwargs(cfg.kafka)["ssl_context"]
        assert ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED  # on by default
        assert await check_tls(cfg.kafka) == [bootstrap]

        producer = AIOKafkaProducer(**client_kwargs(cfg.kafka))
        await producer.start()
        for value in json_records(20):
            await producer.send("mtls-in", value)
        await producer.flush()
        await producer.stop()
        async with RunningService(cfg) as svc:
            await svc.wait_done(20)
        reader = AIOKafkaConsumer(
            "mtls-in.out", auto_offset_reset="earliest", **client_kwargs(cfg.kafka)
        )
        await reader.start()
        got = []
        for _ in range(40):
            for msgs in (await reader.getmany(timeout_ms=500)).values():
                got.extend(orjson.loads(m.value) for m in msgs)
            if len(got) >= 20:
                break
        await reader.stop()
        assert sorted(d["id"] for d in got) == list(range(20))

        # the same CA but no client certificate: the broker (stunnel) refuses the connection
        no_cert = kafka(bootstrap, {"protocol": "SSL", "ssl_cafile": str(pki["server_ca"])})
        with pytest.raises(TlsError, match="requires a client certificate") as info:
            await check_tls(no_cert)
        assert "kafka.security.ssl_certfile" in str(info.value)
        anonymous = AIOKafkaProducer(**client_kwargs(no_cert))
        with pytest.raises(KafkaConnectionError):
            await asyncio.wait_for(anonymous.start(), 30)
        await anonymous.stop()

        # a client certificate from a CA the broker does not trust
        with pytest.raises(TlsError, match="does not accept our client certificate"):
            await check_tls(kafka(bootstrap, mtls(pki, "stranger_client")))


async def start_fails(cfg: StreamerConfig) -> str:
    """Start a service that must fail at start-up; the error's message."""
    service = Service(cfg)
    try:
        with pytest.raises(TlsError) as info:
            await asyncio.wait_for(service.start(), 60)
    finally:
        await service.close()
    return str(info.value)


async def test_tls_start_up_errors_name_the_problem_and_the_key(
    tmp_path: Path, tiny_model: Path, pki: dict[str, Path]
) -> None:
    async with tls_broker(
        tmp_path, pki["server"], pki["server_key"], client_ca=pki["client_ca"]
    ) as bootstrap:
        raw = base_config(bootstrap, tiny_model, "tls-errors")
        raw["kafka"]["security"] = mtls(pki, ssl_cafile=str(pki["other_ca"]))
        msg = await start_fails(load_config(None, **raw))
        assert "certificate verify failed" in msg and "kafka.security.ssl_cafile" in msg
        assert "not signed by a CA" in msg and str(pki["other_ca"]) in msg

        raw["kafka"]["security"] = mtls(pki, "expired_client")
        msg = await start_fails(load_config(None, **raw))
        assert "kafka.security.ssl_certfile" in msg and "certificate has expired" in msg
        assert str(pki["expired_client"]) in msg

        raw["kafka"]["security"] = mtls(pki, ssl_key_password="not-the-passphrase")
        msg = await start_fails(load_config(None, **raw))
        assert "ssl_key_password" in msg and "not-the-passphrase" not in msg

        # the host name is checked by default: "localhost" is in the certificate, so it passes
        by_name = bootstrap.replace("127.0.0.1", "localhost")
        assert await check_tls(kafka(by_name, mtls(pki))) == [by_name]

    async with tls_broker(tmp_path, pki["expired_server"], pki["expired_server_key"]) as bootstrap:
        raw = base_config(bootstrap, tiny_model, "tls-expired")
        raw["kafka"]["security"] = {"protocol": "SSL", "ssl_cafile": str(pki["server_ca"])}
        msg = await start_fails(load_config(None, **raw))
        assert "certificate verify failed: certificate has expired" in msg
        assert "broker's certificate has expired" in msg

    async with tls_broker(
        tmp_path, pki["elsewhere_server"], pki["elsewhere_server_key"]
    ) as bootstrap:
        elsewhere = kafka(bootstrap, {"protocol": "SSL", "ssl_cafile": str(pki["server_ca"])})
        with pytest.raises(TlsError, match="does not name the host") as info:
            await check_tls(elsewhere)
        assert "kafka.bootstrap_servers" in str(info.value)

    # a broker that is not there (yet) is no certificate problem: left to the clients' backoff
    nobody = kafka(f"127.0.0.1:{free_port()}", mtls(pki))
    assert await check_tls(nobody) == []


class _Seen(logging.Handler):
    """Sets ``event`` when a record whose message contains ``text`` is logged."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
        self.event = asyncio.Event()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        if self.text in self.messages[-1]:
            self.event.set()


async def test_a_certificate_problem_met_once_the_broker_is_up_is_named(
    tmp_path: Path, tiny_model: Path, pki: dict[str, Path]
) -> None:
    """The first TLS check cannot reach the broker (it starts after us); the check is asked
    again after each backoff, so the wrong CA still fails start-up with the key to fix instead
    of an endless retry with no reason."""
    port = free_port()
    raw = base_config(f"127.0.0.1:{port}", tiny_model, "tls-late")
    raw["kafka"]["security"] = mtls(pki, ssl_cafile=str(pki["other_ca"]))
    raw["kafka"]["max_retry_backoff_ms"] = 300
    service = Service(load_config(None, **raw))
    seen = _Seen("producer cannot reach Kafka")
    client_log = logging.getLogger("streamer.kafka")
    client_log.addHandler(seen)
    start = asyncio.create_task(service.start())
    try:
        await asyncio.wait_for(seen.event.wait(), 60)
        assert any("TLS check: cannot reach" in m for m in seen.messages), seen.messages
        async with tls_broker(
            tmp_path, pki["server"], pki["server_key"], client_ca=pki["client_ca"], port=port
        ):
            with pytest.raises(TlsError) as info:
                await asyncio.wait_for(start, 60)
    finally:
        client_log.removeHandler(seen)
        start.cancel()
        await service.close()
    msg = str(info.value)
    assert "certificate verify failed" in msg and "kafka.security.ssl_cafile" in msg
