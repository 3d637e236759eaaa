"""``model.path: models:/NAME/VERSION`` — a model directory from an MLflow model registry.

Needs the ``mlflow`` extra. The registry is the one MLflow is configured with
(``MLFLOW_TRACKING_URI`` / ``MLFLOW_REGISTRY_URI``). The version's artifacts are downloaded
once into MLflow's local cache and served from there like any local directory — pins and
fingerprints apply to the downloaded files.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

PREFIX = "models:/"


def is_registry_uri(value: object) -> bool:
    return str(value).startswith("models:")


def resolve(uri: str) -> Path:
    """Download (or reuse) the artifacts of ``models:/NAME/VERSION``; return the model dir."""
    uri = PREFIX + str(uri).removeprefix("models:").lstrip("/")
    try:
        import mlflow
    except ImportError as exc:
        raise RuntimeError(
            f"model.path {uri} needs MLflow: pip install 'streamer[mlflow]'"
        ) from exc
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    for candidate in (local, *sorted(p for p in local.iterdir() if p.is_dir())):
        if (candidate / "config.json").is_file():
            log.info("resolved %s to %s", uri, candidate)
            return candidate
    raise RuntimeError(
        f"{uri} was downloaded to {local} but holds no Hugging Face model directory "
        "(config.json with weights and tokenizer files)"
    )
