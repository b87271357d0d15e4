"""The embedded stack as a user drives it: up, status, down, restarts, and bad configuration.

Each test here starts its own stack in its own data directory through the
real `opsflow` command, so it proves what a newcomer gets from `make run`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
from confluent_kafka import Consumer, Message, Producer
from confluent_kafka.admin import AdminClient

from opsflow.overview import overview
from opsflow.stack.components import Component, StackPlan, plan_stack
from services.contracts import TOPICS
from tests.support.stack import OPSFLOW, Stack, stack_env

# Each test starts, kills or restarts a stack of its own: the processes are under test.
pytestmark = pytest.mark.process

COMPONENTS = {"bucket", "broker", "postgres", "registry", "provision"}


@pytest.fixture
def own_stack(tmp_path: Path) -> Iterator[Stack]:
    """A stack of the test's own, in a fresh data directory; stopped after the test."""
    stack = Stack(tmp_path / "data", stack_env(tmp_path / "data"))
    yield stack
    stack.run("down", check=False)


def _alive(pids: list[int]) -> list[int]:
    return [
        p
        for p in pids
        if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
    ]


def _consumer(bootstrap: str, group: str) -> Consumer:
    return Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            # The embedded broker lets a member join after half its session timeout
            # (measured: 1 s at 2 s, 3 s at 6 s); these stacks are always embedded.
            "session.timeout.ms": 2000,
            "heartbeat.interval.ms": 500,
        }
    )


def _consume(consumer: Consumer, want: int, timeout: float = 60) -> list[Message]:
    got: list[Message] = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        got += [msg for msg in consumer.consume(want - len(got), 1.0) if msg.error() is None]
    return got


def test_up_status_down_from_a_clean_data_directory_and_again_on_the_existing_one(
    own_stack: Stack,
) -> None:
    own_stack.run("up", "--detach")
    components = own_stack.components()
    assert set(components) == COMPONENTS
    assert all(c["healthy"] for c in components.values()), components
    assert components["broker"]["address"].startswith("127.0.0.1:")
    assert components["registry"]["address"].startswith("http://127.0.0.1:")
    assert components["postgres"]["address"].startswith("postgresql://")
    pids = [c["pid"] for c in components.values() if c["state"] == "RUNNING"]
    assert len(pids) == 4
    topics = AdminClient({"bootstrap.servers": components["broker"]["address"]}).list_topics(
        timeout=10
    )
    assert {len(topics.topics[t].partitions) for t in ("orders", "dispatch", "dispatch.dlq")} == {
        1
    }, "the durable store's topics have one partition each (README, Known limits)"

    table = own_stack.run("status").stdout
    for name in COMPONENTS:
        assert name in table
    own_stack.run("down")
    assert not _alive(pids), "every component process is gone after down"
    assert own_stack.run("status", check=False).returncode != 0, "status says unhealthy"

    own_stack.run("up", "--detach")
    again = own_stack.components()
    assert all(c["healthy"] for c in again.values()), again
    assert again["broker"]["address"] == components["broker"]["address"], "ports are kept"


def test_the_durable_stack_lets_only_the_projectors_readers_wait_between_fetches(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Its readers fetch at most every half second while records wait unread (a
    variable the user sets wins); the workflow's services fetch as soon as they can."""
    for name in ("KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL", "SCHEMA_REGISTRY_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("KAFKA_QUEUED_MIN_MESSAGES", raising=False)
    monkeypatch.setenv("OPSFLOW_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("OPSFLOW_SERVICES", "true")

    plan = plan_stack()
    projector, dispatch = plan.component("projector"), plan.component("dispatch")
    assert projector is not None and dispatch is not None
    assert projector.env["KAFKA_QUEUED_MIN_MESSAGES"] == "1"
    assert projector.env["KAFKA_FETCH_QUEUE_BACKOFF_MS"] == "500"
    assert "KAFKA_QUEUED_MIN_MESSAGES" not in dispatch.env

    monkeypatch.setenv("KAFKA_QUEUED_MIN_MESSAGES", "1000")
    projector = plan_stack().component("projector")
    assert projector is not None and "KAFKA_QUEUED_MIN_MESSAGES" not in projector.env


def test_what_may_lag_behind_the_workflow_yields_the_cpu_to_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("OPSFLOW_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("OPSFLOW_SERVICES", "true")
    nice = {c.name: c.nice for c in plan_stack().components}
    assert {name for name, n in nice.items() if n > 0} == {
        "projector",
        "console",
        "pod-webhook",
        "pod-capture",
    }
    assert nice["dispatch"] == nice["policy-check"] == nice["ingest"] == nice["broker"] == 0


def test_the_plan_records_what_each_stream_service_reads(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """So `opsflow status` shows each service's lag without importing the services."""
    monkeypatch.setenv("OPSFLOW_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("OPSFLOW_SERVICES", "true")
    plan = plan_stack()
    plan.save()
    reads = {c.name: (c.service, c.consumes) for c in StackPlan.load(tmp_path).components}
    assert reads["dispatch"] == ("dispatch", ("policy-check", "review", "dispatch"))
    assert reads["policy-check"] == ("policy-check", ("orders",))
    assert reads["review"] == ("review", ("policy-check",)), "an HTTP program with a worker"
    assert reads["ingest"] == ("", ()) and reads["projector"] == ("", ())


def test_status_takes_what_a_service_reads_from_the_plan_and_else_from_its_code(
    stack: Stack,
) -> None:
    plan = StackPlan.load(stack.data_dir)
    assert plan is not None and not any(c.consumes for c in plan.components), "no services"
    kafka = {"bootstrap.servers": stack.address("KAFKA_BOOTSTRAP_SERVERS")}
    learnt = {row.name: set(row.lag) for row in overview(kafka, None, plan).services}
    assert learnt["dispatch"] == {"policy-check", "review", "dispatch"}
    assert learnt["policy-check"] == {"orders"}

    recorded = Component("dispatch", 1, "-", 110, service="dispatch", consumes=("orders",))
    planned = replace(plan, components=(*plan.components, recorded))
    shown = {row.name: set(row.lag) for row in overview(kafka, None, planned).services}
    assert shown["dispatch"] == {"orders"}, "the plan's record, not the code's"
    assert shown["policy-check"] == {"orders"}


def test_the_operator_console_runs_with_the_programs_and_its_url_is_a_stack_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`opsflow up` starts the console after provisioning, on a port of its own, and
    tells others (`opsflow env`, `opsflow status`) where it is, as it does for the
    application's HTTP programs; without the programs there is no console either."""
    monkeypatch.setenv("OPSFLOW_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("OPSFLOW_SERVICES", "true")
    plan = plan_stack()
    console = plan.component("console")
    assert console is not None and console.module == ("opsflow.console",)
    assert console.is_service, "it is started once provisioning is done, checked on /readyz"
    assert console.env["CONSOLE_PORT"] == str(console.port)
    assert plan.env["CONSOLE_URL"] == console.address == f"http://127.0.0.1:{console.port}"
    assert console.port not in {c.port for c in plan.components if c is not console}

    monkeypatch.setenv("OPSFLOW_SERVICES", "false")
    plan = plan_stack()
    assert plan.component("console") is None and "CONSOLE_URL" not in plan.env


def test_a_second_up_finds_the_running_stack_instead_of_starting_another(own_stack: Stack) -> None:
    own_stack.run("up", "--detach")
    before = {n: c["pid"] for n, c in own_stack.components().items()}
    second = own_stack.run("up", "--detach")
    assert "already running" in second.stdout
    assert {n: c["pid"] for n, c in own_stack.components().items()} == before


def test_restarting_the_stack_keeps_topics_records_and_committed_offsets(own_stack: Stack) -> None:
    own_stack.run("up", "--detach")
    bootstrap = own_stack.address("KAFKA_BOOTSTRAP_SERVERS")
    topic, group = f"orders-{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:8]}"
    producer = Producer(
        {"bootstrap.servers": bootstrap, "linger.ms": 10, "enable.idempotence": True}
    )
    values = [f"record-{i}".encode() for i in range(200)]
    for value in values:
        producer.produce(topic, key=b"order-1", value=value)
    assert producer.flush(30) == 0

    consumer = _consumer(bootstrap, group)
    consumer.subscribe([topic])
    first = _consume(consumer, 120)
    assert [m.value() for m in first] == values[:120]
    consumer.commit(message=first[-1], asynchronous=False)
    consumer.close()

    own_stack.run("down")
    own_stack.run("up", "--detach")
    bootstrap = own_stack.address("KAFKA_BOOTSTRAP_SERVERS")

    # A fresh group reads every record from the beginning...
    everything = _consumer(bootstrap, f"g-{uuid.uuid4().hex[:8]}")
    everything.subscribe([topic])
    assert [m.value() for m in _consume(everything, len(values))] == values
    everything.close()
    # ...and the old group resumes at its committed offset.
    resumed = _consumer(bootstrap, group)
    resumed.subscribe([topic])
    assert [m.value() for m in _consume(resumed, 80)] == values[120:]
    resumed.close()


def test_a_component_that_dies_is_restarted_and_counted(own_stack: Stack) -> None:
    own_stack.run("up", "--detach")
    broker = own_stack.components()["broker"]
    os.kill(broker["pid"], signal.SIGKILL)

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        now = own_stack.components()["broker"]
        if now["pid"] != broker["pid"] and now["state"] == "RUNNING" and now["healthy"]:
            break
        time.sleep(0.5)
    assert now["restarts"] == 1, (broker, now)
    assert now["healthy"], now


def test_foreground_run_stops_everything_on_ctrl_c(tmp_path: Path) -> None:
    env = stack_env(tmp_path / "data")
    proc = subprocess.Popen(
        [*OPSFLOW, "up"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    stack = Stack(tmp_path / "data", env)
    try:
        deadline = time.monotonic() + 180
        pids: list[int] = []
        while time.monotonic() < deadline and proc.poll() is None:
            if (tmp_path / "data" / "stack.json").exists():
                rows = stack.status()["components"]
                if rows and all(r["healthy"] for r in rows):
                    pids = [r["pid"] for r in rows if r["pid"]]
                    break
            time.sleep(1)
        assert pids, "the stack became healthy in the foreground"
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=90)
        assert proc.returncode == 0, output
        assert not _alive(pids)
    finally:
        if proc.poll() is None:
            proc.kill()
        stack.run("down", check=False)


def _opsflow_fails(tmp_path: Path, **env: str) -> str:
    result = subprocess.run(
        [*OPSFLOW, "up", "--detach"],
        env=stack_env(tmp_path / "data", **env),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert 1 <= len(lines) <= 2, result.stderr
    return result.stderr


def test_unreachable_kafka_is_one_clear_line_naming_the_variable(tmp_path: Path) -> None:
    message = _opsflow_fails(tmp_path, KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:1")
    assert "KAFKA_BOOTSTRAP_SERVERS" in message and "127.0.0.1:1" in message
    assert "unset it" in message


def test_bad_database_url_is_one_clear_line_naming_the_variable(tmp_path: Path) -> None:
    message = _opsflow_fails(tmp_path, DATABASE_URL="postgresql://nobody@127.0.0.1:1/none")
    assert "DATABASE_URL" in message and "127.0.0.1:1" in message


def test_a_configured_port_in_use_is_one_clear_line_naming_the_variable(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        message = _opsflow_fails(tmp_path, OPSFLOW_BROKER_PORT=str(port))
    assert "OPSFLOW_BROKER_PORT" in message and str(port) in message


def test_after_kill_9_of_the_supervisor_and_broker_up_stops_leftovers_and_keeps_records(
    own_stack: Stack,
) -> None:
    own_stack.run("up", "--detach")
    bootstrap = own_stack.address("KAFKA_BOOTSTRAP_SERVERS")
    topic = f"orders-{uuid.uuid4().hex[:8]}"
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 10})
    values = [f"record-{i}".encode() for i in range(300)]
    for value in values:
        producer.produce(topic, key=b"order-7", value=value)
    assert producer.flush(30) == 0

    # A crash: the supervisor and the broker die at once; the other
    # components are orphaned and keep running.
    old = {name: c["pid"] for name, c in own_stack.components().items() if c["pid"]}
    supervisord = int((own_stack.data_dir / "run" / "supervisord.pid").read_text())
    os.kill(supervisord, signal.SIGKILL)
    os.kill(old["broker"], signal.SIGKILL)
    time.sleep(0.5)
    assert _alive([old["postgres"], old["registry"]]), "orphans survive their supervisor"

    own_stack.run("up", "--detach")
    assert not _alive(list(old.values())), "nothing of the crashed stack is left running"
    consumer = _consumer(own_stack.address("KAFKA_BOOTSTRAP_SERVERS"), f"g-{uuid.uuid4().hex}")
    consumer.subscribe([topic])
    assert [m.value() for m in _consume(consumer, len(values))] == values
    consumer.close()


def test_memory_storage_runs_a_throwaway_broker_without_the_bucket(tmp_path: Path) -> None:
    stack = Stack(tmp_path / "data", stack_env(tmp_path / "data", OPSFLOW_BROKER_STORAGE="memory"))
    try:
        stack.run("up", "--detach")
        components = stack.components()
        assert "bucket" not in components
        assert components["broker"]["healthy"] and components["provision"]["healthy"]
    finally:
        stack.run("down", check=False)


def test_provisioning_creates_every_topic_of_record_and_its_dead_letter_topic(
    bootstrap_servers: str,
) -> None:

    topics = AdminClient({"bootstrap.servers": bootstrap_servers}).list_topics(timeout=10).topics
    for topic in TOPICS:
        for name in (str(topic), f"{topic}.dlq"):
            assert name in topics, name
            assert len(topics[name].partitions) == 6, name
