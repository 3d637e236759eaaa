"""Sentence-transformers folders: streamer's embeddings against ``SentenceTransformer.encode``.

Every layout is built here from a tiny BERT (no download) with sentence-transformers' own
modules and ``save``, then served by streamer's model (backend factory, load, tokenize, forward,
postprocess, as the worker does) and compared row by row with the library's ``encode`` on the
same texts: cosine >= 0.9999 for every row. sentence-transformers is a test-only dependency.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError
from support import WORDS

from streamer.cli import main
from streamer.config import ModelConfig
from streamer.models.backends import create_model
from streamer.models.checks import ModelCheckError, scan
from streamer.tools.devtools import bundled_model_path, sample_texts

pytest.importorskip("sentence_transformers")

HIDDEN = 32  # build_tiny_model's hidden size
MIN_COSINE = 0.9999
E5 = {"query": "query: ", "passage": "passage: "}

# name -> how the folder is built (see save_sbert)
LAYOUTS: dict[str, dict[str, Any]] = {
    "mean": {"pooling": "mean"},
    "cls": {"pooling": "cls"},
    "max": {"pooling": "max", "normalize": False},
    "lasttoken": {"pooling": "lasttoken"},
    "mean_sqrt_len": {"pooling": "mean_sqrt_len_tokens", "normalize": False},
    "weightedmean": {"pooling": "weightedmean"},
    "cls+mean concatenated": {"pooling": ("cls", "mean")},
    "cls, Dense Tanh, Normalize": {"pooling": "cls", "dense": [(16, "Tanh")]},
    "mean, Dense Identity, no Normalize": {
        "pooling": "mean",
        "dense": [(24, "Identity")],
        "normalize": False,
    },
    "max, two Dense, Normalize": {"pooling": "max", "dense": [(24, "Tanh"), (8, "Identity")]},
    "mean, E5 prompts, default query": {
        "pooling": "mean",
        "prompts": E5,
        "default_prompt_name": "query",
    },
    "mean, prompt excluded from pooling": {
        "pooling": "mean",
        "include_prompt": False,
        "prompts": E5,
        "default_prompt_name": "query",
    },
    "cls, prompt excluded, Dense": {
        "pooling": "cls",
        "include_prompt": False,
        "prompts": E5,
        "default_prompt_name": "passage",
        "dense": [(16, "Tanh")],
    },
    "lasttoken, prompt excluded": {
        "pooling": "lasttoken",
        "include_prompt": False,
        "prompts": E5,
        "default_prompt_name": "query",
    },
}


def texts(n: int = 40, seed: int = 3) -> list[str]:
    """Mixed lengths (padding is exercised), an empty text and one past max_length."""
    rng = random.Random(seed)
    out = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30))) for _ in range(n)]
    return [*out, "", " ".join(WORDS * 4)]


def _st_modules() -> tuple[Any, Any, Any, Any]:
    try:
        from sentence_transformers.base.modules import Dense, Normalize, Transformer
        from sentence_transformers.sentence_transformer.modules import Pooling
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.models import Dense, Normalize, Pooling, Transformer
    return Transformer, Pooling, Dense, Normalize


def save_sbert(
    base: Path,
    dst: Path,
    *,
    pooling: str | tuple[str, ...] = "mean",
    include_prompt: bool = True,
    dense: list[tuple[int, str]] | None = None,
    normalize: bool = True,
    prompts: dict[str, str] | None = None,
    default_prompt_name: str | None = None,
) -> Path:
    """A sentence-transformers folder: ``base``'s encoder and these modules, saved by the
    library itself."""
    import torch
    from sentence_transformers import SentenceTransformer

    transformer_cls, pooling_cls, dense_cls, normalize_cls = _st_modules()
    torch.manual_seed(1)
    modules = [
        transformer_cls(str(base)),
        pooling_cls(HIDDEN, pooling_mode=pooling, include_prompt=include_prompt),
    ]
    dim = HIDDEN * (1 if isinstance(pooling, str) else len(pooling))
    for out, act in dense or []:
        modules.append(dense_cls(dim, out, activation_function=getattr(torch.nn, act)()))
        dim = out
    if normalize:
        modules.append(normalize_cls())
    model = SentenceTransformer(
        modules=modules, prompts=prompts, default_prompt_name=default_prompt_name, device="cpu"
    )
    model.save(str(dst))
    return dst


def st_encode(path: Path, items: list[str], **kw: Any) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
    return np.asarray(model.encode(items, batch_size=16, **kw), dtype=np.float32)


def embed(path: Path, items: list[str], batch: int = 12, **kw: Any) -> tuple[Any, np.ndarray]:
    """streamer's embeddings, driven as the worker drives the model."""
    model = create_model(ModelConfig(path=path, device="cpu", **kw), threads=1)
    model.load()
    encs = model.tokenize(items)
    rows: list[np.ndarray] = []
    for start in range(0, len(encs), batch):
        ids = [e.ids for e in encs[start : start + batch]]
        out = model.postprocess(model.forward(ids), len(ids))
        rows += [r["embedding"] for r in out]
    return model, np.array(rows, dtype=np.float32)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def streamer_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and r.name.startswith("streamer")
    ]


@pytest.fixture(scope="module")
def folders(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sbert")
    return {
        name: save_sbert(tiny_model, root / f"layout{i}", **spec)
        for i, (name, spec) in enumerate(LAYOUTS.items())
    }


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_agrees_with_sentence_transformers(
    layout: str, folders: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    path, items = folders[layout], texts()
    caplog.set_level(logging.INFO)
    model, got = embed(path, items)
    want = st_encode(path, items)
    worst = float(cosines(got, want).min())
    print(f"{layout}: min cosine {worst:.7f} over {len(items)} texts, dim {got.shape[1]}")
    assert worst >= MIN_COSINE, (layout, worst)
    np.testing.assert_allclose(got, want, atol=1e-4)
    spec = LAYOUTS[layout]
    assert model.embedding_dim == got.shape[1]
    assert model.head.normalize == spec.get("normalize", True)
    norms = np.linalg.norm(got, axis=1)
    assert np.allclose(norms, 1, atol=1e-5) == spec.get("normalize", True)
    assert streamer_warnings(caplog) == []  # the folder alone: nothing to warn about


def test_prompt_name_and_literal_prompt(folders: dict[str, Path]) -> None:
    path, items = folders["mean, E5 prompts, default query"], texts(12)
    _, passage = embed(path, items, prompt_name="passage")
    assert cosines(passage, st_encode(path, items, prompt_name="passage")).min() >= MIN_COSINE
    _, literal = embed(path, items, prompt="passage: ")
    np.testing.assert_allclose(literal, passage, atol=1e-6)
    # An explicit empty prompt turns the folder's default off.
    model, plain = embed(path, items, prompt="")
    assert model.prompt_tokens == 0
    assert cosines(plain, st_encode(path, items, prompt="")).min() >= MIN_COSINE
    assert cosines(plain, passage).min() < 0.999  # the prompt really changed the input


def test_a_literal_prompt_works_without_a_sentence_transformers_folder(tiny_model: Path) -> None:
    items = ["hello world", "the order failed"]
    model, got = embed(tiny_model, items, prompt="query: ")
    prompt_ids = model._backend.encode("query: ").ids[:-1]  # [CLS] and the prompt, no [SEP]
    assert model.sbert is None and model.prompt_tokens == len(prompt_ids)
    assert model.tokenize(["hello"])[0].ids[: len(prompt_ids)] == prompt_ids
    _, prefixed = embed(tiny_model, [f"query: {t}" for t in items])
    np.testing.assert_allclose(got, prefixed, atol=1e-6)


def test_unknown_prompt_name_and_both_prompt_keys_are_refused(
    folders: dict[str, Path], tiny_model: Path
) -> None:
    path = folders["mean, E5 prompts, default query"]
    with pytest.raises(ModelCheckError, match=r"'title'.*: document, passage, query; set"):
        embed(path, ["x"], prompt_name="title")
    with pytest.raises(ModelCheckError, match=r"has no config_sentence_transformers\.json"):
        embed(tiny_model, ["x"], prompt_name="query")
    with pytest.raises(ValidationError, match="not both"):
        ModelConfig(path=path, prompt="query: ", prompt_name="query")


def test_an_explicit_contradicting_pooling_warns_once_and_wins(
    folders: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    items = texts(16)
    caplog.set_level(logging.INFO)
    model, got = embed(folders["cls"], items, pooling="mean")
    warnings = streamer_warnings(caplog)
    assert len(warnings) == 1, warnings
    assert "model.pooling" in warnings[0] and "says cls" in warnings[0]
    assert "using mean" in warnings[0]
    assert model.head.pooling == ("mean",)
    # The same encoder, mean-pooled and normalised by sentence-transformers.
    assert cosines(got, st_encode(folders["mean"], items)).min() >= MIN_COSINE


def test_explicit_keys_that_agree_do_not_warn(
    folders: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    embed(folders["cls"], ["hello"], pooling="cls", normalize=True)
    assert streamer_warnings(caplog) == []


def test_an_explicit_contradicting_normalize_warns_and_wins(
    folders: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    items = texts(8)
    path = folders["cls, Dense Tanh, Normalize"]
    caplog.set_level(logging.INFO)
    _, got = embed(path, items, normalize=False)
    warnings = streamer_warnings(caplog)
    assert len(warnings) == 1 and "model.normalize" in warnings[0], warnings
    assert "says true" in warnings[0] and "using false" in warnings[0]
    assert not np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-3)
    # Same direction as the folder's normalised output: only the normalisation is gone.
    assert cosines(got, st_encode(path, items)).min() >= MIN_COSINE
    caplog.clear()
    _, got = embed(folders["max"], items, normalize=True)
    assert len(streamer_warnings(caplog)) == 1
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)


def legacy(src: Path, dst: Path, *, max_seq_length: int, do_lower_case: bool = False) -> Path:
    """``src`` rewritten as sentence-transformers 2.x saved folders: old type names, boolean
    pooling keys, max_seq_length in sentence_bert_config.json (most folders on the hub)."""
    shutil.copytree(src, dst)
    modules = json.loads((dst / "modules.json").read_text())
    for m in modules:
        m["type"] = "sentence_transformers.models." + m["type"].rsplit(".", 1)[-1]
    (dst / "modules.json").write_text(json.dumps(modules))
    pool = json.loads((dst / "1_Pooling/config.json").read_text())
    mode = pool["pooling_mode"]
    (dst / "1_Pooling/config.json").write_text(
        json.dumps(
            {
                "word_embedding_dimension": pool["embedding_dimension"],
                "pooling_mode_cls_token": mode == "cls",
                "pooling_mode_mean_tokens": mode == "mean",
                "pooling_mode_max_tokens": mode == "max",
                "pooling_mode_mean_sqrt_len_tokens": False,
            }
        )
    )
    (dst / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": max_seq_length, "do_lower_case": do_lower_case})
    )
    return dst


def test_legacy_folder_max_seq_length_caps_and_an_explicit_max_length_overrides(
    folders: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = legacy(folders["cls, Dense Tanh, Normalize"], tmp_path / "legacy", max_seq_length=16)
    items = texts(16)
    caplog.set_level(logging.INFO)
    model, got = embed(path, items)
    assert model.max_length == 16 and streamer_warnings(caplog) == []
    assert model.sbert is not None and model.sbert.pooling == ("cls",)
    worst = float(cosines(got, st_encode(path, items)).min())
    print(f"legacy 2.x folder (cls, Dense, Normalize, max_seq_length 16): min cosine {worst:.7f}")
    assert worst >= MIN_COSINE
    model, _ = embed(path, items, max_length=64)
    assert model.max_length == 64
    warnings = streamer_warnings(caplog)
    assert len(warnings) == 1 and "model.max_length" in warnings[0], warnings
    assert "says 16" in warnings[0] and "using 64" in warnings[0]
    caplog.clear()
    model, _ = embed(path, items, max_length=8)  # below the folder's limit: not a contradiction
    assert model.max_length == 8 and streamer_warnings(caplog) == []


def test_do_lower_case_lowercases_like_sentence_transformers(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    path = legacy(folders["mean"], tmp_path / "lower", max_seq_length=64, do_lower_case=True)
    tok = json.loads((path / "tokenizer.json").read_text())
    tok["normalizer"]["lowercase"] = False  # the tokenizer alone keeps case (unknown tokens)
    (path / "tokenizer.json").write_text(json.dumps(tok))
    items = ["Hello World", "The CUSTOMER order FAILED", "hello world"]
    model, got = embed(path, items)
    assert model.tokenize(["Hello World"])[0].ids == model.tokenize(["hello world"])[0].ids
    worst = float(cosines(got, st_encode(path, items)).min())
    print(f"legacy folder with do_lower_case: min cosine {worst:.7f}")
    assert worst >= MIN_COSINE


def test_pickle_dense_weights_are_refused_unless_allow_pickle(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    import torch
    from safetensors.torch import load_file

    src = folders["cls, Dense Tanh, Normalize"]
    path = shutil.copytree(src, tmp_path / "pickled")
    dense = path / "2_Dense"
    torch.save(load_file(dense / "model.safetensors"), dense / "pytorch_model.bin")
    (dense / "model.safetensors").unlink()
    with pytest.raises(ModelCheckError) as info:
        embed(path, ["hello"])
    msg = str(info.value)
    assert "2_Dense/pytorch_model.bin" in msg and "arbitrary code" in msg
    assert "save_file" in msg and "model.allow_pickle: true" in msg
    items = texts(8)
    _, got = embed(path, items, allow_pickle=True)
    assert cosines(got, st_encode(src, items)).min() >= MIN_COSINE


def _rewrite(path: Path, name: str, change: Any) -> None:
    data = json.loads((path / name).read_text())
    change(data)
    (path / name).write_text(json.dumps(data))


def test_unsupported_modules_are_refused_at_load(folders: dict[str, Path], tmp_path: Path) -> None:
    src = folders["cls, Dense Tanh, Normalize"]
    cases: list[tuple[str, Any, str]] = [
        (
            "modules.json",
            lambda d: d.insert(
                2, {"idx": 2, "name": "x", "path": "", "type": "sentence_transformers.models.LSTM"}
            ),
            r"LSTM, which streamer does not implement \(supported: Transformer, Pooling",
        ),
        (
            "2_Dense/config.json",
            lambda d: d.update(activation_function="evil.module.Payload"),
            "never imports code a folder names",
        ),
        (
            "1_Pooling/config.json",
            lambda d: d.update(pooling_mode="attention"),
            r"pooling \['attention'\], which streamer does not implement",
        ),
        (
            "1_Pooling/config.json",
            lambda d: d.update(embedding_dimension=64),
            "Pooling module expects token embeddings of size 64 but the encoder's hidden size",
        ),
        ("modules.json", lambda d: d.pop(1), "before any Pooling module"),
        (
            "2_Dense/config.json",
            lambda d: d.update(in_features=48),
            "takes 48 features but pooling cls gives 32",
        ),
    ]
    for i, (name, change, message) in enumerate(cases):
        path = shutil.copytree(src, tmp_path / f"case{i}")
        _rewrite(path, name, change)
        with pytest.raises(ModelCheckError, match=message):
            embed(path, ["hello"])


def test_the_fingerprint_covers_the_sentence_transformers_files(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    path = shutil.copytree(folders["cls, Dense Tanh, Normalize"], tmp_path / "fp")
    files = scan(path)
    for name in ("modules.json", "1_Pooling/config.json", "2_Dense/model.safetensors"):
        assert name in files.hashes
    before = files.fingerprint
    _rewrite(path, "1_Pooling/config.json", lambda d: d.update(pooling_mode="mean"))
    assert scan(path).fingerprint != before


@pytest.mark.parametrize(
    "layout", ["max, two Dense, Normalize", "mean, prompt excluded from pooling"]
)
def test_bfloat16_weights_pool_in_float32(layout: str, folders: dict[str, Path]) -> None:
    path, items = folders[layout], texts(24)
    model, got = embed(path, items, dtype="bfloat16")
    assert model.dtype == "bfloat16" and got.dtype == np.float32
    assert cosines(got, st_encode(path, items)).min() >= 0.999  # test_backends' bf16 bound


@pytest.mark.parametrize(
    ("backend", "layout"),
    [
        ("onnxruntime", "cls, prompt excluded, Dense"),
        ("onnxruntime", "max, two Dense, Normalize"),
        ("openvino", "lasttoken, prompt excluded"),
        ("openvino", "weightedmean"),
    ],
)
def test_exported_backends_run_the_same_head(
    backend: str, layout: str, folders: dict[str, Path], tmp_path: Path
) -> None:
    pytest.importorskip(backend)
    path, items = folders[layout], texts(24)
    _, got = embed(path, items, backend=backend, onnx_cache_dir=tmp_path)
    worst = float(cosines(got, st_encode(path, items)).min())
    print(f"{backend} {layout}: min cosine {worst:.7f}")
    assert worst >= MIN_COSINE


def test_check_model_reports_the_pipeline(
    folders: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    assert main(["check-model", str(folders["cls, prompt excluded, Dense"])]) == 0
    out = capsys.readouterr().out
    assert "sentence-transformers pipeline" in out
    assert "Transformer -> Pooling -> Dense -> Normalize" in out
    assert "32->16 Tanh" in out and "passage='passage: '" in out
    assert "excluded from pooling" in out and "1_Pooling/config.json" in out


@pytest.mark.slow
def test_real_minilm_agrees_with_sentence_transformers() -> None:
    path = bundled_model_path()
    items = sample_texts(48, seed=11)
    model, got = embed(path, items, batch=16)
    assert model.sbert is not None and model.sbert.pooling == ("mean",)
    assert model.head.normalize and model.max_length == 256  # sentence_bert_config.json
    want = st_encode(path, items)
    worst = float(cosines(got, want).min())
    print(f"all-MiniLM-L6-v2: min cosine {worst:.7f} over {len(items)} texts")
    assert got.shape == (48, 384) and worst >= MIN_COSINE
