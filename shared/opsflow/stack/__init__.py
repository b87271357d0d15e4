"""The embedded local stack: plan it, start it under supervision, ask how it is, stop it.

``opsflow up`` / ``status`` / ``down`` are thin faces over the functions here.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import MutableMapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from opsflow.application import load_application
from opsflow.db import redact
from opsflow.errors import ConfigurationError, OpsflowError
from opsflow.settings import StackSettings
from opsflow.stack import supervisor
from opsflow.stack.components import StackPlan, plan_stack
from opsflow.stack.credentials import Credentials
from opsflow.stack.health import check

# Which variable selects each external counterpart, and what to tell a user
# whose value does not work.
_EXTERNAL = {
    "kafka": ("KAFKA_BOOTSTRAP_SERVERS", "a reachable Kafka cluster (host:port,...)"),
    "postgres": ("DATABASE_URL", "a running PostgreSQL (postgresql://user@host:port/db)"),
    "registry": ("SCHEMA_REGISTRY_URL", "a running Confluent-compatible schema registry"),
}
READY_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class ComponentStatus:
    """One line of ``opsflow status``."""

    name: str
    address: str
    state: str
    pid: int
    uptime_s: float
    restarts: int
    healthy: bool
    detail: str


def data_dir() -> Path:
    return StackSettings().data_dir.expanduser().resolve()


def running_plan() -> StackPlan | None:
    """The plan of the stack running on this data directory, or None."""
    plan = StackPlan.load(data_dir())
    return plan if plan is not None and supervisor.is_running(plan) else None


def use_running_stack(environ: MutableMapping[str, str]) -> tuple[StackPlan, list[str]] | None:
    """Point the variables that are not set at the stack running from the data directory.

    What ``eval $(opsflow env)`` would do, for one command: variables already set
    win. Returns the plan and the names filled in, or None when no stack runs there.
    """
    plan = running_plan()
    if plan is None:
        return None
    filled = sorted(name for name in plan.env if name not in environ)
    for name in filled:
        environ[name] = plan.env[name]
    return plan, filled


def check_external(plan: StackPlan) -> None:
    """Refuse to start against an external counterpart that does not answer.

    Raises:
        ConfigurationError: naming the variable and what to do.
    """
    for kind, value in plan.external.items():
        healthy, detail = check(kind)(value)
        if not healthy:
            variable, expected = _EXTERNAL.get(kind) or _partner(kind)
            raise ConfigurationError(
                variable,
                f"cannot reach {redact(value)}: {detail}",
                f"Point {variable} at {expected}, or unset it to start the embedded one.",
            )


def _partner(name: str) -> tuple[str, str]:
    """The variable naming the partner a program stands in for, and what it must be."""
    program = load_application().program(name)
    variable = program.url_env if program is not None and program.url_env else name
    return variable, f"the partner's API (answering /healthz), as the `{name}` stand-in does"


def status(plan: StackPlan) -> list[ComponentStatus]:
    """Every component (embedded or external) with its address, process state and health."""
    procs = supervisor.processes(plan) if supervisor.is_running(plan) else {}
    # Each check waits on one component: ask them all at once.
    with ThreadPoolExecutor(max_workers=16) as pool:
        health = list(pool.map(lambda comp: check(comp.name)(comp.address), plan.components))
    rows = []
    for comp, (healthy, detail) in zip(plan.components, health, strict=True):
        proc = procs.get(comp.name)
        rows.append(
            ComponentStatus(
                comp.name,
                comp.address,
                proc.state if proc else "STOPPED",
                proc.pid if proc else 0,
                proc.uptime_s if proc else 0.0,
                proc.restarts if proc else 0,
                healthy,
                detail,
            )
        )
    for kind, value in plan.external.items():
        healthy, detail = check(kind)(value)
        rows.append(ComponentStatus(kind, redact(value), "EXTERNAL", 0, 0.0, 0, healthy, detail))
    provision = procs.get(supervisor.PROVISION)
    if provision is not None:
        done = provision.state == "EXITED" and provision.exit_status == 0
        rows.append(
            ComponentStatus(
                supervisor.PROVISION,
                "topics, schemas, migrations",
                provision.state,
                provision.pid,
                provision.uptime_s,
                provision.restarts,
                done,
                "done" if done else "not done",
            )
        )
    return rows


def _ready(plan: StackPlan) -> bool:
    procs = supervisor.processes(plan)
    provision = procs.get(supervisor.PROVISION)
    if provision is not None and (
        provision.state == "FATAL" or (provision.state == "EXITED" and provision.exit_status)
    ):
        raise OpsflowError(f"provisioning failed; see {plan.data_dir / 'logs' / 'provision.log'}")
    for comp in plan.components:
        if procs.get(comp.name, None) is None or procs[comp.name].state == "FATAL":
            raise OpsflowError(
                f"{comp.name} could not start; see {plan.data_dir / 'logs' / comp.name}.log"
            )
    return (
        provision is not None
        and provision.state == "EXITED"
        and provision.exit_status == 0
        and all(procs[c.name].state == "RUNNING" for c in plan.components)
        # Services are ready when they serve (runtime ones once their loop turns).
        and all(check(c.name)(c.address)[0] for c in plan.components if c.is_service)
    )


def up(*, foreground: bool) -> tuple[StackPlan, subprocess.Popen[bytes] | None]:
    """Start the stack (or find the one already running) and wait until it is ready.

    Returns:
        The plan, and in the foreground the supervisord process to wait on.

    Raises:
        ConfigurationError: a variable points at something unusable.
        OpsflowError: a component failed to start; the message names its log.
    """
    existing = running_plan()
    if existing is not None:
        return existing, None
    previous = StackPlan.load(data_dir())
    if previous is not None:
        supervisor.kill_leftovers(previous)
    # First: it makes the data directory private before anything is written there.
    Credentials.of(data_dir())
    plan = plan_stack()
    check_external(plan)
    plan.save()
    proc = supervisor.start(plan, foreground=foreground)
    if not foreground and proc.returncode != 0:
        raise OpsflowError(f"supervisord failed to start; see {plan.data_dir / 'logs'}")
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        if foreground and proc.poll() is not None:
            raise OpsflowError(f"the stack stopped while starting; see {plan.data_dir / 'logs'}")
        try:
            if supervisor.is_running(plan) and _ready(plan):
                return plan, proc if foreground else None
        except OpsflowError:
            supervisor.stop(plan)
            raise
        if time.monotonic() > deadline:
            supervisor.stop(plan)
            raise OpsflowError(
                f"the stack was not ready after {READY_TIMEOUT_S:.0f}s; "
                f"see {plan.data_dir / 'logs'}"
            )
        time.sleep(0.3)


def wait_foreground(plan: StackPlan, proc: subprocess.Popen[bytes]) -> int:
    """Wait on a foreground supervisord; Ctrl-C or SIGTERM stops the whole stack cleanly."""

    def forward(signum: int, _frame: object) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = proc.wait()
    supervisor.kill_leftovers(plan)
    return code


def down() -> StackPlan | None:
    """Stop the stack of this data directory; returns its plan, or None if there was none."""
    plan = StackPlan.load(data_dir())
    if plan is None:
        return None
    supervisor.stop(plan)
    return plan


__all__ = [
    "ComponentStatus",
    "ConfigurationError",
    "StackPlan",
    "down",
    "running_plan",
    "status",
    "up",
    "wait_foreground",
]
