"""Sending demo orders through the ingest API, as any producer would.

Orders go in batches to ``POST /events:batch`` with a bearer API key and an
``Idempotency-Key`` per batch (``demo-<run id>-<batch number>``), so a batch
retried after a timeout or a 503 is written once. At a ``rate`` the batches are
small and spaced (about ten a second); without one, they hold up to 1,000
orders (the service's limit) and follow each other as fast as it answers.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from typing import Any

import httpx

from opsflow.errors import ConfigurationError, PermanentError, RetryableError
from services.demo.orders import DemoOrder

MAX_BATCH = 1000
"""The most events the ingest service takes in one batch (its default limit)."""

_BAD_KEY_HINT = (
    "Create one with `opsflow keys create --producer demo` and pass it with --api-key "
    "or OPSFLOW_API_KEY (or leave both unset to let the demo make one in DATABASE_URL)"
)


class IngestClient:
    """A producer of the ingest API.

    Args:
        url: the service's base URL (``INGEST_URL``).
        api_key: a key from ``opsflow keys create``.
        attempts: tries per batch on a timeout, 409 or 503, with growing pauses.
    """

    def __init__(self, url: str, api_key: str, *, attempts: int = 5) -> None:
        self.url = url.rstrip("/")
        self._attempts = attempts
        self._http = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=httpx.Timeout(60.0, connect=5.0),
        )

    def check(self) -> None:
        """Make sure the service answers and takes the key, before anything is sent.

        The key is checked with an empty batch: the service authenticates first,
        then refuses the batch (422) without writing anything.

        Raises:
            ConfigurationError: nothing answers at the URL, or the key is refused.
        """
        try:
            health = self._http.get("/healthz", timeout=5.0)
            probe = self._http.post("/events:batch", json={"events": []}, timeout=10.0)
        except httpx.TransportError as err:
            raise ConfigurationError(
                "INGEST_URL",
                f"the ingest service does not answer at {self.url} ({err})",
                "Start the stack with `opsflow up --detach` (it runs the ingest service), "
                "or point INGEST_URL or --ingest-url at a running one",
            ) from err
        if health.status_code != 200 or probe.status_code not in (401, 422):
            raise ConfigurationError(
                "INGEST_URL",
                f"{self.url} does not answer like the opsflow ingest service "
                f"(GET /healthz: {health.status_code}, POST /events:batch: {probe.status_code})",
                "Point INGEST_URL or --ingest-url at the ingest service",
            )
        if probe.status_code == 401:
            raise ConfigurationError(
                "OPSFLOW_API_KEY", "the ingest service refused the API key", _BAD_KEY_HINT
            )

    def send(self, orders: Sequence[DemoOrder], idempotency_key: str) -> None:
        """Write one batch of orders; returns once the broker has acknowledged all of them.

        Raises:
            ConfigurationError: the key was refused (revoked while running).
            RetryableError: the service did not take the batch after every attempt.
            PermanentError: the service refused the batch (a bug in the demo's orders).
        """
        body: dict[str, Any] = {
            "events": [{"event_type": "order.received", "event": o.as_json()} for o in orders]
        }
        headers = {"Idempotency-Key": idempotency_key}
        failure = ""
        for attempt in range(self._attempts):
            if attempt:
                time.sleep(min(0.5 * 2**attempt, 8.0))
            try:
                response = self._http.post("/events:batch", json=body, headers=headers)
            except httpx.TransportError as err:
                failure = f"{type(err).__name__}: {err}"
                continue
            if response.status_code == 202:
                return
            if response.status_code in (409, 503):
                failure = f"{response.status_code}: {_detail(response)}"
                continue
            if response.status_code == 401:
                raise ConfigurationError(
                    "OPSFLOW_API_KEY", "the ingest service refused the API key", _BAD_KEY_HINT
                )
            raise PermanentError(
                f"the ingest service refused batch {idempotency_key} "
                f"({response.status_code}: {_detail(response)})"
            )
        raise RetryableError(
            f"the ingest service at {self.url} did not take batch {idempotency_key} "
            f"after {self._attempts} attempts ({failure}); is it running (`opsflow status`)?"
        )

    def close(self) -> None:
        self._http.close()


def _detail(response: httpx.Response) -> str:
    """The problem's ``detail`` (RFC 9457), or the start of whatever came back."""
    try:
        return str(response.json()["detail"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200]


class Sender(threading.Thread):
    """Sends the orders in the background, so the tracker follows them while they go.

    ``sent`` counts the orders the service acknowledged; ``error`` holds what
    stopped the sending, if anything; ``stop()`` ends it after the current batch.

    Args:
        rate: orders per second, or None for as fast as the service takes them.
    """

    def __init__(
        self,
        client: IngestClient,
        orders: Sequence[DemoOrder],
        *,
        run_id: str,
        rate: float | None,
    ) -> None:
        super().__init__(name="opsflow-demo-sender", daemon=True)
        self.client = client
        self.orders = orders
        self.run_id = run_id
        self.rate = rate
        self.sent = 0
        self.error: BaseException | None = None
        self._halt = threading.Event()

    @property
    def batch_size(self) -> int:
        """Orders per batch: about a tenth of a second's worth at a rate, else the most."""
        if self.rate is None:
            return MAX_BATCH
        return max(1, min(MAX_BATCH, math.ceil(self.rate / 10)))

    def run(self) -> None:
        size = self.batch_size
        due = time.monotonic()
        try:
            for number, start in enumerate(range(0, len(self.orders), size)):
                batch = self.orders[start : start + size]
                if self.rate is not None:
                    # Paced by a schedule, not by sleeping after each send, so slow
                    # answers do not lower the rate (until the service is the limit).
                    if self._halt.wait(max(due - time.monotonic(), 0.0)):
                        return
                    due += len(batch) / self.rate
                if self._halt.is_set():
                    return
                self.client.send(batch, f"demo-{self.run_id}-{number}")
                self.sent += len(batch)
        except BaseException as err:  # handed to the main thread, which raises it
            self.error = err

    def stop(self) -> None:
        """Send no more batches."""
        self._halt.set()
