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
"""

from __future__ import annotations

from typing import Any

from aiokafka import AIOKafkaProducer
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


def flat_encode(struct: Any) -> bytes:
    """``struct.encode()`` of an aiokafka request struct, joined once."""
    schema = struct.SCHEMA
    out: list[Any] = []
    _pieces(schema, [struct.__dict__[name] for name in schema.names], out)
    return b"".join(out)


def _flat(request: Any) -> Any:
    """``request`` whose prepared struct encodes with :func:`flat_encode`."""
    prepare = request.prepare

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
    handler = _FlatProduceHandler(self, batches)
    await handler.do(node_id)
    self._in_flight.remove(node_id)
    for tp in batches:
        self._muted_partitions.remove(tp)


def install(producer: AIOKafkaProducer) -> None:
    """Encode this producer's produce requests flat (before ``start()``)."""
    sender = producer._sender
    sender._send_produce_req = _send_produce_req.__get__(sender)
