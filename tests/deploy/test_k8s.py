"""The Kubernetes manifests: rendered by ``kubectl kustomize``, validated, held against the app.

Each of the base and the ``cpu`` / ``gpu`` overlays is rendered; every built-in resource validates
against the Kubernetes schemas of a pinned version (``kubernetes-validate``, strict: unknown fields
fail), the KEDA resources against KEDA's own CRD schemas (vendored in ``tests/deploy/keda``), the
ServiceMonitor and PrometheusRule against the Prometheus Operator's (``tests/deploy/prometheus-
operator``). Then the rendered objects are held against the service: the config a pod would see
(the ConfigMap plus the container's environment) loads with the project's loader, the ScaledObject
scales the group and topic that config consumes, the probes, Service, ServiceMonitor and
NetworkPolicy use the port and paths the service serves and the brokers it talks to. Labels follow
Kubernetes' recommended ones, and two installs in one namespace select only their own pods.
"""

from __future__ import annotations

import copy
import math
import os
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError

from streamer.cli import _parser
from streamer.config import StreamerConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
KEDA_CRDS = Path(__file__).resolve().parent / "keda"  # vendored: see its README.md
KEDA_README = KEDA_CRDS / "README.md"
PROMETHEUS_CRDS = Path(__file__).resolve().parent / "prometheus-operator"  # vendored, README.md

KUBERNETES_VERSION = "1.31"
TARGETS = ["base", "overlays/cpu", "overlays/gpu"]
OVERLAYS = ["overlays/cpu", "overlays/gpu"]
CRD_KINDS = {
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("keda.sh/v1alpha1", "TriggerAuthentication"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}
BASE_KINDS = {
    "Deployment",
    "ConfigMap",
    "Service",
    "ServiceAccount",
    "PodDisruptionBudget",
    "NetworkPolicy",
    "ScaledObject",
    "TriggerAuthentication",
}
# The overlays add k8s/components/monitoring (Prometheus Operator).
MONITORING_KINDS = {"ServiceMonitor", "PrometheusRule"}
EXPECTED_KINDS = {
    "base": BASE_KINDS,
    "overlays/cpu": BASE_KINDS | MONITORING_KINDS,
    "overlays/gpu": BASE_KINDS | MONITORING_KINDS,
}
# The contract of the service's HTTP server (http.port).
READY_PATH, LIVE_PATH, METRICS_PATH = "/readyz", "/healthz", "/metrics"
# Credentials belong in a TriggerAuthentication, never in trigger metadata.
KEDA_AUTH_PARAMS = {"username", "password", "ca", "cert", "key", "keyPassword", "sasl", "tls"}
CREDENTIAL_KEYS = {"username", "password", "ca", "cert", "key", "keyPassword"}
SASL_OF_MECHANISM = {"PLAIN": "plaintext", "SCRAM-SHA-256": "scram_sha256"}
SASL_OF_MECHANISM["SCRAM-SHA-512"] = "scram_sha512"


# --- rendering --------------------------------------------------------------------------------


def _kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        pytest.fail(
            "kubectl is not installed (it renders k8s/ with its built-in kustomize): install "
            "kubectl >= 1.27 on the PATH; these tests cannot check the manifests without it"
        )
    return found


def kustomize(directory: Path) -> list[dict[str, Any]]:
    result = subprocess.run(
        [_kubectl(), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"kubectl kustomize {directory}:\n{result.stderr}"
    return [d for d in yaml.safe_load_all(result.stdout) if d]


@cache
def _rendered(target: str) -> tuple[dict[str, Any], ...]:
    return tuple(kustomize(K8S / target))


def rendered(target: str) -> list[dict[str, Any]]:
    return copy.deepcopy(list(_rendered(target)))


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (c,) = [
        c
        for c in one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
        if c["name"] == "streamer"
    ]
    return c


def pod_spec(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "Deployment")["spec"]["template"]["spec"]


def pod_labels(docs: list[dict[str, Any]]) -> dict[str, str]:
    return one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# --- the config a pod sees ----------------------------------------------------------------------


def cpu_quantity(value: str | int) -> float:
    text = str(value)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def container_env(docs: list[dict[str, Any]]) -> dict[str, str]:
    """The container's environment as the kubelet would build it (Secrets as placeholders)."""
    c = container(docs)
    env: dict[str, str] = {}
    for item in c.get("env", []):
        name = item["name"]
        if "value" in item:
            env[name] = re.sub(
                r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), item["value"]
            )
            continue
        source = item["valueFrom"]
        if "secretKeyRef" in source:
            env[name] = f"secret-{source['secretKeyRef']['key']}"
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            (cm,) = [
                d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == ref["name"]
            ]
            env[name] = cm["data"][ref["key"]]
        elif "resourceFieldRef" in source:
            ref = source["resourceFieldRef"]
            section, _, resource = ref["resource"].partition(".")
            quantity = cpu_quantity(c["resources"][section][resource])
            env[name] = str(math.ceil(quantity / cpu_quantity(ref.get("divisor", "1"))))
        elif "fieldRef" in source:
            env[name] = f"field-{source['fieldRef']['fieldPath']}"
        else:
            raise AssertionError(f"env {name}: unsupported source {source}")
    return env


def config_file(docs: list[dict[str, Any]]) -> tuple[str, str]:
    """(mount path of the --config file, its content from the mounted ConfigMap)."""
    c = container(docs)
    args = _parser().parse_args(["run", *c.get("args", [])])
    assert args.command == "run" and args.config is not None, c.get("args")
    path = str(args.config)
    volumes = {v["name"]: v for v in pod_spec(docs)["volumes"]}
    for mount in c["volumeMounts"]:
        prefix = mount["mountPath"].rstrip("/") + "/"
        if path.startswith(prefix) and "configMap" in volumes[mount["name"]]:
            key = path[len(prefix) :]
            name = volumes[mount["name"]]["configMap"]["name"]
            (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == name]
            assert key in cm["data"], f"ConfigMap {name} has no key {key}"
            return path, cm["data"][key]
    raise AssertionError(f"--config {path} is not in a mounted ConfigMap")


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    return d


def effective_config(
    docs: list[dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model: Path
) -> StreamerConfig:
    """Load the ConfigMap's file with the container's environment, as the pod would.

    model.path (a directory inside the image) is pointed at a local stand-in after checking it
    names the model the image bakes in.
    """
    _, text = config_file(docs)
    assert yaml.safe_load(text)["model"]["path"] == "/models/minilm"
    path = tmp_path / "streamer.yaml"
    path.write_text(text)
    for key in list(os.environ):
        if key.upper().startswith("STREAMER_"):
            monkeypatch.delenv(key)
    env = container_env(docs)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert "STREAMER_MODEL__PATH" not in env
    return load_config(path, model={"path": str(model)})


# --- rendering and schemas -----------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_renders_with_every_resource(target: str) -> None:
    docs = rendered(target)
    assert {d["kind"] for d in docs} == EXPECTED_KINDS[target]
    names = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(names) == len(set(names)), names


@pytest.mark.parametrize("target", TARGETS)
def test_builtin_resources_validate_against_kubernetes_schemas(target: str) -> None:
    for doc in rendered(target):
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            continue
        where = f"{target}: {doc['kind']}/{doc['metadata']['name']}"
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{where} at {'.'.join(map(str, exc.path))}: {exc.message}")
        except SchemaNotFoundError as exc:
            pytest.fail(f"{where}: {exc.message}")


def _strict(schema: Any) -> Any:
    """The CRD schema, with unknown fields an error (the API server would silently prune them)."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@cache
def crd_schema(directory: Path, api_version: str, kind: str) -> dict[str, Any]:
    if not directory.is_dir():
        pytest.fail(f"the CRDs are expected in {directory} (vendored with the tests)")
    group, _, version = api_version.partition("/")
    for path in sorted(directory.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        if crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == kind:
            for v in crd["spec"]["versions"]:
                if v["name"] == version and v.get("served", True):
                    return _strict(v["schema"]["openAPIV3Schema"])
    raise AssertionError(f"no CRD in {directory} serves {kind} {api_version}")


def keda_schema(api_version: str, kind: str) -> dict[str, Any]:
    return crd_schema(KEDA_CRDS, api_version, kind)


def _crd_errors(doc: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    return [
        f"{doc['kind']} {'.'.join(map(str, e.path))}: {e.message}"
        for e in jsonschema.Draft7Validator(schema).iter_errors(doc)
    ]


@pytest.mark.parametrize("target", OVERLAYS)
def test_monitoring_resources_validate_against_the_prometheus_operator_crds(target: str) -> None:
    docs = [d for d in rendered(target) if d["apiVersion"].startswith("monitoring.coreos.com/")]
    assert {d["kind"] for d in docs} == MONITORING_KINDS
    for doc in docs:
        schema = crd_schema(PROMETHEUS_CRDS, doc["apiVersion"], doc["kind"])
        errors = _crd_errors(doc, schema)
        assert not errors, "\n".join(errors)
    # the check is not vacuous: a misspelt field fails it
    monitor = copy.deepcopy(one(docs, "ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["intervall"] = "30s"
    schema = crd_schema(PROMETHEUS_CRDS, monitor["apiVersion"], "ServiceMonitor")
    assert _crd_errors(monitor, schema)


@pytest.mark.parametrize("target", TARGETS)
def test_keda_resources_validate_against_the_keda_crds(target: str) -> None:
    docs = [d for d in rendered(target) if d["apiVersion"].startswith("keda.sh/")]
    assert {d["kind"] for d in docs} == {"ScaledObject", "TriggerAuthentication"}
    for doc in docs:
        schema = keda_schema(doc["apiVersion"], doc["kind"])
        errors = list(jsonschema.Draft7Validator(schema).iter_errors(doc))
        assert not errors, "\n".join(
            f"{doc['kind']} {'.'.join(map(str, e.path))}: {e.message}" for e in errors
        )
    spec = one(docs, "ScaledObject")["spec"]
    # The CRD's x-kubernetes-validations rule (CEL), which jsonschema cannot run.
    assert spec.get("minReplicaCount", 0) <= spec.get("maxReplicaCount", 100)


def test_crd_validation_catches_mistakes() -> None:
    """The strict CRD check is not vacuous: a typo, a number and a missing key all fail."""
    scaled = one(rendered("overlays/cpu"), "ScaledObject")
    schema = keda_schema(scaled["apiVersion"], "ScaledObject")
    validator = jsonschema.Draft7Validator(schema)
    assert validator.is_valid(scaled)
    typo = copy.deepcopy(scaled)
    typo["spec"]["maxReplicas"] = typo["spec"].pop("maxReplicaCount")
    number = copy.deepcopy(scaled)
    number["spec"]["triggers"][0]["metadata"]["lagThreshold"] = 1000
    missing = copy.deepcopy(scaled)
    del missing["spec"]["scaleTargetRef"]
    for bad in (typo, number, missing):
        assert not validator.is_valid(bad)


def keda_metadata_keys() -> set[str]:
    """The keys KEDA's Kafka scaler reads, from the table in tests/deploy/keda/README.md."""
    if not KEDA_README.is_file():
        pytest.fail(f"{KEDA_README} is missing (vendored with the tests)")
    text = KEDA_README.read_text()
    section = text.split("## KEDA `kafka` trigger metadata", 1)[1].split("\n## ", 1)[0]
    keys: set[str] = set()
    for line in section.splitlines():
        if not line.startswith("|") or set(line) <= {"|", "-", " "}:
            continue
        cell = line.split("|")[1].strip()
        if cell == "key":
            continue
        keys |= {k.strip().strip("`") for k in cell.split("/")}
    assert {"bootstrapServers", "consumerGroup", "lagThreshold"} <= keys, keys
    return keys


@pytest.mark.parametrize("target", TARGETS)
def test_kafka_trigger_uses_keys_keda_reads(target: str) -> None:
    docs = rendered(target)
    known = keda_metadata_keys()
    assert known >= KEDA_AUTH_PARAMS
    (trigger,) = one(docs, "ScaledObject")["spec"]["triggers"]
    assert trigger["type"] == "kafka"
    metadata = trigger["metadata"]
    unknown = set(metadata) - known
    assert not unknown, f"KEDA's Kafka scaler does not read {sorted(unknown)}"
    assert not set(metadata) & CREDENTIAL_KEYS, "credentials go in the TriggerAuthentication"
    required = {
        "bootstrapServers",
        "consumerGroup",
        "topic",
        "lagThreshold",
        "activationLagThreshold",
        "offsetResetPolicy",
    }
    assert required <= set(metadata), sorted(required - set(metadata))
    assert int(metadata["lagThreshold"]) > 0
    assert int(metadata["activationLagThreshold"]) >= 0
    assert metadata["offsetResetPolicy"] in {"earliest", "latest"}
    assert metadata.get("allowIdleConsumers", "false") == "false"
    auth = one(docs, "TriggerAuthentication")["spec"]["secretTargetRef"]
    params = {ref["parameter"] for ref in auth}
    assert params <= KEDA_AUTH_PARAMS, params
    assert {"username", "password"} <= params


# --- the manifests against the service -----------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_configmap_config_loads_with_the_pod_environment(
    target: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model_dir: Path
) -> None:
    docs = rendered(target)
    cfg = effective_config(docs, tmp_path, monkeypatch, model_dir)
    limits = container(docs)["resources"]["limits"]
    assert cfg.runtime.torch_threads == math.ceil(cpu_quantity(limits["cpu"]))
    if cfg.kafka.security.protocol.startswith("SASL"):
        # from the Secret, never from the ConfigMap
        assert cfg.kafka.security.sasl_username == "secret-username"
        assert cfg.kafka.security.password() == "secret-password"
    assert cfg.log.json_format
    if target.endswith("gpu"):
        assert cfg.model.device == "cuda"
        assert cfg.batching.max_batch_size > 64
    else:
        assert cfg.model.device in {"auto", "cpu"}


@pytest.mark.parametrize("target", TARGETS)
def test_env_overrides_name_real_config_keys(target: str) -> None:
    """A misspelt STREAMER_ variable would be ignored or rejected; each must name a key."""
    for name in container_env(rendered(target)):
        if not name.startswith("STREAMER_"):
            continue
        model: Any = StreamerConfig
        for part in name.removeprefix("STREAMER_").lower().split("__"):
            fields = model.model_fields
            assert part in fields, f"{name}: '{part}' is not a config key"
            model = fields[part].annotation
        assert not hasattr(model, "model_fields"), f"{name} names a section, not a key"


@pytest.mark.parametrize("target", TARGETS)
def test_scaledobject_scales_what_the_service_consumes(
    target: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model_dir: Path
) -> None:
    docs = rendered(target)
    cfg = effective_config(docs, tmp_path, monkeypatch, model_dir)
    scaled = one(docs, "ScaledObject")
    spec = scaled["spec"]
    (trigger,) = spec["triggers"]
    metadata = trigger["metadata"]
    assert metadata["consumerGroup"] == cfg.kafka.group_id
    assert cfg.kafka.input_topics == [metadata["topic"]]
    assert metadata["bootstrapServers"] == cfg.kafka.bootstrap_servers
    assert metadata["offsetResetPolicy"] == cfg.kafka.auto_offset_reset

    security = cfg.kafka.security
    expect_tls = "enable" if security.protocol in {"SSL", "SASL_SSL"} else "disable"
    assert metadata.get("tls", "disable") == expect_tls
    if security.protocol.startswith("SASL"):
        assert metadata.get("sasl") == SASL_OF_MECHANISM[security.sasl_mechanism]
    else:
        assert metadata.get("sasl", "none") == "none"

    # What a replica holds uncommitted while it keeps up (a batch filling, one in the model)
    # must not look like a backlog, or the lag alone would scale a healthy group up.
    assert int(metadata["lagThreshold"]) >= 2 * cfg.batching.max_batch_size

    deployment = one(docs, "Deployment")
    ref = spec["scaleTargetRef"]
    assert ref.get("kind", "Deployment") == "Deployment"
    assert ref["name"] == deployment["metadata"]["name"]
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"

    auth = one(docs, "TriggerAuthentication")
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    secrets_used = {
        e["valueFrom"]["secretKeyRef"]["name"]
        for e in container(docs).get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    for secret_ref in auth["spec"]["secretTargetRef"]:
        assert secret_ref["name"] in secrets_used, "KEDA and the pods read the same Secret"


@pytest.mark.parametrize("target", TARGETS)
def test_replicas_are_bounded_by_partitions_and_do_not_flap(target: str) -> None:
    scaled = one(rendered(target), "ScaledObject")
    spec = scaled["spec"]
    partitions = int(scaled["metadata"]["annotations"]["streamer/input-partitions"])
    assert 1 <= spec["maxReplicaCount"] <= partitions
    assert 0 <= spec.get("minReplicaCount", 0) <= spec["maxReplicaCount"]
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    up = behavior["scaleUp"]["stabilizationWindowSeconds"]
    down = behavior["scaleDown"]["stabilizationWindowSeconds"]
    assert up >= 30, "a rebalance's lag spike must not trigger more scale-up by itself"
    assert down >= max(up, 120)
    for direction in ("scaleUp", "scaleDown"):
        assert behavior[direction]["policies"], f"{direction} has no rate limit"


@pytest.mark.parametrize("target", TARGETS)
def test_probes_use_the_service_port_and_paths(
    target: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model_dir: Path
) -> None:
    docs = rendered(target)
    cfg = effective_config(docs, tmp_path, monkeypatch, model_dir)
    assert cfg.http.port != 0, "http.port 0 turns the health server off"
    c = container(docs)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}

    def port_of(probe: dict[str, Any]) -> int:
        port = probe["httpGet"]["port"]
        return ports[port] if isinstance(port, str) else port

    for probe_name, path in (
        ("startupProbe", READY_PATH),
        ("readinessProbe", READY_PATH),
        ("livenessProbe", LIVE_PATH),
    ):
        probe = c[probe_name]
        assert probe["httpGet"]["path"] == path, probe_name
        assert port_of(probe) == cfg.http.port, probe_name

    # The start-up budget covers torch import, weights, warm-up and the first rebalance.
    startup = c["startupProbe"]
    budget = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
    assert budget >= 180, f"startupProbe allows only {budget}s for model load and warm-up"
    # A batch may run up to http.stuck_after_s before /healthz fails on its own; liveness must
    # not kill a pod for one slow request.
    live = c["livenessProbe"]
    assert live.get("timeoutSeconds", 1) >= 2

    # SIGTERM drains within runtime.shutdown_grace_s; Kubernetes must wait longer than that.
    grace = pod_spec(docs)["terminationGracePeriodSeconds"]
    assert grace >= cfg.runtime.shutdown_grace_s + 10, (grace, cfg.runtime.shutdown_grace_s)

    service = one(docs, "Service")
    assert selects(service["spec"]["selector"], pod_labels(docs))
    (svc_port,) = service["spec"]["ports"]
    target_port = svc_port["targetPort"]
    assert (ports[target_port] if isinstance(target_port, str) else target_port) == cfg.http.port

    if target in OVERLAYS:
        monitor = one(docs, "ServiceMonitor")
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint["port"] == svc_port["name"]
        assert endpoint.get("path", "/metrics") == METRICS_PATH


def test_the_service_still_serves_the_probed_paths() -> None:
    source = "\n".join(p.read_text() for p in (ROOT / "streamer").rglob("*.py"))
    for path in (READY_PATH, LIVE_PATH, METRICS_PATH):
        assert path in source, f"nothing in streamer/ mentions {path} any more"


@pytest.mark.parametrize("target", TARGETS)
def test_pods_are_locked_down(target: str) -> None:
    docs = rendered(target)
    spec = pod_spec(docs)
    pod_sc = spec["securityContext"]
    assert pod_sc["runAsNonRoot"] is True
    assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault"
    dockerfile = (ROOT / "Dockerfile").read_text()
    (user,) = re.findall(r"^USER (\S+)", dockerfile, re.MULTILINE)
    uid, _, gid = user.partition(":")
    assert str(pod_sc["runAsUser"]) == uid and str(pod_sc["runAsGroup"]) == gid
    assert spec["automountServiceAccountToken"] is False
    assert spec["enableServiceLinks"] is False, "service links inject STREAMER_* variables"

    c = container(docs)
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc.get("privileged", False) is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert not sc["capabilities"].get("add")

    # Every path the image declares writable is a writable volume here.
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert not any("hostPath" in v for v in volumes.values())
    declared = [
        p for m in re.findall(r"^VOLUME (.+)$", dockerfile, re.MULTILINE) for p in yaml.safe_load(m)
    ]
    assert declared
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    for path in declared:
        assert path in mounts, f"{path} is written to but not mounted: the root is read-only"
        assert not mounts[path].get("readOnly")
        assert "emptyDir" in volumes[mounts[path]["name"]]


@pytest.mark.parametrize("target", TARGETS)
def test_resources_and_scheduling(target: str) -> None:
    docs = rendered(target)
    spec = pod_spec(docs)
    resources = container(docs)["resources"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources[kind]), kind
    gpu = resources["limits"].get("nvidia.com/gpu")
    image = container(docs)["image"]
    if target.endswith("gpu"):
        assert str(gpu) == "1"
        assert spec["nodeSelector"]
        assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
        assert image.endswith("-cuda")
    else:
        assert gpu is None
        assert "nodeSelector" not in spec
    if target.endswith("cpu"):
        assert image.endswith("-cpu")
        # Guaranteed QoS, whole cores: the static CPU manager can give torch dedicated cores.
        assert resources["requests"] == resources["limits"]
        assert cpu_quantity(resources["limits"]["cpu"]).is_integer()

    spread = spec["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in spread} >= {"kubernetes.io/hostname"}
    for constraint in spread:
        assert selects(constraint["labelSelector"]["matchLabels"], pod_labels(docs))

    pdb = one(docs, "PodDisruptionBudget")["spec"]
    assert selects(pdb["selector"]["matchLabels"], pod_labels(docs))
    assert "maxUnavailable" in pdb, "minAvailable would block drains of a single replica"


def test_overlays_only_change_what_they_must() -> None:
    base = one(rendered("base"), "ScaledObject")["spec"]["triggers"][0]["metadata"]
    for target in OVERLAYS:
        metadata = one(rendered(target), "ScaledObject")["spec"]["triggers"][0]["metadata"]
        for key in ("bootstrapServers", "consumerGroup", "topic", "offsetResetPolicy", "sasl"):
            assert metadata.get(key) == base.get(key), (target, key)


def test_name_prefix_and_model_volume_keep_references_whole(tmp_path: Path) -> None:
    """An overlay that renames everything keeps the KEDA references and the ConfigMap wired."""
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "namePrefix": "team-a-",
                "resources": [os.path.relpath(K8S / "overlays/cpu", tmp_path)],
                "components": [os.path.relpath(K8S / "components/model-volume", tmp_path)],
            }
        )
    )
    docs = kustomize(tmp_path)
    deployment = one(docs, "Deployment")
    scaled = one(docs, "ScaledObject")
    auth = one(docs, "TriggerAuthentication")
    assert deployment["metadata"]["name"] == "team-a-streamer"
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert scaled["spec"]["triggers"][0]["authenticationRef"]["name"] == auth["metadata"]["name"]
    config_file(docs)  # the mounted ConfigMap is found under its renamed name

    c = container(docs)
    (models,) = [m for m in c["volumeMounts"] if m["name"] == "models"]
    assert models["readOnly"] is True
    model_path = yaml.safe_load(config_file(docs)[1])["model"]["path"]
    assert model_path.startswith(models["mountPath"].rstrip("/") + "/")
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) not in CRD_KINDS:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


# --- labels, several installs in one namespace ---------------------------------------------------

NAME, INSTANCE, VERSION = (f"app.kubernetes.io/{k}" for k in ("name", "instance", "version"))


def selectors(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, str]]]:
    """(where, matchLabels) of every pod selector in an install."""
    out = []
    for doc in docs:
        kind, spec = doc["kind"], doc.get("spec", {})
        where = f"{kind}/{doc['metadata']['name']}"
        if kind == "Deployment":
            out.append((where, spec["selector"]["matchLabels"]))
            for c in spec["template"]["spec"].get("topologySpreadConstraints", []):
                out.append((f"{where} topology spread", c["labelSelector"]["matchLabels"]))
        elif kind == "Service":
            out.append((where, spec["selector"]))
        elif kind in ("PodDisruptionBudget", "ServiceMonitor"):
            out.append((where, spec["selector"]["matchLabels"]))
        elif kind == "NetworkPolicy":
            out.append((where, spec["podSelector"]["matchLabels"]))
    return out


@pytest.mark.parametrize("target", TARGETS)
def test_recommended_labels_and_selectors_by_instance(target: str) -> None:
    from streamer import __version__

    docs = rendered(target)
    for doc in docs:
        labels = doc["metadata"].get("labels", {})
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        assert labels.get(INSTANCE) == "streamer", where
        assert labels.get(VERSION) == __version__, where
        assert labels.get("app.kubernetes.io/part-of") == "streamer", where
    pod = pod_labels(docs)
    assert pod[NAME] == "streamer" and pod[INSTANCE] == "streamer"
    assert pod[VERSION] == __version__
    found = selectors(docs)
    assert len(found) >= (7 if target in OVERLAYS else 6), found
    for where, selector in found:
        assert selector.get(NAME) == "streamer", where
        assert selector.get(INSTANCE) == pod[INSTANCE], f"{where} does not select by instance"
        assert VERSION not in selector, f"{where}: a version in a selector breaks upgrades"
        assert selects(selector, pod), where
    if target in OVERLAYS:
        tag = container(docs)["image"].rsplit(":", 1)[1]
        assert tag.startswith(f"{__version__}-"), f"image tag {tag} is not version {__version__}"


def install(tmp_path: Path, overlay: str, suffix: str) -> list[dict[str, Any]]:
    """An install of ``overlay`` as docs/deploy.md shows it: own names, own instance label."""
    d = tmp_path / suffix
    d.mkdir()
    (d / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "nameSuffix": f"-{suffix}",
                "resources": [os.path.relpath(K8S / overlay, d)],
                "labels": [
                    {"pairs": {INSTANCE: f"streamer-{suffix}"}, "includeSelectors": True},
                ],
            }
        )
    )
    return kustomize(d)


def test_two_installs_share_a_namespace_without_selecting_each_other(tmp_path: Path) -> None:
    cpu = install(tmp_path, "overlays/cpu", "cpu")
    gpu = install(tmp_path, "overlays/gpu", "gpu")
    names = [(d["kind"], d["metadata"]["name"]) for d in cpu + gpu]
    assert len(names) == len(set(names)), f"name clash: {sorted(names)}"
    for mine, other in ((cpu, gpu), (gpu, cpu)):
        for where, selector in selectors(mine):
            assert selects(selector, pod_labels(mine)), where
            assert not selects(selector, pod_labels(other)), f"{where} selects the other's pods"
        own = {(d["kind"], d["metadata"]["name"]) for d in mine}
        scaled = one(mine, "ScaledObject")["spec"]
        assert ("Deployment", scaled["scaleTargetRef"]["name"]) in own
        auth = scaled["triggers"][0]["authenticationRef"]["name"]
        assert ("TriggerAuthentication", auth) in own
        assert ("ConfigMap", config_map_name(mine)) in own
        monitor = one(mine, "ServiceMonitor")["spec"]["selector"]["matchLabels"]
        assert selects(monitor, one(mine, "Service")["metadata"]["labels"])
        assert not selects(monitor, one(other, "Service")["metadata"]["labels"])
        # the DNS rule names kube-dns only: the install's selector labels did not leak into it
        dns = one(mine, "NetworkPolicy")["spec"]["egress"][0]["to"][0]["podSelector"]
        assert "matchLabels" not in dns
        for doc in mine:
            if (doc["apiVersion"], doc["kind"]) not in CRD_KINDS:
                kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_docs_show_the_install_the_test_builds() -> None:
    text = (ROOT / "docs" / "deploy.md").read_text()
    section = text.split("### Several installs in one namespace", 1)[1].split("\n## ", 1)[0]
    snippet = yaml.safe_load(section.split("```yaml", 1)[1].split("```", 1)[0])
    assert snippet["nameSuffix"].startswith("-")
    (label,) = snippet["labels"]
    assert set(label["pairs"]) == {INSTANCE} and label["includeSelectors"] is True


# --- network policy --------------------------------------------------------------------------


def _ports(rule: dict[str, Any]) -> set[tuple[str, Any]]:
    return {(p.get("protocol", "TCP"), p["port"]) for p in rule.get("ports", [])}


@pytest.mark.parametrize("target", TARGETS)
def test_network_policy_allows_what_the_service_needs(
    target: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model_dir: Path
) -> None:
    docs = rendered(target)
    cfg = effective_config(docs, tmp_path, monkeypatch, model_dir)
    policy = one(docs, "NetworkPolicy")["spec"]
    assert selects(policy["podSelector"]["matchLabels"], pod_labels(docs))
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}

    # in: the HTTP port only (probes, /metrics), by the container port's name or number
    ports = {p["name"]: p["containerPort"] for p in container(docs)["ports"]}
    (ingress,) = policy["ingress"]
    allowed = {ports.get(port, port) for _, port in _ports(ingress)}
    assert allowed == {cfg.http.port}

    egress = policy["egress"]
    # DNS, UDP and TCP, to the cluster resolver
    dns = [r for r in egress if ("UDP", 53) in _ports(r)]
    assert dns and ("TCP", 53) in _ports(dns[0])
    (peer,) = dns[0]["to"]
    system = {"kubernetes.io/metadata.name": "kube-system"}
    assert peer["namespaceSelector"]["matchLabels"] == system
    # every bootstrap server's port, to the namespace of its cluster-local name
    for server in cfg.kafka.bootstrap_servers.split(","):
        host, _, port = server.strip().rpartition(":")
        rules = [r for r in egress if ("TCP", int(port)) in _ports(r)]
        assert rules, f"no egress to Kafka at {server}"
        if host.endswith(".svc.cluster.local") or host.endswith(".svc"):
            namespace = host.split(".")[1]
            peers = [p for r in rules for p in r["to"]]
            assert any(
                p.get("namespaceSelector", {}).get("matchLabels", {})
                == {"kubernetes.io/metadata.name": namespace}
                for p in peers
            ), f"Kafka's namespace {namespace} is not allowed"
    # OTLP to a collector, gRPC and HTTP (docs/deploy.md, "Traces")
    otlp = {port for r in egress for _, port in _ports(r)}
    assert {4317, 4318} <= otlp
    assert len(egress) == 3, "egress beyond DNS, Kafka and OTLP"


# --- the config and its ConfigMap -------------------------------------------------------------


def config_map_name(docs: list[dict[str, Any]]) -> str:
    """The ConfigMap mounted as the volume `config` (the --config file's directory)."""
    (volume,) = [v for v in pod_spec(docs)["volumes"] if v["name"] == "config"]
    return volume["configMap"]["name"]


def _copy_k8s(tmp_path: Path) -> Path:
    copy_root = tmp_path / "k8s"
    shutil.copytree(K8S, copy_root)
    return copy_root


def test_an_edited_config_rolls_the_pods(tmp_path: Path) -> None:
    """The generated ConfigMap's name carries a hash of streamer.yaml: an edit is a new ConfigMap
    and a changed pod template, so applying it rolls the pods (what docs/deploy.md says)."""
    copy_root = _copy_k8s(tmp_path)
    before = kustomize(copy_root / "overlays/cpu")
    config = copy_root / "base" / "streamer.yaml"
    config.write_text(config.read_text().replace('version: "1"', 'version: "2"'))
    after = kustomize(copy_root / "overlays/cpu")
    name_before = config_map_name(before)
    name_after = config_map_name(after)
    assert name_before.startswith("streamer-config-") and name_before != name_after
    template_before = one(before, "Deployment")["spec"]["template"]
    assert template_before != one(after, "Deployment")["spec"]["template"]
    assert 'version: "2"' in config_file(after)[1]


def test_deploy_docs_describe_the_configmap_as_it_behaves(tmp_path: Path) -> None:
    text = (ROOT / "docs" / "deploy.md").read_text()
    assert "update the ConfigMap and send `SIGHUP`" not in text
    swap = text.split("### Rolling a new model version", 1)[1].split("\n## ", 1)[0]
    assert "rolls the pods" in swap
    assert "disableNameSuffixHash" in swap
    # The documented alternative renders as described: a fixed name the pods keep mounting, so
    # an edit reaches them in place (then SIGHUP or /admin/reload) instead of a rollout.
    snippet = yaml.safe_load(swap.split("```yaml", 1)[1].split("```", 1)[0])
    copy_root = _copy_k8s(tmp_path)
    base = copy_root / "base" / "kustomization.yaml"
    kustomization = yaml.safe_load(base.read_text())
    (generator,) = kustomization["configMapGenerator"]
    generator.update(snippet["configMapGenerator"][0])
    base.write_text(yaml.safe_dump(kustomization))
    docs = kustomize(copy_root / "overlays/cpu")
    assert config_map_name(docs) == "streamer-config"
    config_file(docs)
    # mounted as a directory, not with subPath (a subPath mount never sees an update)
    mount = next(m for m in container(docs)["volumeMounts"] if m["name"] == "config")
    assert "subPath" not in mount
