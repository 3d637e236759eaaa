"""Flat produce-request encoding: byte for byte what aiokafka writes, for every version, and
only on the producer it was installed on."""

from __future__ import annotations

import os

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.protocol.produce import ProduceRequest

from streamer.kafka.produce import _send_produce_req, flat_encode, install

VERSIONS = [cls.API_VERSION for cls in ProduceRequest._CLASSES]


def request(transactional_id: str | None) -> ProduceRequest:
    topics = [
        ("results", [(0, os.urandom(5000)), (3, bytearray(os.urandom(70))), (1, b"")]),
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


async def test_installed_on_one_producer_only() -> None:
    ours = AIOKafkaProducer(bootstrap_servers="127.0.0.1:1")
    other = AIOKafkaProducer(bootstrap_servers="127.0.0.1:1")
    install(ours)
    assert ours._sender._send_produce_req.__func__ is _send_produce_req
    assert "_send_produce_req" not in vars(other._sender)  # the class's own method
