"""Drive the `opsflow` command the way a user does, for the tests.

The suite starts real components through the real command (`opsflow up
--detach`) rather than through private functions, so what is tested is what a
user runs.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg

ROOT = Path(__file__).resolve().parents[2]
OPSFLOW = [sys.executable, "-m", "opsflow"]
# Variables that would make a test's stack use something other than what the
# test asked for.
STACK_VARIABLES = (
    "KAFKA_BOOTSTRAP_SERVERS",
    "DATABASE_URL",
    "SCHEMA_REGISTRY_URL",
    "OPSFLOW_BROKER_PORT",
    "OPSFLOW_POSTGRES_PORT",
    "OPSFLOW_REGISTRY_PORT",
    "OPSFLOW_SUPERVISOR_PORT",
    "OPSFLOW_BROKER_STORAGE",
    "OPSFLOW_SERVICES",
    "CARRIER_URL",
)

# The consumer-group timing of the services that behaviour tests run: the embedded
# broker lets a member join after half its session timeout (3 s at the runtime's
# 6 s, 1 s at 2 s; measured), and these tests are about what a service does, not
# how its group fails over (the process tests keep the runtime's timing). Against
# a cluster that was given, nothing changes: Apache Kafka refuses session timeouts
# under its group.min.session.timeout.ms (6 s by default).
QUICK_JOIN: dict[str, Any] = (
    {}
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    else {"session.timeout.ms": 2000, "heartbeat.interval.ms": 500}
)
# The same for a service run as a process (the KAFKA_* pass-through).
QUICK_JOIN_ENV = {
    f"KAFKA_{name.upper().replace('.', '_')}": str(value) for name, value in QUICK_JOIN.items()
}


@dataclass
class Stack:
    """A stack started from one data directory."""

    data_dir: Path
    env: dict[str, str]
    # Where its parts listen, as `opsflow status` says; asked once per start of the
    # stack (each `opsflow status` is a process of its own, ~1.7 s).
    _addresses: dict[str, str] = field(default_factory=dict, init=False, repr=False)

    def run(
        self, *args: str, timeout: float = 240, check: bool = True, **env: str
    ) -> subprocess.CompletedProcess[str]:
        """Run `opsflow ARGS` against this stack's data directory."""
        if args and args[0] in ("up", "down"):
            self._addresses = {}
        result = subprocess.run(
            [*OPSFLOW, *args],
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"opsflow {' '.join(args)} exited {result.returncode}\n"
                f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
            )
        return result

    def status(self) -> dict[str, Any]:
        result = self.run("status", "--json", check=False)
        data: dict[str, Any] = json.loads(result.stdout)
        return data

    def components(self) -> dict[str, dict[str, Any]]:
        return {row["name"]: row for row in self.status()["components"]}

    def addresses(self) -> dict[str, str]:
        """The variables that point a program at this stack (`opsflow status`'s env)."""
        if not self._addresses:
            self._addresses = dict(self.status()["env"])
        return dict(self._addresses)

    def address(self, variable: str) -> str:
        return self.addresses()[variable]


def stack_env(data_dir: Path, **overrides: str) -> dict[str, str]:
    """The environment for a stack in ``data_dir``: the caller's, minus stack choices."""
    env = {k: v for k, v in os.environ.items() if k not in STACK_VARIABLES}
    env["OPSFLOW_DATA_DIR"] = str(data_dir)
    # Infrastructure only, unless a test asks for the services (they would only
    # add load to tests of the stack itself or of one service in isolation).
    env["OPSFLOW_SERVICES"] = "false"
    env.update(overrides)
    return env


def create_schema(base: str) -> tuple[str, str]:
    """A fresh, empty schema in ``base``'s database: its name, and a URL whose
    connections work in it (so a test's tables never meet another's)."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in base else "?"
    return schema, f"{base}{sep}options=-csearch_path%3D{schema}"


def drop_schema(base: str, schema: str) -> None:
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")


def free_port() -> int:
    """A loopback port nothing listens on now (for a service a test starts)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_service(
    args: list[str], env: dict[str, str], log: Path, ready_url: str, *, timeout: float = 60
) -> subprocess.Popen[bytes]:
    """``python ARGS`` as a real process (output appended to ``log``), once ``ready_url``
    answers 200; stopped again if it exits or never gets ready."""
    proc = subprocess.Popen(
        [sys.executable, *args], cwd=ROOT, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + timeout
    try:
        while True:
            assert proc.poll() is None, f"{args} exited {proc.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"{args} never got ready:\n{log.read_text()}"
            try:
                if httpx.get(ready_url, timeout=2).status_code == 200:
                    return proc
            except httpx.TransportError:
                pass
            time.sleep(0.1)
    except AssertionError:
        stop_process(proc)
        raise


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it has not gone within 30 s."""
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
