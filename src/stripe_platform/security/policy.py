"""The access policy as code (issue 21, docs/access.md): roles, users, IdP groups and MFA rules, read
from one YAML file (access/policy.yaml) that is reviewed like code.

Every store's target (security/access_postgres.py, access_warehouse.py, access_api.py) and the API's
authorisation read this module, never the file. Loading refuses anything it cannot act on with the
file and line named: an unknown role, scope, data class or store, a grant to a table or schema that
does not exist, rules that overlap or contradict each other, entries listed twice, bad dates.

The data classes are the classification catalog's (governance/classification.py); the tables a rule
may name are the catalog's OLTP tables.
"""

from __future__ import annotations

import datetime as dt
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import yaml

from stripe_platform.errors import PlatformError
from stripe_platform.governance.classification import DataClass, load_catalog
from stripe_platform.paths import REPO_ROOT

if TYPE_CHECKING:
    from stripe_platform.config import Settings

# The API's scopes: a closed list, each checked by one route family (api/auth.py).
API_SCOPES: frozenset[str] = frozenset(
    {
        "fraud.score",  # POST /v1/fraud/score (machines)
        "customers.read",  # customers, masked unless `clear` allows
        "payments.read",  # payment instruments
        "exports.run",  # bulk exports
        "access.admin",  # the access API itself (tokens, MFA resets)
        "privacy.requests",  # privacy requests (issue 23)
        "compliance.read",  # the compliance dashboard, its KPIs and evidence (issue 23)
    }
)
# Where a user is provisioned (the targets); a role's grants per store are its own sections.
USER_STORES: frozenset[str] = frozenset({"postgres", "warehouse", "api"})
WAREHOUSE_SCHEMAS: frozenset[str] = frozenset({"raw", "marts", "marts_masked"})
DATA_CLASSES: frozenset[str] = frozenset(c.value for c in DataClass)
# Every role reads non-personal data in clear; `clear` lists what else it may.
ALWAYS_CLEAR = DataClass.NON_PERSONAL.value
# The MFA rule for bulk exports, beside the data classes in mfa.required_for.
BULK_EXPORTS = "bulk_exports"

# PostgreSQL privileges per kind of object ("ALL" expands to these; MAINTAIN exists from 17 on).
PRIVILEGES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "database": ("CREATE", "CONNECT", "TEMPORARY"),
        "schema": ("USAGE", "CREATE"),
        "tables": (
            "SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER", "MAINTAIN"
        ),
        "table": (
            "SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER", "MAINTAIN"
        ),
        "sequences": ("USAGE", "SELECT", "UPDATE"),
    }
)  # fmt: skip
# Schemas whose privileges belong to the platform's own roles, never to the policy: key material
# (KeyAdmin, 0012) and access control's state (AccessAdmin, 0015) stay apart from data access.
PLATFORM_SCHEMAS = frozenset({"keys", "access"})
# Roles the platform creates for itself; a policy role or user cannot take their names.
PLATFORM_ROLES = frozenset(
    {"keyadmin", "accessadmin", "temporary_access", "access_policy_user", "public"}
)

ROLE_NAME = re.compile(r"^[a-z][a-z0-9_]{1,62}$")
# Users are PostgreSQL login roles, warehouse users and SSO names (often e-mail addresses).
USER_NAME = re.compile(r"^[a-z0-9][a-z0-9_.@+-]{1,62}$")


class PolicyError(PlatformError, ValueError):
    """The policy cannot be used as written; the message names file:line of every problem."""


@dataclass(frozen=True)
class GrantRule:
    """One OLTP rule of a role, in the brief's GRANT syntax.

    object_kind: "database" (the managed database, whatever its name), "schema" (`schema` set),
    "tables"/"sequences" (ALL TABLES/SEQUENCES IN SCHEMA `schema`, present and future), "table"
    (`tables`, lowercase, in `schema` public). ``deny`` (a REVOKE line) narrows what the role's
    other rules grant on the tables it names. ``privileges`` are upper case, "ALL" kept as such.
    """

    privileges: tuple[str, ...]
    object_kind: str
    schema: str | None
    tables: tuple[str, ...]
    deny: bool
    line: int
    text: str

    def expanded(self) -> frozenset[str]:
        """The privileges, "ALL" expanded for this kind of object."""
        if "ALL" in self.privileges:
            return frozenset(PRIVILEGES[self.object_kind])
        return frozenset(self.privileges)


@dataclass(frozen=True)
class Role:
    name: str
    description: str
    postgres: tuple[GrantRule, ...]
    warehouse: tuple[str, ...]
    clear: frozenset[str]  # always holds non_personal
    api: frozenset[str]
    line: int = 0


@dataclass(frozen=True)
class User:
    name: str
    roles: tuple[str, ...]
    until: dt.datetime | None  # aware; a date in the file means the end of that day (UTC)
    reason: str | None
    stores: frozenset[str]
    line: int

    def active(self, now: dt.datetime) -> bool:
        return self.until is None or now < self.until


@dataclass(frozen=True)
class MfaRules:
    step_up_seconds: int
    required_for: frozenset[str]  # data classes, and "bulk_exports"
    max_failures: int
    lockout_seconds: int


@dataclass(frozen=True)
class Policy:
    roles: Mapping[str, Role]
    users: Mapping[str, User]
    groups: Mapping[str, tuple[str, ...]]  # IdP group -> roles
    mfa: MfaRules
    source: Path

    def roles_for(
        self, user: str, groups: Iterable[str] = (), now: dt.datetime | None = None
    ) -> frozenset[str]:
        """The policy user's roles (none once its `until` passed) and the roles its IdP groups map
        to. Unknown groups map to nothing."""
        now = now or dt.datetime.now(dt.UTC)
        roles: set[str] = set()
        entry = self.users.get(user.lower())
        if entry is not None and entry.active(now):
            roles.update(entry.roles)
        for group in groups:
            roles.update(self.groups.get(group, ()))
        return frozenset(roles)

    def may_read_clear(self, roles: Iterable[str], data_class: str) -> bool:
        if data_class not in DATA_CLASSES:
            raise PolicyError(f"unknown data class {data_class!r}; known: {_known(DATA_CLASSES)}")
        return any(data_class in self.roles[r].clear for r in roles if r in self.roles)

    def has_scope(self, roles: Iterable[str], scope: str) -> bool:
        if scope not in API_SCOPES:
            raise PolicyError(f"unknown API scope {scope!r}; known: {_known(API_SCOPES)}")
        return any(scope in self.roles[r].api for r in roles if r in self.roles)

    def needs_step_up(self, data_classes: Iterable[str], *, bulk: bool = False) -> bool:
        required = self.mfa.required_for
        return (bulk and BULK_EXPORTS in required) or any(c in required for c in data_classes)

    def where(self, line: int) -> str:
        return f"{self.source}:{line}"


# --- loading ----------------------------------------------------------------------------------

_cache: dict[Path, tuple[tuple[int, int], Policy]] = {}
_cache_lock = threading.Lock()


def load_policy(settings: Settings | None = None, *, path: Path | None = None) -> Policy:
    """The policy at ``path`` (default: settings.access_policy), validated; cached until the file
    changes (path, mtime, size)."""
    if path is None:
        if settings is None:
            from stripe_platform.config import get_settings

            settings = get_settings()
        path = settings.access_policy
    path = Path(path).resolve()
    try:
        stat = path.stat()
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read the access policy: {exc.strerror}") from exc
    stamp = (stat.st_mtime_ns, stat.st_size)
    with _cache_lock:
        cached = _cache.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
    policy = _Reader(path).read()
    with _cache_lock:
        _cache[path] = (stamp, policy)
    return policy


def check_policy(policy: Policy, now: dt.datetime) -> list[str]:
    """What `access apply` refuses on at ``now``, each with its file:line: temporary grants whose
    end already passed (plan and revoke-expired still work with them)."""
    return [
        f"{policy.where(user.line)}: user {user.name}: temporary grant ended at "
        f"{user.until.isoformat()} (already expired): remove the entry or move `until` forward"
        for user in policy.users.values()
        if user.until is not None and not user.active(now)
    ]


def _known(values: Iterable[str]) -> str:
    return ", ".join(sorted(values))


def known_tables() -> frozenset[str]:
    """The OLTP tables a rule may name (public schema): the classification catalog's."""
    return frozenset(load_catalog(REPO_ROOT).datasets("postgres"))


def known_schemas(sql_dir: Path = REPO_ROOT / "sql" / "oltp") -> frozenset[str]:
    """public and every schema the OLTP migrations create."""
    found = {"public"}
    pattern = re.compile(r"CREATE\s+SCHEMA\s+(?:IF\s+NOT\s+EXISTS\s+)?\"?(\w+)", re.IGNORECASE)
    for script in sorted(sql_dir.glob("*.sql")):
        found.update(m[1].lower() for m in pattern.finditer(script.read_text()))
    return frozenset(found)


_STATEMENT = re.compile(
    r"^(?P<verb>GRANT|REVOKE)\s+(?P<privs>.+?)\s+ON\s+(?P<object>.+?)"
    r"(?:\s+(?:TO|FROM)\s+(?P<grantee>\"?\w+\"?))?\s*;?\s*$",
    re.IGNORECASE | re.DOTALL,
)
_IDENT = re.compile(r'^"?([A-Za-z_][A-Za-z0-9_]*)"?$')


class _Problems(Exception):
    pass


class _Reader:
    """Reads the YAML node tree (yaml.compose keeps every node's line) into a Policy, gathering every
    problem with its line before raising them all at once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.problems: list[tuple[int, str]] = []  # (line, message)
        self._tables: frozenset[str] | None = None
        self._schemas: frozenset[str] | None = None

    # helpers -----------------------------------------------------------------------------------
    def fail(self, node: yaml.Node | int, message: str) -> None:
        line = node if isinstance(node, int) else node.start_mark.line + 1
        self.problems.append((line, message))

    @staticmethod
    def line(node: yaml.Node) -> int:
        return node.start_mark.line + 1

    def mapping(self, node: yaml.Node, what: str) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        """key -> (key node, value node); a key listed twice is a problem (YAML would keep the
        last one silently)."""
        if not isinstance(node, yaml.MappingNode):
            self.fail(node, f"{what}: expected a mapping")
            return {}
        found: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key, value in node.value:
            if not isinstance(key, yaml.ScalarNode):
                self.fail(key, f"{what}: keys must be plain names")
                continue
            name = str(key.value)
            if name in found:
                first = self.line(found[name][0])
                self.fail(key, f"{what}: {name!r} is listed twice (first at line {first})")
                continue
            found[name] = (key, value)
        return found

    def known_keys(self, fields: Mapping[str, Any], allowed: Iterable[str], what: str) -> None:
        allowed = set(allowed)
        for name, (key, _) in fields.items():
            if name not in allowed:
                self.fail(key, f"{what}: unknown key {name!r}; known: {_known(allowed)}")

    def scalar(self, node: yaml.Node, what: str) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            self.fail(node, f"{what}: expected a single value")
            return None
        return self._loader.construct_object(node)

    def text(self, node: yaml.Node, what: str) -> str | None:
        value = self.scalar(node, what)
        if value is None:
            return None
        if not isinstance(value, str):
            self.fail(node, f"{what}: expected text, not {value!r}")
            return None
        return value

    def integer(self, node: yaml.Node, what: str, minimum: int = 1) -> int | None:
        value = self.scalar(node, what)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            self.fail(node, f"{what}: expected a whole number >= {minimum}, not {value!r}")
            return None
        return value

    def names(self, node: yaml.Node, what: str) -> list[tuple[str, yaml.Node]]:
        """A list of names (a single name is accepted as a one-item list); duplicates refused."""
        items = node.value if isinstance(node, yaml.SequenceNode) else [node]
        found: list[tuple[str, yaml.Node]] = []
        for item in items:
            value = self.text(item, what)
            if value is None:
                continue
            if any(value == seen for seen, _ in found):
                self.fail(item, f"{what}: {value!r} is listed twice")
                continue
            found.append((value, item))
        return found

    def vocabulary(
        self, node: yaml.Node, what: str, known: frozenset[str], kind: str
    ) -> frozenset[str]:
        chosen = set()
        for value, item in self.names(node, what):
            if value not in known:
                self.fail(item, f"{what}: unknown {kind} {value!r}; known: {_known(known)}")
            else:
                chosen.add(value)
        return frozenset(chosen)

    @property
    def tables(self) -> frozenset[str]:
        if self._tables is None:
            self._tables = known_tables()
        return self._tables

    @property
    def schemas(self) -> frozenset[str]:
        if self._schemas is None:
            self._schemas = known_schemas()
        return self._schemas

    # the document ------------------------------------------------------------------------------
    def read(self) -> Policy:
        try:
            text = self.path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise PolicyError(f"{self.path}: cannot read the access policy: {exc}") from exc
        self._loader = yaml.SafeLoader(text)
        try:
            root = self._loader.get_single_node()
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + 1 if mark else 1
            raise PolicyError(f"{self.path}:{line}: not valid YAML: {exc.problem}") from exc
        finally:
            self._loader.dispose()
        if root is None:
            raise PolicyError(f"{self.path}:1: the access policy is empty")
        top = self.mapping(root, "policy")
        self.known_keys(top, ("version", "roles", "groups", "users", "mfa"), "policy")
        if "version" in top and self.scalar(top["version"][1], "version") != 1:
            self.fail(top["version"][1], "version: this platform reads version 1")
        if "roles" not in top:
            self.fail(root, "policy: no `roles` section")
            raise PolicyError(f"{self.path}:1: policy: no `roles` section")
        roles = self.read_roles(top["roles"][1])
        groups = self.read_groups(top["groups"][1], roles) if "groups" in top else {}
        users = self.read_users(top["users"][1], roles) if "users" in top else {}
        mfa = self.read_mfa(top.get("mfa", (None, None))[1], root)
        if self.problems:
            problems = [f"{self.path}:{line}: {message}" for line, message in sorted(self.problems)]
            raise PolicyError(
                f"access policy {self.path}: {len(problems)} problem(s)\n  " + "\n  ".join(problems)
            )
        return Policy(
            roles=MappingProxyType(roles),
            users=MappingProxyType(users),
            groups=MappingProxyType(groups),
            mfa=mfa,
            source=self.path,
        )

    def read_roles(self, node: yaml.Node) -> dict[str, Role]:
        roles: dict[str, Role] = {}
        for name, (key, value) in self.mapping(node, "roles").items():
            what = f"role {name}"
            if not ROLE_NAME.match(name) or name.startswith("pg_") or name in PLATFORM_ROLES:
                self.fail(
                    key,
                    f"{what}: role names are 2-63 lowercase letters, digits or _ (PostgreSQL folds "
                    "case), not pg_* nor a platform role",
                )
                continue
            fields = self.mapping(value, what)
            self.known_keys(fields, ("description", "postgres", "warehouse", "clear", "api"), what)
            description = ""
            if "description" in fields:
                description = self.text(fields["description"][1], f"{what}: description") or ""
            rules = ()
            if "postgres" in fields:
                rules = self.read_rules(fields["postgres"][1], name)
            warehouse: tuple[str, ...] = ()
            if "warehouse" in fields:
                chosen = self.vocabulary(
                    fields["warehouse"][1], f"{what}: warehouse", WAREHOUSE_SCHEMAS, "schema"
                )
                warehouse = tuple(sorted(chosen))
            clear = {ALWAYS_CLEAR}
            if "clear" in fields:
                clear |= self.vocabulary(
                    fields["clear"][1], f"{what}: clear", DATA_CLASSES, "data class"
                )
            api = frozenset()
            if "api" in fields:
                api = self.vocabulary(fields["api"][1], f"{what}: api", API_SCOPES, "API scope")
            roles[name] = Role(
                name=name,
                description=description,
                postgres=rules,
                warehouse=warehouse,
                clear=frozenset(clear),
                api=api,
                line=self.line(key),
            )
        return roles

    # OLTP rules --------------------------------------------------------------------------------
    def read_rules(self, node: yaml.Node, role: str) -> tuple[GrantRule, ...]:
        what = f"role {role}: postgres"
        if not isinstance(node, yaml.SequenceNode):
            self.fail(node, f"{what}: expected a list of GRANT/REVOKE statements")
            return ()
        rules: list[GrantRule] = []
        for item in node.value:
            text = self.text(item, what)
            if text is not None:
                rules += self.parse_rule(" ".join(text.split()), role, self.line(item))
        self.check_overlaps(rules, role)
        return tuple(rules)

    def parse_rule(self, text: str, role: str, line: int) -> list[GrantRule]:
        what = f"role {role}: {text!r}"
        match = _STATEMENT.match(text)
        if not match:
            self.fail(
                line,
                f"{what}: expected `GRANT <privileges> ON <object>` or `REVOKE <privileges> ON "
                "<tables>` (the brief's GRANT syntax; `TO <role>` optional)",
            )
            return []
        grantee = match["grantee"]
        if grantee and grantee.strip('"').lower() != role:
            self.fail(line, f"{what}: this rule is under role {role} but names {grantee}")
            return []
        deny = match["verb"].upper() == "REVOKE"
        kind, schemas, tables = self.parse_object(match["object"].strip(), what, line)
        if kind is None:
            return []
        privileges = self.parse_privileges(match["privs"], kind, what, line)
        if privileges is None:
            return []
        if deny and kind != "table":
            self.fail(
                line,
                f"{what}: REVOKE narrows what the role's GRANTs give on named tables; "
                "write the GRANT narrower instead",
            )
            return []
        if kind == "table":
            return [GrantRule(privileges, kind, "public", tables, deny, line, text)]
        if kind == "database":
            return [GrantRule(privileges, kind, None, (), deny, line, text)]
        return [GrantRule(privileges, kind, s, (), deny, line, text) for s in schemas]

    def parse_object(
        self, text: str, what: str, line: int
    ) -> tuple[str | None, tuple[str, ...], tuple[str, ...]]:
        words = text.split(None, 1)
        head = words[0].upper()
        if head == "DATABASE":
            # The brief writes `ON DATABASE mydb`: the rule applies to the database the target
            # manages (settings.pg_database), whatever name the statement gives.
            rest = words[1] if len(words) > 1 else ""
            if rest and not _IDENT.match(rest):
                self.fail(line, f"{what}: one database name at most")
                return None, (), ()
            return "database", (), ()
        match = re.match(r"^ALL\s+(TABLES|SEQUENCES)\s+IN\s+SCHEMA\s+(.+)$", text, re.IGNORECASE)
        if match:
            schemas = self.parse_schemas(match[2], what, line)
            return (match[1].lower() if schemas else None), schemas, ()
        if head == "SCHEMA":
            schemas = self.parse_schemas(words[1] if len(words) > 1 else "", what, line)
            return ("schema" if schemas else None), schemas, ()
        if head in ("TABLE", "SEQUENCE", "FUNCTION", "ALL"):
            if head != "TABLE":
                self.fail(line, f"{what}: the policy grants on a database, schemas, tables and "
                          "all tables or sequences of a schema")  # fmt: skip
                return None, (), ()
            text = words[1] if len(words) > 1 else ""
        tables = []
        for item in self.split_names(text, what, line):
            schema, _, table = item.rpartition(".")
            if schema and schema != "public":
                self.fail(
                    line,
                    f"{what}: a rule on a table names one of the catalog's tables (schema "
                    f"public); {item} is not one: use ALL TABLES IN SCHEMA {schema}",
                )
                return None, (), ()
            if table not in self.tables:
                self.fail(
                    line,
                    f"{what}: no table {table!r} in the OLTP schema (sql/oltp, the "
                    "classification catalog)",
                )
                return None, (), ()
            tables.append(table)
        return ("table" if tables else None), (), tuple(tables)

    def parse_schemas(self, text: str, what: str, line: int) -> tuple[str, ...]:
        schemas = self.split_names(text, what, line)
        for schema in schemas:
            if schema in PLATFORM_SCHEMAS:
                self.fail(
                    line,
                    f"{what}: schema {schema} belongs to the platform's own roles (keys: KeyAdmin, "
                    "access: AccessAdmin), never to the policy",
                )
                return ()
            if schema not in self.schemas:
                self.fail(
                    line,
                    f"{what}: no schema {schema!r} in the OLTP database (known: "
                    f"{_known(self.schemas - PLATFORM_SCHEMAS)})",
                )
                return ()
        return tuple(schemas)

    def split_names(self, text: str, what: str, line: int) -> list[str]:
        names = []
        for item in (part.strip() for part in text.split(",")):
            parts = [_IDENT.match(p) for p in item.split(".")] if item else [None]
            if not all(parts) or len(parts) > 2:
                self.fail(line, f"{what}: {item!r} is not a name")
                return []
            names.append(".".join(p[1].lower() for p in parts if p))
        return names

    def parse_privileges(
        self, text: str, kind: str, what: str, line: int
    ) -> tuple[str, ...] | None:
        if "(" in text:
            self.fail(
                line,
                f"{what}: no column lists: the columns a role reads come from its `clear` "
                "classes and the classification catalog",
            )
            return None
        privileges: list[str] = []
        for item in (" ".join(p.split()).upper() for p in text.split(",")):
            item = {"ALL PRIVILEGES": "ALL", "TEMP": "TEMPORARY"}.get(item, item)
            if item != "ALL" and item not in PRIVILEGES[kind]:
                self.fail(
                    line,
                    f"{what}: {item!r} is not a privilege on a {kind} (known: "
                    f"ALL, {', '.join(PRIVILEGES[kind])})",
                )
                return None
            if item in privileges:
                self.fail(line, f"{what}: {item} is listed twice")
                return None
            privileges.append(item)
        if "ALL" in privileges and len(privileges) > 1:
            self.fail(line, f"{what}: ALL already holds the other privileges listed")
            return None
        return tuple(privileges)

    def check_overlaps(self, rules: list[GrantRule], role: str) -> None:
        """Every (privilege, object) is granted by one rule at most; a REVOKE narrows a GRANT of
        another rule (an ALL TABLES one) and never contradicts a GRANT on the same named table."""
        granted: dict[tuple[str, str], GrantRule] = {}
        for rule in (r for r in rules if not r.deny):
            overlap = None
            for privilege in sorted(rule.expanded()):
                for target in _atoms(rule, self.tables):
                    first = granted.setdefault((privilege, target), rule)
                    if first is not rule and overlap is None:
                        overlap = (first, privilege, target)
            if overlap is not None:
                first, privilege, target = overlap
                self.fail(
                    rule.line,
                    f"role {role}: {rule.text!r} overlaps line {first.line} ({privilege} on "
                    f"{target} granted twice)",
                )
        denied: dict[tuple[str, str], GrantRule] = {}
        for rule in (r for r in rules if r.deny):
            for privilege in sorted(rule.expanded()):
                for table in rule.tables:
                    target = f"table {table}"
                    grant = granted.get((privilege, target))
                    if (privilege, target) in denied:
                        self.fail(
                            rule.line,
                            f"role {role}: {rule.text!r} overlaps line "
                            f"{denied[(privilege, target)].line} ({privilege} on {table} revoked "
                            "twice)",
                        )
                    elif grant is None:
                        self.fail(
                            rule.line,
                            f"role {role}: {rule.text!r} revokes {privilege} on {table}, which no "
                            "GRANT of this role gives",
                        )
                    elif grant.object_kind == "table":
                        self.fail(
                            rule.line,
                            f"role {role}: {rule.text!r} contradicts line {grant.line} (which "
                            f"grants {privilege} on {table})",
                        )
                    denied[(privilege, target)] = rule

    # groups, users, MFA -------------------------------------------------------------------------
    def role_list(self, node: yaml.Node, what: str, roles: Mapping[str, Role]) -> tuple[str, ...]:
        chosen = []
        for value, item in self.names(node, what):
            if value not in roles:
                self.fail(item, f"{what}: unknown role {value!r}; known: {_known(roles)}")
            else:
                chosen.append(value)
        if not chosen and not (isinstance(node, yaml.SequenceNode) and node.value):
            self.fail(node, f"{what}: name at least one role")
        return tuple(chosen)

    def read_groups(self, node: yaml.Node, roles: Mapping[str, Role]) -> dict[str, tuple[str, ...]]:
        return {
            name: self.role_list(value, f"group {name}", roles)
            for name, (_, value) in self.mapping(node, "groups").items()
        }

    def read_users(self, node: yaml.Node, roles: Mapping[str, Role]) -> dict[str, User]:
        if isinstance(node, yaml.ScalarNode) and node.value in ("", "~", "null"):
            return {}  # `users:` with every entry commented out
        users: dict[str, User] = {}
        for name, (key, value) in self.mapping(node, "users").items():
            what = f"user {name}"
            if name != name.lower() or not USER_NAME.match(name):
                self.fail(key, f"{what}: user names are 2-63 lowercase letters, digits or _.@+-")
                continue
            if name in roles or name in PLATFORM_ROLES or name.startswith("pg_"):
                self.fail(key, f"{what}: the name is taken by a role")
                continue
            fields = self.mapping(value, what)
            self.known_keys(fields, ("roles", "until", "reason", "stores"), what)
            if "roles" not in fields:
                self.fail(key, f"{what}: no `roles`")
                continue
            user_roles = self.role_list(fields["roles"][1], f"{what}: roles", roles)
            until = self.read_until(fields["until"][1], what) if "until" in fields else None
            reason = (
                self.text(fields["reason"][1], f"{what}: reason") if "reason" in fields else None
            )
            stores = USER_STORES
            if "stores" in fields:
                stores = self.vocabulary(
                    fields["stores"][1], f"{what}: stores", USER_STORES, "store"
                )
            users[name] = User(name, user_roles, until, reason, stores, self.line(key))
        return users

    def read_until(self, node: yaml.Node, what: str) -> dt.datetime | None:
        try:
            value = self.scalar(node, f"{what}: until")
        except (ValueError, yaml.YAMLError):  # a date-shaped value that is no date (2025-02-30)
            value = node.value
        if isinstance(value, dt.datetime):
            if value.tzinfo is None:
                # PyYAML turns an explicit offset into naive UTC; a value without one is ambiguous.
                if not re.search(r"(Z|[+-]\d\d(:?\d\d)?)$", str(node.value).strip()):
                    self.fail(node, f"{what}: until {node.value}: give a time zone (Z or +hh:mm)")
                    return None
                value = value.replace(tzinfo=dt.UTC)
            return value.astimezone(dt.UTC)
        if isinstance(value, dt.date):
            # A date means access through that whole day (UTC).
            return dt.datetime.combine(value + dt.timedelta(days=1), dt.time(), dt.UTC)
        self.fail(node, f"{what}: until {node.value!r} is not a date (YYYY-MM-DD or an ISO time)")
        return None

    def read_mfa(self, node: yaml.Node | None, root: yaml.Node) -> MfaRules:
        defaults = MfaRules(600, frozenset({"pii", "pci", "credential", BULK_EXPORTS}), 5, 900)
        if node is None:
            return defaults
        fields = self.mapping(node, "mfa")
        self.known_keys(
            fields, ("step_up_seconds", "required_for", "max_failures", "lockout_seconds"), "mfa"
        )

        def number(name: str, default: int) -> int:
            if name not in fields:
                return default
            return self.integer(fields[name][1], f"mfa: {name}") or default

        required = defaults.required_for
        if "required_for" in fields:
            required = self.vocabulary(
                fields["required_for"][1],
                "mfa: required_for",
                DATA_CLASSES | {BULK_EXPORTS},
                "data class",
            )
        return MfaRules(
            step_up_seconds=number("step_up_seconds", defaults.step_up_seconds),
            required_for=required,
            max_failures=number("max_failures", defaults.max_failures),
            lockout_seconds=number("lockout_seconds", defaults.lockout_seconds),
        )


def _atoms(rule: GrantRule, tables: frozenset[str]) -> list[str]:
    """The objects a rule covers, for overlap checks (ALL TABLES of public covers its tables)."""
    if rule.object_kind == "database":
        return ["database"]
    if rule.object_kind == "schema":
        return [f"schema {rule.schema}"]
    if rule.object_kind == "sequences":
        return [f"sequences of {rule.schema}"]
    if rule.object_kind == "tables":
        if rule.schema == "public":
            return [f"table {t}" for t in sorted(tables)]
        return [f"tables of {rule.schema}"]
    return [f"table {t}" for t in rule.tables]
