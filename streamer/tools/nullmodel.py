"""A model that costs nothing, for ``streamer bench``'s "streamer, no model" row.

With it the whole pipeline runs (fetch, decode, tokenize stage, batching, inference thread,
result encoding, publish, commit) while the model's own work is next to free, so records/s and
event-loop CPU per record measure *our* code: the ceiling the pipeline can reach on a machine,
to set beside a bare aiokafka loop that moves the same records (the "kafka passthrough" row).
Bench only: its outputs mean nothing.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from streamer.config import ModelConfig
from streamer.models.hf import Encoded, LoadTimings
from streamer.stream.records import ModelInfo

NULL_FINGERPRINT = "sha256:" + "0" * 64
NULL_DIM = 384  # all-MiniLM-L6-v2's: results of the same size as the real model's


def null_vector(dim: int = NULL_DIM, seed: int = 0) -> np.ndarray:
    """A fixed unit-norm float32 vector: its JSON is as long as a real embedding's."""
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


class NullModel:
    """An embedding "model" whose tokenizer and forward cost ~nothing.

    The ceiling of our own code: the model's own tokenizer is excluded too (``tokenize`` is a
    whitespace split into small fake ids, ``len(words) + 2`` of them, truncated at
    ``max_length``), and ``forward`` copies one precomputed normalised vector into every row
    (numpy only, no torch). Fingerprint and version are fixed; the device is the CPU.
    """

    CLS, SEP, WORD = 2, 3, 5

    def __init__(
        self,
        name: str = "null",
        version: str = "null",
        *,
        max_length: int = 128,
        dim: int = NULL_DIM,
    ) -> None:
        self.info = ModelInfo(
            name=name,
            version=version,
            fingerprint=NULL_FINGERPRINT,
            task="feature-extraction",
            device="cpu",
            dtype="float32",
        )
        self.max_length = max_length
        self.timings = LoadTimings()
        self.labels: dict[int, str] = {}
        self.vector = null_vector(dim)
        self.memory_bytes = self.vector.nbytes
        # ids by word count: a tokenize call slices and copies, it never builds a row by hand
        body = [self.WORD + (i % 64) for i in range(max_length - 2)]
        self._rows = [[self.CLS, *body[:k], self.SEP] for k in range(max_length - 1)]

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> NullModel:
        """A ``model_factory`` for :class:`streamer.app.Service`: name and length from ``cfg``."""
        return cls(cfg.name, cfg.version, max_length=cfg.max_length)

    def load(self) -> None:
        self.timings.phases["load"] = 0.0

    def tokenize(self, texts: list[str]) -> list[Encoded]:
        rows, most = self._rows, self.max_length - 2
        out = []
        for text in texts:
            words = len(text.split())
            out.append(Encoded(rows[min(words, most)][:], words > most))
        return out

    def forward(self, batch: list[list[int]]) -> np.ndarray:
        """One row per input, each a copy of the fixed vector (as a real model's fresh array)."""
        return np.broadcast_to(self.vector, (len(batch), len(self.vector))).copy()

    def postprocess(self, outputs: Any, n: int) -> list[dict[str, Any]]:
        arr = np.asarray(outputs, dtype=np.float32)
        return [{"embedding": arr[i]} for i in range(n)]

    def warmup(self, max_batch_size: int, max_batch_tokens: int) -> float:
        t = time.perf_counter()
        rows = max(1, min(8, max_batch_size))
        self.postprocess(self.forward([self._rows[min(8, len(self._rows) - 1)]] * rows), rows)
        self.timings.phases["warmup"] = time.perf_counter() - t
        return self.timings.phases["warmup"]
