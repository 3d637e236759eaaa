"""``streamer bench --only compression``: one row per codec, measured on the output topic as the
broker stores it. No timing thresholds: the figures only have to be what they claim to be."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from streamer.cli import main
from streamer.config import ModelConfig
from streamer.kafka.client import CODECS
from streamer.tools.bench import _rows
from streamer.tools.compressbench import DistinctRowsModel, available_codecs


def test_distinct_rows_differ_and_are_unit_vectors() -> None:
    model = DistinctRowsModel.from_config(ModelConfig(name="nil", version="1", max_length=16))
    out = model.forward([[2, 5, 3]] * 4)
    assert out.shape == (4, 384) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    assert len({row.tobytes() for row in out}) == 4  # identical rows would flatter every codec


def test_every_codec_is_benched_here() -> None:
    assert available_codecs() == list(CODECS)


def test_rows_show_bytes_per_record_against_none() -> None:
    row = {
        "records": 1000,
        "dead_letters": 0,
        "records_per_s": 5000.0,
        "latency_p50_ms": 50.0,
        "latency_p99_ms": 90.0,
        "loop_us_per_record": 20.0,
        "mean_batch_rows": 64.0,
        "padding_ratio": 0.0,
    }
    results = {
        "machine": {"device": "cpu", "cpu_threads": 2, "platform": "linux", "python": "3.11"},
        "compression": {
            "none": {**row, "bytes_per_record": 4900.0},
            "zstd": {**row, "records_per_s": 4000.0, "bytes_per_record": 1960.0},
        },
    }
    rows = {r[0]: r for r in _rows(results)}
    assert rows["streamer no-model zstd"][1] == "4000.0"
    assert "1960 bytes/record" in rows["streamer no-model zstd"][-1]
    assert "(0.40× none)" in rows["streamer no-model zstd"][-1]


@pytest.mark.integration
@pytest.mark.usefixtures("root_logging")
def test_bench_only_compression(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    rc = main(
        [
            "bench",
            "--quick",
            "--only",
            "compression",
            "--no-model-records",
            "300",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    results = json.loads(out.read_text())
    assert results["sections"] == ["compression"] and results["failed"] == {}
    comp = results["compression"]
    assert list(comp) == list(CODECS)
    for codec, e in comp.items():
        assert e["records"] == 300 and e["output_records"] == 300
        assert set(e["batch_codecs"]) == {codec}  # read from the stored batches' headers
        assert e["bytes_per_record"] == e["output_bytes"] / 300
    for codec in CODECS[1:]:
        assert comp[codec]["bytes_per_record"] < comp["none"]["bytes_per_record"], codec
    assert "streamer no-model zstd" in out.with_suffix(".md").read_text()
