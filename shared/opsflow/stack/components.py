"""What the embedded stack is made of, and where each part listens.

Each embedded component stands in for a production counterpart selected by one
environment variable; when the variable is set the component is not started
and the variable's value is used as is:

=============  ============================  =========================
component      production counterpart        variable
=============  ============================  =========================
bucket+broker  Apache Kafka, Redpanda, ...   KAFKA_BOOTSTRAP_SERVERS
postgres       any PostgreSQL 14+            DATABASE_URL
registry       Confluent Schema Registry     SCHEMA_REGISTRY_URL
=============  ============================  =========================

On top of them run the application's programs (``opsflow.application``;
unless ``OPSFLOW_SERVICES=false``), the projector (the read models) and the
operator console (``CONSOLE_URL``), each started once provisioning is done. A
program standing in for an external partner (``Program.stand_in``) is not
started when its URL variable is set.

The plan is pure data (names, ports, commands): ``supervisor`` turns it into
a process manager's configuration and ``launch`` runs each command.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from opsflow.application import load_application
from opsflow.errors import ConfigurationError
from opsflow.settings import DatabaseSettings, KafkaSettings, RegistrySettings, StackSettings
from opsflow.stack.credentials import database_url, private_dir, write_private

LOOPBACK = "127.0.0.1"
# The runtime services' fetch wait on the memory broker: end-to-end p99 of the reference demo
# 473 -> 245 ms at 100 instances/s against the runtime's 100 ms (`make bench`).
MEMORY_FETCH_WAIT_MS = 20
# Partitions of each topic `opsflow up` creates on its durable store: a
# 1,000-instance reference demo at 100 instances/s, end-to-end p99 9.3 s with 6
# and 1.2 s with 1 (README, "Known limits of the embedded broker").
DURABLE_PARTITIONS = 1
# How much less of a contended CPU the processes off the workflow's path get
# (the projector, and programs an application marks ``off_path``): a paced
# 1,000-instance reference demo on the durable stack, end-to-end p99 879 / 986
# -> 746 / 605 ms (two runs each), the rest catching up once the burst is over.
OFF_PATH_NICE = 10
# The projector's fetch wait there (the runtime's consumers keep 100 ms).
DURABLE_PROJECTOR_FETCH_WAIT_MS = 500
# ... and how long its readers leave records waiting before fetching more.
DURABLE_PROJECTOR_FETCH_BACKOFF_MS = 500
# The operator console's component, and the variable that tells others where it is.
CONSOLE = "console"
CONSOLE_URL = "CONSOLE_URL"


@dataclass(frozen=True)
class Component:
    """One supervised process of the embedded stack.

    Attributes:
        name: the program name shown by ``opsflow status``.
        port: the loopback port it listens on.
        address: how clients reach it (``host:port`` or a URL).
        priority: start order (lower first); stop order is the reverse.
        waits_for: ports that must accept connections before it starts.
        module: for opsflow's services, what ``python -m`` runs (after provisioning).
        env: for services, their own settings (ports, partner URLs).
        nice: how much lower its CPU priority is (``os.nice``), for what may lag
            behind the workflow when the cores are busy.
        api_key_env: the variable in which it gets an ingest API key of its own.
        service: for a stream service, its ``Service``'s name (its consumer group's).
        consumes: for a stream service, the topics it reads (contract names), so
            ``opsflow status`` reads its lag without importing it: the services'
            modules and the runtime were most of a status's CPU. Empty when the
            service could not be loaded; status then tries, and says why.
    """

    name: str
    port: int
    address: str
    priority: int
    waits_for: tuple[int, ...] = ()
    module: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    nice: int = 0
    api_key_env: str | None = None
    service: str = ""
    consumes: tuple[str, ...] = ()

    @property
    def command(self) -> list[str]:
        """The command the process manager runs; ``launch`` prepares and execs the process."""
        return [sys.executable, "-m", "opsflow.stack.launch", self.name]

    @property
    def is_service(self) -> bool:
        """One of opsflow's services (healthy when its ``/healthz`` says so)."""
        return bool(self.module)


@dataclass(frozen=True)
class StackPlan:
    """Everything ``opsflow up`` needs to start the stack and tell others where it is."""

    data_dir: Path
    broker_storage: str
    components: tuple[Component, ...]
    env: dict[str, str]
    supervisor_port: int
    external: dict[str, str] = field(default_factory=dict)

    @property
    def state_file(self) -> Path:
        return self.data_dir / "stack.json"

    @property
    def metrics(self) -> dict[str, str]:
        """Each runtime service's metrics URL, by program name (``/metrics``, ``/healthz``)."""
        return {c.name: c.address for c in self.components if c.module[:1] == ("opsflow.runtime",)}

    def component(self, name: str) -> Component | None:
        return next((c for c in self.components if c.name == name), None)

    def save(self) -> None:
        """Record the plan so later commands (status, down, tests) find the running stack.

        It holds addresses, never a secret (``opsflow.stack.credentials``).
        """
        private_dir(self.data_dir)
        data = asdict(self)
        data["data_dir"] = str(self.data_dir)
        write_private(self.state_file, json.dumps(data, indent=2))

    @classmethod
    def load(cls, data_dir: Path) -> StackPlan | None:
        path = data_dir / "stack.json"
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        data["data_dir"] = Path(data["data_dir"])
        data["components"] = tuple(
            Component(
                **{
                    **c,
                    "waits_for": tuple(c["waits_for"]),
                    "module": tuple(c["module"]),
                    "consumes": tuple(c.get("consumes", ())),
                }
            )
            for c in data["components"]
        )
        return cls(**data)


def port_is_free(port: int) -> bool:
    """True when nothing listens on the loopback port and we may bind it."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def _free_port(taken: set[int]) -> int:
    while True:
        with socket.socket() as sock:
            sock.bind((LOOPBACK, 0))
            port = int(sock.getsockname()[1])
        if port not in taken:
            return port


class _PortChooser:
    """Chooses ports: the configured one, else the one used last time, else any free one.

    Reusing last time's port keeps the URLs a user copied from ``opsflow status``
    valid across restarts.
    """

    def __init__(self, previous: StackPlan | None) -> None:
        self.previous = previous
        self.taken: set[int] = set()

    def choose(self, name: str, configured: int | None, variable: str) -> int:
        if configured is not None:
            if not port_is_free(configured):
                raise ConfigurationError(
                    variable,
                    f"port {configured} on {LOOPBACK} is already in use",
                    f"Stop what listens there, choose another port, or unset {variable} "
                    "to take a free one.",
                )
            port = configured
        else:
            previous = self._previous_port(name)
            if previous is None or previous in self.taken or not port_is_free(previous):
                previous = _free_port(self.taken)
            port = previous
        self.taken.add(port)
        return port

    def _previous_port(self, name: str) -> int | None:
        if self.previous is None:
            return None
        if name == "supervisor":
            return self.previous.supervisor_port
        old = self.previous.component(name)
        return old.port if old else None


def _reads(target: str) -> dict[str, Any]:
    """``service`` and ``consumes`` of the component running the service ``target``;
    none when it cannot be loaded (it will say why when it starts, status when it looks)."""
    from opsflow.runtime import load_service

    try:
        service = load_service(target)
    except Exception:
        return {}
    return {"service": service.name, "consumes": tuple(str(t) for t in service.consumes)}


def plan_stack(settings: StackSettings | None = None) -> StackPlan:
    """Decide which components to start and on which ports, from the environment.

    Raises:
        ConfigurationError: a configured port is already taken.
    """
    settings = settings or StackSettings()
    data_dir = settings.data_dir.expanduser().resolve()
    kafka = KafkaSettings()
    database = DatabaseSettings()
    registry = RegistrySettings()
    ports = _PortChooser(StackPlan.load(data_dir))

    components: list[Component] = []
    env: dict[str, str] = {}
    external: dict[str, str] = {}

    # Given to the runtime services only (their consumers), on top of ``env``.
    runtime_env: dict[str, str] = {}
    # Given to the projector only, on top of its own settings.
    projector_env: dict[str, str] = {}
    if kafka.bootstrap_servers:
        external["kafka"] = env["KAFKA_BOOTSTRAP_SERVERS"] = kafka.bootstrap_servers
    else:
        broker_port = ports.choose("broker", settings.broker_port, "OPSFLOW_BROKER_PORT")
        if settings.broker_storage == "durable":
            bucket_port = ports.choose("bucket", None, "")
            components.append(
                Component("bucket", bucket_port, f"http://{LOOPBACK}:{bucket_port}", 10)
            )
            waits: tuple[int, ...] = (bucket_port,)
        else:
            waits = ()
        address = f"{LOOPBACK}:{broker_port}"
        components.append(Component("broker", broker_port, address, 20, waits))
        env["KAFKA_BOOTSTRAP_SERVERS"] = address
        if settings.broker_storage == "durable":
            # Tansu's transactions on it are slow and can leave a partition's
            # last stable offset stuck (README, "Known limits"): services use
            # log-scan delivery on it. Idempotent producers work.
            env["OPSFLOW_DELIVERY"] = "log-scan"
            # Tansu reads a fetch's partitions one after another, each with
            # object-store round trips even when it has nothing new: with 6
            # partitions a topic, a consumer of four topics fell seconds
            # behind at 100 instances/s (README, "Known limits"). One broker and
            # one instance of each service gain nothing from more.
            if "KAFKA_FETCH_WAIT_MAX_MS" not in os.environ:
                # The projector's five readers of every topic are not on the
                # workflow's path: polling less often halved its CPU and took
                # the broker's with it (1,000-instance reference demo: 2.0-2.7 -> 1.2 s).
                projector_env["KAFKA_FETCH_WAIT_MAX_MS"] = str(DURABLE_PROJECTOR_FETCH_WAIT_MS)
            if "KAFKA_QUEUED_MIN_MESSAGES" not in os.environ:
                # The broker answers a fetch as soon as it finds a record, so
                # under load each reader fetched back to back, a few records a
                # time, each fetch listing and reading store objects. One fetch
                # at most per backoff while records wait unread: a paced
                # 1,000-instance reference demo, projector CPU 1.7 -> 0.9 s, broker 8.1 -> 5.9 s.
                projector_env["KAFKA_QUEUED_MIN_MESSAGES"] = "1"
                projector_env["KAFKA_FETCH_QUEUE_BACKOFF_MS"] = str(
                    DURABLE_PROJECTOR_FETCH_BACKOFF_MS
                )
            env["OPSFLOW_TOPIC_PARTITIONS"] = os.environ.get(
                "OPSFLOW_TOPIC_PARTITIONS", str(DURABLE_PARTITIONS)
            )
        elif "KAFKA_FETCH_WAIT_MAX_MS" not in os.environ:
            # A fetch with nothing to return looks again at halving intervals
            # until its wait is over, so a record can wait up to half of it;
            # the memory store reads at once (the durable one needs 50 ms and
            # more, see the runtime's consumer settings).
            runtime_env["KAFKA_FETCH_WAIT_MAX_MS"] = str(MEMORY_FETCH_WAIT_MS)

    if database.database_url:
        external["postgres"] = env["DATABASE_URL"] = database.database_url
        db_waits: tuple[int, ...] = ()
    else:
        pg_port = ports.choose("postgres", settings.postgres_port, "OPSFLOW_POSTGRES_PORT")
        url = database_url(data_dir, LOOPBACK, pg_port)
        components.append(Component("postgres", pg_port, url, 10))
        env["DATABASE_URL"] = url
        db_waits = (pg_port,)

    if registry.schema_registry_url:
        external["registry"] = env["SCHEMA_REGISTRY_URL"] = registry.schema_registry_url
    else:
        reg_port = ports.choose("registry", settings.registry_port, "OPSFLOW_REGISTRY_PORT")
        url = f"http://{LOOPBACK}:{reg_port}"
        components.append(Component("registry", reg_port, url, 30, db_waits))
        env["SCHEMA_REGISTRY_URL"] = url

    if settings.services:
        components += _services(ports, env, external, data_dir, runtime_env, projector_env)

    supervisor_port = ports.choose(
        "supervisor", settings.supervisor_port, "OPSFLOW_SUPERVISOR_PORT"
    )
    return StackPlan(
        data_dir=data_dir,
        broker_storage=settings.broker_storage,
        components=tuple(components),
        env=env,
        supervisor_port=supervisor_port,
        external=external,
    )


def _services(
    ports: _PortChooser,
    env: dict[str, str],
    external: dict[str, str],
    data_dir: Path,
    runtime_env: dict[str, str],
    projector_env: dict[str, str],
) -> list[Component]:
    """The application's programs (``opsflow.application``), the projector and the console.

    A partner's stand-in is not started when its URL variable is set: that
    partner is used instead.
    """

    def url(port: int) -> str:
        return f"http://{LOOPBACK}:{port}"

    programs = []
    for program in load_application().programs:
        if program.stand_in and program.url_env in os.environ:
            assert program.url_env is not None
            external[program.name] = env[program.url_env] = os.environ[program.url_env]
            continue
        programs.append(program)
    # Every program's address first: another's settings may name it ("{POD_CAPTURE_URL}").
    port_of = {program.name: ports.choose(program.name, None, "") for program in programs}
    for program in programs:
        if program.url_env:
            env[program.url_env] = url(port_of[program.name])
    found = []
    for program in programs:
        port = port_of[program.name]
        own: dict[str, str] = {}
        if program.port_env:
            own[program.port_env] = str(port)
        else:  # a stream service answers /healthz on its metrics port
            own["OPSFLOW_METRICS_PORT"] = str(port)
        if not program.module:
            own.update(runtime_env)
        fill = {**env, "program_dir": str(data_dir / program.name)}
        for variable, value in program.env.items():
            if "{program_dir}" in value:
                private_dir(data_dir / program.name)
            own[variable] = os.environ.get(variable) or value.format_map(fill)
        found.append(
            Component(
                program.name,
                port,
                url(port),
                100 if program.port_env else 110,
                module=program.command,
                env=own,
                nice=OFF_PATH_NICE if program.off_path else 0,
                api_key_env=program.api_key_env,
                **(_reads(program.service) if program.service else {}),
            )
        )
    projector_port = ports.choose("projector", None, "")
    found.append(
        Component(
            "projector",
            projector_port,
            url(projector_port),
            110,
            module=("opsflow.projector",),
            env={"OPSFLOW_METRICS_PORT": str(projector_port), **projector_env},
            nice=OFF_PATH_NICE,
        )
    )
    # The operator console (``opsflow.console``): a program of every stack, like the
    # projector, off the workflow's path; its URL is in the stack's variables.
    console_port = ports.choose(CONSOLE, None, "")
    env[CONSOLE_URL] = url(console_port)
    found.append(
        Component(
            CONSOLE,
            console_port,
            url(console_port),
            110,
            module=("opsflow.console",),
            env={"CONSOLE_PORT": str(console_port)},
            nice=OFF_PATH_NICE,
        )
    )
    return found
