"""Decoding input records and encoding results and dead letters.

Decoding is cheap (orjson) and runs on the event loop; a record that cannot be decoded raises a
:class:`~streamer.records.RecordError` that names what is wrong, for the DLQ headers.
"""

from __future__ import annotations

import base64
from typing import Any, Literal

import numpy as np
import orjson

from streamer.config import InputConfig
from streamer.records import (
    EmptyText,
    Headers,
    InputRecord,
    InvalidJson,
    InvalidUtf8,
    Job,
    MissingText,
    ModelInfo,
    NotAnObject,
    RecordError,
    RecordTooLarge,
    TextNotAString,
)

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
ERROR_HEADERS = (
    "streamer.error.class",
    "streamer.error.message",
    "streamer.error.stage",
    "streamer.source.topic",
    "streamer.source.partition",
    "streamer.source.offset",
)
_MAX_ERROR_MESSAGE = 1000


def header(headers: Headers, name: str) -> bytes | None:
    for k, v in headers:
        if k == name:
            return v
    return None


def _dotted(obj: dict[str, Any], path: str) -> tuple[bool, Any]:
    cur: Any = obj
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return False, None
        cur = cur[part]
    return True, cur


class Decoder:
    """Turns an :class:`InputRecord` into a :class:`Job` or raises a RecordError."""

    def __init__(self, cfg: InputConfig) -> None:
        self._cfg = cfg

    def decode(self, record: InputRecord) -> Job:
        cfg = self._cfg
        value = record.value
        if value is None:
            raise MissingText(
                "record has no value (a tombstone?); expected "
                + ("a JSON object" if cfg.format == "json" else "UTF-8 text")
            )
        if len(value) > cfg.max_record_bytes:
            raise RecordTooLarge(
                f"value is {len(value)} bytes, over input.max_record_bytes={cfg.max_record_bytes}"
            )
        record_id: Any = None
        if cfg.format == "text":
            try:
                text = value.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidUtf8(f"value is not valid UTF-8: {exc}") from None
        else:
            try:
                obj = orjson.loads(value)
            except orjson.JSONDecodeError as exc:
                if _is_bad_utf8(value):
                    raise InvalidUtf8("value is not valid UTF-8, so it cannot be JSON") from None
                raise InvalidJson(f"value is not valid JSON: {exc}") from None
            if not isinstance(obj, dict):
                raise NotAnObject(
                    f"value is JSON {type(obj).__name__}, expected an object with "
                    f"a '{cfg.text_field}' field"
                )
            found, text = _dotted(obj, cfg.text_field)
            if not found:
                raise MissingText(f"JSON object has no '{cfg.text_field}' field (input.text_field)")
            if not isinstance(text, str):
                raise TextNotAString(
                    f"field '{cfg.text_field}' is {type(text).__name__}, expected a string"
                )
            if cfg.id_field:
                _, record_id = _dotted(obj, cfg.id_field)
        if not text.strip():
            raise EmptyText("text is empty or only whitespace")
        tp = header(record.headers, TRACEPARENT)
        ts = header(record.headers, TRACESTATE)
        return Job(
            record=record,
            text=text,
            record_id=record_id,
            traceparent=tp.decode("ascii", "replace") if tp else None,
            tracestate=ts.decode("ascii", "replace") if ts else None,
        )


def _is_bad_utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


EmbeddingEncoding = Literal["float", "base64-f16", "base64-f32"]
_B64_DTYPES = {"base64-f16": ("<f2", "float16"), "base64-f32": ("<f4", "float32")}


def encode_embedding(vector: Any, encoding: EmbeddingEncoding) -> dict[str, Any]:
    """The ``result`` of an embedding in ``encoding``.

    ``float`` keeps ``{"embedding": [...]}`` (orjson writes the numpy array, ~10 bytes a
    number); ``base64-f16``/``-f32`` carry the little-endian bytes instead, 4x/2x smaller and
    cheaper to produce: ``{"embedding_b64": "...", "dtype": "float16", "dim": 384}``.
    """
    if encoding == "float":
        return {"embedding": vector}
    try:
        np_dtype, name = _B64_DTYPES[encoding]
    except KeyError:
        raise ValueError(f"unknown embedding encoding {encoding!r}") from None
    arr = np.asarray(vector, dtype=np_dtype).reshape(-1)
    return {
        "embedding_b64": base64.b64encode(arr.tobytes()).decode("ascii"),
        "dtype": name,
        "dim": int(arr.shape[0]),
    }


def decode_embedding(result: dict[str, Any]) -> np.ndarray:
    """An embedding back from a result in any encoding (for consumers and tests)."""
    if "embedding_b64" in result:
        np_dtype = "<f2" if result["dtype"] == "float16" else "<f4"
        return np.frombuffer(base64.b64decode(result["embedding_b64"]), dtype=np_dtype)
    return np.asarray(result["embedding"], dtype=np.float32)


def encode_result(
    job: Job, result: dict[str, Any], model: ModelInfo, encoding: EmbeddingEncoding = "float"
) -> bytes:
    """The result value: ``{"id", "result", "model", "source"}`` as JSON (numpy-aware).

    ``encoding`` applies to embeddings only; classification results are unchanged.
    """
    if encoding != "float" and "embedding" in result:
        result = {
            **{k: v for k, v in result.items() if k != "embedding"},
            **encode_embedding(result["embedding"], encoding),
        }
    rec = job.record
    doc = {
        "id": job.record_id,
        "result": result,
        "model": model.as_dict(),
        "source": {"topic": rec.topic, "partition": rec.partition, "offset": rec.offset},
    }
    return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)


def result_headers(traceparent: str | None, tracestate: str | None) -> Headers:
    out: Headers = []
    if traceparent:
        out.append((TRACEPARENT, traceparent.encode("ascii")))
        if tracestate:
            out.append((TRACESTATE, tracestate.encode("ascii")))
    return out


def dlq_headers(record: InputRecord, error: RecordError) -> Headers:
    """The input's headers unchanged, plus the ``streamer.error.*``/``streamer.source.*`` ones."""
    message = error.message
    if len(message) > _MAX_ERROR_MESSAGE:
        message = message[: _MAX_ERROR_MESSAGE - 1] + "…"
    values = (
        error.error_class,
        message,
        error.stage,
        record.topic,
        str(record.partition),
        str(record.offset),
    )
    return [
        *record.headers,
        *((k, v.encode("utf-8")) for k, v in zip(ERROR_HEADERS, values, strict=True)),
    ]
