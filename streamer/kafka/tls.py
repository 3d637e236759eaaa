"""TLS to Kafka: the client's SSL context, and start-up errors that name the key to fix.

aiokafka treats a failed TLS handshake like an unreachable broker (a retriable connection
error), so a wrong CA or an expired certificate would look like an outage retried forever.
:func:`check_tls` shakes hands with each bootstrap server once before the clients start and
turns certificate problems into a :class:`TlsError` that says what is wrong and which
``kafka.security`` key to check; a server that cannot be reached is left to the clients'
backoff, which runs the check again after each wait until a server passes it (see
:class:`streamer.kafka.client.Backoff`). Neither the key password nor any other secret is
ever part of a message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import struct
import time
from pathlib import Path

from streamer.config import ConfigError, KafkaConfig, SecurityConfig

log = logging.getLogger(__name__)

TLS_PROTOCOLS = ("SSL", "SASL_SSL")

# OpenSSL verify codes (X509_V_ERR_*) worth a sentence of their own.
_EXPIRED, _NOT_YET_VALID = 10, 9
_UNTRUSTED = {2, 18, 19, 20, 21}
_NAME_MISMATCH = {62, 64}


class TlsError(ConfigError):
    """TLS to the broker cannot work as configured; the message names the key to check."""


def _expiry_problem(path: Path, what: str, key: str) -> str | None:
    """A sentence when the PEM certificate at ``path`` is expired or not yet valid."""
    decode = getattr(ssl._ssl, "_test_decode_cert", None)  # type: ignore[attr-defined]
    if decode is None:  # not this Python's ssl module: the handshake check still applies
        return None
    try:
        cert = decode(str(path))
        not_before = ssl.cert_time_to_seconds(cert["notBefore"])
        not_after = ssl.cert_time_to_seconds(cert["notAfter"])
    except (ssl.SSLError, OSError, KeyError, ValueError):
        return None  # unreadable here: load_cert_chain reports it
    now = time.time()
    if now > not_after:
        return (
            f"{key}: {what} {path} expired on {cert['notAfter']} (certificate has expired): "
            "renew it"
        )
    if now < not_before:
        return (
            f"{key}: {what} {path} is not valid before {cert['notBefore']}: check this "
            "machine's clock, or the certificate"
        )
    return None


def ssl_context(sec: SecurityConfig) -> ssl.SSLContext:
    """The client's context: CA, client certificate and key (hostname checks on by default)."""
    if sec.ssl_certfile is not None:
        problem = _expiry_problem(
            Path(sec.ssl_certfile), "client certificate", "kafka.security.ssl_certfile"
        )
        if problem:
            raise TlsError(problem)
    try:
        ctx = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=str(sec.ssl_cafile) if sec.ssl_cafile else None
        )
    except (ssl.SSLError, OSError) as exc:
        raise TlsError(
            f"kafka.security.ssl_cafile: cannot load CA certificates from {sec.ssl_cafile} "
            f"({_reason(exc)}): it must be a PEM file of the CA(s) that signed the broker "
            "certificates"
        ) from None
    if sec.ssl_certfile is not None:
        secret = sec.ssl_key_password

        def password() -> bytes:
            # Never OpenSSL's interactive prompt: an encrypted key without a password fails.
            return secret.get_secret_value().encode() if secret is not None else b""

        try:
            ctx.load_cert_chain(
                str(sec.ssl_certfile),
                str(sec.ssl_keyfile) if sec.ssl_keyfile else None,
                password,
            )
        except (ssl.SSLError, OSError) as exc:
            raise TlsError(
                "kafka.security.ssl_certfile / ssl_keyfile / ssl_key_password: cannot load the "
                f"client certificate {sec.ssl_certfile} with key "
                f"{sec.ssl_keyfile or '(in the certfile)'} ({_reason(exc)}): check that both "
                "are PEM, that the key belongs to the certificate and that ssl_key_password "
                "decrypts it"
            ) from None
    ctx.check_hostname = sec.ssl_check_hostname
    return ctx


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).lower().replace("_", " ")
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def describe(exc: ssl.SSLError, server: str, sec: SecurityConfig) -> str:
    """What a TLS failure against ``server`` means, and which key to check."""
    reason = _reason(exc)
    where = f"TLS to the Kafka broker {server} failed ({reason})"
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = exc.verify_code
        if code == _EXPIRED:
            return (
                f"{where}: the broker's certificate has expired; renew it on the broker (or "
                "check this machine's clock). kafka.security.ssl_cafile is not the problem."
            )
        if code == _NOT_YET_VALID:
            return f"{where}: the broker's certificate is not valid yet; check the clocks"
        if code in _NAME_MISMATCH:
            return (
                f"{where}: the broker's certificate does not name the host in "
                "kafka.bootstrap_servers; connect by a name or IP its subjectAltName lists "
                "(turning off kafka.security.ssl_check_hostname is not recommended)"
            )
        if code in _UNTRUSTED:
            cafile = sec.ssl_cafile or "the system CA store (kafka.security.ssl_cafile unset)"
            return (
                f"{where}: the broker's certificate is not signed by a CA in {cafile}; set "
                "kafka.security.ssl_cafile to the CA that signed the broker certificates"
            )
        return f"{where}: check kafka.security.ssl_cafile and the broker's certificate"
    tag = str(exc.reason or "").upper()
    if "CERTIFICATE_REQUIRED" in tag or (sec.ssl_certfile is None and "HANDSHAKE_FAILURE" in tag):
        return (
            f"{where}: the broker requires a client certificate (mutual TLS); set "
            "kafka.security.ssl_certfile and ssl_keyfile (and ssl_key_password if the key is "
            "encrypted)"
        )
    if "CERTIFICATE_EXPIRED" in tag:
        return (
            f"{where}: the broker refused our client certificate as expired; renew the "
            "certificate in kafka.security.ssl_certfile"
        )
    if any(t in tag for t in ("UNKNOWN_CA", "BAD_CERTIFICATE", "CERTIFICATE_UNKNOWN")):
        return (
            f"{where}: the broker does not accept our client certificate; "
            "kafka.security.ssl_certfile must be signed by a CA the broker trusts"
        )
    if "WRONG_VERSION_NUMBER" in tag or "RECORD_LAYER" in tag or "PACKET_LENGTH" in tag:
        return (
            f"{where}: is this a TLS listener? check kafka.bootstrap_servers and "
            "kafka.security.protocol"
        )
    return f"{where}: check the kafka.security.ssl_* settings and the broker's TLS listener"


def _api_versions_request(client_id: str) -> bytes:
    """A Kafka ApiVersions v0 request: allowed before SASL, answered by every broker."""
    cid = client_id.encode()[:32767]
    body = struct.pack(">hhih", 18, 0, 1, len(cid)) + cid
    return struct.pack(">i", len(body)) + body


class _Dropped(Exception):
    """The server closed the connection after the TLS handshake, before answering."""


_CLOSED = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)
_NO_TLS12 = ("PROTOCOL_VERSION", "UNSUPPORTED_PROTOCOL", "NO_PROTOCOLS_AVAILABLE")


async def _round_trip(host: str, port: int, ctx: ssl.SSLContext, client_id: str) -> None:
    """Handshake, send ApiVersions, read the answer's length (certificate errors raise)."""
    reader, writer = await asyncio.open_connection(host, port, ssl=ctx, server_hostname=host)
    try:
        writer.write(_api_versions_request(client_id))
        await writer.drain()
        await reader.readexactly(4)
    except _CLOSED as exc:
        raise _Dropped(_reason(exc)) from None
    except (ConnectionError, asyncio.IncompleteReadError) as exc:
        raise _Dropped(_reason(exc) if isinstance(exc, OSError) else "closed") from None
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


async def check_tls(cfg: KafkaConfig) -> list[str]:
    """One TLS handshake and one ApiVersions round trip with each bootstrap server.

    Under TLS 1.3 a broker checks the client certificate after the client's handshake has
    finished: a refusal arrives as an alert on the first read, or (when our request crossed it)
    as a bare reset. A reset right after the handshake is therefore asked again over TLS 1.2,
    where the certificate is checked inside the handshake and the alert always arrives.
    Raises :class:`TlsError` for certificate and TLS protocol problems; logs and skips a server
    that cannot be reached (the clients retry that with backoff). Returns the servers verified.
    """
    sec = cfg.security
    verified: list[str] = []
    if sec.protocol not in TLS_PROTOCOLS:
        return verified
    ctx = ssl_context(sec)
    timeout = cfg.request_timeout_ms / 1000
    for server in (s.strip() for s in cfg.bootstrap_servers.split(",")):
        host, _, port = server.rpartition(":")
        host = host.strip("[]")
        try:
            async with asyncio.timeout(timeout):
                try:
                    await _round_trip(host, int(port), ctx, cfg.client_id)
                except _Dropped:
                    tls12 = ssl_context(sec)
                    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
                    try:
                        await _round_trip(host, int(port), tls12, cfg.client_id)
                    except ssl.SSLError as exc:
                        if any(t in str(exc.reason or "").upper() for t in _NO_TLS12):
                            raise _Dropped("TLS 1.3 only, and it reset the connection") from None
                        raise
        except _CLOSED as exc:
            log.warning("TLS check: %s closed the connection (%s)", server, _reason(exc))
            continue
        except ssl.SSLError as exc:
            raise TlsError(describe(exc, server, sec)) from None
        except _Dropped as exc:
            log.warning(
                "TLS check: %s closed the connection after the TLS handshake (%s); the "
                "clients will retry",
                server,
                exc,
            )
            continue
        except (OSError, TimeoutError) as exc:
            log.warning(
                "TLS check: cannot reach %s (%s); the clients will retry",
                server,
                f"no answer in {timeout:g}s"
                if isinstance(exc, TimeoutError)  # an OSError too, with no reason of its own
                else _reason(exc),
            )
            continue
        log.info("TLS to %s verified", server)
        verified.append(server)
    return verified
