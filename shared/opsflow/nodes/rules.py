"""The rules step: versioned rules as data, a small declarative language compiled at load.

A rules file (``<version>.yaml`` in the application's rules folder) is the
policy and this module only its interpreter. Rules are data, not Python, so
that a policy change reads as a diff of thresholds and lists, every decision
names the rule that made it, and a new policy is a new file whose version the
decision carries. The application says what a rule may test (``Facts``: the
fields of the subject judged, with their kinds) and what
it may decide (``Outcomes``).

The language::

    version: v1                  # must match the file name (v1.yaml)
    currencies:                  # for subjects with money: the currencies accepted,
      EUR: 2                     # with their minor-unit digits
      JPY: 0
    rules:                       # evaluated in this order, and reasons keep it
      - code: AMOUNT_OVER_LIMIT  # UPPER_SNAKE_CASE, unique in the file: the reason code
        outcome: NEEDS_REVIEW    # one of the application's ranked outcomes
        when:                    # every condition must hold (AND)
          amount_minor: {gt: {per_currency: {EUR: 1_000_00, JPY: 150_000}}}
          customer_risk_tier: {in: [MEDIUM, HIGH]}
        message: "Invoice total {amount_minor:money} {currency} exceeds {limit:money}"

Outcome: the strongest ranked outcome any rule matched (say REJECTED over
NEEDS_REVIEW), with the reasons of the rules that decided it, in file order;
the default outcome (say AUTO_APPROVED) without reasons when none matched.
There is no OR: write two rules, and each gives its own reason.

Fields are the application's (``Facts``), each a text, number, flag or list;
a money field (a number in minor units) is compared per currency.

Operators, written ``field: {operator: operand, ...}`` (several on one field must all hold):

- ``equals``, ``not_equals`` (text, number, flag): a value, or ``{field: other_field}``.
- ``gt``, ``gte``, ``lt``, ``lte`` (number): a number, ``{field: other_field}``, or
  for money fields ``{per_currency: {EUR: 1_000_00, ...}}``, which must list every
  declared currency (a subject in an undeclared currency never matches it).
- ``in``, ``not_in`` (text, number): a list of values.
- ``blank`` (text): ``true`` matches a missing, empty or all-space value; ``false`` the rest.
- ``empty`` (list): ``true`` matches a list without elements; ``false`` the rest.

Text comparisons ignore case and surrounding spaces ("berlin " equals "Berlin"),
and values for text fields are read as written, so ``NO`` (Norway) or ``01234``
need no quotes. Money is in minor units everywhere (``1_000_00`` is 1,000.00 EUR).

A message is text with ``{field}`` placeholders. ``{field:money}`` writes minor
units with the subject currency's digits and thousands separators (125000 EUR:
``1,250.00``); ``{limit}`` is the value the rule's single gt/gte/lt/lte
condition compared with; a list is written comma-separated (a field marked
``show_instead`` cannot be shown and names what to show).

Loading checks everything (unknown keys, fields, operators, outcomes, operand
types, enum symbols, placeholders, duplicate codes) and raises a
``ConfigurationError`` naming the file and line. Evaluation then cannot fail on
a loaded file and reads no clock, randomness or network: it is a pure function
of the subject and the rules file (deterministic: same input, same rules
version, same output).
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

# A field's value, a condition and a message, each of the subject judged.
Getter = Callable[[Any], Any]
Condition = Callable[[Any], bool]
Render = Callable[[Any], str]

_CODE = re.compile(r"[A-Z][A-Z0-9_]*")
_CURRENCY = re.compile(r"[A-Z]{3}")


# --- fields ---------------------------------------------------------------------------


class Kind(Enum):
    """What a field holds, which decides the operators that apply to it."""

    TEXT = "text"
    NUMBER = "number"
    FLAG = "flag"
    LIST = "list"


@dataclass(frozen=True)
class Field:
    """A fact about the subject that rules may test and messages may show."""

    kind: Kind
    get: Getter
    money: bool = False
    symbols: tuple[str, ...] = ()
    """For enum fields: the only values a rule may name (misspelling one is an error)."""
    show_instead: str | None = None
    """For a field a message cannot show (a list of records): the field to show instead."""


@dataclass(frozen=True)
class Facts:
    """What rules may test about the subject they judge.

    Attributes:
        fields: the file's declared currencies (normalised) -> every field a rule
            may use, by name (a field may depend on them: "is the currency known").
        currency: the subject's currency, for money fields; None when it has none
            (its rules files then declare no ``currencies``).
        doc: where the application documents its fields (named in load errors).
    """

    fields: Callable[[frozenset[str]], Mapping[str, Field]]
    currency: Getter | None = None
    doc: str = ""


@dataclass(frozen=True)
class Outcomes:
    """What a rule may decide, strongest first, and what the subject gets when none matches."""

    ranked: tuple[str, ...]
    default: str


def norm(value: Any) -> str:
    """Text as compared: case and surrounding spaces do not count, missing is empty."""
    return "" if value is None else str(value).strip().casefold()


def is_blank(value: Any) -> bool:
    return value is None or not str(value).strip()


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
    """An operand known only per subject: another field, or a per-currency limit."""

    get: Getter


@dataclass(frozen=True)
class Reason:
    """A matched rule's code, and its message rendered for the subject."""

    code: str
    message: str


@dataclass(frozen=True)
class Verdict:
    """What the rules decided about one subject."""

    outcome: str
    reasons: tuple[Reason, ...] = ()

    @property
    def reason_codes(self) -> list[str]:
        return [reason.code for reason in self.reasons]


@dataclass(frozen=True)
class Rule:
    """One compiled rule: its test and message are plain callables over the subject."""

    code: str
    outcome: str
    line: int
    test: Condition
    message: Render


class RuleSet:
    """A loaded rules file, ready to judge subjects.

    The rules of each outcome are kept apart (each in file order), so a subject
    meets a weaker outcome's rules only when no stronger one matched.

    Args:
        version: the file's declared version, carried by each decision.
        path: where the rules were read from.
        rules: the compiled rules, in file order.
        outcomes: what they may decide.
    """

    def __init__(
        self, version: str, path: Path, rules: tuple[Rule, ...], outcomes: Outcomes
    ) -> None:
        self.version = version
        self.path = path
        self.rules = rules
        self.default = outcomes.default
        self._stages = tuple(
            (outcome, tuple(rule for rule in rules if rule.outcome == outcome))
            for outcome in outcomes.ranked
        )

    def evaluate(self, subject: Any) -> Verdict:
        """Judge ``subject``: a pure function of the subject and this rule set.

        Returns:
            The strongest outcome any rule matched, with the reasons of every
            matching rule of that outcome, else the default without reasons;
            reasons in file order.
        """
        for outcome, rules in self._stages:
            matched = [rule for rule in rules if rule.test(subject)]
            if matched:
                return Verdict(
                    outcome,
                    tuple(Reason(rule.code, rule.message(subject)) for rule in matched),
                )
        return Verdict(self.default)


# --- choosing a file ------------------------------------------------------------------


def _version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Natural order, so v10 comes after v9 and 2025.10 after 2025.9."""
    return tuple(
        (0, int(part)) if part.isdigit() else (1, part) for part in re.findall(r"\d+|\D+", version)
    )


def available_versions(directory: Path) -> list[str]:
    """The rules versions in ``directory``, oldest first."""
    return sorted((path.stem for path in directory.glob("*.yaml")), key=_version_key)


def rules_file(version: str | None, directory: Path, variable: str) -> Path:
    """The file of rules ``version``, or of the newest version when it is None.

    Raises:
        ConfigurationError: there is no such version (names ``variable``, the
            setting that chose it).
    """
    versions = available_versions(directory)
    if not versions:
        raise ConfigurationError(
            variable,
            f"there are no rules files (*.yaml) in {_shown(directory)}",
            "Restore the rules directory.",
        )
    if version is None:
        version = versions[-1]
    elif version not in versions:
        raise ConfigurationError(
            variable,
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


def load_rules(path: Path, facts: Facts, outcomes: Outcomes) -> RuleSet:
    """Read, check and compile the rules file at ``path``, about ``facts``, deciding ``outcomes``.

    Raises:
        ConfigurationError: the file is missing, is not YAML, or is not a valid
            rules file; the error's ``variable`` is ``<file>:<line>``.
    """
    hint = "Fix the rules file; the rule language is described in opsflow.nodes.rules" + (
        f", its fields in {facts.doc}." if facts.doc else "."
    )
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigurationError(_shown(path), f"cannot be read ({err.strerror})", hint) from err
    try:
        root = yaml.compose(text, Loader=yaml.CSafeLoader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = mark.line + 1 if mark is not None else 1
        raise ConfigurationError(
            f"{_shown(path)}:{line}", f"is not valid YAML: {err.problem or err.context}", hint
        ) from err
    except yaml.YAMLError as err:
        raise ConfigurationError(_shown(path), f"is not valid YAML: {err}", hint) from err
    if root is None:
        raise ConfigurationError(f"{_shown(path)}:1", "is empty", hint)
    return _Compiler(path, facts, outcomes, hint).ruleset(root)


class _Compiler:
    """Walks the YAML node tree (not plain data) so every error can name its line."""

    def __init__(self, path: Path, facts: Facts, outcomes: Outcomes, hint: str) -> None:
        self.path = path
        self.facts = facts
        self.outcomes = outcomes
        self.hint = hint
        self.scalars = SafeConstructor()
        self.exponents: dict[str, int] = {}
        self.fields: Mapping[str, Field] = {}

    def fail(self, node: yaml.Node, problem: str) -> NoReturn:
        raise ConfigurationError(
            f"{_shown(self.path)}:{node.start_mark.line + 1}", problem, self.hint
        )

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
        keys = ("version", "currencies", "rules") if self.facts.currency else ("version", "rules")
        top = self.mapping(root, "the rules file", required=keys, allowed=keys)
        version_node = top["version"][1]
        version = self.value(version_node, "version", Kind.TEXT)
        if version != self.path.stem:
            self.fail(version_node, f"declares version {version!r} but is named {self.path.name}")
        currencies = top["currencies"][1] if "currencies" in top else None
        for code, (key, digits) in (
            self.mapping(currencies, "currencies") if currencies else {}
        ).items():
            if not _CURRENCY.fullmatch(code):
                self.fail(key, f"currency {code!r} is not an ISO 4217 code like EUR")
            exponent = self.value(digits, f"the minor-unit digits of {code}", Kind.NUMBER)
            if not 0 <= exponent <= 4:
                self.fail(digits, f"{code} has {exponent} minor-unit digits (0 to 4 expected)")
            self.exponents[norm(code)] = exponent
        self.fields = self.facts.fields(frozenset(self.exponents))
        rules: list[Rule] = []
        seen: set[str] = set()
        for node in self.sequence(top["rules"][1], "rules"):
            rule = self.rule(node)
            if rule.code in seen:
                self.fail(node, f"rule code {rule.code} is used twice")
            seen.add(rule.code)
            rules.append(rule)
        return RuleSet(version, self.path, tuple(rules), self.outcomes)

    def rule(self, node: yaml.Node) -> Rule:
        keys = ("code", "outcome", "when", "message")
        parts = self.mapping(node, "a rule", required=keys, allowed=keys)
        code_node = parts["code"][1]
        code = self.value(code_node, "code", Kind.TEXT)
        if not _CODE.fullmatch(code):
            self.fail(code_node, f"rule code {code!r} is not UPPER_SNAKE_CASE")
        outcome_node = parts["outcome"][1]
        outcome = self.value(outcome_node, "outcome", Kind.TEXT)
        if outcome not in self.outcomes.ranked:
            self.fail(
                outcome_node,
                f"rule {code} has unknown outcome {outcome!r} (a rule either "
                f"{' or '.join(self.outcomes.ranked)}; {self.outcomes.default} is what a "
                "subject gets when none matches)",
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
            outcome=outcome,
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
            test = is_blank if op == "blank" else operator.not_
            return (lambda o: test(get(o)) is wanted), None
        if op in ("in", "not_in"):
            items = self.sequence(operand, what)
            values = frozenset(self.operand_value(field, item, what) for item in items)
            return _membership(field, values, negate=op == "not_in"), None
        left = (lambda o: norm(get(o))) if field.kind is Kind.TEXT else get
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
            if norm(code) not in self.exponents:
                self.fail(code_key, f"{code} is not among the declared currencies")
            table[norm(code)] = self.value(amount, f"the {code} limit of {name}", Kind.NUMBER)
        missing = [code.upper() for code in self.exponents if code not in table]
        if missing:
            self.fail(inner, f"per_currency of {name} lacks {', '.join(missing)}")
        currency = self.facts.currency
        assert currency is not None, "money fields need the subject's currency"
        return Dynamic(lambda o: table.get(norm(currency(o))))

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
            return Dynamic(lambda o: norm(other_get(o)))
        return Dynamic(other_get)

    def operand_value(self, field: Field, node: yaml.Node, what: str) -> Any:
        value = self.value(node, what, field.kind)
        if field.symbols and value not in field.symbols:
            self.fail(node, f"{what}: {value!r} is not one of {', '.join(field.symbols)}")
        return norm(value) if field.kind is Kind.TEXT else value

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
            elif name in self.fields and self.fields[name].show_instead:
                instead = self.fields[name].show_instead
                self.fail(node, f"the message of {code} shows {{{name}}}; show {{{instead}}}")
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
        exponents, currency = self.exponents, self.facts.currency
        assert currency is not None, "money fields need the subject's currency"

        def render(subject: Any) -> str:
            # An undeclared currency is shown with two digits, the ISO 4217 common case.
            return _money(get(subject), exponents.get(norm(currency(subject)), 2))

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
    return lambda subject: _as_text(get(subject))


def _joined(parts: list[str | Render]) -> Render:
    def render(subject: Any) -> str:
        return "".join(part if isinstance(part, str) else part(subject) for part in parts)

    return render


def _membership(field: Field, values: frozenset[Any], *, negate: bool) -> Condition:
    get = field.get
    if field.kind is Kind.TEXT:
        if negate:
            return lambda o: norm(get(o)) not in values
        return lambda o: norm(get(o)) in values
    if negate:
        return lambda o: get(o) not in values
    return lambda o: get(o) in values


def _comparison(left: Getter, compare: Callable[[Any, Any], bool], right: Any) -> Condition:
    if not isinstance(right, Dynamic):
        return lambda o: compare(left(o), right)
    resolve = right.get

    def dynamic(subject: Any) -> bool:
        # None: no per-currency limit for this subject's currency, so no match.
        limit = resolve(subject)
        return limit is not None and compare(left(subject), limit)

    return dynamic


def _all(conditions: list[Condition]) -> Condition:
    """The AND of ``conditions``, short-circuiting; a lone condition is returned as it is."""
    if len(conditions) == 1:
        return conditions[0]
    checks = tuple(conditions)

    return lambda subject: all(check(subject) for check in checks)
