"""Decoding input values, and encoding results and dead letters.

Everything here runs on the stage threads, a whole chunk or batch per call, never on the event
loop. A value that cannot be decoded raises a :class:`~streamer.stream.records.RecordError` that
names what is wrong, for the DLQ headers.
"""

from __future__ import annotations

import base64
from typing import Any, Literal

import numpy as np
import orjson

from streamer.config import InputConfig
from streamer.observability.tracecontext import child_traceparent
from streamer.stream.records import (
    EmptyText,
    Headers,
    InvalidJson,
    InvalidUtf8,
    MissingText,
    ModelInfo,
    NotAnObject,
    RecordError,
    RecordTooLarge,
    TextNotAString,
    TopicPartition,
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
    """Turns a record's value into ``(text, record id)`` or raises a RecordError."""

    def __init__(self, cfg: InputConfig) -> None:
        self._cfg = cfg

    def decode(self, value: bytes | None) -> tuple[str, Any]:
        cfg = self._cfg
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
                if isinstance(record_id, (dict, list)):
                    # orjson reads 1024 levels but writes 254: an id nested deeper than the
                    # result can carry is the input's fault here, not a systemic EncodeFailed
                    try:
                        orjson.dumps([record_id])  # one level, as in the result object
                    except TypeError as exc:
                        raise InvalidJson(
                            f"field '{cfg.id_field}' cannot be written back in the result: {exc}"
                        ) from None
        if not text.strip():
            raise EmptyText("text is empty or only whitespace")
        return text, record_id


def trace_headers(headers: Any) -> tuple[bytes | None, bytes | None] | None:
    """The ``(traceparent, tracestate)`` header bytes of a record, or None without a traceparent."""
    tp = ts = None
    for k, v in headers:
        if k == TRACEPARENT:
            tp = v
        elif k == TRACESTATE:
            ts = v
    return None if tp is None else (tp, ts)


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


def result_fragments(
    outputs: np.ndarray,
    task: str,
    labels: dict[int, str],
    *,
    encoding: EmbeddingEncoding = "float",
    return_all_scores: bool = False,
) -> list[orjson.Fragment]:
    """The ``result`` JSON of every row of a batch's model output, as pre-serialised fragments.

    Embeddings in ``encoding`` (base64 rows come from one conversion of the whole matrix);
    classification rows as ``{"label", "score"}`` (plus ``"scores"``) from softmax probabilities.
    """
    if task == "text-classification":
        out = []
        top = outputs.argmax(axis=1)
        for i, row in enumerate(outputs):
            k = int(top[i])
            res: dict[str, Any] = {"label": labels.get(k, str(k)), "score": float(row[k])}
            if return_all_scores:
                res["scores"] = {labels.get(j, str(j)): float(v) for j, v in enumerate(row)}
            out.append(orjson.Fragment(orjson.dumps(res)))
        return out
    if encoding == "float":
        opt = orjson.OPT_SERIALIZE_NUMPY
        return [
            orjson.Fragment(b'{"embedding":' + orjson.dumps(r, option=opt) + b"}") for r in outputs
        ]
    try:
        np_dtype, name = _B64_DTYPES[encoding]
    except KeyError:
        raise ValueError(f"unknown embedding encoding {encoding!r}") from None
    arr = np.ascontiguousarray(outputs, dtype=np_dtype)
    dim = arr.shape[1] if arr.ndim == 2 else 0
    tail = b'","dtype":"' + name.encode() + b'","dim":' + str(dim).encode() + b"}"
    row_bytes = dim * arr.itemsize
    if row_bytes % 3 == 0:  # base64 of the whole matrix splits exactly at row boundaries
        b64 = base64.b64encode(arr.tobytes())
        step = row_bytes // 3 * 4
        rows = [b64[i : i + step] for i in range(0, len(b64), step)]
    else:
        rows = [base64.b64encode(r.tobytes()) for r in arr]
    return [orjson.Fragment(b'{"embedding_b64":"' + r + tail) for r in rows]


def model_fragment(model: ModelInfo) -> orjson.Fragment:
    return orjson.Fragment(orjson.dumps(model.as_dict()))


def result_value(
    record_id: Any,
    result: orjson.Fragment,
    model: orjson.Fragment,
    topic: str,
    partition: int,
    offset: int,
) -> bytes:
    """One result record: ``{"id", "result", "model", "source"}`` as JSON."""
    return orjson.dumps(
        {
            "id": record_id,
            "result": result,
            "model": model,
            "source": {"topic": topic, "partition": partition, "offset": offset},
        },
        option=orjson.OPT_SERIALIZE_NUMPY,
    )


def encode_result(
    record_id: Any,
    result: dict[str, Any],
    model: ModelInfo,
    source: tuple[str, int, int],
    encoding: EmbeddingEncoding = "float",
) -> bytes:
    """A single result value from a result dict (tools and tests; the pipeline encodes per
    batch with :func:`result_fragments`). ``encoding`` applies to embeddings only."""
    if encoding != "float" and "embedding" in result:
        result = {
            **{k: v for k, v in result.items() if k != "embedding"},
            **encode_embedding(result["embedding"], encoding),
        }
    frag = orjson.Fragment(orjson.dumps(result, option=orjson.OPT_SERIALIZE_NUMPY))
    return result_value(record_id, frag, model_fragment(model), *source)


def result_headers(trace: tuple[bytes | None, bytes | None] | None) -> Headers:
    """The result's trace context: same trace as the input, a new span id (no tracer on).

    ``tracestate`` travels as the bytes it came in: it is opaque to us, never re-encoded."""
    if trace is None:
        return []
    parent, state = trace
    return context_headers(child_traceparent(parent.decode("latin-1")) if parent else None, state)


def context_headers(traceparent: str | None, tracestate: str | bytes | None) -> Headers:
    """The ``traceparent`` (and ``tracestate``, when there is a traceparent) headers."""
    if not traceparent:
        return []
    out: Headers = [(TRACEPARENT, traceparent.encode("ascii"))]
    if tracestate:
        out.append(
            (
                TRACESTATE,
                tracestate if isinstance(tracestate, bytes) else tracestate.encode("ascii"),
            )
        )
    return out


def dlq_headers(message: Any, tp: TopicPartition, error: RecordError) -> Headers:
    """The input's headers unchanged, plus the ``streamer.error.*``/``streamer.source.*`` ones."""
    text = error.message
    if len(text) > _MAX_ERROR_MESSAGE:
        text = text[: _MAX_ERROR_MESSAGE - 1] + "…"
    values = (
        error.error_class,
        text,
        error.stage,
        tp.topic,
        str(tp.partition),
        str(message.offset),
    )
    return [
        *(message.headers or ()),
        *((k, v.encode("utf-8")) for k, v in zip(ERROR_HEADERS, values, strict=True)),
    ]
