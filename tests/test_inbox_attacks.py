"""The reviewer inbox against the attacks on signed-in pages: stolen or stale cookies,
forged form posts, and other sites' scripts and frames.

The review service runs as a real process on the real stack (``tests.support.reviewing``),
with session limits of its own (10 min idle, 1 h in all) so the tests prove the
settings are read; they talk to it over HTTP as a browser would, cookie and all.
Time is not waited for: a session is aged in PostgreSQL, where the service keeps
it, and the service's own check decides.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import httpx
import psycopg
import pytest
from playwright.sync_api import Browser, expect

from opsflow import users
from opsflow.web.sessions import SessionLimits, start_session
from tests.support.reviewing import Person, World, make_world
from tests.support.stack import Stack

IDLE_S, MAX_S = 600, 3600
COOKIE = "opsflow_review_session"
_CSRF = re.compile(r'name="csrf_token" value="([0-9a-f]{64})"')


@pytest.fixture(scope="module")
def world(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with make_world(stack, tmp_path_factory.mktemp("inbox")) as made:
        made.start(REVIEW_SESSION_IDLE_S=str(IDLE_S), REVIEW_SESSION_MAX_S=str(MAX_S))
        yield made


@dataclass
class Visitor:
    """What a browser sends to the inbox: its cookie, and its pages' origin on posts."""

    world: World
    session_id: str | None = None

    @property
    def origin(self) -> str:
        return self.world.url

    def get(self, path: str) -> httpx.Response:
        return httpx.get(f"{self.world.url}{path}", headers=self._cookie(), timeout=30)

    def post(
        self, path: str, form: dict[str, str], *, origin: str | None = "own"
    ) -> httpx.Response:
        headers = self._cookie()
        if origin is not None:
            headers["Origin"] = self.origin if origin == "own" else origin
        return httpx.post(
            f"{self.world.url}{path}",
            data=form,
            headers=headers,
            timeout=30,
        )

    def sign_in(self, who: str) -> httpx.Response:
        answer = self.post("/inbox/sign-in", {"token": self.world.people[who].token})
        assert answer.status_code == 303, answer.text
        self.session_id = answer.cookies[COOKIE]
        return answer

    def csrf_token(self, path: str = "/inbox") -> str:
        page = self.get(path)
        assert page.status_code == 200, page.text
        found = _CSRF.search(page.text)
        assert found, "the page carries no CSRF token"
        return found[1]

    def _cookie(self) -> dict[str, str]:
        return {"Cookie": f"{COOKIE}={self.session_id}"} if self.session_id else {}


def open_task(world: World) -> str:
    check = world.request_review(1)[0]
    return str(world.tasks_for([check])[check.order_id]["task_id"])


def claimed_by(world: World, task_id: str) -> str | None:
    task = world.call("GET", f"/tasks/{task_id}", "sue").json()
    return task["claimed_by"]["display_name"] if task["claimed_by"] else None


def age_session(world: World, session_id: str, *, idle_s: float = 0, old_s: float = 0) -> None:
    """Move a session's last request and its sign-in back in time, where the service keeps
    them (only the digest of the id is stored)."""
    digest = hashlib.sha256(session_id.encode()).digest()
    with psycopg.connect(world.database_url, autocommit=True) as conn:
        updated = conn.execute(
            "UPDATE opsflow_sessions SET last_seen_at = now() - make_interval(secs => %s),"
            " created_at = now() - make_interval(secs => %s) WHERE session_hash = %s",
            (idle_s, max(idle_s, old_s), digest),
        ).rowcount
    assert updated == 1


def test_the_cookie_carries_a_session_id_never_the_token(world: World) -> None:
    browser = Visitor(world)
    answer = browser.sign_in("ann")
    set_cookie = answer.headers["set-cookie"]
    token = world.people["ann"].token
    assert token not in set_cookie and browser.session_id != token
    attributes = {part.strip().split("=")[0].lower() for part in set_cookie.split(";")}
    assert {"httponly", "path", "samesite", "max-age"} <= attributes
    assert "Path=/inbox" in set_cookie and "SameSite=strict" in set_cookie
    assert f"Max-Age={MAX_S}" in set_cookie
    assert "secure" not in attributes, "plain http here: Secure is for https"
    # The database keeps a digest: its rows are no cookies anybody can use.
    assert browser.session_id is not None
    with psycopg.connect(world.database_url) as conn:
        stored = [row[0] for row in conn.execute("SELECT session_hash FROM opsflow_sessions")]
    assert hashlib.sha256(browser.session_id.encode()).digest() in stored
    assert all(browser.session_id.encode() not in bytes(row) for row in stored)
    assert browser.get("/inbox").status_code == 200


def test_a_stolen_session_cookie_stops_working_after_logout(world: World) -> None:
    task_id = open_task(world)
    ann = Visitor(world)
    ann.sign_in("ann")
    token = ann.csrf_token()
    thief = Visitor(world, session_id=ann.session_id)  # a copy of the cookie, and a page
    assert thief.get("/inbox").status_code == 200

    signed_out = ann.post("/inbox/sign-out", {"csrf_token": token})
    assert signed_out.status_code == 303
    assert signed_out.headers["location"] == "/inbox/sign-in"
    assert 'opsflow_review_session=""' in signed_out.headers["set-cookie"]

    page = thief.get("/inbox")
    assert page.status_code == 401
    assert "your session has ended" in page.text
    claim = thief.post(f"/inbox/tasks/{task_id}/claim", {"csrf_token": token})
    assert claim.status_code == 401
    assert claimed_by(world, task_id) is None, "the stolen cookie acted after sign-out"


def test_an_expired_session_is_sent_back_to_login(world: World) -> None:
    idle = Visitor(world)
    idle.sign_in("bob")
    assert idle.session_id is not None
    age_session(world, idle.session_id, idle_s=IDLE_S - 30)
    assert idle.get("/inbox").status_code == 200, "inside the idle limit"
    age_session(world, idle.session_id, idle_s=IDLE_S + 1)
    expired = idle.get("/inbox")
    assert expired.status_code == 401
    assert "your session has ended" in expired.text and 'id="token"' in expired.text
    assert 'opsflow_review_session=""' in expired.headers["set-cookie"]

    # However busy, a session ends MAX_S after sign-in.
    busy = Visitor(world)
    busy.sign_in("bob")
    assert busy.session_id is not None
    age_session(world, busy.session_id, old_s=MAX_S + 1)
    assert busy.get("/inbox").status_code == 401


def test_a_revoked_users_session_ends_at_once(world: World) -> None:
    with psycopg.connect(world.database_url) as conn:
        made = users.create_user(conn, "rita", users.Role.REVIEWER, display_name="Rita")
    world.people["rita"] = Person(made.user.user_id, "Rita", made.token)
    rita = Visitor(world)
    rita.sign_in("rita")
    assert rita.get("/inbox").status_code == 200
    with psycopg.connect(world.database_url) as conn:
        users.revoke_user(conn, "rita")
    assert rita.get("/inbox").status_code == 401


def test_another_steps_session_opens_nothing_here(world: World) -> None:
    """Cookies are kept per host, not per port: the refund approvals' inbox beside this one
    sees this cookie path too, so a session belongs to the step that started it."""
    with psycopg.connect(world.database_url) as conn:
        ann = users.verify_token(conn, world.people["ann"].token)
        assert ann is not None
        limits = SessionLimits(timedelta(seconds=IDLE_S), timedelta(seconds=MAX_S))
        elsewhere = start_session(conn, ann, scope="refund-approval", limits=limits)
    assert Visitor(world, session_id=elsewhere).get("/inbox").status_code == 401


def test_a_cross_site_form_post_without_the_csrf_token_is_refused(world: World) -> None:
    task_id = open_task(world)
    ann = Visitor(world)
    ann.sign_in("ann")
    path = f"/inbox/tasks/{task_id}/claim"
    # The cookie alone (a browser that sends it cross-site), with no token or another one.
    for form in ({}, {"csrf_token": ""}, {"csrf_token": "0" * 64}):
        refused = ann.post(path, form)
        assert refused.status_code == 403, form
        assert "did not carry the token of your session" in refused.text
    # Another session's token is not this one's.
    bob = Visitor(world)
    bob.sign_in("bob")
    assert ann.post(path, {"csrf_token": bob.csrf_token()}).status_code == 403
    assert claimed_by(world, task_id) is None

    decided = ann.post(
        f"/inbox/tasks/{task_id}/decide",
        {"decision": "approve", "reason": "forged"},
    )
    assert decided.status_code == 403
    assert ann.post("/inbox/sign-out", {}).status_code == 403, "no forced sign-out either"
    assert ann.get("/inbox").status_code == 200

    claimed = ann.post(path, {"csrf_token": ann.csrf_token(f"/inbox/tasks/{task_id}")})
    assert claimed.status_code == 303
    assert claimed_by(world, task_id) == "Ann Reviewer"


def test_a_form_post_from_another_origin_is_refused_even_with_the_token(world: World) -> None:
    task_id = open_task(world)
    ann = Visitor(world)
    ann.sign_in("ann")
    token = ann.csrf_token()
    path = f"/inbox/tasks/{task_id}/claim"
    for origin in ("https://attacker.example", "null", f"{world.url}.attacker.example"):
        assert ann.post(path, {"csrf_token": token}, origin=origin).status_code == 403, origin
    assert ann.post(path, {"csrf_token": token}, origin=None).status_code == 403, "no Origin"
    assert claimed_by(world, task_id) is None
    referred = httpx.post(
        f"{world.url}{path}",
        data={"csrf_token": token},
        headers={
            "Referer": f"{world.url}/inbox/tasks/{task_id}",
            "Cookie": f"{COOKIE}={ann.session_id}",
        },
        timeout=30,
    )
    assert referred.status_code == 303, "a Referer from the inbox's own page will do"
    assert claimed_by(world, task_id) == "Ann Reviewer"

    # Nor may another site sign a browser in (as the attacker, to see what it enters).
    login = Visitor(world).post(
        "/inbox/sign-in",
        {"token": world.people["bob"].token},
        origin="https://attacker.example",
    )
    assert login.status_code == 403 and "set-cookie" not in login.headers


def test_inbox_pages_forbid_third_party_scripts_and_framing(world: World) -> None:
    task_id = open_task(world)
    ann = Visitor(world)
    ann.sign_in("ann")
    answers = {
        path: ann.get(path)
        for path in (
            "/inbox/sign-in",
            "/inbox",
            f"/inbox/tasks/{task_id}",
            "/inbox/pages.css",
            "/inbox/inbox.js",
        )
    }
    answers["/tasks"] = world.call("GET", "/tasks", "ann")
    for path, answer in answers.items():
        assert answer.status_code == 200, path
        policy = dict(
            directive.strip().split(" ", 1)
            for directive in answer.headers["content-security-policy"].split(";")
        )
        assert policy["default-src"] == "'none'", path
        # The inbox's own script file, and nothing inline or from elsewhere; its refresh
        # fetches only this origin.
        assert policy["script-src"] == policy["connect-src"] == "'self'", path
        assert policy["style-src"] == "'self'" and policy["frame-ancestors"] == "'none'", path
        assert policy["form-action"] == "'self'" and policy["base-uri"] == "'none'", path
        assert answer.headers["x-content-type-options"] == "nosniff", path
        assert answer.headers["referrer-policy"] == "same-origin", path
        assert answer.headers["x-frame-options"] == "DENY", path
    for path in ("/inbox/sign-in", "/inbox", f"/inbox/tasks/{task_id}"):
        page = answers[path].text
        scripts = re.findall(r"<script([^>]*)>(.*?)</script>", page, re.IGNORECASE | re.DOTALL)
        assert page.lower().count("<script") == len(scripts), path
        # Signed in, the one script is the service's file; no inline code, no handler.
        assert scripts == ([] if path.endswith("sign-in") else [(scripts[0][0], "")]), path
        assert all(' src="/inbox/inbox.js"' in attributes for attributes, _ in scripts), path
        assert not re.search(r"\son[a-z]+=", page) and "javascript:" not in page, path
        assert "style=" not in page, path
        assert not re.search(r"""(src|href|action)="(https?:)?//""", page), path
    assert answers["/inbox/pages.css"].headers["content-type"].startswith("text/css")
    assert answers["/inbox/inbox.js"].headers["content-type"].startswith("text/javascript")
    # FastAPI's documentation pages load their scripts from a CDN: not on this origin.
    for docs in ("/docs", "/redoc"):
        assert httpx.get(f"{world.url}{docs}", timeout=10).status_code == 404, docs
    assert httpx.get(f"{world.url}/openapi.json", timeout=10).status_code == 200


def test_another_site_cannot_frame_the_inbox(world: World, chromium: Browser) -> None:
    """Clickjacking: a page elsewhere puts the inbox in a frame under its own buttons."""
    context = chromium.new_context()
    page = context.new_page()
    console: list[str] = []
    page.on("console", lambda message: console.append(message.text))
    page.set_content(f'<iframe id="inbox" src="{world.url}/inbox/sign-in"></iframe>')
    deadline = time.monotonic() + 10
    while not any("frame-ancestors" in text for text in console):
        assert time.monotonic() < deadline, f"the frame was not refused: {console}"
        page.wait_for_timeout(50)
    frame = page.frame_locator("#inbox")
    expect(frame.locator("#token")).to_have_count(0)
    context.close()
