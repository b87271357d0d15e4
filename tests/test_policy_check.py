"""The policy-check service: declarative rules judged purely, and the service on the real stack.

Most tests call the rules module directly (it is pure logic: no broker needed).
The last one runs ``opsflow run services.policy_check`` twice on the session's
stack, over the same input records, and compares the outputs byte for byte.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fastavro
import pytest
from confluent_kafka import Producer

from opsflow.contracts import Envelope, catalogue
from opsflow.contracts.lineage import caused_by
from opsflow.errors import ConfigurationError
from services.contracts import (
    Address,
    CustomerRiskTier,
    OrderItem,
    OrderReceived,
    PolicyChecked,
    PolicyOutcome,
)
from services.policy_check import service
from services.policy_check.rules import RULES_DIR, RuleSet, load_rules, rules_file
from tests.support.runtime import Topics, make_topics, settled_records, wait_until_processed
from tests.support.stack import QUICK_JOIN_ENV, ROOT, Stack

T0 = datetime(2025, 3, 14, 9, 0, tzinfo=UTC)
V1 = load_rules(RULES_DIR / "v1.yaml")


def order(
    n: int = 1,
    *,
    items: list[tuple[int, int]] | None = None,
    amount_minor: int | None = None,
    currency: str = "EUR",
    tier: CustomerRiskTier = CustomerRiskTier.LOW,
    country: str = "DE",
    city: str = "Berlin",
    street: str = "Hauptstr. 5",
) -> OrderReceived:
    """A realistic order; ``items`` are (quantity, unit price) and set the total by default."""
    lines = [(2, 45_00), (1, 30_00)] if items is None else items
    order_id = f"ord-2025-{n:05d}"
    return OrderReceived(
        envelope=Envelope(
            event_id=uuid.UUID(int=n),
            idempotency_key=f"order:{order_id}",
            occurred_at=T0,
            correlation_id=order_id,
            causation_id=None,
            producer="ingest",
            contract_version=OrderReceived.contract_version,
        ),
        order_id=order_id,
        customer_id=f"cust-{n % 37}",
        customer_name="Grace Hopper",
        customer_risk_tier=tier,
        amount_minor=sum(q * p for q, p in lines) if amount_minor is None else amount_minor,
        currency=currency,
        destination=Address(
            name="Grace Hopper", street=street, city=city, postal_code="10115", country=country
        ),
        items=[
            OrderItem(sku=f"SKU-{i}", description="Widget", quantity=q, unit_price_minor=p)
            for i, (q, p) in enumerate(lines)
        ],
        placed_at=T0,
        notes=None,
        sales_channel="web",
    )


def reasons(event: OrderReceived) -> list[tuple[str, str]]:
    return [(reason.code, reason.message) for reason in V1.evaluate(event).reasons]


# --- outcomes ---------------------------------------------------------------------------


def test_an_ordinary_order_is_auto_approved_without_reasons() -> None:
    verdict = V1.evaluate(order())
    assert verdict.outcome is PolicyOutcome.AUTO_APPROVED
    assert verdict.reasons == () and verdict.reason_codes == []


def test_an_order_over_the_limit_needs_review_with_amount_and_limit_in_the_message() -> None:
    big = order(items=[(3, 250_00), (1, 500_00)], tier=CustomerRiskTier.MEDIUM)
    verdict = V1.evaluate(big)
    assert verdict.outcome is PolicyOutcome.NEEDS_REVIEW
    assert reasons(big) == [
        ("AMOUNT_OVER_LIMIT", "Order total 1,250.00 EUR exceeds 1,000.00"),
        ("MEDIUM_RISK_OVER_LIMIT", "Customer rated MEDIUM risk ordered 1,250.00 EUR, over 500.00"),
    ]


def test_limits_and_money_formatting_follow_the_currency() -> None:
    yen = order(items=[(1, 170_000)], currency="JPY")
    assert reasons(yen) == [("AMOUNT_OVER_LIMIT", "Order total 170,000 JPY exceeds 160,000")]
    # 1,050.00 is over the EUR limit (1,000.00) and under the USD one (1,100.00).
    assert V1.evaluate(order(items=[(1, 1_050_00)])).reason_codes == ["AMOUNT_OVER_LIMIT"]
    dollars = V1.evaluate(order(items=[(1, 1_050_00)], currency="USD"))
    assert dollars.outcome is PolicyOutcome.AUTO_APPROVED


def test_a_high_risk_customer_needs_review() -> None:
    risky = order(7, tier=CustomerRiskTier.HIGH)
    assert reasons(risky) == [("CUSTOMER_HIGH_RISK", "Customer cust-7 is rated HIGH risk")]


def test_a_restricted_city_needs_review_whatever_its_case_and_spacing() -> None:
    crimea = order(country="UA", city="  sevastopol ")
    verdict = V1.evaluate(crimea)
    assert verdict.outcome is PolicyOutcome.NEEDS_REVIEW
    assert verdict.reason_codes == ["DESTINATION_RESTRICTED_REGION"]
    assert V1.evaluate(order(country="UA", city="Kyiv")).outcome is PolicyOutcome.AUTO_APPROVED


def test_blank_address_fields_need_review_and_are_named() -> None:
    sparse = order(street="  ", city="")
    assert reasons(sparse) == [("ADDRESS_INCOMPLETE", "Delivery address is missing: street, city")]


def test_an_embargoed_destination_is_rejected() -> None:
    assert reasons(order(country="KP")) == [
        ("DESTINATION_EMBARGOED", "Destination country KP is under embargo")
    ]


@pytest.mark.parametrize(
    ("event", "code", "message"),
    [
        (order(items=[], amount_minor=45_00), "ITEMS_MISSING", "Order has no items"),
        (
            order(items=[(2, 45_00)], amount_minor=95_00),
            "AMOUNT_MISMATCH",
            "Order total 95.00 EUR does not match the items' total 90.00 EUR",
        ),
        (order(currency="XAU"), "CURRENCY_UNKNOWN", "Currency 'XAU' is not accepted"),
        (
            order(items=[(1, 60_000_00)]),
            "AMOUNT_OVER_HARD_LIMIT",
            "Order total 60,000.00 EUR exceeds the hard limit 50,000.00",
        ),
    ],
    ids=["no-items", "total-mismatch", "unknown-currency", "hard-limit"],
)
def test_missing_inconsistent_or_excessive_orders_are_rejected(
    event: OrderReceived, code: str, message: str
) -> None:
    verdict = V1.evaluate(event)
    assert verdict.outcome is PolicyOutcome.REJECTED
    assert reasons(event) == [(code, message)]


def test_reject_rules_win_and_their_reasons_keep_the_rule_file_order() -> None:
    # Matches, in file order: AMOUNT_MISMATCH, DESTINATION_EMBARGOED (reject) and
    # CUSTOMER_HIGH_RISK, ADDRESS_INCOMPLETE (review, not reported once rejected).
    messy = order(
        country="RU", amount_minor=1, tier=CustomerRiskTier.HIGH, street="", city="Moscow"
    )
    verdict = V1.evaluate(messy)
    assert verdict.outcome is PolicyOutcome.REJECTED
    assert verdict.reason_codes == ["AMOUNT_MISMATCH", "DESTINATION_EMBARGOED"]
    order_of_rules = [rule.code for rule in V1.rules]
    assert order_of_rules.index("AMOUNT_MISMATCH") < order_of_rules.index("DESTINATION_EMBARGOED")


def test_review_reasons_keep_the_rule_file_order() -> None:
    verdict = V1.evaluate(order(items=[(1, 2_000_00)], tier=CustomerRiskTier.HIGH, street=""))
    assert verdict.outcome is PolicyOutcome.NEEDS_REVIEW
    assert verdict.reason_codes == ["ADDRESS_INCOMPLETE", "CUSTOMER_HIGH_RISK", "AMOUNT_OVER_LIMIT"]


# --- determinism ------------------------------------------------------------------------


def avro_bytes(event: PolicyChecked) -> bytes:
    schema = fastavro.parse_schema(catalogue()["policy.checked"].latest_schema)
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, schema, event.to_avro())
    return buffer.getvalue()


def checked(event: OrderReceived) -> bytes:
    """What the service emits for ``event``, handled the way the runtime does."""
    with caused_by(event.envelope, producer=service.name, occurred_at=T0):
        (out,) = service.handle(event)
    assert isinstance(out, PolicyChecked)
    return avro_bytes(out)


def test_the_same_order_and_rules_version_give_byte_identical_output() -> None:
    event = order(3, items=[(4, 400_00)], tier=CustomerRiskTier.MEDIUM, street=" ")
    first, second = checked(event), checked(event)
    assert first == second
    # A fresh load of the same version judges identically too.
    reloaded = load_rules(rules_file("v1"))
    assert reloaded.evaluate(event) == V1.evaluate(event)
    with caused_by(event.envelope, producer=service.name, occurred_at=T0):
        out = service.handle(event)[0]
    assert isinstance(out, PolicyChecked)
    assert out.rules_version == "v1" and out.outcome is PolicyOutcome.NEEDS_REVIEW
    assert out.envelope.causation_id == str(event.envelope.event_id)


# --- loading and its errors -------------------------------------------------------------

GOOD = """\
version: v1
currencies:
  EUR: 2
rules:
  - code: BIG
    outcome: NEEDS_REVIEW
    when:
      amount_minor: {gt: 1_000_00}
    message: "Total {amount_minor:money} over {limit:money}"
"""


def write(directory: Path, text: str, name: str = "v1.yaml") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return path


def load_error(path: Path) -> ConfigurationError:
    with pytest.raises(ConfigurationError) as caught:
        load_rules(path)
    return caught.value


def reasons_of(rules: RuleSet, event: OrderReceived) -> list[str]:
    return [reason.message for reason in rules.evaluate(event).reasons]


def test_a_minimal_rules_file_loads_and_judges(tmp_path: Path) -> None:
    rules = load_rules(write(tmp_path, GOOD))
    assert rules.version == "v1"
    assert reasons_of(rules, order(items=[(1, 1_500_00)])) == ["Total 1,500.00 over 1,000.00"]


def test_a_file_that_is_not_yaml_names_the_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("{gt: 1_000_00}", "{gt: [1, 2}"))
    error = load_error(path)
    assert error.variable == f"{path}:8"
    assert "not valid YAML" in error.problem


@pytest.mark.parametrize(
    ("old", "new", "line", "problem"),
    [
        ("amount_minor:", "amount_major:", 8, "unknown field 'amount_major'"),
        ("{gt:", "{greater:", 8, "unknown operator 'greater' for amount_minor"),
        ("NEEDS_REVIEW", "MAYBE", 6, "unknown outcome 'MAYBE'"),
        ("{gt:", "{equals:", 9, "{limit}, which needs exactly one gt/gte/lt/lte condition"),
        ("1_000_00}", "'1000.00'}", 8, "must be a number"),
    ],
    ids=["unknown-field", "unknown-operator", "unknown-outcome", "limit-unknown", "not-a-number"],
)
def test_an_invalid_rule_names_the_file_and_line(
    tmp_path: Path, old: str, new: str, line: int, problem: str
) -> None:
    path = write(tmp_path, GOOD.replace(old, new))
    error = load_error(path)
    assert error.variable == f"{path}:{line}"
    assert problem in error.problem


def test_per_currency_limits_must_cover_every_declared_currency(tmp_path: Path) -> None:
    text = GOOD.replace("  EUR: 2\n", "  EUR: 2\n  JPY: 0\n").replace(
        "{gt: 1_000_00}", "{gt: {per_currency: {EUR: 1_000_00}}}"
    )
    error = load_error(write(tmp_path, text))
    assert error.variable.endswith(":9") and "lacks JPY" in error.problem


def test_enum_values_and_message_placeholders_are_checked_at_load(tmp_path: Path) -> None:
    tier = GOOD.replace("amount_minor: {gt: 1_000_00}", "customer_risk_tier: {in: [HIGH, HUGE]}")
    assert "'HUGE' is not one of LOW, MEDIUM, HIGH" in load_error(write(tmp_path, tier)).problem
    unknown = GOOD.replace("{amount_minor:money}", "{amount}")
    assert "unknown field {amount}" in load_error(write(tmp_path, unknown)).problem
    items = GOOD.replace("{amount_minor:money}", "{items}")
    assert "show {item_count}" in load_error(write(tmp_path, items)).problem


def test_a_file_declaring_another_version_than_its_name_is_refused(tmp_path: Path) -> None:
    error = load_error(write(tmp_path, GOOD, name="v2.yaml"))
    assert error.variable.endswith("v2.yaml:1") and "declares version 'v1'" in error.problem


def test_the_newest_version_is_the_default_and_an_unknown_one_is_a_clear_error(
    tmp_path: Path,
) -> None:
    for version in ("v1", "v2", "v10"):
        write(tmp_path, GOOD.replace("version: v1", f"version: {version}"), f"{version}.yaml")
    assert rules_file(None, tmp_path) == tmp_path / "v10.yaml"
    assert rules_file("v2", tmp_path) == tmp_path / "v2.yaml"
    with pytest.raises(ConfigurationError) as caught:
        rules_file("v3", tmp_path)
    assert caught.value.variable == "POLICY_RULES_VERSION"
    assert "v1, v2, v10" in caught.value.hint


def test_the_service_refuses_to_start_with_an_unknown_rules_version() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "opsflow", "run", "services.policy_check"],
        cwd=ROOT,
        env={**os.environ, "POLICY_RULES_VERSION": "v999"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "POLICY_RULES_VERSION" in result.stderr and "v999" in result.stderr
    assert "Traceback" not in result.stderr


# --- on the real stack ------------------------------------------------------------------

Record = tuple[int, int, bytes, bytes, int]
"""partition, offset, key, value, timestamp (ms)."""


def varied_orders(count: int) -> list[OrderReceived]:
    """Orders whose mix covers every outcome: approvals, reviews and rejections."""
    currencies = ["EUR", "USD", "GBP", "JPY", "CHF", "SEK"]
    made = []
    for n in range(count):
        kind = n % 10
        made.append(
            order(
                n,
                items=[(1 + n % 3, 12_00 + 7 * n), (1, 3_00)] if kind != 2 else [(4, 900_00)],
                amount_minor=1 if kind == 3 else None,
                currency=currencies[n % len(currencies)],
                tier=CustomerRiskTier.HIGH if kind == 0 else CustomerRiskTier.LOW,
                country="KP" if kind == 1 else "DE",
                street="" if kind == 5 else "Hauptstr. 5",
            )
        )
    return made


def read_records(bootstrap: str, topic: str) -> list[Record]:
    """Every committed record of ``topic``, in partition and offset order (read to each
    partition's high watermark, so none written before the call is missed)."""
    records: list[Record] = []
    for m in settled_records(bootstrap, topic):
        partition, offset, key, value = m.partition(), m.offset(), m.key(), m.value()
        assert partition is not None and offset is not None and key and value, m
        records.append((partition, offset, key, value, m.timestamp()[1]))
    return sorted(records)


def copy_records(bootstrap: str, records: list[Record], topic: str) -> None:
    """The same records (key, value, timestamp) into the same partitions of ``topic``."""
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for partition, _, key, value, timestamp in records:
        producer.produce(topic, key=key, value=value, partition=partition, timestamp=timestamp)
    assert producer.flush(30) == 0


@pytest.fixture
def run_service(stack: Stack, tmp_path: Path) -> Iterator[Any]:
    """Starts ``opsflow run services.policy_check`` on given topics; stops them all after."""
    started: list[subprocess.Popen[bytes]] = []

    def start(topics: Topics) -> subprocess.Popen[bytes]:
        env = {
            **stack.env,
            **stack.addresses(),
            **QUICK_JOIN_ENV,
            "OPSFLOW_TOPIC_PREFIX": topics.prefix,
            "POLICY_RULES_VERSION": "v1",
        }
        log = (tmp_path / f"policy-check-{len(started)}.log").open("ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "opsflow", "run", "services.policy_check"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:  # all asked to stop first: they stop side by side
        proc.terminate()
    for proc in started:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_a_replay_of_the_same_records_gives_byte_identical_checks(
    bootstrap_servers: str, registry_url: str, run_service: Any
) -> None:
    inputs = varied_orders(200)
    first, second = (make_topics(bootstrap_servers, registry_url) for _ in range(2))
    producer = Producer({"bootstrap.servers": bootstrap_servers, "linger.ms": 10})
    for event in inputs:
        producer.produce(first.orders, key=event.order_id.encode(), value=first.codec.encode(event))
    assert producer.flush(30) == 0
    recorded = read_records(bootstrap_servers, first.orders)
    assert len(recorded) == len(inputs)
    copy_records(bootstrap_servers, recorded, second.orders)
    assert read_records(bootstrap_servers, second.orders) == recorded, (
        "the copy holds the same records at the same positions"
    )

    # Two processes (each its own interpreter: nothing per process, such as string
    # hashing, can make them agree by chance), until each has handled every record
    # (its group committed them all, with their outputs).
    run_service(first)
    run_service(second)
    for topics in (first, second):
        wait_until_processed(topics, service=service.name)
    outputs = [read_records(bootstrap_servers, t.checks) for t in (first, second)]
    assert all(len(records) == len(inputs) for records in outputs), "one check per order"

    by_partition: list[dict[int, list[tuple[bytes, bytes]]]] = []
    for records in outputs:
        partitions: dict[int, list[tuple[bytes, bytes]]] = defaultdict(list)
        for partition, _, key, value, _ in records:
            partitions[partition].append((key, value))
        by_partition.append(dict(partitions))
    assert by_partition[0] == by_partition[1], "same check bytes, in the same order"

    checks = [first.codec.decode(value) for _, _, _, value, _ in outputs[0]]
    assert all(isinstance(c, PolicyChecked) and c.rules_version == "v1" for c in checks)
    assert {c.order_id for c in checks} == {event.order_id for event in inputs}
    mix = Counter(c.outcome for c in checks if isinstance(c, PolicyChecked))
    assert set(mix) == set(PolicyOutcome), mix
