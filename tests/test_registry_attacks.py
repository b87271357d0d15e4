"""opsflow's schema registry against the requests that could break or abuse it.

Whoever reaches the registry can change every contract (register a schema,
lower a compatibility level, delete a subject), so it can require credentials;
and what anybody sends is bounded before it is parsed. The malformed, nested
and oversized bodies go to the session stack's registry (authentication off,
as the embedded stack runs it); the authentication tests start a stack of
their own with it on (``opsflow up`` on the session's broker and PostgreSQL:
only the registry and provisioning are its own) and drive it with opsflow's
own clients. Every error must keep Confluent's ``{"error_code", "message"}``.
"""

from __future__ import annotations

import base64
import json
import secrets
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError

from opsflow.contracts.catalogue import catalogue
from opsflow.contracts.wire import WireCodec
from opsflow.errors import ConfigurationError, RetryableError
from opsflow.producer import Producer
from opsflow.settings import RegistrySettings
from opsflow.stack.health import registry_healthy
from services.contracts import OrderReceived
from tests.support.dispatching import LogReader, make_orders
from tests.support.stack import ROOT, Stack, create_schema, drop_schema, stack_env

USER_INFO = f"opsflow-tests:{secrets.token_urlsafe(16)}"
LIMIT = 1024 * 1024  # OPSFLOW_REGISTRY_MAX_BODY_BYTES's default
SCHEMA = json.dumps({"type": "record", "name": "Probe", "namespace": "opsflow.test", "fields": []})
DEPTH = 10_000


def unique(prefix: str = "attack") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def assert_error(response: httpx.Response, status: int, error_code: int) -> str:
    """Check Confluent's error shape and return its message."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error_code", "message"} and body["error_code"] == error_code, body
    return str(body["message"])


def basic(user_info: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(user_info.encode()).decode()}


@dataclass
class Guarded:
    """A stack whose registry requires ``USER_INFO``; its topics under ``prefix``."""

    stack: Stack
    url: str
    prefix: str
    bootstrap: str


@pytest.fixture(scope="module")
def guarded(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guarded]:
    base = stack.address("DATABASE_URL")
    schema, database_url = create_schema(base)
    data_dir = tmp_path_factory.mktemp("guarded") / "data"
    prefix = f"{unique('ra')}."
    bootstrap = stack.address("KAFKA_BOOTSTRAP_SERVERS")
    env = stack_env(
        data_dir,
        KAFKA_BOOTSTRAP_SERVERS=bootstrap,
        DATABASE_URL=database_url,
        OPSFLOW_TOPIC_PREFIX=prefix,
        OPSFLOW_TOPIC_PARTITIONS="1",
        # The server's credentials, and the ones every client of the stack sends.
        OPSFLOW_REGISTRY_BASIC_AUTH_USER_INFO=USER_INFO,
        SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO=USER_INFO,
    )
    own = Stack(data_dir, env)
    try:
        own.run("up", "--detach")
        yield Guarded(own, own.address("SCHEMA_REGISTRY_URL"), prefix, bootstrap)
    finally:
        own.run("down", check=False)
        drop_schema(base, schema)


@pytest.fixture
def http(registry_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=registry_url, timeout=30) as client:
        yield client


# --- authentication ----------------------------------------------------------------------


@pytest.mark.process
def test_the_registry_refuses_writes_without_credentials_when_auth_is_on(
    guarded: Guarded,
) -> None:
    subject = unique()
    register = f"{guarded.url}/subjects/{subject}/versions"
    body = {"schema": SCHEMA}
    for headers in (
        {},
        basic("opsflow-tests:wrong"),
        basic(f"someone-else:{USER_INFO.split(':', 1)[1]}"),
        {"Authorization": "Basic !!not-base64!!"},
        {"Authorization": f"Bearer {USER_INFO}"},
    ):
        refused = httpx.post(register, json=body, headers=headers, timeout=30)
        assert_error(refused, 401, 401)
        assert refused.headers["www-authenticate"] == 'Basic realm="opsflow schema registry"'
    for method, path in (
        ("PUT", "/config"),
        ("DELETE", f"/subjects/{subject}"),
        ("GET", "/subjects"),
        ("GET", "/schemas/ids/1"),
    ):
        answer = httpx.request(
            method, f"{guarded.url}{path}", json={"compatibility": "NONE"}, timeout=30
        )
        assert_error(answer, 401, 401)
    assert httpx.get(f"{guarded.url}/", timeout=30).status_code == 200, "the liveness probe"

    allowed = basic(USER_INFO)
    listed = httpx.get(f"{guarded.url}/subjects", headers=allowed, timeout=30)
    assert listed.status_code == 200 and subject not in listed.json()
    assert httpx.get(f"{guarded.url}/config", headers=allowed, timeout=30).json() == {
        "compatibilityLevel": "BACKWARD"
    }, "the refused PUT /config changed nothing"
    written = httpx.post(register, json=body, headers=allowed, timeout=30)
    assert written.status_code == 200 and set(written.json()) == {"id"}


@pytest.mark.process
def test_opsflows_clients_send_the_credentials_the_settings_carry(
    guarded: Guarded, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The stack came up: its health probe and provisioning (every contract registered)
    # went through the credentials.
    components = guarded.stack.components()
    assert components["registry"]["healthy"] and components["provision"]["healthy"]
    monkeypatch.setenv("SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO", USER_INFO)
    client = SchemaRegistryClient(RegistrySettings().client_config(guarded.url))
    assert {event.subject for event in catalogue().values()} <= set(client.get_subjects())
    assert registry_healthy(guarded.url)[0]

    # The producer SDK writes; a consumer's codec reads it back.
    order = make_orders(1)[0]
    with Producer(
        "registry-auth-tests",
        bootstrap_servers=guarded.bootstrap,
        registry_url=guarded.url,
        topic_prefix=guarded.prefix,
    ) as producer:
        report = producer.send(order)
    reader = LogReader(guarded.bootstrap, [report.topic])
    try:
        reader.read_to(reader.ends(), timeout=30)
        (_, value), *_ = reader.records[report.topic]
    finally:
        reader.close()
    codec = WireCodec(SchemaRegistryClient(RegistrySettings().client_config(guarded.url)))
    decoded = codec.decode(value)
    assert isinstance(decoded, OrderReceived) and decoded.order_id == order.order_id

    # Without them, each says so; the SDK writes nothing, and a consumer's codec calls it
    # an outage to retry (the partition waits), not a bad record to dead-letter.
    monkeypatch.delenv("SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO")
    healthy, why = registry_healthy(guarded.url)
    assert not healthy and "401" in why
    with pytest.raises(SchemaRegistryError) as refused:
        SchemaRegistryClient(RegistrySettings().client_config(guarded.url)).get_subjects()
    assert refused.value.http_status_code == 401
    with (
        Producer(
            "registry-auth-tests",
            bootstrap_servers=guarded.bootstrap,
            registry_url=guarded.url,
            topic_prefix=guarded.prefix,
        ) as producer,
        pytest.raises(RetryableError, match="refused the credentials"),
    ):
        producer.send(make_orders(1)[0])
    stranger = WireCodec(SchemaRegistryClient({"url": guarded.url}))
    with pytest.raises(RetryableError, match="SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO"):
        stranger.decode(value)


@pytest.mark.process
def test_registry_credentials_that_cannot_work_are_one_clear_line(tmp_path: Path) -> None:
    for user_info in ("no-colon", ":no-user"):
        settings = RegistrySettings(schema_registry_basic_auth_user_info=user_info)
        with pytest.raises(ConfigurationError, match="SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO"):
            settings.client_config("http://127.0.0.1:8081")
    twice = RegistrySettings(schema_registry_basic_auth_user_info=USER_INFO)
    with pytest.raises(ConfigurationError, match="carries credentials too"):
        twice.client_config("http://user:secret@127.0.0.1:8081")

    # The server refuses to start on a malformed one, without printing it.
    secret = "no-colon-" + secrets.token_hex(8)
    started = subprocess.run(
        [sys.executable, "-m", "opsflow.registry"],
        cwd=ROOT,
        env={
            **stack_env(tmp_path),
            "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none",
            "OPSFLOW_REGISTRY_BASIC_AUTH_USER_INFO": secret,
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert started.returncode == 2, started.stderr
    assert "OPSFLOW_REGISTRY_BASIC_AUTH_USER_INFO" in started.stderr
    assert secret not in started.stderr + started.stdout


# --- what anybody may send ----------------------------------------------------------------


def test_the_registry_answers_deeply_nested_or_malformed_json_with_4xx(
    http: httpx.Client,
) -> None:
    subject = unique()
    deep_arrays = "[" * DEPTH + "]" * DEPTH
    # Records inside records: valid JSON text, but Avro's parser recurses through it.
    deep_record = "".join(
        f'{{"type": "record", "name": "R{level}", "fields": [{{"name": "inner", "type": '
        for level in range(3000)
    )
    deep_record += '"int"' + "}]}" * 3000
    writes = [
        f"/subjects/{subject}/versions",
        f"/subjects/{subject}",
        f"/compatibility/subjects/{subject}/versions/latest",
        f"/compatibility/subjects/{subject}/versions",
    ]
    for path in writes:
        for raw, status, code in (
            (deep_arrays, 400, 400),
            ('{"schema": ' + deep_arrays + "}", 400, 400),
            ('{"a": ' * DEPTH + "1" + "}" * DEPTH, 400, 400),
            ('{"schema": ', 400, 400),
            ("\xff\xfe", 400, 400),
            ("", 400, 400),
            ("[]", 422, 422),
            ('"a schema"', 422, 422),
            ("null", 422, 422),
            (json.dumps({"schema": deep_arrays}), 422, 42201),
            (json.dumps({"schema": deep_record}), 422, 42201),
            (json.dumps({"schema": 42}), 422, 42201),
        ):
            answer = http.post(
                path,
                content=raw.encode("latin-1"),
                headers={"Content-Type": "application/vnd.schemaregistry.v1+json"},
            )
            assert_error(answer, status, code)
    for path in ("/config", f"/config/{subject}"):
        assert_error(http.put(path, content=deep_arrays), 400, 400)
        assert_error(http.put(path, content="[1, 2]"), 422, 422)
        assert_error(http.put(path, content='{"compatibility": [[[]]]}'), 422, 42203)
    assert subject not in http.get("/subjects").json(), "nothing was registered"


def test_an_oversized_schema_body_gets_413(http: httpx.Client) -> None:
    subject = unique()
    padding = " " * LIMIT  # valid JSON, just too long
    oversized = ('{"schema": ' + json.dumps(SCHEMA) + padding + "}").encode()
    answer = http.post(f"/subjects/{subject}/versions", content=oversized)
    assert "exceeds" in assert_error(answer, 413, 413)

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"schema": ' + json.dumps(SCHEMA).encode()
        for _ in range(LIMIT // 65536 + 1):
            yield b" " * 65536
        yield b"}"

    streamed = http.post(f"/subjects/{subject}/versions", content=chunks())
    assert_error(streamed, 413, 413)
    assert subject not in http.get("/subjects").json()
    # Just under the limit is accepted.
    fits = ('{"schema": ' + json.dumps(SCHEMA) + " " * (LIMIT - 200) + "}").encode()
    assert http.post(f"/subjects/{subject}/versions", content=fits).status_code == 200
