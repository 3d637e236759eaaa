"""``requirements.lock``: exact versions of the runtime dependencies, for a reproducible image.

The Dockerfile installs the project with ``pip install -c requirements.lock``, so an image built
next month gets the versions this one was tested with, not whatever PyPI holds by then. The lock
is the dependency closure of ``pyproject.toml``'s dependencies and its runtime extras (``onnx``,
``openvino``, ``mlflow``, ``plots``: anything ``EXTRAS`` may name), with the versions installed
in a working environment (markers evaluated for this interpreter and platform: build the lock on
the image's Python, Linux). Constraints only pin; they install nothing that is not asked for,
so one lock serves every ``EXTRAS`` choice.

Regenerate after changing dependencies, from the project's venv::

    .venv/bin/python -m streamer.tools.lockfile > requirements.lock

``tests/deploy/test_lock.py`` fails when a dependency is missing from it.
"""

from __future__ import annotations

import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
RUNTIME_EXTRAS = ("onnx", "openvino", "mlflow", "plots")
# Pinned without the local label: the image installs torch from the CPU index (2.13.0+cpu) or
# PyPI (2.13.0, CUDA), and ==2.13.0 matches both.
LOCAL_LABEL_DROPPED = frozenset({"torch"})


def project_requirements(
    pyproject: Path = ROOT / "pyproject.toml", extras: tuple[str, ...] = RUNTIME_EXTRAS
) -> list[Requirement]:
    """The project's dependencies and those of ``extras``, as written in pyproject.toml."""
    project = tomllib.loads(pyproject.read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    optional = project.get("optional-dependencies", {})
    for extra in extras:
        if extra not in optional:
            raise SystemExit(f"pyproject.toml has no extra '{extra}' (has: {sorted(optional)})")
        reqs += [Requirement(r) for r in optional[extra]]
    return reqs


def _applies(req: Requirement, extras: set[str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({"extra": e}) for e in extras | {""})


def closure(roots: list[Requirement]) -> dict[str, str]:
    """canonical name → installed version, for ``roots`` and everything they require here.

    Raises SystemExit naming a requirement that is not installed (install it, then rerun)."""
    pinned: dict[str, str] = {}
    todo = [(r, set(r.extras)) for r in roots if _applies(r, set())]
    seen_extras: dict[str, set[str]] = {}
    while todo:
        req, extras = todo.pop()
        name = canonicalize_name(req.name)
        known = seen_extras.setdefault(name, set())
        if name in pinned and extras <= known:
            continue
        known |= extras
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise SystemExit(
                f"{req} is required but not installed in {sys.prefix}; install the project with "
                f"its extras ({', '.join(RUNTIME_EXTRAS)}), then rerun"
            ) from None
        pinned[name] = dist.version
        for text in dist.requires or []:
            sub = Requirement(text)
            if _applies(sub, extras):
                todo.append((sub, set(sub.extras)))
    return pinned


def render(pins: dict[str, str]) -> str:
    lines = [
        "# Exact versions of streamer's runtime dependencies (the closure of pyproject.toml's",
        f"# dependencies and the extras {', '.join(RUNTIME_EXTRAS)}), installed by the",
        "# Dockerfile with `pip install -c requirements.lock`. Generated, do not edit:",
        "#   .venv/bin/python -m streamer.tools.lockfile > requirements.lock",
    ]
    for name in sorted(pins):
        version = pins[name]
        if name in LOCAL_LABEL_DROPPED:
            version = version.split("+", 1)[0]
        lines.append(f"{name}=={version}")
    return "\n".join(lines) + "\n"


def main() -> int:
    sys.stdout.write(render(closure(project_requirements())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
