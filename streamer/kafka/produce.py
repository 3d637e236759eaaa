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
"""

from __future__ import annotations

import asyncio
import functools
import socket
import sys
from asyncio import selector_events
from typing import Any

import aiokafka.errors as errors
from aiokafka import AIOKafkaProducer
from aiokafka.client import ConnectionGroup
from aiokafka.conn import AIOKafkaConnection, CloseReason
from aiokafka.producer import sender as _sender
from aiokafka.protocol.types import Array, Bytes, Int32, Schema

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


def _struct_pieces(struct: Any, out: list[Any]) -> list[Any]:
    """``out`` with the pieces of an aiokafka request struct appended (record batches uncopied)."""
    schema = struct.SCHEMA
    _pieces(schema, [struct.__dict__[name] for name in schema.names], out)
    return out


def flat_encode(struct: Any) -> bytes:
    """``struct.encode()`` of an aiokafka request struct, joined once."""
    return b"".join(_struct_pieces(struct, []))


# asyncio's plain TCP transport; on 3.11 its writelines() joins, from 3.12 it gathers itself.
_SOCKET_TRANSPORT: type | None = getattr(selector_events, "_SelectorSocketTransport", None)
_GATHERS = sys.version_info >= (3, 12)
_IOV_MAX = 1024  # buffers one sendmsg() takes (Linux's UIO_MAXIOV)


def write_pieces(transport: asyncio.WriteTransport, pieces: list[Any]) -> None:
    """``transport.write(b"".join(pieces))`` without the join where the transport allows.

    A plain TCP transport with nothing buffered hands the pieces to the kernel in one
    ``sendmsg``; what the socket did not take (or anything on another transport: TLS, a
    buffered one) goes through ``write``, which keeps the order and flow control.
    """
    if _GATHERS:
        transport.writelines(pieces)
        return
    if (
        type(transport) is not _SOCKET_TRANSPORT
        or transport.get_write_buffer_size()
        or transport.is_closing()
        or len(pieces) > _IOV_MAX
    ):
        transport.write(b"".join(pieces))
        return
    sock: socket.socket = transport._sock  # type: ignore[attr-defined]
    try:
        sent = sock.sendmsg(pieces)
    except OSError:  # would block, or broken: write() buffers it or closes as it should
        sent = 0
    for i, piece in enumerate(pieces):
        if sent < len(piece):
            rest = [memoryview(piece)[sent:], *pieces[i + 1 :]]
            transport.write(b"".join(rest))
            return
        sent -= len(piece)


def _conn_send(conn: AIOKafkaConnection, request: Any, expect_response: bool = True) -> Any:
    """``AIOKafkaConnection.send`` (aiokafka 0.14), the request written in pieces when flat."""
    if not getattr(request, "streamer_flat", False):
        return AIOKafkaConnection.send(conn, request, expect_response=expect_response)
    if conn._writer is None:
        raise errors.KafkaConnectionError(f"No connection to broker at {conn._host}:{conn._port}")
    struct = request.prepare(conn._versions)
    correlation_id = conn._next_correlation_id()
    header = struct.build_request_header(correlation_id=correlation_id, client_id=conn._client_id)
    pieces = _struct_pieces(struct, [b"", header.encode()])
    pieces[0] = Int32.encode(sum(map(len, pieces)))
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
    conn._requests.append((correlation_id, struct, fut))
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
