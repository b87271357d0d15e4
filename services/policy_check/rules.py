"""The policy check's rules: what they may test about an order, and what they decide.

The rules are data (``rules/<version>.yaml``) in the language of
``opsflow.nodes.rules``; this module names the order's fields and the three
outcomes. Outcome: any matching REJECTED rule rejects the order, otherwise any
matching NEEDS_REVIEW rule sends it to review, otherwise it is AUTO_APPROVED
(a rejected order does not list review reasons: no one will review it).

Fields, usable in conditions and as message placeholders:

- text: ``order_id``, ``customer_id``, ``customer_name``, ``customer_risk_tier``
  (LOW, MEDIUM, HIGH), ``currency``, ``destination.name``, ``destination.street``,
  ``destination.city``, ``destination.postal_code``, ``destination.country``,
  ``notes``, ``sales_channel``
- number: ``amount_minor`` (money), ``items_total_minor`` (money: the sum of
  quantity x unit_price_minor over the items), ``item_count``
- flag: ``currency_known`` (the currency is listed under ``currencies``)
- list: ``items``, ``blank_address_fields`` (names of the blank destination
  fields, e.g. ``street, city``)

Money fields are compared per currency (``{per_currency: {EUR: 1_000_00, ...}}``,
which must list every declared currency) and shown with ``{field:money}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from opsflow.nodes.rules import Facts, Field, Getter, Kind, Outcomes, RuleSet, is_blank, norm
from opsflow.nodes.rules import load_rules as load
from opsflow.nodes.rules import rules_file as find
from services.contracts import CustomerRiskTier, OrderReceived, PolicyOutcome

RULES_DIR = Path(__file__).parent / "rules"
"""Where the versioned rules files live: ``<version>.yaml``."""

VERSION_VARIABLE = "POLICY_RULES_VERSION"

_ADDRESS_FIELDS = ("name", "street", "city", "postal_code", "country")


def _items_total(order: OrderReceived) -> int:
    return sum(item.quantity * item.unit_price_minor for item in order.items)


def _blank_address_fields(order: OrderReceived) -> list[str]:
    address = order.destination
    return [name for name in _ADDRESS_FIELDS if is_blank(getattr(address, name))]


def _destination(name: str) -> Getter:
    return lambda order: getattr(order.destination, name)


def _fields(currencies: frozenset[str]) -> Mapping[str, Field]:
    """Every field a rule may use; ``currency_known`` depends on the file's currencies."""
    text, number = Kind.TEXT, Kind.NUMBER
    return {
        "order_id": Field(text, lambda o: o.order_id),
        "customer_id": Field(text, lambda o: o.customer_id),
        "customer_name": Field(text, lambda o: o.customer_name),
        "customer_risk_tier": Field(
            text, lambda o: o.customer_risk_tier, symbols=tuple(CustomerRiskTier)
        ),
        "amount_minor": Field(number, lambda o: o.amount_minor, money=True),
        "currency": Field(text, lambda o: o.currency),
        "currency_known": Field(Kind.FLAG, lambda o: norm(o.currency) in currencies),
        **{f"destination.{name}": Field(text, _destination(name)) for name in _ADDRESS_FIELDS},
        "notes": Field(text, lambda o: o.notes),
        "sales_channel": Field(text, lambda o: o.sales_channel),
        "items": Field(Kind.LIST, lambda o: o.items, show_instead="item_count"),
        "item_count": Field(number, lambda o: len(o.items)),
        "items_total_minor": Field(number, _items_total, money=True),
        "blank_address_fields": Field(Kind.LIST, _blank_address_fields),
    }


FACTS = Facts(_fields, currency=lambda o: o.currency, doc="services/policy_check/rules.py")
OUTCOMES = Outcomes(
    ranked=(PolicyOutcome.REJECTED, PolicyOutcome.NEEDS_REVIEW),
    default=PolicyOutcome.AUTO_APPROVED,
)


def rules_file(version: str | None, directory: Path = RULES_DIR) -> Path:
    """The file of rules ``version`` (``POLICY_RULES_VERSION``), else of the newest."""
    return find(version, directory, VERSION_VARIABLE)


def load_rules(path: Path) -> RuleSet:
    """The policy rules at ``path``, checked and compiled (errors name the file and line)."""
    return load(path, FACTS, OUTCOMES)


__all__ = ["FACTS", "OUTCOMES", "RULES_DIR", "RuleSet", "load_rules", "rules_file"]
