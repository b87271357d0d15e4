"""The proof-of-delivery webhook on the real stack: PODs of dispatched orders become
pod.captured once; refused PODs are answered with a problem and recorded on pod-rejects.

Two real processes serve the module, as in production: the webhook
(``python -m services.pod_capture`` under uvicorn, on a free loopback port) and
the runtime service that keeps the dispatched bookings
(``opsflow run services.pod_capture``), with topics (``OPSFLOW_TOPIC_PREFIX``)
and a database schema of their own. The tests publish ``dispatch.executed``
with the producer SDK, as the dispatch service would, and use fresh order ids
and booking references, so each counts only its own records.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient

from opsflow.apikeys import create_key
from opsflow.contracts import Event
from opsflow.contracts.wire import WireCodec
from opsflow.db import migrate
from opsflow.producer import Producer, body_model, event_id_for
from services.contracts import DispatchExecuted, PodCaptured, PodRejected, PodRejectionCode
from tests.support.pods import pod_capture_running
from tests.support.stack import (
    QUICK_JOIN_ENV,
    Stack,
    create_schema,
    drop_schema,
    free_port,
    start_service,
    stop_process,
)
from tests.support.topics import fresh_topics, records_on

ROOT = Path(__file__).resolve().parents[1]
PROBLEM = "application/problem+json"
CARRIER = "simcarrier"
CALLER = "carrier"  # the producer of the webhook's API key: the one pod.captured names
MATCH_WAIT_S = 3.0
MAX_BODY = 4096


@dataclass
class Pods:
    url: str
    prefix: str
    bootstrap: str
    database_url: str
    env: dict[str, str]
    key: str
    dispatcher: Producer
    codec: WireCodec

    def dispatch(
        self, *, order_id: str | None = None, booking_reference: str | None = None
    ) -> dict[str, Any]:
        """Publish a dispatch.executed (of a fresh order and booking unless given), as the
        dispatch service does."""
        order_id = order_id or f"ord-{uuid.uuid4().hex[:12]}"
        fields = {
            "order_id": order_id,
            "dispatch_id": f"dsp-{order_id}",
            "carrier": CARRIER,
            "attempt": 1,
            "booking_reference": booking_reference or f"BK-{uuid.uuid4().hex[:16].upper()}",
        }
        self.dispatcher.send(
            body_model(DispatchExecuted).model_validate(fields),
            idempotency_key=f"dispatch.executed/{order_id}",
        )
        return fields

    def post(self, body: Any, *, key: str | None = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key or self.key}"}
        return httpx.post(f"{self.url}/pods", json=body, headers=headers, timeout=30)

    def events(self, topic: str, order_id: str | None) -> list[Event]:
        """The events of ``order_id`` (None: of every order) on ``topic`` (without the prefix)."""
        keys = None if order_id is None else [order_id]
        records = records_on(self.bootstrap, f"{self.prefix}{topic}", keys=keys)
        return [self.codec.decode(record.value()) for record in records]


def pods_key(pods: Pods, producer: str) -> str:
    """A fresh, valid API key of ``producer``."""
    with psycopg.connect(pods.database_url) as conn:
        return create_key(conn, producer).secret


def pod_of(dispatch: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """The POD a carrier sends for ``dispatch``."""
    body = {
        "carrier": dispatch["carrier"],
        "booking_reference": dispatch["booking_reference"],
        "order_id": dispatch["order_id"],
        "delivered_at": "2025-03-14T16:02:11.250+01:00",
        "received_by": "A. Jensen",
        "signature_ref": f"sig-{dispatch['booking_reference']}",
    }
    body.update(changes)
    return body


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    problem: dict[str, Any] = response.json()
    assert problem["status"] == status and problem["title"] and problem["detail"]
    return problem


@pytest.fixture(scope="module")
def pods(
    stack: Stack,
    bootstrap_servers: str,
    registry_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Pods]:
    # Both processes share one schema of the stack's database (the `database_url`
    # fixture makes one per test), and topics of their own.
    base = stack.address("DATABASE_URL")
    schema, database_url = create_schema(base)
    migrate(database_url)
    prefix = fresh_topics(bootstrap_servers, "pod")
    logs = tmp_path_factory.mktemp("pod-capture")
    env = {
        **stack.env,
        **stack.addresses(),
        **QUICK_JOIN_ENV,
        "DATABASE_URL": database_url,
        "OPSFLOW_TOPIC_PREFIX": prefix,
    }
    dispatcher = Producer(
        "dispatch",
        bootstrap_servers=bootstrap_servers,
        registry_url=registry_url,
        topic_prefix=prefix,
    )
    try:
        with pod_capture_running(
            env, logs, POD_MATCH_WAIT_S=str(MATCH_WAIT_S), POD_MAX_BODY_BYTES=str(MAX_BODY)
        ) as url:
            key = stack.run("keys", "create", "--producer", CALLER, DATABASE_URL=database_url)
            yield Pods(
                url,
                prefix,
                bootstrap_servers,
                database_url,
                env,
                key.stdout.strip(),
                dispatcher,
                WireCodec(SchemaRegistryClient({"url": registry_url})),
            )
    finally:
        dispatcher.close()
        drop_schema(base, schema)


def test_a_pod_of_a_dispatched_order_is_captured_once_under_the_callers_producer(
    pods: Pods,
) -> None:
    dispatch = pods.dispatch()
    # The same booking again (a replay, or the dispatch service's retry) changes nothing.
    pods.dispatch(order_id=dispatch["order_id"], booking_reference=dispatch["booking_reference"])
    body = pod_of(dispatch)
    response = pods.post(body)

    assert response.status_code == 201, response.text
    answer = response.json()
    key = f"pod.captured/{CARRIER}/{dispatch['booking_reference']}"
    assert answer["event_id"] == str(event_id_for(CALLER, key))
    assert answer["topic"] == f"{pods.prefix}pod"
    (event,) = pods.events("pod", dispatch["order_id"])
    assert isinstance(event, PodCaptured)
    assert str(event.envelope.event_id) == answer["event_id"]
    assert event.envelope.producer == CALLER
    assert event.envelope.correlation_id == dispatch["order_id"]
    assert event.envelope.idempotency_key == key
    assert event.model_dump(mode="json", exclude={"envelope"}) == {
        **body,
        "delivered_at": "2025-03-14T15:02:11.250000Z",
        "photo_ref": None,
    }
    with psycopg.connect(pods.database_url) as conn:
        (rows,) = conn.execute(
            "SELECT count(*) FROM pod_capture_dispatches WHERE order_id = %s",
            (dispatch["order_id"],),
        ).fetchone() or (0,)
    assert rows == 1


def test_a_repeated_pod_gets_200_with_the_first_answer_and_writes_nothing(pods: Pods) -> None:
    dispatch = pods.dispatch()
    body = pod_of(dispatch)
    first = pods.post(body)
    with ThreadPoolExecutor(4) as pool:
        repeats = list(pool.map(lambda _: pods.post(body), range(4)))
    later = pods.post(pod_of(dispatch, received_by="front desk"))

    assert first.status_code == 201, first.text
    for repeat in [*repeats, later]:
        assert repeat.status_code == 200, repeat.text
        assert repeat.content == first.content
        assert repeat.headers["idempotent-replayed"] == "true"
    assert len(pods.events("pod", dispatch["order_id"])) == 1
    assert pods.events("pod-rejects", dispatch["order_id"]) == []


def test_a_retry_after_a_crash_before_the_capture_was_stored_writes_the_same_event_id(
    pods: Pods,
) -> None:
    dispatch = pods.dispatch()
    body = pod_of(dispatch)
    first = pods.post(body)
    # As if the webhook died after Kafka acknowledged pod.captured and before its
    # transaction stored the capture: the carrier got no answer and sends it again.
    with psycopg.connect(pods.database_url) as conn:
        conn.execute(
            "DELETE FROM pod_capture_pods WHERE booking_reference = %s",
            (dispatch["booking_reference"],),
        )
    again = pods.post(body)

    assert first.status_code == again.status_code == 201, again.text
    assert again.json()["event_id"] == first.json()["event_id"]
    written = pods.events("pod", dispatch["order_id"])
    assert [str(e.envelope.event_id) for e in written] == [first.json()["event_id"]] * 2


def test_a_pod_of_an_unknown_booking_gets_404_is_recorded_and_is_captured_if_dispatched_late(
    pods: Pods,
) -> None:
    order_id = f"ord-{uuid.uuid4().hex[:12]}"
    booking = f"BK-LATE-{uuid.uuid4().hex[:8].upper()}"
    body = pod_of({"carrier": CARRIER, "booking_reference": booking, "order_id": order_id})
    started = time.monotonic()
    problem = assert_problem(pods.post(body), 404)

    assert time.monotonic() - started >= MATCH_WAIT_S  # it waited for a late dispatch record
    assert problem["type"] == "/problems/unknown-booking"
    assert booking in problem["detail"]
    (rejected,) = pods.events("pod-rejects", order_id)
    assert isinstance(rejected, PodRejected)
    assert rejected.reason_code is PodRejectionCode.UNKNOWN_BOOKING
    assert (rejected.carrier, rejected.booking_reference) == (CARRIER, booking)
    assert rejected.envelope.producer == CALLER
    assert str(rejected.envelope.event_id) in problem["detail"]
    assert pods.events("pod", order_id) == []

    # Dispatch recorded its booking only now (it died between booking and recording
    # it): the kept POD is captured as if it had arrived now.
    pods.dispatch(order_id=order_id, booking_reference=booking)
    deadline = time.monotonic() + 20
    while not (captured := pods.events("pod", order_id)):
        assert time.monotonic() < deadline, "the kept POD was never captured"
        time.sleep(0.3)
    (event,) = captured
    key = f"pod.captured/{CARRIER}/{booking}"
    assert event.envelope.event_id == event_id_for(CALLER, key)
    again = pods.post(body)
    assert again.status_code == 200, again.text
    assert again.json()["event_id"] == str(event.envelope.event_id)


def test_a_pod_naming_another_order_or_carrier_gets_409_that_reveals_neither_and_is_recorded(
    pods: Pods,
) -> None:
    dispatch = pods.dispatch()
    other_order = f"ord-{uuid.uuid4().hex[:12]}"
    wrong_order = assert_problem(pods.post(pod_of(dispatch, order_id=other_order)), 409)
    wrong_carrier = assert_problem(pods.post(pod_of(dispatch, carrier="othercarrier")), 409)

    # The answers name only what the caller sent: not the order or carrier the booking
    # belongs to, so a caller cannot probe other orders through the webhook.
    assert dispatch["order_id"] not in wrong_order["detail"]
    assert CARRIER not in wrong_carrier["detail"]
    assert other_order in wrong_order["detail"]
    assert [e["field"] for e in wrong_order["errors"]] == ["order_id"]
    assert [e["field"] for e in wrong_carrier["errors"]] == ["carrier"]
    (not_dispatched,) = pods.events("pod-rejects", other_order)
    (other,) = pods.events("pod-rejects", dispatch["order_id"])
    assert isinstance(not_dispatched, PodRejected) and isinstance(other, PodRejected)
    assert not_dispatched.reason_code is PodRejectionCode.NOT_DISPATCHED
    assert other.reason_code is PodRejectionCode.OTHER
    assert pods.events("pod", dispatch["order_id"]) == []


def test_a_malformed_pod_gets_a_problem_naming_its_fields_and_is_recorded_with_its_body(
    pods: Pods,
) -> None:
    order_id = f"ord-{uuid.uuid4().hex[:12]}"
    body = pod_of({"carrier": CARRIER, "booking_reference": "BK-1", "order_id": order_id})
    body.update(delivered_at="yesterday", surprise=True)
    del body["received_by"]
    raw = httpx.Request("POST", "/", json=body).content
    problem = assert_problem(pods.post(body), 422)
    broken = httpx.post(
        f"{pods.url}/pods",
        content=b'{"order_id": "' + order_id.encode() + b'", \x00\x1b[2J',
        headers={"Authorization": f"Bearer {pods.key}", "Content-Type": "application/json"},
    )
    form = httpx.post(
        f"{pods.url}/pods",
        data={"order_id": order_id, "note": "form"},
        headers={"Authorization": f"Bearer {pods.key}"},
    )

    assert problem["type"] == "/problems/invalid-body"
    assert {e["field"] for e in problem["errors"]} == {"delivered_at", "received_by", "surprise"}
    assert assert_problem(broken, 400)["type"] == "/problems/malformed-json"
    assert_problem(form, 415)
    # The order id of the broken and the form bodies cannot be read: look at every record.
    every = pods.events("pod-rejects", None)
    payloads = {e.raw_payload for e in every if isinstance(e, PodRejected)}
    invalid = [e for e in pods.events("pod-rejects", order_id) if isinstance(e, PodRejected)]
    assert [e.reason_code for e in invalid] == [PodRejectionCode.MALFORMED]
    assert invalid[0].raw_payload == raw.decode()
    assert "received_by" in invalid[0].reason and invalid[0].booking_reference == "BK-1"
    # Its control characters (a NUL, a terminal escape) are kept as U+FFFD, so the record
    # cannot garble a terminal or a log that shows it.
    assert '{"order_id": "' + order_id + '", \ufffd\ufffd[2J' in payloads
    assert f"order_id={order_id}&note=form" in payloads


def test_pods_without_a_valid_key_get_401_and_are_not_recorded(pods: Pods) -> None:
    dispatch = pods.dispatch()
    body = pod_of(dispatch)
    missing = httpx.post(f"{pods.url}/pods", json=body)
    wrong = pods.post(body, key="ofk_000000000000_not-a-key")

    for refused in (missing, wrong):
        assert_problem(refused, 401)
        assert refused.headers["www-authenticate"].startswith('Bearer realm="opsflow pod-capture"')
    assert pods.events("pod-rejects", dispatch["order_id"]) == []
    assert pods.events("pod", dispatch["order_id"]) == []


def test_a_valid_key_that_is_not_the_carriers_gets_403_and_nothing_is_recorded(
    pods: Pods,
) -> None:
    dispatch = pods.dispatch()
    shop = pods_key(pods, "shop")
    refused = assert_problem(pods.post(pod_of(dispatch), key=shop), 403)
    malformed = assert_problem(pods.post({"order_id": dispatch["order_id"]}, key=shop), 403)

    assert "pod.captured" in refused["detail"] and "'shop'" in refused["detail"]
    assert malformed["detail"] == refused["detail"]
    assert pods.events("pod-rejects", dispatch["order_id"]) == []
    assert pods.events("pod", dispatch["order_id"]) == []


def test_a_pod_sent_just_before_its_dispatch_is_recorded_is_still_captured(pods: Pods) -> None:
    order_id = f"ord-{uuid.uuid4().hex[:12]}"
    booking = f"BK-{uuid.uuid4().hex[:16].upper()}"
    body = pod_of({"carrier": CARRIER, "booking_reference": booking, "order_id": order_id})
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(pods.post, body)
        time.sleep(0.5)  # the POD is waiting for its booking now
        pods.dispatch(order_id=order_id, booking_reference=booking)
        response = pending.result()

    assert response.status_code == 201, response.text
    assert len(pods.events("pod", order_id)) == 1
    assert pods.events("pod-rejects", order_id) == []


def test_an_oversized_pod_gets_413(pods: Pods) -> None:
    dispatch = pods.dispatch()
    response = pods.post(pod_of(dispatch, received_by="x" * MAX_BODY))

    assert_problem(response, 413)
    assert pods.events("pod", dispatch["order_id"]) == []


def test_openapi_describes_the_pod_body_and_its_problems(pods: Pods) -> None:
    spec = httpx.get(f"{pods.url}/openapi.json").json()
    operation = spec["paths"]["/pods"]["post"]
    ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    pod_schema = spec["components"]["schemas"][ref.rsplit("/", 1)[1]]

    assert set(pod_schema["required"]) == {
        "carrier",
        "booking_reference",
        "order_id",
        "delivered_at",
        "received_by",
    }
    for status in ("401", "404", "409", "413", "422"):
        assert PROBLEM in operation["responses"][status]["content"]
    assert "Problem" in spec["components"]["schemas"]
    assert httpx.get(f"{pods.url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{pods.url}/readyz").json() == {"status": "ready"}


def test_the_carrier_stand_in_delivers_a_pod_that_is_captured(pods: Pods, tmp_path: Path) -> None:
    port = free_port()
    carrier_url = f"http://127.0.0.1:{port}"
    carrier = start_service(
        ["-m", "services.carrier_sim"],
        {
            **{k: v for k, v in pods.env.items() if not k.startswith("CARRIER_")},
            "CARRIER_PORT": str(port),
            "CARRIER_NAME": CARRIER,
            "CARRIER_POD_WEBHOOK_URL": f"{pods.url}/pods",
            "CARRIER_POD_API_KEY": pods.key,
            "CARRIER_POD_DELAY_S": "0.5",
        },
        tmp_path / "carrier.log",
        f"{carrier_url}/healthz",
    )
    try:
        order_id = f"ord-{uuid.uuid4().hex[:12]}"
        booked = httpx.post(
            f"{carrier_url}/bookings",
            json={
                "order_id": order_id,
                "dispatch_id": f"dsp-{order_id}",
                "destination": {
                    "name": "Grace Hopper",
                    "street": "Hauptstr. 5",
                    "city": "Berlin",
                    "postal_code": "10115",
                    "country": "DE",
                },
            },
            headers={"Idempotency-Key": f"dispatch/{order_id}"},
        )
        assert booked.status_code == 201, booked.text
        pods.dispatch(order_id=order_id, booking_reference=booked.json()["booking_reference"])
        deadline = time.monotonic() + 20
        while not (captured := pods.events("pod", order_id)):
            assert time.monotonic() < deadline, (tmp_path / "carrier.log").read_text()[-3000:]
            time.sleep(0.3)
    finally:
        stop_process(carrier)

    (event,) = captured
    assert isinstance(event, PodCaptured)
    assert event.booking_reference == booked.json()["booking_reference"]
    assert event.carrier == CARRIER and event.envelope.producer == CALLER
    assert pods.events("pod-rejects", order_id) == []
