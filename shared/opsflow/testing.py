"""``opsflow.testing``: a pytest plugin for testing an opsflow application on real parts.

Installed with opsflow (the ``pytest11`` entry point), so a team's tests just
ask for its fixtures:

    def test_a_request_is_answered(opsflow_env):
        with opsflow_env.running(service):
            opsflow_env.publish(body_model(Requested)(request_id="r-1", name="Ada"))
            [answer] = opsflow_env.wait_for(Greeted)
        assert answer.greeting == "Hello, Ada!"

- ``opsflow_cluster`` (one per test session): the broker, PostgreSQL and
  schema registry the tests use. With ``KAFKA_BOOTSTRAP_SERVERS``,
  ``SCHEMA_REGISTRY_URL`` and ``DATABASE_URL`` set, those; otherwise an
  embedded stack (``opsflow up`` with the memory-store broker, which starts in
  about a second), stopped when the session ends. Nothing is faked.
- ``opsflow_env`` (one per test): the application provisioned afresh under a
  topic prefix and a PostgreSQL schema of the test's own (its migrations, its
  topics and dead-letter topics, its schemas registered), with the
  environment pointing at them, so tests never see each other's records or
  rows. ``running(service)`` runs a service's worker in this process against
  the real broker (the runtime's codec, envelopes, lineage and Kafka
  transactions, as in production) until the block ends; ``publish`` sends an
  event or an event body with the producer SDK; ``wait_for`` reads the
  committed events of a type from its topic until enough have arrived;
  ``command`` runs an ``opsflow`` command (the application's own too) against them.
- ``command(*args, env=...)``: any ``opsflow`` command run in the test process,
  its output and exit code returned as a subprocess would give them, without
  the second or so a new interpreter spends importing opsflow.

The application is the one every ``opsflow`` command finds (``OPSFLOW_APP`` or
the installed entry points).
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import psycopg
import pytest

from opsflow.contracts import Event
from opsflow.settings import RegistrySettings

E = TypeVar("E", bound=Event)

_CLUSTER_VARIABLES = ("KAFKA_BOOTSTRAP_SERVERS", "SCHEMA_REGISTRY_URL", "DATABASE_URL")


@dataclass(frozen=True)
class Cluster:
    """Where the tests' broker, registry and database are."""

    bootstrap_servers: str
    registry_url: str
    database_url: str


class Program(Protocol):
    """What runs in a thread here: a service's ``Worker``, the ``Projector``."""

    @property
    def health(self) -> Any: ...  # ``.joined`` once it has joined its consumer group

    def run(self) -> None: ...

    def stop(self) -> None: ...


P = TypeVar("P", bound=Program)


@dataclass
class InThread(Generic[P]):
    """A program (a service's ``Worker``, the ``Projector``) running in a thread of the
    test process against the real broker, until ``stop``; what it raised fails the test
    instead of being lost in the thread."""

    program: P
    thread: threading.Thread
    failed: list[BaseException]

    @classmethod
    def start(cls, program: P, *, name: str) -> InThread[P]:
        failed: list[BaseException] = []

        def run() -> None:
            try:
                program.run()
            except BaseException as err:  # reported to the test, not lost in the thread
                failed.append(err)

        thread = threading.Thread(target=run, name=f"opsflow-test-{name}", daemon=True)
        thread.start()
        return cls(program, thread, failed)

    @property
    def running(self) -> bool:
        return self.thread.is_alive()

    def raise_failure(self) -> None:
        if self.failed:
            raise self.failed[0]

    def wait_joined(self, timeout: float = 60) -> None:
        """Return once the program has joined its consumer group (its partitions are
        assigned), so what a test publishes next is read.

        Raises:
            TimeoutError: it did not join within ``timeout`` seconds (it is stopped).
        """
        deadline = time.monotonic() + timeout
        while not self.program.health.joined:
            self.raise_failure()
            if not self.running:
                raise RuntimeError(f"{self.thread.name} stopped before it joined its group")
            if time.monotonic() > deadline:
                self.program.stop()
                raise TimeoutError(f"{self.thread.name} did not join its group in {timeout:g} s")
            time.sleep(0.02)

    def stop(self, timeout: float = 60) -> None:
        """Stop the program (it commits what it has), wait for its thread, and raise what
        it failed with."""
        self.program.stop()
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise TimeoutError(f"{self.thread.name} did not stop within {timeout:g} s")
        self.raise_failure()


@contextmanager
def in_thread(program: P, *, name: str, joined_within: float | None = 60) -> Iterator[P]:
    """``program`` running in a thread of this process until the block ends (see
    ``InThread``); the block starts once it has joined its group, unless
    ``joined_within`` is None (a test that waits for what it did instead)."""
    running = InThread.start(program, name=name)
    try:
        if joined_within is not None:
            running.wait_joined(joined_within)
        yield program
    finally:
        running.stop()


@dataclass
class Env:
    """One test's share of the cluster (see the module docstring)."""

    cluster: Cluster
    prefix: str
    database_url: str
    _producer: Any = field(default=None, repr=False)

    @property
    def kafka(self) -> dict[str, Any]:
        return {"bootstrap.servers": self.cluster.bootstrap_servers}

    def topic(self, name: str) -> str:
        """The Kafka name of topic ``name`` in this test."""
        return f"{self.prefix}{name}"

    def publish(self, event: Any, *, idempotency_key: str | None = None) -> None:
        """Send an ``Event`` (as it is) or an event body (``body_model(...)``, which gets
        its envelope from the producer SDK), and wait for the broker's acknowledgement."""
        from opsflow.producer import Producer

        if self._producer is None:
            self._producer = Producer(
                "tests",
                bootstrap_servers=self.cluster.bootstrap_servers,
                registry_url=self.cluster.registry_url,
                topic_prefix=self.prefix,
            )
        # A body is sent in the name of a producer its event type's declaration allows.
        model = getattr(type(event), "event_model", None)
        on_behalf_of = None if model is None else model.emitted_by.example
        self._producer.send(event, idempotency_key=idempotency_key, on_behalf_of=on_behalf_of)

    @contextmanager
    def running(self, service: Any, *, timeout: float = 60) -> Iterator[None]:
        """Run ``service``'s worker in a thread of this process until the block ends; the
        block starts once it has joined its consumer group."""
        from confluent_kafka.schema_registry import SchemaRegistryClient

        from opsflow.runtime import Worker

        worker = Worker(
            service,
            kafka=self.kafka,
            registry=SchemaRegistryClient(
                RegistrySettings().client_config(self.cluster.registry_url)
            ),
        )
        with in_thread(worker, name=service.name, joined_within=timeout):
            yield

    def wait_for(
        self,
        kind: type[E],
        *,
        count: int = 1,
        where: Callable[[E], bool] = lambda _event: True,
        timeout: float = 30,
    ) -> list[E]:
        """The committed events of type ``kind`` on its topic (that ``where`` accepts), in
        log order, once there are at least ``count``.

        Raises:
            TimeoutError: fewer arrived within ``timeout`` seconds; says how many did.
        """
        from confluent_kafka import Consumer, TopicPartition
        from confluent_kafka.schema_registry import SchemaRegistryClient

        from opsflow.contracts.wire import WireCodec

        codec = WireCodec(
            SchemaRegistryClient(RegistrySettings().client_config(self.cluster.registry_url))
        )
        name = self.topic(kind.topic.value)
        consumer = Consumer(
            {
                **self.kafka,
                "group.id": f"opsflow-test-{uuid.uuid4().hex}",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
                "auto.offset.reset": "earliest",
            }
        )
        found: list[E] = []
        try:
            partitions = consumer.list_topics(name, timeout=10).topics[name].partitions
            consumer.assign([TopicPartition(name, p, 0) for p in partitions])
            deadline = time.monotonic() + timeout
            while len(found) < count:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{len(found)} of {count} {kind.event_type} events on {name} "
                        f"within {timeout:g} s"
                    )
                for msg in consumer.consume(500, 0.1):
                    if msg.error() is not None:
                        continue
                    event = codec.decode(msg.value())
                    if isinstance(event, kind) and where(event):
                        found.append(event)
        finally:
            consumer.close()
        return found

    def command(self, *args: str) -> CommandResult:
        """Run ``opsflow ARGS`` against this test's topics and schema (see ``command``)."""
        return command(*args)

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close()


@dataclass(frozen=True)
class CommandResult:
    """How an ``opsflow`` command run by ``command`` exited and what it printed."""

    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


_one_command = threading.Lock()


def command(*args: str, env: Mapping[str, str] | None = None) -> CommandResult:
    """Run ``opsflow ARGS`` in this process, as the ``opsflow`` command runs it: the
    same parsing, the application's commands, the same one-line errors and exit codes.

    A test of an operator command then costs what the command does, not the start
    of an interpreter that imports opsflow again (about a second each, measured).
    Standard output, standard error and the environment belong to the process, so
    commands run one at a time; a test's services may run in threads meanwhile.

    Args:
        env: variables set for the command on top of this process's; the
            environment is as it was once the command returns.
    """
    from opsflow import cli

    out, err = io.StringIO(), io.StringIO()
    with _one_command:
        saved_environ, saved_argv = dict(os.environ), sys.argv
        os.environ.update(env or {})
        sys.argv = ["opsflow", *args]
        code = 0
        try:
            with redirect_stdout(out), redirect_stderr(err):
                cli.main()
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
        finally:
            sys.argv = saved_argv
            for name in set(os.environ) - set(saved_environ):
                del os.environ[name]
            os.environ.update(saved_environ)
    return CommandResult(args, code, out.getvalue(), err.getvalue())


def _started_cluster(data_dir: Path) -> tuple[Cluster, Callable[[], None]]:
    """An embedded stack in ``data_dir`` (memory-store broker, no programs), and how to
    stop it."""
    import json

    env = {
        **{k: v for k, v in os.environ.items() if k not in _CLUSTER_VARIABLES},
        "OPSFLOW_DATA_DIR": str(data_dir),
        "OPSFLOW_BROKER_STORAGE": "memory",
        "OPSFLOW_SERVICES": "false",
    }
    command = [sys.executable, "-m", "opsflow"]

    def run(*args: str) -> str:
        done = subprocess.run(
            [*command, *args], env=env, capture_output=True, text=True, timeout=300, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"opsflow {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
        return done.stdout

    def stop() -> None:
        run("down")

    run("up", "--detach")
    found = json.loads(run("status", "--json"))["env"]
    cluster = Cluster(
        found["KAFKA_BOOTSTRAP_SERVERS"], found["SCHEMA_REGISTRY_URL"], found["DATABASE_URL"]
    )
    return cluster, stop


@pytest.fixture(scope="session")
def opsflow_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The broker, registry and database of the test session (see the module docstring)."""
    given = [os.environ.get(name) for name in _CLUSTER_VARIABLES]
    if all(given):
        yield Cluster(*given)  # type: ignore[arg-type]
        return
    cluster, stop = _started_cluster(tmp_path_factory.mktemp("opsflow-stack"))
    try:
        yield cluster
    finally:
        stop()


@pytest.fixture
def opsflow_env(opsflow_cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    """The application provisioned for this test alone (see the module docstring)."""
    from opsflow import provision

    schema = f"t_{uuid.uuid4().hex[:12]}"
    base = opsflow_cluster.database_url
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in base else "?"
    env = Env(
        opsflow_cluster,
        prefix=f"t{uuid.uuid4().hex[:8]}.",
        database_url=f"{base}{sep}options=-csearch_path%3D{schema}",
    )
    for name, value in (
        ("KAFKA_BOOTSTRAP_SERVERS", opsflow_cluster.bootstrap_servers),
        ("SCHEMA_REGISTRY_URL", opsflow_cluster.registry_url),
        ("DATABASE_URL", env.database_url),
        ("OPSFLOW_TOPIC_PREFIX", env.prefix),
    ):
        monkeypatch.setenv(name, value)
    provision.provision()
    try:
        yield env
    finally:
        env.close()
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")
