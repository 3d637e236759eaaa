"""``streamer bench``'s compression rows: each ``kafka.compression_type`` end to end.

The zero-cost model runs (so records/s is the pipeline's ceiling, where a codec's CPU cost
shows), with one change: every result row is a *different* random unit vector. The plain
:class:`~streamer.tools.nullmodel.NullModel` repeats one vector, which any codec would shrink to
almost nothing. Random float32 rows, written as JSON numbers, have about the entropy of real
embeddings' digits, so bytes per record come out close to a real model's output.

Bytes per record are measured on the output topic as the broker stores and serves it (raw
``Fetch``, :mod:`streamer.kafka.wire`): what crosses the network to the broker, sits on its
disks and goes to every reader.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from streamer.config import ModelConfig
from streamer.kafka.client import CODECS, check_codec
from streamer.kafka.wire import read_topic_log
from streamer.tools.nullmodel import NullModel


class DistinctRowsModel(NullModel):
    """The null model with a fresh random unit vector per row (see the module's docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rng = np.random.default_rng(7)

    def forward(self, batch: list[list[int]]) -> np.ndarray:
        rows = self._rng.standard_normal((len(batch), len(self.vector)), dtype=np.float32)
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        return rows

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> DistinctRowsModel:
        return cls(cfg.name, cfg.version, max_length=cfg.max_length)


def available_codecs() -> list[str]:
    """The codecs aiokafka can use here (lz4/snappy/zstd need cramjam)."""
    out = []
    for codec in CODECS:
        try:
            check_codec(codec)
        except ValueError:
            continue
        out.append(codec)
    return out


async def compression_row(
    bootstrap: str, cfg_over: dict[str, Any], texts: list[str], topic: str, codec: str
) -> dict[str, Any]:
    """``texts`` (already in ``topic``) through streamer with ``kafka.compression_type=codec``:
    the usual streamer figures plus the output topic's size as stored."""
    from streamer.tools.bench import end_to_end

    run = f"bench-compression-{codec}"
    kafka = {**cfg_over.get("kafka", {}), "compression_type": codec}
    row = await end_to_end(
        bootstrap,
        {**cfg_over, "kafka": kafka},
        texts,
        topic,
        run=run,
        model_factory=DistinctRowsModel.from_config,
        produce=False,
    )
    log = await read_topic_log(bootstrap, f"{run}.out")
    row.update(
        codec=codec,
        output_records=log.records,
        output_bytes=log.size_bytes,
        bytes_per_record=log.bytes_per_record,
        output_batches=len(log.batches),
        batch_codecs=dict(log.codecs()),
    )
    return row
