"""Configuration: one pydantic-settings class per component, read from the environment.

Each component of the stack has a production counterpart chosen by one
variable: ``KAFKA_BOOTSTRAP_SERVERS``, ``DATABASE_URL``, ``SCHEMA_REGISTRY_URL``.
When a variable is unset, ``opsflow up`` starts the embedded counterpart and
exports the variable to everything it supervises.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from opsflow.errors import ConfigurationError

_KAFKA_PREFIX = "KAFKA_"

# KAFKA_* variables other programs put in the environment, never librdkafka's:
# Kubernetes' service links of a Service named ``kafka`` or ``kafka-<anything>``
# (KAFKA_PORT, KAFKA_SERVICE_HOST, KAFKA_PORT_9092_TCP_ADDR, ...: set in every pod
# of the namespace unless ``enableServiceLinks: false``), and the variables Apache
# Kafka's shell scripts read (where an operator runs ``kafka-acls.sh``).
_SERVICE_LINK = re.compile(
    r"KAFKA(_[A-Z0-9_]+?)?_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?"
    r"|PORT(_\d+_(TCP|UDP|SCTP)(_PROTO|_PORT|_ADDR)?)?)"
)
_KAFKA_SCRIPTS = frozenset(
    {
        "KAFKA_HOME", "KAFKA_OPTS", "KAFKA_HEAP_OPTS", "KAFKA_JVM_PERFORMANCE_OPTS",
        "KAFKA_GC_LOG_OPTS", "KAFKA_JMX_OPTS", "KAFKA_LOG4J_OPTS",
        # The admin client's properties file in the commands `opsflow acls` prints.
        "KAFKA_ADMIN_CONFIG",
    }
)  # fmt: skip
# Configuration keys confluent-kafka takes for itself (Python objects, not strings).
_PYTHON_KEYS = frozenset({"logger", "error_cb", "throttle_cb", "stats_cb", "oauth_cb"})
# A name librdkafka has no property for: set after the probed one, it fails the
# probe whenever the probed name was accepted.
_NO_SUCH_PROPERTY = "opsflow.no.such.property"
_warned: set[str] = set()
log = logging.getLogger(__name__)


@functools.cache
def is_librdkafka_property(name: str) -> bool:
    """Whether the installed librdkafka has a configuration property ``name``.

    Asked of librdkafka itself rather than of a copied list, so it follows the
    installed version: setting a property it does not have fails with "No such
    configuration property" before any client exists. The probe sets ``name``
    (to an empty value, so no plugin is loaded and no file read), then a name no
    version has, whose failure proves ``name`` was accepted; about 5 µs.
    """
    from confluent_kafka import KafkaException, Producer

    if name in _PYTHON_KEYS:
        return False
    try:
        Producer({name: "", _NO_SUCH_PROPERTY: ""})
    except KafkaException as err:
        return bool(err.args[0].str() != f'No such configuration property: "{name}"')
    except (TypeError, ValueError):
        return False
    return True  # not reached: the second property always fails


class KafkaSettings(BaseSettings):
    """Where the Kafka cluster is and how to talk to it.

    Every other ``KAFKA_<NAME>`` variable is passed to librdkafka as the
    property ``<name>`` with underscores turned into dots, e.g.
    ``KAFKA_SECURITY_PROTOCOL=SASL_SSL`` becomes ``security.protocol`` and
    ``KAFKA_SASL_OAUTHBEARER_CLIENT_ID`` ``sasl.oauthbearer.client.id`` (a
    property whose name keeps an underscore, ``log_level``, is found too).
    Only librdkafka's own properties are passed (see ``client_config``).
    """

    model_config = SettingsConfigDict(env_prefix="KAFKA_", extra="ignore")

    bootstrap_servers: str | None = None

    def client_config(self) -> dict[str, str | int | float | bool]:
        """The librdkafka configuration shared by producers, consumers and admin clients.

        A ``KAFKA_*`` variable that is no librdkafka property is ignored, with one
        warning line naming it, when another program is known to set it (Kubernetes'
        service links of a Service called ``kafka``, Apache Kafka's scripts): a pod
        must not stop because a Service has the cluster's name. Any other one is
        refused: it is most likely a misspelt property, and dropping it silently
        could mean a client that connects without the security it was meant to have.

        Raises:
            ConfigurationError: naming every ``KAFKA_*`` variable that is neither a
                librdkafka property nor one another program sets.
        """
        config: dict[str, str | int | float | bool] = {}
        ignored: list[str] = []
        unknown: list[str] = []
        for key, value in sorted(os.environ.items()):
            if not key.startswith(_KAFKA_PREFIX) or key == "KAFKA_BOOTSTRAP_SERVERS":
                continue
            name = key[len(_KAFKA_PREFIX) :].lower()
            if is_librdkafka_property(name.replace("_", ".")):
                config[name.replace("_", ".")] = value
            elif is_librdkafka_property(name):
                config[name] = value
            elif _SERVICE_LINK.fullmatch(key) or key in _KAFKA_SCRIPTS:
                ignored.append(key)
            else:
                unknown.append(key)
        if unknown:
            properties = [key[len(_KAFKA_PREFIX) :].lower().replace("_", ".") for key in unknown]
            raise ConfigurationError(
                ", ".join(unknown),
                f"librdkafka has no such configuration property ({', '.join(properties)})",
                "Correct the name (a KAFKA_ variable is a property of librdkafka's "
                "CONFIGURATION.md in capitals, dots as underscores: sasl.mechanism is "
                "KAFKA_SASL_MECHANISM) or unset it",
            )
        if ignored and not _warned.issuperset(ignored):
            _warned.update(ignored)
            log.warning(
                "ignoring %s: not librdkafka properties (Kubernetes service links or "
                "Apache Kafka's scripts' variables)",
                ", ".join(ignored),
            )
        if self.bootstrap_servers:
            config["bootstrap.servers"] = self.bootstrap_servers
        return config


# librdkafka properties only one kind of client takes (its CONFIGURATION.md, "C/P"
# column): given the other kind, librdkafka logs a CONFWARN line at every start.
# The KAFKA_* settings are shared by every client, so each takes its own (see
# ``for_consumer`` and ``for_producer``).
_CONSUMER_ONLY = frozenset(
    {
        "group.id", "group.instance.id", "group.protocol", "group.remote.assignor",
        "partition.assignment.strategy", "session.timeout.ms", "heartbeat.interval.ms",
        "coordinator.query.interval.ms", "max.poll.interval.ms", "enable.auto.commit",
        "auto.commit.interval.ms", "enable.auto.offset.store", "queued.min.messages",
        "queued.max.messages.kbytes", "fetch.wait.max.ms", "fetch.queue.backoff.ms",
        "fetch.message.max.bytes", "max.partition.fetch.bytes", "fetch.max.bytes",
        "fetch.min.bytes", "fetch.error.backoff.ms", "isolation.level",
        "enable.partition.eof", "check.crcs", "auto.offset.reset",
        "consume.callback.max.messages",
    }
)  # fmt: skip
_PRODUCER_ONLY = frozenset(
    {
        "transactional.id", "transaction.timeout.ms", "enable.idempotence",
        "enable.gapless.guarantee", "queue.buffering.max.messages",
        "queue.buffering.max.kbytes", "queue.buffering.max.ms", "linger.ms",
        "message.send.max.retries", "retries", "queue.buffering.backpressure.threshold",
        "compression.codec", "compression.type", "compression.level", "batch.num.messages",
        "batch.size", "delivery.report.only.error", "sticky.partitioning.linger.ms",
        "request.required.acks", "acks", "request.timeout.ms", "message.timeout.ms",
        "delivery.timeout.ms", "partitioner",
    }
)  # fmt: skip


def for_consumer(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` without the properties only producers take."""
    return {k: v for k, v in config.items() if k not in _PRODUCER_ONLY}


def for_producer(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` without the properties only consumers take."""
    return {k: v for k, v in config.items() if k not in _CONSUMER_ONLY}


class DatabaseSettings(BaseSettings):
    """The PostgreSQL server holding read models, the registry's schemas and API keys."""

    model_config = SettingsConfigDict(extra="ignore")

    database_url: str | None = None


class RegistrySettings(BaseSettings):
    """The Confluent-compatible schema registry, as its clients reach it.

    Every ``SchemaRegistryClient`` opsflow makes is configured by ``client_config``,
    from these variables (Confluent's client properties, prefixed and in capitals):

    - ``SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO`` (``USER:PASSWORD``): HTTP basic
      authentication, ``basic.auth.user.info``; kept apart from the URL because URLs
      end up in messages and logs (credentials in the URL, ``http://user:pass@host``,
      still work as confluent-kafka reads them).
    - ``SCHEMA_REGISTRY_BEARER_AUTH_CREDENTIALS_SOURCE``: ``STATIC_TOKEN`` sends
      ``SCHEMA_REGISTRY_BEARER_AUTH_TOKEN`` as a bearer token; ``OAUTHBEARER``
      fetches one from ``..._ISSUER_ENDPOINT_URL`` with ``..._CLIENT_ID``,
      ``..._CLIENT_SECRET`` and ``..._SCOPE`` (OAuth client credentials) and renews
      it before it expires. ``..._LOGICAL_CLUSTER`` and ``..._IDENTITY_POOL_ID``
      are Confluent Cloud's (its registry's ``lsrc-`` id, its identity pool).
    - ``SCHEMA_REGISTRY_SSL_CA_LOCATION``: the CA file (or directory) that signed
      the registry's certificate, when it is not a public one; with
      ``SCHEMA_REGISTRY_SSL_CERTIFICATE_LOCATION``, ``..._SSL_KEY_LOCATION`` and
      ``..._SSL_KEY_PASSWORD`` the client authenticates with a certificate (mTLS).
    """

    model_config = SettingsConfigDict(extra="ignore")

    schema_registry_url: str | None = None
    # Empty: the registry is used without authentication.
    schema_registry_basic_auth_user_info: SecretStr = SecretStr("")
    # Empty: no bearer token is sent.
    schema_registry_bearer_auth_credentials_source: str = ""
    schema_registry_bearer_auth_token: SecretStr = SecretStr("")
    schema_registry_bearer_auth_logical_cluster: str = ""
    schema_registry_bearer_auth_identity_pool_id: str = ""
    schema_registry_bearer_auth_issuer_endpoint_url: str = ""
    schema_registry_bearer_auth_client_id: str = ""
    schema_registry_bearer_auth_client_secret: SecretStr = SecretStr("")
    schema_registry_bearer_auth_scope: str = ""
    # Empty: the registry's certificate is checked against the public CAs (certifi).
    schema_registry_ssl_ca_location: str = ""
    schema_registry_ssl_certificate_location: str = ""
    schema_registry_ssl_key_location: str = ""
    schema_registry_ssl_key_password: SecretStr = SecretStr("")
    # Whether a process registers an event type's latest schema on first use (see
    # ``opsflow.contracts.wire.WireCodec``). Off in production: only provisioning
    # writes to the registry, and the services need no write rights on it.
    schema_registry_auto_register: bool = True

    def client_config(self, url: str | None = None) -> dict[str, str]:
        """The configuration of a ``SchemaRegistryClient``: the registry at ``url``
        (``SCHEMA_REGISTRY_URL`` if omitted), with the credentials and TLS files set.

        Raises:
            ConfigurationError: no URL; credentials that are not ``USER:PASSWORD``, or
                given both here and in the URL (the client refuses two); basic and
                bearer authentication both; a bearer source without what it needs; a
                TLS file that does not exist, or a key without its certificate.
        """
        url = url or self.schema_registry_url
        if not url:
            raise ConfigurationError(
                "SCHEMA_REGISTRY_URL",
                "not set",
                "Set it to the registry's http://host:port, or run under `opsflow up`",
            )
        config = {"url": url}
        credentials = self.credentials()
        if credentials is not None:
            if urlsplit(url).username is not None:
                raise ConfigurationError(
                    "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO",
                    "is set, and SCHEMA_REGISTRY_URL carries credentials too",
                    "Remove the user and password from SCHEMA_REGISTRY_URL",
                )
            config["basic.auth.user.info"] = ":".join(credentials)
        bearer = self._bearer()
        if bearer and (credentials is not None or urlsplit(url).username is not None):
            raise ConfigurationError(
                "SCHEMA_REGISTRY_BEARER_AUTH_CREDENTIALS_SOURCE",
                "is set, and basic credentials too (both would be the Authorization header)",
                "Unset SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO (and credentials in the URL), "
                "or the bearer variables",
            )
        return {**config, **bearer, **self._tls()}

    def _bearer(self) -> dict[str, str]:
        """``bearer.auth.*`` properties, or none when no bearer token is configured."""
        prefix = "SCHEMA_REGISTRY_BEARER_AUTH_"
        values = {
            "token": self.schema_registry_bearer_auth_token.get_secret_value(),
            "logical.cluster": self.schema_registry_bearer_auth_logical_cluster,
            "identity.pool.id": self.schema_registry_bearer_auth_identity_pool_id,
            "issuer.endpoint.url": self.schema_registry_bearer_auth_issuer_endpoint_url,
            "client.id": self.schema_registry_bearer_auth_client_id,
            "client.secret": self.schema_registry_bearer_auth_client_secret.get_secret_value(),
            "scope": self.schema_registry_bearer_auth_scope,
        }
        source = self.schema_registry_bearer_auth_credentials_source.strip().upper()
        if not source:
            for name, value in values.items():
                if value:
                    variable = prefix + name.upper().replace(".", "_")
                    raise ConfigurationError(
                        variable,
                        "is set, but SCHEMA_REGISTRY_BEARER_AUTH_CREDENTIALS_SOURCE is not",
                        "Set that to STATIC_TOKEN or OAUTHBEARER, or unset this one",
                    )
            return {}
        needed = {"STATIC_TOKEN": ("token",),
                  "OAUTHBEARER": ("issuer.endpoint.url", "client.id", "client.secret")}  # fmt: skip
        if source not in needed:
            raise ConfigurationError(
                prefix + "CREDENTIALS_SOURCE",
                f"is {source!r}",
                "Set it to STATIC_TOKEN (a token of your own) or OAUTHBEARER (fetched from "
                "an OAuth issuer with a client id and secret), or unset it",
            )
        for name in needed[source]:
            if not values[name]:
                raise ConfigurationError(
                    prefix + name.upper().replace(".", "_"),
                    f"not set, and {source} bearer authentication needs it",
                    "Set it, or choose another SCHEMA_REGISTRY_BEARER_AUTH_CREDENTIALS_SOURCE",
                )
        wanted = {
            "STATIC_TOKEN": ("token", "logical.cluster", "identity.pool.id"),
            "OAUTHBEARER": ("issuer.endpoint.url", "client.id", "client.secret", "scope",
                            "logical.cluster", "identity.pool.id"),
        }[source]  # fmt: skip
        # The client requires a logical cluster (Confluent Cloud's routing header) and
        # a scope; other registries ignore an empty one.
        config = {"bearer.auth.credentials.source": source}
        for name in wanted:
            if values[name] or name in ("logical.cluster", "scope"):
                config[f"bearer.auth.{name}"] = values[name]
        return config

    def _tls(self) -> dict[str, str]:
        """``ssl.*`` properties of the files that exist; a missing file is refused here,
        at start, rather than as an error about some other file on the first request."""
        files = {
            "ssl.ca.location": ("SCHEMA_REGISTRY_SSL_CA_LOCATION",
                                self.schema_registry_ssl_ca_location),
            "ssl.certificate.location": ("SCHEMA_REGISTRY_SSL_CERTIFICATE_LOCATION",
                                         self.schema_registry_ssl_certificate_location),
            "ssl.key.location": ("SCHEMA_REGISTRY_SSL_KEY_LOCATION",
                                 self.schema_registry_ssl_key_location),
        }  # fmt: skip
        config: dict[str, str] = {}
        for name, (variable, value) in files.items():
            if value:
                if not Path(value).exists():
                    raise ConfigurationError(
                        variable, f"{value} does not exist", "Point it at a PEM file, or unset it"
                    )
                config[name] = value
        password = self.schema_registry_ssl_key_password.get_secret_value()
        if password:
            config["ssl.key.password"] = password
        if "ssl.certificate.location" not in config and ("ssl.key.location" in config or password):
            raise ConfigurationError(
                "SCHEMA_REGISTRY_SSL_CERTIFICATE_LOCATION",
                "not set, and a client key is",
                "Set it to the client certificate that goes with the key, or unset the key",
            )
        return config

    def describe_failure(self, err: BaseException) -> str:
        """One line on a request to the registry that failed before any answer, naming
        the variable to check when it is about TLS (the registry's certificate, or the
        client's) rather than about the network."""
        chain: list[BaseException] = []
        cause: BaseException | None = err
        while cause is not None and cause not in chain:
            chain.append(cause)
            cause = cause.__cause__ or cause.__context__
        if any(isinstance(e, ssl.SSLCertVerificationError) for e in chain):
            return (
                f"the registry's certificate is not trusted ({err}); set "
                "SCHEMA_REGISTRY_SSL_CA_LOCATION to the CA that signed it"
            )
        if any(isinstance(e, ssl.SSLError) for e in chain):
            return (
                f"TLS with the registry failed ({err}); check SCHEMA_REGISTRY_URL (https?) "
                "and SCHEMA_REGISTRY_SSL_* (a client certificate it expects?)"
            )
        return f"schema registry unreachable: {err}"

    def auth_variable(self) -> str:
        """The variable that holds the credentials sent, for messages about a refusal."""
        source = self.schema_registry_bearer_auth_credentials_source.strip().upper()
        if source == "STATIC_TOKEN":
            return "SCHEMA_REGISTRY_BEARER_AUTH_TOKEN"
        if source:
            return "SCHEMA_REGISTRY_BEARER_AUTH_CLIENT_ID/_CLIENT_SECRET"
        return "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO"

    def credentials(self) -> tuple[str, str] | None:
        """The user and password to send, or None when the registry is used without.

        Raises:
            ConfigurationError: the variable is not ``USER:PASSWORD``.
        """
        user_info = self.schema_registry_basic_auth_user_info.get_secret_value()
        if not user_info:
            return None
        user, colon, password = user_info.partition(":")
        if not (user and colon):
            raise ConfigurationError(
                "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO",
                "is not USER:PASSWORD",
                "Set it to the registry's user and password, separated by a colon",
            )
        return user, password


class RegistryServerSettings(BaseSettings):
    """opsflow's own registry service (``python -m opsflow.registry``).

    Attributes:
        host / port: where it listens (loopback, and Confluent's port, by default).
        basic_auth_user_info: ``USER:PASSWORD``; when set, every request but the
            root's liveness probe must carry these as HTTP basic credentials
            (401 with a ``Basic`` challenge otherwise), as Confluent's registry
            does with ``authentication.method=BASIC``. Clients send them from
            ``SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO``. Unset or empty: no
            authentication (the embedded stack's loopback registry).
        max_body_bytes: the largest request body (413 above); the reference
            application's largest schema is under 7 KB.
    """

    model_config = SettingsConfigDict(env_prefix="OPSFLOW_REGISTRY_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8081, ge=1, le=65535)
    basic_auth_user_info: SecretStr = SecretStr("")
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)

    def credentials(self) -> tuple[str, str] | None:
        """The user and password clients must send, or None for no authentication.

        Raises:
            ConfigurationError: the variable is not ``USER:PASSWORD`` in printable ASCII
                (HTTP basic credentials are decoded as ASCII); its value is not shown.
        """
        user_info = self.basic_auth_user_info.get_secret_value()
        if not user_info:
            return None
        user, colon, password = user_info.partition(":")
        if not (user and colon and password and user_info.isascii() and user_info.isprintable()):
            raise ConfigurationError(
                "OPSFLOW_REGISTRY_BASIC_AUTH_USER_INFO",
                "is not USER:PASSWORD (both non-empty, printable ASCII)",
                "Set it to the user and password clients must send, or unset it",
            )
        return user, password


class StackSettings(BaseSettings):
    """The embedded local stack started by ``opsflow up``."""

    model_config = SettingsConfigDict(env_prefix="OPSFLOW_", extra="ignore")

    data_dir: Path = Path(".opsflow")
    # "durable" keeps topics across restarts (S3 storage on local files);
    # "memory" is faster and is meant for throwaway test clusters only.
    broker_storage: Literal["durable", "memory"] = "durable"
    broker_port: int | None = None
    registry_port: int | None = None
    postgres_port: int | None = None
    supervisor_port: int | None = None
    # Run the application's programs too (its services, APIs and stand-ins); false
    # for an infrastructure-only stack (tests, benchmarks).
    services: bool = True


class TopicSettings(BaseSettings):
    """How topics of record are created."""

    model_config = SettingsConfigDict(env_prefix="OPSFLOW_TOPIC_", extra="ignore")

    partitions: int = Field(default=6, ge=1)
    # Prepended to every topic name, so several environments (or test runs)
    # can share one cluster without seeing each other's records.
    prefix: str = ""


class RuntimeSettings(BaseSettings):
    """How a service process runs."""

    model_config = SettingsConfigDict(env_prefix="OPSFLOW_", extra="ignore")

    # /metrics, /healthz and /readyz; 0 takes a free port (logged at start). Loopback
    # unless configured (0.0.0.0 in a container, for a scraper outside it).
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=0, ge=0, le=65535)
    # "transactions" (Kafka transactions) or "log-scan" (see opsflow.runtime.Delivery);
    # `opsflow up` sets log-scan for its durable embedded broker.
    delivery: Literal["transactions", "log-scan"] = "transactions"
