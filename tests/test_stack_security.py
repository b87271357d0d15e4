"""The embedded stack on a machine shared with other users: each test is an attack it stops.

One stack, started as ``make run`` starts it (the durable store, every
program), serves the module: every listener and every secret of the stack is
there. The attacks are made as another user would make them: over the
loopback ports with no secret or a guessed one, by reading the data
directory, the logs and ``ps``. When the suite runs as root, reading the data
directory is also tried as the unprivileged ``nobody``.
"""

from __future__ import annotations

import calendar
import hashlib
import json
import os
import pwd
import stat
import subprocess
import time
import uuid
import xmlrpc.client
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import psycopg
import pytest

from opsflow.stack.sigv4 import AccessKey, Refused, SigV4Auth, Verifier
from tests.support.stack import Stack, stack_env

# A stack of the module's own: the processes and files of the stack are what is attacked.
pytestmark = pytest.mark.process

BUCKET = "opsflow"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    data_dir = tmp_path_factory.mktemp("shared-machine") / "data"
    running = Stack(data_dir, stack_env(data_dir, OPSFLOW_SERVICES="true"))
    running.run("up", "--detach", timeout=300)
    yield running
    running.run("down", check=False)


@pytest.fixture(scope="module")
def credentials(stack: Stack) -> dict[str, str]:
    """The stack's secrets, as its owner reads them."""
    found: dict[str, str] = json.loads((stack.data_dir / "credentials.json").read_text())
    assert len(found) == 3 and all(len(secret) >= 32 for secret in found.values()), found.keys()
    return found


def _plan(stack: Stack) -> dict[str, Any]:
    plan: dict[str, Any] = json.loads((stack.data_dir / "stack.json").read_text())
    return plan


def _address(stack: Stack, name: str) -> str:
    return str(next(c["address"] for c in _plan(stack)["components"] if c["name"] == name))


def _stack_processes(stack: Stack) -> list[psutil.Process]:
    supervisord = psutil.Process(int((stack.data_dir / "run" / "supervisord.pid").read_text()))
    return [supervisord, *supervisord.children(recursive=True)]


def test_another_user_cannot_read_the_data_directory(stack: Stack) -> None:
    data_dir = stack.data_dir
    as_root = os.geteuid() == 0
    opened = []
    for folder, folders, files in os.walk(data_dir):
        for path in [Path(folder)] + [Path(folder, name) for name in folders + files]:
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                continue
            if path == data_dir and as_root:
                # PostgreSQL runs as an account of its own and must pass through (0710):
                # its group, and no one else.
                account = pwd.getpwnam("opsflow_postgres")
                assert stat.S_IMODE(info.st_mode) == 0o710, oct(info.st_mode)
                assert info.st_gid == account.pw_gid
            elif stat.S_IMODE(info.st_mode) & 0o077:
                opened.append(f"{oct(stat.S_IMODE(info.st_mode))} {path}")
    assert not opened, "readable by others:\n" + "\n".join(opened)
    for secret_file in ("credentials.json", "pgpass"):
        assert stat.S_IMODE((data_dir / secret_file).stat().st_mode) == 0o600
    assert len(list((data_dir / "logs").iterdir())) >= 5, "every component's log was looked at"

    if as_root:
        # The attack itself, by a user who is not the stack's.
        for command in (
            ["/bin/ls", str(data_dir)],
            ["/bin/cat", str(data_dir / "credentials.json")],
            ["/bin/cat", str(data_dir / "pgpass")],
            ["/bin/cat", str(data_dir / "logs" / "supervisord.log")],
            ["/bin/ls", str(data_dir / "broker")],
            ["/bin/cat", str(data_dir / "postgres" / "PG_VERSION")],
        ):
            tried = subprocess.run(command, user="nobody", capture_output=True, text=True)
            assert tried.returncode != 0 and "Permission denied" in tried.stderr, (command, tried)


def test_the_database_refuses_a_connection_without_the_stacks_password(stack: Stack) -> None:
    url = stack.address("DATABASE_URL")
    assert "passfile=" in url and ":" not in url.split("://", 1)[1].split("@", 1)[0]
    without_password = url.split("?", 1)[0]
    with pytest.raises(psycopg.OperationalError, match="no password supplied"):
        psycopg.connect(without_password, connect_timeout=5)
    guessed = without_password.replace("postgres@", "postgres:postgres@", 1)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(guessed, connect_timeout=5)
    # Its owner's URL, as `opsflow env` gives it, works as it is.
    with psycopg.connect(url, connect_timeout=5) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("postgres",)


def test_the_supervisor_refuses_an_unauthenticated_control_request(
    stack: Stack, credentials: dict[str, str]
) -> None:
    port = _plan(stack)["supervisor_port"]
    broker = psutil.Process(int((stack.data_dir / "run" / "broker.pid").read_text()))
    for userinfo in ("", "opsflow:guessed@", f"someone:{credentials['supervisor_password']}@"):
        proxy = xmlrpc.client.ServerProxy(f"http://{userinfo}127.0.0.1:{port}/RPC2")
        with pytest.raises(xmlrpc.client.ProtocolError) as refused:
            proxy.supervisor.stopProcess("broker")
        assert refused.value.errcode == 401
    assert broker.is_running() and broker.status() != psutil.STATUS_ZOMBIE, "not stopped"
    # The owner's command still asks it, and every component is healthy (exit 0).
    assert stack.run("status").returncode == 0


def test_the_object_store_refuses_an_unsigned_or_wrongly_signed_request(
    stack: Stack, credentials: dict[str, str]
) -> None:
    store = _address(stack, "bucket")
    key = AccessKey("opsflow", credentials["store_secret_key"])
    target = f"{store}/{BUCKET}/attack-{uuid.uuid4().hex[:8]}.json"
    listing = f"{store}/{BUCKET}?list-type=2&prefix=clusters%2F"

    def refused(response: httpx.Response) -> str:
        assert response.status_code == 403, (response.status_code, response.text)
        return response.text.split("<Code>")[1].split("</Code>")[0]

    with httpx.Client(timeout=5) as anyone:
        assert refused(anyone.get(listing)) == "AccessDenied"
        assert refused(anyone.put(target, content=b"{}")) == "AccessDenied"
        guessed = SigV4Auth(AccessKey(key.id, "opsflow"))
        assert refused(anyone.get(listing, auth=guessed)) == "SignatureDoesNotMatch"
        other_id = SigV4Auth(AccessKey("AKIAIOSFODNN7EXAMPLE", key.secret))
        assert refused(anyone.get(listing, auth=other_id)) == "InvalidAccessKeyId"
        # A request signed an hour ago (seen once, replayed now) is refused too...
        earlier = SigV4Auth(key, clock=lambda: time.time() - 3600)
        assert refused(anyone.get(listing, auth=earlier)) == "RequestTimeTooSkewed"
        # ...and so is a signed request whose body was swapped on the way.
        request = anyone.build_request("PUT", target, content=b'{"v": 1}')
        request = next(SigV4Auth(key).auth_flow(request))
        swapped = anyone.build_request(
            "PUT", target, content=b'{"v": 2}', headers=dict(request.headers)
        )
        assert refused(anyone.send(swapped)) == "XAmzContentSHA256Mismatch"

    with httpx.Client(timeout=5, auth=SigV4Auth(key)) as broker:
        assert broker.get(target).status_code == 404, "no refused write was stored"
        # The refusals were about the signature: signed with the key, it is served.
        assert broker.get(listing).status_code == 200
    assert stack.components()["broker"]["healthy"], "the broker's own requests are signed"


def test_a_signature_is_checked_as_aws_computes_it() -> None:
    """AWS's published SigV4 examples for S3 ("Examples: Signature Calculations"):
    a store that computed signatures its own way would refuse real clients or let a
    forger choose what the signature covers."""
    key = AccessKey("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    verifier = Verifier(key, clock=lambda: calendar.timegm((2013, 5, 24, 0, 0, 0)))
    empty = hashlib.sha256(b"").hexdigest()
    body = b"Welcome to Amazon S3."
    host = ("host", "examplebucket.s3.amazonaws.com")
    date = ("x-amz-date", "20130524T000000Z")
    examples: list[tuple[str, str, str, list[tuple[str, str]], bytes, str, str]] = [
        (
            "GET",
            "/test.txt",
            "",
            [host, ("range", "bytes=0-9"), ("x-amz-content-sha256", empty), date],
            b"",
            "host;range;x-amz-content-sha256;x-amz-date",
            "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41",
        ),
        (
            "PUT",
            "/test$file.text",
            "",
            [
                ("date", "Fri, 24 May 2013 00:00:00 GMT"),
                host,
                ("x-amz-content-sha256", hashlib.sha256(body).hexdigest()),
                date,
                ("x-amz-storage-class", "REDUCED_REDUNDANCY"),
            ],
            body,
            "date;host;x-amz-content-sha256;x-amz-date;x-amz-storage-class",
            "98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd",
        ),
        (
            "GET",
            "/",
            "lifecycle",
            [host, ("x-amz-content-sha256", empty), date],
            b"",
            "host;x-amz-content-sha256;x-amz-date",
            "fea454ca298b7da1c68078a5d1bdbfbbe0d65c699e0f91ac7a200a0136783543",
        ),
        (
            "GET",
            "/",
            "max-keys=2&prefix=J",
            [host, ("x-amz-content-sha256", empty), date],
            b"",
            "host;x-amz-content-sha256;x-amz-date",
            "34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7",
        ),
    ]
    scope = "AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request"
    for method, path, query, headers, payload, signed, signature in examples:
        authorization = (
            f"AWS4-HMAC-SHA256 Credential={scope},SignedHeaders={signed},Signature={signature}"
        )
        request = {
            "method": method,
            "path": path,
            "raw_query": query,
            "headers": [*headers, ("authorization", authorization)],
            "body": payload,
        }
        verifier.verify(**request)  # type: ignore[arg-type]
        forged = {**request, "raw_query": f"{query}&x=1" if query else "x=1"}
        with pytest.raises(Refused, match="signature does not match"):
            verifier.verify(**forged)  # type: ignore[arg-type]


def test_no_secret_is_written_to_stack_json_logs_status_or_a_command_line(
    stack: Stack, credentials: dict[str, str]
) -> None:
    data_dir = stack.data_dir
    shown = {
        "stack.json": (data_dir / "stack.json").read_text(),
        "supervisord.conf": (data_dir / "supervisord.conf").read_text(),
        "opsflow status": stack.run("status").stdout,
        "opsflow status --json": stack.run("status", "--json").stdout,
        "opsflow env": stack.run("env").stdout,
    }
    shown |= {f"logs/{log.name}": log.read_text() for log in (data_dir / "logs").iterdir()}
    # `ps` shows every process's command line to every user.
    shown |= {
        f"the command line of {proc.name()} ({proc.pid})": " ".join(proc.cmdline())
        for proc in _stack_processes(stack)
    }
    assert len(shown) > 20, shown.keys()
    # The stand-ins' ingest API keys are the stack's secrets too.
    keys = {key.name: key.read_text().strip() for key in (data_dir / "run").glob("*.key")}
    assert keys, "the carrier stand-in has its API key"
    leaks = [
        f"{name} in {where}"
        for name, secret in (credentials | keys).items()
        for where, text in shown.items()
        if secret in text
    ]
    assert not leaks, leaks
    assert "passfile=" in shown["opsflow env"], "the database URL names the password file"


def test_every_listener_of_the_stack_is_on_loopback(stack: Stack) -> None:
    plan = _plan(stack)
    listening: dict[int, str] = {}
    for proc in _stack_processes(stack):
        try:
            sockets = proc.net_connections(kind="inet")
        except psutil.NoSuchProcess:
            continue  # a short-lived helper that has gone
        for sock in sockets:
            if sock.status == psutil.CONN_LISTEN:
                listening[sock.laddr.port] = f"{sock.laddr.ip} ({proc.name()} {proc.pid})"
    expected = {c["port"]: c["name"] for c in plan["components"]}
    expected[plan["supervisor_port"]] = "supervisor"
    assert len(expected) >= 10, expected
    unseen = [name for port, name in expected.items() if port not in listening]
    assert not unseen, f"not listening: {unseen}"
    exposed = {
        port: where
        for port, where in listening.items()
        if where.split(" ", 1)[0] not in ("127.0.0.1", "::1")
    }
    assert not exposed, f"listening beyond loopback: {exposed}"
