"""The carrier stand-in, run as a real server process and talked to over HTTP.

Most tests share one carrier (each resets the fault plan and uses its own
order ids); those that need their own configuration, a restart or a webhook
start their own. Proofs of delivery go to a small threaded HTTP server in
this process.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.carrier import CarrierProcess
from tests.support.stack import free_port

REPO = Path(__file__).resolve().parents[1]
POD_KEY = "pod-secret"


def _wait_until(condition: Callable[[], bool], *, timeout: float = 10.0, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class PodReceiver:
    """A webhook on loopback that records every proof of delivery it is sent.

    It answers by order id prefix: ``flaky-`` gets a 503 the first time, then
    204; ``reject-`` always gets 400; ``bulk-`` takes 10 ms; others get 204.
    """

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the carrier's client expects

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status = receiver.answer(body, self.headers.get("Authorization"))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/pods"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def answer(self, pod: dict[str, Any], authorization: str | None) -> int:
        order_id: str = pod["order_id"]
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            earlier = [c for c in self.calls if c["pod"]["order_id"] == order_id]
        if order_id.startswith("bulk-"):
            time.sleep(0.01)
        if order_id.startswith("reject-"):
            status = 400
        elif order_id.startswith("flaky-") and not earlier:
            status = 503
        else:
            status = 204
        with self._lock:
            self.in_flight -= 1
            self.calls.append({"pod": pod, "authorization": authorization, "status": status})
        return status

    def calls_for(self, booking_reference: str) -> list[dict[str, Any]]:
        with self._lock:
            return [c for c in self.calls if c["pod"]["booking_reference"] == booking_reference]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def booking_body(order_id: str, *, country: str = "DE", city: str = "Berlin") -> dict[str, Any]:
    return {
        "order_id": order_id,
        "dispatch_id": f"dsp-{order_id}",
        "destination": {
            "name": "Ada Lovelace",
            "street": "Unter den Linden 1",
            "city": city,
            "postal_code": "10117",
            "country": country,
        },
        "reference": "fragile",
    }


def book(
    client: httpx.Client, key: str | None, body: dict[str, Any], **kwargs: Any
) -> httpx.Response:
    headers = {} if key is None else {"Idempotency-Key": key}
    return client.post("/bookings", json=body, headers=headers, **kwargs)


def bookings_of(client: httpx.Client, order_id: str) -> list[dict[str, Any]]:
    listing = client.get("/bookings", params={"order_id": order_id}).json()
    bookings: list[dict[str, Any]] = listing["bookings"]
    return bookings


def new_id(prefix: str = "ord") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def start_carrier(tmp_path: Path) -> Iterator[Callable[..., CarrierProcess]]:
    """Start carriers with extra variables; every one is stopped after the test."""
    started: list[CarrierProcess] = []

    def start(**env: str) -> CarrierProcess:
        carrier = CarrierProcess(tmp_path / f"carrier-{len(started)}.log", env).start()
        started.append(carrier)
        return carrier

    yield start
    for carrier in started:
        carrier.stop()


@pytest.fixture(scope="module")
def shared_carrier(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CarrierProcess]:
    log = tmp_path_factory.mktemp("carrier") / "carrier.log"
    carrier = CarrierProcess(log, {"CARRIER_LOG_LEVEL": "WARNING"}).start()
    yield carrier
    carrier.stop()


@pytest.fixture
def carrier(shared_carrier: CarrierProcess) -> Iterator[httpx.Client]:
    """A client of the shared carrier, whose fault plan is reset to "no faults"."""
    with httpx.Client(base_url=shared_carrier.url, timeout=10) as client:
        assert client.put("/faults", json={}).status_code == 200
        yield client


@pytest.fixture(scope="module")
def pod_receiver() -> Iterator[PodReceiver]:
    receiver = PodReceiver()
    yield receiver
    receiver.close()


@pytest.fixture(scope="module")
def pod_carrier(
    tmp_path_factory: pytest.TempPathFactory, pod_receiver: PodReceiver
) -> Iterator[httpx.Client]:
    """A carrier that sends proofs of delivery to ``pod_receiver``, quickly and 4 at a time."""
    log = tmp_path_factory.mktemp("pod-carrier") / "carrier.log"
    carrier = CarrierProcess(
        log,
        {
            "CARRIER_NAME": "testcarrier",
            "CARRIER_POD_WEBHOOK_URL": pod_receiver.url,
            "CARRIER_POD_API_KEY": POD_KEY,
            "CARRIER_POD_DELAY_S": "0.2",
            "CARRIER_POD_CONCURRENCY": "4",
            "CARRIER_POD_BACKOFF_S": "0.1",
            "CARRIER_POD_BACKOFF_MAX_S": "0.5",
        },
    ).start()
    with httpx.Client(base_url=carrier.url, timeout=10) as client:
        yield client
    carrier.stop()


def test_repeated_booking_returns_the_first_answer_and_counts_requests(
    carrier: httpx.Client,
) -> None:
    order_id, key = new_id(), new_id("key")
    first = book(carrier, key, booking_body(order_id))
    again = book(carrier, key, booking_body(order_id))

    assert first.status_code == 201
    assert again.status_code == 200
    assert again.content == first.content
    confirmation = first.json()
    reference = confirmation["booking_reference"]
    assert reference.startswith("BK-")
    assert confirmation["order_id"] == order_id
    assert confirmation["tracking_url"].endswith(f"/bookings/{reference}")
    created = datetime.fromisoformat(confirmation["created_at"])
    assert created.utcoffset() == timedelta(0)
    assert datetime.fromisoformat(confirmation["estimated_delivery_at"]) > created
    [booking] = bookings_of(carrier, order_id)
    assert booking["booking_reference"] == reference
    assert booking["idempotency_key"] == key
    assert booking["requests"] == 2
    assert carrier.get(f"/bookings/{reference}").json()["requests"] == 2


def test_same_key_with_another_body_is_refused_and_keeps_the_first_booking(
    carrier: httpx.Client,
) -> None:
    order_id, key = new_id(), new_id("key")
    first = book(carrier, key, booking_body(order_id))
    other = book(carrier, key, booking_body(order_id, city="Hamburg"))

    assert other.status_code == 422
    assert other.headers["content-type"] == "application/problem+json"
    assert other.json()["type"].endswith("/idempotency-key-reused")
    assert other.json()["retryable"] is False
    [booking] = bookings_of(carrier, order_id)
    assert booking["booking_reference"] == first.json()["booking_reference"]


def test_refused_destination_is_a_permanent_problem_and_books_nothing(
    carrier: httpx.Client,
) -> None:
    carrier.put("/faults", json={"refused_countries": ["kp"], "refused_cities": ["Atlantis"]})
    by_country, by_city = new_id(), new_id()

    country = book(carrier, new_id("key"), booking_body(by_country, country="KP"))
    city = book(carrier, new_id("key"), booking_body(by_city, city="ATLANTIS"))

    for refused in (country, city):
        assert refused.status_code == 422
        assert refused.headers["content-type"] == "application/problem+json"
        problem = refused.json()
        assert problem["status"] == 422
        assert problem["type"].endswith("/refused-destination")
        assert problem["retryable"] is False
    assert "'KP'" in country.json()["detail"]
    assert "'ATLANTIS'" in city.json()["detail"]
    assert bookings_of(carrier, by_country) == bookings_of(carrier, by_city) == []


def test_booking_without_idempotency_key_is_a_bad_request_and_books_nothing(
    carrier: httpx.Client,
) -> None:
    order_id = new_id()
    response = book(carrier, None, booking_body(order_id))

    assert response.status_code == 400
    assert response.headers["content-type"] == "application/problem+json"
    assert "Idempotency-Key" in response.json()["detail"]
    assert bookings_of(carrier, order_id) == []


def test_invalid_booking_names_the_wrong_fields(carrier: httpx.Client) -> None:
    body = booking_body(new_id())
    del body["destination"]["city"]
    body["dispatch_id"] = 42

    response = book(carrier, new_id("key"), body)

    assert response.status_code == 422
    fields = {error["field"] for error in response.json()["errors"]}
    assert fields == {"destination.city", "dispatch_id"}
    assert "destination.city" in response.json()["detail"]


def test_injected_errors_follow_the_rate_and_replay_with_the_same_seed(
    carrier: httpx.Client,
) -> None:
    plan = {"error_rate": 0.3, "seed": 1234}

    def run() -> list[int]:
        carrier.put("/faults", json=plan)
        statuses = []
        for _ in range(200):
            order_id = new_id("rate")
            statuses.append(book(carrier, new_id("key"), booking_body(order_id)).status_code)
            if statuses[-1] == 503:
                assert bookings_of(carrier, order_id) == []  # refused before recording
        return statuses

    first, second = run(), run()

    assert set(first) == {201, 503}
    assert 35 <= first.count(503) <= 85  # 60 expected; 4 standard deviations either side
    assert second == first


def test_injected_timeout_answers_504_after_the_delay_and_books_nothing(
    carrier: httpx.Client,
) -> None:
    carrier.put("/faults", json={"timeout_rate": 1, "timeout_s": 0.3})
    order_id = new_id()

    started = time.monotonic()
    response = book(carrier, new_id("key"), booking_body(order_id))

    assert time.monotonic() - started >= 0.3
    assert response.status_code == 504
    assert response.json()["retryable"] is True
    assert bookings_of(carrier, order_id) == []


def test_ghost_booking_is_recorded_and_the_retry_returns_it(carrier: httpx.Client) -> None:
    carrier.put("/faults", json={"ghost_rate": 1})
    order_id, key = new_id(), new_id("key")

    lost = book(carrier, key, booking_body(order_id))
    [recorded] = bookings_of(carrier, order_id)
    retry = book(carrier, key, booking_body(order_id))  # ghosts hit new bookings only

    assert lost.status_code == 503
    assert retry.status_code == 200
    assert retry.json()["booking_reference"] == recorded["booking_reference"]
    [booking] = bookings_of(carrier, order_id)
    assert booking["requests"] == 2


def test_ghost_timeout_leaves_the_client_waiting_but_the_booking_exists(
    carrier: httpx.Client,
) -> None:
    carrier.put("/faults", json={"ghost_rate": 1, "ghost_mode": "timeout", "timeout_s": 3})
    order_id, key = new_id(), new_id("key")

    with pytest.raises(httpx.ReadTimeout):
        book(carrier, key, booking_body(order_id), timeout=0.5)
    carrier.put("/faults", json={})
    retry = book(carrier, key, booking_body(order_id))

    assert retry.status_code == 200
    [booking] = bookings_of(carrier, order_id)
    assert booking["booking_reference"] == retry.json()["booking_reference"]


def test_concurrent_identical_requests_make_one_booking(
    carrier: httpx.Client, shared_carrier: CarrierProcess
) -> None:
    # Every request waits inside the carrier first, so all 20 are in flight together.
    carrier.put("/faults", json={"slow_rate": 1, "slow_s": 0.3})
    order_id, key = new_id(), new_id("key")

    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=20)
        async with httpx.AsyncClient(base_url=shared_carrier.url, limits=limits) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        "/bookings", json=booking_body(order_id), headers={"Idempotency-Key": key}
                    )
                    for _ in range(20)
                )
            )

    responses = asyncio.run(burst())

    assert sorted(r.status_code for r in responses) == [200] * 19 + [201]
    assert len({r.content for r in responses}) == 1
    [booking] = bookings_of(carrier, order_id)
    assert booking["requests"] == 20


def test_duplicates_view_lists_orders_booked_under_two_keys(carrier: httpx.Client) -> None:
    twice, once = new_id("twice"), new_id("once")
    references = [
        book(carrier, new_id("key"), booking_body(twice)).json()["booking_reference"]
        for _ in range(2)
    ]
    book(carrier, new_id("key"), booking_body(once))

    view = carrier.get("/bookings/duplicates").json()
    listed = carrier.get("/bookings").json()

    assert {"order_id": twice, "booking_references": references} in view["duplicates"]
    assert once not in {entry["order_id"] for entry in view["duplicates"]}
    assert listed["duplicates"] == view["duplicates"]
    assert listed["count"] == len(listed["bookings"])
    missing = carrier.get("/bookings/BK-NOSUCHBOOKING")
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/problem+json"


@pytest.mark.process
def test_restarted_carrier_keeps_bookings_and_sends_pending_proofs(
    start_carrier: Callable[..., CarrierProcess], pod_receiver: PodReceiver, tmp_path: Path
) -> None:
    db = str(tmp_path / "carrier.db")
    order_id, key = new_id(), new_id("key")
    # First run: the webhook is a closed port, so the proof of delivery stays pending.
    first = start_carrier(
        CARRIER_DB=db,
        CARRIER_POD_WEBHOOK_URL=f"http://127.0.0.1:{free_port()}/pods",
        CARRIER_POD_DELAY_S="0",
    )
    with httpx.Client(base_url=first.url) as client:
        original = book(client, key, booking_body(order_id))
        assert original.status_code == 201
        reference = original.json()["booking_reference"]
        assert client.get(f"/bookings/{reference}").json()["pod_status"] == "pending"
    first.stop()

    second = start_carrier(
        CARRIER_DB=db, CARRIER_POD_WEBHOOK_URL=pod_receiver.url, CARRIER_POD_DELAY_S="0"
    )
    with httpx.Client(base_url=second.url) as client:
        repeat = book(client, key, booking_body(order_id))
        listing = client.get("/bookings").json()
        _wait_until(lambda: bool(pod_receiver.calls_for(reference)), what="the pending proof")

    assert repeat.status_code == 200
    assert repeat.content == original.content
    assert [b["booking_reference"] for b in listing["bookings"]] == [reference]
    assert listing["bookings"][0]["requests"] == 2


def test_fault_plan_and_refusals_come_from_the_environment(
    start_carrier: Callable[..., CarrierProcess],
) -> None:
    carrier = start_carrier(
        CARRIER_ERROR_RATE="0.25",
        CARRIER_SEED="7",
        CARRIER_GHOST_MODE="timeout",
        CARRIER_REFUSED_COUNTRIES="kp, IR",
        CARRIER_REFUSED_CITIES="Atlantis",
    )
    with httpx.Client(base_url=carrier.url) as client:
        plan = client.get("/faults").json()
        # PATCH changes one field and keeps the others.
        client.patch("/faults", json={"error_rate": 0})
        refused = book(client, new_id("key"), booking_body(new_id(), country="ir"))
        after = client.get("/faults").json()

    assert plan["error_rate"] == 0.25
    assert plan["seed"] == 7
    assert plan["ghost_mode"] == "timeout"
    assert plan["refused_countries"] == ["KP", "IR"]
    assert plan["refused_cities"] == ["atlantis"]
    assert refused.status_code == 422
    assert after == {**plan, "error_rate": 0}


@pytest.mark.process
def test_invalid_variable_stops_the_carrier_with_one_line_naming_it(tmp_path: Path) -> None:
    carrier = CarrierProcess(tmp_path / "bad.log", {"CARRIER_ERROR_RATE": "2"})

    result = subprocess.run(
        [sys.executable, "-m", "services.carrier_sim"],
        cwd=REPO,
        env=carrier.env,
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: CARRIER_ERROR_RATE: Input should be less than or equal to 1"
    ]


def test_proof_of_delivery_is_retried_after_5xx_and_carries_the_bearer_key(
    pod_carrier: httpx.Client, pod_receiver: PodReceiver
) -> None:
    order_id = new_id("flaky")
    confirmation = book(pod_carrier, new_id("key"), booking_body(order_id)).json()
    reference = confirmation["booking_reference"]

    _wait_until(lambda: len(pod_receiver.calls_for(reference)) >= 2, what="the retried proof")
    _wait_until(
        lambda: pod_carrier.get(f"/bookings/{reference}").json()["pod_status"] == "delivered",
        what="the delivered state",
    )

    calls = pod_receiver.calls_for(reference)
    assert [call["status"] for call in calls] == [503, 204]
    assert {call["authorization"] for call in calls} == {f"Bearer {POD_KEY}"}
    assert calls[0]["pod"] == calls[1]["pod"]
    pod = calls[0]["pod"]
    assert pod["carrier"] == "testcarrier"
    assert pod["order_id"] == order_id
    assert pod["signature_ref"] == f"sig-{reference}"
    assert pod["received_by"]
    delivered = datetime.fromisoformat(pod["delivered_at"])
    assert delivered.utcoffset() == timedelta(0)
    assert delivered > datetime.fromisoformat(confirmation["created_at"])


def test_proof_of_delivery_refused_with_4xx_is_not_retried(
    pod_carrier: httpx.Client, pod_receiver: PodReceiver
) -> None:
    reference = book(pod_carrier, new_id("key"), booking_body(new_id("reject"))).json()[
        "booking_reference"
    ]

    _wait_until(
        lambda: pod_carrier.get(f"/bookings/{reference}").json()["pod_status"] == "rejected",
        what="the rejected state",
    )
    time.sleep(0.5)  # several backoff periods: a retry would have come by now

    assert [call["status"] for call in pod_receiver.calls_for(reference)] == [400]


def test_every_proof_of_delivery_arrives_with_bounded_concurrency(
    pod_carrier: httpx.Client, pod_receiver: PodReceiver
) -> None:
    references = {
        book(pod_carrier, new_id("key"), booking_body(new_id("bulk"))).json()["booking_reference"]
        for _ in range(300)
    }

    def delivered() -> set[str]:
        return {
            call["pod"]["booking_reference"]
            for call in list(pod_receiver.calls)
            if call["status"] == 204
        }

    _wait_until(lambda: references <= delivered(), timeout=20, what="all 300 proofs")

    assert 1 < pod_receiver.max_in_flight <= 4
    assert pod_carrier.get("/pods").json()["pending"] == 0
