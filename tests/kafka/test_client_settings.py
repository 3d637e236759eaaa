"""What reaches aiokafka: pass-through maps checked against the clients' own signatures,
compression, assignors, static membership, and OAUTHBEARER token providers.

SASL cannot be switched on in the embedded broker, so the OAUTHBEARER settings are checked here
at the level of the client's keyword arguments and the provider's answers (and on the wire, via
a SASL-answering proxy, in test_sasl_oauth.py)."""

from __future__ import annotations

import inspect
import os
import textwrap
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.abc import AbstractTokenProvider
from aiokafka.conn import OAuthAuthenticator
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from aiokafka.coordinator.assignors.sticky.sticky_assignor import StickyPartitionAssignor
from aiokafka.errors import KafkaConnectionError

from streamer.config import ConfigError, KafkaConfig, SecurityConfig, load_config
from streamer.kafka import client
from streamer.kafka.client import (
    OWN,
    check_codec,
    check_passthrough,
    client_parameters,
    consumer_kwargs,
    passthrough_keys,
    producer_kwargs,
)
from streamer.kafka.oauth import EnvTokenProvider, FileTokenProvider, TokenUnavailable


def _kafka(**kafka: object) -> KafkaConfig:
    return load_config(None, kafka=kafka).kafka


@pytest.fixture(autouse=True)
def _no_streamer_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.upper().startswith("STREAMER_"):
            monkeypatch.delenv(key)


# -- pass-through maps --------------------------------------------------------------------------
def test_passthrough_reaches_the_clients_with_their_types() -> None:
    cfg = _kafka(
        consumer={"fetch_max_bytes": 1_000_000, "client_rack": "eu-west-1a", "check_crcs": False},
        producer={"connections_max_idle_ms": 60_000, "metadata_max_age_ms": 30_000},
    )
    ckw, pkw = consumer_kwargs(cfg), producer_kwargs(cfg)
    assert ckw["fetch_max_bytes"] == 1_000_000 and ckw["client_rack"] == "eu-west-1a"
    assert ckw["check_crcs"] is False
    assert pkw["connections_max_idle_ms"] == 60_000 and pkw["metadata_max_age_ms"] == 30_000
    # the curated settings stay as they were
    assert ckw["enable_auto_commit"] is False and ckw["isolation_level"] == "read_committed"
    assert pkw["acks"] == "all"


async def test_built_kwargs_are_accepted_by_aiokafka() -> None:
    cfg = _kafka(
        consumer={"max_partition_fetch_bytes": 2_000_000},
        producer={"metadata_max_age_ms": 30_000},
        compression_type="zstd",
        partition_assignment_strategy=["sticky", "range"],
        group_instance_id="pod-7",
    )
    consumer = AIOKafkaConsumer(**consumer_kwargs(cfg))
    producer = AIOKafkaProducer(**producer_kwargs(cfg))
    try:
        assert consumer._group_instance_id == "pod-7"
        assert consumer._partition_assignment_strategy == (
            StickyPartitionAssignor,
            RangePartitionAssignor,
        )
        assert producer._compression_type == "zstd"
    finally:
        await producer.stop()
        await consumer.stop()


def test_environment_values_are_coerced_to_the_parameters_types(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("STREAMER_KAFKA__CONSUMER__FETCH_MAX_BYTES", "2000000")
    monkeypatch.setenv("STREAMER_KAFKA__CONSUMER__EXCLUDE_INTERNAL_TOPICS", "false")
    cfg = load_config(None).kafka
    assert cfg.consumer == {"fetch_max_bytes": 2_000_000, "exclude_internal_topics": False}


def test_unknown_key_lists_the_valid_ones_and_suggests_a_spelling() -> None:
    with pytest.raises(ConfigError) as info:
        _kafka(consumer={"fetch_max_byte": 1})
    text = str(info.value)
    assert "kafka.consumer: fetch_max_byte: not a parameter of aiokafka's AIOKafkaConsumer" in text
    assert "did you mean fetch_max_bytes?" in text
    assert "valid keys: " + ", ".join(passthrough_keys("consumer")) in text
    assert "enable_auto_commit" not in text.split("valid keys: ")[1]


@pytest.mark.parametrize(
    ("kind", "key", "value", "why"),
    [
        ("consumer", "enable_auto_commit", True, "commit records not yet published"),
        ("consumer", "isolation_level", "read_uncommitted", "read_committed"),
        ("consumer", "session_timeout_ms", 10_000, "use kafka.session_timeout_ms"),
        ("consumer", "group_instance_id", "x", "use kafka.group_instance_id"),
        ("consumer", "value_deserializer", "json", "raw bytes"),
        ("producer", "acks", 1, "acks 0 or 1 an acknowledged output can still be lost"),
        ("producer", "acks", 0, "always all"),
        ("producer", "compression_type", "zstd", "use kafka.compression_type"),
        ("producer", "transactional_id", "t", "not exactly-once"),
        ("producer", "max_batch_size", 1, "use kafka.batch_size"),
        ("producer", "api_version", "2.8", "deprecated by aiokafka"),
    ],
)
def test_keys_streamer_sets_are_refused_with_why(
    kind: str, key: str, value: object, why: str
) -> None:
    with pytest.raises(ConfigError) as info:
        _kafka(**{kind: {key: value}})
    assert f"kafka.{kind}: {key}: refused, streamer sets it itself" in str(info.value)
    assert why in str(info.value)


def test_values_of_the_wrong_type_are_refused() -> None:
    with pytest.raises(ValueError, match="check_crcs: expects bool"):
        check_passthrough("consumer", {"check_crcs": "maybe"})
    with pytest.raises(ValueError, match="fetch_min_bytes: expects an integer, got True"):
        check_passthrough("consumer", {"fetch_min_bytes": True})
    with pytest.raises(ValueError, match="client_rack: expects str"):
        check_passthrough("consumer", {"client_rack": ["a"]})


@pytest.mark.parametrize("kind", ["consumer", "producer"])
def test_the_refusal_table_names_real_parameters(kind: str) -> None:
    """A parameter aiokafka renames or drops would otherwise leave a stale refusal behind."""
    params = client_parameters(kind)
    assert set(OWN[kind]) - {"topics"} <= set(params), set(OWN[kind]) - set(params)
    # and every keyword streamer builds itself is refused in the pass-through map
    cfg = _kafka(group_instance_id="x")
    built = consumer_kwargs(cfg) if kind == "consumer" else producer_kwargs(cfg)
    assert set(built) <= set(OWN[kind])
    cls = AIOKafkaConsumer if kind == "consumer" else AIOKafkaProducer
    assert set(built) <= set(inspect.signature(cls).parameters)


# -- compression ----------------------------------------------------------------------------------
@pytest.mark.parametrize("codec", ["none", "gzip", "snappy", "lz4", "zstd"])
def test_every_codec_is_usable_here(codec: str) -> None:
    check_codec(codec)  # cramjam is a dependency: lz4, snappy and zstd work
    expected = None if codec == "none" else codec
    assert producer_kwargs(_kafka(compression_type=codec))["compression_type"] == expected


def test_missing_codec_library_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from aiokafka import codec as codecs

    monkeypatch.setattr(codecs, "has_zstd", lambda: False)
    with pytest.raises(ConfigError, match=r"kafka\.compression_type: zstd needs the cramjam"):
        _kafka(compression_type="zstd")
    with pytest.raises(ConfigError, match=r"kafka\.compression_type: Input should be"):
        _kafka(compression_type="brotli")


# -- assignment and membership ---------------------------------------------------------------------
def test_assignment_strategy_names_become_aiokafka_assignors() -> None:
    assert consumer_kwargs(_kafka())["partition_assignment_strategy"] == (
        RoundRobinPartitionAssignor,  # aiokafka's own default, kept
    )
    cfg = _kafka(partition_assignment_strategy="sticky, range")
    assert cfg.partition_assignment_strategy == ["sticky", "range"]
    assert consumer_kwargs(cfg)["partition_assignment_strategy"] == (
        StickyPartitionAssignor,
        RangePartitionAssignor,
    )
    with pytest.raises(ConfigError, match=r"cooperative-sticky .* not implemented by aiokafka"):
        _kafka(partition_assignment_strategy="cooperative-sticky")
    with pytest.raises(ConfigError, match=r"kafka\.partition_assignment_strategy"):
        _kafka(partition_assignment_strategy=["uniform"])


def test_static_membership_reaches_the_consumer_and_each_worker_gets_its_own_id() -> None:
    assert "group_instance_id" not in consumer_kwargs(_kafka())
    assert consumer_kwargs(_kafka(group_instance_id="pod-3"))["group_instance_id"] == "pod-3"
    with pytest.raises(ConfigError, match="an empty id is no id"):
        _kafka(group_instance_id=" ")

    from support import two_cores

    from streamer.supervisor import plan_workers

    cfg = load_config(
        None,
        kafka={"group_instance_id": "pod-3"},
        runtime={"processes": 2, "cpu_affinity": two_cores()},
    )
    envs = [w.env() for w in plan_workers(cfg, ports=[1, 2])]
    assert [e["STREAMER_KAFKA__GROUP_INSTANCE_ID"] for e in envs] == ["pod-3-0", "pod-3-1"]
    plain = load_config(None, runtime={"processes": 2, "cpu_affinity": two_cores()})
    assert all("STREAMER_KAFKA__GROUP_INSTANCE_ID" not in w.env() for w in plan_workers(plain))


# -- OAUTHBEARER ----------------------------------------------------------------------------------
def _oauth(**security: object) -> KafkaConfig:
    return _kafka(
        security={"protocol": "SASL_PLAINTEXT", "sasl_mechanism": "OAUTHBEARER", **security}
    )


def test_token_file_is_reread_on_every_request(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("first-token\n")
    kwargs = consumer_kwargs(_oauth(sasl_oauth_token_file=str(token)))
    assert kwargs["sasl_mechanism"] == "OAUTHBEARER"
    assert "sasl_plain_username" not in kwargs and "sasl_plain_password" not in kwargs
    provider = kwargs["sasl_oauth_token_provider"]
    assert isinstance(provider, AbstractTokenProvider)

    import asyncio

    assert asyncio.run(provider.token()) == "first-token"
    token.write_text("rotated-token")  # what a secret rotation (or a refreshing sidecar) does
    assert asyncio.run(provider.token()) == "rotated-token"

    # what aiokafka sends: the RFC 7628 client-first message with the current token
    auth = OAuthAuthenticator(sasl_oauth_token_provider=provider)
    payload, _ = asyncio.run(auth.step(None))
    assert payload == b"n,,\x01auth=Bearer rotated-token\x01\x01"

    token.write_text("")  # mid-rotation: a retriable connection error, logged by aiokafka
    with pytest.raises(TokenUnavailable, match="is empty") as info:
        asyncio.run(provider.token())
    assert isinstance(info.value, KafkaConnectionError)


def test_token_from_the_environment_with_extensions(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    monkeypatch.setenv("KAFKA_TOKEN", "env-token")
    cfg = _oauth(
        sasl_oauth_token_env="KAFKA_TOKEN",
        sasl_oauth_extensions={"logicalCluster": "lkc-1", "identityPoolId": "pool-2"},
    )
    provider = consumer_kwargs(cfg)["sasl_oauth_token_provider"]
    assert isinstance(provider, EnvTokenProvider)
    monkeypatch.setenv("KAFKA_TOKEN", "newer-token")
    payload, _ = asyncio.run(OAuthAuthenticator(sasl_oauth_token_provider=provider).step(None))
    assert payload == (
        b"n,,\x01auth=Bearer newer-token\x01logicalCluster=lkc-1\x01identityPoolId=pool-2\x01\x01"
    )


def test_token_source_problems_stop_start_up_with_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError, match="needs exactly one token source"):
        _oauth()
    empty = tmp_path / "empty"
    empty.write_text("  \n")
    with pytest.raises(ConfigError, match="; got 2: "):
        _oauth(sasl_oauth_token_file=str(empty), sasl_oauth_token_env="X")
    with pytest.raises(ConfigError, match=r"sasl_oauth_token_file: file .* does not exist"):
        _oauth(sasl_oauth_token_file=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match=r"only apply with protocol SASL_SSL .* OAUTHBEARER"):
        _kafka(security={"sasl_oauth_token_env": "X"})
    with pytest.raises(ConfigError, match="only apply with"):
        _kafka(
            security={
                "protocol": "SASL_SSL",
                "sasl_username": "u",
                "sasl_password": "p",
                "sasl_oauth_token_env": "X",
            }
        )
    # checked once when the clients are built: an empty file or an unset variable
    with pytest.raises(ConfigError, match=r"sasl_oauth_token_file .* is empty"):
        consumer_kwargs(_oauth(sasl_oauth_token_file=str(empty)))
    monkeypatch.delenv("NO_SUCH_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="environment variable NO_SUCH_TOKEN is not set"):
        consumer_kwargs(_oauth(sasl_oauth_token_env="NO_SUCH_TOKEN"))
    # SASL/PLAIN and SCRAM still need their username and password
    with pytest.raises(ConfigError, match="sasl_username is required"):
        _kafka(security={"protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512"})


def test_token_provider_hook(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``module:callable`` for cloud IAM signers: a provider class, a factory or an instance."""
    import asyncio

    (tmp_path / "iam_hook.py").write_text(
        textwrap.dedent(
            """
            from aiokafka.abc import AbstractTokenProvider

            class Signer(AbstractTokenProvider):
                calls = 0

                async def token(self):
                    Signer.calls += 1
                    return f"signed-{Signer.calls}"

                def extensions(self):
                    return {"region": "eu-west-1"}

            def factory():
                return Signer()

            instance = Signer()

            def not_a_provider():
                return "a token string"
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for target in ("iam_hook:Signer", "iam_hook:factory", "iam_hook:instance"):
        provider = consumer_kwargs(_oauth(sasl_oauth_token_provider=target))[
            "sasl_oauth_token_provider"
        ]
        assert type(provider).__name__ == "Signer"
        first = asyncio.run(provider.token())
        assert first.startswith("signed-") and asyncio.run(provider.token()) != first
        assert provider.extensions() == {"region": "eu-west-1"}

    problems = {
        "iam_hook:not_a_provider": "returned str, not an aiokafka.abc.AbstractTokenProvider",
        "iam_hook:nothing": "module 'iam_hook' has no attribute 'nothing'",
        "no_such_module_xyz:provider": "cannot import module 'no_such_module_xyz'",
    }
    for target, message in problems.items():
        with pytest.raises(ConfigError) as info:
            consumer_kwargs(_oauth(sasl_oauth_token_provider=target))
        assert "kafka.security.sasl_oauth_token_provider" in str(info.value)
        assert message in str(info.value)
    with pytest.raises(ConfigError, match="is not module:callable"):
        consumer_kwargs(_oauth(sasl_oauth_token_provider="just_a_name"))
    with pytest.raises(ConfigError, match="go with sasl_oauth_token_file or sasl_oauth_token_env"):
        _oauth(sasl_oauth_token_provider="iam_hook:Signer", sasl_oauth_extensions={"a": "b"})


def test_tokens_with_separators_are_refused(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("abc\x01auth=Bearer forged")
    with pytest.raises(TokenUnavailable, match="control character"):
        FileTokenProvider(token).read()


def test_secrets_stay_out_of_the_printed_config(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("super-secret-token")
    sec = SecurityConfig(
        protocol="SASL_SSL", sasl_mechanism="OAUTHBEARER", sasl_oauth_token_file=token
    )
    assert "super-secret-token" not in sec.model_dump_json()


@pytest.mark.parametrize("protocol", ["PLAINTEXT", "SSL"])
async def test_backoff_asks_the_tls_check_again_until_a_server_passes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, protocol: str
) -> None:
    answers = [[], ["broker:9093"]]  # unreachable at first, then verified
    calls: list[str] = []

    async def check(cfg: KafkaConfig) -> list[str]:
        calls.append(cfg.bootstrap_servers)
        return answers.pop(0)

    monkeypatch.setattr(client, "check_tls", check)
    security: dict[str, object] = {"protocol": protocol}
    if protocol == "SSL":
        ca = tmp_path / "ca.pem"
        ca.write_text("unused: the check is replaced\n")
        security["ssl_cafile"] = str(ca)
    cfg = _kafka(
        bootstrap_servers="broker:9093",
        retry_backoff_ms=10,
        max_retry_backoff_ms=10,
        security=security,
    )
    backoff = client.Backoff(cfg)
    for _ in range(4):
        await backoff.wait("producer", KafkaConnectionError("down"))
    assert calls == (["broker:9093"] * 2 if protocol == "SSL" else [])
