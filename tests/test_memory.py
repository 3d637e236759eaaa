"""Process memory settings: glibc malloc thresholds (applied in a fresh process, left alone when
the environment sets them, never changing what is computed) and the frozen GC generations."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from streamer.memory import freeze_gc, refreeze_gc, tune_malloc

PROBE = textwrap.dedent(
    """
    import sys
    from streamer.memory import freeze_gc, refreeze_gc, tune_malloc
    print(tune_malloc(sys.argv[1] == "on"))
    """
)


def _probe(arg: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, arg],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_applied_in_a_fresh_process() -> None:
    assert _probe("on") == "True"


def test_off_or_set_by_the_operator_is_left_alone() -> None:
    assert _probe("off") == "False"
    assert _probe("on", MALLOC_TRIM_THRESHOLD_="1000000") == "False"
    assert tune_malloc(False) is False


def test_encoding_a_produce_request_gives_the_same_bytes_after() -> None:
    """The thresholds change where memory comes from, never what is computed."""
    from aiokafka.protocol.produce import ProduceRequest

    data = [bytearray(os.urandom(200_000)) for _ in range(3)]
    req = ProduceRequest(
        transactional_id=None,
        required_acks=-1,
        timeout=30_000,
        topics=[("out", [(p, data[p]) for p in range(3)])],
    ).prepare({k: (0, 9) for k in range(100)})
    before = req.encode()
    tune_malloc(True)
    assert req.encode() == before


def test_frozen_objects_leave_the_collectors_generations_and_cycles_still_go() -> None:
    import gc

    class Node:
        def __init__(self) -> None:
            self.me = self  # a cycle: only the collector frees it

    keep = [Node() for _ in range(1000)]
    try:
        frozen = freeze_gc()
        assert frozen >= 1000 and gc.get_freeze_count() == frozen
        tracked = {id(o) for o in gc.get_objects()}
        assert not any(id(n) in tracked for n in keep)  # out of sight of every collection
        garbage = Node()
        ref = __import__("weakref").ref(garbage)
        del garbage
        gc.collect()
        assert ref() is None  # objects made after the freeze are collected as before
        keep.clear()  # a released model: its cycles were frozen with it
        assert refreeze_gc() < frozen  # unfrozen, collected, the rest frozen again
    finally:
        gc.unfreeze()
