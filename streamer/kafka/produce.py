"""Produce requests encoded with one copy of the record batches instead of one per level.

aiokafka encodes a request by encoding each field to ``bytes`` and joining them, level by level:
a record batch's bytes are copied once for ``Bytes`` (length prefix + value), then again for
its partition's entry, the partition array, the topic's entry, the topic array and the request
— six copies of every result's bytes on the event loop before the connection adds its own two.
At 5 KB of float-JSON per result that was ~8 µs of loop time per record, the largest single
per-record cost left on the loop (py-spy, ``streamer bench --only no-model``).

:func:`flat_encode` walks the same schema, collects the pieces (the record batches as they
are) and joins once; the bytes are identical (tested against aiokafka's encoder for every
ProduceRequest version). :func:`install` applies it to one producer only: its sender's produce
handler prepares requests whose struct encodes flat; every other aiokafka client is untouched.

The producer's connections then write a produce request without joining it at all
(:func:`write_pieces`): the kernel gathers the header and the record batches in one
``sendmsg`` (what asyncio's ``writelines`` does itself from Python 3.12). aiokafka's connection
joined the request, then copied it twice more to prefix the header and the size; those three
copies were ~320 µs of loop time per 0.5 MB request here (~3 µs per 5 KB result).

Where the connection is a plain TCP socket, even that ``sendmsg`` leaves the event loop: a
:class:`SocketWriter` thread per connection writes its requests in order (the kernel's copy of a
1 MB request, ~250 µs here, and on loopback the receiver's side of it too, ran on the loop's CPU;
the call releases the GIL, so the thread runs beside the loop). It is how Kafka's own clients
send: the Java producer's sender thread, librdkafka's broker threads. Responses are still read
by aiokafka on the loop.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import queue
import select
import socket
import sys
import threading
import weakref
from asyncio import selector_events
from collections.abc import Callable
from struct import Struct
from typing import Any

import aiokafka.errors as errors
from aiokafka import AIOKafkaProducer
from aiokafka.client import ConnectionGroup
from aiokafka.conn import AIOKafkaConnection, CloseReason
from aiokafka.producer import sender as _sender
from aiokafka.protocol.types import Array, Bytes, Int32, Schema

log = logging.getLogger(__name__)

_NULL = Int32.encode(-1)


def _pieces(kind: Any, value: Any, out: list[Any]) -> None:
    if type(kind) is Schema:
        for field, item in zip(kind.fields, value, strict=True):
            _pieces(field, item, out)
    elif type(kind) is Array:
        if value is None:
            out.append(_NULL)
            return
        out.append(Int32.encode(len(value)))
        for item in value:
            _pieces(kind.array_of, item, out)
    elif kind is Bytes and value is not None:
        out.append(Int32.encode(len(value)))
        out.append(value)  # the record batch: not copied here
    else:  # anything else (strings, ints, compact types) as aiokafka encodes it
        out.append(kind.encode(value))


def _struct_pieces(request: Any, out: list[Any]) -> list[Any]:
    """``out`` with the pieces of an aiokafka request struct appended (record batches uncopied)."""
    if request.API_KEY == 0 and not request.FLEXIBLE_VERSION:  # a produce request, v0-v8
        return _produce_pieces(request, out)
    schema = request.SCHEMA
    _pieces(schema, [request.__dict__[name] for name in schema.names], out)
    return out


_I16, _I32 = Struct(">h"), Struct(">i")
_ACKS_TIMEOUT, _PARTITION = Struct(">hi"), Struct(">ii")
_HEADER = Struct(">hhi")  # api key, api version, correlation id (then the client id)


def _string(value: str | None) -> bytes:
    """Kafka's nullable STRING (int16 length, -1 for null), as aiokafka's ``String``."""
    if value is None:
        return b"\xff\xff"
    data = str(value).encode()
    return _I16.pack(len(data)) + data


def _produce_pieces(request: Any, out: list[Any]) -> list[Any]:
    """A ProduceRequest v0-v8's fields, written out directly: the schema walk of
    :func:`_pieces` cost ~11 µs per request, this ~2 (the bytes are the same; tested)."""
    fields = request.__dict__
    head = _string(fields["transactional_id"]) if request.API_VERSION >= 3 else b""
    topics = fields["topics"]
    head += _ACKS_TIMEOUT.pack(fields["required_acks"], fields["timeout"]) + _I32.pack(len(topics))
    for topic, partitions in topics:
        head += _string(topic) + _I32.pack(len(partitions))
        for partition, records in partitions:
            if records is None:
                head += _PARTITION.pack(partition, -1)
                continue
            out.append(head + _PARTITION.pack(partition, len(records)))
            out.append(records)  # the record batch: not copied here
            head = b""
    if head:
        out.append(head)
    return out


def _header(request: Any, correlation_id: int, client_id: str) -> bytes:
    """``request.build_request_header(...).encode()``: request header v1 written directly; a
    flexible version's (v2, tagged fields) through aiokafka."""
    if request.FLEXIBLE_VERSION:
        return request.build_request_header(
            correlation_id=correlation_id, client_id=client_id
        ).encode()
    return _HEADER.pack(request.API_KEY, request.API_VERSION, correlation_id) + _string(client_id)


def flat_encode(struct: Any) -> bytes:
    """``struct.encode()`` of an aiokafka request struct, joined once."""
    return b"".join(_struct_pieces(struct, []))


# asyncio's plain TCP transport; on 3.11 its writelines() joins, from 3.12 it gathers itself.
_SOCKET_TRANSPORT: type | None = getattr(selector_events, "_SelectorSocketTransport", None)
_GATHERS = sys.version_info >= (3, 12)
_IOV_MAX = 1024  # buffers one sendmsg() takes (Linux's UIO_MAXIOV)


def _unsent(pieces: list[Any], sent: int) -> list[Any]:
    """What is left of ``pieces`` once ``sent`` bytes of them were written (empty: all)."""
    for i, piece in enumerate(pieces):
        if sent < len(piece):
            return [memoryview(piece)[sent:], *pieces[i + 1 :]]
        sent -= len(piece)
    return []


def _idle_socket(transport: asyncio.BaseTransport) -> bool:
    """A plain TCP transport (not TLS) with nothing buffered and not closing: the socket can
    be written directly without overtaking what the transport holds."""
    return (
        type(transport) is _SOCKET_TRANSPORT
        and not transport.get_write_buffer_size()  # type: ignore[attr-defined]
        and not transport.is_closing()
    )


def write_pieces(transport: asyncio.WriteTransport, pieces: list[Any]) -> None:
    """``transport.write(b"".join(pieces))`` without the join where the transport allows.

    A plain TCP transport with nothing buffered hands the pieces to the kernel in one
    ``sendmsg``; what the socket did not take (or anything on another transport: TLS, a
    buffered one) goes through ``write``, which keeps the order and flow control.
    """
    if _GATHERS:
        transport.writelines(pieces)
        return
    if not _idle_socket(transport) or len(pieces) > _IOV_MAX:
        transport.write(b"".join(pieces))
        return
    sock: socket.socket = transport._sock  # type: ignore[attr-defined]
    try:
        sent = sock.sendmsg(pieces)
    except OSError:  # would block, or broken: write() buffers it or closes as it should
        sent = 0
    rest = _unsent(pieces, sent)
    if rest:
        transport.write(b"".join(rest))


class SocketWriter:
    """Writes one connection's requests, in the order given, from a thread of its own.

    ``write`` only enqueues (the event loop's whole cost of a request's bytes); the thread hands
    them to the kernel with ``sendmsg`` and waits for room in the socket with ``poll``. It owns
    a duplicate of the socket's descriptor: the transport may close its own at any time, and a
    closed number can be reused by another connection, which must never get these bytes.
    ``stop`` (the connection closing) shuts the socket down, which also wakes a thread waiting
    on a peer that stopped reading; unsent bytes are dropped then, as the connection's requests
    fail and are retried. A write error reaches ``on_broken`` (from the thread) unless stopping.
    """

    def __init__(self, sock: socket.socket, on_broken: Callable[[OSError], None], name: str):
        self._sock = sock.dup()  # shares the open socket, non-blocking flag included
        self._on_broken = on_broken
        self._queue: queue.SimpleQueue[list[Any] | None] = queue.SimpleQueue()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def write(self, pieces: list[Any]) -> None:
        self._queue.put(pieces)

    def stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        self._queue.put(None)
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:  # already closed by the thread, or never connected
            pass

    def join(self, timeout_s: float | None = None) -> None:
        self._thread.join(timeout_s)

    def _run(self) -> None:
        sock = self._sock
        room = select.poll()
        room.register(sock, select.POLLOUT)
        try:
            while (pieces := self._queue.get()) is not None and not self._stopping:
                while pieces:
                    try:
                        sent = sock.sendmsg(pieces[:_IOV_MAX])
                    except BlockingIOError:
                        sent = 0
                    pieces = _unsent(pieces, sent)
                    if pieces:
                        room.poll()
        except OSError as err:
            if not self._stopping:
                self._on_broken(err)
        except BaseException as err:  # a bug here must not leave requests unsent silently
            self._on_broken(OSError(f"socket writer failed: {type(err).__name__}: {err}"))
            raise
        finally:
            sock.close()


def _start_writer(conn: AIOKafkaConnection) -> SocketWriter | None:
    """A writer thread for ``conn``, where the connection is plain TCP (SASL_PLAINTEXT
    included, once authenticated) with nothing buffered; None otherwise: a TLS transport keeps
    writing on the loop."""
    transport = conn._writer.transport
    if not _idle_socket(transport):
        return None
    loop, ref = conn._loop, weakref.ref(conn)

    def broken(err: OSError) -> None:  # on the writer's thread
        try:
            loop.call_soon_threadsafe(_broken, ref, writer, err)
        except RuntimeError:  # the loop is closed: nothing is waiting on this connection
            pass

    name = f"streamer-send-{conn._host}:{conn._port}"
    writer = SocketWriter(transport._sock, broken, name)  # type: ignore[attr-defined]
    conn.streamer_writer = writer  # type: ignore[attr-defined]
    weakref.finalize(conn, writer.stop)  # a connection dropped without close()
    return writer


def _broken(ref: weakref.ref[AIOKafkaConnection], writer: SocketWriter, err: OSError) -> None:
    """A write failed: close the connection (its requests fail and are retried), as aiokafka
    does when its own write fails."""
    conn = ref()
    if conn is not None and vars(conn).get("streamer_writer") is writer:
        log.warning("connection to %s:%s broken while writing: %s", conn._host, conn._port, err)
        conn.close(reason=CloseReason.CONNECTION_BROKEN, exc=err)


def _conn_close(conn: AIOKafkaConnection, reason: Any = None, exc: Any = None) -> Any:
    """``AIOKafkaConnection.close``, stopping the connection's writer thread first."""
    writer = vars(conn).pop("streamer_writer", None)
    if writer is not None:
        writer.stop()
    return AIOKafkaConnection.close(conn, reason=reason, exc=exc)


def _conn_send(conn: AIOKafkaConnection, request: Any, expect_response: bool = True) -> Any:
    """``AIOKafkaConnection.send`` (aiokafka 0.14): a flat request is written in pieces, and
    every request by the connection's writer thread once it has one (so they stay in order)."""
    flat = getattr(request, "streamer_flat", False)
    writer = vars(conn).get("streamer_writer")
    if not flat and writer is None:
        return AIOKafkaConnection.send(conn, request, expect_response=expect_response)
    if conn._writer is None:
        raise errors.KafkaConnectionError(f"No connection to broker at {conn._host}:{conn._port}")
    prepared = request.prepare(conn._versions)
    correlation_id = conn._next_correlation_id()
    pieces = [b"", _header(prepared, correlation_id, conn._client_id)]
    if flat:
        _struct_pieces(prepared, pieces)
    else:
        pieces.append(prepared.encode())
    pieces[0] = Int32.encode(sum(map(len, pieces)))
    # a writer thread only for requests with a response (acks=0 keeps the transport's flow
    # control: nothing else would bound what waits to be written)
    if writer is None and expect_response:
        writer = _start_writer(conn)
    if writer is not None:
        writer.write(pieces)
    else:
        try:
            write_pieces(conn._writer.transport, pieces)
        except OSError as err:
            conn.close(reason=CloseReason.CONNECTION_BROKEN)
            raise errors.KafkaConnectionError(
                f"Connection at {conn._host}:{conn._port} broken: {err}"
            ) from err
    if not expect_response:
        return conn._writer.drain()
    loop = conn._loop
    fut = loop.create_future()
    conn._requests.append((correlation_id, prepared, fut))
    # aiokafka wraps the future in async_timeout (a context manager, a task lookup, a timer):
    # one timer that fails the future does the same for a third of the loop time per request
    timer = loop.call_later(conn._request_timeout, _expire, fut)
    fut.add_done_callback(lambda _: timer.cancel())
    return fut


def _expire(fut: asyncio.Future[Any]) -> None:
    """No response within the request timeout: the client closes the connection on this."""
    if not fut.done():
        fut.set_exception(TimeoutError())


def _gathering(conn: AIOKafkaConnection | None) -> None:
    """Let ``conn`` write flat requests in pieces (once per connection; others unchanged)."""
    if conn is not None and "send" not in vars(conn):
        conn.send = functools.partial(_conn_send, conn)  # type: ignore[method-assign]
        conn.close = functools.partial(_conn_close, conn)  # type: ignore[method-assign]


def _flat(request: Any) -> Any:
    """``request`` whose prepared struct encodes with :func:`flat_encode`."""
    prepare = request.prepare
    request.streamer_flat = True  # a gathering connection writes it in pieces

    def prepare_flat(versions: Any) -> Any:
        struct = prepare(versions)
        struct.encode = lambda: flat_encode(struct)  # shadows the method, this instance only
        return struct

    request.prepare = prepare_flat
    return request


class _FlatProduceHandler(_sender.SendProduceReqHandler):
    def create_request(self):  # type: ignore[no-untyped-def]
        return _flat(super().create_request())


async def _send_produce_req(self: Any, node_id: int, batches: dict) -> None:
    """aiokafka's ``Sender._send_produce_req`` (0.14), with the flat handler."""
    # the node's connection, once it exists (the sender picks nodes it has connected to)
    _gathering(self.client._conns.get((node_id, ConnectionGroup.DEFAULT)))
    handler = _FlatProduceHandler(self, batches)
    await handler.do(node_id)
    self._in_flight.remove(node_id)
    for tp in batches:
        self._muted_partitions.remove(tp)


def install(producer: AIOKafkaProducer) -> None:
    """Encode this producer's produce requests flat (before ``start()``)."""
    sender = producer._sender
    sender._send_produce_req = _send_produce_req.__get__(sender)
