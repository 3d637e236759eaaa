"""The breaker: a systemic failure is not a stream of bad records.

A broken tokenizer or a sticky device error makes *every* record fail. Record by record, each
failure looks like bad input, goes to the DLQ and is committed: the topic empties into the DLQ
while ``/healthz`` stays green. The breaker watches outputs as they are acknowledged (results
and dead letters) over a sliding window of ``breaker.window_records`` records; when at least
``breaker.failure_ratio`` of them failed for the *same* non-input reason (errors marked
``systemic``: tokenizer, model, result encoding — not decode errors or over-long text), it trips:
the pipeline fails, fetching stops, nothing more is committed past what was acknowledged, health
fails and the process exits non-zero, so the fault is seen (and a restart may clear it) instead
of draining the topic. At most one window's worth of records reaches the DLQ first.

Poison records (a few inputs the model cannot take) stay below the ratio and keep going to the
DLQ one by one.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable

from streamer.stream.records import RecordError

_REASON_CHARS = 160  # messages that differ only past this are the same reason


class Breaker:
    """Counts (records, systemic failures by reason) over the last ``window_records``."""

    def __init__(self, window_records: int, failure_ratio: float, enabled: bool = True) -> None:
        self.window_records = window_records
        self.failure_ratio = failure_ratio
        self.enabled = enabled
        self._window: deque[tuple[int, tuple[str, str] | None]] = deque()
        self._records = 0
        self._failures: Counter[tuple[str, str]] = Counter()
        self.tripped: str | None = None

    def ok(self, n: int) -> None:
        """``n`` records were published as results."""
        if n > 0:
            self._push(n, None)

    def failed(self, errors: Iterable[RecordError]) -> None:
        """Records went to the DLQ, one error each."""
        for err in errors:
            reason = (err.error_class, err.message[:_REASON_CHARS]) if err.systemic else None
            self._push(1, reason)

    def _push(self, n: int, reason: tuple[str, str] | None) -> None:
        if not self.enabled or self.tripped is not None:
            return
        window = self._window
        if reason is None and window and window[-1][1] is None:
            window[-1] = (window[-1][0] + n, None)  # runs of results are one entry
        else:
            window.append((n, reason))
        self._records += n
        if reason is not None:
            self._failures[reason] += n
        while len(window) > 1 and self._records - window[0][0] >= self.window_records:
            old, old_reason = window.popleft()
            self._records -= old
            if old_reason is not None:
                self._failures[old_reason] -= old
                if not self._failures[old_reason]:
                    del self._failures[old_reason]
        if reason is not None and self._records >= self.window_records:
            count = self._failures[reason]
            if count >= self.failure_ratio * self._records:
                error_class, message = reason
                self.tripped = (
                    f"breaker tripped: {count} of the last {self._records} records failed with "
                    f"{error_class}: {message} — a fault of this service, not of the input "
                    f"(breaker.failure_ratio={self.failure_ratio}, breaker.window_records="
                    f"{self.window_records}); stopping rather than dead-lettering the topic"
                )
