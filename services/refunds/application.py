"""The refund workflow: what it carries and what ``opsflow up`` runs for it.

Registered as the ``refunds`` entry point of the ``opsflow.applications``
group (``services/pyproject.toml``); ``OPSFLOW_APP=refunds`` picks it alone.
"""

from __future__ import annotations

from pathlib import Path

from opsflow.application import Application, Gauge, Program
from services.refunds.contracts import EVENTS, TOPICS
from services.refunds.progress import summary, verdict
from services.refunds.readmodel import projection

application = Application(
    name="refunds",
    instance="refund",
    topics=TOPICS,
    events=EVENTS,
    schemas=Path(__file__).resolve().parent / "schemas",
    programs=(
        Program("refund-check", service="services.refunds.check:service"),
        Program(
            "refund-approval",
            module="services.refunds.approval",
            service="services.refunds.approval:service",
            port_env="REFUND_APPROVAL_PORT",
            url_env="REFUND_APPROVAL_URL",
        ),
        Program(
            "payments",
            module="services.refunds.payments_sim",
            port_env="PAYMENTS_PORT",
            url_env="PAYMENTS_URL",
            stand_in=True,
            env={"PAYMENTS_DB": "{program_dir}/payouts.db"},
        ),
        Program("refund-payout", service="services.refunds.payout:service"),
    ),
    standing=verdict,
    summary=summary,
    read_models=(projection,),
    migrations="services.refunds.migrations",
    gauges=(
        Gauge(
            "refunds awaiting approval",
            "SELECT count(*) FROM refunds_current WHERE state = 'awaiting_approval'",
        ),
        Gauge(
            "refund payouts failed",
            "SELECT count(*) FROM refunds_current WHERE state = 'payout_failed'",
        ),
    ),
)
