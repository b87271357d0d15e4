"""The review step as opsflow's human task (``opsflow.nodes.human``): its events, its people.

Orders the policy check could not approve wait here for a reviewer, under the
SLAs of ``sla.yaml``; past them they go to supervisors. A task's page shows the
order as the read models have it (``facts``). ``python -m
services.review`` serves it.
"""

from __future__ import annotations

from pathlib import Path

from pydantic_settings import SettingsConfigDict

from opsflow.nodes.human import HumanTask, HumanTaskSettings, TaskEvents
from services.contracts import (
    Actor,
    ActorRole,
    ReviewClaimed,
    ReviewDecided,
    ReviewDecision,
    ReviewEscalated,
    ReviewReleased,
    ReviewRequested,
    ReviewSlaBreached,
    ReviewTier,
)
from services.review.facts import order_facts


class ReviewSettings(HumanTaskSettings):
    """``REVIEW_*`` variables (see ``HumanTaskSettings``); the SLAs are ``sla.yaml`` here."""

    model_config = SettingsConfigDict(env_prefix="REVIEW_", extra="ignore")

    sla_file: Path = Path(__file__).with_name("sla.yaml")


REVIEW = HumanTask(
    name="review",
    subject="order",
    events=TaskEvents(
        requested=ReviewRequested,
        claimed=ReviewClaimed,
        released=ReviewReleased,
        decided=ReviewDecided,
        escalated=ReviewEscalated,
        breached=ReviewSlaBreached,
    ),
    actor=Actor,
    tiers=ReviewTier,
    roles=ActorRole,
    decisions=ReviewDecision,
    opener="services.review.service:service",
    settings=ReviewSettings,
    # The order, its history and its customer's, from the read models (see facts.py).
    facts=order_facts,
)
