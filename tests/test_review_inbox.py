"""The reviewer inbox in a real browser: Debian's chromium, driven by Playwright.

The review service runs as a subprocess on the real stack (``tests.support.reviewing``'s
world: topics of its own, a fresh schema, its people); people sign in with their
tokens, claim and decide through the pages, and what they did is read back from
the review topic. A screenshot of the queue is kept as a test artifact in the
test's temporary directory and in ``tests/artifacts/inbox.png``.
"""

from __future__ import annotations

import re
import shutil
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from axe_playwright_python.sync_playwright import Axe
from confluent_kafka.admin import AdminClient
from playwright.sync_api import Browser, Page, expect

from opsflow.topics import dead_letter_topic, ensure_topics, topic_name
from services.contracts import (
    TOPICS,
    Address,
    CustomerRiskTier,
    OrderItem,
    OrderReceived,
    PolicyChecked,
    PolicyOutcome,
    Reason,
    ReviewClaimed,
    ReviewDecided,
    ReviewDecision,
)
from tests.support.projecting import World as ProjectingWorld
from tests.support.projecting import projecting
from tests.support.reviewing import PARTITIONS, World, decided, make_world
from tests.support.stack import Stack

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


@pytest.fixture
def world(stack: Stack, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[World]:
    with make_world(stack, tmp_path) as made:
        service = made.launch()
        # The browser (once per module) starts while the service does.
        request.getfixturevalue("chromium")
        made.ready(service)
        yield made


@pytest.fixture
def browser(world: World, request: pytest.FixtureRequest) -> Browser:
    """The module's browser (started by ``world``, beside the service)."""
    launched: Browser = request.getfixturevalue("chromium")
    return launched


def sign_in(page: Page, world: World, who: str) -> None:
    page.goto(f"{world.url}/inbox")
    expect(page).to_have_url(f"{world.url}/inbox/sign-in")
    page.fill("#token", world.people[who].token)
    page.click("button[type=submit]")
    expect(page.get_by_test_id("signed-in")).to_contain_text(world.people[who].display_name)


def queue_order_ids(page: Page) -> list[str]:
    return [
        row.get_attribute("data-order-id") or "" for row in page.locator("tr[data-task-id]").all()
    ]


def save_screenshot(page: Page, tmp_path: Path, name: str) -> None:
    """Keep what the page showed: in the test's directory and in ``tests/artifacts``."""
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(path, ARTIFACTS / name)


def the_decision(world: World, order_id: str) -> ReviewDecided:
    events = world.events("review", decided({order_id}))
    return next(e for _, e in events if isinstance(e, ReviewDecided) and e.order_id == order_id)


def test_a_reviewer_claims_and_approves_in_the_browser_and_only_a_supervisor_decides_escalated(
    world: World, browser: Browser, tmp_path: Path
) -> None:
    # Published longest SLA first, so the queue's order is not the publishing order.
    codes = [["AMOUNT_OVER_LIMIT"], ["CUSTOMER_HIGH_RISK"], ["AMOUNT_OVER_LIMIT"]]
    checks = world.request_review(3, codes=lambda i: codes[i])
    tasks = world.tasks_for(checks)
    by_due = sorted(tasks.values(), key=lambda t: (t["due_at"], t["task_id"]))
    soonest, contested, last = by_due

    # Without script, as a person with it turned off: every page and action still works
    # (and no refresh can move the page under the clicks below).
    context = browser.new_context(java_script_enabled=False)
    page = context.new_page()
    # Chromium reports what the Content-Security-Policy blocks on the console: the
    # pages must need nothing it forbids (their stylesheet is the service's own).
    console: list[str] = []
    page.on("console", lambda message: console.append(message.text))
    page.goto(f"{world.url}/inbox/sign-in")
    page.fill("#token", "ofu_not_a_token")
    page.click("button[type=submit]")
    expect(page.get_by_test_id("error")).to_contain_text("unknown or revoked")

    sign_in(page, world, "ann")
    cookie = next(c for c in context.cookies() if c["name"] == "opsflow_review_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/inbox"
    assert cookie["value"] != world.people["ann"].token
    header = page.locator("header")
    assert header.evaluate("h => getComputedStyle(h).backgroundColor") == "rgb(29, 53, 87)"
    assert queue_order_ids(page) == [t["order_id"] for t in by_due]
    first_row = page.locator(f"tr[data-task-id='{soonest['task_id']}']")
    expect(first_row.get_by_test_id("time-left")).to_have_text("59 min left")
    expect(first_row).to_contain_text("CUSTOMER_HIGH_RISK")

    # Open the soonest task, claim it, approve it with a reason.
    first_row.get_by_role("link").click()
    expect(page.get_by_test_id("reasons")).to_contain_text(
        f"CUSTOMER_HIGH_RISK: CUSTOMER_HIGH_RISK for {soonest['order_id']}"
    )
    page.get_by_test_id("claim").click()
    expect(page.get_by_test_id("claimed-by")).to_contain_text("Ann Reviewer")
    page.fill("#reason", "Known customer, usual amount")
    page.get_by_test_id("approve").click()
    expect(page.get_by_test_id("decision")).to_contain_text("Approved by Ann Reviewer")
    expect(page.get_by_test_id("approve")).to_have_count(0)
    decision = the_decision(world, soonest["order_id"])
    assert decision.decision is ReviewDecision.APPROVED
    assert decision.reason == "Known customer, usual amount"
    assert decision.actor.user_id == world.people["ann"].user_id
    assert decision.actor.role.value == "REVIEWER"

    # Someone else claims while the page is open: the click shows the API's 409.
    page.goto(f"{world.url}/inbox/tasks/{contested['task_id']}")
    assert world.call("POST", f"/tasks/{contested['task_id']}/claim", "bob").status_code == 200
    with page.expect_response(lambda r: r.url.endswith("/claim")) as answer:
        page.get_by_test_id("claim").click()
    assert answer.value.status == 409
    expect(page.get_by_test_id("error")).to_contain_text("claimed by Bob Reviewer")
    expect(page.get_by_test_id("note")).to_contain_text("claimed by Bob Reviewer")

    # Both open tasks miss the reviewer SLA: escalated, marked, and not the reviewer's.
    latest_due = max(datetime.fromisoformat(t["due_at"]) for t in (contested, last))
    moved = world.call(
        "PUT", "/testing/clock", None, json={"now": (latest_due + timedelta(seconds=1)).isoformat()}
    )
    assert moved.status_code == 200, moved.text
    deadline = time.monotonic() + 20
    while len(world.queue(tier="SUPERVISOR")) < 2:
        assert time.monotonic() < deadline, "tasks never escalated"
        time.sleep(0.1)
    page.goto(f"{world.url}/inbox")
    escalated_row = page.locator(f"tr[data-task-id='{last['task_id']}']")
    expect(escalated_row.get_by_test_id("escalated")).to_be_visible()
    expect(escalated_row.get_by_test_id("time-left")).to_have_text("59 min left")
    page.goto(f"{world.url}/inbox?status=all")
    expect(page.locator("tr[data-task-id]")).to_have_count(3)
    save_screenshot(page, tmp_path, "inbox.png")

    page.goto(f"{world.url}/inbox/tasks/{last['task_id']}")
    expect(page.get_by_test_id("escalated")).to_be_visible()
    expect(page.get_by_test_id("note")).to_contain_text("only a supervisor may act on it now")
    for button in ("approve", "reject", "claim"):
        expect(page.get_by_test_id(button)).to_have_count(0)
    save_screenshot(page, tmp_path, "inbox-escalated-task.png")

    # Sign out, and the supervisor signs in and rejects it.
    page.get_by_role("button", name="Sign out").click()
    expect(page).to_have_url(f"{world.url}/inbox/sign-in")
    assert not [c for c in context.cookies() if c["name"] == "opsflow_review_session"]
    sign_in(page, world, "sue")
    # A supervisor's queue points at the escalated work, and filters it out.
    page.get_by_test_id("escalated-notice").get_by_role("link").click()
    expect(page.get_by_test_id("escalated-notice")).to_contain_text("2 escalated tasks")
    assert sorted(queue_order_ids(page)) == sorted(t["order_id"] for t in (contested, last))
    page.goto(f"{world.url}/inbox/tasks/{last['task_id']}")
    page.fill("#reason", "Amount not covered")
    page.get_by_test_id("reject").click()
    expect(page.get_by_test_id("decision")).to_contain_text("Rejected by Sue Supervisor")
    decision = the_decision(world, last["order_id"])
    assert decision.decision is ReviewDecision.REJECTED
    assert decision.actor.user_id == world.people["sue"].user_id
    assert decision.actor.role.value == "SUPERVISOR"
    assert not [text for text in console if "Content Security Policy" in text], console
    context.close()


# --- a team at work: the facts on the page, filters, two reviewers, a keyboard -----------

CUSTOMER = "cust-grace-7"
SANCTIONED = "Destination Donetsk (UA) is in a sanctioned region: check export control"


@pytest.fixture
def team(
    stack: Stack, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[World]:
    """A review service whose pages refresh every second and call a task due within 70 min
    due soon, with the projector keeping the world's read models (in a thread here)."""
    with make_world(stack, tmp_path) as made:
        service = made.launch(REVIEW_REFRESH_S="1", REVIEW_DUE_SOON_S="4200")
        request.getfixturevalue("chromium")
        bootstrap = stack.address("KAFKA_BOOTSTRAP_SERVERS")
        names = [topic_name(t, prefix=made.prefix) for t in TOPICS]
        ensure_topics(
            AdminClient({"bootstrap.servers": bootstrap}),
            names + [dead_letter_topic(n) for n in names],
            partitions=PARTITIONS,
        )
        monkeypatch.setenv("OPSFLOW_TOPIC_PREFIX", made.prefix)
        read_models = ProjectingWorld(
            made.prefix, bootstrap, stack.address("SCHEMA_REGISTRY_URL"), made.database_url, stack
        )
        with projecting(read_models):
            made.ready(service)
            yield made


def place(
    world: World,
    customer: tuple[str, str],
    city: str,
    country: str,
    items: list[OrderItem],
    reason: Reason,
    notes: str | None = None,
) -> PolicyChecked:
    """Publish an order as ingest would, and the policy's call for a review of it."""
    order_id = f"ord-{uuid.uuid4().hex[:12]}"
    destination = Address(
        name=customer[1], street="Pushkina 1", city=city, postal_code="83000", country=country
    )
    received = OrderReceived(
        envelope=OrderReceived.envelope_for(
            key=order_id, idempotency_key=f"ingest:{order_id}", producer="ingest"
        ),
        order_id=order_id,
        customer_id=customer[0],
        customer_name=customer[1],
        customer_risk_tier=CustomerRiskTier.MEDIUM,
        amount_minor=sum(i.quantity * i.unit_price_minor for i in items),
        currency="EUR",
        destination=destination,
        items=items,
        placed_at=datetime.now(UTC) - timedelta(minutes=5),
        notes=notes,
        sales_channel="web",
    )
    check = PolicyChecked(
        envelope=PolicyChecked.envelope_for(
            key=order_id,
            idempotency_key=f"policy:{order_id}",
            producer="policy-check",
            caused_by=received.envelope,
        ),
        order_id=order_id,
        outcome=PolicyOutcome.NEEDS_REVIEW,
        reason_codes=[reason.code],
        reasons=[reason],
        rules_version="v7",
        destination=destination,
    )
    world.producer.send_many([received, check])
    return check


def assert_accessible(page: Page, what: str) -> None:
    """axe-core, run in the page (injected by the test, never served by the service):
    no serious or critical violation of its WCAG 2 A/AA rules."""
    results = Axe().run(page)
    bad = [
        (v["id"], v["impact"], [n["target"] for n in v["nodes"]])
        for v in results.response["violations"]
        if v["impact"] in ("serious", "critical")
    ]
    assert not bad, f"{what}: {bad}"


def test_reviewers_decide_from_the_orders_facts_see_each_others_claims_and_filter_the_queue(
    team: World, browser: Browser, tmp_path: Path
) -> None:
    world = team
    grace = (CUSTOMER, "Grace Hopper")
    widgets = [
        OrderItem(sku="PUMP-9", description="Hydraulic pump", quantity=2, unit_price_minor=45_000),
        OrderItem(sku="VLV-2", description="Valve set", quantity=7, unit_price_minor=5_000),
    ]
    sanctioned = Reason(code="DESTINATION_RESTRICTED_REGION", message=SANCTIONED)
    checks = [
        place(world, grace, "Donetsk", "UA", widgets[:1], sanctioned),
        place(world, grace, "Donetsk", "UA", widgets, sanctioned, "Deliver to the warehouse gate"),
        place(
            world,
            ("cust-ada-1", "Ada Lovelace"),
            "Berlin",
            "DE",
            widgets[1:],
            Reason(code="AMOUNT_OVER_LIMIT", message="Order total over the limit"),
        ),
    ]
    opened = world.tasks_for(checks)
    earlier, current, other = (check.order_id for check in checks)

    ann_context, bob_context = browser.new_context(), browser.new_context()
    ann, bob = ann_context.new_page(), bob_context.new_page()
    console: list[str] = []
    for page in (ann, bob):
        page.on("console", lambda message: console.append(message.text))
    sign_in(ann, world, "ann")
    sign_in(bob, world, "bob")

    # The queue marks the tasks due within the hour as due soon; filters and search narrow it.
    rows = ann.locator("tr[data-task-id]")
    expect(rows).to_have_count(3)
    expect(ann.locator(f"tr[data-order-id='{current}']")).to_have_attribute("data-urgency", "soon")
    expect(ann.locator(f"tr[data-order-id='{other}']")).to_have_attribute("data-urgency", "none")
    ann.select_option("#reason", "DESTINATION_RESTRICTED_REGION")
    ann.get_by_test_id("apply-filters").click()
    expect(rows).to_have_count(2)
    assert sorted(queue_order_ids(ann)) == sorted([earlier, current])
    ann.fill("#search", current[-6:].upper())
    ann.get_by_test_id("apply-filters").click()
    assert queue_order_ids(ann) == [current]
    ann.goto(f"{world.url}/inbox?due_within=15")
    expect(ann.get_by_test_id("count")).to_have_text("0")
    ann.goto(f"{world.url}/inbox")
    assert_accessible(ann, "the queue")
    save_screenshot(ann, tmp_path, "inbox-queue-filters.png")

    # Ann decides the earlier order from what the page shows of it.
    ann.locator(f"tr[data-order-id='{earlier}']").get_by_role("link").click()
    facts = ann.get_by_test_id("facts")
    expect(facts).to_contain_text("Grace Hopper (cust-grace-7)", timeout=20_000)
    expect(facts).to_contain_text("Hydraulic pump")
    expect(ann.get_by_test_id("reasons")).to_contain_text(SANCTIONED)
    ann.get_by_test_id("claim").click()
    ann.fill("#reason", "No export licence for pumps to this region")
    ann.get_by_test_id("reject").click()
    expect(ann.get_by_test_id("decision")).to_contain_text("Rejected by Ann Reviewer")

    # Bob opens the current order: what is shipped, to whom, for how much, and who
    # refused this customer before (the page brings the projector's news by itself).
    ann.goto(f"{world.url}/inbox?claimed=no")
    expect(ann.locator("tr[data-task-id]")).to_have_count(2)
    ann.goto(f"{world.url}/inbox?tier=REVIEWER")
    bob.goto(f"{world.url}/inbox/tasks/{opened[current]['task_id']}")
    facts = bob.get_by_test_id("facts")
    expect(facts).to_contain_text("Pushkina 1, 83000, Donetsk (UA)", timeout=20_000)
    for shown in ("Hydraulic pump", "Valve set", "450.00 EUR", "1,250.00 EUR", "medium",
                  "Deliver to the warehouse gate", "web", "policy.checked"):  # fmt: skip
        expect(facts).to_contain_text(shown)
    earlier_row = facts.locator("tr", has_text=earlier)
    expect(earlier_row).to_contain_text("rejected", timeout=20_000)
    expect(earlier_row).to_contain_text("Ann Reviewer")
    expect(earlier_row).to_contain_text("No export licence for pumps to this region")
    assert_accessible(bob, "a task's page")

    # Bob claims it; Ann's open queue shows his claim without a reload.
    bob.get_by_test_id("claim").click()
    expect(bob.get_by_test_id("claimed-by")).to_contain_text("Bob Reviewer")
    ann_row = ann.locator(f"tr[data-order-id='{current}']")
    expect(ann_row.get_by_test_id("row-claimed-by")).to_have_text("Bob Reviewer")
    assert ann.url.endswith("/inbox?tier=REVIEWER"), "refreshed in place, not navigated"

    # The other task: both click Claim at once; one wins, and the other's page says who.
    other_task = opened[other]["task_id"]
    for page in (ann, bob):
        page.goto(f"{world.url}/inbox/tasks/{other_task}")
    ann.get_by_test_id("claim").click(no_wait_after=True)
    bob.get_by_test_id("claim").click(no_wait_after=True)
    winner = world.call("GET", f"/tasks/{other_task}", "ann").json()["claimed_by"]
    deadline = time.monotonic() + 10
    while winner is None:
        assert time.monotonic() < deadline
        winner = world.call("GET", f"/tasks/{other_task}", "ann").json()["claimed_by"]
    for page in (ann, bob):
        expect(page.get_by_test_id("claimed-by")).to_contain_text(winner["display_name"])
    loser, holder = (bob, ann) if winner["user_id"] == world.people["ann"].user_id else (ann, bob)
    expect(loser.get_by_test_id("claim")).to_have_count(0)
    # A released claim is gone from the task's state, not from its history.
    holder.get_by_test_id("release").click()
    expect(holder.get_by_test_id("claimed-by")).to_have_text("nobody")
    expect(holder.locator("[data-testid=history] li[data-kind=released]")).to_contain_text(
        f"Released by {winner['display_name']}"
    )
    expect(holder.locator("[data-testid=history] li[data-kind=claimed]")).to_contain_text(
        f"Claimed by {winner['display_name']}"
    )
    claims = world.events("review", lambda events: True)
    assert [e.actor.user_id for _, e in claims if isinstance(e, ReviewClaimed)
            and e.task_id == other_task] == [winner["user_id"]]  # fmt: skip

    # Bob decides by keyboard alone: Tab to the reason, type it, Tab to Approve, Enter.
    bob.goto(f"{world.url}/inbox/tasks/{opened[current]['task_id']}")
    for _ in range(60):
        bob.keyboard.press("Tab")
        if bob.evaluate("document.activeElement.id") == "reason":
            break
    else:
        raise AssertionError("the reason field is not reachable by Tab")
    bob.keyboard.type("Licence EX-2291 on file for valves and pumps")
    bob.keyboard.press("Tab")
    assert bob.evaluate("document.activeElement.dataset.testid") == "approve"
    bob.keyboard.press("Enter")
    expect(bob.get_by_test_id("decision")).to_contain_text("Approved by Bob Reviewer")
    decision = the_decision(world, current)
    assert decision.decision is ReviewDecision.APPROVED
    assert decision.actor.user_id == world.people["bob"].user_id
    assert decision.reason == "Licence EX-2291 on file for valves and pumps"
    history = bob.get_by_test_id("history")
    expect(history.locator("li")).to_have_text(
        [re.compile("Review requested"), re.compile("Claimed by Bob Reviewer \\(reviewer\\)"),
         re.compile("Approved by Bob Reviewer \\(reviewer\\): Licence EX-2291")]
    )  # fmt: skip
    save_screenshot(bob, tmp_path, "inbox-task-facts.png")
    assert not [text for text in console if "Content Security Policy" in text], console
    ann_context.close()
    bob_context.close()
