"""Pins, fingerprints and tokenizer/model compatibility checks; `streamer check-model`."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from support import build_tiny_model

from streamer.cli import main
from streamer.config import ModelConfig, PinsConfig
from streamer.models.checks import ModelCheckError, scan, sha256_file
from streamer.models.hf import HFTextModel
from streamer.tools.devtools import bundled_model_path


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_fingerprint_covers_weights_config_and_tokenizer(tiny_model: Path, tmp_path: Path) -> None:
    files = scan(tiny_model)
    assert "model.safetensors" in files.hashes and "tokenizer.json" in files.hashes
    assert "config.json" in files.hashes
    before = files.fingerprint
    changed = copy_model(tiny_model, tmp_path / "m")
    tok = changed / "tokenizer_config.json"
    tok.write_text(tok.read_text().replace("}", ', "note": "edited"}', 1))
    assert scan(changed).fingerprint != before  # a tokenizer change alone changes it


def test_pins_that_match_load(tiny_model: Path) -> None:
    files = scan(tiny_model)
    pins = PinsConfig(
        files={"model.safetensors": files.hashes["model.safetensors"]},
        manifest_sha256=files.fingerprint,
    )
    m = HFTextModel(ModelConfig(path=tiny_model, pins=pins))
    m.load()
    assert m.info.fingerprint == files.fingerprint


def test_pins_that_do_not_match_name_the_file(tiny_model: Path, tmp_path: Path) -> None:
    drifted = copy_model(tiny_model, tmp_path / "m")
    pinned = scan(drifted).hashes
    (drifted / "tokenizer.json").write_text(
        (drifted / "tokenizer.json").read_text().replace('"[UNK]"', '"[UNKNOWN]"', 1)
    )
    cfg = ModelConfig(name="tiny", version="3", path=drifted, pins=PinsConfig(files=pinned))
    with pytest.raises(ModelCheckError) as info:
        HFTextModel(cfg).load()
    msg = str(info.value)
    assert "tiny@3" in msg and "tokenizer.json" in msg
    assert "model.safetensors" not in msg  # only the file that differs is named
    assert sha256_file(drifted / "tokenizer.json") in msg

    with pytest.raises(ModelCheckError, match="manifest sha256"):
        HFTextModel(ModelConfig(path=drifted, pins=PinsConfig(manifest_sha256="0" * 64))).load()


def test_a_tokenizer_from_another_model_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    mixed = copy_model(tiny_model, tmp_path / "mixed")
    minilm = bundled_model_path()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (minilm / name).exists():
            shutil.copy(minilm / name, mixed / name)
    with pytest.raises(ModelCheckError) as info:
        HFTextModel(ModelConfig(path=mixed)).load()
    assert "vocabulary" in str(info.value)
    assert "belongs to a different model" in str(info.value)


def test_classification_needs_a_classifier_head(tiny_model: Path) -> None:
    with pytest.raises(ModelCheckError, match="no sequence-classification head"):
        HFTextModel(ModelConfig(path=tiny_model, task="text-classification")).load()


def test_classifier_as_encoder_is_only_a_warning(tiny_classifier: Path) -> None:
    m = HFTextModel(ModelConfig(path=tiny_classifier))
    m.load()
    levels = {f.check: f.level for f in m.findings}
    assert levels["task"] == "warning"


def test_tokenizer_longer_than_positions_warns(tmp_path: Path) -> None:
    path = build_tiny_model(tmp_path / "m", max_positions=32)
    cfg_file = path / "tokenizer_config.json"
    cfg_file.write_text(
        cfg_file.read_text().replace('"model_max_length": 32', '"model_max_length": 512')
    )
    m = HFTextModel(ModelConfig(path=path, max_length=128))
    m.load()
    levels = {f.check: (f.level, f.message) for f in m.findings}
    assert levels["max length"][0] == "warning"
    assert m.max_length == 32


def test_loading_fails_clearly_when_memory_is_short(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import psutil

    class Mem:
        available = 1024

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Mem())
    with pytest.raises(ModelCheckError, match="MiB of available memory is left"):
        HFTextModel(ModelConfig(path=tiny_model)).load()


def test_check_model_cli(tiny_model: Path, tmp_path: Path, capsys) -> None:
    assert main(["check-model", str(tiny_model), "--max-length", "64"]) == 0
    out = capsys.readouterr().out
    assert scan(tiny_model).fingerprint in out
    assert "parameters" in out and "warmup" in out and "vocabulary" in out
    assert main(["check-model", str(tiny_model), "--task", "text-classification"]) == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["check-model", str(empty)]) == 1
