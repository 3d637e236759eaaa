"""SASL/OAUTHBEARER on the wire: the service authenticates every connection with the token from
``kafka.security.sasl_oauth_token_file``, and after the file is rotated, reconnects present the
new one.

The embedded broker has no SASL, so a loopback proxy in front of it plays the broker's side of
the SASL exchange (``SaslHandshake`` and ``SaslAuthenticate`` as Kafka 1.0+ answers them, per
KIP-152 and RFC 7628's client-first message), records the token, accepts or refuses it, and
then forwards the connection's Kafka traffic to the broker untouched. Token *validation* (JWT
signatures, expiry, scopes) is the real broker's business and is not exercised here.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
from support import RunningService, base_config, json_records, produce, read_topic

from streamer.config import load_config
from streamer.kafka.broker import EmbeddedBroker, create_topics, free_port

pytestmark = pytest.mark.integration

SASL_HANDSHAKE, SASL_AUTHENTICATE = 17, 36
SASL_AUTHENTICATION_FAILED, UNSUPPORTED_SASL_MECHANISM = 58, 33


@dataclass
class Session:
    """One client connection as the proxy saw it."""

    client_id: str | None = None
    mechanism: str | None = None
    token: str | None = None
    accepted: bool | None = None


def _string(text: str | None) -> bytes:
    if text is None:
        return struct.pack(">h", -1)
    data = text.encode()
    return struct.pack(">h", len(data)) + data


def bearer_token(client_first: bytes) -> str:
    """The token of an OAUTHBEARER client-first message: ``n,,\\x01auth=Bearer T\\x01...``."""
    for part in client_first.decode().split("\x01"):
        if part.startswith("auth=Bearer "):
            return part.removeprefix("auth=Bearer ")
    raise ValueError(f"no bearer token in {client_first!r}")


class SaslProxy:
    """Loopback proxy answering SASL/OAUTHBEARER itself, forwarding everything else."""

    def __init__(self, listen_port: int, target_port: int, host: str = "127.0.0.1") -> None:
        self.host, self.listen_port, self.target_port = host, listen_port, target_port
        self.valid_tokens: set[str] = set()
        self.sessions: list[Session] = []
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.listen_port)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(self.host, self.target_port)
        self._writers.update({writer, up_writer})
        session = Session()
        self.sessions.append(session)
        pump = asyncio.ensure_future(self._pipe(up_reader, writer))
        try:
            if await self._authenticate(session, reader, writer, up_writer):
                await self._pipe(reader, up_writer)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            for w in (writer, up_writer):
                w.close()
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pump
            self._writers.difference_update({writer, up_writer})

    async def _authenticate(
        self,
        session: Session,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        up_writer: asyncio.StreamWriter,
    ) -> bool:
        """Frames until SASL is done: ApiVersions and the like go to the broker; the SASL
        requests are answered here. False when the token was refused (connection closed)."""
        while True:
            head = await reader.readexactly(4)
            body = await reader.readexactly(struct.unpack(">i", head)[0])
            api_key, version, correlation, id_len = struct.unpack_from(">hhih", body)
            session.client_id = body[10 : 10 + id_len].decode() if id_len >= 0 else None
            rest = body[10 + max(id_len, 0) :]
            if api_key == SASL_HANDSHAKE:
                (n,) = struct.unpack_from(">h", rest)
                session.mechanism = rest[2 : 2 + n].decode()
                error = 0 if session.mechanism == "OAUTHBEARER" else UNSUPPORTED_SASL_MECHANISM
                answer = struct.pack(">hi", error, 1) + _string("OAUTHBEARER")
            elif api_key == SASL_AUTHENTICATE:
                (n,) = struct.unpack_from(">i", rest)
                session.token = bearer_token(rest[4 : 4 + n])
                session.accepted = session.token in self.valid_tokens
                error = 0 if session.accepted else SASL_AUTHENTICATION_FAILED
                message = None if session.accepted else "token refused"
                answer = struct.pack(">h", error) + _string(message) + struct.pack(">i", 0)
                if version >= 1:
                    answer += struct.pack(">q", 0)  # session_lifetime_ms: no re-authentication
            else:  # not SASL (yet): the broker answers
                up_writer.write(head + body)
                await up_writer.drain()
                continue
            frame = struct.pack(">i", correlation) + answer
            writer.write(struct.pack(">i", len(frame)) + frame)
            await writer.drain()
            if api_key == SASL_AUTHENTICATE:
                return bool(session.accepted)

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        dst.close()

    def drop_connections(self) -> None:
        """Close every live connection (the listener stays): clients reconnect, and SASL runs
        again on each new connection."""
        for w in list(self._writers):
            w.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        self.drop_connections()


@contextlib.asynccontextmanager
async def sasl_broker() -> AsyncIterator[tuple[str, SaslProxy]]:
    """A broker of its own that advertises the proxy, so every connection goes through it."""
    proxy_port = free_port()
    own = EmbeddedBroker(advertised_port=proxy_port)
    own.start()
    proxy = SaslProxy(proxy_port, own.port)
    await proxy.start()
    try:
        yield own.bootstrap, proxy
    finally:
        await proxy.stop()
        own.stop()


def test_bearer_token_parsing() -> None:
    assert bearer_token(b"n,,\x01auth=Bearer abc.def\x01k=v\x01\x01") == "abc.def"
    with pytest.raises(ValueError, match="no bearer token"):
        bearer_token(b"n,,\x01\x01")


async def test_service_authenticates_with_the_rotated_token_file(
    topic: str, tiny_model: Path, tmp_path: Path
) -> None:
    token = tmp_path / "token"
    token.write_text("token-1\n")
    async with sasl_broker() as (bootstrap, proxy):
        proxy.valid_tokens = {"token-1"}
        over = base_config(bootstrap, tiny_model, topic)
        over["kafka"]["security"] = {
            "protocol": "SASL_PLAINTEXT",
            "sasl_mechanism": "OAUTHBEARER",
            "sasl_oauth_token_file": str(token),
        }
        await create_topics(bootstrap, {topic: 2, f"{topic}.out": 2, f"{topic}.dlq": 1})
        await produce(bootstrap, topic, json_records(20))
        async with RunningService(load_config(None, **over)) as svc:
            await svc.wait_done(20, timeout_s=90)
            ours = [s for s in proxy.sessions if s.client_id == "streamer"]
            assert ours, "the service opened no connection through the proxy"
            assert all(s.mechanism == "OAUTHBEARER" for s in ours)
            assert {s.token for s in ours} == {"token-1"} and all(s.accepted for s in ours)

            # rotation: a new token in the file, the old one revoked, every connection dropped
            token.write_text("token-2\n")
            proxy.valid_tokens = {"token-2"}
            before = len(proxy.sessions)
            proxy.drop_connections()
            await produce(bootstrap, topic, json_records(20, start=20))
            await svc.wait_done(40, timeout_s=90)
            again = [s for s in proxy.sessions[before:] if s.client_id == "streamer"]
            assert again, "the service did not reconnect"
            assert {s.token for s in again} == {"token-2"} and all(s.accepted for s in again)

        out = await read_topic(bootstrap, f"{topic}.out", expect=40)
        assert sorted(orjson.loads(m.value)["id"] for m in out) == list(range(40))
