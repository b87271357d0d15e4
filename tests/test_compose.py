"""docker-compose.yml describes the production stack; Docker cannot run here, so it is parsed.

Every opsflow process in it must get each variable its settings read without
a usable default (a None default means "start the embedded one", which a
container cannot do), and every program the application declares must run in
it as ``opsflow up`` runs it.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import yaml
from pydantic_settings import BaseSettings

from opsflow.application import load_application

ROOT = Path(__file__).resolve().parents[1]


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
        program = load_application().program(name)
        if program is not None and program.stand_in:
            continue  # the stand-in of an external partner: no opsflow settings
        missing = needed - set(svc["environment"])
        assert not missing, f"{name} reads {sorted(missing)} but compose does not set them"
