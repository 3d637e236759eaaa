"""The profiler: a tiny sweep end to end (CSV, PNG), peak memory, and the recommendation."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from streamer.cli import main
from streamer.models.hf import Encoded
from streamer.tools.profiler import MemoryMeter, ProfileRow, recommend, sweep

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.usefixtures("root_logging")
def test_profile_command_writes_csv_and_png(tiny_model: Path, tmp_path: Path) -> None:
    rc = main(
        [
            "profile",
            "--model",
            str(tiny_model),
            "--device",
            "cpu",
            "--lengths",
            "8,16,32",
            "--batch-sizes",
            "1,4",
            "--repeats",
            "1",
            "--threads",
            "1",
            "--memory-budget-mb",
            "100000",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    with (tmp_path / "profile.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 6
    assert {"model", "device", "backend", "precision", "seq_len", "batch_size", "tokens"} <= set(
        rows[0]
    )
    assert {"latency_ms", "records_per_s", "tokens_per_s", "peak_mb", "memory_source"} <= set(
        rows[0]
    )
    assert {(int(r["seq_len"]), int(r["batch_size"])) for r in rows} == {
        (n, b) for n in (8, 16, 32) for b in (1, 4)
    }
    for r in rows:
        assert r["status"] == "ok" and r["device"] == "cpu" and r["backend"] == "torch"
        assert float(r["records_per_s"]) > 0 and float(r["peak_mb"]) > 0
        assert int(r["tokens"]) == int(r["seq_len"]) * int(r["batch_size"])
    png = (tmp_path / "profile.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000


def row(n: int, b: int, peak: float, tps: float, status: str = "ok") -> ProfileRow:
    lat = n * b / tps
    return ProfileRow(n, b, n * b, lat * 1e3, lat * 1e3, b / lat, tps, peak, 0.0, "test", status)


def test_recommendation_respects_the_budget() -> None:
    rows = [
        row(n, b, peak=100 + n * b / 10, tps=1000 * min(n * b, 2048) / 2048)
        for n in (16, 64, 256)
        for b in (1, 8, 32)
    ]
    # 256 x 32 = 8192 tokens -> 919 MB, 256 x 8 -> 305 MB, 64 x 32 -> 305 MB
    rec = recommend(rows, budget_mb=400)
    assert rec.max_length == 256
    assert rec.max_batch_tokens is not None
    chosen = [r for r in rows if r.tokens <= rec.max_batch_tokens]
    assert all(r.peak_mb <= 400 for r in chosen)  # every batch it allows fits
    assert rec.max_batch_tokens == 2048  # throughput saturates there; 8192 does not fit
    assert recommend(rows, budget_mb=None).max_batch_tokens == 2048  # smallest at the best
    # a tighter budget shortens the sequences too
    tight = recommend(rows, budget_mb=110)
    assert tight.max_length == 64 and tight.max_batch_tokens is not None
    assert tight.max_batch_tokens <= 100  # 64 x 1; 16 x 8 = 128 tokens needs 112.8 MB
    none = recommend(rows, budget_mb=50)
    assert none.max_length is None and "nothing fits" in none.reason


def test_an_oom_configuration_makes_larger_budgets_unsafe() -> None:
    rows = [row(32, 1, 100, 100), row(32, 8, 110, 800), row(32, 32, math.nan, math.nan, "oom")]
    rec = recommend(rows, budget_mb=1000)
    assert rec.max_batch_tokens == 256


class Greedy:
    """Allocates ~8 MB per token row for the duration of forward, then frees it."""

    def tokenize(self, texts: list[str]) -> list[Encoded]:
        return [Encoded(list(range(200)), False) for _ in texts]

    def forward(self, batch: list[list[int]]) -> Any:
        scratch = np.ones((len(batch) * len(batch[0]), 1024 * 1024 // 8 // 16))
        return np.full((len(batch), 4), float(scratch.sum() > 0), dtype=np.float32)

    def postprocess(self, outputs: Any, n: int) -> list[dict[str, Any]]:
        return [{"embedding": outputs[i]} for i in range(n)]


def test_cpu_peak_memory_catches_transient_allocations() -> None:
    rows = sweep(Greedy(), "cpu", [16, 64], [4], repeats=1)
    by_len = {r.seq_len: r for r in rows}
    meter = MemoryMeter("cpu")
    if meter.source == "rss_peak":  # Linux: the peak inside the call, freed before it returned
        assert by_len[64].delta_mb > 12  # 256 rows x 64 KB = 16 MB, freed before returning
        assert by_len[64].peak_mb > by_len[16].peak_mb
    assert [r.tokens for r in rows] == [64, 256]  # fewest tokens first
