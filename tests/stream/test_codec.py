"""Decoding inputs, encoding results (one value, or a whole batch as fragments), dead letters."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

import numpy as np
import orjson
import pytest
from pydantic import ValidationError

from streamer.config import InputConfig, OutputConfig
from streamer.observability.tracecontext import child_traceparent, parse_traceparent
from streamer.stream import records as r
from streamer.stream.codec import (
    ERROR_HEADERS,
    Decoder,
    decode_embedding,
    dlq_headers,
    encode_embedding,
    encode_result,
    model_fragment,
    result_fragments,
    result_headers,
    result_value,
    trace_headers,
)

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
INFO = r.ModelInfo("m", "2", "sha256:ab", "feature-extraction")
SOURCE = ("in", 2, 41)


@dataclass
class Msg:
    """What aiokafka's ConsumerRecord carries that the codec reads."""

    value: bytes | None
    headers: list[tuple[str, bytes]] | None = field(default_factory=list)
    offset: int = 41
    key: bytes | None = b"k"
    timestamp: int = 0


def unit_vector(dim: int, seed: int = 0) -> np.ndarray:
    vec = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return vec / np.linalg.norm(vec)


# -- decode ---------------------------------------------------------------------------------------
def test_decodes_json_with_dotted_paths() -> None:
    d = Decoder(InputConfig(text_field="payload.body", id_field="meta.id"))
    text, record_id = d.decode(b'{"payload": {"body": "hi there"}, "meta": {"id": "x-1"}}')
    assert (text, record_id) == ("hi there", "x-1")


def test_missing_id_is_none_and_no_id_field_means_no_id() -> None:
    assert Decoder(InputConfig()).decode(b'{"text": "x"}') == ("x", None)
    assert Decoder(InputConfig(id_field=None)).decode(b'{"id": 3, "text": "x"}') == ("x", None)
    assert Decoder(InputConfig()).decode(b'{"id": 3, "text": "x"}') == ("x", 3)


def test_decodes_text_format() -> None:
    assert Decoder(InputConfig(format="text")).decode("héllo".encode()) == ("héllo", None)


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (b"{not json", r.InvalidJson),
        (b"[1, 2]", r.NotAnObject),
        (b'"just a string"', r.NotAnObject),
        (b'{"other": "x"}', r.MissingText),
        (b'{"text": 12}', r.TextNotAString),
        (b'{"text": null}', r.TextNotAString),
        (b'{"text": "   "}', r.EmptyText),
        (b'{"text": ""}', r.EmptyText),
        (b"\xff\xfe{", r.InvalidUtf8),
        (None, r.MissingText),
        (b'{"text": "' + b"a" * 200 + b'"}', r.RecordTooLarge),
    ],
)
def test_bad_json_records(value: bytes | None, error: type[r.RecordError]) -> None:
    d = Decoder(InputConfig(max_record_bytes=100))
    with pytest.raises(error) as info:
        d.decode(value)
    assert type(info.value) is error
    assert info.value.stage == "decode"
    assert info.value.error_class == error.__name__
    assert str(info.value) and info.value.message == str(info.value)  # a person can read it


def test_missing_nested_field_names_the_path() -> None:
    with pytest.raises(r.MissingText, match=r"payload\.body"):
        Decoder(InputConfig(text_field="payload.body")).decode(b'{"payload": "flat"}')


@pytest.mark.parametrize(
    ("value", "error"),
    [(b"\xc3\x28", r.InvalidUtf8), (None, r.MissingText), (b" \n\t", r.EmptyText)],
)
def test_bad_text_records(value: bytes | None, error: type[r.RecordError]) -> None:
    with pytest.raises(error):
        Decoder(InputConfig(format="text")).decode(value)


def test_trace_headers_are_read_as_bytes() -> None:
    tp = TRACEPARENT.encode()
    assert trace_headers([("traceparent", tp)]) == (tp, None)
    assert trace_headers([("tracestate", b"k=v"), ("x", b"y"), ("traceparent", tp)]) == (
        tp,
        b"k=v",
    )
    assert trace_headers([("tracestate", b"k=v")]) is None  # no parent, no trace
    assert trace_headers([]) is None


# -- results --------------------------------------------------------------------------------------
def test_result_document() -> None:
    doc = orjson.loads(encode_result(7, {"embedding": np.array([0.5, 0.25])}, INFO, SOURCE))
    assert doc == {
        "id": 7,
        "result": {"embedding": [0.5, 0.25]},
        "model": {"name": "m", "version": "2", "fingerprint": "sha256:ab"},
        "source": {"topic": "in", "partition": 2, "offset": 41},
    }


def test_result_value_from_fragments_matches_encode_result() -> None:
    outputs = np.array([[0.5, 0.25], [1.0, -2.0]], dtype=np.float32)
    frags = result_fragments(outputs, "feature-extraction", {})
    assert len(frags) == 2
    for i, frag in enumerate(frags):
        value = result_value(f"r{i}", frag, model_fragment(INFO), "in", 2, 41 + i)
        expected = encode_result(f"r{i}", {"embedding": outputs[i]}, INFO, ("in", 2, 41 + i))
        assert orjson.loads(value) == orjson.loads(expected)
        assert orjson.loads(value)["result"]["embedding"] == outputs[i].tolist()


@pytest.mark.parametrize(
    ("encoding", "dtype", "atol"), [("base64-f32", "float32", 0.0), ("base64-f16", "float16", 1e-3)]
)
def test_base64_embeddings_decode_back_and_are_smaller(
    encoding: str, dtype: str, atol: float
) -> None:
    vec = unit_vector(384)
    value = encode_result(7, {"embedding": vec}, INFO, SOURCE, encoding)
    doc = orjson.loads(value)
    res = doc["result"]
    assert set(res) == {"embedding_b64", "dtype", "dim"}
    assert res["dtype"] == dtype and res["dim"] == 384
    # the documented one-liner (README, "Output encodings")
    back = np.frombuffer(
        base64.b64decode(res["embedding_b64"]), np.dtype(res["dtype"]).newbyteorder("<")
    )
    np.testing.assert_allclose(back.astype(np.float32), vec, atol=atol, rtol=0)
    np.testing.assert_array_equal(decode_embedding(res), back)
    assert doc["id"] == 7 and doc["model"]["name"] == "m"
    float_value = encode_result(7, {"embedding": vec}, INFO, SOURCE)
    assert len(value) < len(float_value) / (2 if dtype == "float32" else 3.5)
    # base64 of 384 little-endian numbers, 4 or 2 bytes each
    assert len(res["embedding_b64"]) == 4 * (384 * np.dtype(dtype).itemsize // 3)


@pytest.mark.parametrize("encoding", ["base64-f32", "base64-f16"])
@pytest.mark.parametrize("dim", [384, 5, 1])  # 384: rows split from one base64 of the matrix
def test_batch_fragments_match_one_by_one_encoding(encoding: str, dim: int) -> None:
    outputs = np.stack([unit_vector(dim, seed) for seed in range(4)])
    frags = result_fragments(outputs, "feature-extraction", {}, encoding=encoding)
    assert len(frags) == 4
    for row, frag in zip(outputs, frags, strict=True):
        res = orjson.loads(orjson.dumps(frag))
        assert res == encode_embedding(row, encoding)
        expected = row.astype(np.float16 if encoding.endswith("f16") else np.float32)
        np.testing.assert_array_equal(decode_embedding(res), expected)


def test_unknown_encoding_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown embedding encoding"):
        result_fragments(np.zeros((1, 3)), "feature-extraction", {}, encoding="base64")
    with pytest.raises(ValueError, match="unknown embedding encoding"):
        encode_embedding(np.zeros(3), "base64")


def test_encoding_leaves_classification_results_alone() -> None:
    info = r.ModelInfo("m", "2", "sha256:ab", "text-classification")
    res = {"label": "positive", "score": 0.75}
    doc = orjson.loads(encode_result(7, res, info, SOURCE, "base64-f16"))
    assert doc["result"] == res
    assert decode_embedding({"embedding": [0.5, 0.25]}).tolist() == [0.5, 0.25]
    probs = np.array([[0.25, 0.75], [0.875, 0.125]], dtype=np.float32)
    labels = {0: "negative", 1: "positive"}
    for encoding in ("float", "base64-f16", "base64-f32"):
        frags = result_fragments(probs, "text-classification", labels, encoding=encoding)
        got = [orjson.loads(orjson.dumps(f)) for f in frags]
        assert got == [
            {"label": "positive", "score": 0.75},
            {"label": "negative", "score": 0.875},
        ]


def test_classification_all_scores_and_unnamed_labels() -> None:
    probs = np.array([[0.25, 0.5, 0.25]], dtype=np.float32)
    frags = result_fragments(probs, "text-classification", {0: "a"}, return_all_scores=True)
    assert orjson.loads(orjson.dumps(frags[0])) == {
        "label": "1",
        "score": 0.5,
        "scores": {"a": 0.25, "1": 0.5, "2": 0.25},
    }


def test_output_encoding_is_validated() -> None:
    assert OutputConfig(embedding_encoding="base64-f16").embedding_encoding == "base64-f16"
    with pytest.raises(ValidationError):
        OutputConfig(embedding_encoding="base64")


# -- headers --------------------------------------------------------------------------------------
def test_dlq_headers_keep_originals_and_add_reason() -> None:
    message = Msg(b"x", [("h", b"v"), ("traceparent", TRACEPARENT.encode())])
    headers = dlq_headers(message, r.TopicPartition("in", 2), r.InvalidJson("bad"))
    d = dict(headers)
    assert headers[:2] == [("h", b"v"), ("traceparent", TRACEPARENT.encode())]
    assert [k for k, _ in headers[2:]] == list(ERROR_HEADERS)
    assert d["streamer.error.class"] == b"InvalidJson"
    assert d["streamer.error.message"] == b"bad"
    assert d["streamer.error.stage"] == b"decode"
    assert d["streamer.source.topic"] == b"in"
    assert d["streamer.source.partition"] == b"2"
    assert d["streamer.source.offset"] == b"41"


def test_dlq_headers_stage_of_later_errors_and_no_input_headers() -> None:
    message = Msg(b"x", None, offset=7)
    tp = r.TopicPartition("in", 0)
    for err, stage in [
        (r.TextTooLong("long"), "tokenize"),
        (r.InferenceFailed("boom"), "inference"),
        (r.ResultTooLarge("big"), "publish"),
        (r.RecordError("custom", stage="route"), "route"),
    ]:
        d = dict(dlq_headers(message, tp, err))
        assert d["streamer.error.stage"] == stage.encode()
        assert d["streamer.error.class"] == type(err).__name__.encode()
        assert d["streamer.source.offset"] == b"7"


def test_dlq_error_message_is_bounded() -> None:
    headers = dlq_headers(Msg(b"x"), r.TopicPartition("in", 0), r.InferenceFailed("é" * 5000))
    text = dict(headers)["streamer.error.message"].decode("utf-8")
    assert len(text) == 1000 and text.endswith("…")


def test_result_headers_keep_the_trace_with_a_new_span() -> None:
    headers = result_headers((TRACEPARENT.encode(), b"vendor=opaque\xff"))
    d = dict(headers)
    parsed = parse_traceparent(d["traceparent"].decode())
    assert parsed is not None
    assert parsed[0] == "0af7651916cd43dd8448eb211c80319c"
    assert parsed[1] != "b7ad6b7169203331"
    assert d["tracestate"] == b"vendor=opaque\xff"  # opaque bytes, never re-encoded
    assert [k for k, _ in result_headers((TRACEPARENT.encode(), None))] == ["traceparent"]
    assert result_headers(None) == []
    assert result_headers((b"garbage", b"k=v")) == []
    assert result_headers((None, b"k=v")) == []


def test_child_traceparent_keeps_trace_new_span() -> None:
    child = child_traceparent(TRACEPARENT)
    assert child is not None
    assert parse_traceparent(child)[0] == "0af7651916cd43dd8448eb211c80319c"
    assert parse_traceparent(child)[1] != "b7ad6b7169203331"
    assert child_traceparent("garbage") is None
    assert child_traceparent(None) is None
