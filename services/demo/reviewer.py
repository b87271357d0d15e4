"""The demo's reviewer (``opsflow demo --auto-review``): decides the run's review tasks
through the review service's HTTP API, as a person at the review desk would.

**What it decides is planned from the seed.** ``review_plan`` splits the run's
review orders by ``VERDICT_SHARES`` (rounded like the scenario mix, so a small
run still shows each kind) in an order shuffled by the seed: the same seed
approves, rejects and leaves alone the same orders. The orders it leaves alone
stay open; the review service escalates them to supervisors when their SLA
runs out (hours: the demo does not wait for that). An approved order whose
address is incomplete goes on to dispatch and is refused by the carrier, as it
would be for a person who approved it.

**It acts like anyone else on the desk.** It lists the open tasks
(``GET /tasks``), claims one of the run's, then approves or rejects it with a
reason. A 409 means someone else holds or decided the task, a 403 that it was
escalated to supervisors: either way it is not the demo's to decide any more,
and is skipped. It is a desk of a few people, not one: four tasks are decided
at once (one at a time, each decision two writes the broker acknowledges, a
1,000-order run waited about 11 s on its ~180 decisions).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from enum import StrEnum
from types import MappingProxyType
from typing import Any

import httpx

from opsflow.errors import ConfigurationError, PermanentError, RetryableError
from services.demo.orders import Category, DemoOrder, allocate


class Verdict(StrEnum):
    """What the demo's reviewer does with a review order."""

    APPROVE = "approve"
    REJECT = "reject"
    LEAVE = "leave"
    """Not decided: it waits for a person, and escalates once its SLA runs out."""


VERDICT_SHARES: Mapping[Verdict, float] = MappingProxyType(
    {Verdict.APPROVE: 0.63, Verdict.REJECT: 0.27, Verdict.LEAVE: 0.10}
)
"""Of the review orders: a tenth left open, the rest approved and rejected 70/30."""

# Why a reviewer approves or rejects, by the policy rule that asked for the review.
_REASONS: Mapping[str, tuple[str, str]] = MappingProxyType(
    {
        "CUSTOMER_HIGH_RISK": (
            "Customer identity and payment verified by phone.",
            "Could not verify the customer's identity or payment.",
        ),
        "AMOUNT_OVER_LIMIT": (
            "Large order confirmed with the customer's purchasing contact.",
            "The customer did not confirm an order of this size.",
        ),
        "MEDIUM_RISK_OVER_LIMIT": (
            "Amount in line with the customer's order history.",
            "Amount well above the customer's usual orders; not confirmed.",
        ),
        "DESTINATION_RESTRICTED_REGION": (
            "Consignee passed the export screening.",
            "Consignee failed the export screening for the region.",
        ),
        "ADDRESS_INCOMPLETE": (
            "Address accepted as given; the customer was asked for the postal code.",
            "Address cannot be completed; the customer does not answer.",
        ),
    }
)
_DEFAULT_REASONS = ("Checked and found in order.", "Does not meet the order policy.")
_SIGNATURE = " (opsflow demo --auto-review)"

AUTO_REVIEWER_DISPLAY_NAME = "opsflow demo (auto-review)"
"""How review events name a reviewer the demo makes for itself."""

_BAD_TOKEN_HINT = (
    "Create a reviewer with `opsflow users create NAME --role reviewer` and pass the token "
    "with --reviewer-token or OPSFLOW_REVIEWER_TOKEN (or leave both unset to let the demo "
    "make one in DATABASE_URL)"
)


def review_plan(orders: Sequence[DemoOrder], *, seed: int) -> dict[str, Verdict]:
    """What the demo's reviewer does with each review order of a run, by order id.

    A pure function of the orders and the seed: the same seed gives the same plan,
    whatever the run id. Orders of other categories are not in the plan.
    """
    review = [o.order_id for o in orders if o.scenario.category is Category.REVIEW]
    verdicts = [v for v, n in allocate(len(review), VERDICT_SHARES).items() for _ in range(n)]
    # A generator of its own, so the plan does not shift the orders drawn from the seed.
    random.Random(f"auto-review:{seed}").shuffle(verdicts)
    return dict(zip(review, verdicts, strict=True))


def reason_for(verdict: Verdict, reason_codes: Sequence[str]) -> str:
    """The reason recorded with a decision: what a person would write for the rule that
    asked for the review (the first one with a known reason)."""
    approve, reject = next(
        (_REASONS[code] for code in reason_codes if code in _REASONS), _DEFAULT_REASONS
    )
    return (approve if verdict is Verdict.APPROVE else reject) + _SIGNATURE


class Acted(StrEnum):
    """How one attempt to decide a task went."""

    DECIDED = "decided"
    SKIPPED = "skipped"
    """Someone else holds or decided it, or it is for supervisors now."""
    RETRY = "retry"
    """The service could not answer now (still reading its topic, broker down)."""


class ReviewClient:
    """A reviewer at the review service's HTTP API.

    Args:
        url: the service's base URL (``REVIEW_URL``).
        token: a reviewer's bearer token (``opsflow users create NAME --role reviewer``).
    """

    def __init__(self, url: str, token: str) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(30.0, connect=5.0),
        )

    def check(self) -> None:
        """Make sure the review service answers and takes the token, before orders are sent.

        Raises:
            ConfigurationError: nothing answers at the URL, it is not the review service,
                or the token is refused.
        """
        try:
            health = self._http.get("/healthz", timeout=5.0)
            listing = self._http.get("/tasks", params={"status": "open"}, timeout=10.0)
        except httpx.TransportError as err:
            raise ConfigurationError(
                "REVIEW_URL",
                f"the review service does not answer at {self.url} ({err})",
                "Start the stack with `opsflow up --detach` (it runs the review service), "
                "or point REVIEW_URL or --review-url at a running one",
            ) from err
        # 503: it is still reading the review topic, which is fine to start with.
        if health.status_code != 200 or listing.status_code not in (200, 401, 503):
            raise ConfigurationError(
                "REVIEW_URL",
                f"{self.url} does not answer like the opsflow review service "
                f"(GET /healthz: {health.status_code}, GET /tasks: {listing.status_code})",
                "Point REVIEW_URL or --review-url at the review service",
            )
        if listing.status_code == 401:
            raise ConfigurationError(
                "OPSFLOW_REVIEWER_TOKEN", "the review service refused the token", _BAD_TOKEN_HINT
            )

    def open_tasks(self) -> list[dict[str, Any]] | None:
        """Every open task, soonest due first; None when the service cannot answer now.

        Raises:
            ConfigurationError: the token was refused (revoked while running).
        """
        try:
            response = self._http.get("/tasks", params={"status": "open"})
        except httpx.TransportError:
            return None
        if response.status_code == 200:
            tasks: list[dict[str, Any]] = response.json()["tasks"]
            return tasks
        self._refused(response)
        return None

    def decide(self, task: Mapping[str, Any], verdict: Verdict) -> Acted:
        """Claim ``task``, then approve or reject it with the reason ``reason_for`` gives.

        Raises:
            ConfigurationError: the token was refused.
            PermanentError: the service refused the request itself (a bug in the demo).
        """
        assert verdict is not Verdict.LEAVE, "tasks left alone are not acted on"
        task_id = str(task["task_id"])
        reason = reason_for(verdict, task.get("reason_codes") or [])
        for path, body in (
            ("claim", None),
            (verdict.value, {"reason": reason}),
        ):
            try:
                response = self._http.post(f"/tasks/{task_id}/{path}", json=body)
            except httpx.TransportError:
                return Acted.RETRY
            if response.status_code in (403, 404, 409):
                return Acted.SKIPPED
            if response.status_code != 200:
                self._refused(response)
                if response.status_code in (422, 400, 413, 415):
                    raise PermanentError(
                        f"the review service refused to {path} task {task_id} "
                        f"({response.status_code}: {response.text[:200]})"
                    )
                return Acted.RETRY
        return Acted.DECIDED

    def _refused(self, response: httpx.Response) -> None:
        if response.status_code == 401:
            raise ConfigurationError(
                "OPSFLOW_REVIEWER_TOKEN", "the review service refused the token", _BAD_TOKEN_HINT
            )

    def close(self) -> None:
        self._http.close()


class AutoReviewer(threading.Thread):
    """Decides the run's review tasks in the background, while the tracker follows them.

    ``approved``/``rejected`` count the decisions it made, ``skipped`` the tasks others
    acted on first; ``error`` holds what stopped it, if anything; ``stop()`` ends it.

    Args:
        plan: what to do with each order (``review_plan``); tasks of other orders are
            never touched.
        interval_s: how long to wait between looks at the queue.
        patience_s: how long the service may fail to answer before the reviewer gives up.
        desk: how many tasks are decided at once.
    """

    def __init__(
        self,
        client: ReviewClient,
        plan: Mapping[str, Verdict],
        *,
        interval_s: float = 0.5,
        patience_s: float = 30.0,
        desk: int = 4,
    ) -> None:
        super().__init__(name="opsflow-demo-reviewer", daemon=True)
        self.client = client
        self.plan = plan
        self.interval_s = interval_s
        self.patience_s = patience_s
        self.desk = desk
        self.approved = 0
        self.rejected = 0
        self.error: BaseException | None = None
        self._skipped: set[str] = set()
        self._done: set[str] = set()
        self._lock = threading.Lock()
        self._halt = threading.Event()

    @property
    def skipped(self) -> int:
        with self._lock:
            return len(self._skipped)

    def to_decide(self) -> set[str]:
        """The orders whose decision the run waits for: planned, and not skipped.

        Decided ones stay in: until the tracker reads the decision back from the review
        topic the order still looks as if it waits for review, and must not count as
        far enough yet.
        """
        with self._lock:
            return {
                order_id
                for order_id, verdict in self.plan.items()
                if verdict is not Verdict.LEAVE and order_id not in self._skipped
            }

    def run(self) -> None:
        answered = time.monotonic()
        try:
            with ThreadPoolExecutor(self.desk, thread_name_prefix="opsflow-demo-desk") as desk:
                self._work(desk, answered)
        except BaseException as err:  # handed to the main thread, which raises it
            self.error = err

    def _work(self, desk: ThreadPoolExecutor, answered: float) -> None:
        while not self._halt.is_set():
            tasks = self.client.open_tasks()
            if tasks is None:
                if time.monotonic() - answered > self.patience_s:
                    raise RetryableError(
                        f"the review service at {self.client.url} has not answered for "
                        f"{self.patience_s:g} s; is it running (`opsflow status`)?"
                    )
            else:
                answered = time.monotonic()
                self._decide(tasks, desk)
            self._halt.wait(self.interval_s)

    def _decide(self, tasks: list[dict[str, Any]], desk: ThreadPoolExecutor) -> None:
        todo = []
        with self._lock:
            for task in tasks:
                order_id = str(task.get("order_id"))
                verdict = self.plan.get(order_id, Verdict.LEAVE)
                acted_on = order_id in self._done or order_id in self._skipped
                if verdict is not Verdict.LEAVE and not acted_on:
                    todo.append((order_id, task, verdict))
        struggling = threading.Event()

        def act(order_id: str, task: dict[str, Any], verdict: Verdict) -> None:
            if self._halt.is_set() or struggling.is_set():
                return  # stopped, or the service is struggling: look again next round
            acted = self.client.decide(task, verdict)
            with self._lock:
                if acted is Acted.DECIDED:
                    self._done.add(order_id)
                    if verdict is Verdict.APPROVE:
                        self.approved += 1
                    else:
                        self.rejected += 1
                elif acted is Acted.SKIPPED:
                    self._skipped.add(order_id)
            if acted is Acted.RETRY:
                struggling.set()

        # A decision's error (a refused token) is raised here, in the reviewer's thread.
        for done in [desk.submit(act, *item) for item in todo]:
            done.result()

    def stop(self) -> None:
        """Make no more decisions (after the one under way)."""
        self._halt.set()
