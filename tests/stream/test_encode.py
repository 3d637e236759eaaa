"""The encode stage: one record whose result cannot be built goes to the DLQ, not the batch
(and not the process: a crash here would repeat on every restart, on every replica)."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
from test_batcher import rows
from test_outputs import DLQ, RESULTS

from streamer.config import ModelConfig, load_config
from streamer.models.registry import Loaded
from streamer.models.worker import Inferred
from streamer.observability.tracing import Tracing
from streamer.stream import encode as encode_module
from streamer.stream.encode import Encoder
from streamer.stream.outputs import Destinations, Outputs
from streamer.tools.nullmodel import NullModel


def _batch(n: int):
    cfg = ModelConfig(name="nil", version="1", backend="null")
    model = NullModel.from_config(cfg)
    loaded = Loaded(cfg, model.info, model)
    batch = rows([4] * n, bound=loaded)
    outputs = np.ones((n, 8), np.float32)
    return batch, Inferred(outputs, {})


def _encoder() -> Encoder:
    cfg = load_config(None)
    return Encoder(cfg, Tracing(cfg.tracing))


def _dest() -> Destinations:
    return Destinations(RESULTS, DLQ, 1 << 20)


def test_a_record_whose_result_raises_is_dead_lettered_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    batch, inferred = _batch(5)
    real = encode_module.result_value
    bad = batch.record_ids[2]

    def flaky(record_id, *args):
        if record_id == bad:
            raise UnicodeEncodeError("ascii", "é", 0, 1, "not ascii")
        return real(record_id, *args)

    monkeypatch.setattr(encode_module, "result_value", flaky)
    outs = _encoder()(batch, inferred, _dest(), [])
    results = [o for o in outs if not o.dead_letters]
    dead = [o for o in outs if o.dead_letters]
    assert sum(len(o) for o in results) == 4
    assert len(dead) == 1 and len(dead[0]) == 1
    err = dead[0].errors[0]
    assert err.error_class == "EncodeFailed" and err.stage == "encode" and err.systemic
    assert "UnicodeEncodeError" in err.message
    headers = dict(dead[0].headers[0])
    assert headers["streamer.error.class"] == b"EncodeFailed"


def test_a_batch_whose_fragments_raise_is_retried_row_by_row(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    batch, inferred = _batch(4)
    inferred.outputs[1, 0] = np.nan  # the marker for the stand-in below
    real = encode_module.result_fragments

    def picky(outputs, *args, **kwargs):
        if np.isnan(outputs).any():
            raise ValueError("cannot encode NaN")
        return real(outputs, *args, **kwargs)

    monkeypatch.setattr(encode_module, "result_fragments", picky)
    outs = _encoder()(batch, inferred, _dest(), [])
    good = [v for o in outs if not o.dead_letters for v in o.values]
    assert len(good) == 3 and all(orjson.loads(v)["result"]["embedding"] for v in good)
    dead = [o for o in outs if o.dead_letters]
    assert [o.rows for o in dead] == [[batch.index[1]]]
    assert "cannot encode NaN" in dead[0].errors[0].message


@pytest.mark.parametrize("encoding", ["float", "base64-f16"])
def test_a_usual_batch_is_encoded_in_bulk_as_record_by_record(
    monkeypatch: pytest.MonkeyPatch, encoding: str
) -> None:
    """No tombstone, failure or tracing: the results are built and grouped in bulk; the
    batches are those the record-by-record path makes (its reference: ``result`` per record)."""
    batch, inferred = _batch(40)
    for c in batch.chunks.tolist():
        for m in c.messages:
            m.key = b"key-%d" % (m.offset % 7)
    cfg = load_config(None, output={"embedding_encoding": encoding})
    encoder = Encoder(cfg, Tracing(cfg.tracing))

    def placed(outs):
        return [(o.topic, o.partition, o.keys, o.values, o.rows) for o in outs]

    bulk = placed(encoder(batch, inferred, _dest(), []))

    def one_by_one(self, chunks, rows, keys, values, headers):
        for c, i, v, h in zip(chunks, rows, values, headers, strict=True):
            self.result(c, i, v, h)

    monkeypatch.setattr(Outputs, "results", one_by_one)
    assert bulk == placed(encoder(batch, inferred, _dest(), []))
    assert sum(len(p[2]) for p in bulk) == 40 and len(bulk) > 1
    assert all(orjson.loads(v)["source"]["offset"] >= 0 for p in bulk for v in p[3])
