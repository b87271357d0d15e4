"""policy-check: judges every received order against the versioned policy rules.

The rules are data (``rules/<version>.yaml``, interpreted by ``rules``). They
are loaded and compiled when this module is imported, so a broken rules file
or an unknown ``POLICY_RULES_VERSION`` stops the service at start with one
line naming the file and line, instead of dead-lettering every order.
"""

from __future__ import annotations

from pydantic_settings import BaseSettings, SettingsConfigDict

from opsflow.runtime import Service
from services.contracts import (
    ORDERS,
    POLICY_CHECK,
    OrderReceived,
    PolicyChecked,
    PolicyOutcome,
    Reason,
)
from services.policy_check.rules import RuleSet, load_rules, rules_file


class PolicySettings(BaseSettings):
    """Configuration of the policy-check service.

    ``POLICY_RULES_VERSION``: which ``rules/<version>.yaml`` to judge with;
    unset, the newest (versions sort naturally: v10 after v9). Pinning it lets
    a new rules file be deployed before it is switched on.
    """

    model_config = SettingsConfigDict(env_prefix="POLICY_", extra="ignore")

    rules_version: str | None = None


RULES: RuleSet = load_rules(rules_file(PolicySettings().rules_version))
"""The rules in force, compiled once; judging an order only calls them."""

service = Service("policy-check", consumes=[ORDERS], produces=[POLICY_CHECK])


@service.handler
def check(order: OrderReceived) -> PolicyChecked:
    """One ``policy.checked`` per order; its envelope is derived from the order's."""
    verdict = RULES.evaluate(order)
    # No envelope argument: the runtime's lineage derives it from the order's, a
    # model validator mypy cannot see.
    return PolicyChecked(  # type: ignore[call-arg]
        order_id=order.order_id,
        outcome=PolicyOutcome(verdict.outcome),
        reason_codes=verdict.reason_codes,
        reasons=[Reason(code=r.code, message=r.message) for r in verdict.reasons],
        rules_version=RULES.version,
        destination=order.destination,
    )
