"""docker-compose.yml describes the production stack; Docker cannot run here, so it is parsed.

The file must be valid against the Compose specification's JSON schema
(vendored in ``tests/schemas/``: no network). Every opsflow process in it must
get each variable its settings read without a usable default (a None default
means "start the embedded one", which a container cannot do), and every program
the application declares must run in it as ``opsflow up`` runs it. Each further
test names a mistake the stack once made, or could make, so that none comes
back: state that ``docker compose down`` loses, a registry laxer than the
contracts, a process nobody checks, services that write schemas, an image that
carries build tools or runs as root, a build context full of local state.
"""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import dockerfile
import jsonschema
import pytest
import yaml
from docker.utils.build import PatternMatcher, exclude_paths
from pydantic import TypeAdapter
from pydantic_settings import BaseSettings

from opsflow.application import load_application
from opsflow.console import ConsoleSettings
from opsflow.contracts import REPLAY_LEVEL
from opsflow.runtime.observability import Health, Metrics, serve
from opsflow.settings import RegistrySettings, RuntimeSettings
from opsflow.stack.components import CONSOLE

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def _variable(settings: type[BaseSettings], field: str) -> str:
    prefix = settings.model_config.get("env_prefix", "")
    return f"{prefix}{field}".upper()


def _variables_without_default(settings: tuple[type[BaseSettings], ...]) -> set[str]:
    return {
        _variable(cls, name)
        for cls in settings
        for name, info in cls.model_fields.items()
        if info.is_required() or info.default is None
    }


def _opsflow_processes() -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in _compose()["services"].items() if "build" in svc}


def _long_running() -> dict[str, dict[str, Any]]:
    """The opsflow processes but the one-shot provisioning job."""
    return {name: svc for name, svc in _opsflow_processes().items() if name != "provision"}


def _port_variable(name: str) -> str:
    """The variable of the port a process serves ``/healthz`` and ``/readyz`` on: an
    HTTP program's own (the application's, or the operator console's), else the
    metrics port of a runtime service and the projector."""
    program = load_application().program(name)
    if program is not None and program.port_env:
        return program.port_env
    if name == CONSOLE:
        return _variable(ConsoleSettings, "port")
    return _variable(RuntimeSettings, "metrics_port")


def _reads_opsflow_settings(name: str) -> bool:
    """All but the stand-in of an external partner, which reads no opsflow settings."""
    program = load_application().program(name)
    return program is None or not program.stand_in


def test_compose_runs_apache_kafka_in_kraft_mode_postgres_and_a_schema_registry() -> None:
    services = _compose()["services"]
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert "controller" in services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"]
    assert services["postgres"]["image"].startswith("postgres:")
    assert "schema-registry" in services["schema-registry"]["image"]


def test_every_program_of_the_application_runs_in_compose_as_the_stack_runs_it() -> None:
    processes = _opsflow_processes()
    programs = load_application().programs
    assert programs
    for program in programs:
        assert program.name in processes, f"{program.name} is not in docker-compose.yml"
        assert tuple(processes[program.name]["command"]) == program.command
    assert processes["projector"]["command"] == ["opsflow.projector"]
    # The library's own programs run as `opsflow up` runs them.
    assert processes[CONSOLE]["command"] == ["opsflow.console"]
    for svc in processes.values():
        dockerfile = ROOT / svc["build"]["context"] / svc["build"]["dockerfile"]
        assert dockerfile.parent == ROOT / "deploy" and dockerfile.exists()


def test_every_variable_an_opsflow_process_reads_is_set_in_compose() -> None:
    processes = _opsflow_processes()
    assert processes, "compose runs at least the provisioning job"
    provision = importlib.import_module(processes["provision"]["command"][0])
    needed = _variables_without_default(provision.SETTINGS)
    assert {"KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL", "SCHEMA_REGISTRY_URL"} <= needed
    for name, svc in processes.items():
        if not _reads_opsflow_settings(name):
            continue
        missing = needed - set(svc["environment"])
        assert not missing, f"{name} reads {sorted(missing)} but compose does not set them"


def test_the_compose_file_follows_the_compose_specifications_schema() -> None:
    schema = json.loads((ROOT / "tests" / "schemas" / "compose-spec.json").read_text())
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    validator = validator_class(schema)
    errors = [
        f"{error.json_path}: {error.message[:300]}" for error in validator.iter_errors(_compose())
    ]
    assert not errors, "\n".join(errors)
    # The schema is read, not waved through: a condition Compose does not know fails.
    broken = _compose()
    broken["services"]["ingest"]["depends_on"]["provision"]["condition"] = "service_completed"
    rejected = [error.json_path for error in validator.iter_errors(broken)]
    assert "$.services.ingest.depends_on" in rejected, rejected


def _named_volume_mounts(service: dict[str, Any]) -> dict[PurePosixPath, str]:
    """Where each named volume is mounted in ``service``: target path -> volume."""
    mounts: dict[PurePosixPath, str] = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, _, rest = volume.partition(":")
            target = rest.partition(":")[0]
        else:
            source, target = volume.get("source", ""), volume["target"]
        if source and not source.startswith((".", "/", "~")):
            mounts[PurePosixPath(target)] = source
    return mounts


@pytest.mark.parametrize(
    ("service", "variable", "image_default"),
    [
        # The apache/kafka image writes its log to /tmp/kraft-combined-logs unless
        # KAFKA_LOG_DIRS says otherwise: inside the container, gone on `down`.
        ("kafka", "KAFKA_LOG_DIRS", None),
        ("postgres", "PGDATA", "/var/lib/postgresql/data"),
    ],
)
def test_kafkas_log_and_postgres_data_are_on_named_volumes_so_down_keeps_the_history(
    service: str, variable: str, image_default: str | None
) -> None:
    compose = _compose()
    svc = compose["services"][service]
    data_dirs = svc["environment"].get(variable, image_default)
    assert data_dirs, f"{service} must set {variable}: the image's default is not on a volume"
    mounts = _named_volume_mounts(svc)
    for data_dir in map(PurePosixPath, data_dirs.split(",")):
        volume = next((v for t, v in mounts.items() if data_dir.is_relative_to(t)), None)
        assert volume is not None, f"{service}'s {data_dir} is not on a named volume"
        assert volume in compose["volumes"], f"volume {volume} is not declared"


def test_the_registry_enforces_the_contracts_compatibility_level() -> None:
    registry = _compose()["services"]["schema-registry"]
    level = registry["environment"]["SCHEMA_REGISTRY_SCHEMA_COMPATIBILITY_LEVEL"]
    assert level.upper() == REPLAY_LEVEL.value


def _probe_exit_status(test: list[str], url: str) -> int:
    """Run a healthcheck's command here, against ``url`` instead of its own."""
    assert test[0] == "CMD" and test[1] == "python", test
    command = [sys.executable, *test[2:-1], url]
    return subprocess.run(command, capture_output=True, timeout=30).returncode


def test_every_opsflow_process_has_a_readyz_healthcheck_on_the_port_it_serves() -> None:
    processes = _long_running()
    assert processes
    for name, svc in processes.items():
        program = load_application().program(name)
        # HTTP programs answer on their own port, the others on the metrics port.
        port = svc["environment"].get(_port_variable(name))
        assert port, f"{name} serves no health endpoint compose knows the port of"
        # The carrier stand-in answers /healthz only (like under `opsflow up`).
        path = "/healthz" if program is not None and program.stand_in else "/readyz"
        test = svc.get("healthcheck", {}).get("test")
        assert test, f"{name} has no healthcheck"
        assert test[-1] == f"http://localhost:{port}{path}", f"{name} probes {test[-1]}"
    probes = {tuple(svc["healthcheck"]["test"][:-1]) for svc in processes.values()}
    assert len(probes) == 1, "every process is probed the same way"

    # The probe can fail: run it against a runtime service's own health server.
    health = Health()
    server = serve(Metrics("probe"), health, host="127.0.0.1", port=0)
    try:
        url = f"http://localhost:{server.server_address[1]}/readyz"
        test = next(iter(processes.values()))["healthcheck"]["test"]
        assert _probe_exit_status(test, url) != 0, "a service that has not joined is not ready"
        health.joined = True
        assert _probe_exit_status(test, url) == 0
    finally:
        server.shutdown()
        server.server_close()


def test_services_do_not_auto_register_schemas_only_provisioning_does() -> None:
    variable = _variable(RegistrySettings, "schema_registry_auto_register")
    processes = _long_running()
    for name, svc in processes.items():
        if not _reads_opsflow_settings(name):
            continue
        value = svc["environment"].get(variable)
        assert value is not None, f"{name} does not set {variable}"
        assert TypeAdapter(bool).validate_python(value) is False, f"{name} auto-registers"
        # Reading only, a service needs provisioning to have registered its schemas first.
        assert svc["depends_on"]["provision"]["condition"] == "service_completed_successfully"
    provision = _opsflow_processes()["provision"]
    services = _compose()["services"]
    for component in ("kafka", "postgres", "schema-registry"):
        assert provision["depends_on"][component]["condition"] == "service_healthy"
        assert services[component]["healthcheck"]["test"], f"{component} has no healthcheck"


def _stages() -> list[tuple[str, str | None, list[dockerfile.Command]]]:
    """The Dockerfile's stages: base image (global ARGs filled in), name, instructions."""
    commands = dockerfile.parse_file(str(DOCKERFILE))
    args: dict[str, str] = {}
    stages: list[tuple[str, str | None, list[dockerfile.Command]]] = []
    for command in commands:
        if command.cmd == "ARG" and not stages:
            name, _, default = command.value[0].partition("=")
            args[name] = default
        elif command.cmd == "FROM":
            base = re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], command.value[0])
            name = command.value[2] if len(command.value) > 2 else None
            stages.append((base, name, []))
        elif stages:
            stages[-1][2].append(command)
    return stages


def test_the_image_is_multi_stage_pinned_non_root_and_carries_no_build_or_test_tools() -> None:
    stages = _stages()
    assert len(stages) >= 2, "wheels are built in a stage of their own"
    for base, _, _ in stages:
        # An exact release (python:3.12.12-slim-bookworm) or a digest; never 3.12-slim.
        pinned = re.search(r"@sha256:[0-9a-f]{64}$|:\d+\.\d+\.\d+[^:/@]*$", base)
        assert pinned, f"base image {base} is not pinned to an exact version or digest"
    builder = {name for _, name, _ in stages[:-1]}
    final = stages[-1][2]
    runs = [" ".join((*c.flags, *c.value)) for c in final if c.cmd == "RUN"]
    for run in runs:
        assert not re.search(r"apt-get install|build-essential|\bgcc\b", run), run
        assert not re.search(r"\[(dev|testing)\]|pytest", run), run
    installs = [run for run in runs if "pip install" in run]
    assert installs and all("--no-index" in run for run in installs), "wheels from the build only"
    assert any(f"from={name}" in run for run in installs for name in builder)
    users = [c.value[0] for c in final if c.cmd == "USER"]
    assert users, "the image runs as root"
    assert users[-1].partition(":")[0] not in {"root", "0"}, f"USER {users[-1]} is root"
    starts = [i for i, c in enumerate(final) if c.cmd in {"ENTRYPOINT", "CMD"}]
    last_user = max(i for i, c in enumerate(final) if c.cmd == "USER")
    assert starts and last_user < min(starts)


def test_the_build_context_ignores_local_state_but_keeps_what_the_image_copies() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    ignored = PatternMatcher(patterns)
    local_state = [
        ".git/HEAD",
        ".venv/bin/python",
        ".opsflow/run/provisioned",
        ".env",
        "tests/bench/results/run.json",
        "tests/artifacts/trace.txt",
        ".pytest_cache/v/cache/nodeids",
        ".mypy_cache/3.11/opsflow.json",
        ".ruff_cache/CACHEDIR.TAG",
        "build/lib/opsflow/__init__.py",
        "shared/opsflow/__pycache__/cli.cpython-311.pyc",
        "shared/opsflow.egg-info/PKG-INFO",
        "services/.opsflow/run/provisioned",
        "services/build/lib/services/__init__.py",
    ]
    leaked = [path for path in local_state if not ignored.matches(path)]
    assert not leaked, f"in the build context: {leaked}"
    # The context as the Docker SDK walks this checkout with those rules: whatever the
    # image copies is in it, every source file of it (a pattern too broad loses one).
    context = exclude_paths(str(ROOT), list(patterns), dockerfile="deploy/Dockerfile")
    sources = [
        source
        for _, _, commands in _stages()
        for c in commands
        if c.cmd == "COPY" and not any(f.startswith("--from") for f in c.flags)
        for source in c.value[:-1]
    ]
    assert sources
    missing = [source for source in sources if source.rstrip("/") not in context]
    assert not missing, f"the image copies {missing}, which the context leaves out"
    source_files = {
        path.relative_to(ROOT).as_posix()
        for source in sources
        for path in [ROOT / source, *(ROOT / source).rglob("*")]
        if path.is_file()
        and path.suffix in {".py", ".toml", ".md", ".sql", ".yaml", ".avsc", ".html"}
        and not {"__pycache__", "build"} & set(path.parts)
        and not any(part.startswith(".") for part in path.relative_to(ROOT).parts)
    }
    lost = sorted(source_files - context)
    assert not lost, f"left out of the build context: {lost[:10]}"
