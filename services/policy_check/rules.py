"""Policy rules as data: a small declarative language, compiled to plain callables at load.

A rules file (``rules/<version>.yaml``) is the policy and this module only its
interpreter. Rules are data, not Python, so that a policy change reads as a diff
of thresholds and lists, every decision names the rule that made it, and a new
policy is a new file whose version each ``policy.checked`` carries.

The language::

    version: v1                  # must match the file name (v1.yaml); emitted as rules_version
    currencies:                  # the currencies accepted, with their minor-unit digits
      EUR: 2
      JPY: 0
    rules:                       # evaluated in this order, and reasons keep it
      - code: AMOUNT_OVER_LIMIT  # UPPER_SNAKE_CASE, unique in the file: the reason code
        outcome: NEEDS_REVIEW    # REJECTED or NEEDS_REVIEW
        when:                    # every condition must hold (AND)
          amount_minor: {gt: {per_currency: {EUR: 1_000_00, JPY: 150_000}}}
          customer_risk_tier: {in: [MEDIUM, HIGH]}
        message: "Order total {amount_minor:money} {currency} exceeds {limit:money}"

Outcome: any matching REJECTED rule rejects the order, otherwise any matching
NEEDS_REVIEW rule sends it to review, otherwise it is AUTO_APPROVED. The
reasons are those of the rules that decided the outcome, in file order (a
rejected order does not list review reasons: no one will review it). There is
no OR: write two rules, and each gives its own reason.

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

Operators, written ``field: {operator: operand, ...}`` (several on one field must all hold):

- ``equals``, ``not_equals`` (text, number, flag): a value, or ``{field: other_field}``.
- ``gt``, ``gte``, ``lt``, ``lte`` (number): a number, ``{field: other_field}``, or
  for money fields ``{per_currency: {EUR: 1_000_00, ...}}``, which must list every
  declared currency (an order in an undeclared currency never matches it).
- ``in``, ``not_in`` (text, number): a list of values.
- ``blank`` (text): ``true`` matches a missing, empty or all-space value; ``false`` the rest.
- ``empty`` (list): ``true`` matches a list without elements; ``false`` the rest.

Text comparisons ignore case and surrounding spaces ("berlin " equals "Berlin"),
and values for text fields are read as written, so ``NO`` (Norway) or ``01234``
need no quotes. Money is in minor units everywhere (``1_000_00`` is 1,000.00 EUR).

A message is text with ``{field}`` placeholders. ``{field:money}`` writes minor
units with the order currency's digits and thousands separators (125000 EUR:
``1,250.00``); ``{limit}`` is the value the rule's single gt/gte/lt/lte
condition compared with; ``blank_address_fields`` is written comma-separated
(``items`` cannot be shown: show ``item_count``).

Loading checks everything (unknown keys, fields, operators, outcomes, operand
types, enum symbols, placeholders, duplicate codes) and raises a
``ConfigurationError`` naming the file and line. Evaluation then cannot fail on
a loaded file and reads no clock, randomness or network: it is a pure function
of the order and the rules file.
"""

from __future__ import annotations

import operator
import re
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, NoReturn

import yaml
from yaml.constructor import SafeConstructor

from opsflow.errors import ConfigurationError
from services.contracts import CustomerRiskTier, OrderReceived, PolicyOutcome, Reason

RULES_DIR = Path(__file__).parent / "rules"
"""Where the versioned rules files live: ``<version>.yaml``."""

VERSION_VARIABLE = "POLICY_RULES_VERSION"

Getter = Callable[[OrderReceived], Any]
Condition = Callable[[OrderReceived], bool]
Render = Callable[[OrderReceived], str]

_HINT = "Fix the rules file; the rule language is described in services/policy_check/rules.py."
_CODE = re.compile(r"[A-Z][A-Z0-9_]*")
_CURRENCY = re.compile(r"[A-Z]{3}")
_ADDRESS_FIELDS = ("name", "street", "city", "postal_code", "country")


# --- fields ---------------------------------------------------------------------------


class Kind(Enum):
    """What a field holds, which decides the operators that apply to it."""

    TEXT = "text"
    NUMBER = "number"
    FLAG = "flag"
    LIST = "list"


@dataclass(frozen=True)
class Field:
    """A fact about an order that rules may test and messages may show."""

    kind: Kind
    get: Getter
    money: bool = False
    symbols: tuple[str, ...] = ()
    """For enum fields: the only values a rule may name (misspelling one is an error)."""


def _norm(value: Any) -> str:
    """Text as compared: case and surrounding spaces do not count, missing is empty."""
    return "" if value is None else str(value).strip().casefold()


def _is_blank(value: Any) -> bool:
    return value is None or not str(value).strip()


def _items_total(order: OrderReceived) -> int:
    return sum(item.quantity * item.unit_price_minor for item in order.items)


def _blank_address_fields(order: OrderReceived) -> list[str]:
    address = order.destination
    return [name for name in _ADDRESS_FIELDS if _is_blank(getattr(address, name))]


def _destination(name: str) -> Getter:
    return lambda order: getattr(order.destination, name)


def _fields(currencies: frozenset[str]) -> dict[str, Field]:
    """Every field a rule may use; ``currency_known`` depends on the file's currencies."""
    text, number = Kind.TEXT, Kind.NUMBER
    fields = {
        "order_id": Field(text, lambda o: o.order_id),
        "customer_id": Field(text, lambda o: o.customer_id),
        "customer_name": Field(text, lambda o: o.customer_name),
        "customer_risk_tier": Field(
            text, lambda o: o.customer_risk_tier, symbols=tuple(CustomerRiskTier)
        ),
        "amount_minor": Field(number, lambda o: o.amount_minor, money=True),
        "currency": Field(text, lambda o: o.currency),
        "currency_known": Field(Kind.FLAG, lambda o: _norm(o.currency) in currencies),
        **{f"destination.{name}": Field(text, _destination(name)) for name in _ADDRESS_FIELDS},
        "notes": Field(text, lambda o: o.notes),
        "sales_channel": Field(text, lambda o: o.sales_channel),
        "items": Field(Kind.LIST, lambda o: o.items),
        "item_count": Field(number, lambda o: len(o.items)),
        "items_total_minor": Field(number, _items_total, money=True),
        "blank_address_fields": Field(Kind.LIST, _blank_address_fields),
    }
    return fields


OPERATORS: Mapping[Kind, tuple[str, ...]] = {
    Kind.TEXT: ("equals", "not_equals", "in", "not_in", "blank"),
    Kind.NUMBER: ("equals", "not_equals", "gt", "gte", "lt", "lte", "in", "not_in"),
    Kind.FLAG: ("equals",),
    Kind.LIST: ("empty",),
}
_COMPARISONS: Mapping[str, Callable[[Any, Any], bool]] = {
    "equals": operator.eq,
    "not_equals": operator.ne,
    "gt": operator.gt,
    "gte": operator.ge,
    "lt": operator.lt,
    "lte": operator.le,
}


# --- the compiled rule set ------------------------------------------------------------


@dataclass(frozen=True)
class Dynamic:
    """An operand known only per order: another field, or a per-currency limit."""

    get: Getter


@dataclass(frozen=True)
class Verdict:
    """What the rules decided about one order."""

    outcome: PolicyOutcome
    reasons: tuple[Reason, ...] = ()

    @property
    def reason_codes(self) -> list[str]:
        return [reason.code for reason in self.reasons]


@dataclass(frozen=True)
class Rule:
    """One compiled rule: its test and message are plain callables over the order."""

    code: str
    outcome: PolicyOutcome
    line: int
    test: Condition
    message: Render


class RuleSet:
    """A loaded rules file, ready to judge orders.

    Rejecting rules are kept apart from reviewing ones (each in file order), so
    an order meets the review rules only when nothing rejects it.

    Args:
        version: the file's declared version, emitted as ``rules_version``.
        path: where the rules were read from.
        rules: the compiled rules, in file order.
    """

    def __init__(self, version: str, path: Path, rules: tuple[Rule, ...]) -> None:
        self.version = version
        self.path = path
        self.rules = rules
        self._stages = tuple(
            (outcome, tuple(rule for rule in rules if rule.outcome is outcome))
            for outcome in (PolicyOutcome.REJECTED, PolicyOutcome.NEEDS_REVIEW)
        )

    def evaluate(self, order: OrderReceived) -> Verdict:
        """Judge ``order``: a pure function of the order and this rule set.

        Returns:
            REJECTED with the reasons of every matching reject rule, else
            NEEDS_REVIEW with those of every matching review rule, else
            AUTO_APPROVED without reasons; reasons in file order.
        """
        for outcome, rules in self._stages:
            matched = [rule for rule in rules if rule.test(order)]
            if matched:
                return Verdict(
                    outcome,
                    tuple(Reason(code=rule.code, message=rule.message(order)) for rule in matched),
                )
        return Verdict(PolicyOutcome.AUTO_APPROVED)


# --- choosing a file ------------------------------------------------------------------


def _version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Natural order, so v10 comes after v9 and 2025.10 after 2025.9."""
    return tuple(
        (0, int(part)) if part.isdigit() else (1, part) for part in re.findall(r"\d+|\D+", version)
    )


def available_versions(directory: Path = RULES_DIR) -> list[str]:
    """The rules versions in ``directory``, oldest first."""
    return sorted((path.stem for path in directory.glob("*.yaml")), key=_version_key)


def rules_file(version: str | None, directory: Path = RULES_DIR) -> Path:
    """The file of rules ``version``, or of the newest version when it is None.

    Raises:
        ConfigurationError: there is no such version (names ``POLICY_RULES_VERSION``).
    """
    versions = available_versions(directory)
    if not versions:
        raise ConfigurationError(
            VERSION_VARIABLE,
            f"there are no rules files (*.yaml) in {_shown(directory)}",
            "Restore the rules directory of the policy-check service.",
        )
    if version is None:
        version = versions[-1]
    elif version not in versions:
        raise ConfigurationError(
            VERSION_VARIABLE,
            f"is {version!r}, but {_shown(directory)} has no {version}.yaml",
            f"Set it to one of {', '.join(versions)}, or unset it for the newest.",
        )
    return directory / f"{version}.yaml"


def _shown(path: Path) -> str:
    """The path as a user would type it: relative to the working directory when inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# --- loading --------------------------------------------------------------------------


def load_rules(path: Path) -> RuleSet:
    """Read, check and compile the rules file at ``path``.

    Raises:
        ConfigurationError: the file is missing, is not YAML, or is not a valid
            rules file; the error's ``variable`` is ``<file>:<line>``.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigurationError(_shown(path), f"cannot be read ({err.strerror})", _HINT) from err
    try:
        root = yaml.compose(text, Loader=yaml.CSafeLoader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = mark.line + 1 if mark is not None else 1
        raise ConfigurationError(
            f"{_shown(path)}:{line}", f"is not valid YAML: {err.problem or err.context}", _HINT
        ) from err
    except yaml.YAMLError as err:
        raise ConfigurationError(_shown(path), f"is not valid YAML: {err}", _HINT) from err
    if root is None:
        raise ConfigurationError(f"{_shown(path)}:1", "is empty", _HINT)
    return _Compiler(path).ruleset(root)


class _Compiler:
    """Walks the YAML node tree (not plain data) so every error can name its line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.scalars = SafeConstructor()
        self.exponents: dict[str, int] = {}
        self.fields: dict[str, Field] = {}

    def fail(self, node: yaml.Node, problem: str) -> NoReturn:
        raise ConfigurationError(f"{_shown(self.path)}:{node.start_mark.line + 1}", problem, _HINT)

    # -- node shapes

    def mapping(
        self,
        node: yaml.Node,
        what: str,
        *,
        required: tuple[str, ...] = (),
        allowed: tuple[str, ...] = (),
    ) -> dict[str, tuple[yaml.ScalarNode, yaml.Node]]:
        """The (key node, value node) pairs of a mapping, checking its keys."""
        if not isinstance(node, yaml.MappingNode):
            self.fail(node, f"{what} must be a mapping")
        pairs: dict[str, tuple[yaml.ScalarNode, yaml.Node]] = {}
        for key, value in node.value:
            if not isinstance(key, yaml.ScalarNode):
                self.fail(key, f"{what} has a key that is not text")
            if key.value in pairs:
                self.fail(key, f"{what} has {key.value!r} twice")
            if allowed and key.value not in allowed:
                self.fail(
                    key, f"{what} has unknown key {key.value!r} (known: {', '.join(allowed)})"
                )
            pairs[key.value] = (key, value)
        for name in required:
            if name not in pairs:
                self.fail(node, f"{what} lacks {name!r}")
        return pairs

    def sequence(self, node: yaml.Node, what: str) -> list[yaml.Node]:
        if not isinstance(node, yaml.SequenceNode) or not node.value:
            self.fail(node, f"{what} must be a non-empty list")
        return list(node.value)

    def value(self, node: yaml.Node, what: str, kind: Kind) -> Any:
        """A scalar of ``kind``. Text is taken as written, so NO (Norway) stays text."""
        if not isinstance(node, yaml.ScalarNode):
            self.fail(node, f"{what} must be a single {kind.value}")
        if kind is Kind.TEXT:
            return node.value
        value = self.scalars.construct_object(node)
        expected = int if kind is Kind.NUMBER else bool
        if type(value) is not expected:
            self.fail(node, f"{what} must be a {kind.value}, not {node.value!r}")
        return value

    # -- the document

    def ruleset(self, root: yaml.Node) -> RuleSet:
        top = self.mapping(
            root,
            "the rules file",
            required=("version", "currencies", "rules"),
            allowed=("version", "currencies", "rules"),
        )
        version_node = top["version"][1]
        version = self.value(version_node, "version", Kind.TEXT)
        if version != self.path.stem:
            self.fail(version_node, f"declares version {version!r} but is named {self.path.name}")
        for code, (key, digits) in self.mapping(top["currencies"][1], "currencies").items():
            if not _CURRENCY.fullmatch(code):
                self.fail(key, f"currency {code!r} is not an ISO 4217 code like EUR")
            exponent = self.value(digits, f"the minor-unit digits of {code}", Kind.NUMBER)
            if not 0 <= exponent <= 4:
                self.fail(digits, f"{code} has {exponent} minor-unit digits (0 to 4 expected)")
            self.exponents[_norm(code)] = exponent
        self.fields = _fields(frozenset(self.exponents))
        rules: list[Rule] = []
        seen: set[str] = set()
        for node in self.sequence(top["rules"][1], "rules"):
            rule = self.rule(node)
            if rule.code in seen:
                self.fail(node, f"rule code {rule.code} is used twice")
            seen.add(rule.code)
            rules.append(rule)
        return RuleSet(version=version, path=self.path, rules=tuple(rules))

    def rule(self, node: yaml.Node) -> Rule:
        keys = ("code", "outcome", "when", "message")
        parts = self.mapping(node, "a rule", required=keys, allowed=keys)
        code_node = parts["code"][1]
        code = self.value(code_node, "code", Kind.TEXT)
        if not _CODE.fullmatch(code):
            self.fail(code_node, f"rule code {code!r} is not UPPER_SNAKE_CASE")
        outcome_node = parts["outcome"][1]
        outcome = self.value(outcome_node, "outcome", Kind.TEXT)
        if outcome not in (PolicyOutcome.REJECTED, PolicyOutcome.NEEDS_REVIEW):
            self.fail(
                outcome_node,
                f"rule {code} has unknown outcome {outcome!r} (a rule either REJECTED or "
                "NEEDS_REVIEW; AUTO_APPROVED is what an order gets when none matches)",
            )
        conditions: list[Condition] = []
        limits: list[Getter] = []
        when = self.mapping(parts["when"][1], f"the conditions of {code}")
        if not when:
            self.fail(parts["when"][1], f"rule {code} has no conditions")
        for name, (key, tests) in when.items():
            field = self.fields.get(name)
            if field is None:
                self.fail(key, f"unknown field {name!r} (known: {', '.join(self.fields)})")
            for op, (op_key, operand) in self.mapping(tests, f"the tests of {name}").items():
                condition, limit = self.condition(name, field, op, op_key, operand)
                conditions.append(condition)
                if limit is not None:
                    limits.append(limit)
        message = self.message(parts["message"][1], code, limits)
        return Rule(
            code=code,
            outcome=PolicyOutcome(outcome),
            line=node.start_mark.line + 1,
            test=_all(conditions),
            message=message,
        )

    # -- conditions

    def condition(
        self, name: str, field: Field, op: str, op_key: yaml.Node, operand: yaml.Node
    ) -> tuple[Condition, Getter | None]:
        """One test of one field, and for gt/gte/lt/lte the limit it compares with."""
        if op not in OPERATORS[field.kind]:
            known = ", ".join(OPERATORS[field.kind])
            self.fail(op_key, f"unknown operator {op!r} for {name}, a {field.kind.value} ({known})")
        get, what = field.get, f"the operand of {name} {op}"
        if op in ("blank", "empty"):
            wanted = self.value(operand, what, Kind.FLAG)
            test = _is_blank if op == "blank" else operator.not_
            return (lambda o: test(get(o)) is wanted), None
        if op in ("in", "not_in"):
            items = self.sequence(operand, what)
            values = frozenset(self.operand_value(field, item, what) for item in items)
            return _membership(field, values, negate=op == "not_in"), None
        left = (lambda o: _norm(get(o))) if field.kind is Kind.TEXT else get
        right = self.operand(name, field, op, operand, what)
        condition = _comparison(left, _COMPARISONS[op], right)
        if op in ("equals", "not_equals"):
            return condition, None
        return condition, (right.get if isinstance(right, Dynamic) else lambda _o: right)

    def operand(self, name: str, field: Field, op: str, node: yaml.Node, what: str) -> Any:
        """A constant, or a ``Dynamic`` for ``{field: ...}`` and ``{per_currency: ...}``."""
        if not isinstance(node, yaml.MappingNode):
            return self.operand_value(field, node, what)
        forms = (
            ("field", "per_currency")
            if field.money and op in ("gt", "gte", "lt", "lte")
            else ("field",)
        )
        pairs = self.mapping(node, what, allowed=forms)
        if len(pairs) != 1:
            self.fail(node, f"{what} must have exactly one of: {', '.join(forms)}")
        form, (_, inner) = next(iter(pairs.items()))
        if form == "field":
            return self.field_reference(name, field, inner)
        table: dict[str, int] = {}
        for code, (code_key, amount) in self.mapping(inner, what).items():
            if _norm(code) not in self.exponents:
                self.fail(code_key, f"{code} is not among the declared currencies")
            table[_norm(code)] = self.value(amount, f"the {code} limit of {name}", Kind.NUMBER)
        missing = [code.upper() for code in self.exponents if code not in table]
        if missing:
            self.fail(inner, f"per_currency of {name} lacks {', '.join(missing)}")
        return Dynamic(lambda o: table.get(_norm(o.currency)))

    def field_reference(self, name: str, field: Field, node: yaml.Node) -> Dynamic:
        other_name = self.value(node, f"the field {name} is compared with", Kind.TEXT)
        other = self.fields.get(other_name)
        if other is None:
            self.fail(node, f"unknown field {other_name!r} (known: {', '.join(self.fields)})")
        if other.kind is not field.kind:
            self.fail(
                node,
                f"{name} (a {field.kind.value}) cannot be compared with "
                f"{other_name} (a {other.kind.value})",
            )
        other_get = other.get
        if field.kind is Kind.TEXT:
            return Dynamic(lambda o: _norm(other_get(o)))
        return Dynamic(other_get)

    def operand_value(self, field: Field, node: yaml.Node, what: str) -> Any:
        value = self.value(node, what, field.kind)
        if field.symbols and value not in field.symbols:
            self.fail(node, f"{what}: {value!r} is not one of {', '.join(field.symbols)}")
        return _norm(value) if field.kind is Kind.TEXT else value

    # -- messages

    def message(self, node: yaml.Node, code: str, limits: list[Getter]) -> Render:
        """Compile a message template to a list of literal strings and value renderers."""
        template = self.value(node, f"the message of {code}", Kind.TEXT)
        if not template.strip():
            self.fail(node, f"rule {code} has an empty message")
        try:
            pieces = list(string.Formatter().parse(template))
        except ValueError as err:
            self.fail(node, f"the message of {code} is not a valid template: {err}")
        parts: list[str | Render] = []
        for literal, name, spec, conversion in pieces:
            if literal:
                parts.append(literal)
            if name is None:
                continue
            if conversion or spec not in ("", "money"):
                self.fail(
                    node,
                    f"the message of {code} has {{{name}!{conversion}:{spec}}}; "
                    "only {field} and {field:money} are known",
                )
            if name == "limit":
                if len(limits) != 1:
                    self.fail(
                        node,
                        f"the message of {code} shows {{limit}}, which needs exactly "
                        f"one gt/gte/lt/lte condition (it has {len(limits)})",
                    )
                get, money = limits[0], True
            elif name == "items":
                self.fail(node, f"the message of {code} shows {{items}}; show {{item_count}}")
            elif name in self.fields:
                get, money = self.fields[name].get, self.fields[name].money
            else:
                self.fail(node, f"the message of {code} shows unknown field {{{name}}}")
            if spec == "money":
                if not money:
                    self.fail(node, f"the message of {code} shows {name} as money, which it is not")
                parts.append(self.money_renderer(get))
            else:
                parts.append(_text_renderer(get))
        return _joined(parts)

    def money_renderer(self, get: Getter) -> Render:
        exponents = self.exponents

        def render(order: OrderReceived) -> str:
            # An undeclared currency is shown with two digits, the ISO 4217 common case.
            return _money(get(order), exponents.get(_norm(order.currency), 2))

        return render


def _money(minor: int, exponent: int) -> str:
    """``125000``, 2 -> ``1,250.00``: integer arithmetic and no locale, so always the same."""
    sign = "-" if minor < 0 else ""
    major, fraction = divmod(abs(minor), 10**exponent)
    return f"{sign}{major:,}" + (f".{fraction:0{exponent}d}" if exponent else "")


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ", ".join(_as_text(item) for item in value)
    return str(value)


def _text_renderer(get: Getter) -> Render:
    return lambda order: _as_text(get(order))


def _joined(parts: list[str | Render]) -> Render:
    def render(order: OrderReceived) -> str:
        return "".join(part if isinstance(part, str) else part(order) for part in parts)

    return render


def _membership(field: Field, values: frozenset[Any], *, negate: bool) -> Condition:
    get = field.get
    if field.kind is Kind.TEXT:
        if negate:
            return lambda o: _norm(get(o)) not in values
        return lambda o: _norm(get(o)) in values
    if negate:
        return lambda o: get(o) not in values
    return lambda o: get(o) in values


def _comparison(left: Getter, compare: Callable[[Any, Any], bool], right: Any) -> Condition:
    if not isinstance(right, Dynamic):
        return lambda o: compare(left(o), right)
    resolve = right.get

    def dynamic(order: OrderReceived) -> bool:
        # None: no per-currency limit for this order's currency, so no match.
        limit = resolve(order)
        return limit is not None and compare(left(order), limit)

    return dynamic


def _all(conditions: list[Condition]) -> Condition:
    """The AND of ``conditions``, short-circuiting; a lone condition is returned as it is."""
    if len(conditions) == 1:
        return conditions[0]
    checks = tuple(conditions)

    return lambda order: all(check(order) for check in checks)
