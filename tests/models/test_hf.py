"""The model stages, and the real all-MiniLM-L6-v2 end to end against plain transformers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pytest
from support import RunningService, base_config, produce, read_topic

from streamer.config import ModelConfig, load_config
from streamer.kafka.broker import create_topics
from streamer.models.hf import HFTextModel
from streamer.tools.devtools import bundled_model_path, sample_texts


def test_tokenize_reports_truncation_and_forward_pools(tiny_model: Path) -> None:
    m = HFTextModel(ModelConfig(path=tiny_model, max_length=8))
    m.load()
    short, long = m.tokenize(["hello world", " ".join(["hello"] * 20)])
    assert not short.truncated and len(short.ids) == 4  # [CLS] hello world [SEP]
    assert long.truncated and len(long.ids) == 8
    out = m.postprocess(m.forward([short.ids, long.ids]), 2)
    norms = [float(np.linalg.norm(r["embedding"])) for r in out]
    assert norms == pytest.approx([1.0, 1.0], abs=1e-5)
    # padding must not change a row's embedding
    alone = m.postprocess(m.forward([short.ids]), 1)[0]["embedding"]
    np.testing.assert_allclose(alone, out[0]["embedding"], atol=1e-5)
    assert m.info.fingerprint.startswith("sha256:") and len(m.info.fingerprint) == 71
    assert m.warmup(4, 64) > 0


def test_max_length_is_capped_by_the_model(tiny_model: Path) -> None:
    m = HFTextModel(ModelConfig(path=tiny_model, max_length=10_000))
    m.load()
    assert m.max_length == 128  # max_position_embeddings of the tiny model


@pytest.mark.slow
@pytest.mark.integration
async def test_real_minilm_matches_plain_transformers(broker: str, topic: str) -> None:
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = bundled_model_path()
    texts = sample_texts(24, seed=3)
    await create_topics(broker, {topic: 2})
    await produce(broker, topic, [orjson.dumps({"id": i, "text": t}) for i, t in enumerate(texts)])
    cfg = load_config(
        None,
        **base_config(
            broker,
            path,
            topic,
            model={"name": "minilm", "max_length": 128},
            runtime={"torch_threads": 2},
        ),
    )
    async with RunningService(cfg) as svc:
        await svc.wait_done(len(texts), timeout_s=120)
    out = await read_topic(broker, f"{topic}.out", expect=len(texts))
    got = {
        orjson.loads(m.value)["id"]: np.array(orjson.loads(m.value)["result"]["embedding"])
        for m in out
    }
    assert len(got) == len(texts)

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    enc = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    ref = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1).numpy()
    for i in range(len(texts)):
        assert got[i].shape == (384,)
        cos = float(got[i] @ ref[i] / (np.linalg.norm(got[i]) * np.linalg.norm(ref[i])))
        assert cos > 0.9999, (i, cos)
        np.testing.assert_allclose(got[i], ref[i], atol=1e-4)


def test_padding_reuses_preallocated_buffers(tiny_model: Path) -> None:
    m = HFTextModel(ModelConfig(path=tiny_model, max_length=16))
    m.load()
    ids, mask = m.pad([[5, 6, 7], [8]])
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    storage = m._buffers[0].data_ptr()
    ids, mask = m.pad([[9, 9]])  # smaller: a view of the same buffer, no new allocation
    assert m._buffers[0].data_ptr() == storage
    assert ids.tolist() == [[9, 9]] and ids.flags["C_CONTIGUOUS"]
    ids, _ = m.pad([[1] * 10] * 8)  # larger: the buffer grows once
    assert ids.shape == (8, 10)
