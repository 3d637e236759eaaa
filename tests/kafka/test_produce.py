"""Flat produce-request encoding: byte for byte what aiokafka writes, for every version, and
only on the producer it was installed on; written in pieces, every byte arrives in order."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import threading
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.protocol.produce import ProduceRequest

from streamer.kafka.broker import create_topics
from streamer.kafka.produce import (
    SocketWriter,
    _send_produce_req,
    flat_encode,
    install,
    write_pieces,
)
from tests.support import read_topic

VERSIONS = [cls.API_VERSION for cls in ProduceRequest._CLASSES]


def request(transactional_id: str | None) -> ProduceRequest:
    topics = [
        ("results", [(0, os.urandom(5000)), (3, bytearray(os.urandom(70))), (1, b""), (2, None)]),
        ("results.dlq", [(0, os.urandom(300))]),
    ]
    return ProduceRequest(
        transactional_id=transactional_id, required_acks=-1, timeout=30_000, topics=topics
    )


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("transactional_id", [None, "txn-1"])
def test_the_same_bytes_as_aiokafka(version: int, transactional_id: str | None) -> None:
    req = request(transactional_id)
    try:
        struct = req.prepare({0: (version, version)})
    except Exception:  # a transactional id before v3: aiokafka refuses it too
        assert transactional_id is not None and version < 3
        return
    assert struct.API_VERSION == version
    assert flat_encode(struct) == struct.encode()


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("client_id", ["streamer", "strömer-ünïcode", ""])
def test_the_same_header_as_aiokafka(version: int, client_id: str) -> None:
    from aiokafka.protocol.admin import DeleteRecordsRequest
    from aiokafka.protocol.metadata import MetadataRequest

    from streamer.kafka.produce import _header

    produce = request(None).prepare({0: (version, version)})
    metadata = MetadataRequest(topics=["a"]).prepare({3: (0, 5)})
    flexible = DeleteRecordsRequest(topics=[("a", [(0, 5)])], timeout_ms=100).prepare({21: (2, 2)})
    assert flexible.FLEXIBLE_VERSION  # header v2, with tagged fields
    for struct_ in (produce, metadata, flexible):
        expected = struct_.build_request_header(correlation_id=77, client_id=client_id).encode()
        assert _header(struct_, 77, client_id) == expected


async def test_installed_on_one_producer_only() -> None:
    ours = AIOKafkaProducer(bootstrap_servers="127.0.0.1:1")
    other = AIOKafkaProducer(bootstrap_servers="127.0.0.1:1")
    install(ours)
    assert ours._sender._send_produce_req.__func__ is _send_produce_req
    assert "_send_produce_req" not in vars(other._sender)  # the class's own method


async def test_pieces_arrive_whole_and_in_order_past_the_socket_buffer() -> None:
    """16 MB in pieces, more than the socket takes at once: the kernel takes a part, the
    transport buffers the rest; a second write lands behind it (the buffered path)."""
    received = bytearray()
    done = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.extend(await reader.read())  # to EOF
        writer.close()
        done.set()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    first = [b"head", os.urandom(8 << 20), bytearray(os.urandom(3)), b"", os.urandom(8 << 20)]
    second = [b"next", os.urandom(1000)]
    write_pieces(writer.transport, first)
    write_pieces(writer.transport, second)
    await writer.drain()
    writer.close()
    await asyncio.wait_for(done.wait(), 30)
    server.close()
    assert bytes(received) == b"".join(first + second)


class _Recording(asyncio.WriteTransport):
    """Not a socket transport (as TLS is not): it must get one joined write."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[Any] = []

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))


def test_other_transports_get_one_joined_write() -> None:
    transport = _Recording()
    write_pieces(transport, [b"a", bytearray(b"bc"), memoryview(b"def")])
    assert transport.writes == [b"abcdef"]


async def test_an_installed_producer_delivers_through_gathering_connections(
    broker: str, topic: str
) -> None:
    await create_topics(broker, {topic: 2})
    producer = AIOKafkaProducer(bootstrap_servers=broker, acks="all", max_request_size=4 << 20)
    install(producer)
    await producer.start()
    values = [os.urandom(n) for n in (0, 1, 5000, 300_000)]
    try:
        for i, value in enumerate(values):  # the first request opens the connection
            await producer.send_and_wait(topic, value, key=b"%d" % i, partition=i % 2)
        conns = list(producer.client._conns.values())
        assert any("send" in vars(conn) for conn in conns)  # written in pieces since
        writers = [vars(c)["streamer_writer"] for c in conns if "streamer_writer" in vars(c)]
        assert writers and all(w.alive for w in writers)  # ... by a writer thread
    finally:
        await producer.stop()
    for writer in writers:  # closing the connection ends its thread
        writer.join(5)
        assert not writer.alive
    got = await read_topic(broker, topic, expect=len(values))
    assert sorted((m.key, m.value) for m in got) == sorted(
        (b"%d" % i, v) for i, v in enumerate(values)
    )


class _Conn:
    """What :func:`_conn_send` reads of an aiokafka connection (a unit test's stand-in)."""

    def __init__(self, timeout_s: float) -> None:
        self._writer = type("W", (), {"transport": _Recording()})()
        self._versions = {0: (3, 9)}
        self._client_id = "streamer"
        self._loop = asyncio.get_running_loop()
        self._requests: list[Any] = []
        self._request_timeout = timeout_s
        self._host, self._port = "broker", 9092
        self._ids = iter(range(1, 100))

    def _next_correlation_id(self) -> int:
        return next(self._ids)


async def test_a_flat_request_without_a_response_times_out_and_an_answered_one_does_not() -> None:
    from streamer.kafka.produce import _conn_send, _flat

    conn = _Conn(timeout_s=0.05)
    unanswered = _conn_send(conn, _flat(request(None)))  # type: ignore[arg-type]
    answered = _conn_send(conn, _flat(request(None)))  # type: ignore[arg-type]
    (first, struct, _), (second, _, fut) = conn._requests
    assert (first, second) == (1, 2) and fut is answered
    written = conn._writer.transport.writes  # one joined write each (not a socket transport)
    assert [w[8:12] for w in written] == [b"\x00\x00\x00\x01", b"\x00\x00\x00\x02"]
    header = struct.build_request_header(correlation_id=1, client_id="streamer").encode()
    assert written[0] == len(header + struct.encode()).to_bytes(4, "big") + header + struct.encode()
    answered.set_result("response")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(unanswered, 5)
    await asyncio.sleep(0.1)  # past the timeout: the answered one keeps its response
    assert answered.result() == "response"


def _pair() -> tuple[socket.socket, socket.socket]:
    """A connected loopback TCP pair; ours non-blocking, as an asyncio transport's socket is."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        ours = socket.create_connection(server.getsockname())
        peer, _ = server.accept()
    ours.setblocking(False)
    return ours, peer


def _read_all(sock: socket.socket, n: int) -> bytes:
    got = bytearray()
    while len(got) < n and (part := sock.recv(1 << 20)):
        got.extend(part)
    return bytes(got)


def test_a_writer_thread_delivers_requests_whole_and_in_order_past_the_socket_buffer() -> None:
    ours, peer = _pair()
    broken: list[OSError] = []
    writer = SocketWriter(ours, broken.append, "test-writer")
    requests = [
        [b"head", os.urandom(8 << 20), bytearray(os.urandom(3)), b"", memoryview(os.urandom(99))],
        [b"x"] * 3000,  # more pieces than one sendmsg() takes
        [b"next", os.urandom(8 << 20)],
    ]
    for pieces in requests:
        writer.write(pieces)
    expected = b"".join(b"".join(p) for p in requests)
    assert _read_all(peer, len(expected)) == expected
    writer.stop()
    writer.join(5)
    assert not writer.alive and broken == []
    ours.close()
    peer.close()


def test_the_writer_writes_on_its_own_descriptor_when_the_socket_is_closed_and_reused() -> None:
    """The transport closes its socket whenever it likes; the number may go to a new socket
    at once. What the writer still had to write goes to its own connection, never that one."""
    ours, peer = _pair()
    writer = SocketWriter(ours, lambda err: None, "test-writer")
    ours.close()
    newcomer, newcomer_peer = _pair()  # very likely the number just freed
    writer.write([b"for the old peer"])
    assert _read_all(peer, 16) == b"for the old peer"
    newcomer_peer.setblocking(False)
    with pytest.raises(BlockingIOError):  # nothing arrived on the other connection
        newcomer_peer.recv(100)
    writer.stop()
    writer.join(5)
    assert not writer.alive
    for s in (peer, newcomer, newcomer_peer):
        s.close()


def test_stop_wakes_a_writer_waiting_on_a_peer_that_stopped_reading() -> None:
    ours, peer = _pair()
    broken: list[OSError] = []
    writer = SocketWriter(ours, broken.append, "test-writer")
    writer.write([os.urandom(64 << 20)])  # far more than the socket buffers hold
    writer.stop()
    writer.join(10)
    assert not writer.alive and broken == []  # stopping is not a broken connection
    ours.close()
    peer.close()


def test_a_write_error_reaches_on_broken() -> None:
    ours, peer = _pair()
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()  # a reset
    failed = threading.Event()
    broken: list[OSError] = []

    def on_broken(err: OSError) -> None:
        broken.append(err)
        failed.set()

    writer = SocketWriter(ours, on_broken, "test-writer")
    for _ in range(3):  # the first write may still be taken before the reset is seen
        writer.write([os.urandom(1 << 20)])
    assert failed.wait(10)
    writer.join(5)
    assert not writer.alive and isinstance(broken[0], OSError)
    ours.close()


async def test_a_broken_write_closes_the_connection_and_the_request_is_retried(
    broker: str, topic: str
) -> None:
    """The writer's socket fails under a live producer: its connection is closed (the request
    fails, aiokafka retries it on a new connection) and every record still arrives."""
    await create_topics(broker, {topic: 1})
    producer = AIOKafkaProducer(bootstrap_servers=broker, acks="all", retry_backoff_ms=50)
    install(producer)
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"first", partition=0)
        await producer.send_and_wait(topic, b"second", partition=0)  # now through a writer
        (conn,) = [c for c in producer.client._conns.values() if "streamer_writer" in vars(c)]
        old = vars(conn)["streamer_writer"]
        old._sock.shutdown(socket.SHUT_WR)  # the next write fails in the thread
        await asyncio.wait_for(producer.send_and_wait(topic, b"third", partition=0), 30)
        old.join(5)
        assert not old.alive and not conn.connected()
    finally:
        await producer.stop()
    got = await read_topic(broker, topic, expect=3)
    assert [m.value for m in got] == [b"first", b"second", b"third"]
