"""refund-check: judges every refund request by the versioned refund rules (a rules step).

The rules are data (``rules/<version>.yaml``) in the language of
``opsflow.nodes.rules``, compiled when this module is imported: a broken file
stops the service at start naming the file and line. Fields a rule may use:

- text: ``refund_id``, ``order_id``, ``customer_id``, ``currency``, ``note``,
  ``reason`` (DAMAGED, NOT_DELIVERED, WRONG_ITEM, CHANGED_MIND)
- number: ``amount_minor`` and ``charged_minor`` (money), ``days_since_purchase``
  (whole days from the purchase to the request's time: no clock is read)
- flag: ``currency_known`` (listed under ``currencies``)
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict

from opsflow.nodes.rules import Facts, Field, Kind, Outcomes, RuleSet, load_rules, norm, rules_file
from opsflow.runtime import Service
from services.refunds.contracts import (
    CHECKS,
    REQUESTS,
    CheckOutcome,
    Reason,
    RefundChecked,
    RefundReason,
    RefundRequested,
)

RULES_DIR = Path(__file__).with_name("rules")


def _days_since_purchase(request: RefundRequested) -> int:
    return (request.envelope.occurred_at - request.purchased_at).days


def _fields(currencies: frozenset[str]) -> Mapping[str, Field]:
    text, number = Kind.TEXT, Kind.NUMBER
    return {
        "refund_id": Field(text, lambda r: r.refund_id),
        "order_id": Field(text, lambda r: r.order_id),
        "customer_id": Field(text, lambda r: r.customer_id),
        "currency": Field(text, lambda r: r.currency),
        "note": Field(text, lambda r: r.note),
        "reason": Field(text, lambda r: r.reason, symbols=tuple(RefundReason)),
        "amount_minor": Field(number, lambda r: r.amount_minor, money=True),
        "charged_minor": Field(number, lambda r: r.charged_minor, money=True),
        "days_since_purchase": Field(number, _days_since_purchase),
        "currency_known": Field(Kind.FLAG, lambda r: norm(r.currency) in currencies),
    }


FACTS = Facts(_fields, currency=lambda r: r.currency, doc="services/refunds/check.py")
OUTCOMES = Outcomes(
    ranked=(CheckOutcome.REJECTED, CheckOutcome.NEEDS_APPROVAL),
    default=CheckOutcome.AUTO_APPROVED,
)


class CheckSettings(BaseSettings):
    """``REFUND_RULES_VERSION``: the rules file to judge with; unset, the newest."""

    model_config = SettingsConfigDict(env_prefix="REFUND_", extra="ignore")

    rules_version: str | None = None


RULES: RuleSet = load_rules(
    rules_file(CheckSettings().rules_version, RULES_DIR, "REFUND_RULES_VERSION"), FACTS, OUTCOMES
)

service = Service("refund-check", consumes=[REQUESTS], produces=[CHECKS])


@service.handler
def check(request: RefundRequested) -> RefundChecked:
    """One ``refund.checked`` per request, carrying what the payout needs."""
    verdict = RULES.evaluate(request)
    return RefundChecked(  # type: ignore[call-arg]
        refund_id=request.refund_id,
        outcome=CheckOutcome(verdict.outcome),
        reason_codes=verdict.reason_codes,
        reasons=[Reason(code=r.code, message=r.message) for r in verdict.reasons],
        rules_version=RULES.version,
        customer_id=request.customer_id,
        amount_minor=request.amount_minor,
        currency=request.currency,
    )
