"""A human step's HTTP API: the queue, and claim, release, approve, reject.

Every action is written to the step's topic with the authenticated person as
its actor and acknowledged by the broker before the answer; the answer is the
task as it is after the action (see ``desk``). People authenticate with
``Authorization: Bearer <token>`` (``opsflow users create NAME --role ...``):
reviewers act on reviewer-tier tasks, supervisors on any task, operators may
only look. Errors are RFC 9457 problems (``opsflow.web``). The routes answer
from the in-memory table, so an HTML page can sit on the same ``desk`` calls.

The service's origin holds people's inbox sessions, so it runs no script but
its own (none) and every response carries ``opsflow.web.headers``' policy.
That is why FastAPI's ``/docs`` and ``/redoc`` are off: they load Swagger UI
and ReDoc from a CDN, a third-party script that would act as whoever is signed
in. Serving those bundles from an installed package would still need an
inline script (a hole in the policy) on the same origin; ``/openapi.json``
remains, for any OpenAPI viewer or client generator run elsewhere.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any, Literal

import pydantic
from confluent_kafka.schema_registry import SchemaRegistryClient
from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from psycopg_pool import ConnectionPool
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from opsflow.contracts.bounds import MAX_TEXT
from opsflow.nodes.human.clock import Clock
from opsflow.nodes.human.desk import ActionPending, Desk
from opsflow.nodes.human.feed import Feed
from opsflow.nodes.human.settings import HumanTaskSettings
from opsflow.nodes.human.sla import load_sla
from opsflow.nodes.human.spec import HumanTask
from opsflow.nodes.human.tasks import (
    Actor,
    NotAllowed,
    QueueFilter,
    Task,
    TaskConflict,
    TaskNotFound,
)
from opsflow.nodes.human.transitions import Transitions
from opsflow.producer import Producer
from opsflow.settings import KafkaSettings, RegistrySettings
from opsflow.topics import topic_name
from opsflow.users import Role, User, verify_token
from opsflow.web import (
    ProblemError,
    SecurityHeaders,
    check_ready,
    install_openapi,
    install_problem_handlers,
    parse_json,
    problem_responses,
    read_body,
    read_limited,
    request_body,
)
from opsflow.web.sessions import SessionLimits

_DESCRIPTION = """\
The {name} queue: {subject}s that wait for a person. List the queue,
claim a task, release it, approve or reject it with a reason. Each action is an
event on the `{topic}` topic carrying you as its actor, acknowledged by the
broker before the answer. A task is decided exactly once: a second decision, a
decision on a task someone else holds, or any action on a decided task is a 409
saying who holds or decided it. Tasks past their SLA move to supervisors.

Authenticate with `Authorization: Bearer <token>` (`opsflow users create NAME
--role reviewer|supervisor|operator`). Errors are RFC 9457 problem details.
This document is served as `/openapi.json` only: the service serves no
documentation page (see the module docstring).
"""

_BODY_LIMIT = 16 * 1024
_RESPONSE_TEXT = {
    400: "The body is not valid JSON.",
    401: "No token, or an unknown or revoked one.",
    403: "Your role may not do this (operators only look; escalated tasks are for supervisors).",
    404: "No task has this id.",
    409: "The task is decided, or held by someone else: the detail says by whom.",
    413: "The body is too large.",
    415: "The body is not declared as JSON.",
    422: "The body or a parameter does not match the contract.",
    503: "The service is still reading its topic, or the broker or the database is "
    "unavailable: nothing was written, unless the detail says the action is recorded (then "
    "it is written once the broker answers). Retry shortly.",
}
_READ_PROBLEMS = problem_responses(401, 422, 503, descriptions=_RESPONSE_TEXT)
_ACT_PROBLEMS = problem_responses(
    400, 401, 403, 404, 409, 413, 415, 422, 503, descriptions=_RESPONSE_TEXT
)

# --- bodies and views --------------------------------------------------------------------


class DecisionBody(BaseModel):
    """Why it is approved or rejected; recorded in the decision event."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field(min_length=1, max_length=MAX_TEXT)


class ReleaseBody(BaseModel):
    """Why the task goes back to the queue (optional)."""

    model_config = ConfigDict(extra="forbid")

    reason: str | None = Field(default=None, max_length=MAX_TEXT)


class ClockBody(BaseModel):
    """The time the service should take as now (test clock only)."""

    model_config = ConfigDict(extra="forbid")

    now: AwareDatetime


class TaskViewBase(BaseModel):
    """A task as the step's topic says it is (the step's view adds its key field)."""

    task_id: str
    status: Literal["open", "approved", "rejected"]
    due_at: datetime
    reason_codes: list[str]
    requested_at: datetime
    claimed_at: datetime | None
    decided_at: datetime | None
    decision_reason: str | None
    escalated_at: datetime | None
    sla_breached_at: datetime | None
    version: int = Field(description="How many events this task has had.")


@dataclass(frozen=True)
class Views:
    """The step's response models: a person, a task (with its key field named as the
    step's topic names it, ``invoice_id``), a queue; and ``task`` makes a task's view."""

    actor: type[BaseModel]
    task_model: type[TaskViewBase]
    queue: type[BaseModel]
    task: Callable[[Task], Any]


def views(spec: HumanTask) -> Views:
    """The response models of ``spec``'s API, with its enums and its key field."""
    actor_view = pydantic.create_model(
        "ActorView",
        __doc__="A person as events record them.",
        user_id=(str, ...),
        display_name=(str, ...),
        role=(spec.roles, ...),
    )
    reasons = spec.events.requested.model_fields["reasons"].annotation
    fields: dict[str, Any] = {
        spec.key_field: (str, Field(description=f"The {spec.subject} the task decides about.")),
        "tier": (spec.tiers, ...),
        "reasons": (reasons, ...),
        "claimed_by": (actor_view | None, ...),
        "decided_by": (actor_view | None, ...),
    }
    task_view = pydantic.create_model(
        "TaskView",
        __base__=TaskViewBase,
        __doc__=f"A {spec.name} task as the {spec.topic.value} topic says it is.",
        **fields,
    )
    queue_view = pydantic.create_model(
        "QueueView",
        __doc__="The selected tasks, soonest due first.",
        now=(datetime, Field(description="The service's clock when the list was made.")),
        count=(int, ...),
        tasks=(list[task_view], ...),  # type: ignore[valid-type]
    )

    def person(actor: Actor | None) -> BaseModel | None:
        if actor is None:
            return None
        return actor_view(user_id=actor.user_id, display_name=actor.display_name, role=actor.role)

    def of(task: Task) -> Any:
        """The view of ``task`` (called under the table's lock)."""
        return task_view.model_validate(
            {
                "task_id": task.task_id,
                spec.key_field: task.key,
                "status": "open" if task.decision is None else task.decision.value.lower(),
                "tier": task.tier,
                "due_at": task.due_at,
                "reason_codes": list(task.reason_codes),
                "reasons": list(task.reasons),
                "requested_at": task.requested_at,
                "claimed_by": person(task.claimed_by),
                "claimed_at": task.claimed_at,
                "decided_by": person(task.decided_by),
                "decided_at": task.decided_at,
                "decision_reason": task.decision_reason,
                "escalated_at": task.escalated_at,
                "sla_breached_at": task.breached_at,
                "version": task.version,
            }
        )

    return Views(actor_view, task_view, queue_view, of)


class ClockView(BaseModel):
    """The service's clock."""

    now: datetime


class Health(BaseModel):
    """Liveness or readiness."""

    status: str
    tasks: int | None = None


# --- authentication ----------------------------------------------------------------------

_bearer = HTTPBearer(auto_error=False, description="A token from `opsflow users create`.")


def authenticated(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> User:
    """The active user presenting the bearer token.

    Raises:
        ProblemError: 401 with a Bearer challenge: no token, or an unknown or revoked one.
    """
    if credentials is None:
        raise ProblemError(
            401,
            "send your token as `Authorization: Bearer <token>` "
            "(an administrator creates one with `opsflow users create NAME --role ROLE`)",
            headers={"WWW-Authenticate": request.app.state.realm},
        )
    pool: ConnectionPool[Any] = request.app.state.pool
    with pool.connection() as conn:
        user = verify_token(conn, credentials.credentials)
    if user is None:
        raise ProblemError(
            401,
            "the token is unknown or revoked",
            headers={"WWW-Authenticate": f'{request.app.state.realm}, error="invalid_token"'},
        )
    return user


def actor_of(spec: HumanTask, user: User) -> Actor:
    """``user`` as the actor of the step's events.

    Raises:
        ProblemError: 403 for an operator, who may look but not act.
    """
    roles: dict[Role, StrEnum] = {Role.REVIEWER: spec.reviewer, Role.SUPERVISOR: spec.supervisor}
    role = roles.get(user.role)
    if role is None:
        raise ProblemError(
            403, f"{user.display_name} is an {user.role}; only reviewers and supervisors act"
        )
    return spec.actor_of(user.user_id, user.display_name, role)


def acting(request: Request, user: Annotated[User, Depends(authenticated)]) -> Actor:
    """The authenticated user as the actor of the step's events (403 for an operator)."""
    return actor_of(request.app.state.spec, user)


Viewer = Annotated[User, Depends(authenticated)]
Acting = Annotated[Actor, Depends(acting)]


# --- the app -----------------------------------------------------------------------------


def create_app(
    spec: HumanTask,
    settings: HumanTaskSettings,
    *,
    pool: ConnectionPool[Any],
    producer: Producer,
) -> FastAPI:
    """The step's service over an open pool and producer (owned by the caller).

    The opener, reader and timer threads (``feed``) start and stop with the app.
    """
    clock = Clock(settings.clock_offset_s)
    sla = load_sla(settings.sla_file, f"{settings.prefix()}SLA_FILE")
    transitions = Transitions(pool, topic_name(spec.topic), [model for _, model in spec.events])
    desk = Desk(spec, producer, transitions, clock, supervisor_sla=sla.supervisor)
    view = views(spec)
    TaskView, QueueView = view.task_model, view.queue
    feed = Feed(
        desk,
        kafka=KafkaSettings().client_config(),
        registry=SchemaRegistryClient(RegistrySettings().client_config()),
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        feed.start()
        try:
            yield
        finally:
            await run_in_threadpool(feed.stop)

    description = _DESCRIPTION.format(name=spec.name, subject=spec.subject, topic=spec.topic.value)
    app = FastAPI(
        title=f"opsflow {spec.name}",
        version="1",
        description=description,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.add_middleware(SecurityHeaders)
    app.state.pool = pool
    app.state.desk = desk
    app.state.spec = spec
    app.state.realm = f'Bearer realm="opsflow {spec.name}"'

    def ready() -> None:
        if not feed.ready.is_set():
            raise ProblemError(
                503,
                f"the service is still reading the {spec.topic.value} topic; retry shortly",
                headers={"Retry-After": "1"},
            )

    Ready = Depends(ready)

    async def list_tasks(
        user: Viewer,
        status: Literal["open", "decided", "all"] = "open",
        tier: Any = None,
        reason: Annotated[
            str | None, Query(description="Only tasks with this reason code.")
        ] = None,
        claimed: Annotated[
            bool | None, Query(description="Only claimed (true) or unclaimed (false) tasks.")
        ] = None,
        # The description names the setting, not its value: annotations are read in the
        # module's namespace when the route is declared, where ``settings`` is not
        # (naming it there made the route and /openapi.json answer 500).
        due_soon: Annotated[
            bool,
            Query(description="Only tasks due within the DUE_SOON_S setting (900 s) or overdue."),
        ] = False,
        due_within_s: Annotated[
            float | None, Query(ge=0, description="Only tasks due within this many seconds.")
        ] = None,
        search: Annotated[
            str | None,
            Query(max_length=200, description="Only tasks whose key contains this (any case)."),
        ] = None,
    ) -> Any:
        now = clock.now()
        window = due_within_s if due_within_s is not None else settings.due_soon_s
        where = QueueFilter(
            status=status,
            tier=tier,
            reason=reason,
            claimed=claimed,
            due_before=now + timedelta(seconds=window)
            if due_soon or due_within_s is not None
            else None,
            search=search,
        )
        tasks = desk.queue(where, view.task)
        return QueueView(now=now, count=len(tasks), tasks=tasks)

    # The step's own enum, set as a type (not a name the module's namespace would be
    # searched for), so the parameter is checked and documented as its symbols.
    list_tasks.__annotations__["tier"] = spec.tiers | None
    app.get(
        "/tasks",
        response_model=QueueView,
        responses=_READ_PROBLEMS,
        dependencies=[Ready],
        tags=["tasks"],
        summary=f"List {spec.name} tasks, soonest due first",
    )(list_tasks)

    @app.get(
        "/tasks/{task_id}",
        response_model=TaskView,
        responses=problem_responses(401, 404, 503, descriptions=_RESPONSE_TEXT),
        dependencies=[Ready],
        tags=["tasks"],
        summary=f"One {spec.name} task",
    )
    async def get_task(task_id: str, user: Viewer) -> Any:
        return desk.read(lambda table: view.task(table.get(task_id)))

    @app.post(
        "/tasks/{task_id}/claim",
        response_model=TaskView,
        responses=_ACT_PROBLEMS,
        dependencies=[Ready],
        tags=["tasks"],
        summary="Claim a task (no-op if you hold it already)",
    )
    async def claim(task_id: str, actor: Acting) -> Any:
        return await run_in_threadpool(desk.claim, task_id, actor, view.task)

    @app.post(
        "/tasks/{task_id}/release",
        response_model=TaskView,
        responses=_ACT_PROBLEMS,
        dependencies=[Ready],
        tags=["tasks"],
        summary="Put a claimed task back in the queue (its holder, or a supervisor)",
        openapi_extra={
            "requestBody": {
                "required": False,
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/ReleaseBody"}}
                },
            }
        },
    )
    async def release(task_id: str, actor: Acting, request: Request) -> Any:
        raw = await read_limited(request, _BODY_LIMIT)
        body = parse_json(ReleaseBody, raw) if raw.strip() else ReleaseBody()
        return await run_in_threadpool(desk.release, task_id, actor, body.reason, view.task)

    def decision_route(decision: StrEnum) -> Any:
        async def decide(task_id: str, actor: Acting, request: Request) -> Any:
            body = parse_json(DecisionBody, await read_body(request, _BODY_LIMIT))
            return await run_in_threadpool(
                desk.decide, task_id, actor, decision, body.reason, view.task
            )

        return decide

    for path, decision in (("approve", spec.approved), ("reject", spec.rejected)):
        app.post(
            f"/tasks/{{task_id}}/{path}",
            response_model=TaskView,
            responses=_ACT_PROBLEMS,
            dependencies=[Ready],
            tags=["tasks"],
            summary=f"{path.capitalize()} the {spec.subject} under review, with a reason",
            operation_id=f"{path}_task",
            openapi_extra=request_body("DecisionBody"),
        )(decision_route(decision))

    @app.get("/healthz", response_model=Health, tags=["operations"])
    async def healthz() -> Health:
        """The process is up and serving."""
        return Health(status="ok")

    @app.get(
        "/readyz",
        response_model=Health,
        tags=["operations"],
        responses=problem_responses(503, descriptions=_RESPONSE_TEXT),
    )
    async def readyz() -> Health:
        """The step's topic is replayed, due timers have fired, and the database and the
        broker answer."""
        ready()
        await run_in_threadpool(check_ready, pool, producer)
        return Health(status="ready", tasks=desk.read(lambda table: len(table.tasks)))

    if settings.test_clock:

        @app.get("/testing/clock", response_model=ClockView, tags=["testing"])
        async def read_clock() -> ClockView:
            """The service's clock (<PREFIX>TEST_CLOCK=1 only)."""
            return ClockView(now=clock.now())

        @app.put("/testing/clock", response_model=ClockView, tags=["testing"])
        async def set_clock(request: Request) -> ClockView:
            """Set the service's clock; it keeps ticking from there (<PREFIX>TEST_CLOCK=1 only)."""
            body = parse_json(ClockBody, await read_body(request, _BODY_LIMIT))
            clock.set(body.now)
            return ClockView(now=clock.now())

    # The inbox pages, over this desk (imported here: inbox builds on this module).
    from opsflow.nodes.human.inbox import inbox_router

    limits = SessionLimits(
        idle=timedelta(seconds=settings.session_idle_s),
        absolute=timedelta(seconds=settings.session_max_s),
    )
    app.include_router(
        inbox_router(
            desk,
            view,
            ready=ready,
            limits=limits,
            due_soon=timedelta(seconds=settings.due_soon_s),
            refresh_s=settings.refresh_s,
        )
    )
    install_problem_handlers(app)
    for error, status in ((TaskNotFound, 404), (TaskConflict, 409), (NotAllowed, 403)):
        app.add_exception_handler(error, _problem(status))
    # Not "nothing was written", as for other unavailable dependencies: it is recorded.
    app.add_exception_handler(ActionPending, _problem(503, {"Retry-After": "1"}))
    install_openapi(app, bodies=[DecisionBody, ReleaseBody, ClockBody])
    return app


def _problem(status: int, headers: dict[str, str] | None = None) -> Any:
    async def answer(request: Request, exc: Exception) -> Response:
        return ProblemError(status, str(exc), headers=headers).response(request.url.path)

    return answer
