"""opsflow as a package a team builds on, outside this repository.

The built wheel is installed into a fresh virtual environment in a temporary
directory; `opsflow new service` (from that environment) writes a team's
project there, which is installed next to it and run with the installed
`opsflow` command on the session's stack: provisioned, its service run, an
event sent with the SDK and answered, and traced. Nothing of the repository is
importable there: the environment sees the wheel and the team's package, and
the third-party packages opsflow depends on (linked from this environment, so
the test needs no network for them; resolving them is what `make setup` does).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import time
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.support.stack import ROOT, Stack, create_schema, drop_schema

# The built package installed into a fresh environment and run from there.
pytestmark = pytest.mark.process

# Distributions that are this repository's own: the fresh environment must not see them.
_OWN = ("opsflow", "services", "__editable__", "_opsflow", "opsflow_orders")
# Requirements a plain `pip install opsflow` must not pull in.
_TEST_AND_BENCH = ("pytest", "ruff", "mypy", "faust", "faststream", "py-spy", "schemathesis")


def _run(args: list[str | Path], *, cwd: Path, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, (
        f"{' '.join(map(str, args))} exited {result.returncode}\n"
        f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )
    return result.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from a copy of what the package is made of (a build in the
    checkout would leave its build/ folder there)."""
    out = tmp_path_factory.mktemp("wheel")
    source = out / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    junk = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copytree(ROOT / "shared", source / "shared", ignore=junk)
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", out, source], cwd=out)
    (found,) = out.glob("opsflow-*.whl")
    return found


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh environment with the wheel installed and opsflow's dependencies linked in."""
    place = tmp_path_factory.mktemp("elsewhere")
    venv = place / "venv"
    _run([sys.executable, "-m", "venv", venv], cwd=place)
    deps = place / "dependencies"
    deps.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.startswith(_OWN) and entry.suffix != ".pth":
            (deps / entry.name).symlink_to(entry)
    (site,) = venv.glob("lib/python3*/site-packages")
    (site / "dependencies.pth").write_text(f"{deps}\n")
    _run([venv / "bin" / "pip", "install", "-q", "--no-deps", wheel], cwd=place)
    return venv


@pytest.fixture
def team_env(stack: Stack, venv: Path) -> Iterator[dict[str, str]]:
    """The team's shell: the session's cluster under a prefix of its own, a fresh schema."""
    base = stack.address("DATABASE_URL")
    schema, url = create_schema(base)
    yield {
        "PATH": f"{venv / 'bin'}:/usr/bin:/bin",
        "HOME": str(venv.parent),
        "KAFKA_BOOTSTRAP_SERVERS": stack.address("KAFKA_BOOTSTRAP_SERVERS"),
        "SCHEMA_REGISTRY_URL": stack.address("SCHEMA_REGISTRY_URL"),
        "DATABASE_URL": url,
        "OPSFLOW_TOPIC_PREFIX": f"team-{uuid.uuid4().hex[:8]}.",
        "OPSFLOW_DATA_DIR": str(venv.parent / "stack"),
        "OPSFLOW_BROKER_STORAGE": "memory",
    }
    drop_schema(base, schema)


def test_the_built_package_is_the_library_and_the_command_without_test_or_bench_tools(
    wheel: Path,
) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith("dist-info/METADATA")))
        scripts = archive.read(next(n for n in names if n.endswith("entry_points.txt")))
    packages = {name.split("/")[0] for name in names if not name.startswith("opsflow-")}
    assert packages == {"opsflow"}, "no reference application, tests or benches inside"
    assert {"opsflow/contracts/envelope.avsc", "opsflow/py.typed"} <= set(names)
    # The pages' shared templates and stylesheet, the inbox's pages and script (served by
    # the service: its CSP allows no other) and the sessions' table.
    assert {
        "opsflow/web/templates/base.html",
        "opsflow/web/templates/pages.css",
        "opsflow/nodes/human/templates/task.html",
        "opsflow/nodes/human/templates/inbox.js",
        "opsflow/migrations/0012_sessions.sql",
    } <= set(names)
    assert "opsflow = opsflow.cli:main" in scripts.decode()
    assert "opsflow.applications" not in scripts.decode(), "the library declares no workflow"
    required = [
        line.split(":", 1)[1].strip()
        for line in metadata.decode().splitlines()
        if line.startswith("Requires-Dist:") and "extra ==" not in line
    ]
    assert required and not [r for r in required if r.startswith(_TEST_AND_BENCH)], required


def test_a_team_runs_its_own_one_service_application_on_the_installed_package(
    venv: Path, team_env: dict[str, str]
) -> None:
    bin_ = venv / "bin"
    place = venv.parent
    where = _run([bin_ / "python", "-c", "import opsflow; print(opsflow.__file__)"], cwd=place)
    assert where.startswith(str(venv)), "opsflow comes from the wheel, not the repository"

    _run([bin_ / "opsflow", "new", "service", "greeter", "--dir", place], cwd=place)
    project = place / "greeter"
    _run([bin_ / "pip", "install", "-q", "--no-deps", project], cwd=place)
    # The team's own tests, the one on the broker (opsflow.testing) on the session's cluster.
    tested = _run(
        [bin_ / "python", "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=project,
        env={**team_env, "OPSFLOW_TOPIC_PREFIX": ""},
    )
    assert "3 passed" in tested, tested
    checked = _run([bin_ / "opsflow", "contracts", "check"], cwd=place, env=team_env)
    assert "2 event types" in checked

    # `opsflow up` against the session's cluster: provisions the team's topics and
    # schemas and runs its one program (and the projector's audit log).
    _run([bin_ / "opsflow", "up", "--detach"], cwd=place, env=team_env)
    try:
        request_id = f"r-{uuid.uuid4().hex[:8]}"
        _run([bin_ / "python", "-c", _SEND, request_id], cwd=place, env=team_env)
        trace = _traced(bin_, request_id, place, team_env)
        assert [e["event_type"] for e in trace["events"]] == [
            "greeter.requested",
            "greeter.greeted",
        ]
        assert trace["instance"] == "request" and trace["key"] == request_id
        assert trace["events"][1]["producer"] == "greeter"
        status = json.loads(_run([bin_ / "opsflow", "status", "--json"], cwd=place, env=team_env))
        assert "greeter" in {row["name"] for row in status["components"]}
        with psycopg.connect(team_env["DATABASE_URL"]) as conn:
            audited = conn.execute(
                "SELECT event_type FROM audit_log WHERE instance_key = %s ORDER BY seq",
                (request_id,),
            ).fetchall()
        assert sorted(row[0] for row in audited) == ["greeter.greeted", "greeter.requested"]
    finally:
        _run([bin_ / "opsflow", "down"], cwd=place, env=team_env)


_SEND = """
import sys
from opsflow.producer import Producer, body_model
from greeter.contracts import Requested

with Producer("team-shell") as producer:
    producer.send(body_model(Requested)(request_id=sys.argv[1], name="Ada"),
                  idempotency_key=sys.argv[1])
"""


def _traced(bin_: Path, request_id: str, cwd: Path, env: dict[str, str]) -> dict[str, object]:
    """The request's trace once the service answered it (within 60 s)."""
    deadline = time.monotonic() + 60
    while True:
        result = subprocess.run(
            [str(bin_ / "opsflow"), "trace", request_id, "--json"],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if result.returncode == 0:
            trace: dict[str, object] = json.loads(result.stdout)
            if len(trace["events"]) >= 2:  # type: ignore[arg-type]
                return trace
        assert time.monotonic() < deadline, f"never answered:\n{result.stdout}{result.stderr}"
        time.sleep(1)


@pytest.mark.parametrize("name", ["Greeter", "1st", "class", "broker", "a_b", "x" * 31])
def test_a_name_that_cannot_name_a_service_and_its_package_is_refused(
    name: str, tmp_path: Path
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "opsflow", "new", "service", name, "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert f"service name {name!r}" in result.stderr.replace("\n", "")
    assert not any(tmp_path.iterdir()), "nothing written"


def test_an_existing_folder_is_never_written_over(tmp_path: Path) -> None:
    (tmp_path / "greeter").mkdir()
    (tmp_path / "greeter" / "mine.txt").write_text("keep")
    result = subprocess.run(
        [sys.executable, "-m", "opsflow", "new", "service", "greeter", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0 and "exists already" in result.stderr
    assert [p.name for p in (tmp_path / "greeter").iterdir()] == ["mine.txt"]


def test_the_reference_applications_package_lists_every_subpackage_it_has() -> None:
    import tomllib

    declared = tomllib.loads((ROOT / "services" / "pyproject.toml").read_text())
    listed = set(declared["tool"]["setuptools"]["packages"])
    found = {
        ".".join(("services", *init.parent.relative_to(ROOT / "services").parts))
        for init in (ROOT / "services").rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    assert listed == found
