"""The operator console (``opsflow.console``) as an operator uses it, on the real stack.

The console's app is served by uvicorn in a thread of the test process, over the
test's topics and (migrated) database schema. A read model is rebuilt from the
console over order histories the projector (in a thread) kept first. People sign
in with tokens made by ``opsflow.users``; the browser is Debian's chromium
(``chromium`` fixture).

Dead letters come from one of two services, run by the runtime's ``Worker`` in a
thread. The one-hop ``tests.services.relay`` dead-letters an order whose notes
name a bug (as in ``test_dlq.py``): enough for the redrive's bookkeeping, but its
``policy.checked`` is not policy-check's, so no real service takes it further.
The operator's walk follows an order to delivery instead: a buggy release of
policy-check (``tests.services.buggy_policy_check``, named policy-check, the
real rules but for the bug) dead-letters it; then the fix is deployed (the real
``services.policy_check`` in the same consumer group) and the real rest of the
workflow runs over the test's topics: dispatch (in a thread) books with the
carrier stand-in (a process on loopback), whose proof of delivery goes to the
pod-capture webhook (a process, with a carrier's API key), which matches it
against the bookings the pod-capture runtime service (a process) keeps.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from axe_playwright_python.sync_playwright import Axe
from confluent_kafka.admin import AdminClient
from confluent_kafka.schema_registry import SchemaRegistryClient
from playwright.sync_api import Browser, Page, expect
from psycopg_pool import ConnectionPool

from opsflow import db, operator_actions, users
from opsflow.apikeys import create_key
from opsflow.console.app import Cluster, create_app
from opsflow.console.settings import ConsoleSettings
from opsflow.contracts.wire import WireCodec
from opsflow.operator_actions import ACTIONS_TOPIC
from opsflow.producer import Producer
from opsflow.projections.rebuild import checksum
from opsflow.readmodels import projections
from opsflow.runtime import load_service
from opsflow.topics import dead_letter_topic, ensure_topics, topic_name
from opsflow.users import Role
from services.contracts import TOPICS, OrderReceived, PolicyOutcome
from services.policy_check import RULES
from tests.support.carrier import CarrierProcess
from tests.support.dispatching import run_dispatch
from tests.support.histories import histories
from tests.support.pods import pod_capture_running
from tests.support.projecting import World, projecting
from tests.support.runtime import (
    Topics,
    make_topics,
    orders,
    publish,
    record_ends,
    running,
    settled_records,
    wait_until_processed,
)
from tests.support.stack import (
    QUICK_JOIN_ENV,
    Stack,
    free_port,
)

_CSRF = re.compile(r'name="csrf_token" value="([0-9a-f]{64})"')


@dataclass
class Console:
    """The console serving one test's topics, and the tokens of its people."""

    url: str
    topics: Topics
    database_url: str
    tokens: dict[str, str]
    user_ids: dict[str, str]

    def client(self, who: str | None = None) -> httpx.Client:
        """A browser-like client (its own cookies, its pages' origin), signed in as ``who``."""
        client = httpx.Client(base_url=self.url, headers={"Origin": self.url}, timeout=60)
        if who is not None:
            answer = client.post("/console/sign-in", data={"token": self.tokens[who]})
            assert answer.status_code == 303, answer.text
        return client

    def action_events(self) -> list[operator_actions.ActionEvent]:
        """The operator action events on the test's topic, oldest first."""
        return operator_actions.events(
            {"bootstrap.servers": self.topics.bootstrap},
            SchemaRegistryClient({"url": self.topics.registry_url}),
            prefix=self.topics.prefix,
        )

    def actions(self) -> list[tuple[Any, ...]]:
        with db.connect(self.database_url) as conn:
            return conn.execute(
                "SELECT user_id, actor, role, action, target, outcome FROM operator_actions"
                " ORDER BY started_at"
            ).fetchall()


@contextmanager
def serving(
    stack: Stack, topics: Topics, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Console]:
    """The console's app over the test's topics and schema, with an operator and a reviewer."""
    db.migrate(database_url)
    ensure_topics(  # as provisioning makes it
        AdminClient({"bootstrap.servers": topics.bootstrap}),
        [topic_name(ACTIONS_TOPIC, prefix=topics.prefix)],
        partitions=1,
    )
    for name, value in {
        "KAFKA_BOOTSTRAP_SERVERS": topics.bootstrap,
        "SCHEMA_REGISTRY_URL": topics.registry_url,
        "DATABASE_URL": database_url,
        "OPSFLOW_TOPIC_PREFIX": topics.prefix,
        "OPSFLOW_DATA_DIR": str(stack.data_dir),
    }.items():
        monkeypatch.setenv(name, value)
    tokens, ids = {}, {}
    with db.connect(database_url) as conn:
        for name, role, shown in (
            ("olga", Role.OPERATOR, "Olga Operator"),
            ("rita", Role.REVIEWER, "Rita Reviewer"),
        ):
            made = users.create_user(conn, name, role, display_name=shown)
            tokens[name], ids[name] = made.token, made.user.user_id
    pool: ConnectionPool[Any] = ConnectionPool(database_url, min_size=1, max_size=4, open=True)
    producer = Producer(
        "console-tests",
        bootstrap_servers=topics.bootstrap,
        registry_url=topics.registry_url,
        topic_prefix=topics.prefix,
    )
    app = create_app(
        ConsoleSettings(), pool=pool, producer=producer, cluster=Cluster.from_environment()
    )
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None))
    thread = threading.Thread(target=server.run, name="console", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the console did not start"
        time.sleep(0.02)
    try:
        yield Console(f"http://127.0.0.1:{port}", topics, database_url, tokens, ids)
    finally:
        server.should_exit = True
        thread.join(30)
        producer.close(timeout=10)
        pool.close()


def dead_letter_one_order(topics: Topics) -> str:
    """One order the relay dead-letters (bug ``console``, not yet fixed); its id."""
    [order] = orders(1, notes={0: "bug:console"})
    publish(topics, [order])
    with running(topics):
        wait_until_processed(topics)
    return order.order_id


@pytest.fixture
def console(
    stack: Stack,
    bootstrap_servers: str,
    registry_url: str,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Console]:
    topics = make_topics(bootstrap_servers, registry_url)
    with serving(stack, topics, database_url, monkeypatch) as made:
        yield made


def _redrive_path(client: httpx.Client) -> tuple[str, str]:
    """The pending dead letter's redrive URL, and the CSRF token its confirmation carries."""
    listing = client.get("/console/dead-letters")
    assert listing.status_code == 200, listing.text
    [dead_letter_id] = re.findall(r'href="/console/dead-letters/([^"?]+/\d+/\d+)"', listing.text)
    confirm = client.get(f"/console/dead-letters/{dead_letter_id}/redrive")
    assert confirm.status_code == 200 and "Confirm redrive" in confirm.text, confirm.text
    [token] = _CSRF.findall(confirm.text)[-1:]
    return f"/console/dead-letters/{dead_letter_id}/redrive", token


def test_a_second_confirmation_of_a_redrive_writes_nothing_says_so_and_both_are_audited(
    console: Console,
) -> None:
    order_id = dead_letter_one_order(console.topics)
    before = sum(record_ends(console.topics.bootstrap, console.topics.orders).values())
    operator = console.client("olga")
    path, token = _redrive_path(operator)

    first = operator.post(path, data={"csrf_token": token}, follow_redirects=True)
    assert first.status_code == 200
    assert "redriven: written back once as" in first.text and order_id in first.text
    second = operator.post(path, data={"csrf_token": token}, follow_redirects=True)
    assert second.status_code == 200
    assert "nothing written: it was redriven already at" in second.text
    # One copy went back to the orders topic, not two.
    assert sum(record_ends(console.topics.bootstrap, console.topics.orders).values()) == before + 1
    # The confirmation page now says nothing would be written.
    again = operator.get(path)
    assert "Confirm redrive" not in again.text and "was redriven already" in again.text

    olga = console.user_ids["olga"]
    target = path.removeprefix("/console/dead-letters/").removesuffix("/redrive")
    recorded = console.actions()
    assert [row[:5] for row in recorded] == [
        (olga, "Olga Operator", "operator", "dlq.redrive", target)
    ] * 2
    assert recorded[0][5].startswith("redriven: ") and recorded[1][5].startswith("nothing written")
    listed = operator.get("/console/actions").text
    assert listed.count("<td>Olga Operator (operator)</td>") == 2
    # Each action is on the log as events: its intent, then its outcome, naming Olga.
    events = console.action_events()
    assert [(e.phase, e.action, e.target) for e in events] == [
        ("STARTED", "dlq.redrive", target),
        ("ENDED", "dlq.redrive", target),
    ] * 2
    assert {(e.actor.name, e.actor.user_id, e.actor.role, e.actor.via) for e in events} == {
        ("Olga Operator", olga, "operator", "console")
    }
    assert [e.outcome for e in events if e.phase == "ENDED"] == [row[5] for row in recorded]


def test_a_reviewer_is_refused_the_console_and_gets_no_session(console: Console) -> None:
    reviewer = console.client()
    refused = reviewer.post("/console/sign-in", data={"token": console.tokens["rita"]})
    assert refused.status_code == 403
    assert "for the operator role" in refused.text and "Rita Reviewer is a reviewer" in refused.text
    assert "opsflow_console_session" not in reviewer.cookies
    # Without a session every page leads to the sign-in, never to what it shows.
    assert reviewer.get("/console/dead-letters").status_code == 303
    # And no action of theirs reaches the log: the redrive and the replay are refused.
    dead_letter_one_order(console.topics)
    path, token = _redrive_path(console.client("olga"))
    for posted in (path, "/console/replay"):
        refused = reviewer.post(posted, data={"csrf_token": token, "topic": "orders"})
        assert refused.status_code == 401 and "Sign in" in refused.text, refused.text
    assert console.action_events() == [] and console.actions() == []


def test_an_operator_sees_a_replays_dry_run_in_the_console_then_confirms_it_and_it_is_audited(
    console: Console,
) -> None:
    """The dry run is opsflow.replay's own (what ``opsflow replay --dry-run`` reports): the
    records of the range, by type and instance, and how many already have outputs; it
    writes nothing, not even an action. The confirmed replay is recorded, then runs."""
    sent = orders(3)
    publish(console.topics, sent)
    operator = console.client("olga")
    form = {"topic": "orders", "into": "policy-check"}
    before = {
        name: sum(record_ends(console.topics.bootstrap, name).values())
        for name in (console.topics.orders, console.topics.checks)
    }

    page = operator.get("/console/replay", params=form)
    assert page.status_code == 200, page.text
    summary = re.sub(r"\s+", " ", page.text)
    assert "A replay would re-drive <strong>3</strong> event(s) of <strong>3</strong> order(s)" in (
        summary
    )
    assert "<td>order.received</td><td>3</td>" in summary
    assert "<strong>0</strong> of 3 inputs already have outputs in the log" in summary
    assert all(o.order_id in page.text for o in sent) and "Confirm replay" in page.text
    # A bounded range: offsets past the end read nothing, and offer nothing to confirm.
    none = operator.get("/console/replay", params={**form, "from_offset": "1000"})
    assert "re-drive <strong>0</strong> event(s)" in none.text
    assert "Confirm replay" not in none.text
    # Bad input is named.
    bad = operator.get("/console/replay", params={**form, "from_offset": "ten"})
    assert bad.status_code == 422 and "from offset: &#39;ten&#39; is not a whole number" in bad.text
    wrong = operator.get("/console/replay", params={"topic": "orders", "into": "dispatch"})
    assert wrong.status_code == 422 and "dispatch does not consume orders" in wrong.text
    after = {
        name: sum(record_ends(console.topics.bootstrap, name).values())
        for name in (console.topics.orders, console.topics.checks)
    }
    assert after == before and console.action_events() == [] and console.actions() == []

    [token] = _CSRF.findall(page.text)[-1:]
    done = operator.post(
        "/console/replay", data={**form, "csrf_token": token}, follow_redirects=True
    )
    assert done.status_code == 200, done.text
    assert "replayed: 3 events of 3 instance(s) into policy-check, 3 written" in done.text
    checks = settled_records(console.topics.bootstrap, console.topics.checks)
    assert sorted(m.key().decode() for m in checks) == sorted(o.order_id for o in sent)
    started, ended = console.action_events()
    assert (started.phase, started.action, started.target) == (
        "STARTED",
        "replay",
        "orders into policy-check",
    )
    assert started.detail == {
        "into": "policy-check",
        "selection": {
            "topic": "orders",
            "partitions": None,
            "from_offset": None,
            "to_offset": None,
            "from_time": None,
            "to_time": None,
            "keys": [],
        },
    }
    assert (started.actor.name, started.actor.user_id) == (
        "Olga Operator",
        console.user_ids["olga"],
    )
    assert ended.outcome and ended.outcome.startswith("replayed: 3 events")
    assert [row[3:6] for row in console.actions()] == [
        ("replay", "orders into policy-check", ended.outcome)
    ]


def test_console_posts_without_the_sessions_csrf_token_or_from_elsewhere_change_nothing(
    console: Console,
) -> None:
    dead_letter_one_order(console.topics)
    before = sum(record_ends(console.topics.bootstrap, console.topics.orders).values())
    operator = console.client("olga")
    path, token = _redrive_path(operator)

    without = operator.post(path, data={})
    assert without.status_code == 403 and "did not carry the token" in without.text
    wrong = operator.post(path, data={"csrf_token": "0" * 64})
    assert wrong.status_code == 403
    forged = operator.post(
        path, data={"csrf_token": token}, headers={"Origin": "https://evil.example"}
    )
    assert forged.status_code == 403 and "not sent from these pages" in forged.text
    rebuild = operator.post("/console/projections/orders_current/rebuild", data={})
    assert rebuild.status_code == 403 and "did not carry the token" in rebuild.text
    assert console.actions() == []
    assert sum(record_ends(console.topics.bootstrap, console.topics.orders).values()) == before


def test_an_operator_rebuilds_a_read_model_from_the_console_and_it_equals_what_it_was(
    stack: Stack,
    bootstrap_servers: str,
    registry_url: str,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    chromium: Browser,
) -> None:
    """The projections page shows each read model's position; a confirmed rebuild runs in
    the console's process, its progress shown on reload, one at a time, and swaps in the
    same rows the projector kept, recorded under the operator's name. Every topic of the application
    exists here (a rebuild reads all of a projection's)."""
    prefix = f"cr{uuid.uuid4().hex[:8]}."
    names = [topic_name(t, prefix=prefix) for t in TOPICS]
    ensure_topics(
        AdminClient({"bootstrap.servers": bootstrap_servers}),
        names + [dead_letter_topic(n) for n in names],
        partitions=3,
    )
    world = World(prefix, bootstrap_servers, registry_url, database_url, stack)
    topics = Topics(prefix, bootstrap_servers, WireCodec(world.registry), registry_url)
    with serving(stack, topics, database_url, monkeypatch) as console:
        orders = list(histories(40, run=prefix))
        world.publish(orders)
        with projecting(world):
            world.wait_caught_up()
        projection = projections()["orders_current"]
        live = {t: t for t in projection.tables}
        with db.connect(database_url) as conn:
            before = checksum(conn, projection, live)
            table_before = conn.execute("SELECT 'orders_current'::regclass::oid").fetchone()
        assert before["orders_current"].rows == len(orders)

        operator = console.client("olga")
        listed = operator.get("/console/projections")
        assert listed.status_code == 200, listed.text
        read = set(projection.topics)
        position = sum(1 for history in orders for event in history if event.topic in read)
        assert f"<td>{position}</td>" in listed.text
        confirm = operator.get("/console/projections/orders_current/rebuild")
        assert confirm.status_code == 200 and "Confirm rebuild" in confirm.text, confirm.text
        [token] = _CSRF.findall(confirm.text)[-1:]
        path = "/console/projections/orders_current/rebuild"
        # The live position held as a live projector holds it mid-batch: the rebuild
        # replays everything, then waits at the swap, so it is seen running.
        with db.connect(database_url) as holder:
            holder.execute(
                "SELECT 1 FROM projection_positions WHERE projection = %s FOR UPDATE",
                ("orders_current",),
            )
            started = operator.post(path, data={"csrf_token": token})
            assert started.status_code == 303
            deadline = time.monotonic() + 120
            while "records (100%)" not in (page := operator.get("/console/projections").text):
                assert time.monotonic() < deadline, page
                time.sleep(0.2)
            assert "running, started by Olga Operator" in page
            # A second rebuild while it runs starts nothing, and says whose is running.
            assert "is running already" in operator.get(path).text
            again = operator.post(path, data={"csrf_token": token}, follow_redirects=True)
            assert again.status_code == 200 and "running, started by Olga Operator" in again.text
            holder.rollback()
        deadline = time.monotonic() + 120
        while True:
            page = operator.get(started.headers["location"]).text
            if "rebuilt: " in page:
                break
            assert "failed: " not in page, page
            assert time.monotonic() < deadline, page
            time.sleep(0.2)
        assert re.search(r"rebuilt: [\d,]+ records in", page) and "(by Olga Operator," in page

        with db.connect(database_url) as conn:
            assert checksum(conn, projection, live) == before
            # Rebuilt tables were swapped in, not the old ones left in place.
            table_after = conn.execute("SELECT 'orders_current'::regclass::oid").fetchone()
            assert table_after != table_before
        olga = console.user_ids["olga"]
        recorded = console.actions()
        assert [row[:5] for row in recorded] == [
            (olga, "Olga Operator", "operator", "projection.rebuild", "orders_current")
        ] * 2
        assert recorded[0][5].startswith("rebuilt: ")
        assert recorded[1][5].startswith("not started: a rebuild of orders_current started by")

        # The page as an operator's browser shows it, signed in with the keyboard.
        page = chromium.new_context().new_page()
        page.goto(f"{console.url}/console")
        page.get_by_label("Token").fill(console.tokens["olga"])
        page.keyboard.press("Enter")
        page.get_by_role("link", name="Projections").click()
        expect(page.get_by_test_id("rebuild-orders_current")).to_contain_text("by Olga Operator")
        _accessible(page)
        page.get_by_role("link", name="Rebuild orders_current").click()
        expect(page.get_by_test_id("what-will-happen")).to_contain_text(f"{prefix}orders")
        _accessible(page)
        page.context.close()


def _accessible(page: Page) -> None:
    """axe-core, run in the page (injected by the test, never served by the console): no
    violation of the WCAG A/AA rules it checks."""
    results = Axe().run(page)
    assert results.violations_count == 0, results.generate_report()


def an_order_policy_check_approves(notes: str) -> OrderReceived:
    """An order the released rules auto-approve (one gadget, 500.00 EUR: under every
    review limit), with ``notes``."""
    [order] = orders(1, notes={0: notes})
    gadget = order.items[-1]
    approvable = order.model_copy(
        update={"items": [gadget], "amount_minor": gadget.quantity * gadget.unit_price_minor}
    )
    assert RULES.evaluate(approvable).outcome is PolicyOutcome.AUTO_APPROVED
    return approvable


@contextmanager
def delivering(
    stack: Stack, console: Console, monkeypatch: pytest.MonkeyPatch, logs: Path
) -> Iterator[CarrierProcess]:
    """The workflow after policy-check, real, over the console's topics and schema: dispatch
    (in a thread), the carrier stand-in sending its proofs of delivery half a second
    after a booking to the pod-capture webhook with a carrier's API key, and the
    pod-capture runtime service keeping the bookings the webhook matches them against."""
    topics = console.topics
    names = [topic_name(t, prefix=topics.prefix) for t in TOPICS]
    ensure_topics(  # orders, its dead letters and policy-check's exist already
        AdminClient({"bootstrap.servers": topics.bootstrap}),
        names + [dead_letter_topic(n) for n in names],
        partitions=4,
    )
    env = {
        **stack.env,
        **stack.addresses(),
        **QUICK_JOIN_ENV,
        "DATABASE_URL": console.database_url,
        "OPSFLOW_TOPIC_PREFIX": topics.prefix,
    }
    with db.connect(console.database_url) as conn:
        key = create_key(conn, "carrier").secret  # the producer pod.captured names
    with pod_capture_running(env, logs) as webhook:
        carrier = CarrierProcess(
            logs / "carrier.log",
            {
                "CARRIER_POD_WEBHOOK_URL": f"{webhook}/pods",
                "CARRIER_POD_API_KEY": key,
                "CARRIER_POD_DELAY_S": "0.5",
            },
        ).launch()
        try:
            carrier.ready()
            dispatch = run_dispatch(
                monkeypatch,
                bootstrap=topics.bootstrap,
                registry_url=topics.registry_url,
                prefix=topics.prefix,
                database_url=console.database_url,
                carrier_url=carrier.url,
            )
            try:
                yield carrier
            finally:
                dispatch.stop()
        finally:
            carrier.stop()


def test_an_operator_finds_a_dead_letter_reads_why_redrives_it_once_and_follows_the_order(
    console: Console,
    stack: Stack,
    chromium: Browser,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """The order is dead-lettered by a buggy release of policy-check; the operator redrives
    it once the fix (the released policy-check) runs, and follows it to delivery."""
    order = an_order_policy_check_approves("bug:console")
    order_id = order.order_id
    publish(console.topics, [order])
    with running(console.topics, load_service("tests.services.buggy_policy_check")):
        wait_until_processed(console.topics, service="policy-check")
    shots_dir = tmp_path / "screenshots"
    shots_dir.mkdir()
    fixed = load_service("services.policy_check")
    with (
        delivering(stack, console, monkeypatch, tmp_path) as carrier,
        running(console.topics, fixed),
    ):
        context = chromium.new_context()
        page = context.new_page()
        shots = iter(range(1, 100))

        def shot(name: str) -> None:
            page.screenshot(path=shots_dir / f"{next(shots):02d}-{name}.png", full_page=True)

        page.goto(f"{console.url}/console")
        page.get_by_label("Token").fill(console.tokens["olga"])
        page.keyboard.press("Enter")  # the keyboard signs in, as it does everywhere
        expect(page.get_by_test_id("signed-in")).to_have_text("Olga Operator (operator)")
        expect(
            page.get_by_role("heading", name="Services: consumer lag and throughput")
        ).to_be_visible()
        shot("overview")
        _accessible(page)

        page.get_by_role("link", name="Pending dead letters on orders.dlq").click()
        expect(page.get_by_test_id("groups")).to_contain_text("PermanentError")
        shot("dead-letters")
        _accessible(page)
        page.get_by_test_id("dead-letters").get_by_role("link").click()
        expect(page.get_by_test_id("why")).to_contain_text(
            f"policy-check bug console hit by order {order_id}"
        )
        shot("dead-letter")
        _accessible(page)

        page.get_by_role("link", name="Redrive…").click()
        what = page.get_by_test_id("what-will-happen")
        expect(what).to_contain_text(f"key {order_id}")
        expect(what).to_contain_text("confirming again writes nothing")
        shot("confirm")
        _accessible(page)
        page.get_by_role("button", name="Confirm redrive").focus()
        page.keyboard.press("Enter")
        expect(page.get_by_test_id("outcome")).to_contain_text("redriven: written back once")
        expect(page.get_by_test_id("actor")).to_contain_text("Olga Operator (operator")
        shot("redriven")
        _accessible(page)

        # Back on the dead letter: marked, and no second redrive offered.
        page.get_by_role("link", name="The dead letter").click()
        expect(page.get_by_test_id("redriven")).not_to_have_text("not yet")
        expect(page.get_by_role("link", name="Redrive…")).to_have_count(0)

        page.get_by_role("link", name=order_id).click()
        now = page.get_by_test_id("now")
        deadline = time.monotonic() + 60
        # The fixed policy-check approves the copy, dispatch books it, the carrier's
        # proof of delivery is captured: the order is delivered.
        while not (now.text_content() or "").startswith("Now: delivered at "):
            assert time.monotonic() < deadline, now.text_content()
            time.sleep(0.5)
            page.reload()
        expect(page.get_by_test_id("step").first).to_contain_text("order.received")
        # Each step written by the service whose it is: the fixed policy-check's approval,
        # dispatch's booking, the proof of delivery the carrier sent.
        trace = " ".join((page.get_by_test_id("trace").text_content() or "").split())
        [booking] = re.findall(r"dispatch\.executed [^:]* by dispatch : booked (BK-\w+)", trace)
        assert re.search(r"policy\.checked [^:]* by policy-check : AUTO_APPROVED", trace), trace
        assert re.search(r"dispatch\.requested [^:]* by dispatch : ", trace), trace
        assert re.search(rf"pod\.captured [^:]* by carrier : {booking} received by", trace), trace
        expect(now).to_contain_text(f"(booking {booking})")
        shot("trace")
        _accessible(page)
        context.close()
        # Redriven once, booked once.
        bookings = httpx.get(f"{carrier.url}/bookings", timeout=10).json()
        assert [b["booking_reference"] for b in bookings["bookings"]] == [booking]
    assert len(list(shots_dir.glob("*.png"))) == 6
