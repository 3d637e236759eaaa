"""Outputs: one stage call's records grouped per topic-partition into OutBatches, split under
the request size, too-large results and dead letters handled, per-batch accounting."""

from __future__ import annotations

import functools
import itertools
import random
from dataclasses import dataclass, field

import pytest
from aiokafka.partitioner import DefaultPartitioner, murmur2
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.record.default_records import DefaultRecordBatch

from streamer.kafka.publisher import OutBatch, Partitions, record_size
from streamer.stream.outputs import Destinations, Outputs
from streamer.stream.records import Chunk, InvalidJson, ResultTooLarge, TopicPartition

RESULTS = Partitions("out", [0, 1, 2, 3], [0, 1, 2, 3])
DLQ = Partitions("dlq", [0, 1], [0, 1])
MAX = 64 * 1024


@dataclass
class Msg:
    offset: int
    key: bytes | None
    value: bytes | None = b'{"text": "x"}'
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    timestamp: int = 1_700_000_000_000


IN0 = TopicPartition("in", 0)


def chunk(keys: list[bytes | None], tp: TopicPartition = IN0, **kw) -> Chunk:
    messages = [Msg(i, k, **kw) for i, k in enumerate(keys)]
    return Chunk(tp, 1, messages, fetched_at=50.0 + tp.partition, remaining=len(keys))


def dest(max_request_size: int = MAX, *, build: bool = False, prebuild: bool = False):
    factory = None
    if build:
        factory = functools.partial(BatchBuilder, max_request_size, 0, is_transactional=False)
    return Destinations(RESULTS, DLQ, max_request_size, factory, prebuild)


def records(builder: BatchBuilder) -> list:
    """The records a closed (and built) aiokafka batch holds, read back as the broker would."""
    return list(DefaultRecordBatch(bytes(builder._build())))


@pytest.mark.parametrize("expected", [False, True], ids=["one-by-one", "hashed-together"])
def test_partitions_by_key_like_aiokafkas_default_partitioner(expected: bool) -> None:
    keys = [f"key-{i}".encode() for i in range(200)]
    c = chunk(keys)
    out = Outputs(dest(), model="m")
    if expected:  # the encode stage announces a batch's keys: hashed in one go
        out.expect([*keys, None])
    for i in range(len(keys)):
        out.result(c, i, b"v%d" % i, [])
    batches = out.batches()
    partitioner = DefaultPartitioner()
    landed = {}
    for b in batches:
        assert b.topic == "out" and not b.dead_letters
        for k in b.keys:
            landed[k] = b.partition
    assert len(landed) == 200
    for k, p in landed.items():
        assert p == partitioner(k, RESULTS.every, RESULTS.available)
        assert p == (murmur2(k) & 0x7FFFFFFF) % 4  # the Java client's choice
    assert {b.partition for b in batches} == {0, 1, 2, 3}
    assert len(batches) == 4  # one batch per partition
    for b in batches:  # in call order within a partition
        assert b.rows == sorted(b.rows)


def test_a_dead_letter_hashes_its_key_over_the_dlqs_partitions_not_the_results() -> None:
    """Keys announced for results map over the output topic's partitions only: a dead letter
    with the same key goes where the DLQ topic's own partition count puts it."""
    keys = [f"key-{i}".encode() for i in range(50)]
    c = chunk(keys)
    out = Outputs(dest(), model="m")
    out.expect(keys)
    for i in range(len(keys)):
        out.dead_letter(c, i, InvalidJson("no"))
    for b in out.batches():
        assert b.topic == "dlq"
        for k in b.keys:
            assert b.partition == (murmur2(k) & 0x7FFFFFFF) % 2


def test_keys_map_over_all_partitions_even_when_some_are_unavailable() -> None:
    parts = Partitions("out", [0, 1, 2, 3], [1])
    assert parts.for_key(b"key-3", 1) == (murmur2(b"key-3") & 0x7FFFFFFF) % 4
    assert parts.for_key(None, 1) == 1
    for _ in range(20):
        assert parts.sticky() == 1  # keyless only to available partitions


def test_keyless_records_stick_to_one_partition_per_call() -> None:
    rng_state = random.getstate()
    random.seed(12345)
    try:
        chosen = set()
        for _ in range(40):
            c = chunk([None] * 30 + [b"k"])
            out = Outputs(dest(), model="m")
            for i in range(31):
                out.result(c, i, b"v", [])
            batches = out.batches()
            keyless = [b for b in batches if None in b.keys]
            assert len(keyless) == 1 and keyless[0].keys.count(None) == 30
            chosen.add(keyless[0].partition)
    finally:
        random.setstate(rng_state)
    assert len(chosen) > 1  # sticky per call, not for ever: another call may pick another


def test_a_large_group_is_split_under_the_request_size() -> None:
    limit = 20_000
    c = chunk([b"same-key"] * 50)
    out = Outputs(dest(limit, build=True, prebuild=True), model="m")
    values = [b"%03d" % i + b"x" * 997 for i in range(50)]  # 50 KB for one partition
    for i, v in enumerate(values):
        out.result(c, i, v, [("h", b"1")])
    batches = out.batches()
    assert len(batches) >= 3 and len({b.partition for b in batches}) == 1
    assert [v for b in batches for v in b.values] == values  # all of them, in order
    for b in batches:
        assert b.builder is not None  # it fit one record batch
        assert len(b.builder._build()) <= limit


def test_results_and_dead_letters_go_to_their_own_topics() -> None:
    c = chunk([b"a", b"b", b"c"])
    out = Outputs(dest(), model="m")
    out.result(c, 0, b"r0", [])
    out.dead_letter(c, 1, InvalidJson("bad"))
    out.result(c, 2, b"r2", [])
    batches = out.batches()
    dead = [b for b in batches if b.dead_letters]
    results = [b for b in batches if not b.dead_letters]
    assert {b.topic for b in dead} == {"dlq"} and {b.topic for b in results} == {"out"}
    assert sum(len(b) for b in results) == 2
    (d,) = dead
    assert d.partition == DefaultPartitioner()(b"b", DLQ.every, DLQ.available)
    assert d.keys == [b"b"] and d.values == [c.messages[1].value]  # the input, unchanged
    assert d.errors is not None and isinstance(d.errors[0], InvalidJson)
    h = dict(d.headers[0])
    assert h["streamer.error.class"] == b"InvalidJson"
    assert h["streamer.source.offset"] == b"1"
    assert d.model == "" and results[0].model == "m"


def test_too_large_result_becomes_a_dead_letter() -> None:
    limit = 4096
    c = chunk([b"k0", b"k1"], headers=[("trace", b"t")])
    out = Outputs(dest(limit), model="m")
    out.result(c, 0, b"x" * 5000, [])
    out.result(c, 1, b"small", [])
    batches = out.batches()
    (dead,) = [b for b in batches if b.dead_letters]
    (ok,) = [b for b in batches if not b.dead_letters]
    assert ok.values == [b"small"] and ok.rows == [1]
    assert dead.topic == "dlq" and dead.rows == [0] and dead.chunks == [c]
    assert dead.values == [c.messages[0].value]  # the input goes to the DLQ
    assert dead.errors is not None and isinstance(dead.errors[0], ResultTooLarge)
    h = dict(dead.headers[0])
    assert h["trace"] == b"t"  # the input's headers are kept
    assert h["streamer.error.class"] == b"ResultTooLarge"
    assert h["streamer.error.stage"] == b"publish"
    assert b"max_request_size=4096" in h["streamer.error.message"]
    assert "streamer.error.value_dropped" not in h
    assert dead.labels == {("in", "ResultTooLarge"): 1}


def test_the_limit_is_the_records_size_in_a_batch_of_its_own() -> None:
    limit = 100_000
    headers = [("traceparent", b"00-" + b"1" * 32 + b"-" + b"2" * 16 + b"-01")]
    n = limit - record_size(b"k", b"", headers)
    while record_size(b"k", b"x" * n, headers) > limit:  # varint lengths: settle on the edge
        n -= 1
    c = chunk([b"k", b"k"])
    out = Outputs(dest(limit), model="m")
    out.result(c, 0, b"x" * n, headers)  # exactly at the limit: a result
    out.result(c, 1, b"x" * (n + 1), headers)  # one byte over: a dead letter
    kinds = {(b.dead_letters, tuple(b.rows)) for b in out.batches()}
    assert kinds == {(False, (0,)), (True, (1,))}


def test_too_large_dead_letter_drops_its_value_but_keeps_the_reason() -> None:
    limit = 4096
    c = chunk([b"k"], value=b"y" * 10_000, headers=[("h", b"v")])
    out = Outputs(dest(limit, build=True), model="m")
    out.dead_letter(c, 0, InvalidJson("not json"))
    (d,) = out.batches()
    assert d.values == [None] and d.keys == [b"k"]
    h = dict(d.headers[0])
    assert h["streamer.error.value_dropped"] == b"true"
    assert h["streamer.error.class"] == b"InvalidJson" and h["h"] == b"v"
    assert d.builder is not None and len(d.builder._build()) < limit
    (rec,) = records(d.builder)
    assert rec.value is None and rec.key == b"k"


def test_dead_letter_value_dropped_on_request() -> None:
    c = chunk([b"k"])
    out = Outputs(dest(), model="m")
    out.dead_letter(c, 0, InvalidJson("bad"), drop_value=True)
    (d,) = out.batches()
    assert d.values == [None]
    assert dict(d.headers[0])["streamer.error.value_dropped"] == b"true"


def test_finish_accounts_per_chunk_and_label() -> None:
    a = chunk([b"k"] * 3, TopicPartition("in", 0))
    b = chunk([b"k"] * 2, TopicPartition("in", 1))
    other = chunk([b"k"], TopicPartition("in2", 0))
    out = Outputs(dest(), model="m")
    for c in (a, b, other):
        for i in range(len(c.messages)):
            out.result(c, i, b"v", [])
    (batch,) = out.batches()  # one key: one partition, one batch
    assert batch.counts == {a: 3, b: 2, other: 1}
    assert batch.labels == {("in", "m"): 5, ("in2", "m"): 1}
    assert batch.fetched_at is not None
    assert batch.fetched_at.tolist() == [50.0, 50.0, 50.0, 51.0, 51.0, 50.0]  # per record
    assert batch.timestamps_ms is not None
    assert batch.timestamps_ms.tolist() == [1_700_000_000_000.0] * 6
    assert batch.builder is None  # no builder factory: the loop builds on send

    dead = Outputs(dest(), model="m")
    dead.dead_letter(a, 0, InvalidJson("x"))
    dead.dead_letter(a, 1, ResultTooLarge("y"))
    dead.dead_letter(b, 0, InvalidJson("z"))
    (d,) = dead.batches()
    assert d.counts == {a: 2, b: 1}
    assert d.labels == {("in", "InvalidJson"): 2, ("in", "ResultTooLarge"): 1}


@pytest.mark.parametrize("prebuild", [False, True])
def test_prebuilt_builder_holds_every_record(prebuild: bool) -> None:
    c = chunk([b"k%d" % i for i in range(40)])
    out = Outputs(dest(build=True, prebuild=prebuild), model="m")
    for i in range(40):
        out.result(c, i, b"value-%d" % i, [("n", str(i).encode())])
    batches = out.batches()
    assert sum(len(b) for b in batches) == 40
    for b in batches:
        assert b.builder is not None
        assert b.builder._relative_offset == len(b)
        assert (b.builder._buffer is not None) == prebuild  # serialised on this thread
        got = records(b.builder)
        assert [r.key for r in got] == b.keys
        assert [r.value for r in got] == b.values
        assert [list(r.headers) for r in got] == [list(h) for h in b.headers]


def test_out_batch_select_and_split_keep_records_and_accounting() -> None:
    c = chunk([b"k"] * 4)
    errors = [InvalidJson(str(i)) for i in range(4)]
    ob = OutBatch(
        "dlq",
        0,
        True,
        [b"k"] * 4,
        [b"v%d" % i for i in range(4)],
        [[] for _ in range(4)],
        [c] * 4,
        [0, 1, 2, 3],
        errors,
    ).finish()
    assert ob.counts == {c: 4} and ob.labels == {("in", "InvalidJson"): 4}
    part = ob.select([1, 3])
    assert part.values == [b"v1", b"v3"] and part.rows == [1, 3]
    assert part.errors == [errors[1], errors[3]] and part.counts == {c: 2}
    singles = ob.split()
    assert [s.values for s in singles] == [[b"v0"], [b"v1"], [b"v2"], [b"v3"]]
    assert all(s.counts == {c: 1} for s in singles)


def test_spans_end_once_every_batch_of_the_call_is_acknowledged() -> None:
    class Span:
        ended = 0

        def end(self) -> None:
            self.ended += 1

    span = Span()
    c = chunk([b"k%d" % i for i in range(50)])
    out = Outputs(dest(), model="m")
    out.spans.append(span)
    for i in range(50):
        out.result(c, i, b"v", [])
    batches = out.batches()
    assert len(batches) > 1
    for b in batches[:-1]:
        for s in b.spans:
            s.end()
    assert span.ended == 0
    for s in batches[-1].spans:
        s.end()
    assert span.ended == 1


def test_no_records_no_batches() -> None:
    assert Outputs(dest()).batches() == []


def test_a_dead_letter_whose_key_or_headers_are_too_large_keeps_only_its_reason() -> None:
    """A key (or headers) over the request size: the DLQ copy drops them too, with a marker,
    instead of a refusal that would stop the service."""
    big_key = b"k" * (MAX + 10)
    c = chunk([big_key, b"small"], headers=[("h", b"x" * 10), ("null", None)])
    out = Outputs(dest())
    out.dead_letter(c, 0, InvalidJson("bad"))
    out.dead_letter(c, 1, InvalidJson("bad"))
    # A null key goes to any DLQ partition: read the records back by input row, not by batch.
    by_row = {r: (b.keys[j], b.headers[j]) for b in out.batches() for j, r in enumerate(b.rows)}
    assert [by_row[0][0], by_row[1][0]] == [None, b"small"]
    first, second = dict(by_row[0][1]), dict(by_row[1][1])
    assert first["streamer.error.key_and_headers_dropped"] == b"true"
    assert "h" not in first and first["streamer.error.class"] == b"InvalidJson"
    assert second["h"] == b"x" * 10 and second["null"] is None  # a null header value is fine
    stripped = Outputs(dest())
    stripped.dead_letter(c, 1, InvalidJson("bad"), strip=True)
    (again,) = stripped.batches()
    assert again.keys == [None] and again.values == [None]
    assert all(k.startswith("streamer.") for k, _ in again.headers[0])


def test_keyless_records_move_on_to_the_next_partition_when_their_batch_is_full() -> None:
    """As Kafka's sticky partitioner: a full batch sends keyless records to another partition
    (one produce request then carries both batches); keyed records stay where their key says."""
    limit = 20_000
    c = chunk([None] * 60 + [b"same-key"] * 30)
    out = Outputs(dest(limit), model="m")
    values = [b"%03d" % i + b"x" * 997 for i in range(90)]
    for i, v in enumerate(values):
        out.result(c, i, v, [])
    batches = out.batches()
    keyed_at = {b.partition for b in batches if b"same-key" in b.keys}
    assert len(keyed_at) == 1  # a key keeps its partition, full or not
    starts = sorted((b.values[0], b.partition) for b in batches if b.keys[0] is None)
    keyless_at = [p for _, p in starts]  # the partitions keyless records moved through
    assert sorted(keyless_at) == [0, 1, 2, 3]
    assert all(b == RESULTS.after(a) for a, b in itertools.pairwise(keyless_at))
    assert all(sum(len(v) + 64 for v in b.values) <= limit * 0.9 for b in batches)
    sent = sorted(v for b in batches for v in b.values)
    assert sent == sorted(values)  # every record once


def test_the_next_partition_skips_unavailable_ones() -> None:
    parts = Partitions("out", [0, 1, 2, 3], [1, 3])
    assert [parts.after(p) for p in (0, 1, 2, 3)] == [1, 3, 3, 1]


def _placed(out: Outputs) -> dict[tuple[str, int], list[tuple]]:
    """Each topic-partition's batches, in order, as what they hold."""
    by: dict[tuple[str, int], list[tuple]] = {}
    for b in out.batches():
        by.setdefault((b.topic, b.partition), []).append(
            (b.dead_letters, b.keys, b.values, b.headers, b.rows, [c.tp for c in b.chunks])
        )
    return by


@pytest.mark.parametrize("seed", range(60))
def test_results_in_bulk_place_every_record_as_one_by_one_would(seed: int) -> None:
    """``results`` (the encode stage's usual path) against ``result`` per record, over random
    calls: keyed, keyless and mixed keys, values from a few bytes to past the request size,
    trace headers, batches split at the size limit, keyless records moving on, partitions
    unavailable, and groups already holding records (dead letters and results of the same call
    before it)."""
    rng = random.Random(seed)
    limit = rng.choice([80_000, 150_000, 1 << 20])  # above the 64 KB "cannot be too large" margin
    n = rng.randint(1, 120)
    kind = rng.choice(["keyed", "keyless", "mixed", "one-key"])
    keys: list[bytes | None] = [
        None
        if kind == "keyless" or (kind == "mixed" and rng.random() < 0.5)
        else (b"k" if kind == "one-key" else b"key-%d" % rng.randint(0, 30))
        for _ in range(n)
    ]
    big = rng.random() < 0.2
    values = [
        b"v"
        * rng.choice(
            [rng.randint(1, 3000), rng.randint(1, limit)] if big else [rng.randint(1, 3000)]
        )
        for _ in range(n)
    ]
    headers = [
        [("traceparent", b"00-%032x-%016x-01" % (j, j))] if rng.random() < 0.3 else []
        for j in range(n)
    ]
    tps = [TopicPartition("in", 0), TopicPartition("in", 1)]
    chunks = [chunk(keys, tp) for tp in tps]
    which = [rng.randrange(2) for _ in range(n)]
    before = rng.randint(0, 5)  # records of the same call already grouped
    pre_seed = rng.random()
    results = rng.choice(  # all available, some not (keyless skip those), a single one
        [RESULTS, Partitions("out", [0, 1, 2, 3], [1, 3]), Partitions("out", [0], [0])]
    )
    announced = rng.random() < 0.8  # the encode stage announces keys; the bulk path needs not

    def run(bulk: bool) -> dict:
        random.seed(seed)  # the sticky partition's random pick, the same for both
        out = Outputs(Destinations(results, DLQ, limit), model="m")
        if announced:
            out.expect(keys)
        pre = random.Random(pre_seed)  # the same earlier records for both
        for j in range(before):
            if pre.random() < 0.5:
                out.dead_letter(chunks[0], j % n, InvalidJson("no"))
            else:
                out.result(chunks[0], j % n, b"w" * pre.randint(1, limit // 3), [])
        cs = [chunks[w] for w in which]
        if bulk:
            out.results(cs, list(range(n)), keys, values, headers)
        else:
            for j in range(n):
                out.result(cs[j], j, values[j], headers[j])
        return _placed(out)

    bulk, one_by_one = run(True), run(False)
    assert bulk == one_by_one
    placed = sum(len(b[1]) for batches in bulk.values() for b in batches)
    assert placed == n + before
