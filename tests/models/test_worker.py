"""The inference worker: a failing row is isolated by bisection, out-of-memory batches are split
and retried, and every other row keeps its own output."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from streamer.config import RuntimeConfig
from streamer.models.hf import Encoded, LoadTimings
from streamer.models.worker import InferenceWorker, Inferred
from streamer.stream.records import InferenceFailed, ModelInfo, TokenizationFailed


class FakeModel:
    """Output row = (row length, first id); CUDA's out-of-memory error over ``limit`` padded
    tokens; a ValueError for any batch that holds a row starting with a ``poison`` id."""

    def __init__(self, limit: int = 10_000, message_only: bool = False, poison: int = -1) -> None:
        self.limit = limit
        self.message_only = message_only
        self.poison = poison
        self.info = ModelInfo("fake", "1", "sha256:00", "feature-extraction")
        self.max_length = 64
        self.timings = LoadTimings()
        self.calls: list[int] = []  # padded tokens of each forward call

    def tokenize(self, texts: list[str]) -> list[Encoded]:
        if any(t == "bad" for t in texts):
            raise ValueError("cannot tokenize 'bad'")
        return [Encoded([1] * len(t), False) for t in texts]

    def forward(self, batch: list[list[int]]) -> Any:
        padded = len(batch) * max(len(r) for r in batch)
        self.calls.append(padded)
        if any(r[0] == self.poison for r in batch):
            raise ValueError("bad row")
        if padded > self.limit:
            if self.message_only:  # how older torch versions and some kernels report it
                raise RuntimeError(f"CUDA error: out of memory ({padded} tokens)")
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried {padded} tokens")
        return np.array([[float(len(r)), float(r[0])] for r in batch], dtype=np.float32)

    def warmup(self, max_batch_size: int, max_batch_tokens: int) -> float:
        return 0.0


def expected(batch: list[list[int]]) -> list[list[float]]:
    return [[float(len(r)), float(r[0])] for r in batch]


def bisect(worker: InferenceWorker, model: FakeModel, batch: list[list[int]]) -> Inferred:
    """What ``infer`` does on the inference thread, called here directly."""
    return worker._infer_sync(model, batch)  # type: ignore[arg-type]


@pytest.fixture
def worker() -> InferenceWorker:
    return InferenceWorker(RuntimeConfig(torch_threads=1))


@pytest.mark.parametrize("message_only", [False, True])
async def test_oom_splits_the_batch_and_every_row_gets_its_result(message_only: bool) -> None:
    model = FakeModel(limit=40, message_only=message_only)
    worker = InferenceWorker(RuntimeConfig(torch_threads=1))
    seen: list[int] = []
    worker.on_oom = seen.append
    await worker.start()
    try:
        assert await worker.load(lambda: model) is model  # type: ignore[arg-type,return-value]
        batch = [[i + 1] * (3 + i % 5) for i in range(16)]  # 16 rows x 7 = 112 padded tokens
        out = await worker.infer(model, batch)  # type: ignore[arg-type]
    finally:
        await worker.stop()
    assert out.failures == {}
    assert out.outputs is not None and out.outputs.shape == (16, 2)
    # each row's output is its own row's, in order, after the splits
    assert out.outputs.tolist() == expected(batch)
    assert seen and seen[0] == 112  # told the padded size of the batch that failed
    assert sorted(c for c in model.calls if c > 40) == sorted(seen)  # each OOM reported once
    assert worker.busy_since is None and worker.stuck_for() == 0.0


def test_a_single_record_that_does_not_fit_fails_alone(worker: InferenceWorker) -> None:
    model = FakeModel(limit=10)
    seen: list[int] = []
    worker.on_oom = seen.append
    batch = [[1] * 4, [2] * 12, [3] * 5]  # 12 tokens never fit
    out = bisect(worker, model, batch)
    assert set(out.failures) == {1}
    assert isinstance(out.failures[1], InferenceFailed)
    assert out.failures[1].stage == "inference"
    assert "out of memory" in str(out.failures[1])
    assert out.outputs is not None
    assert out.outputs[0].tolist() == [4, 1] and out.outputs[2].tolist() == [5, 3]
    assert out.outputs[1].tolist() == [0, 0]  # the failed row is left zero
    assert 12 in seen


@pytest.mark.parametrize("bad", [0, 5, 12])
def test_bisection_isolates_the_failing_row(worker: InferenceWorker, bad: int) -> None:
    model = FakeModel(poison=99)
    seen: list[int] = []
    worker.on_oom = seen.append
    batch = [[i + 1] * (1 + i % 4) for i in range(13)]
    batch[bad] = [99, 99]
    out = bisect(worker, model, batch)
    assert list(out.failures) == [bad]
    assert isinstance(out.failures[bad], InferenceFailed)
    assert "ValueError: bad row" in str(out.failures[bad])
    assert out.outputs is not None and out.outputs.shape == (13, 2)
    for i, row in enumerate(expected(batch)):  # the others' results are intact
        assert out.outputs[i].tolist() == (row if i != bad else [0.0, 0.0])
    assert not seen  # other errors are not reported as out of memory
    assert len(model.calls) <= 2 * 4 + 1  # halves down to the row: ~2 log2(n) calls


def test_several_failing_rows(worker: InferenceWorker) -> None:
    out = bisect(worker, FakeModel(poison=9), [[1, 1], [9, 9], [2, 2], [9], [3]])
    assert sorted(out.failures) == [1, 3]
    assert out.outputs is not None
    assert out.outputs[[0, 2, 4]].tolist() == [[2, 1], [2, 2], [1, 3]]


def test_every_row_failing_gives_no_outputs(worker: InferenceWorker) -> None:
    out = bisect(worker, FakeModel(poison=9), [[9], [9, 9]])
    assert out.outputs is None and sorted(out.failures) == [0, 1]


def test_a_batch_that_works_is_one_call(worker: InferenceWorker) -> None:
    model = FakeModel()
    batch = [[1, 2], [3]]
    out = bisect(worker, model, batch)
    assert out.failures == {} and out.outputs is not None
    assert out.outputs.tolist() == expected(batch) and len(model.calls) == 1


def test_tokenize_isolates_the_text_that_fails() -> None:
    model = FakeModel()
    out = InferenceWorker.tokenize(model, ["ab", "bad", "abc"])  # type: ignore[arg-type]
    assert [e.ids for e in (out[0], out[2])] == [[1, 1], [1, 1, 1]]
    assert isinstance(out[1], TokenizationFailed)
    assert out[1].stage == "tokenize" and "cannot tokenize" in str(out[1])
    good = InferenceWorker.tokenize(model, ["a", "ab"])  # type: ignore[arg-type]
    assert [len(e.ids) for e in good] == [1, 2]


async def test_memory_of_a_released_model_is_freed_off_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A full collection (unfreeze, collect, freeze: streamer/memory.py) with a model's worth of
    objects stalls whatever thread runs it: the registry hands it to the loader thread."""
    import asyncio
    import threading

    from streamer.models import worker as worker_module

    ran_on: list[str] = []
    done = threading.Event()

    def collect() -> int:
        ran_on.append(threading.current_thread().name)
        done.set()
        return 0

    monkeypatch.setattr(worker_module, "refreeze_gc", collect)
    worker = InferenceWorker(RuntimeConfig(torch_threads=1))
    await worker.start()
    try:
        worker.free_memory(cuda=False)
        assert await asyncio.get_running_loop().run_in_executor(None, done.wait, 10)
    finally:
        await worker.stop()
    assert ran_on and ran_on[0].startswith("streamer-load")


def test_a_cpu_model_runs_rows_of_like_length_together_results_in_row_order(
    worker: InferenceWorker,
) -> None:
    """``splits_by_length``: a batch in arrival order mixing short and long rows runs as a few
    forwards of similar lengths (less padding), each result back on its own row."""
    model = FakeModel()
    model.splits_by_length = True  # type: ignore[attr-defined]
    lengths = [3, 60, 4, 58, 2, 61, 5, 3] * 4
    batch = [[i + 1] * n for i, n in enumerate(lengths)]
    out = bisect(worker, model, batch)
    assert out.failures == {} and out.outputs is not None
    assert out.outputs.tolist() == expected(batch)  # every row its own result, in order
    assert len(model.calls) > 1
    assert sum(model.calls) < len(batch) * max(lengths) / 2  # half the padded tokens or less

    model.calls.clear()
    even = [[i + 1] * 10 for i in range(16)]  # nothing to win: one forward
    assert bisect(worker, model, even).outputs.tolist() == expected(even)  # type: ignore[union-attr]
    assert len(model.calls) == 1


def test_a_failing_row_is_still_found_when_split_by_length(worker: InferenceWorker) -> None:
    model = FakeModel(poison=7)
    model.splits_by_length = True  # type: ignore[attr-defined]
    batch = [[i] * (3 if i % 2 else 60) for i in range(1, 13)]
    out = bisect(worker, model, batch)
    assert list(out.failures) == [6]  # the row whose first id is 7
    assert out.outputs is not None
    good = [i for i in range(len(batch)) if i != 6]
    assert out.outputs[good].tolist() == [expected(batch)[i] for i in good]


def test_the_padding_reported_is_what_the_forwards_did(worker: InferenceWorker) -> None:
    model = FakeModel()
    batch = [[1] * 3, [2] * 60, [3] * 4, [4] * 58] * 4
    assert bisect(worker, model, batch).padded_tokens == 16 * 60  # one forward: rows × longest
    model.splits_by_length = True  # type: ignore[attr-defined]
    model.calls.clear()
    out = bisect(worker, model, batch)
    assert out.padded_tokens == sum(model.calls) == 8 * 4 + 8 * 60  # short rows, long rows
