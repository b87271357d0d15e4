"""Every command and query in docs/runbook.md, run as written against a real stack.

The runbook is what an operator copies at 3 a.m.; a command in it that no longer
parses, or a query over a column that was renamed, must fail here first. The
world: topics of its own, a fresh database schema, the projector and the
carrier stand-in as real processes, a few hundred orders of every kind, and a
poison record so there is a dead letter to show. ``ORDER_ID`` and the example
dead-letter id are filled in from that world; everything else runs verbatim.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from opsflow import db
from opsflow.topics import dead_letter_topic, ensure_topics, topic_name
from services.contracts import ORDERS, TOPICS
from tests.support.carrier import CarrierProcess
from tests.support.histories import histories
from tests.support.projecting import World
from tests.support.stack import OPSFLOW, ROOT, Stack, free_port, start_service, stop_process

RUNBOOK = ROOT / "docs" / "runbook.md"
EXAMPLE_DLQ_ID = "orders.dlq/2/15"


def blocks(kind: str) -> list[str]:
    """The runbook's fenced blocks of ``kind`` (``sh`` or ``sql``)."""
    return re.findall(rf"```{kind}\n(.*?)```", RUNBOOK.read_text(encoding="utf-8"), re.S)


def commands() -> list[str]:
    found = [line.strip() for block in blocks("sh") for line in block.splitlines()]
    return [line for line in found if line]


def test_the_runbook_shows_only_opsflow_commands_in_its_shell_blocks() -> None:
    assert commands(), "the runbook has no commands"
    assert all(c.startswith("opsflow ") for c in commands()), commands()
    assert blocks("sql")


@pytest.fixture
def world(
    stack: Stack,
    bootstrap_servers: str,
    registry_url: str,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> Iterator[tuple[World, dict[str, str]]]:
    prefix = f"rb{uuid.uuid4().hex[:8]}."
    monkeypatch.setenv("OPSFLOW_TOPIC_PREFIX", prefix)
    names = [topic_name(t, prefix=prefix) for t in TOPICS]
    ensure_topics(
        AdminClient({"bootstrap.servers": bootstrap_servers}),
        names + [dead_letter_topic(n) for n in names],
        partitions=3,
    )
    db.migrate(database_url)
    world = World(prefix, bootstrap_servers, registry_url, database_url, stack)
    carrier = CarrierProcess(tmp_path / "carrier.log", {"CARRIER_DB": str(tmp_path / "c.db")})
    carrier.start()
    port = free_port()
    env = {
        **world.env,
        **stack.addresses(),
        "OPSFLOW_TOPIC_PREFIX": prefix,
        "DATABASE_URL": database_url,
        "CARRIER_URL": carrier.url,
        "DISPATCH_BACKOFF_S": "0.05",
        "DISPATCH_TIMEOUT_S": "2",
    }
    projector = start_service(
        ["-m", "opsflow.projector"],
        {**env, "OPSFLOW_METRICS_PORT": str(port)},
        tmp_path / "projector.log",
        f"http://127.0.0.1:{port}/readyz",
    )
    try:
        yield world, env
    finally:
        stop_process(projector)
        carrier.stop()


def run(env: dict[str, str], command: str) -> subprocess.CompletedProcess[str]:
    args = [*OPSFLOW, *command.split()[1:]] if '"' not in command else None
    if args is None:  # a quoted argument: let a shell split it as the operator's would
        return subprocess.run(
            command.replace("opsflow ", f"{' '.join(OPSFLOW)} ", 1),
            shell=True, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    if "--watch" in args:
        return watch(args, env)
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)


def watch(
    args: list[str], env: dict[str, str], *, frames: int = 2
) -> subprocess.CompletedProcess[str]:
    """A ``--watch`` command in a terminal (a pseudo-terminal, so it draws its screen as
    it does for the operator), stopped with Ctrl-C once it has drawn ``frames`` screens:
    its loop has refreshed, and the interrupt reaches it there, not while it starts."""
    leader, follower = pty.openpty()
    # Ctrl-C reaches the command even when this suite runs with SIGINT ignored
    # (a background job of a shell), which its children would inherit.
    proc = subprocess.Popen(
        args,
        env={**env, "TERM": "xterm", "COLUMNS": "160", "LINES": "200"},
        stdin=subprocess.DEVNULL,
        stdout=follower,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    os.close(follower)
    shown = b""
    deadline = time.monotonic() + 120
    try:
        # Every screen ends with the table of what the application watches.
        while shown.count(b"Dead letters and what the application watches") < frames:
            assert time.monotonic() < deadline, f"{args}: no refresh in 120 s:\n{shown[-2000:]!r}"
            assert proc.poll() is None, f"{args} exited {proc.returncode}:\n{shown[-2000:]!r}"
            if select.select([leader], [], [], 0.2)[0]:
                try:
                    shown += os.read(leader, 65536)
                except OSError:  # the terminal closed: the command exited
                    continue
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        os.close(leader)
    return subprocess.CompletedProcess(args, proc.returncode, shown.decode(errors="replace"), err)


@pytest.mark.process
def test_every_runbook_command_and_query_runs_against_a_real_stack(
    world: tuple[World, dict[str, str]],
) -> None:
    w, env = world
    orders = list(histories(120, run=w.prefix, seed=4))
    producer = Producer({"bootstrap.servers": w.bootstrap})
    producer.produce(topic_name(ORDERS, prefix=w.prefix), key=b"poison", value=b"\x00bad")
    assert producer.flush(10) == 0
    w.publish(orders)
    w.wait_caught_up()
    reviewed = next(h for h in orders if any(e.event_type == "review.decided" for e in h))
    order_id = reviewed[0].order_id
    listed = run(env, "opsflow dlq list --json")
    assert listed.returncode == 0, listed.stderr
    dlq_id = json.loads(listed.stdout)["dead_letters"][0]["id"]

    failures = []
    for command in commands():
        filled = command.replace("ORDER_ID", order_id).replace(EXAMPLE_DLQ_ID, dlq_id)
        done = run(env, filled)
        if done.returncode != 0 or "Traceback" in done.stderr:
            failures.append(
                f"{filled} -> {done.returncode}\n{done.stdout[-800:]}{done.stderr[-800:]}"
            )
    with db.connect(w.database_url) as conn:
        for query in blocks("sql"):
            try:
                conn.execute(query).fetchall()
            except Exception as err:
                failures.append(f"{query.strip()} -> {err}")
                conn.rollback()
    assert not failures, "\n\n".join(failures)


@pytest.mark.process
@pytest.mark.parametrize(
    "command",
    ["projections list", "replay orders --into policy-check --dry-run", "status", "audit verify"],
)
def test_an_operator_command_without_its_broker_names_the_address_and_the_variable(
    command: str, tmp_path: Path
) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1",
        "SCHEMA_REGISTRY_URL": "http://127.0.0.1:2",
        "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none",
        "OPSFLOW_DATA_DIR": str(tmp_path / "no-stack"),
    }
    done = subprocess.run(
        [*OPSFLOW, *command.split()], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "KAFKA_BOOTSTRAP_SERVERS" in done.stderr and "127.0.0.1:1" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) <= 2
