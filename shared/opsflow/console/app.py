"""The console's app: its pages over the operator commands' library code (see the package)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import RedirectResponse, Response
from psycopg_pool import ConnectionPool
from starlette.concurrency import run_in_threadpool

from opsflow import operator_actions, stack
from opsflow.console.rebuilds import RebuildRun, Rebuilds
from opsflow.console.settings import ConsoleSettings
from opsflow.db import requires_table
from opsflow.dlq import DeadLetterQueues, Filters, UnknownDeadLetterError, cases
from opsflow.dlq import decoded as decoded_value
from opsflow.errors import BadInputError, ConfigurationError, OpsflowError
from opsflow.operator_actions import REBUILD, REDRIVE, REPLAY, ActionLog, Actor
from opsflow.producer import Producer
from opsflow.projections import Projection
from opsflow.projections.rebuild import RebuildResult
from opsflow.projections.status import ProjectionStatus
from opsflow.settings import DatabaseSettings, KafkaSettings, RegistrySettings, TopicSettings
from opsflow.stack.components import StackPlan
from opsflow.topics import topic_name
from opsflow.users import Role
from opsflow.web import ProblemError, SecurityHeaders, add_health_routes, install_problem_handlers
from opsflow.web.pages import Pages
from opsflow.web.sessions import Session, SessionLimits

PREFIX = "/console"
_TEMPLATES = Path(__file__).with_name("templates")
T = TypeVar("T")


@dataclass(frozen=True)
class Cluster:
    """What the console reads and writes: the cluster, the registry and the database.

    Attributes:
        kafka: librdkafka settings with the operator's credentials.
        registry: the schema registry client's settings.
        database_url: where sessions, redrive marks and operator actions are.
        prefix: ``OPSFLOW_TOPIC_PREFIX``.
        plan: the local stack's, when one runs (its services' rates and inputs).
    """

    kafka: Mapping[str, Any]
    registry: Mapping[str, Any]
    database_url: str
    prefix: str
    plan: StackPlan | None = None

    @classmethod
    def from_environment(cls) -> Cluster:
        """The cluster the variables name (as for every operator command)."""
        return cls(
            kafka={"socket.timeout.ms": 5000, "log_level": 0, **KafkaSettings().client_config()},
            registry=RegistrySettings().client_config(),
            database_url=DatabaseSettings().database_url or "",
            prefix=TopicSettings().prefix,
            plan=stack.running_plan(),
        )

    def queues(self) -> DeadLetterQueues:
        return DeadLetterQueues(self.kafka, self.database_url, prefix=self.prefix)

    def registry_client(self) -> Any:
        from confluent_kafka.schema_registry import SchemaRegistryClient

        return SchemaRegistryClient(dict(self.registry))

    def codec(self) -> Any:
        from opsflow.contracts.wire import WireCodec

        return WireCodec(self.registry_client())

    def action_log(self) -> ActionLog:
        """Where the console records operator actions: the events, then their rows."""
        return ActionLog(self.kafka, self.registry_client(), self.database_url, prefix=self.prefix)


def create_app(
    settings: ConsoleSettings,
    *,
    pool: ConnectionPool[Any],
    producer: Producer,
    cluster: Cluster | None = None,
) -> FastAPI:
    """The console over an open pool (and the producer its readiness check asks)."""
    app = FastAPI(title="opsflow console", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(SecurityHeaders)
    app.state.pool = pool
    add_health_routes(app, pool=pool, producer=producer)
    limits = SessionLimits(
        idle=timedelta(seconds=settings.session_idle_s),
        absolute=timedelta(seconds=settings.session_max_s),
    )
    app.include_router(console_router(cluster or Cluster.from_environment(), limits))
    install_problem_handlers(app)
    return app


def console_router(cluster: Cluster, limits: SessionLimits) -> APIRouter:
    """The console's pages under ``/console`` (see the package docstring)."""
    pages = Pages(
        prefix=PREFIX,
        scope="console",
        title="Operator console",
        templates=_TEMPLATES,
        limits=limits,
        roles=(Role.OPERATOR,),
        refusal_page="message.html",
    )
    router = APIRouter(prefix=PREFIX, include_in_schema=False)
    pages.add_routes(router)
    # One writer of operator actions for the console's life (its producer is reused).
    action_log = cluster.action_log()

    def actor(session: Session) -> Actor:
        return Actor.console_user(session.user, cluster.kafka)

    async def call(work: Callable[..., T], *args: Any) -> T:
        """Run a blocking command (broker, database) off the event loop."""
        return await run_in_threadpool(work, *args)

    def message(request: Request, session: Session, status: int, text: str) -> Response:
        return pages.signed_in_page(request, session, "message.html", status=status, error=text)

    async def operator(request: Request) -> Session | Response:
        """The signed-in operator, or the page to answer with instead (sign-in, 403)."""
        try:
            return await pages.signed_in(request)
        except ProblemError as err:
            if err.problem.status == 401:
                if not request.cookies.get(pages.cookie):
                    return RedirectResponse(f"{PREFIX}/sign-in", status_code=303)
                return pages.sign_in_page(request, 401, err.problem.detail)
            return pages.render(
                request, "message.html", status=err.problem.status, error=err.problem.detail
            )

    def refusal(request: Request, session: Session, err: Exception) -> Response:
        """A command's failure as a page: a wrong id 404, an unreachable dependency 503."""
        if isinstance(err, UnknownDeadLetterError):
            return message(request, session, 404, str(err))
        if isinstance(err, ConfigurationError) or (isinstance(err, OpsflowError) and err.retryable):
            return message(request, session, 503, str(err))
        return message(request, session, 422, str(err))

    @router.get("")
    async def overview_page(request: Request) -> Response:
        session = await operator(request)
        if isinstance(session, Response):
            return session
        from opsflow.overview import overview

        plan = stack.running_plan()
        components = await call(stack.status, plan) if plan is not None else None
        found = await call(overview, cluster.kafka, cluster.database_url, cluster.plan)
        return pages.signed_in_page(
            request, session, "overview.html", components=components, found=found
        )

    @router.get("/dead-letters")
    async def dead_letters(
        request: Request,
        topic: Annotated[str, Query(max_length=200)] = "",
        error_class: Annotated[str, Query(max_length=200)] = "",
        service: Annotated[str, Query(max_length=200)] = "",
        key: Annotated[str, Query(max_length=200)] = "",
        include_redriven: str = "",
    ) -> Response:
        session = await operator(request)
        if isinstance(session, Response):
            return session
        from opsflow.dlq import summary

        queues = cluster.queues()
        filters = Filters(topic or None, error_class or None, service or None, key or None)
        if filters.topic is not None and filters.topic not in queues.topics:
            return message(request, session, 422, f"there is no topic {topic!r}")
        try:
            entries = await call(queues.entries, [filters.topic] if filters.topic else None)
        except OpsflowError as err:
            return refusal(request, session, err)
        found = cases(e for e in entries if filters.matches(e))
        shown = [case for case in found if include_redriven or case.pending]
        return pages.signed_in_page(
            request,
            session,
            "dead_letters.html",
            groups=summary(found),
            cases=shown[:200],
            more=max(0, len(shown) - 200),
            filters=filters,
            include_redriven=bool(include_redriven),
            topics=queues.topics,
        )

    @router.get("/dead-letters/{topic}/{partition}/{offset}")
    async def dead_letter(request: Request, topic: str, partition: int, offset: int) -> Response:
        session = await operator(request)
        if isinstance(session, Response):
            return session
        dead_letter_id = f"{topic}/{partition}/{offset}"
        queues = cluster.queues()
        try:
            entry = await call(queues.entry, dead_letter_id)
            value, problem = await call(decoded_value, entry.letter.value, cluster.codec())
        except OpsflowError as err:
            return refusal(request, session, err)
        actions = await call(recent_actions, request, entry.id)
        return pages.signed_in_page(
            request,
            session,
            "dead_letter.html",
            entry=entry,
            value=value,
            value_error=problem,
            actions=actions,
        )

    @router.get("/dead-letters/{topic}/{partition}/{offset}/redrive")
    async def confirm_redrive(
        request: Request, topic: str, partition: int, offset: int
    ) -> Response:
        session = await operator(request)
        if isinstance(session, Response):
            return session
        dead_letter_id = f"{topic}/{partition}/{offset}"
        queues = cluster.queues()
        try:
            chosen = await call(queues.by_ids, [dead_letter_id])
            plan = queues.redrive(chosen, dry_run=True)
        except OpsflowError as err:
            return refusal(request, session, err)
        return pages.signed_in_page(
            request,
            session,
            "confirm_redrive.html",
            dead_letter_id=dead_letter_id,
            plan=plan,
            entry=next(e for e in chosen if e.id == dead_letter_id),
        )

    @router.post("/dead-letters/{topic}/{partition}/{offset}/redrive")
    async def redrive(request: Request, topic: str, partition: int, offset: int) -> Response:
        try:
            session, _form = await pages.posted(request)
        except ProblemError as err:
            if err.problem.status == 401:
                return pages.sign_in_page(request, 401, err.problem.detail)
            return pages.render(
                request, "message.html", status=err.problem.status, error=err.problem.detail
            )
        dead_letter_id = f"{topic}/{partition}/{offset}"
        queues = cluster.queues()
        try:
            chosen = await call(queues.by_ids, [dead_letter_id])
        except OpsflowError as err:
            return refusal(request, session, err)

        def redriven() -> tuple[str, dict[str, Any]]:
            result = queues.redrive(chosen)
            return result.outcome(), result.as_json()

        def audited() -> str:
            """Record the intent, redrive, record the outcome (see opsflow.operator_actions)."""
            return action_log.run(actor(session), REDRIVE, dead_letter_id, redriven)

        try:
            action_id = await call(audited)
        except OpsflowError as err:  # the intent could not be recorded: nothing was done
            return refusal(request, session, err)
        # Post/redirect/get: a reload shows the outcome, it does not redrive again.
        return RedirectResponse(f"{PREFIX}/actions/{action_id}", status_code=303)

    def recent_actions(
        request: Request, target: str | None
    ) -> list[operator_actions.OperatorAction]:
        with pages.pool(request).connection() as conn:
            return operator_actions.recent(conn, target=target)

    def one_action(request: Request, action_id: str) -> operator_actions.OperatorAction | None:
        with pages.pool(request).connection() as conn:
            return operator_actions.get(conn, action_id)

    @router.get("/actions")
    async def actions(request: Request) -> Response:
        session = await operator(request)
        if isinstance(session, Response):
            return session
        found = await call(recent_actions, request, None)
        return pages.signed_in_page(request, session, "actions.html", actions=found)

    @router.get("/actions/{action_id}")
    async def action(request: Request, action_id: str) -> Response:
        session = await operator(request)
        if isinstance(session, Response):
            return session
        found = await call(one_action, request, action_id)
        if found is None:
            return message(request, session, 404, f"no operator action {action_id!r}")
        key = None
        if found.action == REDRIVE and found.detail:
            redriven = found.detail.get("redriven") or []
            key = redriven[0]["key"] if redriven else None
        if key is None and found.action == REDRIVE:
            # Nothing written this time: the dead letter still names its instance.
            try:
                key = (await call(cluster.queues().entry, found.target)).key
            except OpsflowError:
                key = None
        return pages.signed_in_page(request, session, "action.html", action=found, key=key)

    rebuilds = Rebuilds()

    def projection_named(name: str) -> Projection | None:
        from opsflow.readmodels import projections

        return projections().get(name)

    @router.get("/projections")
    async def projections_page(request: Request) -> Response:
        session = await operator(request)
        if isinstance(session, Response):
            return session
        from opsflow.projections.status import statuses
        from opsflow.readmodels import projections

        def read() -> list[ProjectionStatus]:
            with pages.pool(request).connection() as conn, requires_table("projection_positions"):
                return statuses(conn, projections().values(), cluster.kafka)

        try:
            found = await call(read)
        except OpsflowError as err:
            return refusal(request, session, err)
        return pages.signed_in_page(
            request, session, "projections.html", projections=found, runs=rebuilds.latest()
        )

    @router.get("/projections/{name}/rebuild")
    async def confirm_rebuild(request: Request, name: str) -> Response:
        session = await operator(request)
        if isinstance(session, Response):
            return session
        projection = projection_named(name)
        if projection is None:
            return message(request, session, 404, f"there is no projection {name!r}")
        return pages.signed_in_page(
            request,
            session,
            "confirm_rebuild.html",
            projection=projection,
            topics=[topic_name(t, prefix=cluster.prefix) for t in projection.topics],
            running=rebuilds.running(name),
        )

    @router.post("/projections/{name}/rebuild")
    async def rebuild_projection(request: Request, name: str) -> Response:
        try:
            session, _form = await pages.posted(request)
        except ProblemError as err:
            if err.problem.status == 401:
                return pages.sign_in_page(request, 401, err.problem.detail)
            return pages.render(
                request, "message.html", status=err.problem.status, error=err.problem.detail
            )
        projection = projection_named(name)
        if projection is None:
            return message(request, session, 404, f"there is no projection {name!r}")

        def finished(
            run: RebuildRun, result: RebuildResult | None, error: Exception | None
        ) -> None:
            detail = result.detail() if result is not None else {"error": str(error)}
            action_log.finish(run.action, run.outcome or "", detail)

        def started() -> None:
            """Record the action, then start the rebuild (or find one running)."""
            from confluent_kafka.schema_registry import SchemaRegistryClient

            from opsflow.projections.rebuild import rebuild

            registry = SchemaRegistryClient(dict(cluster.registry))
            begun = action_log.begin(actor(session), REBUILD, name)
            run = RebuildRun(name, begun, session.user.display_name)
            chosen = rebuilds.start(
                run,
                lambda progress: rebuild(
                    projection,
                    kafka=cluster.kafka,
                    registry=registry,
                    database_url=cluster.database_url,
                    progress=progress,
                ),
                finished,
            )
            if chosen is not run:
                outcome = (
                    f"not started: a rebuild of {name} started by {chosen.actor} at "
                    f"{chosen.started_at:%Y-%m-%d %H:%M:%S} UTC is running"
                )
                action_log.finish(begun, outcome, {"running": chosen.action.action_id})

        try:
            await call(started)
        except OpsflowError as err:  # the intent could not be recorded: nothing started
            return refusal(request, session, err)
        # Post/redirect/get: the page shows the progress; a reload starts nothing.
        return RedirectResponse(f"{PREFIX}/projections", status_code=303)

    replay_fields: tuple[str, ...] = ("topic", "into", "partitions", "from_offset")
    replay_fields += ("to_offset", "from_time", "to_time", "keys")

    def replay_job(form: Mapping[str, str]) -> tuple[Any, Any]:
        """The replay a form chooses (``opsflow.replay``, as ``opsflow replay`` runs it).

        Raises:
            BadInputError: a field names no topic, no target, or a malformed bound.
        """
        from opsflow.replay import Replay, selection_of, target_of

        known = replay_targets()
        if form["into"] not in known:
            raise BadInputError(f"into: there is no service or read model {form['into']!r}")
        selection = selection_of(**{k: form[k] for k in replay_fields if k != "into"})
        target = target_of(form["into"])
        job = Replay(
            target,
            selection,
            kafka=cluster.kafka,
            registry=cluster.registry_client(),
            database_url=cluster.database_url or None,
        )
        return job, selection

    def replay_targets() -> dict[str, str]:
        """Every service and read model a replay can go into, with what it is."""
        from opsflow.application import load_application
        from opsflow.readmodels import projections

        services = {name: "service" for name in load_application().services}
        return {**services, **{name: "read model" for name in projections()}}

    @router.get("/replay")
    async def replay_page(
        request: Request,
        topic: Annotated[str, Query(max_length=200)] = "",
        into: Annotated[str, Query(max_length=200)] = "",
        partitions: Annotated[str, Query(max_length=200)] = "",
        from_offset: Annotated[str, Query(max_length=30)] = "",
        to_offset: Annotated[str, Query(max_length=30)] = "",
        from_time: Annotated[str, Query(max_length=60)] = "",
        to_time: Annotated[str, Query(max_length=60)] = "",
        keys: Annotated[str, Query(max_length=2000)] = "",
    ) -> Response:
        """The replay form and, once a topic is chosen, its dry run: what would be re-driven."""
        session = await operator(request)
        if isinstance(session, Response):
            return session
        from opsflow.application import load_application

        application = load_application()
        form = {"topic": topic, "into": into, "partitions": partitions, "keys": keys}
        form |= {"from_offset": from_offset, "to_offset": to_offset}
        form |= {"from_time": from_time, "to_time": to_time}
        targets = replay_targets()
        shown: dict[str, Any] = {
            "form": form,
            "fields": replay_fields,
            "topics": [t.value for t in application.topics],
            "targets": list(targets.items()),
            "instance": application.instance,
            "report": None,
        }
        if not topic:
            return pages.signed_in_page(request, session, "replay.html", **shown)
        try:
            job, _ = await call(replay_job, form)
            report = await call(lambda: job.run(dry_run=True))
        except OpsflowError as err:
            status = 503 if err.retryable or isinstance(err, ConfigurationError) else 422
            return pages.signed_in_page(
                request, session, "replay.html", status=status, error=str(err), **shown
            )
        produces = getattr(job.target, "produces", ())
        return pages.signed_in_page(
            request,
            session,
            "replay.html",
            **{
                **shown,
                "report": report,
                "kind": "service" if targets[into] == "service" else "projection",
                "read": sum(report.events.values()),
                "shown_instances": sorted(report.instances)[:20],
                "produces": ", ".join(topic_name(t, prefix=cluster.prefix) for t in produces),
            },
        )

    @router.post("/replay")
    async def replay(request: Request) -> Response:
        """The confirmed replay: its intent recorded, the replay run, its outcome recorded."""
        try:
            session, posted = await pages.posted(request)
        except ProblemError as err:
            if err.problem.status == 401:
                return pages.sign_in_page(request, 401, err.problem.detail)
            return pages.render(
                request, "message.html", status=err.problem.status, error=err.problem.detail
            )
        form = {name: str(posted.get(name) or "")[:2000] for name in replay_fields}
        try:
            job, selection = await call(replay_job, form)
        except OpsflowError as err:
            return refusal(request, session, err)

        def replayed() -> tuple[str, dict[str, Any]]:
            report = job.run(dry_run=False)
            outcome = (
                f"replayed: {sum(report.events.values()):,} events of "
                f"{len(report.instances):,} instance(s) into {report.target}, "
                f"{report.outputs:,} written (replay id {report.replay_id})"
            )
            return outcome, report.as_json()

        def audited() -> str:
            return action_log.run(
                actor(session),
                REPLAY,
                f"{form['topic']} into {form['into']}",
                replayed,
                {"selection": selection.as_json(), "into": form["into"]},
            )

        try:
            action_id = await call(audited)
        except OpsflowError as err:  # the intent could not be recorded: nothing was done
            return refusal(request, session, err)
        # Post/redirect/get: a reload shows the outcome, it does not replay again.
        return RedirectResponse(f"{PREFIX}/actions/{action_id}", status_code=303)

    @router.get("/trace")
    async def trace_page(
        request: Request, key: Annotated[str, Query(max_length=200)] = ""
    ) -> Response:
        session = await operator(request)
        if isinstance(session, Response):
            return session
        from opsflow import trace
        from opsflow.application import load_application

        instance = load_application().instance
        if not key.strip():
            return pages.signed_in_page(
                request, session, "trace.html", key="", found=None, instance=instance
            )
        notes: list[str] = []
        try:
            found = await call(
                lambda: trace.read(
                    cluster.kafka,
                    cluster.codec,
                    key.strip(),
                    prefix=cluster.prefix,
                    database_url=cluster.database_url or None,
                    now=datetime.now(UTC),
                    on_full_scan=notes.append,
                )
            )
        except OpsflowError as err:
            status = 503 if err.retryable or isinstance(err, ConfigurationError) else 404
            return pages.signed_in_page(
                request,
                session,
                "trace.html",
                status=status,
                error=str(err),
                key=key,
                found=None,
                instance=instance,
            )
        return pages.signed_in_page(
            request,
            session,
            "trace.html",
            key=key,
            found=found,
            instance=instance,
            notes=notes,
            who=trace.who,
            actor_of=trace.actor_of,
            elapsed=trace.elapsed,
            stamp=trace.stamp,
        )

    return router
