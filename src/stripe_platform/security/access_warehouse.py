"""The warehouse target of the access policy (issue 21, docs/access.md): who reads the raw layer,
the marts in clear and the masked marts, on whichever warehouse the platform runs.

The policy names three warehouse schemas per role (``warehouse: [raw, marts, marts_masked]``) and
the data classes the role may read in clear (``clear``). A schema shows some classes in clear: the
marts the restricted classes their columns hold (the catalog's ``marts`` entries), the raw layer
those it does not encrypt at rest (quasi-identifiers), marts_masked none. A role listing a schema
whose classes its ``clear`` does not cover is refused, naming the policy line: that is a policy
asking for two contradictory things.

Per backend:

- PostgreSQL: real roles and grants. USAGE on the schema, SELECT on every table and view in it,
  default privileges so what the platform creates later is granted the same (ALTER DEFAULT
  PRIVILEGES FOR ROLE <the warehouse's own user>), CONNECT on the database to the policy's roles
  only, nothing to PUBLIC; any other privilege a policy role, user or PUBLIC holds in the database
  is drift and revoked. The policy's users provisioned in the warehouse are LOGIN roles VALID UNTIL
  their end, members of their roles. Roles are cluster-wide: when the warehouse database is on the
  OLTP's cluster (same system identifier), the roles themselves (existence, LOGIN, VALID UNTIL,
  memberships) belong to the postgres target (security/access_postgres.py) and this target grants
  inside the warehouse database only.
- DuckDB: one file, no users, no grants. The control that exists is the file's mode: the file and
  its WAL 0600, its own directory 0700, read only through the platform (API, transform); a file or
  directory open to group or others is drift and apply narrows it.
- Snowflake: Permifrost-style statements (roles, USAGE on database, warehouse and schemas, SELECT
  on all and future tables and views, users with an expiry, roles granted to users, expired users
  disabled, the masking policies' clear roles), compared with what SHOW GRANTS / SHOW USERS read.
  No future grants on the marts' schema: a rebuilt mart would be readable before its masking
  post-hook runs; the dbt post-hook grants each mart after masking it (macros/masking.sql).
  ``stripe-platform access snowflake-sql`` prints every statement for review.

The dbt masking macros take their roles from here (:func:`masking_env`, passed by
transform/dbt.dbt_env): the policy is the one list of who reads what in clear.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import os
import re
import secrets
import stat
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stripe_platform.config import Settings
from stripe_platform.errors import PlatformError
from stripe_platform.security.access import Change, ExpiredAccess, operator
from stripe_platform.security.policy import Policy, PolicyError, User, check_policy

NAME = "warehouse"
# The environment variable the dbt masking macros read their roles from (macros/masking.sql).
MASKING_ENV = "STRIPE_PLATFORM_DBT_MASKING"
# The policy's warehouse schemas, in the order statements are planned.
SCHEMAS = ("raw", "marts", "marts_masked")
RAW_SCHEMA = "raw"  # where the raw layer (embedded engine, Airbyte) writes every stream
# Snowflake masking policies, one per data type: the same list as macros/masking.sql.
SNOWFLAKE_MASKING_TYPES = (
    "VARCHAR",
    "NUMBER",
    "FLOAT",
    "DATE",
    "TIMESTAMP_NTZ",
    "TIMESTAMP_TZ",
    "BOOLEAN",
)
MASKED_TEXT = "***MASKED***"


class WarehouseAccessError(PlatformError, RuntimeError):
    """The warehouse cannot be read or changed as the policy needs; the message says why."""


# --- what the policy asks of the warehouse ------------------------------------------------------


def exposed_classes(settings: Settings) -> dict[str, frozenset[str]]:
    """The restricted classes each policy schema shows in clear (the classification catalog's)."""
    from stripe_platform.governance.classification import PROTECTED, RESTRICTED, load_catalog

    catalog = load_catalog()
    marts = {e.data_class for e in catalog.for_store("marts")} & RESTRICTED
    raw = {e.data_class for e in catalog.for_store("warehouse_raw")} & RESTRICTED
    if settings.encrypt_at_rest:  # the raw layer holds the protected classes as ciphertext
        raw -= PROTECTED
    return {
        "raw": frozenset(c.value for c in raw),
        "marts": frozenset(c.value for c in marts),
        "marts_masked": frozenset(),
    }


@dataclass(frozen=True)
class Layout:
    """The policy, as the warehouse sees it."""

    readers: Mapping[str, tuple[str, ...]]  # policy schema -> roles reading it, sorted
    users: tuple[User, ...]  # the policy's users provisioned in the warehouse
    policy_roles: tuple[str, ...]  # every role of the policy
    policy_users: tuple[str, ...]  # every user of the policy
    where: Mapping[str, str]  # role or user -> "policy file:line", for reasons
    # What the postgres (OLTP) target provisions: roles with `postgres` rules, users with the
    # postgres store. On a cluster shared with the OLTP those roles are its, not this target's.
    oltp_roles: frozenset[str] = frozenset()
    oltp_users: frozenset[str] = frozenset()

    @property
    def roles(self) -> tuple[str, ...]:
        """Roles the warehouse needs: those reading a schema, and those its users hold."""
        needed = {r for names in self.readers.values() for r in names}
        needed.update(r for u in self.users for r in u.roles)
        return tuple(sorted(needed))

    def schemas_of(self, role: str) -> list[str]:
        return [s for s in SCHEMAS if role in self.readers[s]]


def layout(settings: Settings, policy: Policy) -> Layout:
    """What the policy grants in the warehouse; refuses a role reading a schema that shows classes
    its ``clear`` does not allow (PolicyError naming the role's line)."""
    exposed = exposed_classes(settings)
    problems = []
    readers: dict[str, list[str]] = {s: [] for s in SCHEMAS}
    for role in policy.roles.values():
        for schema in role.warehouse:
            hidden = exposed[schema] - role.clear
            if hidden:
                problems.append(
                    f"{policy.where(role.line)}: role {role.name}: warehouse schema {schema} "
                    f"shows {', '.join(sorted(hidden))} in clear, which its `clear` does not "
                    "allow: list marts_masked instead, or add the classes to `clear`"
                )
            else:
                readers[schema].append(role.name)
    if problems:
        raise PolicyError(
            f"access policy {policy.source}: {len(problems)} problem(s)\n  " + "\n  ".join(problems)
        )
    return Layout(
        readers={s: tuple(sorted(names)) for s, names in readers.items()},
        users=tuple(u for u in policy.users.values() if "warehouse" in u.stores),
        policy_roles=tuple(sorted(policy.roles)),
        policy_users=tuple(sorted(policy.users)),
        where={
            **{r.name: policy.where(r.line) for r in policy.roles.values()},
            **{u.name: policy.where(u.line) for u in policy.users.values()},
        },
        oltp_roles=frozenset(r.name for r in policy.roles.values() if r.postgres),
        oltp_users=frozenset(u.name for u in policy.users.values() if "postgres" in u.stores),
    )


def masking_env(policy: Policy) -> dict[str, str]:
    """The environment the dbt masking macros read (macros/masking.sql, masking_roles()): the roles
    listing `marts` with the classes each may read in clear, and the roles listing
    `marts_masked`. The macros keep, of the first, the roles covering every restricted class the
    marts hold, the same rule as :func:`layout` (which refuses the others)."""
    marts = {r.name: sorted(r.clear) for r in policy.roles.values() if "marts" in r.warehouse}
    masked = sorted(r.name for r in policy.roles.values() if "marts_masked" in r.warehouse)
    return {MASKING_ENV: json.dumps({"marts": marts, "masked": masked}, sort_keys=True)}


def _physical(settings: Settings) -> dict[str, str]:
    """Policy schema -> the schema it is on PostgreSQL and DuckDB."""
    from stripe_platform.transform.dbt import MARTS_SCHEMA, masked_schema

    return {"raw": RAW_SCHEMA, "marts": MARTS_SCHEMA, "marts_masked": masked_schema()}


def _change(action: str, principal: str, obj: str, statement: str | None, reason: str) -> Change:
    return Change(NAME, action, principal, obj, statement, reason)


def _record(
    settings: Settings, action: str, outcome: str, items: Sequence[Any], **detail: Any
) -> None:
    from stripe_platform.audit import access_log

    user, host = operator()
    access_log.record(
        settings,
        kind="admin",
        user=user,
        source=host,
        resource=f"access/{NAME}/{settings.warehouse_backend}",
        action=action,
        outcome=outcome,
        detail={"count": len(items), **detail},
    )


# --- the module protocol ------------------------------------------------------------------------


def plan(settings: Settings, policy: Policy, now: dt.datetime) -> list[Change]:
    """What differs between the policy and the configured warehouse, with what makes it match."""
    backend = settings.warehouse_backend
    if backend == "duckdb":
        layout(settings, policy)  # a contradictory policy is refused whatever the backend
        return duckdb_plan(settings)
    if backend == "postgres":
        return postgres_plan(settings, policy, now)
    return snowflake_plan(settings, policy, now)


def apply(settings: Settings, policy: Policy, changes: list[Change]) -> list[Change]:
    """Applies this target's ``changes`` (a plan): all or nothing on PostgreSQL (one transaction);
    on Snowflake every statement commits by itself (DDL), in plan order, stopping at the first
    refusal. Refused, with nothing applied, while the policy holds access already ended."""
    now = dt.datetime.now(dt.UTC)
    problems = check_policy(policy, now)
    if problems:
        raise PolicyError(
            "access apply refused, nothing applied: the policy grants access already ended\n  "
            + "\n  ".join(problems)
        )
    mine = [c for c in changes if c.target == NAME]
    if not mine:
        return []
    backend = settings.warehouse_backend
    try:
        if backend == "duckdb":
            _duckdb_apply(mine)
        elif backend == "postgres":
            _postgres_apply(settings, mine)
        else:
            _snowflake_run(settings, [c.statement for c in mine if c.statement])
    except Exception as exc:
        _record(settings, "apply", "error", mine, error=str(exc).splitlines()[0][:500])
        raise
    _record(settings, "apply", "allow", mine, changes=[c.public() for c in mine])
    return mine


def expired(settings: Settings, policy: Policy, now: dt.datetime) -> list[ExpiredAccess]:
    """Access to the warehouse still usable past its end date."""
    return [found for found, _ in _expired(settings, policy, now)]


def revoke_expired(settings: Settings, policy: Policy, now: dt.datetime) -> list[ExpiredAccess]:
    """Ends what :func:`expired` finds (PostgreSQL: NOLOGIN and memberships revoked, in one
    transaction; Snowflake: the user disabled); returns what it revoked."""
    pending = _expired(settings, policy, now)
    if not pending:
        return []
    found = [f for f, _ in pending]
    statements = [s for _, revoke in pending for s in revoke]
    try:
        if settings.warehouse_backend == "postgres":
            _postgres_execute(settings, statements)
        else:
            _snowflake_run(settings, statements)
    except Exception as exc:
        _record(settings, "revoke_expired", "error", found, error=str(exc).splitlines()[0][:500])
        raise
    _record(settings, "revoke_expired", "allow", found, revoked=[a.public() for a in found])
    return found


def _expired(
    settings: Settings, policy: Policy, now: dt.datetime
) -> list[tuple[ExpiredAccess, list[str]]]:
    """(what is still usable past its end, the statements that end it)."""
    backend = settings.warehouse_backend
    if backend == "duckdb":
        return []  # no users in the engine: access ends with the platform's (API, OLTP) access
    if backend == "postgres":
        return _postgres_expired(settings, policy, now)
    return _snowflake_expired(settings, policy, now)


def describe(settings: Settings, policy: Policy) -> list[str]:
    """What enforces the policy on the configured warehouse, in words (for `access plan`)."""
    backend = settings.warehouse_backend
    lay = layout(settings, policy)
    physical = _physical(settings)
    if backend == "duckdb":
        path = settings.warehouse_file
        return [
            f"DuckDB {path}: no users or grants in the engine; the file and its WAL are 0600 and "
            f"its directory 0700, readable by the platform's OS user only: people reach the "
            "warehouse through the platform (API, transform), which applies the policy",
            *(
                f"user {u.name}: provisioned for the warehouse, but DuckDB has no users: access "
                "goes through the API"
                for u in lay.users
            ),
        ]
    lines = []
    for schema in SCHEMAS:
        where = physical[schema] if backend == "postgres" else _sf_schema(settings, schema)
        lines.append(f"{schema} ({where}): {', '.join(lay.readers[schema]) or 'nobody'}")
    return lines


# --- PostgreSQL ---------------------------------------------------------------------------------

# Relations a reader may SELECT: tables, partitioned tables, views, materialized views, foreign.
_RELKINDS = ("r", "p", "v", "m", "f")
_DEFAULT_ACL_OBJECTS = {
    "r": "TABLES",
    "S": "SEQUENCES",
    "f": "FUNCTIONS",
    "T": "TYPES",
    "n": "SCHEMAS",
}
_ACL_SQL = """
SELECT 'database', NULL, NULL, NULL, g.grantee, g.privilege_type
FROM pg_database d, aclexplode(coalesce(d.datacl, acldefault('d', d.datdba))) g
WHERE d.datname = current_database()
UNION ALL
SELECT 'schema', n.nspname, NULL, NULL, g.grantee, g.privilege_type
FROM pg_namespace n, aclexplode(coalesce(n.nspacl, acldefault('n', n.nspowner))) g
WHERE n.nspname <> 'information_schema' AND n.nspname !~ '^pg_'
UNION ALL
SELECT 'table', n.nspname, c.relname, NULL, g.grantee, g.privilege_type
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace,
     aclexplode(coalesce(c.relacl, acldefault('r', c.relowner))) g
WHERE c.relkind = ANY(%(relkinds)s)
  AND n.nspname <> 'information_schema' AND n.nspname !~ '^pg_'
UNION ALL
SELECT 'column', n.nspname, c.relname, a.attname, g.grantee, g.privilege_type
FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
     JOIN pg_namespace n ON n.oid = c.relnamespace, aclexplode(a.attacl) g
WHERE a.attacl IS NOT NULL AND NOT a.attisdropped
  AND n.nspname <> 'information_schema' AND n.nspname !~ '^pg_'
"""
_DEFAULT_ACL_SQL = """
SELECT pg_get_userbyid(d.defaclrole), n.nspname, d.defaclobjtype, g.grantee, g.privilege_type
FROM pg_default_acl d LEFT JOIN pg_namespace n ON n.oid = d.defaclnamespace,
     aclexplode(d.defaclacl) g
"""


@dataclass(frozen=True)
class _PgRole:
    login: bool
    valid_until: dt.datetime | None  # None: no end
    member_of: frozenset[str]


@dataclass
class _PgState:
    database: str
    owner: str  # the warehouse's own user: it creates the schemas and what is in them
    shared: bool  # on the OLTP's cluster: the roles belong to the postgres target
    schemas: set[str]
    relations: dict[str, set[str]]  # schema -> its tables and views
    acl: set[tuple[str, str, str]]  # (object, grantee, privilege); grantee "public" for PUBLIC
    default_acl: set[
        tuple[str, str | None, str, str, str]
    ]  # (creator, schema, kind, grantee, priv)
    roles: dict[str, _PgRole]


def _pg_connect(settings: Settings):
    import psycopg

    if settings.warehouse_dsn is None:
        raise WarehouseAccessError("warehouse=postgres needs STRIPE_PLATFORM_WAREHOUSE_DSN")
    return psycopg.connect(settings.warehouse_dsn.get_secret_value(), autocommit=True)


def _cluster_identity(conn) -> tuple[Any, ...]:
    """What tells one PostgreSQL cluster from another: its system identifier, or (without the
    right to read it) its start time and port."""
    import psycopg

    try:
        row = conn.execute("SELECT system_identifier FROM pg_control_system()").fetchone()
        return ("system", row[0])
    except psycopg.errors.InsufficientPrivilege:
        row = conn.execute("SELECT pg_postmaster_start_time(), current_setting('port')").fetchone()
        return ("started", row[0], row[1])


def shares_oltp_cluster(settings: Settings, conn=None) -> bool:
    """True when the warehouse database is on the OLTP's PostgreSQL cluster (roles are then
    shared, and belong to the postgres target). An unreachable OLTP shares nothing."""
    import psycopg

    from stripe_platform.oltp import db

    own = conn is None
    conn = conn or _pg_connect(settings)
    try:
        mine = _cluster_identity(conn)
    finally:
        if own:
            conn.close()
    try:
        with db.connect(settings, database="postgres", autocommit=True, with_key=False) as oltp:
            return _cluster_identity(oltp) == mine
    except psycopg.OperationalError:
        return False


def _pg_read(settings: Settings, conn, lay: Layout) -> _PgState:
    database, owner = conn.execute("SELECT current_database(), current_user").fetchone()
    rows = conn.execute(_ACL_SQL, {"relkinds": list(_RELKINDS)}).fetchall()
    role_names = {
        oid: name for oid, name in conn.execute("SELECT oid, rolname FROM pg_roles").fetchall()
    }
    role_names[0] = "public"
    schemas = {
        r[0]
        for r in conn.execute(
            "SELECT nspname FROM pg_namespace "
            "WHERE nspname <> 'information_schema' AND nspname !~ '^pg_'"
        ).fetchall()
    }
    relations: dict[str, set[str]] = defaultdict(set)
    for schema, name in conn.execute(
        "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relkind = ANY(%s) AND NOT c.relispartition",
        [list(_RELKINDS)],
    ).fetchall():
        relations[schema].add(name)
    acl = set()
    for kind, schema, name, column, grantee, privilege in rows:
        if kind == "database":
            obj = "database"
        elif kind == "schema":
            obj = f"schema {schema}"
        elif kind == "table":
            obj = f"table {schema}.{name}"
        else:
            obj = f"column {schema}.{name}.{column}"
        acl.add((obj, role_names.get(grantee, str(grantee)), privilege))
    default_acl = {
        (creator, schema, kind, role_names.get(grantee, str(grantee)), privilege)
        for creator, schema, kind, grantee, privilege in conn.execute(_DEFAULT_ACL_SQL).fetchall()
    }
    roles = {}
    for name, login, until, member_of in conn.execute(
        "SELECT r.rolname, r.rolcanlogin, "
        "CASE WHEN r.rolvaliduntil = 'infinity' THEN NULL ELSE r.rolvaliduntil END, "
        "coalesce(array_agg(g.rolname) FILTER (WHERE g.rolname IS NOT NULL), '{}') "
        "FROM pg_roles r LEFT JOIN pg_auth_members m ON m.member = r.oid "
        "LEFT JOIN pg_roles g ON g.oid = m.roleid "
        "WHERE r.rolname = ANY(%s) GROUP BY r.rolname, r.rolcanlogin, r.rolvaliduntil",
        [[*lay.policy_roles, *lay.policy_users]],
    ).fetchall():
        roles[name] = _PgRole(login, until, frozenset(member_of))
    return _PgState(
        database=database,
        owner=owner,
        shared=shares_oltp_cluster(settings, conn),
        schemas=schemas,
        relations=relations,
        acl=acl,
        default_acl=default_acl,
        roles=roles,
    )


def postgres_plan(settings: Settings, policy: Policy, now: dt.datetime) -> list[Change]:
    lay = layout(settings, policy)
    with _pg_connect(settings) as conn:
        state = _pg_read(settings, conn, lay)
        return _pg_diff(settings, lay, state, now, conn)


def _pg_diff(
    settings: Settings, lay: Layout, state: _PgState, now: dt.datetime, conn
) -> list[Change]:
    from psycopg import sql

    def q(composed: sql.Composable) -> str:
        return composed.as_string(conn)

    def ident(*names: str) -> sql.Identifier:
        return sql.Identifier(*names)

    physical = _physical(settings)
    changes: list[Change] = _pg_role_changes(lay, state, now, q)
    # On the OLTP's cluster, a role the postgres target owns may not exist yet (apply_all applies
    # that target first; apply refuses if it still does not exist).
    awaited = [
        r for r in lay.roles if r not in state.roles and state.shared and r in lay.oltp_roles
    ]

    # The schemas, so grants and default privileges hold before the first sync or build.
    for schema in SCHEMAS:
        name = physical[schema]
        if name not in state.schemas and lay.readers[schema]:
            changes.append(
                _change(
                    "create_schema",
                    state.owner,
                    f"schema {name}",
                    q(
                        sql.SQL("CREATE SCHEMA IF NOT EXISTS {} AUTHORIZATION {}").format(
                            ident(name), ident(state.owner)
                        )
                    ),
                    f"warehouse schema {schema}: readers {', '.join(lay.readers[schema])} are "
                    "granted it before the platform writes there",
                )
            )

    wanted: set[tuple[str, str, str]] = set()
    wanted_default: set[tuple[str, str | None, str, str, str]] = set()
    for role in lay.roles:
        why = f"policy role {role} ({lay.where.get(role)})"
        if role in awaited:
            why += "; the role does not exist yet: the postgres target creates it (same cluster)"
        schemas = lay.schemas_of(role)
        if schemas:
            wanted.add(("database", role, "CONNECT"))
            if ("database", role, "CONNECT") not in state.acl:
                changes.append(
                    _change(
                        "grant",
                        role,
                        "database",
                        q(
                            sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(
                                ident(state.database), ident(role)
                            )
                        ),
                        f"{why}: reads {', '.join(schemas)}",
                    )
                )
        for schema in schemas:
            name = physical[schema]
            wanted.add((f"schema {name}", role, "USAGE"))
            if (f"schema {name}", role, "USAGE") not in state.acl:
                changes.append(
                    _change(
                        "grant",
                        role,
                        f"schema {name}",
                        q(
                            sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(
                                ident(name), ident(role)
                            )
                        ),
                        f"{why}: warehouse: {schema}",
                    )
                )
            lacking = []
            for relation in sorted(state.relations.get(name, ())):
                wanted.add((f"table {name}.{relation}", role, "SELECT"))
                if (f"table {name}.{relation}", role, "SELECT") not in state.acl:
                    lacking.append(relation)
            if lacking:
                changes.append(
                    _change(
                        "grant",
                        role,
                        f"all tables in schema {name}",
                        q(
                            sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA {} TO {}").format(
                                ident(name), ident(role)
                            )
                        ),
                        f"{why}: warehouse: {schema}; not granted on {', '.join(lacking[:5])}"
                        + (f" and {len(lacking) - 5} more" if len(lacking) > 5 else ""),
                    )
                )
            default = (state.owner, name, "r", role, "SELECT")
            wanted_default.add(default)
            if default not in state.default_acl:
                changes.append(
                    _change(
                        "default_privileges",
                        role,
                        f"future tables in schema {name}",
                        q(
                            sql.SQL(
                                "ALTER DEFAULT PRIVILEGES FOR ROLE {} IN SCHEMA {} "
                                "GRANT SELECT ON TABLES TO {}"
                            ).format(ident(state.owner), ident(name), ident(role))
                        ),
                        f"{why}: warehouse: {schema}; what {state.owner} creates there later",
                    )
                )

    # Everything else a policy role, a policy user or PUBLIC holds in this database is drift.
    managed = set(lay.policy_roles) | set(lay.policy_users) | {"public"}
    extra: dict[tuple[str, str], list[str]] = defaultdict(list)
    for obj, grantee, privilege in sorted(state.acl):
        if grantee not in managed or (obj, grantee, privilege) in wanted:
            continue
        if grantee == "public" and (
            obj == "schema public" or obj.startswith(("table public.", "column public."))
        ):
            continue  # the public schema is not the warehouse's; PUBLIC keeps its defaults there
        extra[(obj, grantee)].append(privilege)
    for (obj, grantee), privileges in extra.items():
        changes.append(
            _change(
                "revoke",
                grantee,
                obj,
                q(_pg_revoke(state.database, obj, privileges, grantee)),
                f"{grantee} holds {', '.join(privileges)} on {obj}, which the policy does not "
                "grant",
            )
        )
    extra_default: dict[tuple[str, str | None, str, str], list[str]] = defaultdict(list)
    for creator, schema, kind, grantee, privilege in sorted(state.default_acl, key=repr):
        if grantee in managed and (creator, schema, kind, grantee, privilege) not in wanted_default:
            extra_default[(creator, schema, kind, grantee)].append(privilege)
    for (creator, schema, kind, grantee), privileges in extra_default.items():
        objects = _DEFAULT_ACL_OBJECTS.get(kind, "TABLES")
        where = sql.SQL(" IN SCHEMA {}").format(ident(schema)) if schema else sql.SQL("")
        changes.append(
            _change(
                "default_privileges",
                grantee,
                f"future {objects.lower()}" + (f" in schema {schema}" if schema else ""),
                q(
                    sql.SQL(
                        "ALTER DEFAULT PRIVILEGES FOR ROLE {}{} REVOKE {} ON {} FROM {}"
                    ).format(
                        ident(creator),
                        where,
                        sql.SQL(", ").join(sql.SQL(p) for p in privileges),
                        sql.SQL(objects),
                        sql.SQL("PUBLIC") if grantee == "public" else ident(grantee),
                    )
                ),
                f"objects {creator} creates later would give {grantee} {', '.join(privileges)}, "
                "which the policy does not grant",
            )
        )
    return changes


def _pg_revoke(database: str, obj: str, privileges: list[str], grantee: str):
    from psycopg import sql

    who = sql.SQL("PUBLIC") if grantee == "public" else sql.Identifier(grantee)
    kind, _, name = obj.partition(" ")
    if kind == "database":
        target = sql.SQL("DATABASE {}").format(sql.Identifier(database))
    elif kind == "schema":
        target = sql.SQL("SCHEMA {}").format(sql.Identifier(name))
    elif kind == "table":
        schema, _, table = name.partition(".")
        target = sql.SQL("TABLE {}").format(sql.Identifier(schema, table))
    else:
        schema, table, column = name.split(".", 2)
        return sql.SQL("REVOKE {} ON TABLE {} FROM {}").format(
            sql.SQL(", ").join(
                sql.SQL("{} ({})").format(sql.SQL(p), sql.Identifier(column)) for p in privileges
            ),
            sql.Identifier(schema, table),
            who,
        )
    return sql.SQL("REVOKE {} ON {} FROM {}").format(
        sql.SQL(", ").join(sql.SQL(p) for p in privileges), target, who
    )


def _pg_until(user: User) -> str:
    return user.until.isoformat() if user.until else "infinity"


def _same_instant(a: dt.datetime | None, b: dt.datetime | None) -> bool:
    if a is None or b is None:
        return a is b
    return abs((a - b).total_seconds()) < 1


def _pg_role_changes(lay: Layout, state: _PgState, now: dt.datetime, q) -> list[Change]:
    """The group roles the warehouse needs and the logins of the policy's warehouse users.

    Roles are cluster-wide. On a cluster of its own the warehouse target provisions them all. On
    the OLTP's cluster it provisions only what the postgres target does not: group roles without
    `postgres` rules (created NOLOGIN, never altered or dropped) and the logins of users without
    the postgres store; a user of that kind holding a role with `postgres` rules is refused, since
    the membership would open the OLTP database to them too."""
    from psycopg import sql

    changes = []
    for role in lay.roles:
        if state.shared and role in lay.oltp_roles:
            continue
        if role not in state.roles:
            changes.append(
                _change(
                    "create_role",
                    role,
                    f"role {role}",
                    q(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(role))),
                    f"policy role {role} ({lay.where[role]}): a group role, its members log in",
                )
            )
    users = lay.users
    if state.shared:
        users = tuple(u for u in users if u.name not in lay.oltp_users)
        problems = [
            f"{lay.where[u.name]}: user {u.name}: provisioned in the warehouse only, but role(s) "
            f"{', '.join(sorted(set(u.roles) & lay.oltp_roles))} also grant OLTP access and the "
            "warehouse shares the OLTP's PostgreSQL cluster (roles are cluster-wide): add "
            "postgres to the user's stores, or give them warehouse-only roles"
            for u in users
            if set(u.roles) & lay.oltp_roles
        ]
        if problems:
            raise PolicyError("\n  ".join(["access policy: warehouse target refuses", *problems]))
    policy_roles = set(lay.policy_roles)
    for user in users:
        name = sql.Identifier(user.name)
        current = state.roles.get(user.name)
        active = user.active(now)
        if current is None:
            if not active:
                continue  # ended and never provisioned: nothing to do
            secret = secrets.token_urlsafe(18)
            changes.append(
                dataclasses.replace(
                    _change(
                        "create_role",
                        user.name,
                        f"login {user.name}",
                        q(
                            sql.SQL("CREATE ROLE {} LOGIN VALID UNTIL {} IN ROLE {}").format(
                                name,
                                sql.Literal(_pg_until(user)),
                                sql.SQL(", ").join(sql.Identifier(r) for r in user.roles),
                            )
                        ),
                        f"policy user {user.name} ({lay.where[user.name]}): roles "
                        f"{', '.join(user.roles)}"
                        + (f", until {user.until.isoformat()}" if user.until else ""),
                    ),
                    secret=secret,
                )
            )
            continue
        if active and not current.login:
            changes.append(
                _change(
                    "alter_role",
                    user.name,
                    f"login {user.name}",
                    q(sql.SQL("ALTER ROLE {} LOGIN").format(name)),
                    f"policy user {user.name} ({lay.where[user.name]}) may log in",
                )
            )
        if active and not _same_instant(current.valid_until, user.until):
            changes.append(
                _change(
                    "alter_role",
                    user.name,
                    f"login {user.name}",
                    q(
                        sql.SQL("ALTER ROLE {} VALID UNTIL {}").format(
                            name, sql.Literal(_pg_until(user))
                        )
                    ),
                    f"policy user {user.name} ({lay.where[user.name]}): until "
                    f"{user.until.isoformat() if user.until else 'no end'}",
                )
            )
        if not active and current.login:
            changes.append(
                _change(
                    "alter_role",
                    user.name,
                    f"login {user.name}",
                    q(sql.SQL("ALTER ROLE {} NOLOGIN").format(name)),
                    f"policy user {user.name} ({lay.where[user.name]}): access ended at "
                    f"{user.until.isoformat() if user.until else '?'}",
                )
            )
        wanted = set(user.roles) if active else set()
        for role in sorted(wanted - current.member_of):
            changes.append(
                _change(
                    "grant_role",
                    user.name,
                    f"role {role}",
                    q(sql.SQL("GRANT {} TO {}").format(sql.Identifier(role), name)),
                    f"policy user {user.name} ({lay.where[user.name]}) holds {role}",
                )
            )
        for role in sorted((current.member_of & policy_roles) - wanted):
            changes.append(
                _change(
                    "revoke_role",
                    user.name,
                    f"role {role}",
                    q(sql.SQL("REVOKE {} FROM {}").format(sql.Identifier(role), name)),
                    f"policy user {user.name} ({lay.where[user.name]}) "
                    + ("does not hold" if active else "no longer holds")
                    + f" {role}",
                )
            )
    return changes


def _postgres_apply(settings: Settings, changes: list[Change]) -> None:
    with _pg_connect(settings) as conn:
        if shares_oltp_cluster(settings, conn):
            created = {c.principal for c in changes if c.action == "create_role"}
            grantees = {c.principal for c in changes if c.principal != "public"} - created
            present = {
                r[0]
                for r in conn.execute(
                    "SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)", [sorted(grantees)]
                ).fetchall()
            }
            missing = sorted(grantees - present)
            if missing:
                raise WarehouseAccessError(
                    f"warehouse on the OLTP's cluster: role(s) {', '.join(missing)} do not exist; "
                    "the postgres target creates them: apply it first (`stripe-platform access "
                    "apply` applies postgres before the warehouse)"
                )
        with conn.transaction():
            for change in changes:
                if change.statement:
                    _pg_execute_change(conn, change)


def _pg_execute_change(conn, change: Change) -> None:
    """One statement; a new login gets its one-time password as a SCRAM verifier (never the
    password itself in a statement: statements reach the audit log)."""
    from psycopg import sql

    conn.execute(change.statement)
    if change.secret and change.action == "create_role":
        verifier = conn.pgconn.encrypt_password(
            change.secret.encode(), change.principal.encode(), b"scram-sha-256"
        )
        conn.execute(
            sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                sql.Identifier(change.principal), sql.Literal(verifier.decode())
            )
        )


def _postgres_execute(settings: Settings, statements: list[str]) -> None:
    with _pg_connect(settings) as conn, conn.transaction():
        for statement in statements:
            conn.execute(statement)


def _postgres_expired(
    settings: Settings, policy: Policy, now: dt.datetime
) -> list[tuple[ExpiredAccess, list[str]]]:
    """Policy users provisioned in the warehouse whose end passed and whose login role can still
    log in or still holds a policy role. On the OLTP's cluster the logins of users with the
    postgres store are the postgres target's (it reports and revokes them), not this target's."""
    from psycopg import sql

    lay = layout(settings, policy)
    with _pg_connect(settings) as conn:
        state = _pg_read(settings, conn, lay)
        found = []
        for user in lay.users:
            if state.shared and user.name in lay.oltp_users:
                continue
            current = state.roles.get(user.name)
            if user.active(now) or current is None or user.until is None:
                continue
            held = sorted(current.member_of & set(lay.policy_roles))
            if not current.login and not held:
                continue
            still = []
            if current.login:
                if current.valid_until is None or current.valid_until > now:
                    still.append("login role can log in (VALID UNTIL not passed)")
                else:
                    still.append(
                        "login role has LOGIN (VALID UNTIL passed: stops password logins only, "
                        "not certificate or trust ones)"
                    )
            if held:
                still.append(f"member of {', '.join(held)}")
            statements = [
                sql.SQL("ALTER ROLE {} NOLOGIN").format(sql.Identifier(user.name)).as_string(conn)
            ] + [
                sql.SQL("REVOKE {} FROM {}")
                .format(sql.Identifier(r), sql.Identifier(user.name))
                .as_string(conn)
                for r in held
            ]
            found.append(
                (
                    ExpiredAccess(
                        NAME,
                        user.name,
                        user.until,
                        "; ".join(still),
                        "stripe-platform access revoke-expired (NOLOGIN, roles revoked), then "
                        f"remove the entry ({policy.where(user.line)})",
                    ),
                    statements,
                )
            )
        return found


# --- DuckDB -------------------------------------------------------------------------------------


def _duckdb_paths(settings: Settings) -> list[Path]:
    """What holds the warehouse: the file, its WAL, and its directory when the directory is the
    platform's own (the rule of warehouse.duckdb.private_duckdb_file)."""
    path = settings.warehouse_file
    found = []
    directory = path.parent
    if (
        directory.name == "warehouse"
        and directory.exists()
        and directory.stat().st_uid == os.geteuid()
        and all(entry.name.startswith(path.name) for entry in directory.iterdir())
    ):
        found.append(directory)
    for file in (path, path.with_name(f"{path.name}.wal")):
        if file.exists():
            found.append(file)
    return found


def duckdb_plan(settings: Settings) -> list[Change]:
    """DuckDB has no users or grants: the drift is a warehouse file, WAL or directory that its
    group or others may read."""
    changes = []
    for path in _duckdb_paths(settings):
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            changes.append(
                _change(
                    "chmod",
                    "group/others",
                    str(path),
                    None,
                    f"mode {mode:04o}: group or others may read the warehouse (DuckDB has no "
                    f"users: the file's mode is its access control); {mode & ~0o077:04o} keeps it "
                    "to the platform's OS user",
                )
            )
    return changes


def _duckdb_apply(changes: list[Change]) -> None:
    for change in changes:
        if change.action != "chmod":
            raise WarehouseAccessError(f"DuckDB: cannot apply {change.action} on {change.object}")
        path = Path(change.object)
        path.chmod(stat.S_IMODE(path.stat().st_mode) & ~0o077)


# --- Snowflake ----------------------------------------------------------------------------------

_PLAIN = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*$")


def _sf_name(name: str) -> str:
    """An identifier as Snowflake stores it: unquoted names fold to upper case; others (a user
    named after an e-mail address) keep their case and are quoted when written."""
    return name.upper() if _PLAIN.match(name) else name


def _sf_ident(name: str) -> str:
    stored = _sf_name(name)
    return stored if _PLAIN.match(stored) else '"' + stored.replace('"', '""') + '"'


def _sf_schema(settings: Settings, schema: str) -> str:
    """The policy schema's Snowflake schema, qualified: marts and marts_masked are the same tables
    (the masking policies show one or the other)."""
    from stripe_platform.transform.dbt import MARTS_SCHEMA

    name = RAW_SCHEMA.upper() if schema == "raw" else MARTS_SCHEMA.upper()
    return f"{_sf_name(settings.snowflake_database)}.{name}"


def snowflake_clear_condition(clear_roles: Iterable[str]) -> str:
    """The masking policies' condition (macros/masking.sql, snowflake_clear_condition)."""
    tests = [f"IS_ROLE_IN_SESSION('{_sf_name(r)}')" for r in sorted(clear_roles)]
    return " OR ".join(tests) if tests else "FALSE"


def snowflake_masking_body(policy_type: str, clear_roles: Iterable[str]) -> str:
    masked = f"'{MASKED_TEXT}'" if policy_type == "VARCHAR" else "NULL"
    return f"CASE WHEN {snowflake_clear_condition(clear_roles)} THEN val ELSE {masked} END"


def _days_to_expiry(until: dt.datetime, now: dt.datetime) -> int:
    """Snowflake counts whole days: rounded up, so access lasts at least to `until`;
    revoke_expired disables the user at `until` itself (the hourly access review)."""
    return max(1, math.ceil((until - now).total_seconds() / 86400))


@dataclass(frozen=True)
class _Fact:
    """One thing the policy wants true in the Snowflake account, with the statement that makes
    it true and how to tell it already is (``held``)."""

    action: str
    principal: str
    object: str
    statement: str
    reason: str
    held: Callable[[SnowflakeState], bool]


@dataclass
class SnowflakeUser:
    disabled: bool
    default_role: str | None
    expires_at: dt.datetime | None


@dataclass
class SnowflakeState:
    """What SHOW ROLES / GRANTS / FUTURE GRANTS / USERS and DESCRIBE MASKING POLICY read."""

    roles: set[str] = field(default_factory=set)
    grants: dict[str, set[tuple[str, str, str]]] = field(
        default_factory=dict
    )  # role -> {(priv, on, name)}
    future: dict[str, set[tuple[str, str, str]]] = field(
        default_factory=dict
    )  # role -> {(priv, on, schema)}
    objects: dict[str, dict[str, str]] = field(
        default_factory=dict
    )  # DB.SCHEMA -> {DB.S.T: TABLE|VIEW}
    users: dict[str, SnowflakeUser] = field(default_factory=dict)
    user_roles: dict[str, set[str]] = field(default_factory=dict)
    masking: dict[str, str] = field(
        default_factory=dict
    )  # type -> body, of the policies that exist


def _sf_facts(settings: Settings, policy: Policy, now: dt.datetime, lay: Layout) -> list[_Fact]:
    database = _sf_name(settings.snowflake_database)
    warehouse = _sf_name(settings.snowflake_warehouse) if settings.snowflake_warehouse else None
    facts: list[_Fact] = []

    def grant(role: str, privilege: str, on: str, name: str, reason: str) -> None:
        facts.append(
            _Fact(
                "grant",
                role,
                f"{on.lower()} {name}",
                f"GRANT {privilege} ON {on} {_sf_qualified(name)} TO ROLE {role}",
                reason,
                lambda s, key=(privilege, on, name), role=role: key in s.grants.get(role, set()),
            )
        )

    for name in lay.roles:
        role = _sf_name(name)
        why = f"policy role {name} ({policy.where(policy.roles[name].line)})"
        facts.append(
            _Fact(
                "create_role",
                role,
                f"role {role}",
                f"CREATE ROLE IF NOT EXISTS {role}",
                why,
                lambda s, role=role: role in s.roles,
            )
        )
        schemas = lay.schemas_of(name)
        if not schemas:
            continue
        grant(role, "USAGE", "DATABASE", database, f"{why}: reads {', '.join(schemas)}")
        if warehouse:
            grant(role, "USAGE", "WAREHOUSE", warehouse, f"{why}: queries need a warehouse")
        for qualified in dict.fromkeys(_sf_schema(settings, s) for s in schemas):
            listed = ", ".join(s for s in schemas if _sf_schema(settings, s) == qualified)
            grant(role, "USAGE", "SCHEMA", qualified, f"{why}: warehouse: {listed}")
            for kind in ("TABLES", "VIEWS"):
                facts.append(
                    _Fact(
                        "grant",
                        role,
                        f"all {kind.lower()} in schema {qualified}",
                        f"GRANT SELECT ON ALL {kind} IN SCHEMA {qualified} TO ROLE {role}",
                        f"{why}: warehouse: {listed}",
                        lambda s, role=role, qualified=qualified, kind=kind[:-1]: all(
                            ("SELECT", kind, obj) in s.grants.get(role, set())
                            for obj, obj_kind in s.objects.get(qualified, {}).items()
                            if obj_kind == kind
                        ),
                    )
                )
            if qualified.endswith(f".{RAW_SCHEMA.upper()}"):
                # Not on the marts: a future grant would let a rebuilt mart be read before its
                # masking post-hook runs; the post-hook grants each mart once masked.
                for kind in ("TABLES", "VIEWS"):
                    facts.append(
                        _Fact(
                            "grant",
                            role,
                            f"future {kind.lower()} in schema {qualified}",
                            f"GRANT SELECT ON FUTURE {kind} IN SCHEMA {qualified} TO ROLE {role}",
                            f"{why}: warehouse: raw, tables the raw layer creates later",
                            lambda s, role=role, qualified=qualified, kind=kind[:-1]: (
                                ("SELECT", kind, qualified) in s.future.get(role, set())
                            ),
                        )
                    )

    clear = lay.readers["marts"]
    masking_schema = _sf_schema(settings, "marts")
    for policy_type in SNOWFLAKE_MASKING_TYPES:
        body = snowflake_masking_body(policy_type, clear)
        name = f"{masking_schema}.MASK_{policy_type}"
        facts.append(
            _Fact(
                "masking_policy",
                ", ".join(_sf_name(r) for r in clear) or "nobody",
                f"masking policy {name}",
                f"ALTER MASKING POLICY IF EXISTS {name} SET BODY -> {body}",
                f"marts in clear for {', '.join(clear) or 'no role'} (roles listing marts); "
                "dbt creates the policy and attaches it to the restricted columns",
                lambda s, t=policy_type, body=body: s.masking.get(t, body) == body,
            )
        )

    for user in lay.users:
        name = _sf_name(user.name)
        quoted = _sf_ident(user.name)
        where = f"policy user {user.name} ({policy.where(user.line)})"
        if not user.active(now):
            facts.append(
                _Fact(
                    "disable_user",
                    name,
                    f"user {name}",
                    f"ALTER USER IF EXISTS {quoted} SET DISABLED = TRUE",
                    f"{where}: access ended at {user.until.isoformat() if user.until else '?'}",
                    lambda s, name=name: name not in s.users or s.users[name].disabled,
                )
            )
            continue
        default_role = _sf_name(user.roles[0])
        expiry = f" DAYS_TO_EXPIRY = {_days_to_expiry(user.until, now)}" if user.until else ""
        facts.append(
            _Fact(
                "create_user",
                name,
                f"user {name}",
                f"CREATE USER IF NOT EXISTS {quoted} DEFAULT_ROLE = {default_role}{expiry}",
                f"{where}: roles {', '.join(user.roles)}"
                + (f", until {user.until.isoformat()}" if user.until else ""),
                lambda s, name=name: name in s.users,
            )
        )
        setting = f"DAYS_TO_EXPIRY = {_days_to_expiry(user.until, now)}" if user.until else None
        facts.append(
            _Fact(
                "alter_user",
                name,
                f"user {name}",
                f"ALTER USER {quoted} SET DISABLED = FALSE DEFAULT_ROLE = {default_role}"
                + (f" {setting}" if setting else ""),
                f"{where}: may log in"
                + (f" until {user.until.isoformat()}" if user.until else ", no end date"),
                lambda s, name=name, user=user, default_role=default_role: (
                    name not in s.users  # CREATE USER sets all of it
                    or (
                        not s.users[name].disabled
                        and s.users[name].default_role == default_role
                        and _expiry_matches(s.users[name].expires_at, user.until)
                    )
                ),
            )
        )
        if not user.until:
            facts.append(
                _Fact(
                    "alter_user",
                    name,
                    f"user {name}",
                    f"ALTER USER {quoted} UNSET DAYS_TO_EXPIRY",
                    f"{where}: no end date",
                    lambda s, name=name: name not in s.users or s.users[name].expires_at is None,
                )
            )
        for role_name in user.roles:
            role = _sf_name(role_name)
            facts.append(
                _Fact(
                    "grant_role",
                    name,
                    f"role {role}",
                    f"GRANT ROLE {role} TO USER {quoted}",
                    f"{where}: holds {role_name}",
                    lambda s, name=name, role=role: role in s.user_roles.get(name, set()),
                )
            )
    return facts


def _sf_qualified(name: str) -> str:
    return ".".join(_sf_ident(part) for part in name.split("."))


def _expiry_matches(expires_at: dt.datetime | None, until: dt.datetime | None) -> bool:
    """Snowflake's expiry counts whole days (rounded up from `until`)."""
    if until is None or expires_at is None:
        return until is None and expires_at is None
    return until - dt.timedelta(minutes=1) <= expires_at <= until + dt.timedelta(days=1)


def snowflake_statements(settings: Settings, policy: Policy, now: dt.datetime) -> list[Change]:
    """Every statement that makes a Snowflake account match the policy, whatever it holds now, in
    order (idempotent: IF NOT EXISTS, GRANT of what is granted is a no-op). What `access
    snowflake-sql` prints; :func:`snowflake_plan` keeps those not already true."""
    return [
        _change(f.action, f.principal, f.object, f.statement, f.reason)
        for f in _sf_facts(settings, policy, now, layout(settings, policy))
    ]


def snowflake_diff(
    settings: Settings, policy: Policy, now: dt.datetime, state: SnowflakeState
) -> list[Change]:
    """The statements not yet true in ``state``, then the revocations of what policy roles and
    users hold in the platform's database beyond the policy."""
    lay = layout(settings, policy)
    facts = _sf_facts(settings, policy, now, lay)
    changes = [
        _change(f.action, f.principal, f.object, f.statement, f.reason)
        for f in facts
        if not f.held(state)
    ]
    database = _sf_name(settings.snowflake_database)
    warehouse = _sf_name(settings.snowflake_warehouse) if settings.snowflake_warehouse else None
    wanted: dict[str, set[tuple[str, str, str]]] = defaultdict(set)
    wanted_future: dict[str, set[tuple[str, str, str]]] = defaultdict(set)
    for name in lay.roles:
        role = _sf_name(name)
        schemas = lay.schemas_of(name)
        if not schemas:
            continue
        wanted[role].add(("USAGE", "DATABASE", database))
        if warehouse:
            wanted[role].add(("USAGE", "WAREHOUSE", warehouse))
        for qualified in {_sf_schema(settings, s) for s in schemas}:
            wanted[role].add(("USAGE", "SCHEMA", qualified))
            for obj, kind in state.objects.get(qualified, {}).items():
                wanted[role].add(("SELECT", kind, obj))
            if qualified.endswith(f".{RAW_SCHEMA.upper()}"):
                wanted_future[role] |= {
                    ("SELECT", "TABLE", qualified),
                    ("SELECT", "VIEW", qualified),
                }
    policy_roles = {_sf_name(r) for r in lay.policy_roles}
    for role in sorted(policy_roles):
        for privilege, on, obj in sorted(state.grants.get(role, set())):
            ours = obj in (database, warehouse) or obj.startswith(f"{database}.")
            if privilege == "OWNERSHIP" or (privilege, on, obj) in wanted[role]:
                continue
            if on == "ROLE" and obj in policy_roles:  # a policy role holding another
                statement = f"REVOKE ROLE {obj} FROM ROLE {role}"
            elif ours and on != "ROLE":
                statement = f"REVOKE {privilege} ON {on} {_sf_qualified(obj)} FROM ROLE {role}"
            else:
                continue
            changes.append(
                _change(
                    "revoke",
                    role,
                    f"{on.lower()} {obj}",
                    statement,
                    f"{role} holds {privilege} on {obj}, which the policy does not grant",
                )
            )
        for privilege, on, schema in sorted(state.future.get(role, set())):
            if (privilege, on, schema) not in wanted_future[role]:
                changes.append(
                    _change(
                        "revoke",
                        role,
                        f"future {on.lower()}s in schema {schema}",
                        f"REVOKE {privilege} ON FUTURE {on}S IN SCHEMA {schema} FROM ROLE {role}",
                        f"{role} would get {privilege} on every new {on.lower()} of {schema}, "
                        "which the policy does not grant",
                    )
                )
    for user in lay.users:
        name = _sf_name(user.name)
        keep = {_sf_name(r) for r in user.roles} if user.active(now) else set()
        for role in sorted((state.user_roles.get(name, set()) & policy_roles) - keep):
            changes.append(
                _change(
                    "revoke_role",
                    name,
                    f"role {role}",
                    f"REVOKE ROLE {role} FROM USER {_sf_ident(user.name)}",
                    f"policy user {user.name} ({policy.where(user.line)}) does not hold {role}",
                )
            )
    return changes


Query = Callable[[str], list[dict[str, Any]]]


def read_snowflake_state(query: Query, settings: Settings, policy: Policy) -> SnowflakeState:
    """The account's roles, grants, future grants, users and masking bodies, through ``query``
    (one statement -> rows as {lower-case column: value}, as SHOW prints them)."""
    lay = layout(settings, policy)
    database = _sf_name(settings.snowflake_database)
    state = SnowflakeState()
    state.roles = {str(r["name"]).upper() for r in query("SHOW ROLES")}
    for name in lay.policy_roles:
        role = _sf_name(name)
        if role not in state.roles:
            continue
        state.grants[role] = {
            (str(r["privilege"]).upper(), str(r["granted_on"]).upper(), _unquote(r["name"]))
            for r in query(f"SHOW GRANTS TO ROLE {role}")
        }
    schemas = sorted({_sf_schema(settings, s) for s in SCHEMAS})
    existing = {
        f"{database}.{str(r['schema_name']).upper()}"
        for r in query(f"SELECT schema_name FROM {_sf_ident(database)}.INFORMATION_SCHEMA.SCHEMATA")
    }
    for qualified in schemas:
        state.objects[qualified] = {}
        if qualified not in existing:
            continue
        schema = qualified.rsplit(".", 1)[1]
        for r in query(
            f"SELECT table_name, table_type FROM {_sf_ident(database)}.INFORMATION_SCHEMA.TABLES "
            f"WHERE table_schema = '{schema}'"
        ):
            kind = "VIEW" if "VIEW" in str(r["table_type"]).upper() else "TABLE"
            state.objects[qualified][f"{qualified}.{str(r['table_name']).upper()}"] = kind
        for r in query(f"SHOW FUTURE GRANTS IN SCHEMA {qualified}"):
            role = str(r["grantee_name"]).upper()
            on = str(r["grant_on"]).upper()
            state.future.setdefault(role, set()).add((str(r["privilege"]).upper(), on, qualified))
    for r in query("SHOW USERS"):
        name = str(r["name"])
        state.users[name] = SnowflakeUser(
            disabled=str(r.get("disabled")).lower() == "true",
            default_role=(str(r["default_role"]).upper() if r.get("default_role") else None),
            expires_at=r.get("expires_at_time") or None,
        )
    for user in lay.users:
        name = _sf_name(user.name)
        if name in state.users:
            state.user_roles[name] = {
                str(r["role"]).upper() for r in query(f"SHOW GRANTS TO USER {_sf_ident(user.name)}")
            }
    if f"{database}.{_sf_schema(settings, 'marts').rsplit('.', 1)[1]}" in existing:
        masking_schema = _sf_schema(settings, "marts")
        present = {
            str(r["name"]).upper()
            for r in query(f"SHOW MASKING POLICIES IN SCHEMA {masking_schema}")
        }
        for policy_type in SNOWFLAKE_MASKING_TYPES:
            if f"MASK_{policy_type}" in present:
                rows = query(f"DESCRIBE MASKING POLICY {masking_schema}.MASK_{policy_type}")
                state.masking[policy_type] = " ".join(str(rows[0]["body"]).split())
    return state


def _unquote(name: Any) -> str:
    """A SHOW GRANTS object name ("DB.SCHEMA.TABLE", parts quoted when they need it)."""
    return ".".join(part.strip('"') for part in str(name).split("."))


def _snowflake_connect(settings: Settings):
    import snowflake.connector

    from stripe_platform.warehouse import snowflake_params

    return snowflake.connector.connect(**snowflake_params(settings))


def _snowflake_query(conn) -> Query:
    from snowflake.connector import DictCursor

    def query(statement: str) -> list[dict[str, Any]]:
        with conn.cursor(DictCursor) as cur:
            return [{k.lower(): v for k, v in row.items()} for row in cur.execute(statement)]

    return query


def snowflake_plan(settings: Settings, policy: Policy, now: dt.datetime) -> list[Change]:
    conn = _snowflake_connect(settings)
    try:
        state = read_snowflake_state(_snowflake_query(conn), settings, policy)
    except Exception as exc:
        raise WarehouseAccessError(
            f"Snowflake: cannot read the account's grants ({str(exc).splitlines()[0][:300]}); "
            "`stripe-platform access snowflake-sql` prints every statement of the policy instead"
        ) from exc
    finally:
        conn.close()
    return snowflake_diff(settings, policy, now, state)


def _snowflake_run(settings: Settings, statements: list[str]) -> None:
    if not statements:
        return
    conn = _snowflake_connect(settings)
    try:
        with conn.cursor() as cur:
            for statement in statements:
                cur.execute(statement)
    finally:
        conn.close()


def _snowflake_expired(
    settings: Settings, policy: Policy, now: dt.datetime
) -> list[tuple[ExpiredAccess, list[str]]]:
    lay = layout(settings, policy)
    ended = [u for u in lay.users if not u.active(now) and u.until is not None]
    if not ended:
        return []
    conn = _snowflake_connect(settings)
    try:
        users = {str(r["name"]): r for r in _snowflake_query(conn)("SHOW USERS")}
    finally:
        conn.close()
    found = []
    for user in ended:
        row = users.get(_sf_name(user.name))
        if row is None or str(row.get("disabled")).lower() == "true":
            continue
        found.append(
            (
                ExpiredAccess(
                    NAME,
                    _sf_name(user.name),
                    user.until,
                    "Snowflake user not disabled",
                    "stripe-platform access revoke-expired (ALTER USER ... SET DISABLED = TRUE), "
                    f"then remove the entry ({policy.where(user.line)})",
                ),
                [f"ALTER USER {_sf_ident(user.name)} SET DISABLED = TRUE"],
            )
        )
    return found
