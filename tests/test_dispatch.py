"""dispatch on the real stack: one accepted booking per approved order, even under kill -9.

Each test gets its own topics, database schema and carrier stand-in (a real
HTTP server on loopback, with its bookings in a file so they outlive nothing
but the test). Approvals are published with the producer SDK, as the
policy-check and review steps would write them. The tests whose subject is the
process (kill -9, a clean stop) run dispatch as one; the others run its worker in a
thread of the test process and read once it has drained its inputs.
"""

from __future__ import annotations

import signal
import time
from collections import Counter

import httpx
import pytest

from opsflow.contracts import Event
from opsflow.runtime import RetryPolicy
from services.contracts import (
    DispatchExecuted,
    DispatchFailed,
    DispatchFailureClass,
    DispatchRequested,
    PolicyChecked,
    PolicyOutcome,
)
from tests.support.dispatching import World, make_orders, settled
from tests.support.dispatching import world as world


def outcomes(events: list[Event]) -> dict[str, list[Event]]:
    by_order: dict[str, list[Event]] = {}
    for event in events:
        by_order.setdefault(event.order_id, []).append(event)
    return by_order


@pytest.mark.process
def test_two_dispatch_instances_book_every_approved_order_once_and_one_survives_kill_9(
    world: World,
) -> None:
    orders = make_orders(600)
    ids = {o.order_id for o in orders}
    world.approve(orders)
    # Two instances share the partitions (one consumer group); one is killed in the
    # middle of booking (some orders booked, some not yet) and the other takes over
    # its partitions: no restart.
    first, second = world.start_dispatch(), world.start_dispatch()
    logs = [world.logs / f"dispatch-{n}.log" for n in (0, 1)]
    deadline = time.monotonic() + 90
    # Until both hold partitions and some orders are booked.
    while world.bookings()["count"] < 150 or not all(
        b'"assigned"' in log.read_bytes() for log in logs
    ):
        assert time.monotonic() < deadline, "dispatch booked nothing"
        for proc, log in zip((first, second), logs, strict=True):
            assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    assert world.bookings()["count"] < len(orders), "killed too late to prove anything"

    events = world.dispatch_events(settled(ids))
    per_order = outcomes(events)
    assert set(per_order) == ids
    for order_id, evs in per_order.items():
        kinds = Counter(e.event_type for e in evs)
        assert kinds["dispatch.requested"] == 1, (order_id, kinds)
        assert kinds["dispatch.executed"] + kinds["dispatch.failed"] == 1, (order_id, kinds)
    bookings = world.bookings()
    assert bookings["duplicates"] == []
    booked = Counter(b["order_id"] for b in bookings["bookings"])
    executed = {e.order_id: e for e in events if isinstance(e, DispatchExecuted)}
    failed = [e for e in events if isinstance(e, DispatchFailed)]
    # 5 attempts against 30% faults: about 1 order in 400 runs out of retries.
    assert len(executed) >= len(orders) - 10
    assert all(f.retries_exhausted for f in failed)
    assert all(booked[order_id] == 1 for order_id in executed)
    assert all(booked[order_id] <= 1 for order_id in ids)
    by_reference = {b["booking_reference"]: b for b in bookings["bookings"]}
    requests = {e.order_id: e for e in events if isinstance(e, DispatchRequested)}
    for order_id, done in executed.items():
        booking = by_reference[done.booking_reference]
        assert booking["order_id"] == order_id
        assert booking["idempotency_key"] == requests[order_id].envelope.idempotency_key
        assert done.envelope.causation_id == str(requests[order_id].envelope.event_id)
    assert second.poll() is None, "the survivor is still running"


def test_a_refused_destination_ends_in_dispatch_failed_with_the_carriers_reason(
    world: World,
) -> None:
    refused, fine = make_orders(3, country="KP"), make_orders(3)
    world.approve(refused + fine)
    world.run_dispatch()
    events = world.dispatch_events(settled({o.order_id for o in refused + fine}))
    failed = {e.order_id: e for e in events if isinstance(e, DispatchFailed)}
    assert set(failed) == {o.order_id for o in refused}
    for failure in failed.values():
        assert failure.failure_class is DispatchFailureClass.PERMANENT
        assert not failure.retries_exhausted
        assert "422" in failure.reason and "KP" in failure.reason
    assert {e.order_id for e in events if isinstance(e, DispatchExecuted)} == {
        o.order_id for o in fine
    }


def test_a_carrier_outage_exhausts_retries_into_dispatch_failed_not_silence(
    world: World,
) -> None:
    httpx.put(f"{world.carrier.url}/faults", json={"error_rate": 1.0}, timeout=5)
    orders = make_orders(4)
    world.approve(orders)
    world.run_dispatch(DISPATCH_MAX_ATTEMPTS="3")
    events = world.dispatch_events(settled({o.order_id for o in orders}))
    failed = [e for e in events if isinstance(e, DispatchFailed)]
    assert len(failed) == 4
    assert all(f.retries_exhausted and f.attempt == 3 for f in failed)
    assert all(f.failure_class is DispatchFailureClass.TRANSIENT for f in failed)
    assert world.bookings()["count"] == 0


def test_an_approval_is_booked_from_itself_and_one_without_a_known_destination_dead_letters(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dispatch reads no orders: the approval carries the destination. An approval that
    does not (a v1 record) of an order dispatch never saw waits a bounded while, then
    goes to the dead-letter topic with the reason, and the partition goes on."""
    import services.dispatch

    monkeypatch.setattr(
        services.dispatch.service, "retry", RetryPolicy(initial_s=0.05, max_waits=3)
    )
    carried, unknown = make_orders(4), make_orders(1)[0]
    checks = [
        PolicyChecked(
            envelope=PolicyChecked.envelope_for(
                key=o.order_id, idempotency_key=f"policy:{o.order_id}", producer="policy-check"
            ),
            order_id=o.order_id,
            outcome=PolicyOutcome.AUTO_APPROVED,
            reason_codes=[],
            reasons=[],
            rules_version="v1",
            destination=None if o is unknown else o.destination,
        )
        for o in [unknown, *carried]
    ]
    world.producer.send_many(checks)  # and no order.received at all
    world.run_dispatch()
    events = world.dispatch_events(settled({o.order_id for o in carried}))
    assert {e.order_id for e in events if isinstance(e, DispatchExecuted)} == {
        o.order_id for o in carried
    }
    assert unknown.order_id not in {e.order_id for e in events}
    assert {e.order_id: e.destination for e in events if isinstance(e, DispatchRequested)} == {
        o.order_id: o.destination for o in carried
    }
    assert world.bookings()["count"] == len(carried)
    [dead] = world.dead_letters("policy-check")
    assert dead.order_id == unknown.order_id  # type: ignore[attr-defined]


def test_a_second_approval_of_a_dispatched_order_books_nothing_more(world: World) -> None:
    orders = make_orders(5)
    world.approve(orders)
    world.run_dispatch()
    ids = {o.order_id for o in orders}
    world.dispatch_events(settled(ids))
    # The same orders approved again under other keys (a duplicate submission); read
    # once dispatch has handled the second approvals and committed all it wrote.
    world.approve(orders, key="again")
    events = world.dispatch_events(settled(ids))
    assert Counter(e.event_type for e in events)["dispatch.requested"] == 5
    assert world.bookings()["count"] == 5


@pytest.mark.process
def test_a_clean_stop_closes_the_carrier_client_and_the_pool_so_nothing_is_reported_at_exit(
    world: World,
) -> None:
    orders = make_orders(3)
    world.approve(orders)
    proc = world.start_dispatch()
    world.dispatch_events(settled({o.order_id for o in orders}))  # the carrier was called
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    output = (world.logs / "dispatch-0.log").read_text()  # its stdout and stderr
    assert '"message": "stopped"' in output, output[-3000:]
    leaks = ("Unclosed", "Task was destroyed", "Event loop is closed", "Traceback")
    assert [line for line in output.splitlines() if any(w in line for w in leaks)] == []
