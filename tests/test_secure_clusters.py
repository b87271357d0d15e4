"""Secured clusters: the documented variables make clients that connect securely.

The README's "Connecting to a secured cluster" examples are read from the README
itself and turned into real librdkafka clients (TLS files from a private CA made
here); librdkafka's own OIDC flow is run against a loopback identity provider;
opsflow's registry clients go through a real HTTPS server in front of the
session's registry (``tests.support.secured``). No live secured broker is
available (see the README): what librdkafka does on the wire with SASL and TLS
is not exercised here.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs

import pytest
from confluent_kafka import Consumer, KafkaException, Producer
from confluent_kafka.admin import AdminClient
from confluent_kafka.schema_registry import SchemaRegistryClient

from opsflow import settings
from opsflow.acls import acls_for
from opsflow.contracts.catalogue import catalogue
from opsflow.contracts.wire import WireCodec
from opsflow.errors import ConfigurationError, RetryableError
from opsflow.settings import KafkaSettings, RegistrySettings, for_consumer, for_producer
from opsflow.stack.health import registry_healthy
from services.application import application
from tests.support.secured import Pki, SecuredRegistry, secured_registry
from tests.support.stack import ROOT

SECURITY_VARIABLES = ("KAFKA_", "SCHEMA_REGISTRY_")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.create(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def secured(registry_url: str, pki: Pki) -> Iterator[SecuredRegistry]:
    with secured_registry(registry_url, pki) as front:
        yield front


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No KAFKA_* or SCHEMA_REGISTRY_* variable of the session leaks into a test."""
    for name in list(os.environ):
        if name.startswith(SECURITY_VARIABLES):
            monkeypatch.delenv(name)
    return monkeypatch


def documented_setups() -> dict[str, dict[str, str]]:
    """The README's example environment files, by their first comment line."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Connecting to a secured cluster", 1)[1].split("\n## ", 1)[0]
    setups: dict[str, dict[str, str]] = {}
    for block in re.findall(r"```sh\n(.*?)```", section, re.S):
        title, *lines = block.strip().splitlines()
        setups[title.lstrip("# ")] = dict(line.split("=", 1) for line in lines)
    return setups


def free_port() -> int:
    """A loopback port nothing listens on: the clients are built, not connected."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class IdentityProvider:
    """An OAuth token endpoint on loopback (the identity provider's stand-in): answers
    the client-credentials grant of one client with an unsigned JWT, and keeps what
    each request sent."""

    def __init__(self, client_id: str, client_secret: str) -> None:
        self.requests: list[tuple[str | None, dict[str, list[str]]]] = []
        self.asked = threading.Event()
        expected = "Basic " + base64.b64encode(f"{client_id}:{client_secret}".encode()).decode()
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                authorization = self.headers.get("Authorization")
                provider.requests.append((authorization, parse_qs(body.decode())))
                if authorization == expected:
                    now = int(time.time())
                    claims = {"sub": client_id, "iat": now, "exp": now + 3600}
                    token = ".".join(
                        base64.urlsafe_b64encode(json.dumps(part).encode()).rstrip(b"=").decode()
                        for part in ({"alg": "none"}, claims)
                    )
                    answer = {"access_token": f"{token}.", "token_type": "bearer",
                              "expires_in": 3600}  # fmt: skip
                    status, out = 200, json.dumps(answer).encode()
                else:
                    status, out = 401, b'{"error": "invalid_client"}'
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)
                provider.asked.set()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/oauth2/token"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- the KAFKA_* pass-through ----------------------------------------------------------


def test_kafka_variables_pass_librdkafka_properties_ignore_service_links_refuse_the_rest(
    clean_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clean_env.setattr(settings, "_warned", set())
    # What Kubernetes sets for a Service called `kafka` (and `kafka-bootstrap`), and
    # Apache Kafka's scripts read.
    for name, value in {
        "KAFKA_PORT": "tcp://10.0.0.11:9092",
        "KAFKA_PORT_9092_TCP": "tcp://10.0.0.11:9092",
        "KAFKA_PORT_9092_TCP_ADDR": "10.0.0.11",
        "KAFKA_PORT_9092_TCP_PORT": "9092",
        "KAFKA_PORT_9092_TCP_PROTO": "tcp",
        "KAFKA_SERVICE_HOST": "10.0.0.11",
        "KAFKA_SERVICE_PORT": "9092",
        "KAFKA_SERVICE_PORT_CLIENTS": "9092",
        "KAFKA_BOOTSTRAP_SERVICE_HOST": "10.0.0.12",
        "KAFKA_HOME": "/opt/kafka",
        "KAFKA_HEAP_OPTS": "-Xmx1G",
    }.items():
        clean_env.setenv(name, value)
    clean_env.setenv("KAFKA_BOOTSTRAP_SERVERS", "broker:9092")
    clean_env.setenv("KAFKA_SASL_OAUTHBEARER_CLIENT_ID", "ingest")
    clean_env.setenv("KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    clean_env.setenv("KAFKA_LOG_LEVEL", "3")  # librdkafka's one property with an underscore

    with caplog.at_level(logging.WARNING, logger="opsflow.settings"):
        config = KafkaSettings().client_config()
        assert KafkaSettings().client_config() == config
    assert config == {
        "bootstrap.servers": "broker:9092",
        "sasl.oauthbearer.client.id": "ingest",
        "security.protocol": "SASL_SSL",
        "log_level": "3",
    }
    (warning,) = [r.getMessage() for r in caplog.records]  # once per process
    assert "KAFKA_PORT_9092_TCP_ADDR" in warning and "KAFKA_HOME" in warning
    assert "\n" not in warning

    clean_env.setenv("KAFKA_SECURITY_PROTOKOL", "SSL")
    clean_env.setenv("KAFKA_SASL_PASWORD", "secret")
    with pytest.raises(ConfigurationError) as refused:
        KafkaSettings().client_config()
    message = str(refused.value)
    assert message.startswith("KAFKA_SASL_PASWORD, KAFKA_SECURITY_PROTOKOL: ")
    assert "(sasl.pasword, security.protokol)" in message and "\n" not in message
    assert "secret" not in message


def test_every_documented_setup_makes_clients_librdkafka_accepts(
    clean_env: pytest.MonkeyPatch, pki: Pki
) -> None:
    """Each README example, its TLS files made by a private CA here: a producer, a
    consumer and an admin client are built from what opsflow makes of the variables
    (librdkafka checks every property and value, and loads the CA, the certificate
    and the key as it builds a client), and the registry's client takes its part."""
    setups = documented_setups()
    assert {"Confluent Cloud", "Redpanda Cloud", "Self-managed"} <= {
        title.split(":")[0].split(" with")[0] for title in setups
    }, list(setups)
    files = {"CA": pki.ca, "CERTIFICATE": pki.client_cert, "KEY": pki.client_key}
    idp = IdentityProvider("<client-id>", "<client-secret>")
    try:
        for title, variables in setups.items():
            for name in list(variables):
                clean_env.delenv(name, raising=False)
            for name, value in variables.items():
                if name.endswith("_LOCATION"):
                    value = str(files[name.split("_SSL_")[1].removesuffix("_LOCATION")])
                elif name.endswith("TOKEN_ENDPOINT_URL"):
                    value = idp.url
                elif name == "KAFKA_BOOTSTRAP_SERVERS":
                    value = f"127.0.0.1:{free_port()}"
                clean_env.setenv(name, value)
            config = {**KafkaSettings().client_config(), "log_level": 0}
            documented = {n for n in variables if n.startswith("KAFKA_")}
            assert len(config) == len(documented) + 1, (title, config)
            assert config["security.protocol"] == variables["KAFKA_SECURITY_PROTOCOL"]
            Producer(for_producer(config)).flush(0)
            Consumer({**for_consumer(config), "group.id": "secured"}).close()
            AdminClient(config)
            SchemaRegistryClient(RegistrySettings().client_config())
            clean_env.delenv("SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO", raising=False)
            for name in variables:
                clean_env.delenv(name, raising=False)
    finally:
        idp.close()

    # A CA that is not where the variable says is librdkafka's error at start.
    clean_env.setenv("KAFKA_SECURITY_PROTOCOL", "SSL")
    clean_env.setenv("KAFKA_SSL_CA_LOCATION", str(pki.ca.with_name("missing.pem")))
    with pytest.raises(KafkaException, match=r"ssl\.ca\.location"):
        AdminClient({**KafkaSettings().client_config(), "bootstrap.servers": "127.0.0.1:9"})


def test_librdkafka_fetches_its_oidc_token_itself_from_the_pass_through_variables(
    clean_env: pytest.MonkeyPatch,
) -> None:
    """OAUTHBEARER with ``sasl.oauthbearer.method=oidc``: no Python callback; the
    client asks the identity provider with the configured id, secret and scope as it
    starts, and takes the token (its log says so)."""
    secret = secrets.token_urlsafe(12)
    idp = IdentityProvider("policy-check", secret)
    for name, value in {
        "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "KAFKA_SASL_MECHANISM": "OAUTHBEARER",
        "KAFKA_SASL_OAUTHBEARER_METHOD": "oidc",
        "KAFKA_SASL_OAUTHBEARER_CLIENT_ID": "policy-check",
        "KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET": secret,
        "KAFKA_SASL_OAUTHBEARER_SCOPE": "kafka.produce",
        "KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL": idp.url,
        "KAFKA_DEBUG": "security",
    }.items():
        clean_env.setenv(name, value)
    token_set = threading.Event()

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "after setting OAUTHBEARER token" in record.getMessage():
                token_set.set()

    watcher = logging.getLogger("tests.oidc")
    watcher.propagate = False
    watcher.setLevel(logging.DEBUG)
    watcher.addHandler(Watch())
    config = {**KafkaSettings().client_config(), "bootstrap.servers": f"127.0.0.1:{free_port()}"}
    producer = Producer({**for_producer(config), "logger": watcher})
    try:
        assert idp.asked.wait(10), "librdkafka did not ask the identity provider"
        deadline = time.monotonic() + 10
        while not token_set.is_set() and time.monotonic() < deadline:
            producer.poll(0.1)  # the logger is called from poll
        assert token_set.is_set(), "librdkafka did not take the token"
    finally:
        idp.close()
    authorization, form = idp.requests[0]
    assert authorization == "Basic " + base64.b64encode(f"policy-check:{secret}".encode()).decode()
    assert form == {"grant_type": ["client_credentials"], "scope": ["kafka.produce"]}


# --- the schema registry over TLS --------------------------------------------------------


def test_registry_clients_reach_a_tls_registry_through_a_private_ca_with_basic_auth(
    clean_env: pytest.MonkeyPatch, pki: Pki, secured: SecuredRegistry
) -> None:
    clean_env.setenv("SCHEMA_REGISTRY_URL", secured.url)
    clean_env.setenv("SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO", secured.user_info)
    event = next(iter(catalogue().values()))

    # Without the CA: the probe and a service's codec each say which variable to set.
    healthy, why = registry_healthy(secured.url)
    assert not healthy and "SCHEMA_REGISTRY_SSL_CA_LOCATION" in why and "\n" not in why
    # (The client retries a failed connection with backoff, seconds; not here.)
    no_retries = {**RegistrySettings().client_config(), "max.retries": 0}
    codec = WireCodec(SchemaRegistryClient(no_retries))
    with pytest.raises(RetryableError, match="set SCHEMA_REGISTRY_SSL_CA_LOCATION"):
        codec.decode(b"\x00\x00\x00\x00\x01")

    clean_env.setenv("SCHEMA_REGISTRY_SSL_CA_LOCATION", str(pki.ca))
    healthy, why = registry_healthy(secured.url)
    assert healthy, why
    client = SchemaRegistryClient(RegistrySettings().client_config())
    assert event.subject in client.get_subjects()

    # A wrong password: refused, naming the variable; retried, not dead-lettered.
    user = secured.user_info.split(":")[0]
    clean_env.setenv("SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO", f"{user}:wrong")
    healthy, why = registry_healthy(secured.url)
    assert not healthy and why.startswith("401")
    codec = WireCodec(SchemaRegistryClient(RegistrySettings().client_config()))
    with pytest.raises(RetryableError, match="check SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO"):
        codec.decode(b"\x00\x00\x00\x00\x01")


def test_registry_clients_send_a_static_or_an_oauth_fetched_bearer_token(
    clean_env: pytest.MonkeyPatch, pki: Pki, secured: SecuredRegistry
) -> None:
    clean_env.setenv("SCHEMA_REGISTRY_URL", secured.url)
    clean_env.setenv("SCHEMA_REGISTRY_SSL_CA_LOCATION", str(pki.ca))
    event = next(iter(catalogue().values()))

    clean_env.setenv("SCHEMA_REGISTRY_BEARER_AUTH_CREDENTIALS_SOURCE", "STATIC_TOKEN")
    clean_env.setenv("SCHEMA_REGISTRY_BEARER_AUTH_TOKEN", secured.static_token)
    assert event.subject in SchemaRegistryClient(RegistrySettings().client_config()).get_subjects()
    assert registry_healthy(secured.url)[0]
    clean_env.setenv("SCHEMA_REGISTRY_BEARER_AUTH_TOKEN", "not-the-token")
    codec = WireCodec(SchemaRegistryClient(RegistrySettings().client_config()))
    with pytest.raises(RetryableError, match="check SCHEMA_REGISTRY_BEARER_AUTH_TOKEN"):
        codec.decode(b"\x00\x00\x00\x00\x01")

    # The client fetches the token with the HTTP library's defaults, not with
    # SCHEMA_REGISTRY_SSL_CA_LOCATION: an identity provider with a private CA needs it
    # in SSL_CERT_FILE (as the README says).
    clean_env.setenv("SSL_CERT_FILE", str(pki.ca))
    clean_env.delenv("SCHEMA_REGISTRY_BEARER_AUTH_TOKEN")
    clean_env.setenv("SCHEMA_REGISTRY_BEARER_AUTH_CREDENTIALS_SOURCE", "OAUTHBEARER")
    clean_env.setenv("SCHEMA_REGISTRY_BEARER_AUTH_ISSUER_ENDPOINT_URL", secured.token_url)
    clean_env.setenv("SCHEMA_REGISTRY_BEARER_AUTH_CLIENT_ID", secured.client_id)
    clean_env.setenv("SCHEMA_REGISTRY_BEARER_AUTH_CLIENT_SECRET", secured.client_secret)
    before = secured.tokens_issued
    client = SchemaRegistryClient(RegistrySettings().client_config())
    assert event.subject in client.get_subjects()
    assert event.subject in client.get_subjects()
    assert secured.tokens_issued == before + 1, "one token, reused until it expires"

    # Half a configuration is one line naming what is missing, before any request.
    clean_env.delenv("SCHEMA_REGISTRY_BEARER_AUTH_CLIENT_SECRET")
    with pytest.raises(ConfigurationError, match=r"^SCHEMA_REGISTRY_BEARER_AUTH_CLIENT_SECRET: "):
        RegistrySettings().client_config()
    clean_env.delenv("SCHEMA_REGISTRY_BEARER_AUTH_CREDENTIALS_SOURCE")
    with pytest.raises(ConfigurationError, match="CREDENTIALS_SOURCE is not"):
        RegistrySettings().client_config()


def test_registry_clients_present_the_configured_client_certificate(
    clean_env: pytest.MonkeyPatch, pki: Pki, secured: SecuredRegistry
) -> None:
    clean_env.setenv("SCHEMA_REGISTRY_URL", secured.url)
    clean_env.setenv("SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO", secured.user_info)
    clean_env.setenv("SCHEMA_REGISTRY_SSL_CA_LOCATION", str(pki.ca))
    clean_env.setenv("SCHEMA_REGISTRY_SSL_CERTIFICATE_LOCATION", str(pki.client_cert))
    clean_env.setenv("SCHEMA_REGISTRY_SSL_KEY_LOCATION", str(pki.client_key))
    secured.client_names.clear()
    SchemaRegistryClient(RegistrySettings().client_config()).get_subjects()
    assert secured.client_names == [pki.client_name]

    clean_env.setenv("SCHEMA_REGISTRY_SSL_KEY_LOCATION", str(Path(pki.client_key).with_name("x")))
    with pytest.raises(ConfigurationError, match=r"^SCHEMA_REGISTRY_SSL_KEY_LOCATION: .* exist"):
        RegistrySettings().client_config()


# --- opsflow acls ------------------------------------------------------------------------


def test_acls_name_each_program_as_its_cluster_authenticates_it() -> None:
    programs = {p.name for p in application.programs if not p.stand_in}
    default = {rule.principal for rule in acls_for(application)}
    assert default == {f"User:{name}" for name in programs | {"projector", "provision",
                                                              "operator"}}  # fmt: skip

    certificates = acls_for(application, principal_format="User:CN={program}.opsflow.internal")
    assert "User:CN=ingest.opsflow.internal" in {rule.principal for rule in certificates}
    cloud = acls_for(
        application,
        principal_format="User:opsflow-{program}",
        principals={"ingest": "User:sa-abc123", "operator": "User:sa-ops"},
    )
    by_principal = {rule.principal for rule in cloud}
    assert {"User:sa-abc123", "User:sa-ops", "User:opsflow-projector"} <= by_principal
    assert "User:ingest" not in by_principal and "User:opsflow-ingest" not in by_principal
    # The same rules, only the principals renamed.
    assert len(cloud) == len(acls_for(application))

    for principal_format in ("{program}", "User:ingest"):
        with pytest.raises(ConfigurationError, match=r"^--principal-format: "):
            acls_for(application, principal_format=principal_format)
    with pytest.raises(ConfigurationError, match=r"^--principal: no program called ingst"):
        acls_for(application, principals={"ingst": "User:sa-1"})
