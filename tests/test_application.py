"""An application declares its programs once; the stack, status and replay read that.

The reference (order) application is found through its installed entry point;
``OPSFLOW_APP`` names another, here a small one written in the test's own
directory, as a team's package outside this repository would be.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from opsflow import trace
from opsflow.application import Application, Program, load_application
from opsflow.errors import ConfigurationError
from opsflow.replay import target_of
from opsflow.settings import StackSettings
from opsflow.stack.components import OFF_PATH_NICE, plan_stack
from tests.support.samples import sample

TINY = """
from opsflow.application import Application, Program

application = Application(
    name="tiny",
    programs=(
        Program("greeter", module="tiny_greeter", port_env="GREETER_PORT", url_env="GREETER_URL"),
        Program("echo", service="tiny_echo:service", off_path=True),
        Program(
            "partner",
            module="tiny_partner",
            port_env="PARTNER_PORT",
            url_env="PARTNER_URL",
            stand_in=True,
            api_key_env="PARTNER_KEY",
            env={"PARTNER_DB": "{program_dir}/db.sqlite", "PARTNER_HOOK": "{GREETER_URL}/hook"},
        ),
    ),
)
not_an_application = 42


def say_hello(name: str = "world") -> None:
    '''Greets.'''
    print(f"hello {name}")


with_commands = Application(
    name="tiny-cli",
    programs=(Program("echo", service="tiny_echo:service"),),
    commands=("tiny_app:say_hello",),
)
"""


@pytest.fixture
def tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The tiny application importable as ``tiny_app`` and chosen through OPSFLOW_APP."""
    (tmp_path / "tiny_app.py").write_text(textwrap.dedent(TINY))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("OPSFLOW_APP", "tiny_app:application")
    for variable in ("PARTNER_URL", "PARTNER_DB", "KAFKA_BOOTSTRAP_SERVERS"):
        monkeypatch.delenv(variable, raising=False)
    yield tmp_path
    sys.modules.pop("tiny_app", None)


def test_the_reference_application_is_found_through_its_installed_entry_point(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OPSFLOW_APP", raising=False)
    both = load_application()
    assert [part.name for part in both.parts] == ["orders", "refunds"], "every one installed"
    monkeypatch.setenv("OPSFLOW_APP", "orders")
    app = load_application()
    assert app.name == "orders" and not app.parts
    assert app.services == {
        "review": "services.review.service",
        "policy-check": "services.policy_check",
        "pod-capture": "services.pod_capture",
        "dispatch": "services.dispatch",
    }
    carrier = app.program("carrier")
    assert carrier is not None and carrier.stand_in and carrier.url_env == "CARRIER_URL"


def test_the_stack_runs_the_programs_the_application_declares(tiny: Path) -> None:
    plan = plan_stack(StackSettings(data_dir=tiny / "data"))
    programs = {c.name: c for c in plan.components if c.module}
    # Then the library's own programs: the projector and the operator console.
    assert list(programs) == ["greeter", "echo", "partner", "projector", "console"]
    greeter, echo, partner = programs["greeter"], programs["echo"], programs["partner"]
    assert greeter.module == ("tiny_greeter",)
    assert greeter.env["GREETER_PORT"] == str(greeter.port)
    assert plan.env["GREETER_URL"] == greeter.address
    # A stream service is run by the runtime and answers /healthz on its metrics port.
    assert echo.module == ("opsflow.runtime", "tiny_echo:service")
    assert echo.env["OPSFLOW_METRICS_PORT"] == str(echo.port)
    assert echo.nice == OFF_PATH_NICE and greeter.nice == 0
    # Settings name other programs' addresses and a directory of its own.
    assert partner.env["PARTNER_HOOK"] == f"{greeter.address}/hook"
    assert partner.env["PARTNER_DB"] == str(tiny / "data" / "partner" / "db.sqlite")
    assert (tiny / "data" / "partner").is_dir()
    assert partner.api_key_env == "PARTNER_KEY"
    assert programs["projector"].module == ("opsflow.projector",)


def test_a_stand_in_is_not_started_when_its_partner_is_configured(
    tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PARTNER_URL", "https://partner.example/api")
    monkeypatch.setenv("PARTNER_DB", "/srv/partner.db")  # a variable that is set wins
    plan = plan_stack(StackSettings(data_dir=tiny / "data"))
    assert plan.component("partner") is None
    assert plan.external["partner"] == plan.env["PARTNER_URL"] == "https://partner.example/api"


def test_replay_drives_the_services_and_read_models_of_the_application_in_use(tiny: Path) -> None:
    with pytest.raises(ConfigurationError) as refused:
        target_of("ech")
    said = str(refused.value)
    assert "did you mean 'echo'" in said
    assert "greeter" not in said  # an HTTP program consumes nothing
    # Its read models: none of its own, the audit log every application has.
    assert "audit_log" in said and "orders_current" not in said


@pytest.mark.parametrize(
    ("target", "says"),
    [
        ("tiny_missing_module:application", "where nothing is found"),
        ("tiny_app:not_an_application", "found int, wanted Application"),
    ],
)
def test_opsflow_app_naming_no_application_is_refused_with_the_reason(
    tiny: Path, monkeypatch: pytest.MonkeyPatch, target: str, says: str
) -> None:
    monkeypatch.setenv("OPSFLOW_APP", target)
    with pytest.raises(ConfigurationError) as refused:
        load_application()
    assert "OPSFLOW_APP" in str(refused.value) and says in str(refused.value)


@pytest.mark.parametrize(
    ("declare", "says"),
    [
        (lambda: Program("idle"), "runs nothing"),
        (lambda: Program("broker", service="x"), "stack's own components"),
        (lambda: Program("Bad_Name", service="x"), "not a valid program name"),
        (lambda: Program("web", service="x", port_env="WEB_PORT"), "no module"),
        (lambda: Program("web", module="x", url_env="WEB_URL"), "no port"),
        (lambda: Program("web", module="x", env={"lower": "1"}), "names the variable"),
        (
            lambda: Application("twice", (Program("a", service="x"), Program("a", service="y"))),
            "twice",
        ),
    ],
)
def test_a_declaration_that_cannot_run_is_refused_naming_what_is_wrong(
    declare: object, says: str
) -> None:
    with pytest.raises(ConfigurationError) as refused:
        declare()  # type: ignore[operator]
    assert says in str(refused.value)


def test_trace_says_where_an_instance_stands_by_the_applications_rules_else_its_last_event() -> (
    None
):
    order = sample("order.received")
    records = [trace.Record("orders", 0, 0, order)]
    now = order.envelope.occurred_at
    reference = trace.assemble(order.order_id, records, now)  # the installed application's
    assert reference.verdict.state == "received"
    assert "waiting for the policy check" in reference.verdict.now
    assert reference.summaries[str(order.envelope.event_id)].startswith(order.customer_name)

    bare = Application("bare", (Program("echo", service="tiny_echo:service"),))
    plain = trace.assemble(order.order_id, records, now, application=bare)
    assert plain.verdict.state == "order.received" and not plain.verdict.terminal
    assert plain.verdict.now.startswith("last: order.received at ")
    assert plain.summaries == {str(order.envelope.event_id): ""}


def test_an_applications_commands_join_opsflows_own_and_opsflow_works_without_one(
    tiny: Path,
) -> None:
    env = {**os.environ, "PYTHONPATH": str(tiny), "OPSFLOW_APP": "tiny_app:with_commands"}
    ran = subprocess.run(
        [sys.executable, "-m", "opsflow", "say-hello", "--name", "team"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == "hello team\n"
    env["OPSFLOW_APP"] = "tiny_missing_module:application"
    listed = subprocess.run(
        [sys.executable, "-m", "opsflow", "--help"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert listed.returncode == 0 and "status" in listed.stdout and "demo" not in listed.stdout


def test_both_installed_applications_run_as_one_combination_each_part_read_by_its_own_rules(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from datetime import UTC, datetime

    from opsflow.contracts import catalogue, check_evolution
    from opsflow.db import migration_files
    from services.refunds.contracts import RefundRequested

    monkeypatch.delenv("OPSFLOW_APP", raising=False)
    both = load_application()
    orders, refunds = both.parts
    assert load_application("orders,refunds") is both, "one combination per set of parts"
    assert [p.name for p in both.programs] == [
        *(p.name for p in orders.programs),
        *(p.name for p in refunds.programs),
    ]
    assert both.part_for("refund-payouts") is refunds and both.part_for("orders") is orders
    assert set(catalogue()) == set(orders.models) | set(refunds.models)
    assert check_evolution() == []
    owners = [(m.owner, m.version) for m in migration_files()]
    assert ("orders", 3) in owners and ("refunds", 1) in owners

    # trace reads an instance by the rules of the part its events belong to.
    request = RefundRequested(
        envelope=RefundRequested.envelope_for(key="rf-1", idempotency_key="rf-1", producer="t"),
        refund_id="rf-1",
        order_id="o-1",
        customer_id="c-1",
        amount_minor=1500,
        currency="EUR",
        charged_minor=5000,
        reason="DAMAGED",
        purchased_at=datetime.now(UTC),
    )
    refund = trace.assemble(
        "rf-1", [trace.Record("refund-requests", 0, 0, request)], datetime.now(UTC)
    )
    assert (refund.instance, refund.verdict.state) == ("refund", "requested")
    order = sample("order.received")
    ordered = trace.assemble(
        order.order_id, [trace.Record("orders", 0, 0, order)], order.envelope.occurred_at
    )
    assert (ordered.instance, ordered.verdict.state) == ("order", "received")


def test_applications_that_cannot_run_together_are_refused_naming_the_clash() -> None:
    from opsflow.application import combine

    one = Application("one", (Program("echo", service="a:service"),))
    two = Application("two", (Program("echo", service="b:service"),))
    with pytest.raises(ConfigurationError, match="declares the program 'echo' twice"):
        combine([one, two])
    assert combine([one, one]) is one
