"""The reviewer inbox in a real browser: Debian's chromium, driven by Playwright.

The review service runs as a subprocess on the real stack (``tests.support.reviewing``'s
world: topics of its own, a fresh schema, its people); people sign in with their
tokens, claim and decide through the pages, and what they did is read back from
the review topic. A screenshot of the queue is kept as a test artifact in the
test's temporary directory and in ``tests/artifacts/inbox.png``.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect

from services.contracts import ReviewDecided, ReviewDecision
from tests.support.reviewing import World, decided, make_world
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

    context = browser.new_context()
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
