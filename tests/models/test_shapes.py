"""Shape-stable batches: the ladder, padding, agreement with exact shapes, the graph runner.

Everything runs on the CPU. The CUDA capture itself needs a GPU; what decides between replay and
eager (and what happens when a capture fails) is tested here with fake graphs.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from streamer.config import ConfigError, ModelConfig, load_config
from streamer.models.hf import HFTextModel
from streamer.models.shapes import (
    GraphRunner,
    ShapeLadder,
    default_row_buckets,
    length_groups,
    min_cosine,
)

TEXTS = [
    "hello world",
    "the customer order failed again and nobody answered emails",
    "a",
    "new release shipment delayed",
    "security update broke the mobile app after deployment",
    "invoice",
    "our data pipeline was fixed",
    "my report page looks great",
    "support team needs review of the outage",
    "we rolled back the engine update",
    "subscription",
    "the whole team was happy so we rolled back",
    "order arrived",
    "your invoice is delayed",
    "page",
    "update",
    "the new mobile app looks great and the support team answered",
]


def loaded(path: Path, **kw: Any) -> HFTextModel:
    m = HFTextModel(ModelConfig(path=path, max_length=64, **kw))
    m.load()
    return m


# -- the ladder -----------------------------------------------------------------------------
def test_default_row_buckets_are_powers_of_two_and_the_batch_size() -> None:
    assert default_row_buckets(64) == (1, 2, 4, 8, 16, 32, 64)
    assert default_row_buckets(100) == (1, 2, 4, 8, 16, 32, 64, 100)
    assert default_row_buckets(1) == (1,)
    with pytest.raises(ValueError):
        default_row_buckets(0)


def test_padded_shape_rounds_widths_caps_them_and_buckets_rows() -> None:
    lad = ShapeLadder(max_length=100, width_multiple=32, row_buckets=(4, 16, 64))
    assert lad.padded_shape(1, 1) == (4, 32)
    assert lad.padded_shape(4, 32) == (4, 32)  # already on the ladder: unchanged
    assert lad.padded_shape(5, 33) == (16, 64)
    assert lad.padded_shape(64, 97) == (64, 100)  # capped at max_length, not 128
    assert lad.padded_shape(65, 10) == (65, 32)  # past the largest bucket: rows unpadded
    assert lad.padded_shape(3, 120) == (4, 120)  # never narrower than the longest row
    exact = ShapeLadder(max_length=100)
    assert exact.exact and not lad.exact
    assert exact.padded_shape(7, 13) == (7, 13)


def test_ladder_validates_its_inputs() -> None:
    with pytest.raises(ValueError, match="sorted"):
        ShapeLadder(max_length=64, row_buckets=(8, 4))
    with pytest.raises(ValueError):
        ShapeLadder(max_length=64, width_multiple=0)


@pytest.mark.parametrize(
    ("batch", "tokens", "multiple", "buckets", "max_length"),
    [
        (64, 8192, 32, default_row_buckets(64), 256),
        (256, 4096, 32, default_row_buckets(256), 128),
        (16, 1024, 16, (4, 8, 16), 64),
        (100, 2048, 32, default_row_buckets(100), 512),
        (8, 100, 1, (), 40),  # exact shapes
    ],
)
def test_ladder_shapes_cover_every_batch_the_budget_allows(
    batch: int, tokens: int, multiple: int, buckets: tuple[int, ...], max_length: int
) -> None:
    lad = ShapeLadder(max_length, multiple, buckets)
    shapes = lad.ladder_shapes(batch, tokens)
    assert shapes == sorted(set(shapes))
    reachable = {
        lad.padded_shape(r, w)
        for r in range(1, batch + 1)
        for w in range(1, max_length + 1)
        if r * w <= tokens
    }
    assert set(shapes) == reachable  # every batch meets a warm shape, and nothing else is run
    for rows, width in shapes:
        assert width <= max_length and (width % multiple == 0 or width == max_length)
        assert rows in buckets or not buckets
    if lad.exact:
        assert all(r * w <= tokens for r, w in shapes)


def test_ladder_shapes_are_few_on_cuda_defaults() -> None:
    lad = ShapeLadder(256, 32, default_row_buckets(64))
    shapes = lad.ladder_shapes(64, 8192)
    assert 30 <= len(shapes) <= 64  # 7 row buckets x 8 widths at most
    assert (64, 128) in shapes and (64, 160) in shapes  # 58 rows x 140 tokens pads to 64x160
    # 33 rows x 225 tokens fit 8192 and pad to 64 x 256: padded tokens may reach 2x the budget
    assert (64, 256) in shapes
    assert (64, 256) not in lad.ladder_shapes(64, 4096)  # 33 x 225 does not fit 4096


def test_ladder_shapes_always_include_the_smallest_shape() -> None:
    lad = ShapeLadder(256, 32, (8, 64))
    assert lad.ladder_shapes(64, 2) == [(8, 32)]


# -- config ---------------------------------------------------------------------------------
def test_config_keys_default_and_normalise() -> None:
    cfg = ModelConfig()
    assert cfg.width_multiple is None and cfg.row_buckets is None and cfg.cuda_graphs is True
    cfg = ModelConfig(row_buckets=[16, 4, 8, 4], width_multiple=16)
    assert cfg.row_buckets == [4, 8, 16] and cfg.width_multiple == 16


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"row_buckets": [0, 8]}, "at least 1 row"),
        ({"row_buckets": []}, "leave row_buckets unset"),
        ({"width_multiple": 0}, "greater than or equal to 1"),
    ],
)
def test_bad_shape_keys_name_the_key_and_the_fix(model: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError):
        ModelConfig(**model)
    with pytest.raises(ConfigError) as err:
        load_config(None, model=model)
    assert f"model.{next(iter(model))}" in str(err.value) and message in str(err.value)


# -- padding --------------------------------------------------------------------------------
def test_pad_places_ragged_rows_and_dummy_rows(tiny_model: Path) -> None:
    m = loaded(tiny_model, width_multiple=4, row_buckets=[4, 8])
    ids, mask = m.pad([[5, 6, 7], [8], [9, 10, 11, 12, 13]])
    assert ids.shape == mask.shape == (4, 8)
    assert ids.tolist() == [
        [5, 6, 7, 0, 0, 0, 0, 0],
        [8, 0, 0, 0, 0, 0, 0, 0],
        [9, 10, 11, 12, 13, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0],  # a dummy row: pad ids
    ]
    assert mask.tolist() == [
        [1, 1, 1, 0, 0, 0, 0, 0],
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0, 0],
        [1, 0, 0, 0, 0, 0, 0, 0],  # ... attending to one token, so no row is fully masked
    ]
    assert ids.dtype == mask.dtype == np.int64 and ids.flags["C_CONTIGUOUS"]
    # a smaller batch reuses the buffer, and stale tokens of the last batch are gone
    storage = m._buffers[0].data_ptr()  # type: ignore[index]
    ids, mask = m.pad([[7]])
    assert ids.tolist() == [[7, 0, 0, 0]] * 1 + [[0, 0, 0, 0]] * 3
    assert mask[:, 0].tolist() == [1, 1, 1, 1] and mask[:, 1:].sum() == 0
    assert m._buffers[0].data_ptr() == storage  # type: ignore[index]


def test_pad_keeps_exact_shapes_on_the_cpu_by_default(tiny_model: Path) -> None:
    m = loaded(tiny_model)
    assert m.ladder.exact
    rng = np.random.default_rng(0)
    batch = [list(rng.integers(1, 50, size=int(n))) for n in rng.integers(1, 40, size=13)]
    ids, mask = m.pad(batch)
    assert ids.shape == (13, max(map(len, batch)))
    for i, row in enumerate(batch):
        assert ids[i, : len(row)].tolist() == row and ids[i, len(row) :].sum() == 0
        assert mask[i].sum() == len(row) and mask[i, : len(row)].all()
    with pytest.raises(ValueError, match="empty"):
        m.pad([])


# -- agreement with exact shapes ------------------------------------------------------------
BATCH_SIZES = (1, 3, 5, 9, 16, 17)  # 17: past the largest bucket, no row padding


def test_padded_shapes_give_the_same_embeddings(tiny_model: Path) -> None:
    exact = loaded(tiny_model)
    padded = loaded(tiny_model, width_multiple=16, row_buckets=[4, 8, 16])
    ids = [e.ids for e in exact.tokenize(TEXTS)]
    for n in BATCH_SIZES:
        batch = (ids * 2)[:n]
        a, b = exact.forward(batch), padded.forward(batch)
        assert a.shape == b.shape == (n, 32) and b.dtype == np.float32
        assert padded._views[0].shape[0] == (n if n > 16 else min(x for x in (4, 8, 16) if x >= n))
        assert min_cosine(a, b) >= 0.9999
        out = padded.postprocess(b, n)
        assert len(out) == n


def test_padded_shapes_give_the_same_classification(tiny_classifier: Path) -> None:
    exact = loaded(tiny_classifier, task="text-classification", return_all_scores=True)
    padded = loaded(
        tiny_classifier,
        task="text-classification",
        return_all_scores=True,
        width_multiple=16,
        row_buckets=[4, 8, 16],
    )
    ids = [e.ids for e in exact.tokenize(TEXTS)]
    for n in BATCH_SIZES:
        batch = (ids * 2)[:n]
        a, b = exact.forward(batch), padded.forward(batch)
        assert a.shape == b.shape == (n, 2)
        assert min_cosine(a, b) >= 0.9999
        np.testing.assert_allclose(b.sum(axis=1), 1.0, atol=1e-5)
        ra, rb = exact.postprocess(a, n), padded.postprocess(b, n)
        assert len(rb) == n and [r["label"] for r in ra] == [r["label"] for r in rb]


def test_exported_backends_drop_dummy_rows(tiny_model: Path) -> None:
    from streamer.models.backends import OnnxRuntimeModel

    m = OnnxRuntimeModel(ModelConfig(path=tiny_model, max_length=64, row_buckets=[8]))
    HFTextModel.load(m)  # the torch part only: no export needed to see the rows
    m._model = None
    m._run = lambda ids, mask: mask.astype(np.float32)  # type: ignore[method-assign]
    out = m.forward([[5, 6], [7]])
    assert out.shape == (2, 2) and out.tolist() == [[1, 1], [1, 0]]


# -- CUDA graphs: selection and fallback ----------------------------------------------------
def test_cuda_graphs_are_a_no_op_on_the_cpu(tiny_model: Path) -> None:
    m = loaded(tiny_model, cuda_graphs=True)
    assert not m.uses_cuda_graphs()
    assert m.warmup(16, 1024) > 0
    assert m.graphs is None and m.warm_shapes == 1
    assert m.graph_replays == 0 and m.eager_fallbacks == 0
    assert m.forward([[5, 6, 7]]).shape == (1, 32)
    # the same model on CUDA would use them, unless they are turned off
    m.device = "cuda"
    assert m.uses_cuda_graphs()
    off = loaded(tiny_model, cuda_graphs=False)
    off.device = "cuda"
    assert not off.uses_cuda_graphs()


class FakeGraphs:
    """Stands in for CUDA capture: records captures and replays, can fail chosen shapes."""

    def __init__(self, eager: Any, fail: Collection[tuple[int, int]] = ()) -> None:
        self.eager, self.fail = eager, fail
        self.captured: list[tuple[int, int]] = []
        self.replayed: list[tuple[int, int]] = []

    def capture(self, shape: tuple[int, int]) -> Any:
        if shape in self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.captured.append(shape)

        def replay(ids: Any, mask: Any, n: int) -> np.ndarray:
            assert tuple(ids.shape) == shape  # a graph only ever sees its own shape
            self.replayed.append(shape)
            return self.eager(ids, mask, n)

        return replay


def test_runner_replays_warm_shapes_and_runs_the_rest_eagerly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[tuple[int, int]] = []

    def eager(ids: Any, mask: Any, n: int) -> np.ndarray:
        calls.append(ids.shape)
        return np.zeros((n, 3), np.float32)

    fake = FakeGraphs(eager, fail={(8, 32), (8, 64)})
    runner = GraphRunner(fake.capture, eager, name="m@1")
    with caplog.at_level(logging.DEBUG, logger="streamer.models.shapes"):
        assert runner.prepare_all([(4, 32), (8, 32), (8, 64), (16, 32)]) == 2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "8x32" in warnings[0].getMessage()  # one warning, not one each
    assert set(runner.failed) == {(8, 32), (8, 64)}
    assert runner.prepare((4, 32)) and not runner.prepare((8, 32))  # never captured twice
    assert fake.captured == [(4, 32), (16, 32)]

    def batch(rows: int, width: int) -> np.ndarray:
        return np.ones((rows, width), np.int64)

    assert runner.run(batch(4, 32), batch(4, 32), 3).shape == (3, 3)  # replay
    assert runner.run(batch(8, 32), batch(8, 32), 5).shape == (5, 3)  # capture failed: eager
    assert runner.run(batch(2, 7), batch(2, 7), 2).shape == (2, 3)  # off the ladder: eager
    assert (runner.replays, runner.fallbacks) == (1, 2)
    assert fake.replayed == [(4, 32)]


def test_runner_falls_back_when_a_replay_fails() -> None:
    def eager(ids: Any, mask: Any, n: int) -> np.ndarray:
        return np.ones((n, 2), np.float32)

    def broken(shape: tuple[int, int]) -> Any:
        def replay(ids: Any, mask: Any, n: int) -> np.ndarray:
            raise RuntimeError("CUDA error: operation failed")

        return replay

    runner = GraphRunner(broken, eager)
    runner.prepare((2, 8))
    ids = np.ones((2, 8), np.int64)
    assert runner.run(ids, ids, 2).tolist() == [[1, 1], [1, 1]]
    assert (2, 8) not in runner.graphs and "replay" in runner.failed[(2, 8)]
    runner.run(ids, ids, 2)
    assert (runner.replays, runner.fallbacks) == (0, 2)


def test_forward_uses_the_runner_and_agrees_with_exact_shapes(tiny_model: Path) -> None:
    exact = loaded(tiny_model)
    m = loaded(tiny_model, width_multiple=16, row_buckets=[4, 8, 16])
    fake = FakeGraphs(m._eager)
    m.graphs = GraphRunner(fake.capture, m._eager)
    m.graphs.prepare_all(m.ladder.ladder_shapes(16, 256))  # up to 16 x 32; 16 x 48 is not
    ids = [e.ids for e in exact.tokenize(TEXTS)]
    for n in (1, 3, 8, 16):
        batch = ids[:n]
        got = m.forward(batch)
        assert got.shape == (n, 32)
        assert min_cosine(got, exact.forward(batch)) >= 0.9999
    assert m.graph_replays == 4 and m.eager_fallbacks == 0
    long_batch = [[5] * 40] * 16  # 16 x 48 is over the budget the ladder was warmed for
    assert m.forward(long_batch).shape == (16, 32)
    assert m.graph_replays == 4 and m.eager_fallbacks == 1


def test_cuda_warmup_captures_every_ladder_shape(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The warm-up's orchestration, with CUDA's calls faked (the capture needs a GPU)."""
    import torch

    m = loaded(tiny_model)
    m.device = m._ladder_device = "cuda"  # as if loaded on a GPU
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: object())
    monkeypatch.setattr(torch.cuda, "Stream", lambda: object())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    eager_shapes: list[tuple[int, int]] = []

    def eager(ids: Any, mask: Any, n: int) -> np.ndarray:
        eager_shapes.append(tuple(ids.shape))
        return np.zeros((n, 32), np.float32)

    fake = FakeGraphs(eager, fail={(16, 64)})
    monkeypatch.setattr(m, "_eager", eager)
    monkeypatch.setattr(m, "_capture_graph", fake.capture)
    with caplog.at_level(logging.INFO, logger="streamer.models.hf"):
        seconds = m.warmup(16, 512)
    expected = ShapeLadder(64, 32, default_row_buckets(16)).ladder_shapes(16, 512)
    assert m.ladder == ShapeLadder(64, 32, (1, 2, 4, 8, 16))  # CUDA defaults
    assert m.warm_shapes == len(expected) and seconds == m.timings.phases["warmup"] > 0
    assert sorted(fake.captured) == sorted(set(expected) - {(16, 64)})
    assert fake.captured[0] == max(fake.captured, key=lambda s: s[0] * s[1])  # largest first
    assert m.graphs is not None and set(m.graphs.failed) == {(16, 64)}
    line = next(r.getMessage() for r in caplog.records if "warmed" in r.getMessage())
    assert f"{len(expected)} shapes" in line and "1 eager" in line

    # without graphs every shape runs eagerly once, ragged
    m.cfg = m.cfg.model_copy(update={"cuda_graphs": False})
    eager_shapes.clear()
    m.warmup(16, 512)
    assert m.graphs is None and sorted(eager_shapes) == sorted(expected)


def test_warmup_samples_are_ragged_and_valid(tiny_model: Path) -> None:
    m = loaded(tiny_model)
    vocab = m._model.config.vocab_size
    for rows, width in [(1, 1), (1, 32), (4, 32), (16, 64)]:
        ids, mask = m._sample(rows, width, seed=0)
        check_ids, check_mask = m._sample(rows, width, seed=1)
        for i, k in ((ids, mask), (check_ids, check_mask)):
            assert i.shape == k.shape == (rows, width) and i.dtype == np.int64
            assert (k.sum(axis=1) >= 1).all() and (i[k == 0] == m._pad_id).all()
            assert i.min() >= 0 and i.max() < vocab
        if width > 1:
            assert not mask.all()  # an all-ones mask would be dropped: another kernel
        assert check_mask[0].all()
        if rows > 1:
            assert check_mask[-1].sum() == 1


def test_min_cosine() -> None:
    a = np.array([[1.0, 0.0], [0.0, 2.0]], np.float32)
    assert min_cosine(a, a) == pytest.approx(1.0)
    assert min_cosine(a, a[::-1]) == pytest.approx(0.0)
    assert np.isnan(min_cosine(a, np.full_like(a, np.nan)))
    with pytest.raises(ValueError):
        min_cosine(a, a[:1])


def test_length_groups_cover_every_row_once_and_beat_one_padded_forward() -> None:
    rng = np.random.default_rng(3)
    for _ in range(50):
        lengths = rng.integers(1, 128, size=int(rng.integers(2, 80)))
        groups = length_groups(lengths, 64)
        one = len(lengths) * lengths.max() + 64
        if groups is None:
            continue
        rows = np.concatenate(groups)
        assert sorted(rows.tolist()) == list(range(len(lengths)))  # each row once
        cost = sum(len(g) * lengths[g].max() + 64 for g in groups)
        assert cost < one
        widths = [lengths[g].max() for g in groups]
        assert widths == sorted(widths)  # runs of the rows sorted by length


def test_length_groups_leave_tight_or_tiny_batches_alone() -> None:
    assert length_groups(np.array([7]), 64) is None
    assert length_groups(np.array([10, 11, 12, 12]), 64) is None  # little padding
    assert length_groups(np.array([2, 100]), 1000) is None  # a forward costs more than padding
    assert [g.tolist() for g in length_groups(np.array([2, 100, 3, 101]), 8)] == [[0, 2], [1, 3]]
