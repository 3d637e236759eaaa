"""Decoding inputs, encoding results and dead letters."""

from __future__ import annotations

import base64

import numpy as np
import orjson
import pytest
from pydantic import ValidationError

from streamer.config import InputConfig, OutputConfig
from streamer.observability.tracecontext import child_traceparent, parse_traceparent
from streamer.stream import records as r
from streamer.stream.codec import (
    Decoder,
    decode_embedding,
    dlq_headers,
    encode_result,
    result_headers,
)


def rec(value: bytes | None, headers=None) -> r.InputRecord:
    return r.InputRecord("in", 2, 41, b"k", value, headers or [], 0, 0.0)


def test_decodes_json_with_dotted_paths() -> None:
    d = Decoder(InputConfig(text_field="payload.body", id_field="meta.id"))
    job = d.decode(rec(b'{"payload": {"body": "hi there"}, "meta": {"id": "x-1"}}'))
    assert job.text == "hi there"
    assert job.record_id == "x-1"


def test_decodes_text_format() -> None:
    job = Decoder(InputConfig(format="text")).decode(rec("héllo".encode()))
    assert job.text == "héllo"
    assert job.record_id is None


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (b"{not json", r.InvalidJson),
        (b"[1, 2]", r.NotAnObject),
        (b'{"other": "x"}', r.MissingText),
        (b'{"text": 12}', r.TextNotAString),
        (b'{"text": "   "}', r.EmptyText),
        (b"\xff\xfe{", r.InvalidUtf8),
        (None, r.MissingText),
        (b'{"text": "' + b"a" * 200 + b'"}', r.RecordTooLarge),
    ],
)
def test_bad_json_records(value: bytes | None, error: type[r.RecordError]) -> None:
    d = Decoder(InputConfig(max_record_bytes=100))
    with pytest.raises(error) as info:
        d.decode(rec(value))
    assert info.value.stage == "decode"
    assert str(info.value)  # a message a person can read


def test_text_format_rejects_bad_utf8() -> None:
    with pytest.raises(r.InvalidUtf8):
        Decoder(InputConfig(format="text")).decode(rec(b"\xc3\x28"))


def test_traceparent_is_read_from_headers() -> None:
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    job = Decoder(InputConfig()).decode(rec(b'{"text": "x"}', [("traceparent", tp.encode())]))
    assert job.traceparent == tp


def test_result_document() -> None:
    job = Decoder(InputConfig()).decode(rec(b'{"id": 7, "text": "x"}'))
    info = r.ModelInfo("m", "2", "sha256:ab", "feature-extraction")
    doc = orjson.loads(encode_result(job, {"embedding": np.array([0.5, 0.25])}, info))
    assert doc == {
        "id": 7,
        "result": {"embedding": [0.5, 0.25]},
        "model": {"name": "m", "version": "2", "fingerprint": "sha256:ab"},
        "source": {"topic": "in", "partition": 2, "offset": 41},
    }


@pytest.mark.parametrize(
    ("encoding", "dtype", "atol"), [("base64-f32", "float32", 0.0), ("base64-f16", "float16", 1e-3)]
)
def test_base64_embeddings_decode_back(encoding: str, dtype: str, atol: float) -> None:
    job = Decoder(InputConfig()).decode(rec(b'{"id": 7, "text": "x"}'))
    info = r.ModelInfo("m", "2", "sha256:ab", "feature-extraction")
    vec = np.random.default_rng(0).standard_normal(384).astype(np.float32)
    vec /= np.linalg.norm(vec)
    value = encode_result(job, {"embedding": vec}, info, encoding=encoding)
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
    float_value = encode_result(job, {"embedding": vec}, info)
    assert len(value) < len(float_value) / (2 if dtype == "float32" else 3.5)


def test_encoding_leaves_classification_results_alone() -> None:
    job = Decoder(InputConfig()).decode(rec(b'{"id": 7, "text": "x"}'))
    info = r.ModelInfo("m", "2", "sha256:ab", "text-classification")
    res = {"label": "positive", "score": 0.75}
    doc = orjson.loads(encode_result(job, res, info, encoding="base64-f16"))
    assert doc["result"] == res
    assert decode_embedding({"embedding": [0.5, 0.25]}).tolist() == [0.5, 0.25]


def test_output_encoding_is_validated() -> None:
    assert OutputConfig(embedding_encoding="base64-f16").embedding_encoding == "base64-f16"
    with pytest.raises(ValidationError):
        OutputConfig(embedding_encoding="base64")


def test_dlq_headers_keep_originals_and_add_reason() -> None:
    record = rec(b"x", [("h", b"v")])
    headers = dlq_headers(record, r.InvalidJson("bad"))
    d = dict(headers)
    assert headers[0] == ("h", b"v")
    assert d["streamer.error.class"] == b"InvalidJson"
    assert d["streamer.error.message"] == b"bad"
    assert d["streamer.error.stage"] == b"decode"
    assert d["streamer.source.topic"] == b"in"
    assert d["streamer.source.partition"] == b"2"
    assert d["streamer.source.offset"] == b"41"


def test_child_traceparent_keeps_trace_new_span() -> None:
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    child = child_traceparent(tp)
    assert child is not None
    assert parse_traceparent(child)[0] == "0af7651916cd43dd8448eb211c80319c"
    assert parse_traceparent(child)[1] != "b7ad6b7169203331"
    assert child_traceparent("garbage") is None
    assert child_traceparent(None) is None
    assert result_headers(None, None) == []
