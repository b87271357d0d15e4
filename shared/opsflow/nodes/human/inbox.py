"""A human step's inbox: server-rendered pages over the same desk and checks as the API.

A person signs in by pasting their token (``opsflow users create NAME --role
...``); it is kept in an ``HttpOnly``, ``SameSite=Strict`` cookie scoped to
``/inbox`` and checked on every request exactly as the API checks a bearer
token (``api.authenticated``, ``api.actor_of``), so a revoked token stops
working at once and an operator may look but not act. Every action goes
through the ``Desk`` like the API's, and whether a button is shown is asked
of the same ``TaskTable`` rules that would refuse the action (see
``_options``), so the page and the API cannot disagree. A refusal (401, 403,
404, 409, 422, 503) is shown on the page with the API's message and status.

CSRF: every change is a POST form and the cookie is ``SameSite=Strict``, so
a browser never sends it with a request started by another site (not even a
top-level form post); GET requests change nothing. That is the whole defence,
and it is enough for browsers that honour SameSite (all current ones).

Forms are ``application/x-www-form-urlencoded`` with a field or two, parsed
with the standard library (``urllib.parse``) rather than adding
python-multipart for file uploads the inbox never takes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, quote

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.security import HTTPAuthorizationCredentials
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from opsflow.nodes.human.api import DecisionBody, Views, actor_of, authenticated
from opsflow.nodes.human.desk import Desk
from opsflow.nodes.human.spec import HumanTask
from opsflow.nodes.human.tasks import (
    Actor,
    NotAllowed,
    QueueFilter,
    TaskConflict,
    TaskNotFound,
    TaskTable,
)
from opsflow.users import User
from opsflow.web import ProblemError, read_limited

PREFIX = "/inbox"
_FORM_LIMIT = 16 * 1024
_REFUSALS: dict[type[Exception], int] = {TaskNotFound: 404, TaskConflict: 409, NotAllowed: 403}
# What every page may use; a page passes what it has.
_DEFAULTS: dict[str, Any] = {"prefix": PREFIX, "user": None, "error": None, "rows": []}

_templates = Jinja2Templates(
    env=Environment(
        loader=FileSystemLoader(Path(__file__).with_name("templates")),
        autoescape=True,  # every value on the page comes from events or people
        undefined=StrictUndefined,  # a misspelt name fails the page, not shows blank
    )
)


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


def _when(at: datetime | None) -> str:
    return at.strftime("%Y-%m-%d %H:%M:%S UTC") if at else ""


_templates.env.filters["when"] = _when


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


def _history(spec: HumanTask, task: Any) -> list[tuple[datetime, str]]:
    """What the task's state records of its life, oldest first (a released claim is gone
    from the state; the step's topic keeps every event)."""
    entries: list[tuple[datetime, str]] = [
        (task.requested_at, f"{spec.name.capitalize()} requested")
    ]
    if task.claimed_by is not None and task.claimed_at is not None:
        entries.append((task.claimed_at, f"Claimed by {task.claimed_by.display_name}"))
    if task.escalated_at is not None:
        entries.append((task.escalated_at, "Escalated to supervisors (first SLA missed)"))
    if task.sla_breached_at is not None:
        entries.append((task.sla_breached_at, "Supervisor SLA breached"))
    if task.decided_by is not None and task.decided_at is not None:
        entries.append(
            (
                task.decided_at,
                f"{task.status.capitalize()} by {task.decided_by.display_name} "
                f"({task.decided_by.role.value.lower()}): {task.decision_reason}",
            )
        )
    return sorted(entries, key=lambda entry: entry[0])


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


async def _form(request: Request) -> dict[str, str]:
    raw = await read_limited(request, _FORM_LIMIT, hint="shorten the reason")
    fields = parse_qs(raw.decode("utf-8", "replace"), keep_blank_values=True)
    return {name: values[0] for name, values in fields.items()}


def _user_of(request: Request, token: str | None) -> User:
    """The signed-in user, checked as the API checks a bearer token.

    Raises:
        ProblemError: 401 for no token, or an unknown or revoked one.
    """
    if not token:
        raise ProblemError(401, "sign in with your token")
    return authenticated(request, HTTPAuthorizationCredentials(scheme="Bearer", credentials=token))


def inbox_router(desk: Desk, view: Views, *, ready: Callable[[], None]) -> APIRouter:
    """The inbox's pages under ``/inbox``, acting on ``desk``.

    Args:
        desk: the service's desk (the API's own).
        view: the API's views of a task.
        ready: raises the API's 503 while the step's topic is still being read.
    """
    spec = desk.spec
    cookie = f"opsflow_{spec.name.replace('-', '_')}_token"
    decisions = {"approve": spec.approved, "reject": spec.rejected}
    # What every page of this step shows: its name, what its tasks are about, the key.
    step = {
        "title": f"{spec.name.capitalize()} inbox",
        "subject": spec.subject,
        "key_field": spec.key_field,
        "topic": spec.topic.value,
    }
    router = APIRouter(prefix=PREFIX, include_in_schema=False)

    def render(request: Request, name: str, *, status: int = 200, **context: Any) -> Response:
        response = _templates.TemplateResponse(
            request, name, {**_DEFAULTS, **step, **context}, status
        )
        # Pages show who holds what: never serve one from a cache after the fact.
        response.headers["Cache-Control"] = "no-store"
        return response

    def sign_in_page(request: Request, status: int, message: str | None) -> Response:
        response = render(request, "sign_in.html", status=status, error=message)
        if status == 401:
            response.delete_cookie(cookie, path=PREFIX)
        return response

    async def signed_in(request: Request) -> User:
        user: User = await run_in_threadpool(_user_of, request, request.cookies.get(cookie))
        return user

    def task_page(
        request: Request, user: User, task_id: str, *, status: int = 200, error: str | None = None
    ) -> Response:
        now = desk.clock.now()
        try:
            actor: Actor | None = actor_of(spec, user)
        except ProblemError:
            actor = None

        def look(table: TaskTable) -> tuple[Any, Options]:
            return view.task(table.get(task_id)), _options(spec, table, task_id, actor, now)

        task, options = desk.read(look)
        return render(
            request,
            "task.html",
            status=status,
            user=user,
            error=error,
            task=task,
            options=options,
            history=_history(spec, task),
            left=time_left(task.due_at, now),
            now=now,
        )

    @router.get("")
    async def queue(
        request: Request, status: Literal["open", "decided", "all"] = "open"
    ) -> Response:
        if not request.cookies.get(cookie):
            return RedirectResponse(f"{PREFIX}/sign-in", status_code=303)
        try:
            user = await signed_in(request)
            ready()
        except ProblemError as err:
            code, message = _refusal(err) or (500, str(err))
            if code == 401:
                return sign_in_page(request, code, message)
            return render(request, "queue.html", status=code, error=message)
        now = desk.clock.now()
        tasks = desk.queue(QueueFilter(status=status), view.task)
        # A decided task has no time left to show.
        rows = [
            (task, time_left(task.due_at, now) if task.status == "open" else "") for task in tasks
        ]
        return render(request, "queue.html", user=user, rows=rows, now=now, status_filter=status)

    @router.get("/sign-in")
    async def sign_in_form(request: Request) -> Response:
        return sign_in_page(request, 200, None)

    @router.post("/sign-in")
    async def sign_in(request: Request) -> Response:
        token = (await _form(request)).get("token", "").strip()
        try:
            await run_in_threadpool(_user_of, request, token)
        except ProblemError as err:
            return sign_in_page(request, 401, err.problem.detail)
        response = RedirectResponse(PREFIX, status_code=303)
        response.set_cookie(
            cookie,
            token,
            path=PREFIX,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return response

    @router.post("/sign-out")
    async def sign_out(request: Request) -> Response:
        response = RedirectResponse(f"{PREFIX}/sign-in", status_code=303)
        response.delete_cookie(cookie, path=PREFIX, httponly=True, samesite="strict")
        return response

    @router.get("/tasks/{task_id}")
    async def task(request: Request, task_id: str) -> Response:
        try:
            user = await signed_in(request)
        except ProblemError as err:
            return sign_in_page(request, 401, err.problem.detail)
        try:
            ready()
            return task_page(request, user, task_id)
        except (ProblemError, TaskNotFound) as err:
            code, message = _refusal(err) or (500, str(err))
            return render(request, "queue.html", status=code, user=user, error=message)

    @router.post("/tasks/{task_id}/{action}")
    async def act(
        request: Request, task_id: str, action: Literal["claim", "release", "decide"]
    ) -> Response:
        try:
            user = await signed_in(request)
        except ProblemError as err:
            return sign_in_page(request, 401, err.problem.detail)
        form = await _form(request)
        try:
            ready()
            actor = actor_of(spec, user)
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
                return task_page(request, user, task_id, status=code, error=message)
            except TaskNotFound:
                return render(request, "queue.html", status=code, user=user, error=message)
        # Post/redirect/get: a reload does not repeat the action.
        return RedirectResponse(f"{PREFIX}/tasks/{quote(task_id, safe='')}", status_code=303)

    return router
