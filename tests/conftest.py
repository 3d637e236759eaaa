"""Shared fixtures: one embedded broker per test session (real TCP), tiny models."""

from __future__ import annotations

import itertools
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from support import build_tiny_model

from streamer.kafka.broker import EmbeddedBroker

_topic_ids = itertools.count()


@pytest.fixture
def root_logging() -> Iterator[None]:
    """The command sets up logging for a terminal; give the test session its own back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def broker() -> Iterator[str]:
    """Bootstrap address of an embedded tansu broker on a free loopback port."""
    b = EmbeddedBroker()
    b.start()
    yield b.bootstrap
    b.stop()


@pytest.fixture
def topic(request: pytest.FixtureRequest) -> str:
    """A topic name unique to this test (the broker is shared by the session)."""
    return f"t{next(_topic_ids)}-{request.node.name[:40].replace('[', '-').replace(']', '')}"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(
        tmp_path_factory.mktemp("tinycls") / "model", task="text-classification", seed=1
    )
