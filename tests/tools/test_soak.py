"""``streamer soak``: the two verdicts on hand-made samples, and a small real run (embedded
broker, ``streamer run`` as a child process). No thresholds on RSS or timings: the full run is a
benchmark, these only check that it measures and reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from streamer.cli import main
from streamer.tools.soak import Sample, lag_trend, outputs_from_metrics, rss_band

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def drain_samples(
    lags: list[int], total: int, rss: list[float] | None = None, period: float = 1.0
) -> list[Sample]:
    """Samples one ``period`` apart with the given lags (committed = total - lag)."""
    rss = rss or [100.0] * len(lags)
    return [
        Sample(t_s=i * period, rss_mb=r, lag=lag, committed=total - lag, outputs=None)
        for i, (lag, r) in enumerate(zip(lags, rss, strict=True))
    ]


# -- the RSS band ---------------------------------------------------------------------------------
def test_band_reference_is_the_median_after_warm_up() -> None:
    # 1,000 records, warm-up over at 100 committed: the first two samples (start-up) are ignored
    samples = drain_samples(
        [1000, 950, 900, 700, 500, 300, 100, 0],
        1000,
        rss=[20.0, 80.0, 100.0, 105.0, 95.0, 100.0, 108.0, 100.0],
    )
    band = rss_band(samples, 1000, 0.1)
    assert band.warmup_end_s == 2.0 and band.samples == 6
    assert band.reference_mb == 100.0
    assert band.min_mb == 95.0 and band.max_mb == 108.0
    assert band.min_pct == pytest.approx(95.0) and band.max_pct == pytest.approx(108.0)
    assert band.within is True


def test_band_catches_one_sample_outside() -> None:
    samples = drain_samples([900, 700, 500, 300, 0], 1000, rss=[100.0, 100.0, 115.0, 99.0, 101.0])
    band = rss_band(samples, 1000, 0.1)
    assert band.reference_mb == 100.0 and band.max_pct == pytest.approx(115.0)
    assert band.within is False
    low = drain_samples([900, 700, 500, 300, 0], 1000, rss=[100.0, 100.0, 89.0, 100.0, 101.0])
    assert rss_band(low, 1000, 0.1).within is False  # below the band fails too
    assert rss_band(samples, 1000, 0.1, band_pct=20.0).within is True


def test_band_drift_tells_a_ramp_from_a_flat_line() -> None:
    lags = list(range(900, -1, -100))  # 10 samples, all after warm-up
    ramp = drain_samples(lags, 1000, rss=[100.0 + i for i in range(10)])  # +1 MB a second
    band = rss_band(ramp, 1000, 0.1)
    assert band.slope_mb_per_min == pytest.approx(60.0)
    assert band.within is True  # 100..109 around a median of 104.5: a ramp can hide in a band
    flat = drain_samples(lags, 1000, rss=[100.0] * 4 + [104.0] * 2 + [100.0] * 4)  # a step back
    assert rss_band(flat, 1000, 0.1).slope_mb_per_min == pytest.approx(0.0, abs=1e-9)
    assert rss_band(flat[-1:], 1000, 0.1).slope_mb_per_min is None  # one sample: no slope


def test_band_without_samples_after_warm_up_is_not_judged() -> None:
    samples = drain_samples([1000, 1000, 950], 1000)
    band = rss_band(samples, 1000, 0.1)
    assert band.within is None and band.reference_mb is None and band.samples == 0
    # warm-up fraction 0: every sample counts
    assert rss_band(samples, 1000, 0.0).samples == 3


# -- lag steadiness -------------------------------------------------------------------------------
def test_steady_drain_after_start_up() -> None:
    # three samples of start-up (nothing committed), then 100 records/s down to 0
    lags = [1000, 1000, 1000, *range(900, -1, -100)]
    trend = lag_trend(drain_samples(lags, 1000))
    assert trend.drain_start_s == 2.0  # the last sample before the first commit
    assert trend.drain_end_s == 12.0 and trend.drained
    assert trend.monotone and trend.steady is True and trend.note == ""
    # the window starts at the last flat sample: every quarter falls at 100 records/s
    assert trend.quarter_rates == pytest.approx([100.0] * 4)
    assert trend.longest_stall_s == 0.0


def test_a_stall_as_long_as_a_quarter_is_not_steady() -> None:
    lags = [1000, 900, 800, 700, 600, 600, 600, 600, 500, 400, 300, 200, 0]
    trend = lag_trend(drain_samples(lags, 1000))
    assert trend.monotone  # never rising...
    assert trend.steady is False  # ...but one quarter did not fall at all
    assert trend.quarter_rates[1] == pytest.approx(0.0, abs=1e-9)
    assert trend.longest_stall_s == 3.0 and "stall" in trend.note


def test_lag_that_rises_is_not_steady() -> None:
    lags = [1000, 800, 600, 700, 400, 300, 200, 100, 0]
    trend = lag_trend(drain_samples(lags, 1000))
    assert not trend.monotone and trend.steady is False and "rose" in trend.note


def test_too_few_samples_are_not_judged() -> None:
    trend = lag_trend(drain_samples([1000, 500, 0], 1000))
    assert trend.drained and trend.monotone
    assert trend.steady is None and trend.quarter_rates == []
    assert "--interval-s" in trend.note


def test_a_run_that_never_drained() -> None:
    trend = lag_trend(drain_samples([1000, 900, 800, 700, 600, 500, 400, 300, 200], 1000))
    assert not trend.drained and trend.drain_end_s is None
    assert trend.steady is True  # it was falling steadily when it stopped


def test_outputs_from_a_metrics_page() -> None:
    page = "\n".join(
        [
            "# HELP streamer_records_published_total Results acknowledged by the broker",
            "# TYPE streamer_records_published_total counter",
            'streamer_records_published_total{model="null",topic="soak"} 1200.0',
            'streamer_records_published_created{model="null",topic="soak"} 1.7e+09',
            'streamer_records_published_total{model="other",topic="soak"} 30.0',
            'streamer_records_dead_lettered_total{reason="decode",topic="soak"} 4.0',
            'streamer_records_consumed_total{topic="soak"} 5000.0',
        ]
    )
    assert outputs_from_metrics(page) == 1234
    assert outputs_from_metrics("") == 0


# -- the command ----------------------------------------------------------------------------------
def test_help_explains_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["soak", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for words in ("1,000,000", "bench/soak.json", "bench/soak.png", "'null' (default)", "median"):
        assert words in text


def test_bad_options_say_what_to_do(capsys: pytest.CaptureFixture[str], root_logging: None) -> None:
    assert main(["soak", "--warmup-fraction", "1.5"]) == 1
    assert "--warmup-fraction must be in [0, 1)" in " ".join(capsys.readouterr().out.split())
    assert main(["soak", "--model", "/nonexistent/model"]) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "not 'null', 'minilm' or a model directory" in out


@pytest.mark.integration
def test_small_soak_end_to_end(tmp_path: Path, root_logging: None) -> None:
    """3,000 records through a real ``streamer run`` child: samples until lag 0, a clean
    SIGTERM exit, the JSON and a real PNG."""
    out = tmp_path / "soak.json"
    code = main(
        ["soak", "--records", "3000", "--interval-s", "0.2", "--partitions", "4", "--out", str(out)]
    )

    result = json.loads(out.read_text())
    summary = result["summary"]
    assert code == (1 if summary["passed"] is False else 0)
    samples = result["samples"]
    assert len(samples) >= 2
    assert {"t_s", "rss_mb", "lag", "committed", "outputs"} <= samples[0].keys()
    assert samples[0]["lag"] == 3000 and samples[0]["committed"] == 0
    assert samples[-1]["lag"] == 0 and samples[-1]["committed"] == 3000
    assert samples[-1]["outputs"] == 3000  # results acknowledged, from the child's /metrics
    assert all(s["rss_mb"] > 0 for s in samples)
    assert [s["t_s"] for s in samples] == sorted(s["t_s"] for s in samples)
    assert result["child"]["exit_code"] == 0
    assert sum(result["child"]["acked_end_offsets"].values()) == 3000
    assert result["produce"]["records"] == 3000 and result["produce"]["records_per_s"] > 0

    assert summary["records"] == 3000 and summary["duration_s"] > 0
    assert summary["records_per_s"] is not None and summary["records_per_s"] > 0
    assert summary["first_commit_s"] is not None
    band, lag = summary["rss"], summary["lag"]
    assert band["reference_mb"] > 0 and band["samples"] >= 1  # the lag-0 sample at least
    assert band["min_pct"] <= 100.0 <= band["max_pct"]
    assert band["within"] in (True, False)
    assert "slope_mb_per_min" in band
    assert lag["drained"] is True and lag["monotone"] is True
    assert lag["steady"] in (True, False, None)
    assert summary["passed"] in (True, False, None)
    assert "steady" in summary["definitions"]

    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000
