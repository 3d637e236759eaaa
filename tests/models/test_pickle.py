"""Model files: safetensors only unless model.allow_pickle; code shipped with a model never runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from support import build_tiny_model

from streamer.app import Service
from streamer.cli import main
from streamer.config import ModelConfig, load_config
from streamer.models.checks import ModelCheckError, weights_format
from streamer.models.hf import HFTextModel

TEXTS = ["the customer order arrived", "hello world"]


def pickle_only(src: Path, dst: Path) -> Path:
    """``src`` with its weights re-saved as pytorch_model.bin (pickle) and no safetensors."""
    import torch
    from safetensors.torch import load_file

    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    (dst / "model.safetensors").unlink()
    torch.save(state, dst / "pytorch_model.bin")
    return dst


@pytest.fixture(scope="module")
def pickled(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pickle_only(tiny_model, tmp_path_factory.mktemp("pickled") / "model")


def embed(path: Path, **kw: object) -> np.ndarray:
    model = HFTextModel(ModelConfig(path=path, device="cpu", max_length=32, **kw))  # type: ignore[arg-type]
    model.load()
    rows = model.postprocess(model.forward([e.ids for e in model.tokenize(TEXTS)]), len(TEXTS))
    return np.array([r["embedding"] for r in rows])


def test_pickle_weights_are_refused_with_how_to_convert(pickled: Path) -> None:
    assert weights_format(pickled) == ("pickle", ["pytorch_model.bin"])
    with pytest.raises(ModelCheckError) as info:
        HFTextModel(ModelConfig(path=pickled, device="cpu")).load()
    msg = str(info.value)
    assert "pytorch_model.bin" in msg and "no *.safetensors" in msg
    assert "execute arbitrary code" in msg  # why
    assert "save_pretrained" in msg and "safe_serialization=True" in msg  # how to convert
    assert "model.allow_pickle: true" in msg  # and the way out for trusted files


def test_allow_pickle_loads_the_same_weights(pickled: Path, tiny_model: Path) -> None:
    np.testing.assert_allclose(
        embed(pickled, allow_pickle=True), embed(tiny_model), rtol=1e-5, atol=1e-6
    )


def test_safetensors_win_over_pickle_files_beside_them(tiny_model: Path, tmp_path: Path) -> None:
    both = tmp_path / "both"
    shutil.copytree(tiny_model, both)
    (both / "pytorch_model.bin").write_bytes(b"not even a pickle")  # never read
    assert weights_format(both)[0] == "safetensors"
    np.testing.assert_allclose(embed(both), embed(tiny_model), rtol=1e-6)


async def test_service_start_fails_on_pickle_weights(pickled: Path) -> None:
    cfg = load_config(None, model={"path": str(pickled)}, http={"port": 0})
    service = Service(cfg)
    with pytest.raises(ModelCheckError, match="allow_pickle"):
        await service.start()  # before any Kafka client: the model loads first
    await service.close()


def test_custom_code_in_config_json_never_runs(tiny_model: Path, tmp_path: Path) -> None:
    custom = tmp_path / "custom"
    shutil.copytree(tiny_model, custom)
    marker = tmp_path / "code-ran"
    (custom / "modeling_evil.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import BertModel\nclass EvilModel(BertModel):\n    pass\n"
    )
    config = json.loads((custom / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    (custom / "config.json").write_text(json.dumps(config))
    model = HFTextModel(ModelConfig(path=custom, device="cpu"))
    model.load()
    assert type(model._model).__name__ == "BertModel"  # the built-in class
    assert not marker.exists()


def test_check_model_reports_weights_format_and_remote_code(
    tiny_model: Path, pickled: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check-model", str(tiny_model), "--max-length", "64"]) == 0
    out = capsys.readouterr().out
    assert "weights format: safetensors (model.safetensors)" in out
    assert "remote code: never executed" in out

    assert main(["check-model", str(pickled), "--max-length", "64"]) == 1
    out = capsys.readouterr().out
    assert "weights format: pickle (pytorch_model.bin)" in out
    assert "refused unless model.allow_pickle: true" in out
    assert "remote code: never executed" in out
    assert "cannot be served" in out and "execute arbitrary code" in out

    assert main(["check-model", str(pickled), "--max-length", "64", "--allow-pickle"]) == 0
    assert "allowed here (--allow-pickle)" in capsys.readouterr().out

    custom = tmp_path / "custom"
    shutil.copytree(tiny_model, custom)
    config = json.loads((custom / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    (custom / "config.json").write_text(json.dumps(config))
    assert main(["check-model", str(custom), "--max-length", "64"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # rich may wrap the long line
    assert "auto_map names custom code (AutoModel -> modeling_evil.EvilModel): ignored" in out


def test_a_model_only_custom_code_can_build_is_refused_clearly(
    tiny_model: Path, tmp_path: Path
) -> None:
    custom = tmp_path / "custom-type"
    shutil.copytree(tiny_model, custom)
    config = json.loads((custom / "config.json").read_text())
    config["model_type"] = "evil-type"
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig"}
    (custom / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelCheckError) as info:
        HFTextModel(ModelConfig(path=custom, device="cpu")).load()
    msg = str(info.value)
    assert "configuration_evil.EvilConfig" in msg and "never executes" in msg
    assert "trust_remote_code=True" not in msg  # no advice to run it


def test_build_tiny_model_still_writes_safetensors(tmp_path: Path) -> None:
    assert weights_format(build_tiny_model(tmp_path / "m"))[0] == "safetensors"
