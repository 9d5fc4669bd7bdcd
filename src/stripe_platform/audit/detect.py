"""Detection rules over the audit trail's Log documents (issue 22, "Watch").

The rules are declarative Sigma-style YAML files in ``audit/rules/`` (one rule per file, reviewed
like code). What a rule may say, and the extensions to Sigma, are documented in
``audit/rules/README.md``. In short:

- ``detection``: named selections (field: value, ``field|modifier: value``; a list of values means
  any of them, several fields in one selection mean all of them) and a ``condition`` combining them
  with ``and``/``or``/``not``, parentheses, ``1 of name*``/``all of them``. A selection is tested
  against each *line* of a Log document together with its document's fields; a document matches
  when one of its lines does.
- ``correlation`` (optional, after Sigma's correlation rules): ``event_count`` (at least N matching
  documents per ``group-by`` within ``timespan``: bursts) or ``value_sum_baseline`` (this
  extension: a day's sum of a field per ``group-by`` against the same group's previous ``days``
  days, z-score).

Fields the rules see: the document's (user, dbname, remote_host, application_name, session_id,
source, pid), the line's (error_severity, state_code, message) and derived ones (statement,
command, relations, classes_read from the classification catalog, uncleared_classes from the access
policy, rows, off_hours, grant_expired).

``detect`` returns one :class:`Finding` per rule, group and UTC day (``dedup_key``): a burst of a
hundred failed logins is one finding carrying the hundred documents as evidence, and the hourly
watch re-finding it adds to the same incident (audit/incidents.py groups on the key).
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import functools
import logging
import re
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from stripe_platform.audit.access_log import _tokens, summarise_sql
from stripe_platform.errors import PlatformError
from stripe_platform.governance.classification import DataClass

log = logging.getLogger(__name__)

RULES_DIR = Path(__file__).parent / "rules"
LEVELS = ("informational", "low", "medium", "high", "critical")
SEVERITIES = ("low", "medium", "high", "critical")
# logsource.product -> the Log document's `source` (written by the collector; seed documents,
# which have none, are PostgreSQL's).
PRODUCTS = {"postgresql": "postgres", "stripe-platform-api": "api"}
DOC_FIELDS = frozenset(
    {"user", "dbname", "remote_host", "application_name", "session_id", "source", "pid"}
)
LINE_FIELDS = frozenset({"error_severity", "state_code", "message"})
DERIVED_FIELDS = frozenset(
    {
        "statement",
        "command",
        "relations",
        "classes_read",
        "uncleared_classes",
        "rows",
        "off_hours",
        "grant_expired",
        "platform_account",
    }
)
FIELDS = DOC_FIELDS | LINE_FIELDS | DERIVED_FIELDS
ALL_CLASSES = frozenset(c.value for c in DataClass)
MODIFIERS = frozenset({"contains", "startswith", "endswith", "re", "gt", "gte", "lt", "lte", "all"})
RULE_KEYS = frozenset(
    {
        "title",
        "id",
        "status",
        "description",
        "author",
        "date",
        "references",
        "tags",
        "logsource",
        "detection",
        "correlation",
        "business_hours",
        "falsepositives",
        "level",
        "seed_labels",
    }
)
REQUIRED_KEYS = ("title", "id", "status", "description", "logsource", "detection", "level")
STATUSES = frozenset({"stable", "test", "experimental", "deprecated", "unsupported"})

_STATEMENT_MESSAGE = re.compile(r"^(?:statement|execute(?: fetch from)? [^:]*): (.*)$", re.DOTALL)
_ROWS = re.compile(r"\brows: (\d+)")
_TIMESPAN = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_HHMM = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")
_OFFSET = re.compile(r"^([+-])(\d{2}):(\d{2})$")


class RuleError(PlatformError, ValueError):
    """A rule file cannot be used as written; the message names file:line."""


# --- findings --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """What a rule (or the log model, rule "model:log_anomaly") found. ``evidence``: the Log
    documents' ids; ``source``: the client address (remote_host) of the first evidence document;
    ``dedup_key``: one incident per key while it is open."""

    rule: str
    severity: str  # low|medium|high|critical
    title: str
    user: str | None
    source: str | None
    at: dt.datetime
    evidence: tuple[str, ...]
    dedup_key: str
    detail: dict = field(default_factory=dict)


# --- rules ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldTest:
    field: str
    modifiers: tuple[str, ...]
    values: tuple[Any, ...]


@dataclass(frozen=True)
class EventCount:
    group_by: tuple[str, ...]
    timespan: dt.timedelta
    minimum: int  # condition gte


@dataclass(frozen=True)
class ValueSumBaseline:
    field: str
    group_by: tuple[str, ...]
    days: int  # baseline length, in days before the day looked at
    zscore: float
    min_value: float  # a day below this never fires, whatever its z-score
    stddev_floor: float  # the baseline's spread is at least this share of its mean (and >= 1)


@dataclass(frozen=True)
class BusinessHours:
    start: dt.time
    end: dt.time
    offset: dt.timedelta  # from UTC

    def off(self, at: dt.datetime) -> bool:
        local = (at.astimezone(dt.UTC) + self.offset).time()
        return not (self.start <= local < self.end)


DEFAULT_HOURS = BusinessHours(dt.time(8), dt.time(19), dt.timedelta(hours=1))


@dataclass(frozen=True)
class Rule:
    name: str  # the file's stem: what findings and incidents call the rule
    id: str
    title: str
    description: str
    status: str
    level: str
    source: str | None  # the Log documents' `source` the rule reads (None: all)
    selections: Mapping[str, tuple[FieldTest, ...]]
    condition: str
    correlation: EventCount | ValueSumBaseline | None
    business_hours: BusinessHours
    seed_labels: tuple[str, ...]  # the seed's anomalyType values this rule is meant to find
    path: Path
    _test: Callable[[Event], bool] = field(repr=False, compare=False, default=lambda e: False)

    @property
    def severity(self) -> str:
        return "low" if self.level == "informational" else self.level

    def matches(self, event: Event) -> bool:
        return self._test(event)


def load_rules(path: Path | None = None) -> list[Rule]:
    """The rules in ``path`` (a directory of *.yaml, or one file; default: the packaged rules),
    validated; a bad file is refused with every problem named file:line."""
    path = Path(path) if path is not None else RULES_DIR
    files = sorted(path.glob("*.yaml")) if path.is_dir() else [path]
    if not files:
        raise RuleError(f"{path}: no rule files (*.yaml)")
    rules = [_RuleReader(f).read() for f in files]
    seen: dict[str, Path] = {}
    for rule in rules:
        if rule.id in seen:
            raise RuleError(f"{rule.path}: id {rule.id} is also the id of {seen[rule.id]}")
        seen[rule.id] = rule.path
    return rules


class _RuleReader:
    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, node: yaml.Node | None, message: str) -> RuleError:
        line = node.start_mark.line + 1 if node is not None else 1
        return RuleError(f"{self.path}:{line}: {message}")

    def mapping(self, node: yaml.Node, what: str) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, f"{what} must be a mapping")
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key, value in node.value:
            if not isinstance(key, yaml.ScalarNode):
                raise self.fail(key, f"{what}: keys must be plain names")
            if key.value in out:
                raise self.fail(key, f"{what}: {key.value!r} given twice")
            out[key.value] = (key, value)
        return out

    def text(self, node: yaml.Node, what: str) -> str:
        if not isinstance(node, yaml.ScalarNode) or not str(node.value).strip():
            raise self.fail(node, f"{what} must be a non-empty text")
        return str(node.value).strip()

    def plain(self, node: yaml.Node) -> Any:
        return yaml.safe_load(yaml.serialize(node))

    def read(self) -> Rule:
        try:
            text = self.path.read_text()
        except OSError as exc:
            raise RuleError(f"{self.path}: cannot read the rule: {exc.strerror}") from exc
        try:
            root = yaml.compose(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = mark.line + 1 if mark is not None else 1
            raise RuleError(f"{self.path}:{line}: not valid YAML: {exc}") from exc
        if root is None:
            raise RuleError(f"{self.path}:1: empty rule file")
        top = self.mapping(root, "the rule")
        for key, (knode, _) in top.items():
            if key not in RULE_KEYS:
                raise self.fail(
                    knode, f"unknown key {key!r}; known: {', '.join(sorted(RULE_KEYS))}"
                )
        for key in REQUIRED_KEYS:
            if key not in top:
                raise self.fail(root, f"missing required key {key!r}")
        level = self.text(top["level"][1], "level")
        if level not in LEVELS:
            raise self.fail(top["level"][1], f"level {level!r}: one of {', '.join(LEVELS)}")
        status = self.text(top["status"][1], "status")
        if status not in STATUSES:
            raise self.fail(top["status"][1], f"status {status!r}: one of {sorted(STATUSES)}")
        selections, condition, test = self.detection(top["detection"][1])
        correlation = self.correlation(top["correlation"][1]) if "correlation" in top else None
        hours = self.hours(top["business_hours"][1]) if "business_hours" in top else DEFAULT_HOURS
        labels: tuple[str, ...] = ()
        if "seed_labels" in top:
            value = self.plain(top["seed_labels"][1])
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise self.fail(top["seed_labels"][1], "seed_labels: a list of anomalyType names")
            labels = tuple(value)
        return Rule(
            name=self.path.stem,
            id=self.text(top["id"][1], "id"),
            title=self.text(top["title"][1], "title"),
            description=self.text(top["description"][1], "description"),
            status=status,
            level=level,
            source=self.logsource(top["logsource"][1]),
            selections=selections,
            condition=condition,
            correlation=correlation,
            business_hours=hours,
            seed_labels=labels,
            path=self.path,
            _test=test,
        )

    def logsource(self, node: yaml.Node) -> str | None:
        fields = self.mapping(node, "logsource")
        if "product" not in fields:
            return None
        product = self.text(fields["product"][1], "logsource.product")
        if product not in PRODUCTS:
            raise self.fail(
                fields["product"][1], f"logsource.product {product!r}: one of {sorted(PRODUCTS)}"
            )
        return PRODUCTS[product]

    def detection(
        self, node: yaml.Node
    ) -> tuple[dict[str, tuple[FieldTest, ...]], str, Callable[[Event], bool]]:
        fields = self.mapping(node, "detection")
        if "condition" not in fields:
            raise self.fail(node, "detection: missing 'condition'")
        selections: dict[str, tuple[FieldTest, ...]] = {}
        for name, (knode, value) in fields.items():
            if name == "condition":
                continue
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise self.fail(knode, f"selection name {name!r}: letters, digits and _")
            selections[name] = self.selection(name, value)
        cnode = fields["condition"][1]
        condition = self.text(cnode, "detection.condition")
        try:
            test = _compile_condition(condition, selections)
        except ValueError as exc:
            raise self.fail(cnode, f"condition {condition!r}: {exc}") from exc
        return selections, condition, test

    def selection(self, name: str, node: yaml.Node) -> tuple[FieldTest, ...]:
        tests = []
        for key, (knode, vnode) in self.mapping(node, f"selection {name}").items():
            field_name, *modifiers = key.split("|")
            if field_name not in FIELDS:
                raise self.fail(
                    knode,
                    f"selection {name}: unknown field {field_name!r}; known: {', '.join(sorted(FIELDS))}",
                )
            for modifier in modifiers:
                if modifier not in MODIFIERS:
                    raise self.fail(
                        knode,
                        f"selection {name}: unknown modifier {modifier!r}; known: {', '.join(sorted(MODIFIERS))}",
                    )
            value = self.plain(vnode)
            values = tuple(value) if isinstance(value, list) else (value,)
            if not values:
                raise self.fail(vnode, f"selection {name}: {key} has no value")
            for v in values:
                if isinstance(v, (dict, list)):
                    raise self.fail(vnode, f"selection {name}: {key}: values must be plain")
                if "re" in modifiers:
                    try:
                        re.compile(str(v))
                    except re.error as exc:
                        raise self.fail(
                            vnode, f"selection {name}: {key}: bad regex: {exc}"
                        ) from exc
                if {"gt", "gte", "lt", "lte"} & set(modifiers) and not isinstance(v, (int, float)):
                    raise self.fail(vnode, f"selection {name}: {key}: a number is needed")
            tests.append(FieldTest(field_name, tuple(modifiers), values))
        if not tests:
            raise self.fail(node, f"selection {name} is empty")
        return tuple(tests)

    def correlation(self, node: yaml.Node) -> EventCount | ValueSumBaseline:
        fields = self.mapping(node, "correlation")
        known = {
            "event_count": {"type", "group-by", "timespan", "condition"},
            "value_sum_baseline": {"type", "group-by", "timespan", "field", "baseline"},
        }
        if "type" not in fields:
            raise self.fail(node, "correlation: missing 'type'")
        kind = self.text(fields["type"][1], "correlation.type")
        if kind not in known:
            raise self.fail(fields["type"][1], f"correlation.type {kind!r}: one of {sorted(known)}")
        for key, (knode, _) in fields.items():
            if key not in known[kind]:
                raise self.fail(knode, f"correlation ({kind}): unknown key {key!r}")
        for key in known[kind]:
            if key not in fields:
                raise self.fail(node, f"correlation ({kind}): missing {key!r}")
        group_by = self.plain(fields["group-by"][1])
        group_by = [group_by] if isinstance(group_by, str) else group_by
        if not isinstance(group_by, list) or not all(g in DOC_FIELDS for g in group_by):
            raise self.fail(
                fields["group-by"][1], f"group-by: document fields among {sorted(DOC_FIELDS)}"
            )
        span_node = fields["timespan"][1]
        match = _TIMESPAN.match(self.text(span_node, "timespan"))
        if not match or int(match.group(1)) < 1:
            raise self.fail(span_node, "timespan: a number and a unit (s, m, h, d), e.g. 10m")
        span = dt.timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2)])
        if kind == "event_count":
            cond = self.plain(fields["condition"][1])
            if not (
                isinstance(cond, dict)
                and set(cond) == {"gte"}
                and isinstance(cond["gte"], int)
                and cond["gte"] >= 1
            ):
                raise self.fail(
                    fields["condition"][1], "condition: {gte: N}, N a whole number >= 1"
                )
            return EventCount(tuple(group_by), span, cond["gte"])
        if span != dt.timedelta(days=1):
            raise self.fail(span_node, "value_sum_baseline: timespan must be 1d (a day per value)")
        value_field = self.text(fields["field"][1], "field")
        if value_field != "rows":
            raise self.fail(
                fields["field"][1], "value_sum_baseline: field must be a numeric field (rows)"
            )
        base_node = fields["baseline"][1]
        base = self.plain(base_node)
        spec = {
            "days": int,
            "zscore": (int, float),
            "min_value": (int, float),
            "stddev_floor": (int, float),
        }
        if not isinstance(base, dict) or set(base) != set(spec):
            raise self.fail(base_node, f"baseline: exactly {', '.join(spec)}")
        for key, kinds in spec.items():
            if isinstance(base[key], bool) or not isinstance(base[key], kinds) or base[key] < 0:
                raise self.fail(base_node, f"baseline.{key}: a non-negative number")
        if base["days"] < 2:
            raise self.fail(base_node, "baseline.days: at least 2")
        return ValueSumBaseline(
            value_field,
            tuple(group_by),
            base["days"],
            float(base["zscore"]),
            float(base["min_value"]),
            float(base["stddev_floor"]),
        )

    def hours(self, node: yaml.Node) -> BusinessHours:
        fields = self.mapping(node, "business_hours")
        if set(fields) != {"start", "end", "utc_offset"}:
            raise self.fail(node, "business_hours: start, end (HH:MM) and utc_offset (+HH:MM)")
        times = []
        for key in ("start", "end"):
            text = self.text(fields[key][1], f"business_hours.{key}")
            match = _HHMM.match(text)
            if not match:
                raise self.fail(fields[key][1], f"business_hours.{key}: HH:MM, not {text!r}")
            times.append(dt.time(int(match.group(1)), int(match.group(2))))
        if times[0] >= times[1]:
            raise self.fail(node, "business_hours: start must be before end")
        text = self.text(fields["utc_offset"][1], "business_hours.utc_offset")
        match = _OFFSET.match(text)
        if not match:
            raise self.fail(
                fields["utc_offset"][1], f"business_hours.utc_offset: +HH:MM, not {text!r}"
            )
        sign = -1 if match.group(1) == "-" else 1
        offset = sign * dt.timedelta(hours=int(match.group(2)), minutes=int(match.group(3)))
        return BusinessHours(times[0], times[1], offset)


# --- conditions --------------------------------------------------------------------------------

_COND_TOKEN = re.compile(r"\s*(\(|\)|[A-Za-z_][A-Za-z0-9_]*\*?|\S+)")


def _compile_condition(
    text: str, selections: Mapping[str, tuple[FieldTest, ...]]
) -> Callable[[Event], bool]:
    """Sigma's condition language: and, or, not, parentheses, `1 of x*`, `all of x*`, `them`."""
    tokens = _COND_TOKEN.findall(text)
    pos = 0

    def peek() -> str | None:
        return tokens[pos] if pos < len(tokens) else None

    def take() -> str:
        nonlocal pos
        if pos >= len(tokens):
            raise ValueError("ends too early")
        pos += 1
        return tokens[pos - 1]

    def names(pattern: str) -> list[str]:
        found = [n for n in selections if pattern == "them" or fnmatch.fnmatchcase(n, pattern)]
        if not found:
            raise ValueError(f"no selection matches {pattern!r}")
        return found

    def selection(name: str) -> Callable[[Event], bool]:
        if name not in selections:
            raise ValueError(f"unknown selection {name!r}")
        tests = selections[name]
        return lambda e: all(_field_matches(e, t) for t in tests)

    def factor() -> Callable[[Event], bool]:
        word = take()
        if word == "not":
            inner = factor()
            return lambda e: not inner(e)
        if word == "(":
            inner = expr()
            if take() != ")":
                raise ValueError("missing )")
            return inner
        if word in ("1", "all") and peek() == "of":
            take()
            parts = [selection(n) for n in names(take())]
            if word == "1":
                return lambda e: any(p(e) for p in parts)
            return lambda e: all(p(e) for p in parts)
        if word in ("and", "or", ")"):
            raise ValueError(f"unexpected {word!r}")
        return selection(word)

    def term() -> Callable[[Event], bool]:
        parts = [factor()]
        while peek() == "and":
            take()
            parts.append(factor())
        return parts[0] if len(parts) == 1 else lambda e: all(p(e) for p in parts)

    def expr() -> Callable[[Event], bool]:
        parts = [term()]
        while peek() == "or":
            take()
            parts.append(term())
        return parts[0] if len(parts) == 1 else lambda e: any(p(e) for p in parts)

    result = expr()
    if pos != len(tokens):
        raise ValueError(f"unexpected {tokens[pos]!r}")
    return result


def _field_matches(event: Event, test: FieldTest) -> bool:
    value = event.get(test.field)
    found = value if isinstance(value, (set, frozenset, tuple, list)) else (value,)

    def one(expected: Any) -> bool:
        return any(_value_matches(v, expected, test.modifiers) for v in found)

    if "all" in test.modifiers:
        return all(one(x) for x in test.values)
    return any(one(x) for x in test.values)


def _value_matches(value: Any, expected: Any, modifiers: tuple[str, ...]) -> bool:
    if expected is None:
        return value is None
    if value is None:
        return False
    for op in ("gt", "gte", "lt", "lte"):
        if op in modifiers:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return False
            return {
                "gt": value > expected,
                "gte": value >= expected,
                "lt": value < expected,
                "lte": value <= expected,
            }[op]
    if isinstance(expected, bool) or isinstance(value, bool):
        return value is expected
    text, want = str(value).lower(), str(expected).lower()  # Sigma: case-insensitive
    if "re" in modifiers:
        return re.search(str(expected), str(value)) is not None
    if "contains" in modifiers:
        return want in text
    if "startswith" in modifiers:
        return text.startswith(want)
    if "endswith" in modifiers:
        return text.endswith(want)
    return text == want


# --- what the rules know besides the logs -----------------------------------------------------


@dataclass(frozen=True)
class Context:
    """The catalog's classified columns, who holds which policy roles, and when grants end."""

    columns: Mapping[
        str, Mapping[str, str]
    ]  # OLTP table -> column -> data class (not non_personal)
    roles: Mapping[str, frozenset[str]]  # login -> policy roles (policy users, PG memberships)
    ends: Mapping[str, dt.datetime]  # login -> end of its access (policy `until`, VALID UNTIL)
    clear: Mapping[str, frozenset[str]]  # policy role -> data classes it reads in clear
    notes: tuple[str, ...] = ()  # what could not be read (say it, do not hide it)
    # The platform's own logins (PostgreSQL superusers: the service role that holds the keys and
    # runs migrations, seeds, syncs and nightly jobs): cleared for everything by design; their
    # misuse shows in the other rules (privilege changes, failed logins), not as "reads".
    platform: frozenset[str] = frozenset()

    def cleared(self, user: str | None) -> frozenset[str]:
        if not user:
            return frozenset()
        if user.lower() in self.platform:
            return ALL_CLASSES
        roles = set(self.roles.get(user.lower(), ()))
        if user.lower() in self.clear:  # a login named after a policy role (the brief's Admin)
            roles.add(user.lower())
        return frozenset().union(*(self.clear.get(r, frozenset()) for r in roles))


def load_context(settings: Any, *, conn: Any = None, database: bool = True) -> Context:
    """The context from the catalog (governance/classification.py), the access policy
    (security/policy.py) and, when ``database``, PostgreSQL's role memberships and `db
    grant-temporary` logins (oltp/access.py). An unreachable database is noted, not fatal."""
    from stripe_platform.governance.classification import load_catalog
    from stripe_platform.security.policy import load_policy

    columns: dict[str, dict[str, str]] = defaultdict(dict)
    for entry in load_catalog().for_store("postgres"):
        if entry.data_class.value != "non_personal":
            columns[entry.dataset.lower()][entry.field.lower()] = entry.data_class.value
    policy = load_policy(settings)
    clear = {name: frozenset(role.clear) for name, role in policy.roles.items()}
    roles: dict[str, set[str]] = defaultdict(set)
    ends: dict[str, dt.datetime] = {}
    for name, user in policy.users.items():
        roles[name.lower()].update(user.roles)
        if user.until is not None:
            ends[name.lower()] = user.until
    notes: list[str] = []
    platform: set[str] = set()
    if database:
        try:
            _database_context(settings, conn, clear, roles, ends, platform)
        except Exception as exc:  # any failure to read PostgreSQL is reported, not fatal
            notes.append(
                f"PostgreSQL role memberships and temporary grants not read ({exc}): "
                "expired_grant and pci_read_by_uncleared_role see the policy file only"
            )
            log.warning("audit rules: %s", notes[-1])
    return Context(
        columns={t: dict(c) for t, c in columns.items()},
        roles={u: frozenset(r) for u, r in roles.items()},
        ends=ends,
        clear=clear,
        notes=tuple(notes),
        platform=frozenset(platform),
    )


def _database_context(
    settings: Any,
    conn: Any,
    clear: Mapping[str, frozenset[str]],
    roles: dict[str, set[str]],
    ends: dict[str, dt.datetime],
    platform: set[str],
) -> None:
    from stripe_platform.oltp import access, db

    def read(c: Any) -> None:
        platform.update(
            name.lower()
            for (name,) in c.execute("SELECT rolname FROM pg_roles WHERE rolsuper AND rolcanlogin")
        )
        rows = c.execute(
            """WITH RECURSIVE m(login, role) AS (
                   SELECT r.rolname, g.rolname FROM pg_roles r
                   JOIN pg_auth_members a ON a.member = r.oid JOIN pg_roles g ON g.oid = a.roleid
                   WHERE r.rolcanlogin
                 UNION
                   SELECT m.login, g.rolname FROM m
                   JOIN pg_roles p ON p.rolname = m.role
                   JOIN pg_auth_members a ON a.member = p.oid JOIN pg_roles g ON g.oid = a.roleid)
               SELECT login, role FROM m"""
        ).fetchall()
        for login, role in rows:
            if role.lower() in clear:
                roles[login.lower()].add(role.lower())
        for grant in access.list_temporary(c):
            roles[grant.user.lower()].add(grant.role)
            if grant.valid_until is not None:
                ends[grant.user.lower()] = min(
                    grant.valid_until, ends.get(grant.user.lower(), grant.valid_until)
                )

    if conn is not None:
        read(conn)
        return
    with db.connect(settings, autocommit=True, with_key=False, connect_timeout="3") as c:
        read(c)


# --- events: a line of a Log document with its document's fields --------------------------------


@functools.lru_cache(maxsize=65536)
def _statement_shape(statement: str) -> tuple[str, tuple[str, ...], frozenset[str], bool]:
    """(command, relations, identifiers named, whether all columns are read: `*` or a COPY of a
    whole table). Statements repeat (parameters, not literals), so this is cached."""
    command, relations = summarise_sql(statement)
    tokens = [(k, t) for k, t in _tokens(statement) if k not in ("ws", "comment")]
    names = frozenset(t.lower() for k, t in tokens if k == "ident") | frozenset(
        t.strip('"') for k, t in tokens if k == "qident"
    )
    star = any(t == "*" and (i == 0 or tokens[i - 1][1] != "(") for i, (_, t) in enumerate(tokens))
    whole_copy = command == "COPY" and len(tokens) > 1 and tokens[1][1] != "("
    return command, tuple(r.split(".")[-1].lower() for r in relations), names, star or whole_copy


def _when(value: Any) -> dt.datetime | None:
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=dt.UTC)  # pymongo: naive UTC
    if isinstance(value, str):
        try:
            return _when(dt.datetime.fromisoformat(value.replace("Z", "+00:00")))
        except ValueError:
            return None
    return None


class Event:
    """One line of one Log document, with derived fields computed on first use."""

    __slots__ = ("_cache", "at", "ctx", "doc", "hours", "line")

    def __init__(self, doc: Mapping, line: Mapping, ctx: Context, hours: BusinessHours) -> None:
        self.doc, self.line, self.ctx, self.hours = doc, line, ctx, hours
        self.at = _when(line.get("timestamp")) or _when(doc.get("session_start"))
        self._cache: dict[str, Any] = {}

    def get(self, name: str) -> Any:
        if name in LINE_FIELDS:
            return self.line.get(name)
        if name == "source":
            return self.doc.get("source", "postgres")
        if name in DOC_FIELDS:
            return self.doc.get(name)
        if name not in self._cache:
            self._cache[name] = getattr(self, f"_{name}")()
        return self._cache[name]

    def _statement(self) -> str | None:
        match = _STATEMENT_MESSAGE.match(self.line.get("message") or "")
        return match.group(1) if match else self.line.get("statement")

    def _shape(self) -> tuple[str, tuple[str, ...], frozenset[str], bool] | None:
        statement = self.get("statement")
        return _statement_shape(statement) if statement else None

    def _command(self) -> str | None:
        shape = self._shape()
        return shape[0] if shape else None

    def _relations(self) -> tuple[str, ...]:
        shape = self._shape()
        return shape[1] if shape else ()

    def _classes_read(self) -> frozenset[str]:
        """The data classes of the catalog columns the statement names (all the table's for `*` or
        a whole-table COPY)."""
        shape = self._shape()
        if not shape:
            return frozenset()
        _, relations, names, everything = shape
        classes: set[str] = set()
        for relation in relations:
            columns = self.ctx.columns.get(relation, {})
            named = [c for col, c in columns.items() if col in names]
            classes.update(columns.values() if everything and not named else named)
            if everything and named:
                classes.update(columns.values())
        return frozenset(classes)

    def _uncleared_classes(self) -> frozenset[str]:
        return self.get("classes_read") - self.ctx.cleared(self.doc.get("user"))

    def _rows(self) -> int | None:
        match = _ROWS.search(self.line.get("message") or "")
        return int(match.group(1)) if match else None

    def _off_hours(self) -> bool:
        return self.at is not None and self.hours.off(self.at)

    def _platform_account(self) -> bool:
        return str(self.doc.get("user") or "").lower() in self.ctx.platform

    def _grant_expired(self) -> bool:
        end = self.ctx.ends.get(str(self.doc.get("user") or "").lower())
        return end is not None and self.at is not None and self.at >= end


# --- detection ---------------------------------------------------------------------------------


def _doc_id(doc: Mapping) -> str:
    return str(doc.get("_id"))


def _first_match(rule: Rule, doc: Mapping, ctx: Context) -> Event | None:
    if rule.source is not None and doc.get("source", "postgres") != rule.source:
        return None
    for line in doc.get("lines") or ():
        event = Event(doc, line, ctx, rule.business_hours)
        if event.at is not None and rule.matches(event):
            return event
    return None


def detect(
    settings: Any,
    docs: Iterable[Mapping],
    *,
    now: dt.datetime,
    history: Iterable[Mapping] = (),
    rules: Sequence[Rule] | None = None,
    context: Context | None = None,
) -> list[Finding]:
    """Run the rules over ``docs`` (the window looked at). ``history``: earlier Log documents (up to
    15 days before, for baselines; minutes before, so a burst cut by the window's start still
    counts); findings are only reported when they hold a document of ``docs``. ``now`` is when the
    detection runs (recorded in each finding). ``context`` defaults to :func:`load_context`."""
    rules = load_rules() if rules is None else rules
    ctx = context if context is not None else load_context(settings)
    current = {_doc_id(d): d for d in docs}
    everything = {_doc_id(d): d for d in history}
    everything.update(current)
    findings: list[Finding] = []
    for rule in rules:
        matched = []
        for doc_id, doc in everything.items():
            event = _first_match(rule, doc, ctx)
            if event is not None:
                matched.append((event.at, doc_id, event))
        matched.sort(key=lambda m: (m[0], m[1]))
        if isinstance(rule.correlation, EventCount):
            findings += _bursts(rule, rule.correlation, matched, current, now)
        elif isinstance(rule.correlation, ValueSumBaseline):
            first_seen: dict[tuple[str, ...], dt.date] = {}
            for doc in everything.values():  # days before a user's first record are unknown
                seen = doc_time(doc)
                if seen is not None:
                    group = tuple(str(doc.get(g) or "") for g in rule.correlation.group_by)
                    day = seen.astimezone(dt.UTC).date()
                    first_seen[group] = min(day, first_seen.get(group, day))
            findings += _baseline(rule, rule.correlation, matched, current, now, first_seen)
        else:
            findings += _per_day(rule, [m for m in matched if m[1] in current], now)
    findings.sort(key=lambda f: (f.at, f.rule, f.dedup_key))
    return findings


def _group(event: Event, group_by: Sequence[str]) -> tuple[str, ...]:
    return tuple(str(event.get(g) or "") for g in group_by)


def _finding(
    rule: Rule,
    events: list[tuple[dt.datetime, str, Event]],
    key: str,
    now: dt.datetime,
    detail: dict,
) -> Finding:
    first = events[0][2]
    user = first.doc.get("user")
    hosts = sorted(
        {str(e.doc.get("remote_host")) for _, _, e in events if e.doc.get("remote_host")}
    )
    return Finding(
        rule=rule.name,
        severity=rule.severity,
        title=f"{rule.title}: {user or 'unknown user'} ({len(events)} log records)",
        user=user,
        source=first.doc.get("remote_host"),
        at=events[0][0],
        evidence=tuple(doc_id for _, doc_id, _ in events),
        dedup_key=key,
        detail={
            "rule_id": rule.id,
            "count": len(events),
            "first": events[0][0].isoformat(),
            "last": events[-1][0].isoformat(),
            "hosts": hosts,
            "detected_at": now.isoformat(),
            **detail,
        },
    )


def _key(rule: Rule, group: Sequence[str], day: dt.date) -> str:
    return f"{rule.name}:{'/'.join(group)}:{day.isoformat()}"


def _per_day(rule: Rule, matched: list, now: dt.datetime) -> list[Finding]:
    by_key: dict[tuple[tuple[str, ...], dt.date], list] = defaultdict(list)
    for m in matched:
        by_key[(_group(m[2], ("user",)), m[0].astimezone(dt.UTC).date())].append(m)
    out = []
    for (group, day), events in by_key.items():
        statements = sorted({s for _, _, e in events if (s := e.get("statement"))})[:5]
        out.append(_finding(rule, events, _key(rule, group, day), now, {"statements": statements}))
    return out


def _bursts(
    rule: Rule, corr: EventCount, matched: list, current: Mapping, now: dt.datetime
) -> list[Finding]:
    """Chains of matches per group, consecutive ones at most ``timespan`` apart; a chain with at
    least ``minimum`` matches inside one ``timespan`` is a burst (the whole chain is evidence)."""
    groups: dict[tuple[str, ...], list] = defaultdict(list)
    for m in matched:
        groups[_group(m[2], corr.group_by)].append(m)
    out = []
    for group, events in groups.items():
        chains: list[list] = []
        for m in events:
            if chains and m[0] - chains[-1][-1][0] <= corr.timespan:
                chains[-1].append(m)
            else:
                chains.append([m])
        for chain in chains:
            if not any(doc_id in current for _, doc_id, _ in chain):
                continue
            densest, lo = 0, 0
            for hi in range(len(chain)):
                while chain[hi][0] - chain[lo][0] > corr.timespan:
                    lo += 1
                densest = max(densest, hi - lo + 1)
            if densest >= corr.minimum:
                day = chain[0][0].astimezone(dt.UTC).date()
                detail = {"group": dict(zip(corr.group_by, group, strict=True)), "densest": densest}
                out.append(_finding(rule, chain, _key(rule, group, day), now, detail))
    return out


def doc_time(doc: Mapping) -> dt.datetime | None:
    """When a Log document starts: its session start, else its first line."""
    lines = doc.get("lines") or [{}]
    return _when(doc.get("session_start")) or _when(lines[0].get("timestamp"))


def _baseline(
    rule: Rule,
    corr: ValueSumBaseline,
    matched: list,
    current: Mapping,
    now: dt.datetime,
    first_seen: Mapping[tuple[str, ...], dt.date],
) -> list[Finding]:
    """A day's sum of the field per group against the group's previous ``days`` days (days since
    the group's first record; 0 when inactive; earlier days are unknown, and with no known day the
    sum is judged on min_value alone). A robust z-score (median and MAD, so a few earlier attack
    days do not become the norm): z = (day - median) / max(1.4826 * MAD, stddev_floor * median, 1).
    """
    days: dict[tuple[str, ...], dict[dt.date, list]] = defaultdict(lambda: defaultdict(list))
    for m in matched:
        days[_group(m[2], corr.group_by)][m[0].astimezone(dt.UTC).date()].append(m)
    out = []
    for group, per_day in days.items():
        totals = {
            d: sum(e.get(corr.field) or 0 for _, _, e in events) for d, events in per_day.items()
        }
        start = first_seen.get(group, min(per_day))
        for day, events in per_day.items():
            if not any(doc_id in current for _, doc_id, _ in events):
                continue
            value = totals[day]
            past = [
                totals.get(d, 0)
                for k in range(1, corr.days + 1)
                if (d := day - dt.timedelta(days=k)) >= start
            ] or [0]
            median = statistics.median(past)
            mad = statistics.median(abs(p - median) for p in past)
            spread = max(1.4826 * mad, corr.stddev_floor * median, 1.0)
            z = (value - median) / spread
            if value >= corr.min_value and z >= corr.zscore:
                detail = {
                    "group": dict(zip(corr.group_by, group, strict=True)),
                    corr.field: value,
                    "baseline_days": len(past),
                    "baseline_median": median,
                    "baseline_mad": mad,
                    "zscore": round(z, 2),
                }
                out.append(_finding(rule, events, _key(rule, group, day), now, detail))
    return out


# --- quality ----------------------------------------------------------------------------------


def _ratio(a: int, b: int) -> float | None:
    return round(a / b, 4) if b else None


def evaluate(
    docs_with_labels: Iterable[Mapping],
    findings: Iterable[Finding],
    rules: Sequence[Rule] | None = None,
) -> dict[str, Any]:
    """Precision and recall against the seed's ground truth (isAnomaly/anomalyType), per rule and
    overall, counted on Log documents: a document is flagged when it is evidence of a finding.
    Per rule, recall is over the anomaly types the rule declares (seed_labels); precision over
    everything it flagged. Also: false alerts (findings whose evidence holds no planted anomaly)
    per day of the data."""
    rules = load_rules() if rules is None else rules
    findings = list(findings)
    labels: dict[str, str | None] = {}
    days: set[dt.date] = set()
    for doc in docs_with_labels:
        labels[_doc_id(doc)] = (
            (doc.get("anomalyType") or "anomaly") if doc.get("isAnomaly") else None
        )
        at = _when(doc.get("session_start")) or _when(
            (doc.get("lines") or [{}])[0].get("timestamp")
        )
        if at is not None:
            days.add(at.astimezone(dt.UTC).date())
    anomalous = {d for d, t in labels.items() if t}

    def scores(flagged: set[str], wanted: set[str]) -> dict[str, Any]:
        hit = flagged & anomalous
        return {
            "flagged": len(flagged),
            "true_positives": len(hit),
            "precision": _ratio(len(hit), len(flagged)),
            "recall": _ratio(len(flagged & wanted), len(wanted)),
            "anomalies": len(wanted),
        }

    per_rule = {}
    for rule in rules:
        mine = [f for f in findings if f.rule == rule.name]
        flagged = {e for f in mine for e in f.evidence if e in labels}
        wanted = {d for d in anomalous if labels[d] in rule.seed_labels}
        per_rule[rule.name] = {
            **scores(flagged, wanted),
            "findings": len(mine),
            "labels": list(rule.seed_labels),
        }
    flagged_all = {e for f in findings for e in f.evidence if e in labels}
    per_type = {
        kind: scores(flagged_all, {d for d in anomalous if labels[d] == kind})["recall"]
        for kind in sorted({t for t in labels.values() if t})
    }
    false = [f for f in findings if not any(labels.get(e) for e in f.evidence)]
    false_days: dict[str, int] = defaultdict(int)
    for f in false:
        false_days[f.at.astimezone(dt.UTC).date().isoformat()] += 1
    return {
        "documents": len(labels),
        "days": len(days),
        "rules": per_rule,
        "overall": {**scores(flagged_all, anomalous), "findings": len(findings)},
        "recall_by_type": per_type,
        "false_alerts": {
            "total": len(false),
            "per_day": _ratio(len(false), len(days)),
            "max_in_a_day": max(false_days.values(), default=0),
            "by_rule": {r.name: sum(1 for f in false if f.rule == r.name) for r in rules},
        },
    }


def evaluate_labelled(
    settings: Any,
    docs: Sequence[Mapping],
    *,
    test_days: int | None = None,
    rules: Sequence[Rule] | None = None,
) -> dict[str, Any]:
    """The rules on labelled Log documents (the seed's, with isAnomaly/anomalyType): precision,
    recall and false alerts (:func:`evaluate`). ``test_days``: score only the last N days, the
    earlier ones serving as the baselines' history (the time split the log model is held to).
    The seeded users are not PostgreSQL roles: the policy file is the whole context."""
    rules = load_rules() if rules is None else rules
    context = load_context(settings, database=False)
    history: list[Mapping] = []
    if test_days is not None:
        times = [t for d in docs if (t := doc_time(d)) is not None]
        cut = max(times) - dt.timedelta(days=test_days)
        history = [d for d in docs if (doc_time(d) or cut) < cut]
        docs = [d for d in docs if (doc_time(d) or cut) >= cut]
    now = dt.datetime.now(dt.UTC)
    findings = detect(settings, docs, now=now, history=history, rules=rules, context=context)
    report = evaluate(docs, findings, rules)
    report["test_days"] = test_days
    return report
