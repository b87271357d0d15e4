"""opsflow.testing, the pytest plugin teams test their applications with, on real parts.

Here its fixtures run the reference application's policy check in this process
against the session's broker: an order published with the SDK comes back as
its ``policy.checked``, in a topic prefix and a database schema of the test's
own, with the runtime's envelopes and lineage.
"""

from __future__ import annotations

import json
import os

import psycopg
import pytest

from opsflow.producer import body_model
from opsflow.testing import Env
from services.contracts import OrderReceived, PolicyChecked, PolicyOutcome
from services.policy_check import service
from tests.support.samples import sample


def test_a_service_runs_in_the_test_process_and_its_output_is_waited_for(
    opsflow_env: Env,
) -> None:
    order = sample("order.received")
    body = body_model(OrderReceived).model_validate(
        {name: getattr(order, name) for name in OrderReceived.model_fields if name != "envelope"}
    )
    with opsflow_env.running(service):
        opsflow_env.publish(body, idempotency_key="kit-1")
        [checked] = opsflow_env.wait_for(
            PolicyChecked, where=lambda e: e.order_id == order.order_id
        )
    assert checked.outcome in set(PolicyOutcome)
    assert checked.envelope.producer == "policy-check"
    assert checked.envelope.correlation_id == order.order_id


def test_each_test_gets_its_own_prefix_and_a_migrated_schema_of_its_own(
    opsflow_env: Env,
) -> None:
    assert opsflow_env.prefix.startswith("t") and opsflow_env.prefix.endswith(".")
    with psycopg.connect(opsflow_env.database_url) as conn:
        tables = {
            row[0]
            for row in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
            )
        }
    assert {"audit_log", "orders_current", "opsflow_migrations"} <= tables


def test_waiting_for_what_never_comes_says_how_much_came(opsflow_env: Env) -> None:
    with pytest.raises(TimeoutError, match=r"0 of 1 policy\.checked events"):
        opsflow_env.wait_for(PolicyChecked, timeout=0.5)


def test_an_opsflow_command_runs_in_the_test_process_on_the_tests_own_topics(
    opsflow_env: Env,
) -> None:
    order = sample("order.received")
    opsflow_env.publish(order)
    before = dict(os.environ)
    planned = opsflow_env.command(
        "replay", "orders", "--into", "policy-check", "--dry-run", "--json"
    )
    assert planned.returncode == 0, planned.stderr
    report = json.loads(planned.stdout)
    assert report["events"] == {"order.received": 1} and report["instances"] == [order.order_id]

    typo = opsflow_env.command("replay", "orders", "--into", "policy-chek")
    assert typo.returncode == 2 and "did you mean 'policy-check'" in typo.stderr
    assert dict(os.environ) == before, "a command leaves the environment as it found it"
