"""Shape-stable batches: a bounded ladder of padded shapes, and a runner that replays graphs.

On a GPU an encoder as small as MiniLM is bound by kernel launches, and every new
``(rows, width)`` input shape costs tens of milliseconds the first time it runs (kernel
selection, allocator growth; float16 most). Token-budgeted, length-grouped batches produce a new
shape almost every batch. So batches are padded up to a few shapes (:class:`ShapeLadder`), every
shape is warmed before the consumer joins, and on CUDA each one is replayed as a CUDA graph
(:class:`GraphRunner`), which removes the launch overhead too.

Nothing here imports torch: the shape arithmetic and the replay-or-fallback choice are tested on
any machine; :mod:`streamer.models.hf` supplies the torch parts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

Shape = tuple[int, int]
"""``(rows, width)`` of a padded batch."""

CUDA_WIDTH_MULTIPLE = 32


def default_row_buckets(max_batch_size: int) -> tuple[int, ...]:
    """Powers of two below ``max_batch_size``, and ``max_batch_size`` itself (CUDA's default).

    At most half the rows of a batch are dummies, and full batches (the common case under
    load) are never padded.
    """
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
    buckets = []
    b = 1
    while b < max_batch_size:
        buckets.append(b)
        b *= 2
    buckets.append(max_batch_size)
    return tuple(buckets)


@dataclass(frozen=True)
class ShapeLadder:
    """Where a batch of ``rows`` x ``width`` tokens is padded to.

    ``width_multiple`` 1 and no ``row_buckets`` means exact shapes (the CPU default, where a
    new shape costs nothing and padding costs compute).
    """

    max_length: int
    width_multiple: int = 1
    row_buckets: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_length < 1 or self.width_multiple < 1:
            raise ValueError("max_length and width_multiple must be at least 1")
        if any(b < 1 for b in self.row_buckets) or list(self.row_buckets) != sorted(
            set(self.row_buckets)
        ):
            raise ValueError(f"row_buckets must be positive, sorted, unique: {self.row_buckets}")

    @property
    def exact(self) -> bool:
        return self.width_multiple == 1 and not self.row_buckets

    def padded_rows(self, rows: int) -> int:
        for b in self.row_buckets:
            if b >= rows:
                return b
        return rows  # beyond the largest bucket: no row padding

    def padded_width(self, width: int) -> int:
        width = max(width, 1)
        m = self.width_multiple
        rounded = min(-(-width // m) * m, self.max_length)
        return max(rounded, width)  # never narrower than the longest row

    def padded_shape(self, rows: int, width: int) -> Shape:
        """The ``(R, W)`` ≥ ``(rows, width)`` a batch is padded to."""
        return self.padded_rows(rows), self.padded_width(width)

    def ladder_shapes(self, max_batch_size: int, max_batch_tokens: int) -> list[Shape]:
        """Every shape a batch the batcher can form pads to, smallest first.

        A batch has at most ``max_batch_size`` rows and ``rows x longest`` at most
        ``max_batch_tokens``. A padded shape ``(R, W)`` is included when its smallest
        preimage fits that budget (so ``R * W`` itself may exceed it, by less than one row
        bucket and one width step): e.g. 58 rows of 140 tokens fit 8192 and pad to 64 x 160.
        The smallest shape is always included.
        """
        rows = sorted({self.padded_rows(r) for r in range(1, max(1, max_batch_size) + 1)})
        widths = self._widths()
        shapes = []
        for i, big_r in enumerate(rows):
            min_r = rows[i - 1] + 1 if i else 1
            for j, big_w in enumerate(widths):
                min_w = widths[j - 1] + 1 if j else 1
                if min_r * min_w <= max_batch_tokens or (i == 0 and j == 0):
                    shapes.append((big_r, big_w))
        return shapes

    def _widths(self) -> list[int]:
        m = self.width_multiple
        return sorted({*range(m, self.max_length, m), self.max_length})


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """The worst row's cosine similarity between two outputs (NaN if any row is NaN)."""
    a64, b64 = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a64.shape != b64.shape:
        raise ValueError(f"shapes differ: {a64.shape} vs {b64.shape}")
    if a64.size == 0:
        return 1.0
    dot = (a64 * b64).sum(axis=1)
    norms = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    return float(np.min(dot / np.maximum(norms, 1e-30)))


@dataclass
class GraphRunner:
    """Replays one captured graph per warmed shape; every other shape runs eagerly.

    ``capture(shape)`` returns a callable ``(ids, mask, n) -> n rows of output`` or raises;
    ``eager(ids, mask, n)`` is the plain forward. A shape whose capture failed is recorded in
    ``failed`` and never tried again (one warning for the first): the service runs it eagerly
    rather than crash. ``replays`` and ``fallbacks`` count served batches for logs and metrics.
    """

    capture: Callable[[Shape], Callable[[Any, Any, int], np.ndarray]]
    eager: Callable[[Any, Any, int], np.ndarray]
    name: str = "model"
    graphs: dict[Shape, Callable[[Any, Any, int], np.ndarray]] = field(default_factory=dict)
    failed: dict[Shape, str] = field(default_factory=dict)
    replays: int = 0
    fallbacks: int = 0

    def prepare(self, shape: Shape) -> bool:
        """Capture ``shape``'s graph once; False (and eager from now on) when that fails."""
        if shape in self.graphs:
            return True
        if shape in self.failed:
            return False
        try:
            self.graphs[shape] = self.capture(shape)
        except Exception as exc:
            self._fail(shape, exc, "capture")
            return False
        return True

    def prepare_all(self, shapes: Sequence[Shape]) -> int:
        """Capture each shape; the number captured."""
        return sum(self.prepare(s) for s in shapes)

    def run(self, ids: Any, mask: Any, n: int) -> np.ndarray:
        shape: Shape = (int(ids.shape[0]), int(ids.shape[1]))
        graph = self.graphs.get(shape)
        if graph is not None:
            try:
                out = graph(ids, mask, n)
            except Exception as exc:  # e.g. a driver error: this shape runs eagerly from now on
                del self.graphs[shape]
                self._fail(shape, exc, "replay")
            else:
                self.replays += 1
                return out
        self.fallbacks += 1
        return self.eager(ids, mask, n)

    def _fail(self, shape: Shape, exc: BaseException, what: str) -> None:
        first = not self.failed  # one warning; the warm-up summary counts the rest
        self.failed[shape] = f"{what}: {type(exc).__name__}: {exc}"
        log.log(
            logging.WARNING if first else logging.DEBUG,
            "model %s: CUDA graph %s failed for shape %dx%d; that shape runs eagerly: %s",
            self.name,
            what,
            *shape,
            self.failed[shape],
        )


def length_groups(lengths: np.ndarray, overhead_tokens: int) -> list[np.ndarray] | None:
    """Rows regrouped by length for separate forwards, or None when one forward is cheapest.

    On a CPU a forward costs about its padded tokens (rows × longest row) plus a fixed
    ``overhead_tokens``; a batch formed in arrival order (``batching.order: partition``) mixes
    short and long rows and pads a lot. Over the rows sorted by length this picks the
    contiguous runs that minimise Σ(rows × longest) + overhead × runs (a small dynamic
    programme, O(n²) in numpy for n rows). The results go back to their rows, so the batch's
    order is unchanged.
    """
    n = len(lengths)
    if n < 2:
        return None
    order = np.argsort(lengths, kind="stable")
    sorted_lengths = lengths[order].astype(np.float64)
    if sorted_lengths.sum() >= 0.85 * n * sorted_lengths[-1]:  # little padding to win back
        return None
    best = np.zeros(n + 1)
    cut = np.zeros(n + 1, dtype=np.int64)
    for j in range(1, n + 1):  # the last run is sorted rows i..j-1, padded to the j-1th
        costs = best[:j] + (j - np.arange(j)) * sorted_lengths[j - 1] + overhead_tokens
        i = int(np.argmin(costs))
        best[j], cut[j] = costs[i], i
    groups = []
    j = n
    while j > 0:
        groups.append(order[cut[j] : j])
        j = int(cut[j])
    return groups[::-1] if len(groups) > 1 else None
