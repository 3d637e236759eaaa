"""The breaker: trips on one systemic reason over a window, never on input errors or poison."""

from __future__ import annotations

from streamer.stream.breaker import Breaker
from streamer.stream.records import (
    EncodeFailed,
    InferenceFailed,
    InvalidJson,
    TokenizationFailed,
)


def test_trips_when_most_of_a_window_fails_for_one_systemic_reason() -> None:
    b = Breaker(window_records=100, failure_ratio=0.5)
    b.ok(40)
    b.failed([InferenceFailed("CUDA error: an illegal memory access")] * 59)
    assert b.tripped is None  # 99 records: the window is not full yet
    b.failed([InferenceFailed("CUDA error: an illegal memory access")])
    assert b.tripped is not None
    assert "60 of the last 100 records failed with InferenceFailed" in b.tripped
    assert "breaker.failure_ratio=0.5" in b.tripped


def test_input_errors_and_mixed_reasons_do_not_trip() -> None:
    b = Breaker(window_records=100, failure_ratio=0.5)
    b.failed([InvalidJson("not JSON")] * 500)  # bad input is the DLQ's business
    b.failed([TokenizationFailed(f"tokenizer failed on record {i}") for i in range(300)])
    assert b.tripped is None  # systemic, but every reason different
    b.failed([EncodeFailed("boom")] * 40 + [TokenizationFailed("same")] * 40)
    assert b.tripped is None  # 40 % each


def test_poison_at_one_percent_never_trips_and_the_window_slides() -> None:
    b = Breaker(window_records=200, failure_ratio=0.5)
    for _ in range(1000):
        b.ok(99)
        b.failed([InferenceFailed("marker token")])
    assert b.tripped is None
    # a fault after a long healthy run: only the last window counts
    b.failed([InferenceFailed("device lost")] * 120)
    assert b.tripped is not None and "device lost" in b.tripped


def test_disabled_never_trips() -> None:
    b = Breaker(window_records=10, failure_ratio=0.5, enabled=False)
    b.failed([InferenceFailed("x")] * 100)
    assert b.tripped is None
