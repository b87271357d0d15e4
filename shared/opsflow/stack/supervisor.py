"""Run the stack's processes under supervisord, and talk to it.

supervisord (the ``supervisor`` package) starts the components in priority
order, restarts one that dies (with its backoff for quick crash loops), stops
them in reverse order, and answers status queries over XML-RPC on a loopback
port. opsflow only writes its configuration and reads its answers.

Any user of the machine can reach a loopback port, and the control interface
can stop or start every program: it asks for a password (HTTP basic
authentication, the data directory's ``credentials.json``). Everything
supervisord and its programs write is for the stack's user only (umask 077).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import xmlrpc.client
from dataclasses import dataclass
from typing import Any

import psutil
from supervisor.xmlrpc import SupervisorTransport

from opsflow.stack.components import LOOPBACK, StackPlan
from opsflow.stack.credentials import SUPERVISOR_USER, Credentials, private_dir, write_private

# The one-shot program that prepares the stack for use (see opsflow.provision).
PROVISION = "provision"


@dataclass(frozen=True)
class ProcessState:
    """What supervisord knows of one program."""

    name: str
    state: str
    pid: int
    uptime_s: float
    exit_status: int
    restarts: int


def _program(name: str, command: list[str], plan: StackPlan, priority: int, **extra: str) -> str:
    options = {
        "command": " ".join(command),
        "priority": str(priority),
        "autostart": "true",
        "autorestart": "true",
        # A process that dies within startsecs is retried with a growing delay
        # (1 s, 2 s, 3 s, ...) up to startretries before it is marked FATAL.
        "startsecs": "1",
        "startretries": "10",
        "stopwaitsecs": "20",
        "stopasgroup": "true",
        "killasgroup": "true",
        "redirect_stderr": "true",
        "stdout_logfile": f"{plan.data_dir / 'logs' / name}.log",
        "stdout_logfile_maxbytes": "10MB",
        "stdout_logfile_backups": "2",
        **extra,
    }
    return "\n".join([f"[program:{name}]", *(f"{key}={value}" for key, value in options.items())])


def render_config(plan: StackPlan, credentials: Credentials) -> str:
    """The supervisord configuration for a plan."""
    run = plan.data_dir / "run"
    # supervisord compares the SHA-1 of the password it is given with this one.
    password = hashlib.sha1(credentials.supervisor_password.encode()).hexdigest()
    sections = [
        "[supervisord]",
        f"logfile={plan.data_dir / 'logs' / 'supervisord.log'}",
        f"pidfile={run / 'supervisord.pid'}",
        f"childlogdir={plan.data_dir / 'logs'}",
        "identifier=opsflow",
        # Its daemon applies this one; the default, 022, lets everyone read the logs.
        "umask=077",
        "",
        "[inet_http_server]",
        f"port={LOOPBACK}:{plan.supervisor_port}",
        f"username={SUPERVISOR_USER}",
        f"password={{SHA}}{password}",
        "",
        "[supervisorctl]",
        f"serverurl=http://{LOOPBACK}:{plan.supervisor_port}",
        f"username={SUPERVISOR_USER}",
        "",
        "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
        "",
    ]
    for comp in plan.components:
        # PostgreSQL's SIGTERM ("smart" shutdown) waits for every client to
        # disconnect; SIGINT is its "fast" shutdown.
        stop = "INT" if comp.name == "postgres" else "TERM"
        sections.append(_program(comp.name, comp.command, plan, comp.priority, stopsignal=stop))
        sections.append("")
    provision = [sys.executable, "-m", "opsflow.provision"]
    sections.append(
        # Provisioning waits for the components itself; when it gives up, the
        # failure is reported by `opsflow up`, not retried forever.
        _program(PROVISION, provision, plan, 90, autorestart="false", startsecs="0")
    )
    return "\n".join(sections) + "\n"


def rpc(plan: StackPlan) -> Any:
    """An XML-RPC proxy to the stack's supervisord, signed in with the data directory's password.

    The password travels in a header, not in the URL: a URL with it would show in
    the message of every error.
    """
    password = Credentials.of(plan.data_dir).supervisor_password
    transport = SupervisorTransport(
        SUPERVISOR_USER, password, f"http://{LOOPBACK}:{plan.supervisor_port}"
    )
    return xmlrpc.client.ServerProxy(f"http://{LOOPBACK}/RPC2", transport=transport)


def supervisord_pid(plan: StackPlan) -> int | None:
    """The pid of the stack's supervisord if it is alive, else None."""
    pidfile = plan.data_dir / "run" / "supervisord.pid"
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        proc = psutil.Process(pid)
        alive = proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
        return pid if alive and "supervisord" in " ".join(proc.cmdline()) else None
    except psutil.Error:
        return None


def is_running(plan: StackPlan) -> bool:
    """True when the stack's supervisord is alive and answering."""
    if supervisord_pid(plan) is None:
        return False
    try:
        rpc(plan).supervisor.getState()
    except (OSError, xmlrpc.client.Error):
        return False
    return True


def processes(plan: StackPlan) -> dict[str, ProcessState]:
    """Every program's state, pid, uptime and restart count."""
    found = {}
    for info in rpc(plan).supervisor.getAllProcessInfo():
        running = info["statename"] == "RUNNING"
        starts_file = plan.data_dir / "run" / f"{info['name']}.starts"
        starts = int(starts_file.read_text()) if starts_file.exists() else 0
        found[info["name"]] = ProcessState(
            name=info["name"],
            state=info["statename"],
            pid=info["pid"],
            uptime_s=float(info["now"] - info["start"]) if running else 0.0,
            exit_status=info["exitstatus"],
            restarts=max(starts - 1, 0),
        )
    return found


def start(plan: StackPlan, *, foreground: bool) -> subprocess.Popen[bytes]:
    """Write the configuration and start supervisord with the stack's environment.

    In the background, supervisord daemonizes itself and the returned process
    has already exited; in the foreground, the caller waits on it.
    """
    for sub in ("logs", "run"):
        for made_before in private_dir(plan.data_dir / sub).iterdir():
            made_before.chmod(0o600)  # by a version of opsflow that let everyone read them
    for stale in [*(plan.data_dir / "run").glob("*.starts"), plan.data_dir / "run" / "provisioned"]:
        stale.unlink(missing_ok=True)
    conf = plan.data_dir / "supervisord.conf"
    write_private(conf, render_config(plan, Credentials.of(plan.data_dir)))
    env = {
        **os.environ,
        **plan.env,
        "OPSFLOW_DATA_DIR": str(plan.data_dir),
        "PYTHONUNBUFFERED": "1",
    }
    # As a module of this interpreter, not the console script beside it: an
    # environment that has the package need not have its scripts.
    command = [sys.executable, "-m", "supervisor.supervisord", "-c", str(conf)]
    if foreground:
        command.append("--nodaemon")
    # In the foreground supervisord keeps the umask it is started with.
    proc = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, umask=0o077)
    if not foreground:
        proc.wait(30)
    return proc


def stop(plan: StackPlan, *, timeout: float = 60.0) -> None:
    """Stop every program and supervisord, then make sure nothing of the stack is left."""
    pid = supervisord_pid(plan)
    if pid is not None:
        try:
            rpc(plan).supervisor.shutdown()
        except (OSError, xmlrpc.client.Error):
            # It does not answer, or refuses the password (credentials.json was made
            # anew while it ran): SIGTERM stops it and its programs as cleanly.
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).wait(timeout)
    kill_leftovers(plan)


def kill_leftovers(plan: StackPlan) -> list[str]:
    """Stop component processes that outlived their supervisord (e.g. after a kill -9 of it).

    A broker left running would keep writing to the data directory a new one
    is about to use; nothing of an old stack may survive into a new one.

    Returns:
        The names of the components that had to be stopped.
    """
    stopped = []
    for pidfile in (plan.data_dir / "run").glob("*.pid"):
        if pidfile.stem == "supervisord":
            continue
        with contextlib.suppress(psutil.Error, ValueError, OSError):
            proc = psutil.Process(int(pidfile.read_text()))
            if proc.create_time() > pidfile.stat().st_mtime + 5:
                continue  # the pid was reused by an unrelated, newer process
            proc.send_signal(signal.SIGINT if pidfile.stem == "postgres" else signal.SIGTERM)
            try:
                proc.wait(20)
            except psutil.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            stopped.append(pidfile.stem)
        pidfile.unlink(missing_ok=True)
    return stopped
