"""Seeded, realistic orders: the benchmarks' varied samples and the demo's scenario mix.

Both draw on one set of places, names and catalogue lines, from one seeded
generator each, so the same seed always gives the same orders.

**Benchmark samples** (``varied_order``, ``varied_orders``): a benchmark that
encodes one sample 20,000 times measures a best case: every string has the
same length, every optional field the same presence, and the CPU's branch
predictors and caches learn the one shape. Real topics carry orders of 1-5
lines, addresses in many countries (with non-ASCII names that cost more to
encode as UTF-8), and optional fields that are sometimes null, so these vary
all of them. They are complete events, envelopes included, for code that
encodes them directly; their output must stay the same for a seed, so that
benchmark runs stay comparable.

**Demo orders** (``demo_orders``): order bodies as a producer sends them to the
ingest API (no envelope), each made for a ``Scenario`` that the policy rules
(``services/policy_check/rules/v1.yaml``) and the carrier stand-in treat in a
known way: auto-approved orders, orders for review (high-risk customer,
amounts over the review limits, a sanctioned region, an incomplete address),
rejected ones (embargo, hard limit, unknown currency, a total that does not
add up) and approved orders the carrier refuses to deliver
(``REFUSED_COUNTRIES``). Order ids carry a run id, so a demo can be repeated
on the same stack.
"""

from __future__ import annotations

import math
import random
import secrets
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from types import MappingProxyType
from typing import Any, TypeVar

from opsflow.contracts import Envelope
from opsflow.producer import EventBody, body_model
from services.contracts import Address, CustomerRiskTier, OrderItem, OrderReceived, PolicyOutcome

# (city, postal code pattern, country, currency, street pattern); '#' is a digit.
_PLACES = (
    ("Berlin", "1####", "DE", "EUR", "{name}straße {n}"),
    ("München", "8####", "DE", "EUR", "{name}weg {n}"),
    ("Köln", "5####", "DE", "EUR", "Am {name}platz {n}"),
    ("Paris", "75###", "FR", "EUR", "{n} rue {name}"),
    ("Lyon", "69###", "FR", "EUR", "{n} avenue {name}"),
    ("Amsterdam", "10## AB", "NL", "EUR", "{name}gracht {n}"),
    ("Wien", "1###", "AT", "EUR", "{name}gasse {n}"),
    ("Zürich", "8###", "CH", "CHF", "{name}strasse {n}"),
    ("Kraków", "3#-###", "PL", "PLN", "ul. {name} {n}"),
    ("Łódź", "9#-###", "PL", "PLN", "ul. {name} {n}/{m}"),
    ("Stockholm", "1## ##", "SE", "SEK", "{name}gatan {n}"),
    ("London", "EC#A #BB", "GB", "GBP", "{n} {name} Street"),
    ("Manchester", "M# #AB", "GB", "GBP", "Flat {m}, {n} {name} Road"),
    ("Madrid", "280##", "ES", "EUR", "Calle de {name}, {n}"),
    ("Milano", "201##", "IT", "EUR", "Via {name} {n}"),
)
_SURNAMES = (
    "Hopper", "Lovelace", "Müller", "Schröder", "Dubois", "Lefèvre", "de Vries",
    "Nowak", "Wiśniewski", "Andersson", "García", "Rossi", "O'Brien", "Smith",
    "Kowalczyk", "Ngũgĩ", "Østergaard", "Žukauskas",
)  # fmt: skip
_GIVEN = (
    "Grace", "Ada", "Jürgen", "Amélie", "Sven", "Zofia", "Lucía", "Giulia",
    "Noah", "Aoife", "Wanjiru", "Søren", "Mateusz", "Chloé", "Liam",
)  # fmt: skip
_STREETS = ("Linden", "Haupt", "Garten", "Voltaire", "Rosen", "Kirch", "Mozart", "Baker", "Oak")
_CATALOGUE = (
    ("Widget", 2_500),
    ("Gadget, blue", 4_999),
    ("Industrial label printer ZX-400", 89_900),
    ("Replacement belt (pack of 3)", 1_250),
    ("Pallet wrap 500 mm x 300 m", 3_490),
    ("Safety gloves, size L", 799),
    ("Barcode scanner with USB-C cradle", 15_900),
    ("Thermal labels 100x150 mm, 1000 pcs", 2_190),
)
_NOTES = (
    "Leave at reception",
    "Call 30 minutes before delivery; the loading dock closes at 16:00.",
    "Bitte beim Nachbarn abgeben, falls niemand öffnet.",
    "Livraison par l'entrée de service, code portail 4821.",
)
_CHANNELS = ("web", "mobile-app", "edi", "phone", "marketplace")
_PRODUCERS = ("order-intake", "edi-gateway", "marketplace-sync")
T0 = datetime(2025, 3, 14, 9, 0, tzinfo=UTC)
K = TypeVar("K")


def _digits(pattern: str, rng: random.Random) -> str:
    return "".join(str(rng.randrange(10)) if ch == "#" else ch for ch in pattern)


def varied_order(n: int, rng: random.Random) -> OrderReceived:
    """The n-th sample order: 1-5 lines, one of 15 destinations, optional fields sometimes null."""
    city, postal, country, currency, street = rng.choice(_PLACES)
    name = f"{rng.choice(_GIVEN)} {rng.choice(_SURNAMES)}"
    if rng.random() < 0.2:  # some orders are for a company, with a contact person
        name = f"{rng.choice(_SURNAMES)} Logistik GmbH, z. Hd. {name}"
    items = []
    for line in range(rng.randint(1, 5)):
        description, price = rng.choice(_CATALOGUE)
        items.append(
            OrderItem(
                sku=f"SKU-{rng.randrange(100_000):05d}-{line}",
                description=description,
                quantity=rng.choice((1, 1, 1, 2, 3, 5, 10, 24)),
                unit_price_minor=price + rng.randrange(-200, 200),
            )
        )
    occurred = T0 + timedelta(seconds=n * 3.7, microseconds=rng.randrange(1_000_000))
    order_id = f"ord-{occurred:%Y%m%d}-{n:06d}"
    return OrderReceived(
        envelope=Envelope(
            event_id=uuid.UUID(int=rng.getrandbits(128), version=4),
            idempotency_key=f"order.received:{order_id}",
            occurred_at=occurred,
            correlation_id=order_id,
            causation_id=None if rng.random() < 0.9 else str(uuid.UUID(int=rng.getrandbits(128))),
            producer=rng.choice(_PRODUCERS),
            contract_version=OrderReceived.contract_version,
        ),
        order_id=order_id,
        customer_id=f"cust-{rng.randrange(1, 50_000)}",
        customer_name=name,
        customer_risk_tier=rng.choice(list(CustomerRiskTier)),
        amount_minor=sum(i.quantity * i.unit_price_minor for i in items),
        currency=currency,
        destination=Address(
            name=name,
            street=street.format(
                name=rng.choice(_STREETS), n=rng.randint(1, 240), m=rng.randint(1, 60)
            ),
            city=city,
            postal_code=_digits(postal, rng),
            country=country,
        ),
        items=items,
        placed_at=occurred - timedelta(minutes=rng.randint(0, 600)),
        notes=rng.choice(_NOTES) if rng.random() < 0.3 else None,
        sales_channel=rng.choice(_CHANNELS) if rng.random() < 0.8 else None,
    )


def varied_orders(count: int, seed: int = 20250314) -> list[OrderReceived]:
    """``count`` different orders, the same ones for the same seed."""
    rng = random.Random(seed)
    return [varied_order(n, rng) for n in range(count)]


# --- demo orders ------------------------------------------------------------------------

REFUSED_COUNTRIES: tuple[str, ...] = ("IS",)
"""Destinations of the ``refused-destination`` scenario. Policy approves them; run the
carrier stand-in with ``CARRIER_REFUSED_COUNTRIES=IS`` so it refuses them and those
orders end in ``dispatch.failed`` (a permanent failure)."""


class Category(StrEnum):
    """What a demo order is meant to show about the workflow."""

    AUTO_APPROVE = "auto-approve"
    REVIEW = "review"
    REJECT = "reject"
    CARRIER_REFUSAL = "carrier-refusal"

    @property
    def policy_outcome(self) -> PolicyOutcome:
        """The outcome policy-check (rules v1) gives orders of this category."""
        return _OUTCOMES[self]


_OUTCOMES = {
    Category.AUTO_APPROVE: PolicyOutcome.AUTO_APPROVED,
    Category.CARRIER_REFUSAL: PolicyOutcome.AUTO_APPROVED,
    Category.REVIEW: PolicyOutcome.NEEDS_REVIEW,
    Category.REJECT: PolicyOutcome.REJECTED,
}

CATEGORY_SHARES: Mapping[Category, float] = MappingProxyType(
    {
        Category.AUTO_APPROVE: 0.60,
        Category.CARRIER_REFUSAL: 0.05,
        Category.REVIEW: 0.20,
        Category.REJECT: 0.15,
    }
)
"""The mix of a demo run: mostly ordinary orders, as on a real day, and enough of the
rest to show every path. Any run of at least four orders has each category."""


@dataclass(frozen=True)
class Scenario:
    """One kind of demo order, and the policy rule (or carrier setting) it exercises."""

    name: str
    category: Category
    rule: str | None
    """The code of the one policy rule (v1) that decides these orders; None: approved."""
    description: str


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("standard", Category.AUTO_APPROVE, None, "low or medium risk, within every limit"),
    Scenario(
        "refused-destination",
        Category.CARRIER_REFUSAL,
        None,
        f"approved, to a country the carrier refuses ({', '.join(REFUSED_COUNTRIES)})",
    ),
    Scenario("high-risk-customer", Category.REVIEW, "CUSTOMER_HIGH_RISK", "a HIGH risk customer"),
    Scenario("over-review-limit", Category.REVIEW, "AMOUNT_OVER_LIMIT", "1,800-27,000 EUR"),
    Scenario(
        "medium-risk-over-limit",
        Category.REVIEW,
        "MEDIUM_RISK_OVER_LIMIT",
        "a MEDIUM risk customer, 630-800 EUR",
    ),
    Scenario(
        "restricted-region", Category.REVIEW, "DESTINATION_RESTRICTED_REGION", "to Donetsk (UA)"
    ),
    Scenario("incomplete-address", Category.REVIEW, "ADDRESS_INCOMPLETE", "no postal code"),
    Scenario(
        "embargoed-destination", Category.REJECT, "DESTINATION_EMBARGOED", "to Minsk or Moskva"
    ),
    Scenario("over-hard-limit", Category.REJECT, "AMOUNT_OVER_HARD_LIMIT", "over 50,000 EUR"),
    Scenario("unknown-currency", Category.REJECT, "CURRENCY_UNKNOWN", "in NOK, to Oslo"),
    Scenario(
        "amount-mismatch",
        Category.REJECT,
        "AMOUNT_MISMATCH",
        "a shipping fee in the total but not in the lines",
    ),
)
"""Every demo scenario."""


@dataclass(frozen=True)
class DemoOrder:
    """A demo order body (what the ingest API takes) and the scenario it was made for."""

    scenario: Scenario
    body: EventBody

    @property
    def order_id(self) -> str:
        order_id: str = self.body.order_id  # type: ignore[attr-defined]
        return order_id

    def as_json(self) -> dict[str, Any]:
        """The body as JSON-ready values, as ``POST /events:batch`` takes an event."""
        return self.body.model_dump(mode="json")


_ORDER_BODY = body_model(OrderReceived)

# Minor units of each currency per minor unit of EUR. The ratios are those between
# the per-currency limits of the policy rules (v1), so an order built to stay under
# (or go over) a EUR limit does the same in every currency.
_PER_EUR = {
    "EUR": 1.0,
    "USD": 1.1,
    "GBP": 0.86,
    "CHF": 0.96,
    "SEK": 11.4,
    "PLN": 4.3,
    "JPY": 1.6,
    "NOK": 11.7,
}
# Demo amounts are planned in EUR minor units against the rules' EUR limits.
_AUTO_CAP_EUR = 450_00  # under MEDIUM_RISK_OVER_LIMIT (500) and AMOUNT_OVER_LIMIT (1,000)
_DEMO_PLACES = (
    *_PLACES,
    ("New York", "100##", "US", "USD", "{n} {name} Avenue"),
    ("Tokyo", "16#-####", "JP", "JPY", "{n}-{m} Nishi-Shinjuku"),
)
_PLACES_BY_SCENARIO = {
    "refused-destination": (("Reykjavík", "10#", "IS", "EUR", "{name}gata {n}"),),
    "restricted-region": (("Donetsk", "83###", "UA", "EUR", "vul. {name} {n}"),),
    "embargoed-destination": (
        ("Minsk", "220###", "BY", "EUR", "vul. {name} {n}"),
        ("Moskva", "1#####", "RU", "EUR", "ul. {name} {n}"),
    ),
    "unknown-currency": (("Oslo", "0###", "NO", "NOK", "{name}gata {n}"),),
}
_CUSTOMERS = (
    ("cust-1001", "Lindenhof Bürobedarf GmbH", CustomerRiskTier.LOW),
    ("cust-1002", "Atelier Dubois SARL", CustomerRiskTier.LOW),
    ("cust-1003", "Nowak i Synowie Sp. z o.o.", CustomerRiskTier.LOW),
    ("cust-1004", "Andersson Verkstad AB", CustomerRiskTier.LOW),
    ("cust-1005", "Baker Street Supplies Ltd", CustomerRiskTier.LOW),
    ("cust-1006", "Rossi Imballaggi S.r.l.", CustomerRiskTier.MEDIUM),
    ("cust-1007", "García Logística S.L.", CustomerRiskTier.MEDIUM),
    ("cust-1008", "de Vries Handel B.V.", CustomerRiskTier.MEDIUM),
    ("cust-1009", "Quickship Trading FZE", CustomerRiskTier.HIGH),
    ("cust-1010", "Northwind Resale Ltd", CustomerRiskTier.HIGH),
)
_PRINTER = 2  # index of the label printer in _CATALOGUE: the one line that moves totals
_SCANNER = 6  # the barcode scanner


def new_run_id() -> str:
    """A fresh run id: order ids of one demo run differ from every other run's."""
    return secrets.token_hex(4)


def order_id_prefix(run_id: str) -> str:
    """What every order id of run ``run_id`` starts with."""
    return f"demo-{run_id}-"


def demo_order_id(run_id: str, n: int) -> str:
    """The id of the ``n``-th order of run ``run_id``."""
    return f"{order_id_prefix(run_id)}{n:06d}"


def demo_orders(count: int, *, seed: int, run_id: str, now: datetime) -> list[DemoOrder]:
    """``count`` demo orders in the ``CATEGORY_SHARES`` mix, in a shuffled order.

    A pure function of its arguments (no clock, no global randomness): the same
    seed, run id and ``now`` give the same orders; another run id changes only
    the order ids.

    Args:
        seed: chooses customers, places, baskets and the order of scenarios.
        run_id: part of every order id (``demo-<run id>-<n>``).
        now: when the orders are placed; ``placed_at`` is up to 4 hours before.
    """
    rng = random.Random(seed)
    mix = allocate(count, CATEGORY_SHARES)
    categories = [category for category, n in mix.items() for _ in range(n)]
    rng.shuffle(categories)
    # Within a category the scenarios take turns (from a seeded start), so a
    # category with k orders shows min(k, its scenarios) different ones.
    turns = {category: rng.randrange(len(SCENARIOS)) for category in Category}
    made = []
    for n, category in enumerate(categories):
        choices = [s for s in SCENARIOS if s.category is category]
        scenario = choices[turns[category] % len(choices)]
        turns[category] += 1
        made.append(_demo_order(n, scenario, rng, run_id=run_id, now=now))
    return made


def allocate(count: int, shares: Mapping[K, float]) -> dict[K, int]:
    """``count`` split by ``shares`` (which sum to 1): the shares rounded by largest
    remainder, each at least one when there are enough to go round.

    The demo's scenario mix and its reviewer's decisions are both split this way, so a
    small run still shows every kind.
    """
    exact = {kind: count * share for kind, share in shares.items()}
    counts = {kind: math.floor(value) for kind, value in exact.items()}
    by_remainder = sorted(exact, key=lambda k: exact[k] - counts[k], reverse=True)
    for kind in by_remainder[: count - sum(counts.values())]:
        counts[kind] += 1
    if count >= len(counts):
        for kind in counts:
            if counts[kind] == 0:
                counts[max(counts, key=lambda k: counts[k])] -= 1
                counts[kind] = 1
    return counts


def _demo_order(
    n: int, scenario: Scenario, rng: random.Random, *, run_id: str, now: datetime
) -> DemoOrder:
    name = scenario.name
    tiers: tuple[CustomerRiskTier, ...]
    if name == "standard":
        tiers = (CustomerRiskTier.LOW, CustomerRiskTier.MEDIUM)
    elif name == "high-risk-customer":
        tiers = (CustomerRiskTier.HIGH,)
    elif name == "medium-risk-over-limit":
        tiers = (CustomerRiskTier.MEDIUM,)
    else:  # keep the customer's risk out of the way of the rule the scenario shows
        tiers = (CustomerRiskTier.LOW,)
    customer_id, customer_name, tier = rng.choice([c for c in _CUSTOMERS if c[2] in tiers])
    city, postal, country, currency, street = rng.choice(
        _PLACES_BY_SCENARIO.get(name, _DEMO_PLACES)
    )
    if name == "over-review-limit":  # 1,798 to 26,970 EUR: over 1,000, under 50,000
        items = [_line(rng, _PRINTER, currency, quantity=rng.randint(2, 30), line=0)]
    elif name == "medium-risk-over-limit":  # 632 to 800 EUR: over 500, under 1,000
        items = [_line(rng, _SCANNER, currency, quantity=rng.randint(4, 5), line=0)]
    elif name == "over-hard-limit":  # 53,940 EUR or more: over 50,000
        items = [_line(rng, _PRINTER, currency, quantity=rng.randint(60, 90), line=0)]
    else:
        items = _basket(rng, currency)
    total = sum(item.quantity * item.unit_price_minor for item in items)
    if name == "amount-mismatch":  # a shipping fee added to the total but not as a line
        total += _convert(rng.randint(4, 25) * 100, currency)
    person = f"{rng.choice(_GIVEN)} {rng.choice(_SURNAMES)}"
    addressee = f"{customer_name}, Attn. {person}" if rng.random() < 0.3 else person
    placed_at = now - timedelta(minutes=rng.randint(0, 240), seconds=rng.randrange(60))
    # Validated like the ingest API will, so a bad demo order fails here, not there.
    body = _ORDER_BODY.model_validate(
        dict(
            order_id=demo_order_id(run_id, n),
            customer_id=customer_id,
            customer_name=customer_name,
            customer_risk_tier=tier,
            amount_minor=total,
            currency=currency,
            destination=Address(
                name=addressee,
                street=street.format(
                    name=rng.choice(_STREETS), n=rng.randint(1, 240), m=rng.randint(1, 60)
                ),
                city=city,
                postal_code="" if name == "incomplete-address" else _digits(postal, rng),
                country=country,
            ),
            items=items,
            # Avro keeps milliseconds: round here so what is sent is what is read back.
            placed_at=placed_at.replace(microsecond=placed_at.microsecond // 1000 * 1000),
            notes=rng.choice(_NOTES) if rng.random() < 0.3 else None,
            sales_channel=rng.choice(_CHANNELS) if rng.random() < 0.8 else None,
        )
    )
    return DemoOrder(scenario, body)


def _convert(eur_minor: int, currency: str) -> int:
    return round(eur_minor * _PER_EUR[currency])


def _line(rng: random.Random, index: int, currency: str, *, quantity: int, line: int) -> OrderItem:
    description, price = _CATALOGUE[index]
    unit = price + rng.randrange(-100, 100)
    return OrderItem(
        sku=f"SKU-{1000 + index}-{line}",
        description=description,
        quantity=quantity,
        unit_price_minor=_convert(unit, currency),
    )


def _basket(rng: random.Random, currency: str) -> list[OrderItem]:
    """1-4 everyday lines (no label printer) worth at most ``_AUTO_CAP_EUR`` in EUR."""
    items: list[OrderItem] = []
    spent = 0
    for line in range(rng.randint(1, 4)):
        index = rng.choice([i for i in range(len(_CATALOGUE)) if i != _PRINTER])
        quantity = rng.choice((1, 1, 1, 2, 3, 5))
        cost = quantity * (_CATALOGUE[index][1] + 100)  # the most the line can cost
        if spent + cost <= _AUTO_CAP_EUR:
            items.append(_line(rng, index, currency, quantity=quantity, line=line))
            spent += cost
    if not items:
        items.append(_line(rng, 0, currency, quantity=1, line=0))
    return items
