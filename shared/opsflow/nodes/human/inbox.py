"""A human step's inbox: server-rendered pages over the same desk and checks as the API.

A person signs in by pasting their token (``opsflow users create NAME --role
...``), checked as the API checks a bearer token; sign-in, the session's
cookie, CSRF and the shared templates are ``opsflow.web.pages``' (the operator
console has the same), the cookie's path is ``/inbox``. A session ends after
``<PREFIX>SESSION_IDLE_S`` without a request or ``<PREFIX>SESSION_MAX_S``
after sign-in, at sign-out, and at once when the user is revoked; its cookie,
and any copy of it, then only leads back to the sign-in page. Every action
goes through the ``Desk`` like the API's (``api.actor_of``: an operator may
look but not act), and whether a button is shown is asked of the same
``TaskTable`` rules that would refuse the action (see ``_options``), so the
page and the API cannot disagree. A refusal (401, 403, 404, 409, 422, 503) is
shown on the page with the API's message and status.

CSRF: every change is a POST form; GET requests change nothing; a POST from
elsewhere or without the session's token is refused (``opsflow.web.pages``).
The pages load nothing from elsewhere and have no inline script: the service's
``Content-Security-Policy`` (``opsflow.web.headers``) allows their one
stylesheet and one script file, both served here.

A task's page shows what a decision needs: the instance's facts as the
application declares them (``HumanTask.facts``, read from its read models,
never from the request), the reasons, and the task's every event with its
actor and time. The queue filters by tier, reason, holder and due time and
searches by key, marks what is due soon, and points supervisors at escalated
work. Every page works without script; ``inbox.js`` (every
``<PREFIX>REFRESH_S``) fetches the page again and swaps its live parts (the
queue, a task's state, holder, history, facts), never one the person is typing
in or has focused, so two reviewers see each other's claims without reloading.
A GET changes nothing, so the refresh is as safe as a reload; it is marked
(``X-Inbox-Refresh``) so it does not keep an unattended session alive.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote

from fastapi import APIRouter, Query, Request
from fastapi.responses import RedirectResponse, Response
from psycopg import Error as DatabaseError
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from opsflow.nodes.human.api import DecisionBody, Views, actor_of
from opsflow.nodes.human.desk import Desk
from opsflow.nodes.human.facts import Section, read_facts
from opsflow.nodes.human.spec import HumanTask
from opsflow.nodes.human.tasks import (
    Actor,
    NotAllowed,
    QueueFilter,
    TaskConflict,
    TaskEntry,
    TaskNotFound,
    TaskTable,
)
from opsflow.users import Role
from opsflow.web import ProblemError
from opsflow.web.pages import NO_CSRF_TOKEN, Pages
from opsflow.web.sessions import Session, SessionLimits, csrf_token_matches

log = logging.getLogger("opsflow.nodes.human")

PREFIX = "/inbox"
# The header inbox.js marks its own requests with (see the module docstring).
REFRESH_HEADER = "x-inbox-refresh"
_TEMPLATES = Path(__file__).with_name("templates")
_REFUSALS: dict[type[Exception], int] = {TaskNotFound: 404, TaskConflict: 409, NotAllowed: 403}


def time_left(due: datetime, now: datetime) -> str:
    """How long until ``due``, for a person scanning the queue ("37 min left", "overdue by
    5 min", "2 h 5 min left")."""
    seconds = (due - now).total_seconds()
    minutes = int(abs(seconds) // 60)
    if minutes == 0:
        span = "less than a minute"
    elif minutes < 60:
        span = f"{minutes} min"
    elif minutes < 48 * 60:
        span = f"{minutes // 60} h {minutes % 60} min"
    else:
        span = f"{minutes // (24 * 60)} d {minutes // 60 % 24} h"
    return f"{span} left" if seconds >= 0 else f"overdue by {span}"


@dataclass(frozen=True)
class Options:
    """What the signed-in person may do on a task, as the desk's rules say now.

    Attributes:
        claim / release / decide: show that button (or form).
        note: why the decision form is missing, in the rules' own words.
    """

    claim: bool = False
    release: bool = False
    decide: bool = False
    note: str | None = None


def _options(
    spec: HumanTask, table: TaskTable, task_id: str, actor: Actor | None, now: datetime
) -> Options:
    """Ask the table's deciding methods, which return the event they would write or raise
    why not and change nothing, whether each action would pass (called under the lock)."""
    if actor is None:
        return Options(note="operators may look at tasks but not act on them")

    def refusal(probe: Callable[[], object]) -> str | None:
        try:
            probe()
        except (TaskConflict, NotAllowed) as err:
            return str(err)
        return None

    claim_event: list[object] = []
    claim_refused = refusal(lambda: claim_event.append(table.claim(task_id, actor, now=now)))
    decide_refused = refusal(lambda: table.decide(task_id, actor, spec.approved, "-", now=now))
    return Options(
        # claim answers None when the actor holds the task already: no button then.
        claim=claim_refused is None and claim_event[0] is not None,
        release=refusal(lambda: table.release(task_id, actor, now=now)) is None,
        decide=decide_refused is None,
        note=decide_refused,
    )


def _history(spec: HumanTask, entries: list[TaskEntry]) -> list[tuple[datetime, str, str]]:
    """Every event of the task as a line for people, oldest first: when, what (the event
    kind, for the page's markup), and who did it and why."""

    def by(entry: TaskEntry) -> str:
        actor = entry.actor
        return f" by {actor.display_name} ({actor.role.value.lower()})" if actor else ""

    def because(entry: TaskEntry) -> str:
        return f": {entry.reason}" if entry.reason else ""

    lines = []
    for entry in entries:
        if entry.kind == "requested":
            text = f"{spec.name.capitalize()} requested"
        elif entry.kind == "claimed":
            text = f"Claimed{by(entry)}"
        elif entry.kind == "released":
            text = f"Released{by(entry)}{because(entry)}"
        elif entry.kind == "decided":
            verb = "Approved" if entry.decision == spec.approved else "Rejected"
            text = f"{verb}{by(entry)}{because(entry)}"
        elif entry.kind == "escalated":
            text = "Escalated to supervisors (first SLA missed)"
        else:
            text = "Supervisor SLA breached"
        lines.append((entry.at, entry.kind, text))
    return lines


def _refusal(err: Exception) -> tuple[int, str] | None:
    """The status and message the API would answer ``err`` with; None if it is not a
    refusal (then it propagates to the app's handlers)."""
    if isinstance(err, ProblemError):
        return err.problem.status, err.problem.detail or err.problem.title
    if isinstance(err, ValidationError):
        return 422, "give a reason (1 to 2000 characters) for the decision"
    for kind, status in _REFUSALS.items():
        if isinstance(err, kind):
            return status, str(err)
    return None


@dataclass(frozen=True)
class QueueQuery:
    """The queue page's filters as the person chose them (the form's fields, kept as
    given so the form shows them again), and the ``QueueFilter`` they make."""

    status: str = "open"
    tier: str = ""
    reason: str = ""
    claimed: str = ""
    due_within: str = ""
    search: str = ""

    def where(self, spec: HumanTask, now: datetime) -> QueueFilter:
        """The filter these fields select.

        Raises:
            ProblemError: 422 for a value the form does not offer.
        """
        if self.status not in ("open", "decided", "all"):
            raise ProblemError(422, "show open, decided or all tasks")
        tier = spec.tiers.__members__.get(self.tier) if self.tier else None
        if self.tier and tier is None:
            raise ProblemError(422, f"there is no tier {self.tier!r}")
        if self.claimed not in ("", "yes", "no"):
            raise ProblemError(422, "claimed is yes, no or empty")
        minutes = None
        if self.due_within:
            try:
                minutes = float(self.due_within)
            except ValueError:
                minutes = -1.0
            if not 0 <= minutes <= 10**6:
                raise ProblemError(422, "due within is a number of minutes")
        return QueueFilter(
            status=self.status,
            tier=tier,
            reason=self.reason or None,
            claimed={"yes": True, "no": False}.get(self.claimed),
            due_before=now + timedelta(minutes=minutes) if minutes is not None else None,
            search=self.search.strip() or None,
        )


def inbox_router(
    desk: Desk,
    view: Views,
    *,
    ready: Callable[[], None],
    limits: SessionLimits,
    due_soon: timedelta,
    refresh_s: float,
) -> APIRouter:
    """The inbox's pages under ``/inbox``, acting on ``desk``.

    Args:
        desk: the service's desk (the API's own).
        view: the API's views of a task.
        ready: raises the API's 503 while the step's topic is still being read.
        limits: how long a session lasts.
        due_soon: how near its due time a task is marked as due soon.
        refresh_s: how often an open page refreshes itself (0: never).
    """
    spec = desk.spec
    decisions = {"approve": spec.approved, "reject": spec.rejected}
    pages = Pages(
        prefix=PREFIX,
        scope=spec.name,
        title=f"{spec.name.capitalize()} inbox",
        templates=_TEMPLATES,
        limits=limits,
        roles=tuple(Role),  # operators may look (``actor_of`` keeps them from acting)
        refusal_page="queue.html",
        # What every page of this step shows: what its tasks are about, the key.
        defaults={
            "subject": spec.subject,
            "key_field": spec.key_field,
            "topic": spec.topic.value,
            "rows": [],
            "script": "inbox.js",
            "role_hint": "reviewer",
        },
        refresh_header=REFRESH_HEADER,
    )
    render, sign_in_page, signed_in = pages.render, pages.sign_in_page, pages.signed_in
    script = _TEMPLATES.joinpath("inbox.js").read_text("utf-8")
    router = APIRouter(prefix=PREFIX, include_in_schema=False)
    pages.add_routes(router)

    def refused(request: Request, session: Session, status: int, message: str) -> Response:
        """A refusal shown on the signed-in person's queue page (without its rows)."""
        return pages.signed_in_page(
            request, session, "queue.html", status=status, error=message, refresh_s=refresh_s
        )

    def urgency(due_at: datetime, now: datetime) -> str:
        """How the page marks an open task's time left: overdue, due soon, or not."""
        if due_at <= now:
            return "overdue"
        return "soon" if due_at - now <= due_soon else ""

    async def facts_of(request: Request, key: str) -> tuple[list[Section], str | None]:
        """The instance's facts as the application declares them, or why they are missing."""
        if spec.facts is None:
            return [], None
        try:
            return await run_in_threadpool(read_facts, pages.pool(request), spec.facts, key), None
        except DatabaseError as err:
            log.warning(
                "facts of a task's instance unreadable",
                extra={"correlation_id": key, "error": str(err)},
            )
            return [], f"the facts of this {spec.subject} could not be read now ({err}); reload"

    async def task_page(
        request: Request,
        session: Session,
        task_id: str,
        *,
        status: int = 200,
        error: str | None = None,
    ) -> Response:
        now = desk.clock.now()
        try:
            actor: Actor | None = actor_of(spec, session.user)
        except ProblemError:
            actor = None

        def look(table: TaskTable) -> tuple[Any, str, Options, list[TaskEntry]]:
            found = table.get(task_id)
            options = _options(spec, table, task_id, actor, now)
            return view.task(found), found.key, options, list(found.history)

        task, key, options, entries = desk.read(look)
        facts, facts_error = await facts_of(request, key)
        return render(
            request,
            "task.html",
            status=status,
            user=session.user,
            csrf=session.csrf_token,
            error=error,
            task=task,
            options=options,
            history=_history(spec, entries),
            facts=facts,
            facts_declared=spec.facts is not None,
            facts_error=facts_error,
            left=time_left(task.due_at, now),
            urgency=urgency(task.due_at, now),
            now=now,
            refresh_s=refresh_s,
        )

    @router.get("/inbox.js")
    async def js() -> Response:
        return Response(script, media_type="text/javascript")

    @router.get("")
    async def queue(
        request: Request,
        status: str = "open",
        tier: str = "",
        reason: str = "",
        claimed: str = "",
        due_within: str = "",
        search: Annotated[str, Query(max_length=200)] = "",
    ) -> Response:
        if not request.cookies.get(pages.cookie):
            return RedirectResponse(f"{PREFIX}/sign-in", status_code=303)
        try:
            session = await signed_in(request)
        except ProblemError as err:
            return sign_in_page(request, 401, err.problem.detail)
        chosen = QueueQuery(status, tier, reason, claimed, due_within, search)
        now = desk.clock.now()
        try:
            ready()
            where = chosen.where(spec, now)
        except ProblemError as err:
            return refused(request, session, err.problem.status, err.problem.detail)

        def look(table: TaskTable) -> tuple[list[Any], list[str], int]:
            everything = table.tasks.values()
            codes = sorted({code for task in everything for code in task.reason_codes})
            escalated = sum(1 for t in everything if t.open and t.tier == spec.second_tier)
            return [view.task(task) for task in table.queue(where)], codes, escalated

        tasks, reason_codes, escalated = desk.read(look)
        # A decided task has no time left to show.
        rows = [
            (task, time_left(task.due_at, now), urgency(task.due_at, now))
            if task.status == "open"
            else (task, "", "")
            for task in tasks
        ]
        return render(
            request,
            "queue.html",
            user=session.user,
            csrf=session.csrf_token,
            rows=rows,
            now=now,
            status_filter=status,
            chosen=chosen,
            tiers=[(tier.name, tier.value.lower()) for tier in spec.tiers],
            second_tier=spec.second_tier.name,
            reason_codes=reason_codes,
            escalated=escalated,
            supervisor=session.user.role == Role.SUPERVISOR,
            refresh_s=refresh_s,
        )

    @router.get("/tasks/{task_id}")
    async def task(request: Request, task_id: str) -> Response:
        try:
            session = await signed_in(request)
        except ProblemError as err:
            return sign_in_page(request, 401, err.problem.detail)
        try:
            ready()
            return await task_page(request, session, task_id)
        except (ProblemError, TaskNotFound) as err:
            code, message = _refusal(err) or (500, str(err))
            return refused(request, session, code, message)

    @router.post("/tasks/{task_id}/{action}")
    async def act(
        request: Request, task_id: str, action: Literal["claim", "release", "decide"]
    ) -> Response:
        if (refusal := pages.refused_post(request)) is not None:
            return refusal
        try:
            session = await signed_in(request)
        except ProblemError as err:
            return sign_in_page(request, 401, err.problem.detail)
        form = await pages.form(request)
        if not csrf_token_matches(session, form.get("csrf_token")):
            return refused(request, session, 403, NO_CSRF_TOKEN)
        try:
            ready()
            actor = actor_of(spec, session.user)
            if action == "claim":
                await run_in_threadpool(desk.claim, task_id, actor, view.task)
            elif action == "release":
                await run_in_threadpool(desk.release, task_id, actor, None, view.task)
            else:
                decision = decisions.get(form.get("decision", ""))
                if decision is None:
                    raise ProblemError(422, "choose Approve or Reject")
                body = DecisionBody.model_validate({"reason": form.get("reason", "")})
                await run_in_threadpool(
                    desk.decide, task_id, actor, decision, body.reason, view.task
                )
        except (ProblemError, ValidationError, TaskNotFound, TaskConflict, NotAllowed) as err:
            code, message = _refusal(err) or (500, str(err))
            try:
                return await task_page(request, session, task_id, status=code, error=message)
            except TaskNotFound:
                return refused(request, session, code, message)
        # Post/redirect/get: a reload does not repeat the action.
        return RedirectResponse(f"{PREFIX}/tasks/{quote(task_id, safe='')}", status_code=303)

    return router
