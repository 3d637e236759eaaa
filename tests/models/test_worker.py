"""The inference worker: out-of-memory batches are split and retried, not dead-lettered."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from streamer.config import RuntimeConfig
from streamer.models.hf import Encoded, LoadTimings
from streamer.models.worker import InferenceWorker
from streamer.stream.records import InferenceFailed, ModelInfo


class OomModel:
    """Raises CUDA's out-of-memory error for batches over ``limit`` padded tokens."""

    def __init__(self, limit: int, message_only: bool = False) -> None:
        self.limit = limit
        self.message_only = message_only
        self.info = ModelInfo("fake", "1", "sha256:00", "feature-extraction")
        self.max_length = 64
        self.timings = LoadTimings()
        self.calls: list[int] = []

    def tokenize(self, texts: list[str]) -> list[Encoded]:
        return [Encoded([1] * len(t), False) for t in texts]

    def forward(self, batch: list[list[int]]) -> Any:
        padded = len(batch) * max(len(r) for r in batch)
        self.calls.append(padded)
        if padded > self.limit:
            if self.message_only:  # how older torch versions and some kernels report it
                raise RuntimeError(f"CUDA error: out of memory ({padded} tokens)")
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried {padded} tokens")
        return np.array([[float(len(r)), float(r[0])] for r in batch], dtype=np.float32)

    def postprocess(self, outputs: Any, n: int) -> list[dict[str, Any]]:
        return [{"embedding": outputs[i]} for i in range(n)]

    def warmup(self, max_batch_size: int, max_batch_tokens: int) -> float:
        return 0.0


@pytest.mark.parametrize("message_only", [False, True])
async def test_oom_splits_the_batch_and_every_row_gets_its_result(message_only: bool) -> None:
    model = OomModel(limit=40, message_only=message_only)
    worker = InferenceWorker(RuntimeConfig(torch_threads=1))
    seen: list[int] = []
    worker.on_oom = seen.append
    await worker.start()
    try:
        await worker.load(lambda: model)
        batch = [[i + 1] * (3 + i % 5) for i in range(16)]  # 16 rows x 7 = 112 padded tokens
        out = await worker.infer(model, batch)
    finally:
        await worker.stop()
    assert len(out) == 16
    assert not any(isinstance(o, InferenceFailed) for o in out)
    for row, res in zip(batch, out, strict=True):  # each result is its own row's, in order
        assert res["embedding"].tolist() == [len(row), row[0]]
    assert seen and seen[0] == 112  # told the padded size of the batch that failed
    assert sorted(c for c in model.calls if c > 40) == sorted(seen)  # each OOM reported once


def test_a_single_record_that_does_not_fit_fails_alone() -> None:
    model = OomModel(limit=10)
    worker = InferenceWorker(RuntimeConfig(torch_threads=1))
    seen: list[int] = []
    worker.on_oom = seen.append
    out = worker._bisect(model, [[1] * 4, [2] * 12, [3] * 5])  # 12 tokens never fit
    assert isinstance(out[1], InferenceFailed)
    assert "out of memory" in str(out[1])
    assert out[0]["embedding"].tolist() == [4, 1] and out[2]["embedding"].tolist() == [5, 3]
    assert 12 in seen


def test_other_errors_are_not_reported_as_oom() -> None:
    class Broken(OomModel):
        def forward(self, batch: list[list[int]]) -> Any:
            if any(r[0] == 9 for r in batch):
                raise ValueError("bad row")
            return super().forward(batch)

    model = Broken(limit=1000)
    worker = InferenceWorker(RuntimeConfig(torch_threads=1))
    seen: list[int] = []
    worker.on_oom = seen.append
    out = worker._bisect(model, [[1, 1], [9, 9], [2, 2]])
    assert isinstance(out[1], InferenceFailed) and not seen
    assert out[0]["embedding"].tolist() == [2, 1]
