"""Keys hashed together land where aiokafka's (the Java client's) murmur2 puts them, one by
one: every length (the 4-byte blocks and each tail), empty keys, many keys of one length."""

from __future__ import annotations

import random

from aiokafka.partitioner import DefaultPartitioner, murmur2

from streamer.kafka.murmur2 import murmur2_many
from streamer.kafka.publisher import Partitions


def test_the_same_hash_as_aiokafka_for_every_length_and_byte() -> None:
    rng = random.Random(7)
    keys = [rng.randbytes(rng.randint(0, 70)) for _ in range(5000)]
    keys += [b"id-%d" % i for i in range(2000)]  # few lengths, many keys each: numpy's path
    keys += [b"", b"\xff" * 9, bytes(range(256))]
    assert murmur2_many(keys).tolist() == [murmur2(k) for k in keys]
    assert murmur2_many([]).tolist() == []


def test_partitions_for_keys_are_those_of_for_key() -> None:
    parts = Partitions("out", [0, 1, 2, 3, 4, 5, 6], [0, 2, 4])
    keys = [b"user-%d" % i for i in range(500)] + [b"k", b"", b"\x00\x01\x02"]
    expected = [DefaultPartitioner()(k, parts.every, parts.available) for k in keys]
    assert parts.for_keys(keys) == expected == [parts.for_key(k, -1) for k in keys]
