"""``models:/NAME/VERSION`` from a local file-backed MLflow registry."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamer.config import ModelConfig, load_config
from streamer.models.checks import scan
from streamer.models.hf import HFTextModel


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model: Path) -> str:
    import mlflow
    from mlflow import MlflowClient

    uri = f"file:{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("tiny-encoder")
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(tiny_model), "model")
        source = mlflow.get_artifact_uri("model")
    client.create_model_version("tiny-encoder", source=source, run_id=run.info.run_id)
    return "models:/tiny-encoder/1"


def test_models_uri_resolves_from_the_registry(registry: str, tiny_model: Path) -> None:
    cfg = load_config(None, model={"name": "tiny", "version": "1", "path": registry})
    assert str(cfg.model.path).startswith("models:")
    m = HFTextModel(cfg.model)
    m.load()
    # pins and fingerprints apply to the downloaded files: identical bytes, same fingerprint
    assert m.info.fingerprint == scan(tiny_model).fingerprint
    assert "download" in m.timings.phases
    assert len(m.postprocess(m.forward([[2, 12, 3]]), 1)[0]["embedding"]) == 32


def test_unknown_registry_version_fails_clearly(registry: str) -> None:
    m = HFTextModel(ModelConfig(path=Path("models:/tiny-encoder/9")))
    with pytest.raises(Exception, match=r"(?i)version|not found|RESOURCE_DOES_NOT_EXIST"):
        m.load()
