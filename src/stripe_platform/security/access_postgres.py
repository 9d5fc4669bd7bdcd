"""The access policy's PostgreSQL (OLTP) target (issue 21, docs/access.md).

Desired state, from the policy and the classification catalog:
- every policy role with `postgres` rules exists, NOLOGIN;
- its privileges on the database, schemas, tables, sequences (and the default privileges of the
  role that creates tables, so tables created later are covered), narrowed to column privileges on
  every table (partitions included, read directly) holding a column of a class outside its `clear`;
- access.column_clear holds each role's clear column labels: apply_column_privileges() (run after
  every migration and partition change, sql/oltp/0019) narrows new tables and partitions from it;
- every active policy user with the postgres store is a LOGIN role, VALID UNTIL its `until`, member
  of its roles and of the marker role access_policy_user; a user whose `until` passed, or who left
  the policy, has no login role.

Actual state, from the catalogs: pg_database.datacl, pg_namespace.nspacl, pg_class.relacl,
pg_attribute.attacl (aclexplode), pg_default_acl, pg_roles, pg_auth_members, access.column_clear.

Roles outside the policy: the platform's own (the service role running this, KeyAdmin, AccessAdmin,
the marker roles, superusers, pg_*) are ignored; any other role's privileges here, or membership in
a policy role, is drift, except the logins made by `db grant-temporary` (members of
temporary_access): temporary grants outside the policy that expire on their own (:func:`expired`,
:func:`revoke_expired`).
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import psycopg

from stripe_platform.audit import access_log
from stripe_platform.errors import PlatformError
from stripe_platform.governance.classification import OLTP_LABELS, DataClass, load_catalog
from stripe_platform.oltp import db
from stripe_platform.security.access import Change, ExpiredAccess, operator
from stripe_platform.security.policy import GrantRule, Policy, PolicyError, Role, check_policy

if TYPE_CHECKING:
    from stripe_platform.config import Settings

NAME = "postgres"
# Members are the logins this target made for policy users (sql/oltp/0019).
POLICY_USER_ROLE = "access_policy_user"
# Members are the logins `db grant-temporary` made (sql/oltp/0001, oltp/access.py).
TEMPORARY_ROLE = "temporary_access"
PLATFORM_ROLES = frozenset({"keyadmin", "accessadmin", TEMPORARY_ROLE, POLICY_USER_ROLE})
# The privileges PostgreSQL keeps per column; the others stay table-wide.
COLUMN_PRIVILEGES = frozenset({"SELECT", "INSERT", "UPDATE", "REFERENCES"})
TABLE_KINDS = frozenset("rpvmf")
LABELS = {data_class.value: label for label, data_class in OLTP_LABELS.items()}
REMEDY = "stripe-platform access revoke-expired"


class AccessTargetError(PlatformError, RuntimeError):
    pass


# --- reading the database ---------------------------------------------------------------------

# (kind, schema, object, column, grantee): kind is database, schema, table, sequence, column,
# default_tables or default_sequences; grantee "PUBLIC" for PUBLIC.
Key = tuple[str, str | None, str, str | None, str]


@dataclass
class _Relation:
    schema: str
    name: str
    kind: str  # relkind
    root: str  # the partition root's name (itself when not a partition)
    root_schema: str
    columns: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)  # column -> the root's comment label


@dataclass
class _RoleRow:
    name: str
    login: bool
    superuser: bool
    valid_until: dt.datetime | None
    member_of: frozenset[str]


@dataclass
class _State:
    service: str
    database: str
    server_version: int
    relations: list[_Relation]
    schemas: set[str]
    grants: dict[Key, set[str]]
    roles: dict[str, _RoleRow]
    column_clear: dict[str, frozenset[str]]


def _connect(settings: Settings) -> psycopg.Connection:
    return db.connect(settings, autocommit=True, with_key=False)


def _read(conn: psycopg.Connection) -> _State:
    service, database, version = conn.execute(
        "SELECT current_user, current_database(), current_setting('server_version_num')::int"
    ).fetchone()
    ready = conn.execute("SELECT to_regclass('access.column_clear') IS NOT NULL").fetchone()[0]
    if not ready:
        raise AccessTargetError(
            f"database {database} has no access.column_clear (sql/oltp/0019): run "
            "`stripe-platform db migrate` first"
        )
    system = "n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname !~ '^pg_'"
    relations: dict[tuple[str, str], _Relation] = {}
    for schema, name, kind, root_schema, root in conn.execute(
        f"""SELECT n.nspname, c.relname, c.relkind, rn.nspname, r.relname
            FROM pg_class c
            JOIN pg_namespace n ON n.oid = c.relnamespace
            JOIN pg_class r ON r.oid = coalesce(pg_partition_root(c.oid), c.oid)
            JOIN pg_namespace rn ON rn.oid = r.relnamespace
            WHERE {system} AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')
            ORDER BY 1, 2"""
    ).fetchall():
        relations[(schema, name)] = _Relation(schema, name, kind, root, root_schema)
    for schema, name, column, label in conn.execute(
        f"""SELECT n.nspname, c.relname, a.attname,
                   substring(col_description(r.oid, ra.attnum) FROM '^([A-Z]+):')
            FROM pg_class c
            JOIN pg_namespace n ON n.oid = c.relnamespace
            JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
            JOIN pg_class r ON r.oid = coalesce(pg_partition_root(c.oid), c.oid)
            LEFT JOIN pg_attribute ra ON ra.attrelid = r.oid AND ra.attname = a.attname
            WHERE {system} AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
            ORDER BY n.nspname, c.relname, a.attnum"""
    ).fetchall():
        relation = relations[(schema, name)]
        relation.columns.append(column)
        if label:
            relation.labels[column] = label
    grants: dict[Key, set[str]] = defaultdict(set)
    queries = {
        "database": """SELECT 'database', NULL, d.datname, NULL, a.grantee, a.privilege_type
            FROM pg_database d, aclexplode(coalesce(d.datacl, acldefault('d', d.datdba))) a
            WHERE d.datname = current_database() AND a.grantee NOT IN (0, d.datdba)""",
        "schema": f"""SELECT 'schema', n.nspname, n.nspname, NULL, a.grantee, a.privilege_type
            FROM pg_namespace n, aclexplode(n.nspacl) a
            WHERE {system} AND a.grantee NOT IN (0, n.nspowner)""",
        "relation": f"""SELECT CASE c.relkind WHEN 'S' THEN 'sequence' ELSE 'table' END,
                   n.nspname, c.relname, NULL, a.grantee, a.privilege_type
            FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace, aclexplode(c.relacl) a
            WHERE {system} AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')
              AND a.grantee <> c.relowner""",
        "column": f"""SELECT 'column', n.nspname, c.relname, t.attname, a.grantee, a.privilege_type
            FROM pg_attribute t JOIN pg_class c ON c.oid = t.attrelid
            JOIN pg_namespace n ON n.oid = c.relnamespace, aclexplode(t.attacl) a
            WHERE {system} AND t.attnum > 0 AND NOT t.attisdropped AND t.attacl IS NOT NULL
              AND a.grantee <> c.relowner""",
        "default": """SELECT CASE d.defaclobjtype WHEN 'S' THEN 'default_sequences'
                                                ELSE 'default_tables' END,
                   n.nspname, coalesce(n.nspname, '*'), NULL, a.grantee, a.privilege_type
            FROM pg_default_acl d LEFT JOIN pg_namespace n ON n.oid = d.defaclnamespace,
                 aclexplode(d.defaclacl) a
            WHERE d.defaclrole = (SELECT oid FROM pg_roles WHERE rolname = current_user)
              AND d.defaclobjtype IN ('r', 'S') AND a.grantee <> d.defaclrole""",
    }
    names = dict(conn.execute("SELECT oid, rolname FROM pg_roles").fetchall())
    for query in queries.values():
        for kind, schema, name, column, grantee, privilege in conn.execute(query).fetchall():
            grants[(kind, schema, name, column, names.get(grantee, "PUBLIC"))].add(privilege)
    roles = {
        row[0]: _RoleRow(row[0], row[1], row[2], row[3], frozenset(row[4]))
        for row in conn.execute(
            """SELECT r.rolname, r.rolcanlogin, r.rolsuper,
                      CASE WHEN r.rolvaliduntil = 'infinity' THEN NULL ELSE r.rolvaliduntil END,
                      array(SELECT g.rolname FROM pg_auth_members m
                            JOIN pg_roles g ON g.oid = m.roleid WHERE m.member = r.oid)
               FROM pg_roles r"""
        ).fetchall()
    }
    column_clear = {
        role: frozenset(labels)
        for role, labels in conn.execute("SELECT role, labels FROM access.column_clear").fetchall()
    }
    schemas = {s for (s,) in conn.execute(f"SELECT n.nspname FROM pg_namespace n WHERE {system}")}
    return _State(
        service, database, version, list(relations.values()), schemas, dict(grants), roles,
        column_clear,
    )  # fmt: skip


def _ignored(state: _State, role: str) -> bool:
    """The platform's own roles: never planned for."""
    row = state.roles.get(role)
    return (
        role == state.service
        or role in PLATFORM_ROLES
        or role.startswith("pg_")
        or (row is not None and row.superuser)
    )


# --- the desired state ------------------------------------------------------------------------


@dataclass
class _Desired:
    grants: dict[Key, set[str]] = field(default_factory=lambda: defaultdict(set))
    reasons: dict[tuple[Key, str], str] = field(default_factory=dict)
    # Why a privilege is withheld (a REVOKE rule, the column narrowing): revocations' reasons.
    withheld: dict[tuple[Key, str], str] = field(default_factory=dict)

    def add(self, key: Key, privileges: Iterable[str], reason: str) -> None:
        for privilege in privileges:
            self.grants[key].add(privilege)
            self.reasons.setdefault((key, privilege), reason)


def _expand(rule: GrantRule, version: int) -> set[str]:
    privileges = set(rule.expanded())
    if version < 170000:
        privileges.discard("MAINTAIN")  # PostgreSQL 17's
    return privileges


def _classes(catalog_classes: dict[tuple[str, str], str], relation: _Relation) -> dict[str, str]:
    """column -> data class: the catalog's for its root table, else the label in the root's column
    comment, else non_personal (the classification gate keeps sql/oltp fully labelled)."""
    found = {}
    for column in relation.columns:
        data_class = None
        if relation.root_schema == "public":
            data_class = catalog_classes.get((relation.root, column))
        if data_class is None and column in relation.labels:
            known = OLTP_LABELS.get(relation.labels[column])
            data_class = known.value if known else None
        found[column] = data_class or DataClass.NON_PERSONAL.value
    return found


def _pg_roles(policy: Policy) -> dict[str, Role]:
    """The policy roles that exist in PostgreSQL: those with postgres rules."""
    return {name: role for name, role in policy.roles.items() if role.postgres}


def _desired_privileges(policy: Policy, state: _State) -> _Desired:
    catalog = load_catalog()
    catalog_classes = {(e.dataset, e.field): e.data_class.value for e in catalog.for_store(NAME)}
    desired = _Desired()
    where = policy.where
    by_schema: dict[str, list[_Relation]] = defaultdict(list)
    for relation in state.relations:
        by_schema[relation.schema].append(relation)
    for role in _pg_roles(policy).values():
        tables: dict[tuple[str, str], set[str]] = defaultdict(set)
        reason: dict[tuple[str, str, str], str] = {}  # (schema, table, privilege) -> why
        for rule in role.postgres:
            why = f"{where(rule.line)}: {rule.text}"
            privileges = _expand(rule, state.server_version)
            if rule.deny:
                continue
            if rule.object_kind == "database":
                desired.add(("database", None, state.database, None, role.name), privileges, why)
            elif rule.object_kind == "schema" and rule.schema in state.schemas:
                desired.add(("schema", rule.schema, rule.schema, None, role.name), privileges, why)
            elif rule.object_kind == "sequences":
                key: Key = ("default_sequences", rule.schema, rule.schema or "", None, role.name)
                desired.add(key, privileges, why)
                for relation in by_schema.get(rule.schema or "", []):
                    if relation.kind == "S":
                        seq = ("sequence", relation.schema, relation.name, None, role.name)
                        desired.add(seq, privileges, why)
            elif rule.object_kind in ("tables", "table"):
                if rule.object_kind == "tables":
                    key = ("default_tables", rule.schema, rule.schema or "", None, role.name)
                    desired.add(key, privileges, why)
                for relation in by_schema.get(rule.schema or "", []):
                    named = rule.object_kind == "tables" or relation.root in rule.tables
                    if relation.kind in TABLE_KINDS and named:
                        tables[(relation.schema, relation.name)] |= privileges
                        for privilege in privileges:
                            reason.setdefault((relation.schema, relation.name, privilege), why)
        for rule in (r for r in role.postgres if r.deny):
            for relation in by_schema.get("public", []):
                if relation.root in rule.tables:
                    denied = _expand(rule, state.server_version)
                    tables[(relation.schema, relation.name)] -= denied
                    key = ("table", relation.schema, relation.name, None, role.name)
                    for privilege in denied:
                        desired.withheld[(key, privilege)] = f"{where(rule.line)}: {rule.text}"
        relations = {(r.schema, r.name): r for r in state.relations}
        for (schema, name), privileges in tables.items():
            relation = relations[(schema, name)]
            classes = _classes(catalog_classes, relation)
            hidden = [c for c in relation.columns if classes[c] not in role.clear]
            narrowed = privileges & COLUMN_PRIVILEGES if hidden else set()
            table_key: Key = ("table", schema, name, None, role.name)
            narrowing = (
                f"role {role.name} ({where(role.line)}) reads only these classes in clear: "
                f"{', '.join(sorted(role.clear))}; hidden: {', '.join(hidden)}"
            )
            for privilege in privileges:
                why = reason[(schema, name, privilege)]
                if privilege in narrowed:
                    desired.withheld[(table_key, privilege)] = f"narrowed to columns: {narrowing}"
                    for column in relation.columns:
                        if column not in hidden:
                            key = ("column", schema, name, column, role.name)
                            desired.add(key, [privilege], f"{why} ({narrowing})")
                else:
                    desired.add(table_key, [privilege], why)
    return desired


# --- plan ---------------------------------------------------------------------------------------

# Apply runs changes in this order: roles first; revocations before grants (a table-wide REVOKE
# also takes the column privileges of that kind, so column grants come after it); memberships and
# drops last.
ORDER = (
    "create_role",
    "alter_role",
    "create_login",
    "alter_login",
    "revoke",
    "revoke_column",
    "grant",
    "grant_column",
    "default_privileges",
    "column_clear",
    "grant_role",
    "revoke_role",
    "drop_login",
)


class _Quoter:
    """Identifiers quoted as the server does (quote_ident), fetched once per plan."""

    def __init__(self, conn: psycopg.Connection) -> None:
        self.conn = conn
        self.cache: dict[str, str] = {"PUBLIC": "PUBLIC"}

    def load(self, names: Iterable[str]) -> None:
        missing = sorted({n for n in names if n and n not in self.cache})
        if missing:
            rows = self.conn.execute(
                "SELECT n, quote_ident(n) FROM unnest(%s::text[]) n", (missing,)
            ).fetchall()
            self.cache.update(rows)

    def __call__(self, *names: str) -> str:
        self.load(names)
        return ".".join(self.cache[n] for n in names)

    def literal(self, value: str) -> str:
        return "'" + value.replace("'", "''") + "'"


def _privilege_changes(
    state: _State, desired: _Desired, managed: set[str], q: _Quoter
) -> list[Change]:
    changes: list[Change] = []
    keys = {k for k in desired.grants if desired.grants[k]} | {
        k for k in state.grants if k[4] in managed
    }
    columns: dict[tuple[str, str, str, str, str], list[str]] = defaultdict(list)
    column_reasons: dict[tuple[str, str, str, str, str], str] = {}
    # A grantee that should hold nothing on a table it holds something on: one REVOKE ALL (it
    # takes the column privileges too) rather than one statement per privilege.
    wanted = {
        (k[1], k[2], k[4]) for k in keys if k[0] in ("table", "column") and desired.grants.get(k)
    }
    nothing = sorted(
        {(k[1] or "", k[2], k[4]) for k in keys if k[0] in ("table", "column")}
        - {(s or "", n, g) for s, n, g in wanted}
    )
    for schema, name, grantee in nothing:
        statement = f"REVOKE ALL ON {q(schema, name)} FROM {q(grantee)}"
        reason = f"{grantee} is given nothing on it by the policy"
        changes.append(Change(NAME, "revoke", grantee, f"table {schema}.{name}", statement, reason))
    # A table-wide REVOKE of a privilege takes that privilege on every column too: the column
    # privileges to keep are granted again after it.
    revoked_table_wide = {
        (k[1], k[2], k[4], privilege)
        for k in keys
        if k[0] == "table"
        for privilege in state.grants.get(k, set()) - desired.grants.get(k, set())
    }
    for key in sorted(keys, key=lambda k: tuple(str(x) for x in k)):
        kind, schema, name, column, grantee = key
        want = desired.grants.get(key, set())
        have = state.grants.get(key, set())
        if kind in ("table", "column") and (schema or "", name, grantee) in nothing:
            continue
        if kind == "column":
            have = {p for p in have if (schema, name, grantee, p) not in revoked_table_wide}
            for privilege in sorted(want - have):
                group = ("grant_column", schema or "", name, privilege, grantee)
                columns[group].append(column or "")
                column_reasons.setdefault(group, desired.reasons[(key, privilege)])
            for privilege in sorted(have - want):
                group = ("revoke_column", schema or "", name, privilege, grantee)
                columns[group].append(column or "")
                column_reasons.setdefault(group, f"{grantee} is not given it by the policy")
            continue
        for action, privileges in (("grant", want - have), ("revoke", have - want)):
            if not privileges:
                continue
            listed = ", ".join(sorted(privileges))
            to = "TO" if action == "grant" else "FROM"
            verb = action.upper()
            if kind == "database":
                what, target = "database", f"DATABASE {q(name)}"
            elif kind == "schema":
                what, target = f"schema {name}", f"SCHEMA {q(name)}"
            elif kind == "sequence":
                what, target = f"sequence {schema}.{name}", f"SEQUENCE {q(schema or '', name)}"
            elif kind == "table":
                what, target = f"table {schema}.{name}", q(schema or "", name)
            else:  # default privileges of the role that creates tables
                objects = "TABLES" if kind == "default_tables" else "SEQUENCES"
                what = f"{objects.lower()} created later in {schema or 'any schema'}"
                scope = f" IN SCHEMA {q(schema)}" if schema else ""
                statement = (
                    f"ALTER DEFAULT PRIVILEGES FOR ROLE {q(state.service)}{scope} {verb} "
                    f"{listed} ON {objects} {to} {q(grantee)}"
                )
                reason = (
                    desired.reasons[(key, min(privileges))]
                    if action == "grant"
                    else f"{grantee} is not given it by the policy"
                )
                changes.append(Change(NAME, "default_privileges", grantee, what, statement, reason))
                continue
            reason = (
                desired.reasons[(key, min(privileges))]
                if action == "grant"
                else desired.withheld.get(
                    (key, min(privileges)), f"{grantee} is not given it by the policy"
                )
            )
            statement = f"{verb} {listed} ON {target} {to} {q(grantee)}"
            changes.append(Change(NAME, action, grantee, what, statement, reason))
    order = {(r.schema, r.name): r.columns for r in state.relations}
    for (action, schema, name, privilege, grantee), cols in columns.items():
        cols.sort(key=lambda c: order[(schema, name)].index(c) if c in order[(schema, name)] else 0)
        verb, to = ("GRANT", "TO") if action == "grant_column" else ("REVOKE", "FROM")
        listed = ", ".join(q(c) for c in cols)
        statement = f"{verb} {privilege} ({listed}) ON {q(schema, name)} {to} {q(grantee)}"
        what = f"columns of {schema}.{name}: {', '.join(cols)}"
        reason = column_reasons[(action, schema, name, privilege, grantee)]
        changes.append(Change(NAME, action, grantee, what, statement, reason))
    return changes


def _valid_until(until: dt.datetime | None) -> str:
    return "infinity" if until is None else until.astimezone(dt.UTC).isoformat()


def _same_time(a: dt.datetime | None, b: dt.datetime | None) -> bool:
    if a is None or b is None:
        return a is b
    return abs((a - b).total_seconds()) < 1


def _user_roles(policy: Policy, user_roles: Iterable[str]) -> list[str]:
    pg_roles = _pg_roles(policy)
    return [r for r in user_roles if r in pg_roles]


def _role_changes(policy: Policy, state: _State, now: dt.datetime, q: _Quoter) -> list[Change]:
    changes: list[Change] = []
    pg_roles = _pg_roles(policy)
    for name, role in pg_roles.items():
        row = state.roles.get(name)
        why = f"{policy.where(role.line)}: role {name}"
        if row is None:
            statement = f"CREATE ROLE {q(name)} NOLOGIN"
            changes.append(Change(NAME, "create_role", name, f"role {name}", statement, why))
        elif row.login:
            statement = f"ALTER ROLE {q(name)} NOLOGIN"
            reason = f"{why}: a role is a group, people log in as their own user"
            changes.append(Change(NAME, "alter_role", name, f"role {name}", statement, reason))
        elif row.superuser or _ignored(state, name):
            raise AccessTargetError(
                f"{policy.where(role.line)}: role {name} is a platform or superuser role in "
                "PostgreSQL; the policy cannot manage it"
            )
    want_clear = {name: frozenset(LABELS[c] for c in role.clear) for name, role in pg_roles.items()}
    for name in sorted(set(want_clear) | set(state.column_clear)):
        want, have = want_clear.get(name), state.column_clear.get(name)
        if want == have:
            continue
        if want is None:
            statement = f"DELETE FROM access.column_clear WHERE role = {q.literal(name)}"
            reason = f"role {name} has no postgres rules in the policy"
        else:
            labels = ", ".join(q.literal(label) for label in sorted(want))
            statement = (
                f"INSERT INTO access.column_clear (role, labels) VALUES ({q.literal(name)}, "
                f"ARRAY[{labels}]) ON CONFLICT (role) DO UPDATE SET labels = EXCLUDED.labels"
            )
            reason = (
                f"{policy.where(pg_roles[name].line)}: role {name} reads "
                f"{', '.join(sorted(pg_roles[name].clear))} in clear (the narrowing after "
                "migrations and partition changes)"
            )
        what = f"column narrowing of {name}"
        changes.append(Change(NAME, "column_clear", name, what, statement, reason))

    wanted_users = {}
    for user in policy.users.values():
        roles = _user_roles(policy, user.roles)
        if "postgres" in user.stores and roles and user.active(now):
            wanted_users[user.name] = (user, roles)
    for name, (user, roles) in wanted_users.items():
        row = state.roles.get(name)
        why = f"{policy.where(user.line)}: user {name}"
        if row is not None and (_ignored(state, name) or name in pg_roles):
            raise AccessTargetError(f"{why}: the name is taken by a platform or policy role")
        if row is None:
            until = (
                "" if user.until is None else f" VALID UNTIL {q.literal(_valid_until(user.until))}"
            )
            members = ", ".join(q(r) for r in [*roles, POLICY_USER_ROLE])
            statement = f"CREATE ROLE {q(name)} LOGIN{until} IN ROLE {members}"
            reason = f"{why} (roles {', '.join(roles)}; a one-time password is set by apply)"
            changes.append(Change(NAME, "create_login", name, f"user {name}", statement, reason))
            continue
        if not row.login:
            statement = f"ALTER ROLE {q(name)} LOGIN"
            changes.append(Change(NAME, "alter_login", name, f"user {name}", statement, why))
        if not _same_time(row.valid_until, user.until):
            statement = f"ALTER ROLE {q(name)} VALID UNTIL {q.literal(_valid_until(user.until))}"
            reason = f"{why}: until {_valid_until(user.until)}"
            changes.append(Change(NAME, "alter_login", name, f"user {name}", statement, reason))
        want = {*roles, POLICY_USER_ROLE}
        have = row.member_of & {*pg_roles, POLICY_USER_ROLE}
        for role in sorted(want - have):
            statement = f"GRANT {q(role)} TO {q(name)}"
            changes.append(Change(NAME, "grant_role", name, f"role {role}", statement, why))
        for role in sorted(have - want):
            statement = f"REVOKE {q(role)} FROM {q(name)}"
            reason = f"{why}: not a member of {role} in the policy"
            changes.append(Change(NAME, "revoke_role", name, f"role {role}", statement, reason))

    for name, row in sorted(state.roles.items()):
        if name in wanted_users or _ignored(state, name) or name in pg_roles:
            continue
        user = policy.users.get(name)
        if POLICY_USER_ROLE in row.member_of:
            if user is not None and user.until is not None and not user.active(now):
                reason = (
                    f"{policy.where(user.line)}: user {name}: access ended at "
                    f"{user.until.isoformat()}"
                )
            elif user is not None:
                reason = f"{policy.where(user.line)}: user {name} has no PostgreSQL access"
            else:
                reason = f"user {name} is no longer in the policy"
            statement = f"DROP OWNED BY {q(name)}; DROP ROLE {q(name)}"
            changes.append(Change(NAME, "drop_login", name, f"user {name}", statement, reason))
            continue
        if TEMPORARY_ROLE in row.member_of:
            continue  # `db grant-temporary`: outside the policy, expires on its own
        for role in sorted(row.member_of & set(pg_roles)):
            statement = f"REVOKE {q(role)} FROM {q(name)}"
            reason = (
                f"{name} is a member of {role} outside the policy (neither a policy user nor a "
                "temporary grant)"
            )
            changes.append(Change(NAME, "revoke_role", name, f"role {role}", statement, reason))
    return changes


def _plan(conn: psycopg.Connection, policy: Policy, now: dt.datetime) -> list[Change]:
    state = _read(conn)
    q = _Quoter(conn)
    q.load(
        [state.database, state.service, *state.roles, *state.schemas]
        + [n for r in state.relations for n in (r.name, *r.columns)]
    )
    pg_roles = _pg_roles(policy)
    desired = _desired_privileges(policy, state)
    # Grantees compared: every role but the platform's own; PUBLIC on tables, sequences, columns
    # and default privileges (its database and schema defaults are PostgreSQL's own).
    managed = {r for r in state.roles if not _ignored(state, r)} | set(pg_roles)
    state.grants = {
        k: v
        for k, v in state.grants.items()
        if k[4] != "PUBLIC" or k[0] not in ("database", "schema")
    }
    changes = _privilege_changes(state, desired, managed | {"PUBLIC"}, q)
    changes += _role_changes(policy, state, now, q)
    rank = {action: i for i, action in enumerate(ORDER)}
    return sorted(changes, key=lambda c: rank[c.action])  # stable: the order within an action


def plan(settings: Settings, policy: Policy, now: dt.datetime) -> list[Change]:
    """The statements that make the database match the policy, each with its reason."""
    with _connect(settings) as conn:
        return _plan(conn, policy, now)


# --- apply --------------------------------------------------------------------------------------


def _password(conn: psycopg.Connection, user: str) -> tuple[str, str]:
    """A random password and its SCRAM verifier: the server (and its statement log) only ever sees
    the verifier."""
    password = secrets.token_urlsafe(24)
    verifier = conn.pgconn.encrypt_password(password.encode(), user.encode(), b"scram-sha-256")
    return password, verifier.decode()


def apply(settings: Settings, policy: Policy, changes: list[Change]) -> list[Change]:
    """Run the changes in one transaction (all or nothing); return them, with the one-time
    password of every login created. Refused when the policy grants access already ended."""
    now = dt.datetime.now(dt.UTC)
    problems = check_policy(policy, now)
    if problems:
        raise PolicyError(
            "access apply refused, nothing applied: the policy grants access already ended\n  "
            + "\n  ".join(problems)
        )
    mine = sorted((c for c in changes if c.target == NAME), key=lambda c: ORDER.index(c.action))
    user, source = operator()
    applied: list[Change] = []
    with _connect(settings) as conn:
        database = conn.info.dbname
        current: Change | None = None
        try:
            with conn.transaction():
                q = _Quoter(conn)
                for current in mine:
                    assert current.statement is not None
                    conn.execute(current.statement)
                    done = current
                    if current.action == "create_login":
                        password, verifier = _password(conn, current.principal)
                        conn.execute(
                            f"ALTER ROLE {q(current.principal)} PASSWORD {q.literal(verifier)}"
                        )
                        done = replace(current, secret=password)
                    applied.append(done)
        except psycopg.Error as exc:
            access_log.record(
                settings, kind="admin", user=user, source=source, resource=f"postgres:{database}",
                action="access.apply", outcome="error", reason=str(exc).strip(),
                via="cli", detail={"statements": [c.statement for c in mine]},
            )  # fmt: skip
            failed = current.statement if current else None
            raise AccessTargetError(
                f"access apply on PostgreSQL database {database} failed and was rolled back, "
                f"nothing applied: {str(exc).strip()} (statement: {failed})"
            ) from exc
    access_log.record(
        settings, kind="admin", user=user, source=source, resource=f"postgres:{database}",
        action="access.apply", outcome="allow", via="cli",
        detail={"changes": len(applied), "statements": [c.statement for c in applied]},
    )  # fmt: skip
    return applied


# --- expiry -------------------------------------------------------------------------------------


def _expired(
    conn: psycopg.Connection, policy: Policy, now: dt.datetime
) -> list[tuple[ExpiredAccess, _RoleRow]]:
    roles = {
        row[0]: _RoleRow(row[0], row[1], row[2], row[3], frozenset(row[4]))
        for row in conn.execute(
            """SELECT r.rolname, r.rolcanlogin, r.rolsuper,
                      CASE WHEN r.rolvaliduntil = 'infinity' THEN NULL ELSE r.rolvaliduntil END,
                      array(SELECT g.rolname FROM pg_auth_members m
                            JOIN pg_roles g ON g.oid = m.roleid WHERE m.member = r.oid)
               FROM pg_roles r"""
        ).fetchall()
    }
    service = conn.execute("SELECT current_user").fetchone()[0]
    pg_roles = _pg_roles(policy)
    found = []
    for name, row in sorted(roles.items()):
        if name == service or row.superuser or name in PLATFORM_ROLES or name.startswith("pg_"):
            continue
        user = policy.users.get(name)
        # This target's logins only: roles are cluster-wide, and the warehouse's own logins on
        # the same cluster are the warehouse target's to report.
        ours = row.member_of & {POLICY_USER_ROLE, TEMPORARY_ROLE, *pg_roles} or (
            user is not None and "postgres" in user.stores
        )
        if not ours:
            continue
        ended = []
        if row.valid_until is not None and row.valid_until <= now:
            ended.append(row.valid_until)
        if user is not None and user.until is not None and not user.active(now):
            ended.append(user.until)
        if not ended:
            continue
        groups = sorted(row.member_of - {POLICY_USER_ROLE, TEMPORARY_ROLE})
        if not row.login and not groups:
            continue  # nothing left to use
        still = []
        if row.login:
            still.append("login role exists with LOGIN")
            if row.valid_until is None or row.valid_until > now:
                still.append("its password still works (VALID UNTIL not passed)")
            else:
                still.append("VALID UNTIL stops its password only: other methods still log in")
        if groups:
            still.append(f"member of {', '.join(groups)}")
        if user is not None:
            origin = f"policy user, {policy.where(user.line)}"
        elif POLICY_USER_ROLE in row.member_of:
            origin = "made by access apply for a user no longer in the policy"
        elif TEMPORARY_ROLE in row.member_of:
            origin = "db grant-temporary"
        else:
            origin = "outside the policy"
        found.append(
            (
                ExpiredAccess(
                    target=NAME,
                    principal=name,
                    ended_at=min(ended),
                    still=f"{'; '.join(still)} ({origin})",
                    remedy=REMEDY,
                ),
                row,
            )
        )
    return found


def expired(settings: Settings, policy: Policy, now: dt.datetime) -> list[ExpiredAccess]:
    """Logins still usable past their end date (VALID UNTIL, or the policy's `until`)."""
    with _connect(settings) as conn:
        return [found for found, _ in _expired(conn, policy, now)]


def revoke_expired(settings: Settings, policy: Policy, now: dt.datetime) -> list[ExpiredAccess]:
    """Drop every expired login (DROP OWNED in this database, then DROP ROLE); one that still holds
    something in another database of the cluster loses LOGIN and its memberships instead."""
    user, source = operator()
    revoked = []
    with _connect(settings) as conn:
        q = _Quoter(conn)
        database = conn.info.dbname
        with conn.transaction():
            for found, row in _expired(conn, policy, now):
                name = q(found.principal)
                try:
                    with conn.transaction():
                        conn.execute(f"DROP OWNED BY {name}")
                        conn.execute(f"DROP ROLE {name}")
                    done = "dropped"
                except psycopg.errors.DependentObjectsStillExist:
                    conn.execute(f"ALTER ROLE {name} NOLOGIN")
                    for group in sorted(row.member_of):
                        conn.execute(f"REVOKE {q(group)} FROM {name}")
                    done = "LOGIN and memberships revoked (it holds objects in another database)"
                revoked.append(replace(found, remedy=done))
    if revoked:
        access_log.record(
            settings, kind="admin", user=user, source=source, resource=f"postgres:{database}",
            action="access.revoke_expired", outcome="allow", via="cli",
            detail={"revoked": [r.principal for r in revoked]},
        )  # fmt: skip
    return revoked


def temporary_grants(settings: Settings) -> list[tuple[str, str, dt.datetime | None]]:
    """Logins made by `db grant-temporary` (outside the policy): (user, role, valid until)."""
    from stripe_platform.oltp.access import list_temporary

    with _connect(settings) as conn:
        return [(g.user, g.role, g.valid_until) for g in list_temporary(conn)]
