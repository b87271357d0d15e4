"""``opsflow replay`` on the real stack: re-driving a range books nothing twice.

The world is dispatch's (tests/support/dispatching.py): topics of its own, a fresh
schema, the carrier stand-in as a real HTTP server with faults switched on.
Orders are approved and dispatched once by the real dispatch service (its worker
in a thread of the test process, until it has handled every approval); then the
operator re-drives ranges of the log into dispatch with the real command (run in
the test process), and the carrier's own list of bookings says whether anything
was booked twice.
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from confluent_kafka.admin import AdminClient
from confluent_kafka.schema_registry import SchemaRegistryClient

import services.dispatch
from opsflow.projector.service import Projector
from opsflow.readmodels import projections
from opsflow.testing import CommandResult, command, in_thread
from opsflow.topics import Partition, dead_letter_topic, ensure_topics
from services.contracts import DispatchExecuted, DispatchRequested
from tests.support.dispatching import World, high_watermarks, make_orders, settled
from tests.support.dispatching import world as world


def cli(world: World, *args: str) -> CommandResult:
    env = {
        **world.stack.env,
        **world.stack.addresses(),
        "OPSFLOW_TOPIC_PREFIX": world.prefix,
        "DATABASE_URL": world.database_url,
        "CARRIER_URL": world.carrier.url,
        "DISPATCH_BACKOFF_S": "0.05",
        "DISPATCH_BACKOFF_MAX_S": "0.5",
        "DISPATCH_TIMEOUT_S": "1",
    }
    return command(*args, env=env)


def ends(world: World) -> dict[Partition, int]:
    """The end of every partition of the world's topics and their dead-letter topics (to
    see that nothing was written, not even into a transaction left open)."""
    names = [f"{world.prefix}{topic}" for topic in ("orders", "policy-check", "review", "dispatch")]
    return high_watermarks(
        {"bootstrap.servers": world.stack.address("KAFKA_BOOTSTRAP_SERVERS")},
        [(name, p) for name in names + [dead_letter_topic(n) for n in names] for p in range(4)],
    )


def test_replaying_ranges_into_dispatch_books_nothing_twice_and_a_dry_run_writes_nothing(
    world: World, tmp_path: Path
) -> None:
    orders = make_orders(40)
    ids = {o.order_id for o in orders}
    world.approve(orders)
    dispatch = world.run_dispatch()

    # The audit log (kept by the projector, in a thread) is what a dry run asks for
    # "already done"; it reads every topic of record.
    bootstrap = world.stack.address("KAFKA_BOOTSTRAP_SERVERS")
    names = [f"{world.prefix}{t}" for t in ("pod", "pod-rejects")]
    ensure_topics(
        AdminClient({"bootstrap.servers": bootstrap}),
        names + [dead_letter_topic(n) for n in names],
        partitions=4,
    )
    projector = Projector(
        [projections()["audit_log"]],
        kafka={"bootstrap.servers": bootstrap},
        registry=SchemaRegistryClient({"url": world.stack.address("SCHEMA_REGISTRY_URL")}),
        database_url=world.database_url,
    )
    with in_thread(projector, name="projector"):
        first = world.dispatch_events(settled(ids))
        dispatch.stop()
        booked_before = world.bookings()
        executed_ids = {str(e.envelope.event_id) for e in first if isinstance(e, DispatchExecuted)}
        requested_ids = {
            str(e.envelope.event_id) for e in first if isinstance(e, DispatchRequested)
        }
        assert len(executed_ids) >= 38 and len(requested_ids) == 40
        listed: dict[str, Any] = {}
        while listed.get("lag", 1) != 0:
            done = cli(world, "projections", "list", "--json")
            assert done.returncode == 0, done.stderr
            listed = {r["name"]: r for r in json.loads(done.stdout)}["audit_log"]

    # The dry runs: none of them writes anything.
    later = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S")
    before = ends(world)
    dry, said, up_to_now, after = (
        cli(world, *args)
        for args in (
            ["replay", "policy-check", "--into", "dispatch", "--dry-run", "--json"],
            ["replay", "dispatch", "--into", "dispatch", "--dry-run"],
            ["replay", "policy-check", "--into", "dispatch", "--dry-run", "--json", "--to", later],
            [
                "replay",
                "policy-check",
                "--into",
                "dispatch",
                "--dry-run",
                "--json",
                "--from",
                later,
            ],
        )
    )
    assert ends(world) == before, "a dry run wrote to the topics"
    assert world.bookings()["count"] == booked_before["count"]
    assert dry.returncode == 0, dry.stdout + dry.stderr
    planned = json.loads(dry.stdout)
    assert planned["dry_run"] and planned["events"] == {"policy.checked": 40}
    assert set(planned["instances"]) == ids
    assert planned["handled"] == 40 and planned["already_done"] == 40
    assert planned["outputs"] == 0
    # In words: the effects are sent again under the same keys, not "skipped".
    words = " ".join(said.stdout.split())
    assert "sent again under the same idempotency keys" in words, said.stdout
    assert "are acted on if this were not a dry run" in words and "skipped" not in words
    # Up to a time after the newest record: everything (a broker may answer a time
    # lookup past the end with offset 0, which once made this replay nothing).
    assert json.loads(up_to_now.stdout)["events"] == {"policy.checked": 40}, up_to_now.stdout
    assert not json.loads(after.stdout)["events"], after.stdout

    # The approvals again: the same dispatch.requested events (same ids) are written.
    again = cli(world, "replay", "policy-check", "--into", "dispatch", "--json")
    assert again.returncode == 0, again.stdout + again.stderr
    assert json.loads(again.stdout)["outputs"] == 40
    # The requests again, half the orders only: dispatch books them with the carrier
    # under the same idempotency keys, and the carrier answers with what it booked.
    some = sorted(ids)[:20]
    rebook = cli(
        world, "replay", "dispatch", "--into", "dispatch", "--json",
        *[arg for order_id in some for arg in ("--key", order_id)],
    )  # fmt: skip
    assert rebook.returncode == 0, rebook.stdout + rebook.stderr
    # Its dependencies (the database pool, the carrier's client) were closed at the
    # end, as when dispatch stops: a service run next in this process makes its own.
    assert services.dispatch.service.stop_hooks == []
    report = json.loads(rebook.stdout)
    assert set(report["instances"]) == set(some)

    booked_after = world.bookings()
    assert booked_after["duplicates"] == []
    assert booked_after["count"] == booked_before["count"]
    assert Counter(b["order_id"] for b in booked_after["bookings"]) == Counter(
        b["order_id"] for b in booked_before["bookings"]
    )
    # No dispatch runs now: what the replays wrote is all there is.
    events = world.dispatch_events(settled(ids))
    assert {str(e.envelope.event_id) for e in events if isinstance(e, DispatchRequested)} == (
        requested_ids
    )
    replayed_executions = {
        str(e.envelope.event_id) for e in events if isinstance(e, DispatchExecuted)
    }
    assert replayed_executions == executed_ids, "a replayed booking made a new event"


def test_replaying_into_an_unknown_target_names_the_nearest_one(world: World) -> None:
    done = cli(world, "replay", "dispatch", "--into", "dispach")
    assert done.returncode == 2
    assert "did you mean 'dispatch'" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
