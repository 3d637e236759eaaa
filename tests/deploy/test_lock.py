"""The reproducible image: the Dockerfile installs the project under ``requirements.lock`` and
labels the image the OCI way; the lock pins every runtime dependency exactly, consistently, and
within what pyproject.toml allows. (hadolint runs in test_docker.py.)"""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from streamer.tools.lockfile import RUNTIME_EXTRAS, closure, project_requirements, render

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements.lock"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
REGENERATE = "regenerate it: .venv/bin/python -m streamer.tools.lockfile > requirements.lock"


def instructions() -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per Dockerfile instruction, continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text = (pending + line).strip()
        pending = ""
        keyword, _, args = text.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for ins in instructions():
        if ins[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def pins() -> dict[str, str]:
    out: dict[str, str] = {}
    for line in LOCK.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)", line.strip())
        assert m, f"requirements.lock: '{line}' is not an exact name==version pin"
        name = canonicalize_name(m.group(1))
        assert name not in out, f"requirements.lock pins {name} twice"
        out[name] = m.group(2)
    return out


def test_the_project_is_installed_under_the_lock() -> None:
    build = stages()[0]
    copies = [args.split() for kw, args in build if kw == "COPY" and "--from" not in args]
    lock_copy = [c for c in copies if "requirements.lock" in c[:-1]]
    assert lock_copy, "no COPY brings requirements.lock into the build stage"
    runs = [args for kw, args in build if kw == "RUN" and "pip install" in args]
    (project,) = [r for r in runs if '".${EXTRAS' in r]
    assert re.search(r"(?:-c|--constraint)[ =]requirements\.lock\b", project), project
    # the lock is there when that step runs: copied before it, into its working directory
    order = [(kw, args) for kw, args in build]
    copy_at = next(
        i for i, (kw, a) in enumerate(order) if kw == "COPY" and "requirements.lock" in a
    )
    run_at = next(i for i, (kw, a) in enumerate(order) if kw == "RUN" and a == project)
    assert copy_at < run_at
    assert lock_copy[0][-1] in ("./", ".", "/src/", "/src")
    workdirs = [a for kw, a in order[:run_at] if kw == "WORKDIR"]
    assert workdirs and workdirs[-1] == "/src"


def test_oci_labels_come_from_build_args() -> None:
    runtime = stages()[-1]
    labels = " ".join(args for kw, args in runtime if kw == "LABEL")
    found = dict(re.findall(r'(org\.opencontainers\.image\.[a-z]+)="([^"]*)"', labels))
    args = {}
    for kw, a in runtime:
        if kw == "ARG":
            name, _, default = a.partition("=")
            args[name] = default
    assert found["org.opencontainers.image.title"] == "streamer"
    assert found["org.opencontainers.image.licenses"] == PYPROJECT["project"]["license"]
    for label, arg in (("version", "VERSION"), ("revision", "REVISION"), ("source", "SOURCE_URL")):
        value = found.get(f"org.opencontainers.image.{label}")
        assert value == f"${{{arg}}}", f"org.opencontainers.image.{label} should be ${{{arg}}}"
        assert arg in args, f"ARG {arg} is not declared in the runtime stage (out of scope)"
    assert args["VERSION"] == PYPROJECT["project"]["version"], "VERSION default ≠ pyproject"


def test_lock_pins_every_runtime_dependency_within_pyproject() -> None:
    locked = pins()
    for req in project_requirements():
        name = canonicalize_name(req.name)
        assert name in locked, (
            f"{req.name} (pyproject.toml) is not in requirements.lock; {REGENERATE}"
        )
        assert req.specifier.contains(Version(locked[name]), prereleases=True), (
            f"requirements.lock pins {name}=={locked[name]}, outside pyproject.toml's {req}; "
            + REGENERATE
        )
    dev_only = set(PYPROJECT["project"]["optional-dependencies"]) - set(RUNTIME_EXTRAS)
    assert dev_only == {"dev", "embedded"}, (
        f"new extras {dev_only - {'dev', 'embedded'}}: add runtime ones to RUNTIME_EXTRAS"
    )


def test_lock_covers_the_dependency_closure() -> None:
    """Transitive dependencies too (names; the versions are the ones tested when generated)."""
    try:
        needed = closure(project_requirements())
    except SystemExit as exc:  # a dependency not installed here
        pytest.fail(f"cannot compute the closure in this environment: {exc}")
    missing = sorted(set(needed) - set(pins()))
    assert not missing, f"requirements.lock lacks {missing}; {REGENERATE}"


def test_locked_versions_satisfy_each_other() -> None:
    """Every locked package's requirements (as installed here) hold for the locked versions."""
    locked = pins()
    problems = []
    for name, version in locked.items():
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        if Version(dist.version.split("+")[0]) != Version(version):
            continue  # a different version installed here: its metadata says nothing
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            dep = canonicalize_name(req.name)
            if dep in locked and not req.specifier.contains(Version(locked[dep]), True):
                problems.append(f"{name}=={version} needs {req}, lock has {locked[dep]}")
    assert not problems, "; ".join(problems)


def test_render_drops_the_torch_local_label() -> None:
    """torch==2.13.0 matches both the CPU wheel (2.13.0+cpu) and the PyPI one (CUDA)."""
    text = render({"torch": "2.13.0+cpu", "numpy": "2.1.0"})
    assert "torch==2.13.0\n" in text and "numpy==2.1.0\n" in text
    assert "+" not in pins()["torch"]
