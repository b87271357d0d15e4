"""Realistic, varied ``OrderReceived`` events for the benchmarks.

A benchmark that encodes one sample 20,000 times measures a best case: every
string has the same length, every optional field the same presence, and the
CPU's branch predictors and caches learn the one shape. Real topics carry
orders of 1-5 lines, addresses in many countries (with non-ASCII names that
cost more to encode as UTF-8), and optional fields that are sometimes null, so
the samples here vary all of these, deterministically (seeded) so that two
runs measure the same data.
"""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta

from opsflow.contracts import Address, CustomerRiskTier, Envelope, OrderItem, OrderReceived

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


def _digits(pattern: str, rng: random.Random) -> str:
    return "".join(str(rng.randrange(10)) if ch == "#" else ch for ch in pattern)


def order(n: int, rng: random.Random) -> OrderReceived:
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


def orders(count: int, seed: int = 20250314) -> list[OrderReceived]:
    """``count`` different orders, the same ones for the same seed."""
    rng = random.Random(seed)
    return [order(n, rng) for n in range(count)]
