"""Hostile input, as a property: whatever the keys, values and headers of the records, every one
comes out exactly once (a result or a dead letter) and the service never dies; values over
``input.max_record_bytes`` are refused before they are decoded.

* the decoder, on generated values: ``(text, id)`` or a :class:`RecordError`, nothing else;
* the thread-side stages (prepare, then encode) on generated records, without Kafka;
* one in-process service against the embedded broker, fed generated batches (Hypothesis);
* megabytes of text against the default ``input.max_record_bytes``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import psutil
import pytest
from hypothesis import HealthCheck, Phase, assume, example, given, settings
from hypothesis import strategies as st
from support import WORDS, Msg, RunningService, base_config, read_topic

from streamer.config import InputConfig, RoutingConfig, load_config
from streamer.kafka.broker import create_topics
from streamer.kafka.publisher import Partitions
from streamer.models.backends import create_model
from streamer.models.registry import ModelRegistry
from streamer.models.worker import Inferred
from streamer.observability.tracecontext import parse_traceparent
from streamer.observability.tracing import Tracing
from streamer.stream import records as r
from streamer.stream.codec import ERROR_HEADERS, Decoder, result_value
from streamer.stream.encode import Encoder
from streamer.stream.outputs import Destinations
from streamer.stream.prepare import Preparer

# What a value alone can be refused for (stage "decode"), and a routing header (stage "route").
DECODE_ERRORS = {
    r.InvalidUtf8,
    r.InvalidJson,
    r.NotAnObject,
    r.MissingText,
    r.TextNotAString,
    r.EmptyText,
    r.RecordTooLarge,
}
INPUT_ERRORS = {cls.__name__ for cls in DECODE_ERRORS} | {"UnknownModel", "TextTooLong"}
ROUTE_HEADER = RoutingConfig().header  # the record header that asks for a model
MAX_RECORD_BYTES = 2000  # small, to reach the limit with values of a few KB


# -- strategies -----------------------------------------------------------------------------------
JSON_KEYS = st.sampled_from(["text", "id", "a", "b", "", "TEXT"]) | st.text(max_size=8)
JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=1, max_value=400).map(lambda n: int("9" * n))  # past 64 bits
    | st.floats()  # NaN and ±Infinity too: json.dumps writes them as bare tokens
    | st.text(max_size=20)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(JSON_KEYS, inner, max_size=4),
    max_leaves=12,
)
# JSON every parser reads the same (finite doubles, integers of up to 64 bits)
SANE_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(JSON_KEYS, inner, max_size=4),
    max_leaves=12,
)
BLANK = st.text(alphabet=" \t\n\r\u00a0\u2003\u3000\x0b\x0c", max_size=8)
TEXTS = st.text(min_size=1, max_size=60).filter(lambda t: bool(t.strip()))
WORDY = st.lists(st.sampled_from(WORDS), min_size=1, max_size=12).map(" ".join)
BAD_UTF8 = st.sampled_from(
    [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xed\xbf\xbf", b"\xf4\x90\x80\x80", b"\xc0\x80", b"\x80"]
)


def _dumps(obj: Any, ascii_only: bool = True) -> bytes:
    return json.dumps(obj, ensure_ascii=ascii_only).encode("utf-8")


def _splice(data: bytes, at: int, insert: bytes, cut: int) -> bytes:
    at %= len(data) + 1
    return data[:at] + insert + data[at + cut :]


_DOCS = st.fixed_dictionaries(
    {"text": TEXTS | WORDY}, optional={"id": SANE_JSON, "extra": SANE_JSON}
)
VALID_JSON = st.builds(_dumps, _DOCS, st.booleans())
VALUES = st.one_of(
    st.none(),  # a tombstone
    st.binary(max_size=300),
    st.text(max_size=80).map(str.encode),  # plain text, not JSON
    st.builds(_dumps, JSON_VALUES, st.booleans()),  # any JSON: arrays, scalars, odd objects
    VALID_JSON,
    st.builds(_splice, VALID_JSON, st.integers(0, 500), st.binary(max_size=3), st.integers(0, 3)),
    st.builds(lambda v: _dumps({"text": v}), JSON_VALUES),  # text of any type
    st.builds(lambda t, v: _dumps({"text": t, "id": v}), TEXTS, JSON_VALUES),  # id of any type
    st.builds(lambda v: _dumps({"id": 1, "text": v}), BLANK),  # empty or only whitespace
    st.builds(lambda v: _dumps({"body": v}), TEXTS),  # no text field
    st.builds(
        lambda pre, bad, post: b'{"text": "' + pre.encode() + bad + post.encode() + b'"}',
        st.text(max_size=10),
        BAD_UTF8,
        st.text(max_size=10),
    ),
    # surrogates escaped in JSON: lone high or low, reversed pairs, and a valid pair
    st.from_regex(
        r'\A\{"id": 7, "text": "[a-z ]{0,5}(\\u[dD][89abAB][0-9a-fA-F]{2}|\\u[dD][c-fC-F]'
        r'[0-9a-fA-F]{2}|\\ud83d\\ude00)+[a-z ]{0,5}"\}\Z',
        fullmatch=True,
    ).map(str.encode),
    # deep nesting, beside a valid text and as the text
    st.integers(1, 1500).map(lambda n: b'{"text": "ok", "id": ' + b"[" * n + b"]" * n + b"}"),
    st.integers(1, 1500).map(lambda n: b'{"text": ' + b'{"a": ' * n + b"1" + b"}" * n + b"}"),
    # bare NaN-like tokens and numbers that do not fit a double
    st.sampled_from([b"NaN", b"-Infinity", b'{"text": "x", "id": 1e400}', b'{"text": NaN}']),
    # a long text (over model.max_length tokens) and values over input.max_record_bytes
    st.integers(100, 300).map(lambda n: _dumps({"id": n, "text": " ".join(WORDS) * (n // 50)})),
    st.integers(MAX_RECORD_BYTES - 20, 2 * MAX_RECORD_BYTES).map(
        lambda n: _dumps({"text": "x" * n})
    ),
)
KEYS = (
    st.none()
    | st.just(b"")
    | st.binary(max_size=40)
    | st.text(max_size=20).map(str.encode)
    | st.binary(min_size=1000, max_size=3000)  # long
)
TRACEPARENTS = (
    st.from_regex(r"\A0[0-9a-e]-[0-9a-f]{32}-[0-9a-f]{16}-0[0-3]\Z").map(str.encode)  # valid
    | st.from_regex(r"\A[0-9a-fA-Fx]{2}-[0-9a-fA-F]{1,33}-[0-9a-fA-F]{15,17}-[0-9a-f]{2}\Z").map(
        str.encode
    )
    | st.just(b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    | st.just(b"00-00000000000000000000000000000000-00f067aa0ba902b7-01")
)
HEADER_NAMES = st.sampled_from(
    ["traceparent", "tracestate", ROUTE_HEADER, "custom", "", "streamer.error.class"]
) | st.text(max_size=20)
HEADER_VALUES = (
    st.none()  # Kafka headers are nullable: a Java producer sends a null value
    | st.binary(max_size=40)
    | TRACEPARENTS
    | st.sampled_from([b"tiny", b"tiny@1", b"tiny@2", b"other", b"\xff\xfe", "tïny".encode()])
    | st.text(max_size=20).map(str.encode)  # tracestate et al., non-ASCII UTF-8 too
)
HEADERS = st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=6)


@dataclass(frozen=True)
class Rec:
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]


def _traced(rec: Rec) -> Rec:
    """The record with a valid traceparent in front and a non-ASCII tracestate after it."""
    tp = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    return Rec(
        rec.key, rec.value, (("traceparent", tp), *rec.headers, ("tracestate", "ä=ö".encode()))
    )


RECORDS = st.builds(Rec, KEYS, VALID_JSON | VALUES, HEADERS.map(tuple))  # half of them valid
RECORDS = (
    RECORDS
    | RECORDS.map(_traced)
    | st.builds(  # asking for a model by header: loaded, not loaded, not even text
        lambda rec, ask: Rec(rec.key, rec.value, (*rec.headers, (ROUTE_HEADER, ask))),
        RECORDS,
        st.sampled_from([b"tiny", b"tiny@1", b" tiny ", b"tiny@2", b"other", b"", b"\xff@\xfe"]),
    )
)


# -- 1. the decoder -------------------------------------------------------------------------------
DECODERS = [
    InputConfig(max_record_bytes=MAX_RECORD_BYTES),
    InputConfig(max_record_bytes=64),
    InputConfig(id_field=None),
    InputConfig(text_field="text.a", id_field="id.0"),
    InputConfig(format="text", max_record_bytes=MAX_RECORD_BYTES),
]


def _deep_id(depth: int) -> bytes:
    return b'{"text": "ok", "id": ' + b"[" * depth + b"]" * depth + b"}"


def _dotted(obj: Any, path: str) -> tuple[bool, Any]:
    for part in path.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return False, None
        obj = obj[part]
    return True, obj


def test_an_id_a_result_cannot_carry_is_refused_as_the_inputs_fault() -> None:
    """orjson reads 1024 levels of nesting but writes 254: a deeper id used to pass decoding
    and fail every result as EncodeFailed, a systemic error that trips the breaker."""
    decoder = Decoder(InputConfig())
    _, record_id = decoder.decode(_deep_id(253))
    frag = orjson.Fragment(b"{}")
    assert orjson.loads(result_value(record_id, frag, frag, "t", 0, 1))["id"] == record_id
    with pytest.raises(r.InvalidJson, match="field 'id' cannot be written back"):
        decoder.decode(_deep_id(254))


def _as_doubles(obj: Any) -> Any:
    """``obj`` with the integers outside 64 bits as doubles, as orjson reads them."""
    if isinstance(obj, dict):
        return {k: _as_doubles(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_as_doubles(v) for v in obj]
    if isinstance(obj, int) and not isinstance(obj, bool) and not -(2**63) <= obj < 2**64:
        return float(obj)
    return obj


@settings(max_examples=300, deadline=None)
@given(cfg=st.sampled_from(DECODERS), value=VALUES)
@example(cfg=DECODERS[0], value=_deep_id(254))  # was decoded, then failed the encode stage
def test_decoder_returns_text_or_raises_a_record_error(
    cfg: InputConfig, value: bytes | None
) -> None:
    try:
        text, record_id = Decoder(cfg).decode(value)
    except r.RecordError as err:  # anything else fails the test: it would kill the stage
        assert type(err) in DECODE_ERRORS and err.stage == "decode" and err.message
        if value is not None and len(value) > cfg.max_record_bytes:
            assert isinstance(err, r.RecordTooLarge)
            assert f"value is {len(value)} bytes" in err.message  # refused before decoding
        return
    assert value is not None and len(value) <= cfg.max_record_bytes
    assert isinstance(text, str) and text.strip()
    text.encode("utf-8")  # no lone surrogate gets through to the tokenizer or the result
    if cfg.format == "text":
        assert (text, record_id) == (value.decode("utf-8"), None)
        return
    # The same text (and id) as the standard library finds at the configured paths.
    obj = json.loads(value)
    assert _dotted(obj, cfg.text_field) == (True, text)
    expected = _as_doubles(_dotted(obj, cfg.id_field)[1] if cfg.id_field else None)
    assert orjson.dumps(record_id) == orjson.dumps(expected)
    frag = orjson.Fragment(b"{}")
    result_value(record_id, frag, frag, "t", 0, 1)  # whatever the id, a result can carry it


@settings(max_examples=200, deadline=None)
@given(doc=_DOCS, ascii_only=st.booleans())
def test_decoder_accepts_every_object_with_a_text(doc: dict[str, Any], ascii_only: bool) -> None:
    """The other side: what is well formed is never refused (the property above is not met by
    refusing everything)."""
    value = _dumps(doc, ascii_only)
    text, record_id = Decoder(InputConfig(max_record_bytes=1 << 20)).decode(value)
    assert text == doc["text"]
    assert orjson.dumps(record_id) == orjson.dumps(orjson.loads(value).get("id"))


# -- 2. prepare and encode, without Kafka ---------------------------------------------------------
RESULTS = Partitions("in.out", [0, 1, 2], [0, 1, 2])
DLQ = Partitions("in.dlq", [0, 1], [0, 1])


class _LoadHere:
    """The worker's part in loading a model, on the calling thread."""

    async def load(self, factory: Any) -> Any:
        model = factory()
        model.load()
        return model


VARIANTS = {  # name: (tracing on, input settings)
    "plain": (False, {}),
    "traced": (True, {}),
    "to the dlq": (False, {"on_tombstone": "dlq", "on_too_long": "dlq"}),
    "skipping": (True, {"on_tombstone": "skip"}),
}


@pytest.fixture(scope="module")
def stages(tiny_model: Path) -> dict[str, tuple[Any, Preparer, Encoder]]:
    """A prepare and an encode stage over the tiny model per variant (and its config)."""
    base = load_config(
        None,
        **base_config(
            "127.0.0.1:9", tiny_model, "in", input={"max_record_bytes": MAX_RECORD_BYTES}
        ),
    )
    registry = ModelRegistry(_LoadHere(), lambda m: create_model(m, threads=1), base.routing)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # its own loop, not the tests'
        pool.submit(asyncio.run, registry.load_all(base.model_list())).result()
    out = {}
    for name, (traced, inputs) in VARIANTS.items():
        cfg = base.model_copy(update={"input": base.input.model_copy(update=inputs)})
        # kafka_export turns spans on; without its exporter attached, they go nowhere
        tracing = Tracing(cfg.tracing.model_copy(update={"kafka_export": traced}))
        assert tracing.enabled is traced
        out[name] = (cfg, Preparer(cfg, registry, tracing), Encoder(cfg, tracing))
    return out


def _tail_headers(headers: list[tuple[str, bytes | None]]) -> tuple[list, dict[str, str], bool]:
    """A dead letter's headers split into (the input's, streamer's error headers, value dropped)."""
    dropped = bool(headers) and headers[-1] == ("streamer.error.value_dropped", b"true")
    if dropped:
        headers = headers[:-1]
    tail = headers[-len(ERROR_HEADERS) :]
    assert [k for k, _ in tail] == list(ERROR_HEADERS)
    return headers[: -len(ERROR_HEADERS)], {k: v.decode() for k, v in tail}, dropped


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(recs=st.lists(RECORDS, min_size=1, max_size=25), variant=st.sampled_from(list(VARIANTS)))
@example(recs=[Rec(None, b'{"": ""}', (("traceparent", None),))], variant="plain")  # null header
@example(recs=[Rec(None, _deep_id(254), ())], variant="plain")
def test_prepare_and_encode_account_for_every_record(
    stages: dict[str, tuple[Any, Preparer, Encoder]], recs: list[Rec], variant: str
) -> None:
    cfg, prepare, encode = stages[variant]
    msgs = [Msg(i, rec.key, rec.value, list(rec.headers)) for i, rec in enumerate(recs)]
    chunk = r.Chunk(r.TopicPartition("in", 0), 0, msgs, 0.0, 1)
    dest = Destinations(RESULTS, DLQ, 1 << 20)
    prepared = prepare([chunk], dest)  # never raises: a bad record is a dead letter
    outs = list(prepared.dead)
    for rows in prepared.rows:
        outputs = np.zeros((len(rows), 32), np.float32)
        outputs[:, 0] = 1.0
        outs += encode(rows, Inferred(outputs, {}), dest, [])
    tombstones = [i for i, rec in enumerate(recs) if rec.value is None]
    seen: Counter[int] = Counter()
    for out in outs:
        for j, i in enumerate(out.rows):
            seen[i] += 1
            rec, key, value, headers = recs[i], out.keys[j], out.values[j], out.headers[j]
            assert key == rec.key
            if out.dead_letters:
                assert out.topic == "in.dlq"
                original, h, dropped = _tail_headers(headers)
                assert original == list(rec.headers)  # the input's headers unchanged
                assert value == rec.value and not dropped
                assert h["streamer.source.offset"] == str(i)
                cls, stage = h["streamer.error.class"], h["streamer.error.stage"]
                assert cls in INPUT_ERRORS, h  # nothing systemic: the breaker counts those
                if stage == "decode":  # the decoder's own verdict
                    with pytest.raises(r.RecordError) as err:
                        Decoder(cfg.input).decode(rec.value)
                    assert err.type.__name__ == cls
                    assert rec.value is not None or cfg.input.on_tombstone == "dlq"
            elif rec.value is None:  # a tombstone, passed on
                assert cfg.input.on_tombstone == "pass" and value is None
            else:
                doc = orjson.loads(value)
                assert doc["source"] == {"topic": "in", "partition": 0, "offset": i}
                assert doc["result"]["embedding"][0] == 1.0
    if cfg.input.on_tombstone == "skip":
        assert prepared.skipped == ({chunk: len(tombstones)} if tombstones else {})
        seen.update(tombstones)
    assert seen == Counter(range(len(recs)))  # every record exactly once


# -- 3. the service, against the broker -----------------------------------------------------------
class Harness:
    """One service (in-process, on an event loop of its own thread) for a whole property run;
    every example produces a batch to the same topic and checks everything produced so far."""

    def __init__(self, broker: str, topic: str, model: Path) -> None:
        self.broker, self.topic = broker, topic
        self.cfg = load_config(
            None,
            **base_config(broker, model, topic, input={"max_record_bytes": MAX_RECORD_BYTES}),
        )
        self.decoder = Decoder(self.cfg.input)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="hostile", daemon=True)
        self.inputs: dict[tuple[int, int], Rec] = {}
        self.results: list[Any] = []
        self.dead: list[Any] = []
        self.svc: RunningService | None = None
        self.broken: tuple[list[Rec], str] | None = None  # the batch it stopped on, and why

    def call(self, coro: Any, timeout_s: float = 120.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def __enter__(self) -> Harness:
        self.thread.start()
        self.call(self._start())
        return self

    async def _start(self) -> None:
        from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

        await create_topics(self.broker, {self.topic: 3})
        self.producer = AIOKafkaProducer(bootstrap_servers=self.broker, acks="all", linger_ms=2)
        await self.producer.start()
        self.reader = AIOKafkaConsumer(
            f"{self.topic}.out",
            f"{self.topic}.dlq",
            bootstrap_servers=self.broker,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await self.reader.start()
        self.svc = RunningService(self.cfg)
        await self.svc.__aenter__()

    def stop(self) -> int:
        assert self.svc is not None
        return self.call(self.svc.stop())

    def __exit__(self, *exc: object) -> None:
        try:
            self.call(self._close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(30)
            self.loop.close()

    async def _close(self) -> None:
        if self.svc is not None:
            await self.svc.stop()
        await self.producer.stop()
        await self.reader.stop()

    async def _produce(self, recs: list[Rec]) -> list[Any]:
        futs = []
        for i, rec in enumerate(recs):
            headers = list(rec.headers)
            if rec.key is None and rec.value is None:
                # a keyless tombstone: legal in Kafka, but send() refuses it; a batch takes it
                batch = self.producer.create_batch()
                batch.append(key=None, value=None, timestamp=None, headers=headers)
                futs.append(await self.producer.send_batch(batch, self.topic, partition=i % 3))
            else:
                futs.append(
                    await self.producer.send(
                        self.topic, value=rec.value, key=rec.key, headers=headers
                    )
                )
        await self.producer.flush()
        return list(await asyncio.gather(*futs))

    async def _read(self, total: int) -> None:
        """Outputs until ``total`` arrived, then one more poll: a duplicate would show."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        got = len(self.results) + len(self.dead)
        extra_polls = 2
        while extra_polls and loop.time() < deadline:
            batch = await self.reader.getmany(timeout_ms=200)
            for tp, msgs in batch.items():
                (self.dead if tp.topic.endswith(".dlq") else self.results).extend(msgs)
                got += len(msgs)
            if got >= total:
                extra_polls -= 1

    def example(self, recs: list[Rec]) -> None:
        assert self.svc is not None
        if self.broken is not None:  # only the batch that killed it fails (Hypothesis replays it)
            assume(recs == self.broken[0])
            raise AssertionError(f"the service died on this batch: {self.broken[1]}")
        for md, rec in zip(self.call(self._produce(recs)), recs, strict=True):
            self.inputs[md.partition, md.offset] = rec
        total = len(self.inputs)
        try:
            self.call(self.svc.wait_done(total, timeout_s=60))
        except Exception as exc:
            failure = self.svc.service.pipeline.failure
            why = f"{failure!r} (caused by {failure.__cause__!r})" if failure else repr(exc)
            self.broken = recs, why
            raise AssertionError(f"the service died on this batch: {why}") from exc
        self.call(self._read(total))
        assert self.svc.service.pipeline.failure is None
        assert self.svc.exit_code is None  # still running
        self.check()

    def check(self) -> None:
        """Every input (partition, offset) exactly once across results and dead letters."""
        seen: Counter[tuple[int, int]] = Counter()
        passed_on: Counter[bytes | None] = Counter()  # tombstones' keys, passed on as deletes
        for m in self.dead:
            original, h, dropped = _tail_headers(list(m.headers))
            assert h["streamer.source.topic"] == self.topic
            where = int(h["streamer.source.partition"]), int(h["streamer.source.offset"])
            seen[where] += 1
            rec = self.inputs[where]
            assert original == list(rec.headers)  # unchanged, null values and all
            assert m.key == rec.key and m.value == rec.value and not dropped
            cls = h["streamer.error.class"]
            assert cls in INPUT_ERRORS, h
            if h["streamer.error.stage"] == "decode":  # the decoder's own verdict
                with pytest.raises(r.RecordError) as err:
                    self.decoder.decode(rec.value)
                assert err.type.__name__ == cls
            else:
                assert (cls, h["streamer.error.stage"]) in {
                    ("UnknownModel", "route"),
                    ("TextTooLong", "tokenize"),
                }
        for m in self.results:
            if m.value is None:
                passed_on[m.key] += 1
                continue
            doc = orjson.loads(m.value)
            assert doc["source"]["topic"] == self.topic
            where = doc["source"]["partition"], doc["source"]["offset"]
            seen[where] += 1
            rec = self.inputs[where]
            assert m.key == rec.key
            _, record_id = self.decoder.decode(rec.value)
            assert orjson.dumps(doc["id"]) == orjson.dumps(record_id)
            assert len(doc["result"]["embedding"]) == 32
            self._check_trace(rec, dict(m.headers))
        tombstones = {w: rec for w, rec in self.inputs.items() if rec.value is None}
        assert Counter(rec.key for w, rec in tombstones.items() if w not in seen) == passed_on
        assert set(seen) | set(tombstones) == set(self.inputs)
        assert all(n == 1 for n in seen.values()), [w for w, n in seen.items() if n > 1]

    @staticmethod
    def _check_trace(rec: Rec, out: dict[str, bytes]) -> None:
        """A valid incoming traceparent goes on (same trace, new span); nothing else does."""
        tp = ts = None
        for k, v in rec.headers:  # the last of each wins, as in codec.trace_headers
            if k == "traceparent":
                tp = v
            elif k == "tracestate":
                ts = v
        parsed = parse_traceparent(tp.decode("latin-1")) if tp else None
        if parsed is None:
            assert "traceparent" not in out and "tracestate" not in out
            return
        child = parse_traceparent(out["traceparent"].decode("ascii"))
        assert child is not None and child[0] == parsed[0] and child[1] != parsed[1]
        assert out.get("tracestate") == (ts or None)  # opaque bytes, passed on as they came


# What broke the service once: a null header value on a dead letter, a keyless tombstone, and
# 600 ids nested deeper than a result can carry (systemic EncodeFailed: the breaker stopped it).
SEEN_BEFORE = [
    Rec(b"k", b"not json", (("custom", None), ("traceparent", None))),
    Rec(None, None, (("h", b"\xff"),)),
    *[Rec(b"%d" % i, _deep_id(254 + i % 3), ()) for i in range(600)],
    Rec(None, b'{"text": "after them"}', ()),
]


@pytest.mark.integration
# The service's thread draws from `random` (sticky partitions, backoff jitter) while Hypothesis
# generates the next batch: its warning about strategies using `random` does not apply.
@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")
def test_the_service_survives_hostile_batches(broker: str, topic: str, tiny_model: Path) -> None:
    """Generated batches through one running service: each example checks every record produced
    so far came out exactly once, with the service still up; at the end it stops cleanly."""
    with Harness(broker, topic, tiny_model) as harness:
        # Examples share the service and check everything produced so far: shrinking would
        # replay smaller batches on top of a failed one, so the batch reported is the one drawn.
        @settings(
            max_examples=40,
            deadline=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=[
                HealthCheck.too_slow,
                HealthCheck.data_too_large,
                HealthCheck.filter_too_much,
            ],
        )
        @given(recs=st.lists(RECORDS, min_size=10, max_size=40))
        @example(recs=SEEN_BEFORE)
        def hostile_batch(recs: list[Rec]) -> None:
            harness.example(recs)

        hostile_batch()
        assert harness.stop() == 0
        assert harness.svc is not None and harness.svc.service.pipeline.failure is None


# -- 4. megabytes of text -------------------------------------------------------------------------
class _PeakRss:
    """The process's resident memory when entered, and its peak until exited (a thread samples
    it every few milliseconds)."""

    def __enter__(self) -> _PeakRss:
        self._proc = psutil.Process()
        self.before = self.peak = self._proc.memory_info().rss
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="peak-rss")
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.wait(0.002):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def _mb_of_text(n_bytes: int, i: int) -> bytes:
    words = (" ".join(WORDS) + " ").encode()
    body = words * (n_bytes // len(words) + 1)
    return b'{"id": %d, "text": "' % i + body[:n_bytes] + b'"}'


async def test_megabytes_of_text_are_refused_before_decoding(
    broker: str, topic: str, tiny_model: Path
) -> None:
    """5 MB and 50 MB values with the default input.max_record_bytes (1,000,000): dead letters
    (RecordTooLarge, stage decode, the size in the message) without their value, since the DLQ
    takes no more than kafka.max_request_size (1 MB); the records after them flow on.

    The embedded broker takes both (it was tried up to 100 MB; aiokafka's consumer returns a
    record larger than its fetch sizes on its own), so nothing here is scaled down."""
    from aiokafka import AIOKafkaProducer

    await create_topics(broker, {topic: 1})
    big = {3: 5_000_000, 7: 50_000_000}
    values = [
        _mb_of_text(big[i], i) if i in big else orjson.dumps({"id": i, "text": "hello world"})
        for i in range(11)
    ]
    producer = AIOKafkaProducer(bootstrap_servers=broker, acks="all", max_request_size=64 << 20)
    await producer.start()
    try:
        for i, value in enumerate(values):
            await producer.send_and_wait(topic, value, key=b"k%d" % i, headers=[("h", b"%d" % i)])
    finally:
        await producer.stop()
    cfg = load_config(None, **base_config(broker, tiny_model, topic))
    assert cfg.input.max_record_bytes == 1_000_000 and cfg.kafka.max_request_size == 1_048_576
    peak = _PeakRss()
    async with RunningService(cfg) as svc:
        with peak:
            await svc.wait_done(len(values))
        assert svc.service.pipeline.failure is None
    assert svc.exit_code == 0
    results = await read_topic(broker, f"{topic}.out", expect=len(values) - 2, settle_s=0.3)
    dead = await read_topic(broker, f"{topic}.dlq", expect=2, settle_s=0.3)
    assert sorted(orjson.loads(m.value)["id"] for m in results) == [
        i for i in range(len(values)) if i not in big
    ]  # including the records after each big one
    assert len(dead) == 2
    for m in dead:
        original, h, dropped = _tail_headers(list(m.headers))
        offset = int(h["streamer.source.offset"])
        assert offset in big and original == [("h", b"%d" % offset)] and m.key == b"k%d" % offset
        assert (h["streamer.error.class"], h["streamer.error.stage"]) == (
            "RecordTooLarge",
            "decode",
        )
        assert f"value is {len(values[offset])} bytes" in h["streamer.error.message"]
        assert dropped and m.value is None  # the reason arrives; the value could not
    # Memory stays bounded by the values' size: they are measured, never decoded nor
    # tokenized. What the process holds on top is aiokafka's: the fetch response and the record
    # parsed from it (here about 3x the 55 MB refused, at the peak). Tokenizing them instead
    # would take over 100x (668 MB at the peak for 5 MB of these words with the tiny model's
    # tokenizer, before truncation), so the bound, 10x, is generous and still tells them apart.
    assert peak.peak - peak.before < 10 * sum(big.values())
