"""The order workflow, opsflow's reference application: what it carries and runs.

    order.received -> policy-check -> review (a person, SLA) -> dispatch (books a
    carrier) -> proof of delivery (pod-webhook, pod-capture)

Registered as the ``orders`` entry point of the ``opsflow.applications`` group
(``pyproject.toml``), which is how every ``opsflow`` command finds it.
"""

from __future__ import annotations

from pathlib import Path

from opsflow.application import Application, Gauge, Program
from services.contracts import EVENTS, TOPICS
from services.progress import summary, verdict
from services.readmodels import READ_MODELS

application = Application(
    name="orders",
    instance="order",
    topics=TOPICS,
    events=EVENTS,
    # The repository's schemas/ folder, beside this package.
    schemas=Path(__file__).resolve().parents[1] / "schemas",
    programs=(
        Program(
            "ingest",
            module="services.ingest",
            port_env="INGEST_PORT",
            url_env="INGEST_URL",
            # Every type an external producer may send has its route there.
            gateway_for=tuple(e.event_type for e in EVENTS if e.emitted_by.external),
        ),
        Program(
            "pod-webhook",
            module="services.pod_capture",
            port_env="POD_PORT",
            url_env="POD_CAPTURE_URL",
            off_path=True,
            gateway_for=("pod.captured", "pod.rejected"),
        ),
        # The review desk's API runs the worker that opens its tasks.
        Program(
            "review",
            module="services.review",
            service="services.review.service",
            port_env="REVIEW_PORT",
            url_env="REVIEW_URL",
        ),
        Program("policy-check", service="services.policy_check"),
        Program("pod-capture", service="services.pod_capture", off_path=True),
        Program(
            "carrier",
            module="services.carrier_sim",
            port_env="CARRIER_PORT",
            url_env="CARRIER_URL",
            stand_in=True,
            api_key_env="CARRIER_POD_API_KEY",
            env={
                "CARRIER_DB": "{program_dir}/bookings.db",
                "CARRIER_POD_WEBHOOK_URL": "{POD_CAPTURE_URL}/pods",
                # The demo's refused-destination orders go there.
                "CARRIER_REFUSED_COUNTRIES": "IS",
            },
        ),
        Program("dispatch", service="services.dispatch"),
    ),
    standing=verdict,
    summary=summary,
    read_models=READ_MODELS,
    migrations="services.migrations",
    commands=("services.demo.command:demo",),
    gauges=(
        Gauge("open reviews", "SELECT count(*) FROM review_queue WHERE status <> 'decided'"),
        Gauge(
            "reviews past their SLA",
            "SELECT count(*) FROM review_queue WHERE status <> 'decided' AND due_at < now()",
        ),
        Gauge(
            "SLA breaches, last 24 h",
            "SELECT count(*) FROM sla_breaches WHERE breached_at > now() - interval '1 day'",
        ),
    ),
)
