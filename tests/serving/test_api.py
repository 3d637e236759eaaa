"""The HTTP API with the real clients (openai, huggingface_hub) against a running service on the
embedded broker: the same vectors as the stream, the same version, errors and limits."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import openai
import orjson
import pytest
from huggingface_hub import InferenceClient
from support import RunningService, base_config, produce, read_topic

from streamer.config import load_config
from streamer.kafka.broker import create_topics, free_port
from streamer.stream.codec import decode_embedding

pytestmark = pytest.mark.integration

TOKEN = "api-test-token"
TEXTS = ["hello world", "the customer order failed again", "security update report page"]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def api_config(broker: str, model: Path, topic: str, port: int, **http: Any) -> Any:
    return load_config(
        None, **base_config(broker, model, topic, http={"port": port, "api": True, **http})
    )


async def post(
    port: int, path: str, body: Any, *, token: str | None = TOKEN, headers: dict | None = None
) -> tuple[int, Any, dict[str, str]]:
    hdrs = {"Authorization": f"Bearer {token}"} if token else {}
    hdrs.update(headers or {})
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    async with aiohttp.ClientSession() as http:
        async with http.post(f"http://127.0.0.1:{port}{path}", data=data, headers=hdrs) as resp:
            return resp.status, orjson.loads(await resp.read()), dict(resp.headers)


async def stream_vectors(broker: str, topic: str, n: int) -> dict[str, tuple[np.ndarray, dict]]:
    """The stream's results for the texts produced by ``produce_texts``: text → (vector, model)."""
    out = await read_topic(broker, f"{topic}.out", expect=n, settle_s=0.2)
    docs = [orjson.loads(m.value) for m in out]
    return {TEXTS[d["id"]]: (decode_embedding(d["result"]), d["model"]) for d in docs}


async def produce_texts(broker: str, topic: str) -> None:
    await produce(broker, topic, [orjson.dumps({"id": i, "text": t}) for i, t in enumerate(TEXTS)])


async def test_openai_client_gets_the_streams_vectors_and_version(
    broker: str, topic: str, tiny_model: Path
) -> None:
    await create_topics(broker, {topic: 1})
    await produce_texts(broker, topic)
    port = free_port()
    async with RunningService(api_config(broker, tiny_model, topic, port, api_token=TOKEN)) as svc:
        await svc.wait_done(len(TEXTS))
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=TOKEN, max_retries=0)
        # the client asks for base64 (little-endian float32) unless told otherwise
        default = await asyncio.to_thread(client.embeddings.create, model="tiny", input=TEXTS)
        floats = await asyncio.to_thread(
            client.embeddings.with_raw_response.create,
            model="tiny@1",
            input=TEXTS[0],
            encoding_format="float",
        )
        models = await asyncio.to_thread(client.models.list)
    stream = await stream_vectors(broker, topic, len(TEXTS))
    version = stream[TEXTS[0]][1]
    assert default.model == "tiny@1"
    assert [d.index for d in default.data] == [0, 1, 2]
    assert default.usage.prompt_tokens == default.usage.total_tokens > len(TEXTS)
    for text, item in zip(TEXTS, default.data, strict=True):
        vector, model = stream[text]
        assert model == version  # one version served both
        assert len(item.embedding) == 32
        assert cosine(np.asarray(item.embedding), vector) >= 0.9999
    parsed = floats.parse()
    assert parsed.model == "tiny@1"
    assert cosine(np.asarray(parsed.data[0].embedding), stream[TEXTS[0]][0]) >= 0.9999
    assert floats.headers["x-streamer-model"] == version["name"]
    assert floats.headers["x-streamer-model-version"] == version["version"]
    assert floats.headers["x-streamer-model-fingerprint"] == version["fingerprint"]
    assert [m.id for m in models.data] == ["tiny@1"]


async def test_base64_is_little_endian_float32(broker: str, topic: str, tiny_model: Path) -> None:
    await create_topics(broker, {topic: 1})
    port = free_port()
    async with RunningService(api_config(broker, tiny_model, topic, port)):
        body = {"model": "tiny", "input": TEXTS[:2]}
        status, as_float, _ = await post(port, "/v1/embeddings", body, token=None)
        assert status == 200
        status, as_b64, _ = await post(
            port, "/v1/embeddings", {**body, "encoding_format": "base64"}, token=None
        )
        assert status == 200
    for f, b in zip(as_float["data"], as_b64["data"], strict=True):
        decoded = np.frombuffer(base64.b64decode(b["embedding"]), dtype="<f4")
        assert np.array_equal(decoded, np.asarray(f["embedding"], dtype=np.float32))


async def test_huggingface_hub_client_embeds_and_classifies_like_the_stream(
    broker: str, topic: str, tiny_model: Path, tiny_classifier: Path
) -> None:
    await create_topics(broker, {topic: 1})
    await produce(
        broker,
        topic,
        [orjson.dumps({"id": i, "text": t}) for i, t in enumerate(TEXTS)] * 2,
        headers=[[]] * len(TEXTS) + [[("streamer.model", b"cls")]] * len(TEXTS),
    )
    port = free_port()
    raw = base_config(broker, tiny_model, topic, http={"port": port, "api": True})
    del raw["model"]
    raw["models"] = [
        {"name": "emb", "version": "1", "path": str(tiny_model), "max_length": 64},
        {
            "name": "cls",
            "version": "3",
            "path": str(tiny_classifier),
            "max_length": 64,
            "task": "text-classification",
        },
    ]
    async with RunningService(load_config(None, **raw)) as svc:
        await svc.wait_done(2 * len(TEXTS))
        # a URL model: the client posts to it, here the service's root (the default model)
        embedder = InferenceClient(model=f"http://127.0.0.1:{port}")
        vectors = await asyncio.to_thread(embedder.feature_extraction, TEXTS[1])
        normalized = await asyncio.to_thread(
            embedder.feature_extraction, TEXTS[1], normalize=True, truncate=True
        )
        classifier = InferenceClient(model=f"http://127.0.0.1:{port}/models/cls")
        labels = await asyncio.to_thread(classifier.text_classification, TEXTS[2])
        top1 = await asyncio.to_thread(classifier.text_classification, TEXTS[2], top_k=1)
        # TEI's own routes
        s_embed, embed, h_embed = await post(port, "/embed", {"inputs": TEXTS}, token=None)
        s_one, predict_one, _ = await post(
            port, "/predict", {"inputs": TEXTS[2], "model": "cls"}, token=None
        )
        s_many, predict_many, h_pred = await post(
            port, "/predict", {"inputs": TEXTS, "model": "cls@3"}, token=None
        )
    out = [orjson.loads(m.value) for m in await read_topic(broker, f"{topic}.out", expect=6)]
    emb = {TEXTS[d["id"]]: d for d in out if d["model"]["name"] == "emb"}
    cls = {TEXTS[d["id"]]: d for d in out if d["model"]["name"] == "cls"}
    assert vectors.shape == (1, 32)
    assert cosine(vectors[0], decode_embedding(emb[TEXTS[1]]["result"])) >= 0.9999
    assert np.allclose(normalized, vectors, atol=1e-6)  # the model normalises already
    assert s_embed == 200 and len(embed) == 3
    for text, vector in zip(TEXTS, embed, strict=True):
        assert cosine(np.asarray(vector), decode_embedding(emb[text]["result"])) >= 0.9999
    assert h_embed["X-Streamer-Model"] == "emb"
    assert h_embed["X-Streamer-Model-Fingerprint"] == emb[TEXTS[0]]["model"]["fingerprint"]
    # classification: every label, best first, the stream's label and score on top
    streamed = cls[TEXTS[2]]["result"]
    assert labels[0].label == streamed["label"]
    assert labels[0].score == pytest.approx(streamed["score"], abs=1e-6)
    assert {x.label for x in labels} == {"negative", "positive"}
    assert sum(x.score for x in labels) == pytest.approx(1.0, abs=1e-5)
    assert [x.label for x in top1] == [streamed["label"]]
    assert s_one == 200 and [x["label"] for x in predict_one] == [x.label for x in labels]
    assert s_many == 200 and len(predict_many) == 3
    # (another batch, other padding: the same up to float rounding)
    assert [x["label"] for x in predict_many[2]] == [x["label"] for x in predict_one]
    assert [x["score"] for x in predict_many[2]] == pytest.approx(
        [x["score"] for x in predict_one], abs=1e-5
    )
    for text, answer in zip(TEXTS, predict_many, strict=True):
        assert answer[0]["label"] == cls[text]["result"]["label"]
    assert h_pred["X-Streamer-Model-Version"] == "3"


async def test_errors_say_what_is_wrong(broker: str, topic: str, tiny_model: Path) -> None:
    await create_topics(broker, {topic: 1})
    port = free_port()
    cfg = api_config(
        broker,
        tiny_model,
        topic,
        port,
        api_token=TOKEN,
        api_max_inputs=4,
        api_max_body_bytes=2048,
    )
    long_text = " ".join(["hello"] * 200)  # over model.max_length=64 tokens
    async with RunningService(cfg) as svc:
        ok = {"model": "tiny", "input": "hello"}
        cases = {
            "no token": (await post(port, "/v1/embeddings", ok, token=None), 401),
            "wrong token": (await post(port, "/v1/embeddings", ok, token="nope"), 401),
            "unknown model": (
                await post(port, "/v1/embeddings", {**ok, "model": "text-embedding-3"}),
                404,
            ),
            "unknown version": (await post(port, "/v1/embeddings", {**ok, "model": "tiny@9"}), 404),
            "not json": (await post(port, "/v1/embeddings", b"{nope"), 400),
            "not an object": (await post(port, "/v1/embeddings", [1, 2]), 400),
            "wrong type": (await post(port, "/v1/embeddings", {**ok, "input": 7}), 400),
            "token ids": (await post(port, "/v1/embeddings", {**ok, "input": [[1, 2]]}), 400),
            "empty text": (await post(port, "/v1/embeddings", {**ok, "input": [" "]}), 400),
            "bad format": (
                await post(port, "/v1/embeddings", {**ok, "encoding_format": "int8"}),
                400,
            ),
            "wrong task": (await post(port, "/predict", {"inputs": "hello"}), 400),
            "too many inputs": (await post(port, "/embed", {"inputs": ["hi"] * 5}), 413),
            "body too large": (await post(port, "/embed", {"inputs": ["hi " * 800]}), 413),
            "too long, refused": (
                await post(port, "/embed", {"inputs": long_text, "truncate": False}),
                413,
            ),
            "bad dimensions": (await post(port, "/v1/embeddings", {**ok, "dimensions": 8}), 400),
        }
        truncated = await post(port, "/embed", {"inputs": long_text, "truncate": True})
        default = await post(port, "/embed", {"inputs": long_text})  # input.on_too_long
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            await asyncio.to_thread(client.embeddings.create, model="tiny", input="hi")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=TOKEN, max_retries=0)
        with pytest.raises(openai.NotFoundError, match="tiny@1"):
            await asyncio.to_thread(client.embeddings.create, model="ada", input="hi")
        requests = svc.service.telemetry.metrics.api_requests
        assert requests.labels("openai", "401")._value.get() == 3
        assert requests.labels("embed", "413")._value.get() == 3
    for what, ((status, body, _), want) in cases.items():
        assert status == want, (what, body)
        error = body["error"]
        assert error["message"] and error["type"], what
    assert "tiny@1" in cases["unknown model"][0][1]["error"]["message"]  # lists what is loaded
    assert cases["unknown model"][0][1]["error"]["code"] == "model_not_found"
    assert "version '9'" in cases["unknown version"][0][1]["error"]["message"]
    assert "Bearer" in cases["no token"][0][2]["WWW-Authenticate"]
    assert "token ids" in cases["token ids"][0][1]["error"]["message"]
    assert "api_max_inputs=4" in cases["too many inputs"][0][1]["error"]["message"]
    assert "api_max_body_bytes=2048" in cases["body too large"][0][1]["error"]["message"]
    assert "max_length=64" in cases["too long, refused"][0][1]["error"]["message"]
    assert "/v1/embeddings" in cases["wrong task"][0][1]["error"]["message"]
    assert "32-dimensional" in cases["bad dimensions"][0][1]["error"]["message"]
    assert cases["unknown model"][0][2].get("X-Streamer-Model") is None  # nothing bound
    assert cases["too long, refused"][0][2]["X-Streamer-Model-Version"] == "1"
    assert truncated[0] == 200 and default[0] == 200  # on_too_long: truncate (the default)
    assert np.allclose(truncated[1], default[1])
