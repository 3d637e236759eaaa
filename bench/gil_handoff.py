"""What a GIL hand-off costs the thread that hands it off, in its own CPU time.

The event loop's CPU time per record (``streamer bench``, "loop µs/rec") grows with what the
stage threads do in Python. This measures why: calls that release the GIL (some numpy
functions, system calls) cost the releasing thread far more CPU time while another thread runs
Python bytecode than when it runs alone. Run: ``.venv/bin/python bench/gil_handoff.py``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import numpy as np

N = 2000


def per_call_us(fn: Callable[[], object]) -> float:
    start = time.thread_time_ns()
    for _ in range(N):
        fn()
    return (time.thread_time_ns() - start) / N / 1e3


def main() -> None:
    values = np.random.default_rng(0).random(256)
    lengths = np.random.default_rng(1).integers(1, 128, 256)
    r, w = os.pipe()

    def pipe_round_trip() -> None:
        os.write(w, b"x")
        os.read(r, 1)

    calls: dict[str, Callable[[], object]] = {
        "np.searchsorted (256)": lambda: np.searchsorted(values, values),
        "np.argsort (256)": lambda: np.argsort(lengths, kind="stable"),
        "np.maximum (256)": lambda: np.maximum(lengths, 1),
        "os.write + os.read (pipe)": pipe_round_trip,
        "pure Python (sum of 100)": lambda: sum(range(100)),
    }
    alone = {name: per_call_us(fn) for name, fn in calls.items()}
    stop = threading.Event()

    def spin() -> None:  # a thread running Python bytecode, as a stage thread does
        x = 0
        while not stop.is_set():
            x += 1

    busy_thread = threading.Thread(target=spin, daemon=True)
    busy_thread.start()
    try:
        busy = {name: per_call_us(fn) for name, fn in calls.items()}
    finally:
        stop.set()
        busy_thread.join()
    print(f"{'call':28s} {'alone µs':>9s} {'beside Python µs':>17s}  (this thread's CPU time)")
    for name in calls:
        print(f"{name:28s} {alone[name]:9.1f} {busy[name]:17.1f}")


if __name__ == "__main__":
    main()
