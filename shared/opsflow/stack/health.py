"""Is each part of the stack answering? One real request per component."""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import httpx
import psycopg
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from opsflow.errors import ConfigurationError
from opsflow.settings import KafkaSettings, RegistrySettings

if TYPE_CHECKING:
    from confluent_kafka.schema_registry import SchemaRegistryClient

# A probe expects connection failures; librdkafka would print each one to
# stderr, so its log goes here and the probe reports one summary instead.
_probe_log = logging.getLogger("opsflow.health.kafka")
_probe_log.addHandler(logging.NullHandler())
_probe_log.propagate = False


_client_lock = threading.Lock()


@functools.cache
def _probe_client() -> httpx.Client:
    return httpx.Client(limits=httpx.Limits(max_keepalive_connections=0))


def probe_client() -> httpx.Client:
    """The one HTTP client of this process's probes.

    Building a client loads the CA bundle, ~40 ms each time (measured): ``opsflow
    status`` asks about sixteen URLs side by side and paid that sixteen times over
    (the lock keeps threads from each building their own). No keep-alive, so a
    component restarted since the last probe is met afresh.
    """
    with _client_lock:
        return _probe_client()


def kafka_healthy(bootstrap_servers: str, *, timeout: float = 3.0) -> tuple[bool, str]:
    """Ask the cluster for its metadata; healthy when at least one broker answers."""
    config = {
        **KafkaSettings().client_config(),
        "bootstrap.servers": bootstrap_servers,
        "logger": _probe_log,
    }
    try:
        metadata = AdminClient(config).list_topics(timeout=timeout)  # type: ignore[arg-type]
    except KafkaException as err:
        return False, str(err.args[0].str())
    return True, f"{len(metadata.brokers)} broker(s), {len(metadata.topics)} topic(s)"


def postgres_healthy(url: str, *, timeout: float = 3.0) -> tuple[bool, str]:
    """Connect and run one query."""
    try:
        with psycopg.connect(url, connect_timeout=max(int(timeout), 1)) as conn:
            row = conn.execute("SHOW server_version").fetchone()
    except psycopg.Error as err:
        return False, str(err).strip().splitlines()[0] if str(err).strip() else "unreachable"
    return True, f"PostgreSQL {row[0] if row else '?'}"


def registry_healthy(url: str, *, timeout: float = 3.0) -> tuple[bool, str]:
    """List the subjects, the cheapest call every Confluent-compatible registry has.

    Asked as every client of the registry asks it, from ``RegistrySettings``: with
    credentials or TLS files configured, by a ``SchemaRegistryClient`` (the probe sends
    the same credentials, basic or a bearer token it fetches, and trusts the same CA,
    so a healthy registry here is one the services can use); with none, by the
    probes' HTTP client, the same request without loading the registry client's
    OAuth and TLS stack (0.16 s of CPU, measured, a sixth of ``opsflow status``).
    """
    settings = RegistrySettings()
    try:
        config = settings.client_config(url)
    except ConfigurationError as err:
        return False, str(err)
    if config == {"url": url} and urlsplit(url).username is None:
        return _plain_registry_healthy(url, timeout, settings)
    from confluent_kafka.schema_registry.error import SchemaRegistryError

    try:
        subjects = _registry_client(tuple(sorted(config.items())), timeout).get_subjects()
    except SchemaRegistryError as err:
        return False, f"{err.http_status_code} {err.error_message}"
    except Exception as err:  # the HTTP library's errors, and the token fetch's
        return False, settings.describe_failure(err)
    return True, f"{len(subjects)} subject(s)"


def _plain_registry_healthy(
    url: str, timeout: float, settings: RegistrySettings
) -> tuple[bool, str]:
    """``registry_healthy`` without credentials: ``GET /subjects``, answered as the
    registry client would report it (``401 Unauthorized``...)."""
    try:
        response = probe_client().get(f"{url.rstrip('/')}/subjects", timeout=timeout)
        answer = response.json()
    except httpx.HTTPError as err:
        return False, settings.describe_failure(err)
    except ValueError:
        return False, f"{response.status_code} answered with something that is not JSON"
    if response.status_code != 200 or not isinstance(answer, list):
        message = answer.get("message") if isinstance(answer, dict) else None
        return False, f"{response.status_code} {message or response.reason_phrase}"
    return True, f"{len(answer)} subject(s)"


@functools.lru_cache(maxsize=4)
def _registry_client(config: tuple[tuple[str, str], ...], timeout: float) -> SchemaRegistryClient:
    """One client per configuration: building one loads a CA bundle (~50 ms, measured),
    and `opsflow up` probes every few hundred milliseconds while it waits."""
    from confluent_kafka.schema_registry import SchemaRegistryClient

    return SchemaRegistryClient({**dict(config), "max.retries": 0, "timeout": timeout})


def bucket_healthy(url: str, *, timeout: float = 3.0) -> tuple[bool, str]:
    """The broker's object store answers, and refuses a request not signed with its key.

    The probe holds no key: the store's refusal is its sign of life, and proves
    that it checks signatures.
    """
    try:
        response = probe_client().get(url, timeout=timeout)
    except httpx.HTTPError as err:
        return False, str(err) or type(err).__name__
    if response.status_code != 403 or b"<Code>AccessDenied</Code>" not in response.content:
        return False, f"answered an unsigned request with {response.status_code}"
    return True, "serving signed requests only"


def service_healthy(url: str, *, timeout: float = 3.0) -> tuple[bool, str]:
    """An opsflow service is ready (``/readyz``: joined its group, replayed its table).

    A service that serves but is not ready yet would leave the first requests
    waiting (a runtime service joins its consumer group seconds after it
    serves ``/healthz``): ``opsflow up`` waits for this, not for liveness. A
    program with no ``/readyz`` (the carrier stand-in) is ready when it answers
    ``/healthz``.
    """
    try:
        response = probe_client().get(f"{url.rstrip('/')}/readyz", timeout=timeout)
        if response.status_code == 404:
            response = probe_client().get(f"{url.rstrip('/')}/healthz", timeout=timeout)
    except httpx.HTTPError as err:
        return False, str(err) or type(err).__name__
    if response.status_code != 200:
        return False, f"{response.request.url.path} answered {response.status_code}"
    return True, "serving"


CHECKS: dict[str, Callable[[str], tuple[bool, str]]] = {
    "broker": kafka_healthy,
    "kafka": kafka_healthy,
    "postgres": postgres_healthy,
    "registry": registry_healthy,
    "bucket": bucket_healthy,
}


def check(name: str) -> Callable[[str], tuple[bool, str]]:
    """The health check of a component by name; services answer ``/readyz``."""
    return CHECKS.get(name, service_healthy)
