"""``opsflow``: the one command for people running opsflow.

Every failure a user can cause (a bad variable, a port in use, a component that
does not start) ends in one or two lines saying what went wrong and what to do,
and a non-zero exit; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import json
import shlex
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar, overload

import click
import typer
from rich.console import Console
from rich.table import Table

from opsflow import stack
from opsflow.contracts.topics import Topic
from opsflow.errors import ConfigurationError, OpsflowError

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
# Tables are for people: when output is piped, keep them readable rather than 80 columns.
console = Console(width=None if sys.stdout.isatty() else 160)
errors = Console(stderr=True)
_debug = False
T = TypeVar("T")


# Commands that manage the local stack themselves, or need nothing of it.
_OWN_STACK_COMMANDS = {"up", "down", "env", "status", "contracts"}


@app.callback()
def _options(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
) -> None:
    """Commands that talk to Kafka, PostgreSQL or the registry use the variables that are
    set and, for the others, the stack running from the data directory (``opsflow up``)."""
    global _debug
    _debug = debug
    if ctx.invoked_subcommand in _OWN_STACK_COMMANDS or ctx.resilient_parsing:
        return
    import os

    found = stack.use_running_stack(os.environ)
    if found is not None and found[1]:
        plan, filled = found
        errors.print(
            f"[dim]Using the stack running from {plan.data_dir} for {', '.join(filled)} "
            "(variables that are set win).[/]",
            highlight=False,
            soft_wrap=True,
        )


def _uptime(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if seconds else "-"


def _components_table(plan: stack.StackPlan, rows: list[stack.ComponentStatus]) -> Table:
    table = Table(title=f"opsflow stack ({plan.data_dir})")
    for column in ("component", "address", "state", "pid", "uptime", "restarts", "health"):
        table.add_column(column)
    for row in rows:
        health = (
            f"[green]healthy[/] {row.detail}" if row.healthy else f"[red]unhealthy[/] {row.detail}"
        )
        table.add_row(
            row.name,
            row.address,
            row.state,
            str(row.pid or "-"),
            _uptime(row.uptime_s),
            str(row.restarts),
            health,
        )
    return table


def _print_status(plan: stack.StackPlan) -> bool:
    rows = stack.status(plan)
    console.print(_components_table(plan, rows))
    return all(row.healthy for row in rows)


@app.command()
def up(
    detach: Annotated[bool, typer.Option("--detach", "-d", help="Run in the background.")] = False,
) -> None:
    """Start the local stack: broker, PostgreSQL and schema registry, unless configured away.

    In the foreground Ctrl-C stops everything; with --detach, `opsflow down` does.
    A second `up` finds the running stack instead of starting another.
    """
    already = stack.running_plan()
    plan, proc = stack.up(foreground=not detach)
    if already is not None:
        console.print("[yellow]The stack is already running.[/]")
    _print_status(plan)
    if proc is not None:
        console.print("Press Ctrl-C to stop.")
        code = stack.wait_foreground(plan, proc)
        console.print("Stopped." if code == 0 else f"supervisord exited with {code}.")
        raise typer.Exit(code)


@app.command()
def down() -> None:
    """Stop the local stack and everything it started."""
    plan = stack.down()
    console.print("Stopped." if plan else "No stack was started from this data directory.")


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    watch: Annotated[
        bool, typer.Option("--watch", "-w", help="Refresh every --interval seconds until Ctrl-C.")
    ] = False,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes.")] = 2.0,
) -> None:
    """One screen for the on-call operator: the stack's components (state, pid, uptime,
    restarts, health), each service's consumer lag per topic and processed/s, each
    projection's position and lag, dead letters per topic, and the application's gauges
    (work waiting for people, tasks past their SLA).

    Without a local stack (`opsflow up`), the environment's KAFKA_BOOTSTRAP_SERVERS,
    SCHEMA_REGISTRY_URL and DATABASE_URL say where to look. Exits 1 when a component
    is unhealthy.
    """
    from rich.console import Group
    from rich.live import Live

    from opsflow.overview import Overview, overview
    from opsflow.settings import DatabaseSettings, KafkaSettings

    plan = stack.StackPlan.load(stack.data_dir())
    env = dict(plan.env) if plan is not None else {}
    kafka_settings = KafkaSettings(**({"bootstrap_servers": env["KAFKA_BOOTSTRAP_SERVERS"]}
                                      if "KAFKA_BOOTSTRAP_SERVERS" in env else {}))  # fmt: skip
    if plan is None and not kafka_settings.bootstrap_servers:
        raise OpsflowError(
            "no stack has been started from this data directory and KAFKA_BOOTSTRAP_SERVERS "
            "is not set; run `opsflow up`, or set the variables of the cluster to look at"
        )
    kafka = {"socket.timeout.ms": 5000, "log_level": 0, **kafka_settings.client_config()}
    if plan is None:
        _reachable(kafka)  # no components to show: a broker that does not answer is the news
    database_url = env.get("DATABASE_URL") or DatabaseSettings().database_url

    def screen() -> tuple[Any, bool, dict[str, Any]]:
        # The overview is asked for while the components are probed (the screen takes
        # the slower of the two, not their sum) and dropped, unwaited for, when the
        # broker turns out not to answer.
        asked = _in_background(overview, kafka, database_url, plan)
        rows = stack.status(plan) if plan is not None else []
        broker = [row for row in rows if row.name in ("broker", "kafka")]
        if all(row.healthy for row in broker):
            found = asked.result()
        else:  # starting, or down: the components table says which, the rest can wait
            found = Overview(unavailable=[f"services and read models: {broker[0].detail}"])
        healthy = all(row.healthy for row in rows)
        data = {
            "data_dir": str(plan.data_dir) if plan else None,
            "env": plan.env if plan else {},
            "components": [asdict(row) for row in rows],
            **found.as_json(),
        }
        parts: list[Any] = [_components_table(plan, rows)] if plan is not None else []
        parts += _overview_tables(found)
        return Group(*parts), healthy, data

    if as_json:
        _, healthy, data = screen()
        print(json.dumps(data, default=str))
        raise typer.Exit(0 if healthy else 1)
    if not watch:
        shown, healthy, _ = screen()
        console.print(shown)
        raise typer.Exit(0 if healthy else 1)
    with Live(console=console, auto_refresh=False) as live:
        try:
            while True:
                shown, healthy, _ = screen()
                live.update(shown, refresh=True)
                time.sleep(interval)
        except KeyboardInterrupt:
            pass


def _in_background(call: Callable[..., T], *args: Any) -> Future[T]:
    """``call(*args)`` in a daemon thread: a caller that stops waiting for it does not
    keep the process alive until it ends (an executor's threads are joined at exit)."""
    result: Future[T] = Future()

    def run() -> None:
        try:
            result.set_result(call(*args))
        except BaseException as err:
            result.set_exception(err)

    threading.Thread(target=run, daemon=True).start()
    return result


def _overview_tables(found: Any) -> list[Any]:
    services = Table(title="Services: consumer lag and throughput")
    for column in ("service", "lag per input topic", "processed/s"):
        services.add_column(column)
    for row in found.services:
        lag = ", ".join(
            f"{topic}: [yellow]{n}[/]" if n else f"{topic}: 0" for topic, n in row.lag.items()
        )
        rate = f"{row.processed_per_s:,.1f}" if row.processed_per_s is not None else "-"
        services.add_row(row.name, lag, rate)
    projections = Table(title="Read models")
    for column in ("projection", "position", "lag", "lag (s)", "last error"):
        projections.add_column(column)
    for p in found.projections:
        error = f"[red]{p.last_error[:60]}[/]" if p.last_error else "-"
        projections.add_row(p.name, str(p.position), str(p.lag), f"{p.lag_s:.1f}", error)
    work = Table(title="Dead letters and what the application watches")
    for column in ("what", "count"):
        work.add_column(column)
    for topic, count in found.dead_letters.items():
        work.add_row(f"dead letters on {topic}.dlq (pending)", f"[red]{count}[/]" if count else "0")

    def shown(n: int | None) -> str:
        return "-" if n is None else str(n)

    for label, count in found.gauges.items():
        work.add_row(label, shown(count))
    notes = [f"[yellow]unavailable:[/] {line}" for line in found.unavailable]
    return [services, projections, work, *notes]


@app.command()
def env() -> None:
    """Print `export` lines that point a shell at the running stack.

    They hold no secret: DATABASE_URL names the stack's password file
    (`?passfile=`, in the data directory, readable by you only) instead of the
    password, and psql and every libpq client take it as it is.
    """
    plan = stack.running_plan()
    if plan is None:
        raise OpsflowError("the stack is not running; start it with `opsflow up --detach`")
    for key, value in sorted(plan.env.items()):
        print(f"export {key}={shlex.quote(value)}")


@app.command("run")
def run_service(
    target: Annotated[str, typer.Argument(help="MODULE[:ATTRIBUTE] of a Service.")],
) -> None:
    """Run one service in the foreground until Ctrl-C or SIGTERM (e.g. `myapp.service`)."""
    from opsflow.runtime import load_service, run

    run(load_service(target))


keys_app = typer.Typer(
    no_args_is_help=True,
    help="API keys of producers for the ingest service (in DATABASE_URL's database).",
)
app.add_typer(keys_app, name="keys")


def _keys_database_url() -> str:
    """DATABASE_URL, where the keys are kept."""
    from opsflow.settings import DatabaseSettings

    url = DatabaseSettings().database_url
    if not url:
        raise ConfigurationError(
            "DATABASE_URL",
            "is not set, so there is no database to keep keys in",
            "Set it, or point the shell at the running stack with `eval $(opsflow env)`",
        )
    return url


@keys_app.command("create")
def keys_create(
    producer: Annotated[
        str, typer.Option("--producer", help="Producer name written into its events.")
    ],
    events: Annotated[
        list[str] | None,
        typer.Option(
            "--events",
            help="An event type the key may send (repeat, or separate with commas). "
            "Default: every type the application declares the producer may emit.",
        ),
    ] = None,
) -> None:
    """Create a key for PRODUCER and print it; it is shown this once and cannot be recovered.

    A key may send only what its producer is declared for (each event type's
    `emitted_by`); a service's name cannot have a key.
    """
    from opsflow import apikeys, db
    from opsflow.application import load_application

    models = {model.event_type: model for model in load_application().events}
    wanted = None if events is None else [e for item in events for e in item.split(",") if e]
    scope = apikeys.check_scope(producer, wanted, models)
    with db.connect(_keys_database_url()) as conn:
        created = apikeys.create_key(conn, producer, scope)
    allowed = scope or [t for t, m in models.items() if created.key.may_send(m)]
    errors.print(
        f"Created key {created.key.key_id} for producer {created.key.producer}, which may"
        f" send {', '.join(allowed)}. "
        "It is shown only now: store it where the producer reads it.",
        highlight=False,
        soft_wrap=True,
    )
    print(created.secret)


@keys_app.command("list")
def keys_list(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show every key (never the key itself): id, producer, created, revoked."""
    from opsflow import apikeys, db

    with db.connect(_keys_database_url()) as conn:
        keys = apikeys.list_keys(conn)
    if as_json:
        rows = [
            {
                "key_id": key.key_id,
                "producer": key.producer,
                "created_at": key.created_at.isoformat(),
                "revoked_at": key.revoked_at.isoformat() if key.revoked_at else None,
                "events": key.events,
            }
            for key in keys
        ]
        print(json.dumps(rows))
        return
    table = Table(title="API keys")
    for column in ("key id", "producer", "may send", "created", "revoked"):
        table.add_column(column)
    for key in keys:
        revoked = f"[red]{key.revoked_at:%Y-%m-%d %H:%M:%S}[/]" if key.revoked_at else "-"
        scope = ", ".join(key.events) if key.events is not None else "all declared"
        created = f"{key.created_at:%Y-%m-%d %H:%M:%S}"
        table.add_row(key.key_id, key.producer, scope, created, revoked)
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="The key id shown by `opsflow keys list`.")],
) -> None:
    """Revoke a key: requests with it are refused from now on."""
    from opsflow import apikeys, db

    with db.connect(_keys_database_url()) as conn:
        key = apikeys.revoke_key(conn, key_id)
    assert key.revoked_at is not None
    console.print(
        f"Revoked key {key.key_id} of producer {key.producer} "
        f"(revoked at {key.revoked_at:%Y-%m-%d %H:%M:%S %Z}).",
        highlight=False,
    )


users_app = typer.Typer(
    no_args_is_help=True,
    help="People who act in opsflow (reviewers, supervisors, operators), in DATABASE_URL's "
    "database.",
)
app.add_typer(users_app, name="users")


@users_app.command("create")
def users_create(
    name: Annotated[str, typer.Argument(help="A unique handle, e.g. alice.")],
    role: Annotated[
        str, typer.Option("--role", help="reviewer, supervisor or operator.", show_default=False)
    ],
    display_name: Annotated[
        str | None,
        typer.Option("--display-name", help="How events and screens name them (default: NAME)."),
    ] = None,
) -> None:
    """Create a user with ROLE and print their bearer token; it is shown this once."""
    from opsflow import db, users

    try:
        chosen = users.Role(role.lower())
    except ValueError:
        raise ConfigurationError(
            "--role", f"{role!r} is not a role", "Use reviewer, supervisor or operator"
        ) from None
    with db.connect(_keys_database_url()) as conn:
        created = users.create_user(conn, name, chosen, display_name=display_name)
    errors.print(
        f"Created {created.user.role} {created.user.name} ({created.user.user_id}). "
        "The token is shown only now: hand it to them over a safe channel.",
        highlight=False,
        soft_wrap=True,
    )
    print(created.token)


@users_app.command("list")
def users_list(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show every user (never a token): id, name, display name, role, created, revoked."""
    from opsflow import db, users

    with db.connect(_keys_database_url()) as conn:
        found = users.list_users(conn)
    if as_json:
        rows = [
            {
                "user_id": user.user_id,
                "name": user.name,
                "display_name": user.display_name,
                "role": user.role.value,
                "created_at": user.created_at.isoformat(),
                "revoked_at": user.revoked_at.isoformat() if user.revoked_at else None,
            }
            for user in found
        ]
        print(json.dumps(rows))
        return
    table = Table(title="Users")
    for column in ("user id", "name", "display name", "role", "created", "revoked"):
        table.add_column(column)
    for user in found:
        revoked = f"[red]{user.revoked_at:%Y-%m-%d %H:%M:%S}[/]" if user.revoked_at else "-"
        table.add_row(
            user.user_id,
            user.name,
            user.display_name,
            user.role.value,
            f"{user.created_at:%Y-%m-%d %H:%M:%S}",
            revoked,
        )
    console.print(table)


@users_app.command("revoke")
def users_revoke(
    name: Annotated[str, typer.Argument(help="The user's name or user id (`opsflow users list`).")],
) -> None:
    """Revoke a user's token: their requests are refused from now on."""
    from opsflow import db, users

    with db.connect(_keys_database_url()) as conn:
        user = users.revoke_user(conn, name)
    assert user.revoked_at is not None
    console.print(
        f"Revoked {user.role} {user.name} ({user.user_id}) "
        f"at {user.revoked_at:%Y-%m-%d %H:%M:%S %Z}.",
        highlight=False,
    )


def _cluster(
    *, database_optional: bool = False, registry_needed: bool = True
) -> tuple[dict[str, object], object, str]:
    """The Kafka settings, a registry client and the database URL, from the environment.

    A command that decodes no record passes ``registry_needed=False`` and gets no client
    (None): loading one is a fifth of a read-only command's CPU (measured).
    """
    from opsflow.settings import DatabaseSettings, KafkaSettings, RegistrySettings

    kafka, registry = KafkaSettings(), RegistrySettings()
    database_url = DatabaseSettings().database_url
    for variable, value in (
        ("KAFKA_BOOTSTRAP_SERVERS", kafka.bootstrap_servers),
        ("SCHEMA_REGISTRY_URL", registry.schema_registry_url or not registry_needed),
        ("DATABASE_URL", database_url or database_optional),
    ):
        if not value:
            raise ConfigurationError(
                variable,
                f"is not set, and no stack is running from {stack.data_dir()}",
                "Start one there with `opsflow up --detach`, run the command from the "
                "directory the stack was started in (or set OPSFLOW_DATA_DIR to its data "
                "directory), or set the variable to the cluster to use",
            )
    config: dict[str, object] = {"log_level": 0, **kafka.client_config()}
    _reachable(config)
    if not registry_needed:
        return config, None, database_url or ""
    from confluent_kafka.schema_registry import SchemaRegistryClient

    return config, SchemaRegistryClient(registry.client_config()), database_url or ""


def _reachable(kafka: dict[str, Any]) -> None:
    """Fail in one line, naming the address, when the Kafka cluster does not answer."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    from opsflow.topics import unreachable

    servers = str(kafka.get("bootstrap.servers", ""))
    fix = (
        "Start it, or point KAFKA_BOOTSTRAP_SERVERS at the cluster "
        "(`eval $(opsflow env)` for the local stack)"
    )
    refused = unreachable(servers)
    if refused is not None:
        raise ConfigurationError(
            "KAFKA_BOOTSTRAP_SERVERS", f"no Kafka broker answers at {servers} ({refused})", fix
        )
    try:
        AdminClient(dict(kafka)).list_topics(timeout=5)
    except KafkaException as err:
        raise ConfigurationError(
            "KAFKA_BOOTSTRAP_SERVERS",
            f"no Kafka broker answers at {servers} ({err.args[0].str() if err.args else err})",
            fix,
        ) from err


def _action_log(kafka: dict[str, Any], registry: Any, database_url: str) -> tuple[Any, Any]:
    """Where this command records the operator action it takes, and who takes it:
    ``OPSFLOW_ACTOR`` (else the OS user) with the Kafka principal configured
    (``opsflow.operator_actions``)."""
    from opsflow.operator_actions import ActionLog, Actor
    from opsflow.settings import TopicSettings

    log = ActionLog(kafka, registry, database_url or None, prefix=TopicSettings().prefix)
    return log, Actor.command_line(kafka)


def _projection(name: str) -> Any:
    import difflib

    from opsflow.readmodels import projections

    known = projections()
    if name not in known:
        near = difflib.get_close_matches(name, list(known), n=1)
        raise click.BadParameter(
            f"no projection {name!r}"
            + (f"; did you mean {near[0]!r}?" if near else "")
            + f" (projections: {', '.join(known)})",
            param_hint="NAME",
        )
    return known[name]


projections_app = typer.Typer(
    no_args_is_help=True, help="The read models in PostgreSQL: where they stand, rebuilding them."
)
app.add_typer(projections_app, name="projections")


@projections_app.command("list")
def projections_list(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Every projection: position, lag in events and in seconds, last error."""
    from opsflow import db
    from opsflow.projections.status import statuses
    from opsflow.readmodels import projections

    kafka, _, url = _cluster(registry_needed=False)
    with db.connect(url) as conn, db.requires_table("projection_positions"):
        found = statuses(conn, projections().values(), kafka)
    if as_json:
        print(json.dumps([s.as_json() for s in found]))
        return
    table = Table(title="Projections")
    for column in ("projection", "position", "lag", "lag (s)", "last event", "last error"):
        table.add_column(column)
    for s in found:
        error = (
            f"[red]{s.last_error_at:%Y-%m-%d %H:%M:%S}: {s.last_error[:80]}[/]"
            if s.last_error
            else "-"
        )
        table.add_row(
            s.name,
            str(s.position),
            f"[yellow]{s.lag}[/]" if s.lag else "0",
            f"{s.lag_s:.1f}",
            f"{s.last_event_at:%Y-%m-%d %H:%M:%S}" if s.last_event_at else "-",
            error,
        )
    console.print(table)


@projections_app.command("rebuild")
def projections_rebuild(
    name: Annotated[str, typer.Argument(help="The projection (see `opsflow projections list`).")],
    verify: Annotated[
        bool, typer.Option("--verify", help="Prove the rebuilt model equals the live one.")
    ] = False,
) -> None:
    """Replay the topics into shadow tables, catch up, and swap them in atomically.

    Readers keep the old tables until the swap. With --verify, both sides are
    brought to the same offsets and compared by an order-independent checksum
    of all rows; the exit status is 1 when they differ (the rebuilt model is
    swapped in all the same: it is the one the log says is right).
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from opsflow.operator_actions import REBUILD
    from opsflow.projections.rebuild import rebuild

    projection = _projection(name)
    kafka, registry, url = _cluster()
    log, actor = _action_log(kafka, registry, url)
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]} events/s"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=errors, transient=False) as bar:
        task = bar.add_task(f"rebuilding {name}", total=None, rate="-")

        def progress(done: int, total: int) -> None:
            speed = bar.tasks[0].speed
            bar.update(task, completed=done, total=total, rate=f"{speed:,.0f}" if speed else "-")

        with log.recorded(actor, REBUILD, name) as recorded:
            result = rebuild(
                projection,
                kafka=kafka,
                registry=registry,  # type: ignore[arg-type]
                database_url=url,
                verify=verify,
                progress=progress,
            )
            recorded.text, recorded.detail = result.outcome(), result.detail()
    log.close()
    console.print(
        f"Rebuilt {name}: {result.records:,} records in {result.seconds:.1f} s "
        f"({result.records_per_s:,.0f} events/s); swapped in at offsets "
        f"{sum(result.positions.values()):,}.",
        highlight=False,
    )
    if result.verified is None:
        return
    for table_name, live in result.live.items():
        rebuilt = result.rebuilt[table_name]
        mark = "[green]equal[/]" if live == rebuilt else "[red]DIFFERENT[/]"
        console.print(
            f"  {table_name}: live {live.rows:,} rows / {live.digest}, rebuilt {rebuilt.rows:,}"
            f" rows / {rebuilt.digest}: {mark}",
            highlight=False,
        )
    if result.verified:
        console.print("[green]verified:[/] the rebuilt model equals the incrementally kept one.")
    else:
        console.print(
            "[red]not equal:[/] the live model had drifted from the log; the rebuilt one "
            "is now in place."
        )
        sys.exit(1)


@app.command("replay")
def replay_command(
    topic: Annotated[str, typer.Argument(help="The topic to read again (its contract name).")],
    into: Annotated[
        str, typer.Option("--into", help="The service or projection to re-drive it into.")
    ],
    partition: Annotated[
        list[int] | None, typer.Option("--partition", "-p", help="Only these partitions.")
    ] = None,
    from_offset: Annotated[int | None, typer.Option(help="First offset (per partition).")] = None,
    to_offset: Annotated[int | None, typer.Option(help="End offset, exclusive.")] = None,
    since: Annotated[
        datetime | None, typer.Option("--from", help="Records written at or after (UTC).")
    ] = None,
    until: Annotated[
        datetime | None, typer.Option("--to", help="Records written before (UTC).")
    ] = None,
    key: Annotated[
        list[str] | None,
        typer.Option("--key", help="Only these workflow instances (their record key)."),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Say what would happen; write nothing.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable summary.")] = False,
) -> None:
    """Re-drive a range of TOPIC into a service or projection, harmlessly.

    Outputs carry the same idempotency keys and event ids as the first time, so
    downstream steps and partners treat them as repeats; projections apply an
    event once. --dry-run reports the events, the instances and how many inputs
    already have their outputs in the log (their effects are sent again under the same keys).
    """
    from datetime import UTC

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from opsflow.operator_actions import REPLAY
    from opsflow.replay import Replay, Selection, target_of

    kafka, registry, url = _cluster(database_optional=True)
    selection = Selection(
        topic=_topics()[_topic(topic, param_hint="TOPIC")],
        partitions=tuple(partition) if partition else None,
        from_offset=from_offset,
        to_offset=to_offset,
        from_time=since.replace(tzinfo=since.tzinfo or UTC) if since else None,
        to_time=until.replace(tzinfo=until.tzinfo or UTC) if until else None,
        keys=frozenset(key or ()),
    )
    job = Replay(target_of(into), selection, kafka=kafka, registry=registry, database_url=url)  # type: ignore[arg-type]
    # A dry run writes nothing and is no action; a replay is recorded before it runs.
    log, actor = _action_log(kafka, registry, url) if not dry_run else (None, None)
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]} events/s"),
    )
    started = time.monotonic()
    with Progress(*columns, console=errors, transient=as_json) as bar:
        task = bar.add_task(f"replaying {topic} into {into}", total=None, rate="-")

        def progress(done: int, total: int) -> None:
            rate = done / max(time.monotonic() - started, 1e-3)
            bar.update(task, completed=done, total=total, rate=f"{rate:,.0f}")

        if log is None:
            report = job.run(dry_run=dry_run, progress=progress)
        else:
            chosen = {"selection": selection.as_json(), "into": into}
            with log.recorded(actor, REPLAY, f"{topic} into {into}", chosen) as recorded:
                report = job.run(dry_run=dry_run, progress=progress)
                recorded.text = (
                    f"replayed: {sum(report.events.values()):,} events of "
                    f"{len(report.instances):,} instance(s) into {report.target}, "
                    f"{report.outputs:,} written (replay id {report.replay_id})"
                )
                recorded.detail = report.as_json()
            log.close()
    elapsed = time.monotonic() - started
    if as_json:
        print(json.dumps({**report.as_json(), "seconds": round(elapsed, 3)}))
        return
    read = sum(report.events.values())
    verb = "Would re-drive" if dry_run else "Re-drove"
    kinds = ", ".join(f"{n} {t}" for t, n in report.events.items()) or "none"
    console.print(
        f"{verb} {read:,} events ({kinds})"
        f" of {len(report.instances):,} {_instance()}s into {into} in {elapsed:.1f} s"
        f" ({read / max(elapsed, 1e-3):,.0f} events/s).",
        highlight=False,
    )
    if report.handled:
        # Said as it is: the effects are sent again, under the same keys. Whether a
        # partner repeats one is up to the partner honouring its key, and an input
        # whose effect failed the first time (a refused booking) is acted on again.
        fresh = report.handled - report.already_done
        console.print(
            f"{report.already_done:,} of {report.handled:,} inputs already have outputs in the "
            "log: their effects are sent again under the same idempotency keys, which a "
            f"partner honouring them (as the stand-ins do) answers with what it did; "
            f"{fresh:,} have none yet and are acted on"
            + (" if this were not a dry run." if dry_run else "."),
            highlight=False,
        )
    if not dry_run:
        what = "events to its tables" if into in _projection_names() else "outputs"
        console.print(
            f"Wrote {report.outputs:,} {what} (replay id {report.replay_id}).", highlight=False
        )
    if report.undecodable:
        console.print(f"[yellow]{report.undecodable} undecodable records skipped.[/]")


def _projection_names() -> list[str]:
    from opsflow.readmodels import projections

    return list(projections())


@app.command("acls")
def acls(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    principal_format: Annotated[
        str,
        typer.Option(
            help="How a program's name becomes its principal: the SASL user name, the "
            "OAuth token's subject or the client certificate's subject it authenticates "
            "with (e.g. User:opsflow-{program}, User:CN={program}.example.com).",
        ),
    ] = "User:{program}",
    principal: Annotated[
        list[str] | None,
        typer.Option(
            help="PROGRAM=PRINCIPAL for one that follows no pattern (a Confluent Cloud "
            "service account: projector=User:sa-abc123); repeat for each.",
        ),
    ] = None,
) -> None:
    """Print the Kafka ACLs that enforce at the broker who may read and write what.

    One principal per program (User:<program> unless --principal-format or
    --principal say otherwise), plus the projector, provisioning and the operator's
    commands (and the operator console): the topics each reads and writes, its
    consumer group and its transactional ids, as `kafka-acls.sh` commands
    (KAFKA_ADMIN_CONFIG: the admin client's properties file). Topic and group names
    carry OPSFLOW_TOPIC_PREFIX.
    """
    from opsflow.acls import acls_for
    from opsflow.application import load_application

    named: dict[str, str] = {}
    for given in principal or []:
        program, equals, value = given.partition("=")
        if not (program and equals and ":" in value):
            raise ConfigurationError(
                "--principal", f"{given!r} is not PROGRAM=TYPE:NAME", "Give e.g. ingest=User:sa-1"
            )
        named[program] = value
    application = load_application()
    rules = acls_for(application, principal_format=principal_format, principals=named)
    if as_json:
        print(json.dumps([rule.as_json() for rule in rules], indent=2))
        return
    external = sorted({m.topic.value for m in application.events if m.emitted_by.external})
    print(f"# Kafka ACLs of application {application.name!r} (opsflow acls)")
    current = None
    for rule in rules:
        if rule.principal != current:
            current = rule.principal
            print(f"\n# {current}")
        print(rule.command())
    print(
        "\n# A producer sending with the SDK straight to Kafka (not through a gateway)"
        " needs a principal of its own with Write and Describe on the topics of the"
        f" types it is declared for, among: {', '.join(external)}"
    )


@app.command("trace")
def trace_instance(
    key: Annotated[str, typer.Argument(help="A workflow instance's id (the key of its records).")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Print one workflow instance's causal history from the topics, and where it waits now.

    Every event of the instance on every topic of record, as a tree of causes and
    effects (causation id -> event id), with the time its record was written,
    producer, actor, the time since its cause, and its trace id. The events are
    read from the topics: the log is the truth, so this works with no database
    and a projection behind. With the database, the audit log serves as an index
    of where the instance's records are, so only those (and whatever the projection
    has not applied yet) are read.
    """
    from concurrent.futures import ThreadPoolExecutor
    from datetime import UTC, datetime

    from rich.markup import escape

    from opsflow import trace
    from opsflow.settings import DatabaseSettings, KafkaSettings, RegistrySettings, TopicSettings

    kafka_settings, registry = KafkaSettings(), RegistrySettings()
    registry_url = registry.schema_registry_url
    for variable, value in (
        ("KAFKA_BOOTSTRAP_SERVERS", kafka_settings.bootstrap_servers),
        ("SCHEMA_REGISTRY_URL", registry_url),
    ):
        if not value:
            raise ConfigurationError(
                variable,
                f"is not set, and no stack is running from {stack.data_dir()}",
                "Start one there with `opsflow up --detach`, run the command from the "
                "directory the stack was started in (or set OPSFLOW_DATA_DIR to its data "
                "directory), or set the variable to the cluster to use",
            )

    def registry_codec() -> Any:
        from confluent_kafka.schema_registry import SchemaRegistryClient

        from opsflow.contracts.wire import WireCodec

        return WireCodec(SchemaRegistryClient(registry.client_config()))

    prefix = TopicSettings().prefix
    # The application (and what it imports, fastavro among it) first, in this thread:
    # two threads importing fastavro at once can meet its modules half initialised
    # ("cannot import name ... from partially initialized module", seen in CI).
    from opsflow.application import load_application

    load_application()

    def full_scan(why: str) -> None:
        errors.print(f"[dim]{escape(why)}; reading the topics in full.[/]")

    # The codec's remaining imports are done while the database and the broker are asked.
    with ThreadPoolExecutor(max_workers=1) as pool:
        codec_made = pool.submit(registry_codec)
        try:
            result = trace.read(
                dict(kafka_settings.client_config()),
                codec_made.result,
                key,
                prefix=prefix,
                database_url=DatabaseSettings().database_url,
                now=datetime.now(UTC),
                on_full_scan=full_scan,
            )
        except trace.RegistryUnavailable as err:
            raise ConfigurationError(
                "SCHEMA_REGISTRY_URL",
                f"the schema registry at {registry_url} could not be asked ({err})",
                "Check that it is up and the variable names it, or point the shell at the "
                "running stack with `eval $(opsflow env)`",
            ) from err
    if as_json:
        print(json.dumps(trace.as_json(result)))
        return
    # Piped, one step stays one line (for grep) however deep the tree goes.
    out = console if console.is_terminal else Console(width=1000)
    out.print(trace.tree(result))
    for bad in result.unreadable:
        out.print(
            f"[yellow]unreadable:[/] {bad.topic}/{bad.partition}/{bad.offset}: "
            + escape(bad.problem),
            highlight=False,
        )
    if result.index_behind:
        out.print(
            f"[yellow]index:[/] the {trace.INDEX_PROJECTION} projection was "
            f"{result.index_behind:,} records behind the topics; those were read from the log.",
            highlight=False,
        )
    ids = result.trace_ids()
    out.print(
        f"[bold]now:[/] {escape(result.verdict.now)}"
        + (f"  [dim](trace {', '.join(ids)})[/]" if ids else ""),
        highlight=False,
    )


audit_app = typer.Typer(no_args_is_help=True, help="The tamper-evident audit log.")
app.add_typer(audit_app, name="audit")


@audit_app.command("verify")
def audit_verify() -> None:
    """Recompute the audit log's hash chain; name the first row that does not match."""
    from opsflow import db
    from opsflow.readmodels import audit

    _, _, url = _cluster(registry_needed=False)
    with db.connect(url) as conn, db.requires_table("audit_log"):
        verdict = audit.verify(conn)
    if verdict.intact:
        console.print(
            f"[green]intact:[/] {verdict.rows:,} rows chained; head hash "
            f"{verdict.head_hash.hex()} (keep it elsewhere to check the tail later).",
            highlight=False,
        )
        return
    console.print(
        f"[red]broken at row {verdict.first_bad_seq}[/] (event {verdict.first_bad_event_id}): "
        f"{verdict.problem}. {verdict.rows:,} rows before it are intact.",
        highlight=False,
    )
    sys.exit(1)


dlq_app = typer.Typer(
    no_args_is_help=True,
    help="Dead letters: what services and projections could not process, and redriving it "
    "back to its topic after a fix.",
)
app.add_typer(dlq_app, name="dlq")

_TopicFilter = Annotated[
    str | None, typer.Option("--topic", help="Source topic (its contract name).")
]
_ErrorClassFilter = Annotated[
    str | None, typer.Option("--error-class", help="Exception class, e.g. BadInputError.")
]
_ServiceFilter = Annotated[
    str | None,
    typer.Option("--service", help="Who failed: a service, or projection:<name>."),
]
_KeyFilter = Annotated[
    str | None, typer.Option("--key", help="A workflow instance's id (the record key).")
]


def _topics() -> dict[str, Topic]:
    """The application's topics by name."""
    from opsflow.application import load_application

    return {topic.value: topic for topic in load_application().topics}


def _instance() -> str:
    """What the application calls one instance of its workflow."""
    from opsflow.application import load_application

    return load_application().instance


@overload
def _topic(name: str, *, param_hint: str = ...) -> str: ...
@overload
def _topic(name: None, *, param_hint: str = ...) -> None: ...
def _topic(name: str | None, *, param_hint: str = "--topic") -> str | None:
    """A topic name checked against the application's topics (with the nearest on a typo)."""
    import difflib

    names = list(_topics())
    if name is None or name in names:
        return name
    near = difflib.get_close_matches(name, names, n=1)
    raise click.BadParameter(
        f"no topic {name!r}"
        + (f"; did you mean {near[0]!r}?" if near else "")
        + f" (topics: {', '.join(names)})",
        param_hint=param_hint,
    )


def _queues() -> Any:
    from opsflow.dlq import DeadLetterQueues
    from opsflow.settings import TopicSettings

    kafka, _, url = _cluster(registry_needed=False)
    return DeadLetterQueues(kafka, url, prefix=TopicSettings().prefix)


@dlq_app.command("list")
def dlq_list(
    topic: _TopicFilter = None,
    error_class: _ErrorClassFilter = None,
    service: _ServiceFilter = None,
    key: _KeyFilter = None,
    include_redriven: Annotated[
        bool, typer.Option("--include-redriven", help="List redriven dead letters too.")
    ] = False,
    limit: Annotated[
        int | None,
        typer.Option("--limit", min=0, help="Dead letters to list (default: 20; --json: all)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Dead letters counted by source topic, error class and consumer, then one per line.

    A source record dead-lettered more than once by the same consumer is one line (its
    other ids under "duplicates"). Redriven ones are counted, and listed with
    --include-redriven.
    """
    from opsflow.dlq import Filters, cases, summary

    filters = Filters(_topic(topic), error_class, service, key)
    found = cases(
        e
        for e in _queues().entries([filters.topic] if filters.topic else None)
        if filters.matches(e)
    )
    shown = [case for case in found if include_redriven or case.pending]
    groups = summary(found)
    if as_json:
        rows = shown if limit is None else shown[:limit]
        print(
            json.dumps(
                {
                    "pending": sum(g.pending for g in groups),
                    "redriven": sum(g.redriven for g in groups),
                    "groups": [g.as_json() for g in groups],
                    "dead_letters": [case.as_json() for case in rows],
                }
            )
        )
        return
    if not found:
        console.print("No dead letters" + (" match." if filters.any else "."))
        return
    table = Table(title="Dead letters")
    for column in ("topic", "error class", "consumer", "pending", "redriven"):
        table.add_column(column)
    for g in groups:
        pending = f"[red]{g.pending}[/]" if g.pending else "0"
        table.add_row(g.topic, g.error_class, g.consumer, pending, str(g.redriven))
    console.print(table)
    most = 20 if limit is None else limit
    if not shown or not most:
        return
    lines = Table(title="Pending dead letters" if not include_redriven else "Dead letters")
    for column in ("id", "key", "consumer", "error", "failed at", "redriven"):
        lines.add_column(column, overflow="fold")
    for case in shown[:most]:
        entry = case.latest
        error = f"{entry.letter.error_class}: {entry.letter.error_message[:80]}"
        dupes = f" (+{len(case.entries) - 1})" if len(case.entries) > 1 else ""
        redriven = "-" if case.pending else f"{entry.redrive.redriven_at:%Y-%m-%d %H:%M:%S}"  # type: ignore[union-attr]
        lines.add_row(
            entry.id + dupes,
            entry.key or "-",
            entry.letter.consumer,
            error,
            entry.letter.failed_at or "-",
            redriven,
        )
    console.print(lines)
    if len(shown) > most:
        console.print(
            f"... and {len(shown) - most:,} more: narrow with --topic, --error-class, "
            "--service or --key, or raise --limit.",
            highlight=False,
        )


@dlq_app.command("show")
def dlq_show(
    dead_letter_id: Annotated[
        str,
        typer.Argument(metavar="ID", help="A dead letter's id: <topic>.dlq/<partition>/<offset>."),
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """One dead letter: its value decoded where possible (else its first bytes), its
    headers, the error that put it there and whether it was redriven."""
    from opsflow.contracts.wire import WireCodec
    from opsflow.dlq import decoded, preview

    _, registry, _ = _cluster()
    queues = _queues()
    entry = queues.entry(dead_letter_id)
    letter = entry.letter
    value, problem = decoded(letter.value, WireCodec(registry))  # type: ignore[arg-type]
    data = {
        **entry.as_json(),
        "dead_letter": {
            "topic": letter.topic,
            "partition": letter.partition,
            "offset": letter.offset,
        },
        "value": value,
        "value_error": problem,
        "value_bytes": None if value is not None else preview(letter.value),
        "headers": [[k, v.decode("utf-8", "backslashreplace")] for k, v in letter.original_headers],
        "dead_letter_headers": [
            [k, v.decode("utf-8", "backslashreplace")] for k, v in letter.added_headers
        ],
    }
    if as_json:
        print(json.dumps(data))
        return
    console.print(f"[bold]{entry.id}[/] ({letter.topic}/{letter.partition}/{letter.offset})")
    console.print(f"  source:   {entry.source_name}", highlight=False)
    console.print(f"  key:      {entry.key or '-'}", highlight=False)
    console.print(f"  consumer: {letter.consumer} (attempts: {letter.attempts or '-'})")
    console.print(f"  failed:   {letter.failed_at or '-'}", highlight=False)
    console.print(
        f"  error:    [red]{letter.error_class}[/]: {letter.error_message}", highlight=False
    )
    if entry.redrive is not None:
        console.print(
            f"  redriven: {entry.redrive.redriven_at:%Y-%m-%d %H:%M:%S %Z} to "
            f"{letter.source_topic}/{entry.redrive.partition}/{entry.redrive.offset}",
            highlight=False,
        )
    if letter.redriven_from:
        console.print(f"  an earlier redrive of: {letter.redriven_from}", highlight=False)
    headers = Table(title="Headers (the original record's, then the dead letter's)")
    for column in ("header", "value", "from"):
        headers.add_column(column, overflow="fold")
    for (name, text), origin in [
        *((pair, "record") for pair in data["headers"]),
        *((pair, "dead letter") for pair in data["dead_letter_headers"]),
    ]:
        headers.add_row(name, text, origin)
    console.print(headers)
    if value is not None:
        console.print("Value (decoded):")
        console.print_json(json.dumps(value))
    else:
        raw = data["value_bytes"]
        console.print(f"Value: not decoded ({problem}); {raw['length']} bytes", highlight=False)
        console.print(
            f"  hex:  {raw['hex']}" + (" ..." if raw["truncated"] else ""), highlight=False
        )
        console.print(f"  text: {raw['text']!r}", highlight=False, markup=False)


@dlq_app.command("redrive")
def dlq_redrive(
    ids: Annotated[
        list[str] | None,
        typer.Argument(metavar="[ID]...", help="Dead letters to redrive (as `list` shows them)."),
    ] = None,
    redrive_all: Annotated[
        bool, typer.Option("--all", help="Every pending dead letter (with filters: that match).")
    ] = False,
    topic: _TopicFilter = None,
    error_class: _ErrorClassFilter = None,
    service: _ServiceFilter = None,
    key: _KeyFilter = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Say what would be redriven; write nothing.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Write dead letters back to their source topic after a fix, each at most once.

    The original key, value, headers and timestamp go back to the source partition,
    with `opsflow-redriven-from` added; a redriven dead letter is recorded, so redriving
    it again does nothing, and a record that fails again is dead-lettered anew with the
    new error. A source record dead-lettered by several consumers is written once.

    Every consumer of the topic reads the copy, not only the one that failed. That is
    harmless by construction: services derive their outputs' ids, keys and times from
    the input (the same input gives the same events), read models take a repeated event
    as a no-op, and effect steps call their partner under the same idempotency key (an
    effect already made is returned; one that had failed for good is tried again).
    """
    from opsflow.dlq import Filters

    filters = Filters(_topic(topic), error_class, service, key)
    if not (ids or redrive_all or filters.any):
        raise click.UsageError(
            "say what to redrive: IDs, filters (--topic, --error-class, --service, --key) "
            "or --all; add --dry-run to see it first"
        )
    from opsflow.dlq import DeadLetterQueues
    from opsflow.operator_actions import REDRIVE
    from opsflow.settings import TopicSettings

    kafka, registry, url = _cluster()
    queues = DeadLetterQueues(kafka, url, prefix=TopicSettings().prefix)
    if ids:
        chosen = queues.by_ids(ids)
    else:
        everything = queues.entries([filters.topic] if filters.topic else None)
        chosen = [e for e in everything if e.redrive is None and filters.matches(e)]
    if dry_run:  # writes nothing: no action to record
        result = queues.redrive(chosen, dry_run=True)
    else:
        log, actor = _action_log(kafka, registry, url)
        named = [
            *(queues.canonical(one) for one in ids or ()),
            *(["--all"] if redrive_all else []),
            *(f"--{k.replace('_', '-')} {v}" for k, v in asdict(filters).items() if v),
        ]
        with log.recorded(actor, REDRIVE, " ".join(named)) as recorded:
            result = queues.redrive(chosen)
            recorded.text, recorded.detail = result.outcome(), result.as_json()
        log.close()
    if as_json:
        print(json.dumps(result.as_json()))
    else:
        _print_redrive(result)
    if result.failed:
        sys.exit(1)


def _print_redrive(result: Any) -> None:
    verb = "Would redrive" if result.dry_run else "Redrove"
    count = len(result.redriven)
    if not count and not result.failed:
        console.print("Nothing to redrive: no pending dead letter matches.")
    elif count:
        letters = sum(len(entries) for entries, _ in result.redriven)
        by_topic = Counter(entries[0].letter.source_topic for entries, _ in result.redriven)
        where = ", ".join(f"{n:,} to {t}" for t, n in sorted(by_topic.items()))
        console.print(
            f"{verb} {count:,} record(s) ({letters:,} dead letter(s)): {where}.", highlight=False
        )
        for entries, _to in result.redriven[:20]:
            console.print(f"  {', '.join(e.id for e in entries)}  key {entries[0].key or '-'}")
        if count > 20:
            console.print(f"  ... and {count - 20:,} more (--json lists all).")
    for entry in result.skipped[:20]:
        mark = entry.redrive
        when = f" at {mark.redriven_at:%Y-%m-%d %H:%M:%S %Z}" if mark else ""
        console.print(f"Skipped {entry.id}: redriven already{when}.", highlight=False)
    for entries, error in result.failed[:20]:
        errors.print(
            f"[red]not redriven:[/] {', '.join(e.id for e in entries)}: {error}",
            highlight=False,
        )
    if result.failed:
        errors.print(
            f"{len(result.failed):,} record(s) were not written and stay pending; fix the "
            "cause and run the same command again (what was written is not written twice).",
            highlight=False,
        )


contracts_app = typer.Typer(
    no_args_is_help=True,
    help="The application's event contracts: the evolution gate, and restated for other "
    "tools as AsyncAPI and Markdown.",
)
app.add_typer(contracts_app, name="contracts")


@contracts_app.command("check")
def contracts_check() -> None:
    """Check every schema version of the application against all earlier ones (the gate
    for CI): every record ever written must stay readable by the newest schema; and
    every event class must mirror its latest schema, field by field."""
    from rich.markup import escape

    from opsflow.application import load_application
    from opsflow.contracts import REPLAY_LEVEL, check_evolution, load_catalogue, schemas_dir
    from opsflow.contracts.mirror import mismatches

    failed = False
    for part in load_application().members:
        directory = schemas_dir(part)
        problems = check_evolution(directory, application=part)
        if not problems:  # a broken catalogue cannot be compared with the classes
            found = load_catalogue(directory, application=part)
            problems = [line for event in found.values() for line in mismatches(event)]
        for problem in problems:
            errors.print(escape(problem), highlight=False)
        failed = failed or bool(problems)
        console.print(
            f"{directory}: {len(part.events)} event types; "
            + (
                "see above."
                if problems
                else f"every version is {REPLAY_LEVEL} compatible with all earlier ones, "
                "and every class mirrors its latest schema."
            ),
            highlight=False,
        )
    if failed:
        sys.exit(1)


@contracts_app.command("asyncapi")
def contracts_asyncapi() -> None:
    """Print the AsyncAPI 3 document of the topics as YAML (what asyncapi.yaml holds).

    Regenerate the checked-in file with `opsflow contracts asyncapi > asyncapi.yaml`.
    """
    from opsflow.contracts.asyncapi import asyncapi_yaml

    sys.stdout.write(asyncapi_yaml())


@contracts_app.command("docs")
def contracts_docs(
    update: Annotated[
        Path | None,
        typer.Option(
            "--update",
            help="Rewrite the generated part of this Markdown file (between its markers), "
            "e.g. docs/contracts.md, instead of printing it.",
        ),
    ] = None,
) -> None:
    """Print the generated event reference of docs/contracts.md: topics, event types, fields."""
    from opsflow.contracts.reference import event_reference, with_event_reference

    if update is None:
        sys.stdout.write(event_reference() + "\n")
        return
    try:
        text = update.read_text(encoding="utf-8")
    except OSError as err:
        raise OpsflowError(f"cannot read {update}: {err.strerror or err}") from err
    fresh = with_event_reference(text)
    if fresh != text:
        update.write_text(fresh, encoding="utf-8")
    errors.print(
        f"{update}: event reference {'updated' if fresh != text else 'already current'}.",
        highlight=False,
    )


new_app = typer.Typer(no_args_is_help=True, help="Starting points for code built on opsflow.")
app.add_typer(new_app, name="new")


@new_app.command("service")
def new_service(
    name: Annotated[str, typer.Argument(help="The service's name, e.g. greeter.")],
    directory: Annotated[
        Path, typer.Option("--dir", help="Where to create the project folder NAME.")
    ] = Path("."),
) -> None:
    """Write a project for a team's own application with one service: its topics, event
    types and Avro schemas, the service, a test and the contract gate, depending on
    opsflow as a package."""
    from opsflow.scaffold import write_project

    written = write_project(name, directory)
    root = directory / name
    for path in written:
        console.print(f"  wrote {path.relative_to(directory)}", highlight=False)
    console.print(
        f"Next: cd {root} && python -m venv .venv && .venv/bin/pip install -e '.[test]' "
        "&& .venv/bin/pytest, then .venv/bin/opsflow up (see its README.md).",
        highlight=False,
        markup=False,
    )


# Typer raises usage errors from a click of its own (typer._click), not click's classes:
# both are caught by their common base.
_UsageErrors: type[click.ClickException] = next(
    cls for cls in typer.BadParameter.__mro__ if cls.__name__ == "ClickException"
)


def add_application_commands(args: list[str]) -> None:
    """Offer the application's own commands (``Application.commands``, say a
    ``demo``) next to opsflow's; without an application, opsflow's alone.

    Not for one of opsflow's own commands: loading the application imports all it
    declares (its read models too), time a command that does not need it should not pay.
    """
    from opsflow.application import load_application, load_command

    named = next((arg for arg in args if not arg.startswith("-")), None)
    own = {
        c.name or (c.callback.__name__.lower().replace("_", "-") if c.callback else None)
        for c in app.registered_commands
    } | {g.name for g in app.registered_groups}
    if named in own:
        return

    try:
        commands = load_application().commands
    except ConfigurationError:
        return  # `opsflow status`, `trace`... still work; the error is theirs to tell
    for target in commands:
        command = load_command(target)
        name = command.__name__.replace("_", "-")
        if name not in own:  # already added by an earlier call in this process
            app.command(name)(command)


def main() -> None:
    """Entry point: run the app, turning opsflow's errors into one clear line."""
    try:
        add_application_commands(sys.argv[1:])
        code = app(standalone_mode=False)
    except (click.ClickException, _UsageErrors) as err:
        err.show()
        sys.exit(err.exit_code)
    except ConfigurationError as err:
        if _debug:
            raise
        errors.print(
            f"[red]error:[/] {err.variable}: {err.problem}.\n  {err.hint}",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(2)
    except OpsflowError as err:
        if _debug:
            raise
        errors.print(f"[red]error:[/] {err}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except click.exceptions.Abort:
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
