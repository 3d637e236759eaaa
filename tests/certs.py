"""Test certificates made in the test (never checked in): CAs, server and client certs.

Built with ``cryptography`` so that an expired certificate is one argument away.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import shutil
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DAY = dt.timedelta(days=1)


@dataclass(frozen=True)
class Ca:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    pem: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def make_ca(directory: Path, cn: str) -> Ca:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - DAY)
        .not_valid_after(now + 2 * DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    pem = directory / f"{cn}.pem"
    pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Ca(cert, key, pem)


def issue(
    ca: Ca,
    directory: Path,
    cn: str,
    *,
    client: bool = False,
    expired: bool = False,
    key_password: str | None = None,
    names: tuple[str, ...] = ("127.0.0.1", "localhost"),
) -> tuple[Path, Path]:
    """A leaf certificate (subjectAltName: ``names``) and its key, as PEM files.

    ``expired``: valid only until yesterday. ``key_password``: the key is encrypted with it.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    start, end = (now - 10 * DAY, now - DAY) if expired else (now - DAY, now + 2 * DAY)
    usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([_general_name(n) for n in names]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), False
        )
        .sign(ca.key, hashes.SHA256())
    )
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(key_password.encode())
        if key_password
        else serialization.NoEncryption()
    )
    cert_path, key_path = directory / f"{cn}.pem", directory / f"{cn}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    )
    key_path.chmod(0o600)
    return cert_path, key_path


@contextlib.asynccontextmanager
async def tls_broker(
    directory: Path,
    cert: Path,
    key: Path,
    *,
    client_ca: Path | None = None,
    port: int | None = None,
) -> AsyncIterator[str]:
    """A broker of its own that clients reach only through stunnel (TLS); yields bootstrap.

    ``client_ca``: stunnel demands a client certificate signed by it (mutual TLS).
    ``port``: where stunnel listens (default: a free one).
    """
    from streamer.kafka.broker import EmbeddedBroker, free_port

    stunnel = shutil.which("stunnel4") or shutil.which("stunnel")
    assert stunnel, "stunnel4 is needed for the TLS tests: apt-get install stunnel4 (.ci/run does)"
    tls_port = port or free_port()
    broker = EmbeddedBroker(advertised_port=tls_port)  # every client must come through TLS
    broker.start()
    conf = directory / f"stunnel-{tls_port}.conf"
    lines = [
        "foreground = yes",
        "pid =",
        "[kafka]",
        f"accept = 127.0.0.1:{tls_port}",
        f"connect = 127.0.0.1:{broker.port}",
        f"cert = {cert}",
        f"key = {key}",
    ]
    if client_ca is not None:
        lines += [f"CAfile = {client_ca}", "verifyChain = yes", "requireCert = yes"]
    conf.write_text("\n".join(lines) + "\n")
    tunnel = subprocess.Popen(  # noqa: ASYNC220 - Popen returns at once
        [stunnel, str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        for _ in range(100):
            try:
                _, w = await asyncio.open_connection("127.0.0.1", tls_port)
                w.close()
                break
            except OSError:
                assert tunnel.poll() is None, f"stunnel exited: check {conf}"
                await asyncio.sleep(0.1)
        yield f"127.0.0.1:{tls_port}"
    finally:
        tunnel.terminate()
        tunnel.wait(5)
        broker.stop()
