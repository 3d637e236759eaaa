"""Several models in one service: routing, unknown models, hot swap without loss."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import orjson
import pytest
import yaml
from support import RunningService, base_config, build_tiny_model, json_records, produce, read_topic

from streamer.config import load_config
from streamer.kafka.broker import create_topics, free_port

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def model_b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second tiny model with other weights and a 16-wide embedding."""
    return build_tiny_model(tmp_path_factory.mktemp("b") / "model", seed=5, hidden=16)


@pytest.fixture(scope="module")
def model_v2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """'Version 2' of the tiny model: same shape, other weights."""
    return build_tiny_model(tmp_path_factory.mktemp("v2") / "model", seed=9)


def docs(msgs: list) -> list[dict]:
    return [orjson.loads(m.value) for m in msgs]


async def test_routing_by_topic_and_header_and_unknown_to_dlq(
    broker: str, topic: str, tiny_model: Path, model_b: Path
) -> None:
    t_a, t_b = f"{topic}-a", f"{topic}-b"
    await create_topics(broker, {t_a: 1, t_b: 1})
    cfg = base_config(broker, tiny_model, t_a)
    cfg["kafka"]["input_topics"] = [t_a, t_b]
    del cfg["model"]
    cfg["models"] = [
        {"name": "alpha", "version": "1", "path": str(tiny_model), "max_length": 64},
        {"name": "beta", "version": "7", "path": str(model_b), "max_length": 64},
    ]
    cfg["routing"] = {"by_topic": {t_b: "beta"}}
    await produce(
        broker,
        t_a,
        json_records(4),
        headers=[
            [],
            [("streamer.model", b"beta")],
            [("streamer.model", b"beta@7")],
            [("streamer.model", b"gamma")],
        ],
    )
    await produce(broker, t_b, json_records(3))
    await produce(broker, t_a, json_records(1), headers=[[("streamer.model", b"alpha@9")]])
    async with RunningService(load_config(None, **cfg)) as svc:
        await svc.wait_done(8)
    results = docs(await read_topic(broker, f"{t_a}.out", expect=6, settle_s=0.3))
    routed = {(d["source"]["topic"], d["source"]["offset"]): d for d in results}
    assert len(routed) == 6

    def served(topic_: str, offset: int) -> tuple[str, str, int]:
        d = routed[(topic_, offset)]
        return d["model"]["name"], d["model"]["version"], len(d["result"]["embedding"])

    assert served(t_a, 0) == ("alpha", "1", 32)  # the default: the first model
    assert served(t_a, 1) == ("beta", "7", 16)  # header: name
    assert served(t_a, 2) == ("beta", "7", 16)  # header: name@version
    for i in range(3):
        assert served(t_b, i) == ("beta", "7", 16)  # topic map
    dlq = await read_topic(broker, f"{t_a}.dlq", expect=2, settle_s=0.3)
    reasons = {
        int(dict(m.headers)["streamer.source.offset"]): {k: v.decode() for k, v in m.headers}
        for m in dlq
    }
    assert reasons[3]["streamer.error.class"] == "UnknownModel"
    assert reasons[3]["streamer.error.stage"] == "route"
    assert "no model named 'gamma'" in reasons[3]["streamer.error.message"]
    assert "alpha@1" in reasons[3]["streamer.error.message"]  # says what is loaded
    assert "version '9'" in reasons[4]["streamer.error.message"]


async def steady_stream(bootstrap: str, topic: str, n: int, every_s: float) -> None:
    for i in range(0, n, 10):
        await produce(bootstrap, topic, json_records(10, start=i))
        await asyncio.sleep(every_s)


ADMIN_TOKEN = "registry-test-token"


async def admin(port: int, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.request(method, f"http://127.0.0.1:{port}{path}", json=body) as resp:
            return resp.status, await resp.json()


async def test_hot_swap_during_a_steady_stream_loses_nothing(
    broker: str, topic: str, tiny_model: Path, model_v2: Path, tmp_path: Path
) -> None:
    await create_topics(broker, {topic: 2})
    port = free_port()
    cfg = load_config(
        None,
        **base_config(
            broker,
            tiny_model,
            topic,
            http={"port": port, "admin": True, "admin_token": ADMIN_TOKEN},
        ),
    )
    n = 600
    async with RunningService(cfg) as svc:
        stream = asyncio.ensure_future(steady_stream(broker, topic, n, 0.02))
        await svc.wait_done(150)
        # a version that fails to load leaves the old one serving
        broken = tmp_path / "broken"
        broken.mkdir()
        (broken / "config.json").write_text((tiny_model / "config.json").read_text())
        (broken / "model.safetensors").write_bytes(b"not weights")
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (broken / name).write_text((tiny_model / name).read_text())
        status, body = await admin(
            port, "POST", "/admin/models", {"name": "tiny", "version": "bad", "path": str(broken)}
        )
        assert status == 422 and "tiny@bad failed to load" in body["error"]
        status, body = await admin(port, "GET", "/admin/models")
        assert [(m["name"], m["version"]) for m in body] == [("tiny", "1")]
        # the real swap, mid-stream
        status, body = await admin(
            port, "POST", "/admin/models", {"name": "tiny", "version": "2", "path": str(model_v2)}
        )
        assert (status, body) == (200, {"serving": "tiny@2"})
        await stream
        await svc.wait_done(n)
        await asyncio.sleep(0.2)
        status, body = await admin(port, "GET", "/admin/models")
        assert [(m["name"], m["version"]) for m in body] == [("tiny", "2")]  # old released
    out = docs(await read_topic(broker, f"{topic}.out", expect=n, settle_s=0.5))
    assert len(out) == n  # nothing processed twice because of the swap
    assert len({(d["source"]["partition"], d["source"]["offset"]) for d in out}) == n  # nor lost
    versions = {d["model"]["version"] for d in out}
    assert versions == {"1", "2"}
    for p in (0, 1):  # in each partition: version 1 up to the swap, then version 2
        seq = [
            d["model"]["version"]
            for d in sorted(
                (d for d in out if d["source"]["partition"] == p),
                key=lambda d: d["source"]["offset"],
            )
        ]
        assert seq == sorted(seq)
    fps = {d["model"]["version"]: d["model"]["fingerprint"] for d in out}
    assert fps["1"] != fps["2"]


async def test_reload_re_reads_the_config_file(
    broker: str, topic: str, tiny_model: Path, model_v2: Path, tmp_path: Path
) -> None:
    await create_topics(broker, {topic: 1})
    raw = base_config(broker, tiny_model, topic)
    path = tmp_path / "streamer.yaml"
    path.write_text(yaml.safe_dump(raw))
    async with RunningService(load_config(path), config_path=path) as svc:
        raw["model"].update(version="2", path=str(model_v2))
        path.write_text(yaml.safe_dump(raw))
        assert await svc.service.reload() == ["tiny@2"]
        assert await svc.service.reload() == []  # nothing changed since
        await produce(broker, topic, json_records(3))
        await svc.wait_done(3)
    out = docs(await read_topic(broker, f"{topic}.out", expect=3))
    assert {d["model"]["version"] for d in out} == {"2"}
