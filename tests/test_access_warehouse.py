"""The warehouse target of the access policy (security/access_warehouse.py, issue 21).

PostgreSQL: a warehouse database of its own in the session's cluster, laid out as the platform
lays it out (raw, analytics with the base marts, marts_masked with the masked views, staging), the
marts' masking statements rendered by dbt itself from the policy (run-operation), then `plan` and
`apply`, proved by logging in as members of each role and as the policy's own login. The session
cluster is also the OLTP's, as in the embedded profile: the target finds that out (same system
identifier) and leaves the roles with OLTP rules to the postgres target; role and user names are
this module's own (roles are cluster-wide).

DuckDB: the file's mode. Snowflake: the rendered statements against hand-written ones, the plan
against hand-written SHOW output, and every statement run on fakesnow, which accepts almost none
of them (see test_what_the_snowflake_stand_in_runs).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import snowflake.connector
from psycopg import errors, sql
from pydantic import SecretStr
from typer.testing import CliRunner

from stripe_platform.audit import access_log
from stripe_platform.config import Settings
from stripe_platform.oltp import db
from stripe_platform.security import access_warehouse as aw
from stripe_platform.security.policy import PolicyError, load_policy
from stripe_platform.transform import dbt as transform

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.filterwarnings("ignore:Arrow output on a DB-API result:UserWarning"),
]

MASKED = "***MASKED***"
SUFFIX = secrets.token_hex(3)
ANALYST = f"wh_analyst_{SUFFIX}"  # a policy role of this module's own (roles are cluster-wide)
CAROL = f"wh_carol_{SUFFIX}"  # a temporary policy user provisioned in the warehouse
FUTURE = dt.datetime(2031, 3, 31, tzinfo=dt.UTC)


NOSCHEMA = f"wh_noschema_{SUFFIX}"  # a policy role with no warehouse schema


OPS = f"wh_ops_{SUFFIX}"  # a policy role with OLTP rules, that the cluster does not have
DAVE = f"wh_dave_{SUFFIX}"


def policy_text(
    *,
    carol_until: str = "2031-03-30",
    marts_for_developer: bool = False,
    ops: bool = False,
    dave: bool = False,
) -> str:
    developer = "[marts, marts_masked]" if marts_for_developer else "[marts_masked]"
    extra_role = (
        f"""  {OPS}:
    postgres: [GRANT CONNECT ON DATABASE mydb]
    warehouse: [marts_masked]
"""
        if ops
        else ""
    )
    extra_user = (
        f"""  {DAVE}:
    roles: [{OPS}]
    stores: [warehouse]
"""
        if dave
        else ""
    )
    return f"""version: 1
roles:
  admin:
    description: everything
    warehouse: [raw, marts, marts_masked]
    clear: [pii_quasi, pii, pci, credential]
  developer:
    warehouse: {developer}
    clear: []
  readonlyuser:
    warehouse: [marts_masked]
  {ANALYST}:
    warehouse: [marts_masked]
  {NOSCHEMA}:
    api: [fraud.score]
{extra_role}users:
  {CAROL}:
    roles: [{ANALYST}]
    until: {carol_until}
    reason: CHG-1 quarter review
    stores: [warehouse]
{extra_user}"""


def write_policy(path: Path, **kwargs: Any) -> Path:
    path.write_text(policy_text(**kwargs))
    return path


# --- PostgreSQL ---------------------------------------------------------------------------------


def _contract(model: str) -> list[tuple[str, str]]:
    """(column, data_type) of a mart's contract, as models/marts/<model>.yml declares it."""
    import yaml

    spec = yaml.safe_load(
        (transform.DBT_PROJECT_DIR / "models" / "marts" / f"{model}.yml").read_text()
    )
    (node,) = [m for m in spec["models"] if m["name"] == model]
    return [(c["name"], c["data_type"]) for c in node["columns"]]


def masking_plan(s: Settings) -> dict[str, list[str]]:
    """The statements dbt's masking macros render for this warehouse and policy
    (`dbt run-operation print_masking_statements`, in-process, with the env the platform passes)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        summary = transform.run_dbt(s, "run-operation", "print_masking_statements")
    assert summary.success, out.getvalue()[-3000:]
    line = next(x for x in out.getvalue().splitlines() if "MASKING_PLAN " in x)
    return json.loads(line.split("MASKING_PLAN ", 1)[1])


@pytest.fixture(scope="module")
def warehouse(settings: Settings, tmp_path_factory) -> Iterator[Settings]:
    """A PostgreSQL warehouse database laid out as the platform does, its marts masked by the
    statements dbt renders from the test policy; the settings point at it and at the policy."""
    home = tmp_path_factory.mktemp("access_wh")
    name = f"access_wh_{os.getpid()}_{SUFFIX}"
    with db.connect(settings, database="postgres", autocommit=True, with_key=False) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    s = settings.model_copy(
        update={
            "warehouse": "postgres",
            "warehouse_dsn": SecretStr(db.conninfo(settings, database=name, with_key=False)),
            "access_policy": write_policy(home / "policy.yaml"),
        }
    )
    try:
        with psycopg.connect(s.warehouse_dsn.get_secret_value(), autocommit=True) as conn:
            for schema in ("raw", "analytics", "staging"):
                conn.execute(f"CREATE SCHEMA {schema}")
            conn.execute("CREATE TABLE raw.postgres_customer (customerid bigint, username text)")
            conn.execute("INSERT INTO raw.postgres_customer VALUES (1, 'ann_b')")
            conn.execute("CREATE VIEW staging.stg_customer AS SELECT * FROM raw.postgres_customer")
            for model in ("DIM_Customer", "FACT_Session"):
                columns = ", ".join(f"{c} {t}" for c, t in _contract(model))
                conn.execute(f"CREATE TABLE analytics.{model} ({columns})")
            conn.execute(
                "INSERT INTO analytics.dim_customer (CustomerKey, UserName, CustomerSegment) "
                "VALUES (1, 'ann_b', 'Premium')"
            )
        plan = masking_plan(s)
        with psycopg.connect(s.warehouse_dsn.get_secret_value(), autocommit=True) as conn:
            for statement in [*plan["setup"], *plan["DIM_Customer"], *plan["FACT_Session"]]:
                conn.execute(statement)
        yield s
    finally:
        with db.connect(settings, database="postgres", autocommit=True, with_key=False) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
            for role in (CAROL, DAVE, ANALYST, NOSCHEMA, OPS):
                conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


@contextlib.contextmanager
def member_of(settings: Settings, s: Settings, role: str) -> Iterator[psycopg.Connection]:
    """A fresh login, member of ``role``, connected to the warehouse database."""
    user = f"wh_{role[:20]}_{secrets.token_hex(4)}"
    password = secrets.token_urlsafe(12)
    with db.connect(settings, database="postgres", autocommit=True, with_key=False) as admin:
        admin.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} IN ROLE {}").format(
                sql.Identifier(user), sql.Literal(password), sql.Identifier(role)
            )
        )
    try:
        with login(s, user, password) as conn:
            yield conn
    finally:
        with db.connect(settings, database="postgres", autocommit=True, with_key=False) as admin:
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(user)))


def login(s: Settings, user: str, password: str) -> psycopg.Connection:
    params = psycopg.conninfo.conninfo_to_dict(s.warehouse_dsn.get_secret_value())
    params.update(user=user, password=password)
    return psycopg.connect(psycopg.conninfo.make_conninfo(**params), autocommit=True)


def value(conn: psycopg.Connection, query: str) -> Any:
    rows = conn.execute(query).fetchall()
    assert len(rows) == 1, rows
    return rows[0][0]


def refused(conn: psycopg.Connection, relation: str) -> bool:
    try:
        conn.execute(f"SELECT 1 FROM {relation} LIMIT 1")
    except errors.InsufficientPrivilege:
        return True
    return False


def owner_and_database(s: Settings) -> tuple[str, str]:
    with psycopg.connect(s.warehouse_dsn.get_secret_value()) as conn:
        return conn.execute("SELECT current_user, current_database()").fetchone()


def test_on_the_oltp_cluster_its_roles_are_the_postgres_targets(warehouse, tmp_path, monkeypatch):
    """The session cluster is the OLTP's too: a role with OLTP rules is the postgres target's to
    create; a warehouse-only user may not hold it (membership is cluster-wide)."""
    s = warehouse.model_copy(
        update={"access_policy": write_policy(tmp_path / "ops.yaml", ops=True)}
    )
    assert aw.shares_oltp_cluster(s)
    changes = aw.plan(s, load_policy(s), dt.datetime.now(dt.UTC))
    assert f'CREATE ROLE "{ANALYST}" NOLOGIN' in {c.statement for c in changes}  # warehouse-only
    assert not [c for c in changes if c.action == "create_role" and c.principal == OPS]
    awaited = [c for c in changes if c.principal == OPS]
    assert awaited and all("the postgres target creates it" in c.reason for c in awaited)
    # Applying would grant to a role nobody created yet: refused, nothing applied.
    with pytest.raises(aw.WarehouseAccessError, match=f"role.*{OPS}.*postgres target"):
        aw.apply(s, load_policy(s), changes)
    with psycopg.connect(s.warehouse_dsn.get_secret_value(), autocommit=True) as conn:
        assert conn.execute(
            "SELECT has_database_privilege('public', current_database(), 'CONNECT')"
        ).fetchone()[0]
        assert not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [ANALYST]).fetchone()
    # A warehouse-only user holding it: refused, naming the user's line.
    both = s.model_copy(
        update={"access_policy": write_policy(tmp_path / "dave.yaml", ops=True, dave=True)}
    )
    with pytest.raises(
        PolicyError,
        match=rf"dave.yaml:\d+: user {DAVE}: provisioned in the warehouse only, but role\(s\) "
        rf"{OPS} also grant OLTP access",
    ):
        aw.plan(both, load_policy(both), dt.datetime.now(dt.UTC))
    # On a cluster of its own, the warehouse target creates every role it needs.
    monkeypatch.setattr(aw, "shares_oltp_cluster", lambda settings, conn=None: False)
    own = aw.plan(both, load_policy(both), dt.datetime.now(dt.UTC))
    assert sorted(c.principal for c in own if c.action == "create_role") == sorted(
        [OPS, ANALYST, CAROL, DAVE]
    )
    assert f'CREATE ROLE "{OPS}" NOLOGIN' in {c.statement for c in own}


def test_apply_makes_each_role_read_what_the_policy_says_and_nothing_more(warehouse, settings):
    s = warehouse
    policy = load_policy(s)
    owner, database = owner_and_database(s)
    changes = aw.plan(s, policy, dt.datetime.now(dt.UTC))
    statements = {c.statement for c in changes}
    # What the raw layer and the marts need, as hand-written statements.
    for expected in (
        f'CREATE ROLE "{ANALYST}" NOLOGIN',
        'GRANT USAGE ON SCHEMA "raw" TO "admin"',
        'GRANT SELECT ON ALL TABLES IN SCHEMA "raw" TO "admin"',
        f'ALTER DEFAULT PRIVILEGES FOR ROLE "{owner}" IN SCHEMA "raw" GRANT SELECT ON TABLES '
        'TO "admin"',
        f'ALTER DEFAULT PRIVILEGES FOR ROLE "{owner}" IN SCHEMA "marts_masked" GRANT SELECT ON '
        f'TABLES TO "{ANALYST}"',
        f'GRANT USAGE ON SCHEMA "marts_masked" TO "{ANALYST}"',
        f'GRANT SELECT ON ALL TABLES IN SCHEMA "marts_masked" TO "{ANALYST}"',
        f'GRANT CONNECT ON DATABASE "{database}" TO "developer"',
        f'REVOKE CONNECT, TEMPORARY ON DATABASE "{database}" FROM PUBLIC',
    ):
        assert expected in statements, (expected, sorted(statements, key=str))
    (new_login,) = [c for c in changes if c.action == "create_role" and c.principal == CAROL]
    assert new_login.statement == (
        f'CREATE ROLE "{CAROL}" LOGIN VALID UNTIL \'2031-03-31T00:00:00+00:00\' IN ROLE "{ANALYST}"'
    )
    assert new_login.secret and new_login.secret not in repr(new_login)
    # Nothing for the staging layer, nor for a role without warehouse schemas.
    assert not [c for c in changes if "staging" in c.object or c.principal == NOSCHEMA]

    assert aw.apply(s, policy, changes) == changes
    assert aw.plan(s, policy, dt.datetime.now(dt.UTC)) == []

    with member_of(settings, s, "admin") as admin:
        assert value(admin, "SELECT UserName FROM analytics.dim_customer") == "ann_b"  # in clear
        assert value(admin, "SELECT username FROM raw.postgres_customer") == "ann_b"
        assert refused(admin, "staging.stg_customer")
    for role in ("developer", "readonlyuser", ANALYST):
        with member_of(settings, s, role) as reader:
            assert value(reader, "SELECT UserName FROM marts_masked.dim_customer") == MASKED
            assert value(reader, "SELECT CustomerSegment FROM marts_masked.dim_customer") == (
                "Premium"
            )
            for relation in (
                "analytics.dim_customer",
                "analytics.fact_session",
                "raw.postgres_customer",
                "staging.stg_customer",
            ):
                assert refused(reader, relation), (role, relation)
    # The policy's own login: VALID UNTIL its end, member of its role, its one-time password.
    with login(s, CAROL, new_login.secret) as carol:
        assert value(carol, "SELECT UserName FROM marts_masked.dim_customer") == MASKED
        assert refused(carol, "analytics.dim_customer")
        assert value(
            carol, "SELECT rolvaliduntil FROM pg_roles WHERE rolname = current_user"
        ) == dt.datetime(2031, 3, 31, tzinfo=dt.UTC)
    # A role the policy gives no warehouse schema cannot even connect.
    with db.connect(settings, database="postgres", autocommit=True, with_key=False) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(NOSCHEMA)))
    with (
        pytest.raises(psycopg.OperationalError, match="permission denied for database"),
        member_of(settings, s, NOSCHEMA),
    ):
        pass

    # What the platform creates later is granted by the default privileges, without an apply.
    with psycopg.connect(s.warehouse_dsn.get_secret_value(), autocommit=True) as conn:
        conn.execute("CREATE TABLE raw.postgres_merchant (merchantid bigint)")
        conn.execute("CREATE VIEW marts_masked.fact_extra AS SELECT 1 AS one")
    with member_of(settings, s, "admin") as admin:
        assert admin.execute("SELECT count(*) FROM raw.postgres_merchant").fetchone() == (0,)
    with member_of(settings, s, ANALYST) as analyst:
        assert value(analyst, "SELECT one FROM marts_masked.fact_extra") == 1
        assert refused(analyst, "raw.postgres_merchant")
    assert aw.plan(s, policy, dt.datetime.now(dt.UTC)) == []


def test_a_grant_made_by_hand_is_drift_and_apply_revokes_it(warehouse, settings):
    s = warehouse
    policy = load_policy(s)
    aw.apply(s, policy, aw.plan(s, policy, dt.datetime.now(dt.UTC)))
    with psycopg.connect(s.warehouse_dsn.get_secret_value(), autocommit=True) as owner:
        owner.execute("GRANT USAGE ON SCHEMA analytics TO developer")
        owner.execute("GRANT SELECT, UPDATE ON analytics.dim_customer TO developer")
        owner.execute("GRANT SELECT (customerid) ON raw.postgres_customer TO readonlyuser")
        owner.execute("ALTER DEFAULT PRIVILEGES IN SCHEMA staging GRANT SELECT ON TABLES TO PUBLIC")
    with member_of(settings, s, "developer") as developer:
        assert value(developer, "SELECT UserName FROM analytics.dim_customer") == "ann_b"  # leak
    owner_name, _ = owner_and_database(s)
    drift = aw.plan(s, policy, dt.datetime.now(dt.UTC))
    assert sorted(c.statement for c in drift) == sorted(
        [
            'REVOKE USAGE ON SCHEMA "analytics" FROM "developer"',
            'REVOKE SELECT, UPDATE ON TABLE "analytics"."dim_customer" FROM "developer"',
            'REVOKE SELECT ("customerid") ON TABLE "raw"."postgres_customer" FROM "readonlyuser"',
            f'ALTER DEFAULT PRIVILEGES FOR ROLE "{owner_name}" IN SCHEMA "staging" REVOKE SELECT '
            "ON TABLES FROM PUBLIC",
        ]
    )
    assert {c.action for c in drift} == {"revoke", "default_privileges"}
    started = dt.datetime.now(dt.UTC)
    aw.apply(s, policy, drift)
    assert aw.plan(s, policy, dt.datetime.now(dt.UTC)) == []
    # The apply is in the access log, with what it changed.
    (event,) = [
        e
        for e in access_log.events(s, since=started, origins=["api"])
        if e.resource == "access/warehouse/postgres"
    ]
    assert (event.kind, event.action, event.outcome) == ("admin", "apply", "allow")
    with member_of(settings, s, "developer") as developer:
        assert refused(developer, "analytics.dim_customer")


def test_expired_access_is_listed_then_revoked(warehouse, settings, tmp_path):
    s = warehouse
    policy = load_policy(s)
    aw.apply(s, policy, aw.plan(s, policy, dt.datetime.now(dt.UTC)))
    password = secrets.token_urlsafe(12)
    with psycopg.connect(s.warehouse_dsn.get_secret_value(), autocommit=True) as owner:
        owner.execute(
            sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                sql.Identifier(CAROL), sql.Literal(password)
            )
        )
    # The contract ended an hour ago: the policy says so; the login still works.
    ended = (dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)).replace(microsecond=0)
    s2 = s.model_copy(
        update={"access_policy": write_policy(tmp_path / "p.yaml", carol_until=ended.isoformat())}
    )
    policy2 = load_policy(s2)
    now = dt.datetime.now(dt.UTC)
    with login(s2, CAROL, password) as carol:
        assert value(carol, "SELECT UserName FROM marts_masked.dim_customer") == MASKED
    (found,) = aw.expired(s2, policy2, now)
    assert (found.target, found.principal, found.ended_at) == ("warehouse", CAROL, ended)
    assert f"member of {ANALYST}" in found.still and "login" in found.still
    # apply refuses while the policy holds an ended grant; revoke-expired ends it.
    with pytest.raises(PolicyError, match=f"user {CAROL}: temporary grant ended"):
        aw.apply(s2, policy2, aw.plan(s2, policy2, now))
    assert aw.revoke_expired(s2, policy2, now) == [found]
    with pytest.raises(psycopg.OperationalError, match="not permitted to log in"):
        login(s2, CAROL, password)
    assert aw.expired(s2, policy2, now) == []
    assert aw.plan(s2, policy2, now) == []


def test_the_masking_macros_take_their_roles_from_the_policy(warehouse, settings, tmp_path):
    s = warehouse
    assert json.loads(aw.masking_env(load_policy(s))[aw.MASKING_ENV]) == {
        "marts": {"admin": ["credential", "non_personal", "pci", "pii", "pii_quasi"]},
        "masked": sorted(["admin", "developer", "readonlyuser", ANALYST]),
    }
    with db.connect(settings, database="postgres", autocommit=True, with_key=False) as conn:
        analyst = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [ANALYST]).fetchone()
    readers = ["admin", "developer", "readonlyuser"] + ([ANALYST] if analyst else [])
    plan = masking_plan(s)
    assert plan["setup"] == [
        "create schema if not exists marts_masked",
        "revoke all on schema analytics, marts_masked from public",
        "grant usage on schema analytics to admin",
        f"grant usage on schema marts_masked to {', '.join(readers)}",
        f"revoke all on schema analytics from {', '.join(readers[1:])}",
    ]
    _, database = owner_and_database(s)
    assert plan["DIM_Customer"] == [
        f"revoke all on {database}.analytics.dim_customer from public",
        f"revoke all on {database}.analytics.dim_customer from {', '.join(readers[1:])}",
        f"grant select on {database}.analytics.dim_customer to admin",
        "drop view if exists marts_masked.dim_customer",
        plan["DIM_Customer"][4],  # the view itself: tests/test_masking.py
        f"grant select on marts_masked.dim_customer to {', '.join(readers)}",
    ]
    assert plan["DIM_Customer"][4].startswith("create view marts_masked.dim_customer as select")
    # A policy giving developer the marts in clear without the classes they hold is refused.
    bad = s.model_copy(
        update={"access_policy": write_policy(tmp_path / "bad.yaml", marts_for_developer=True)}
    )
    with pytest.raises(PolicyError, match=r"bad.yaml:\d+: role developer: warehouse schema marts"):
        aw.layout(bad, load_policy(bad))


# --- DuckDB -------------------------------------------------------------------------------------


def test_duckdb_file_open_to_others_is_drift_and_apply_narrows_it(settings, tmp_path):
    import duckdb

    directory = tmp_path / "warehouse"
    directory.mkdir()
    path = directory / "warehouse.duckdb"
    duckdb.connect(str(path)).close()
    path.chmod(0o644)
    directory.chmod(0o755)
    s = settings.model_copy(
        update={
            "warehouse": "duckdb",
            "warehouse_path": path,
            "access_policy": write_policy(tmp_path / "policy.yaml"),
        }
    )
    policy = load_policy(s)
    now = dt.datetime.now(dt.UTC)
    changes = aw.plan(s, policy, now)
    assert [(c.action, c.object, c.statement) for c in changes] == [
        ("chmod", str(directory), None),
        ("chmod", str(path), None),
    ]
    assert "mode 0644" in changes[1].reason and "0600" in changes[1].reason
    aw.apply(s, policy, changes)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert aw.plan(s, policy, now) == []
    # A WAL left readable by the group is drift too; a private one is not.
    wal = directory / "warehouse.duckdb.wal"
    wal.write_bytes(b"")
    wal.chmod(0o640)
    assert [c.object for c in aw.plan(s, policy, now)] == [str(wal)]
    wal.chmod(0o600)
    assert aw.plan(s, policy, now) == []
    # No users in the engine: nothing expires there; what is enforced is said in words.
    assert aw.expired(s, policy, now) == []
    assert "0600" in aw.describe(s, policy)[0]
    assert any(CAROL in line and "no users" in line for line in aw.describe(s, policy))


# --- Snowflake ----------------------------------------------------------------------------------

SF_NOW = dt.datetime(2031, 3, 1, 12, tzinfo=dt.UTC)
SF_POLICY = """version: 1
roles:
  admin:
    warehouse: [raw, marts, marts_masked]
    clear: [pii_quasi, pii, pci, credential]
  analyst:
    warehouse: [marts_masked]
  fraud_service:
    api: [fraud.score]
users:
  carol:
    roles: [analyst]
    until: 2031-03-30
    stores: [warehouse]
  erin:
    roles: [admin]
    stores: [warehouse, api]
  frank:
    roles: [analyst]
    until: 2031-02-01
    stores: [warehouse]
  jane.doe@example.com:
    roles: [analyst]
    stores: [warehouse]
  olga:
    roles: [analyst]
    stores: [postgres]
"""
ADMIN_BODY = "CASE WHEN IS_ROLE_IN_SESSION('ADMIN') THEN val ELSE {} END"
# Every statement of SF_POLICY for database STRIPE and warehouse WH at SF_NOW, written by hand.
SF_STATEMENTS = [
    "CREATE ROLE IF NOT EXISTS ADMIN",
    "GRANT USAGE ON DATABASE STRIPE TO ROLE ADMIN",
    "GRANT USAGE ON WAREHOUSE WH TO ROLE ADMIN",
    "GRANT USAGE ON SCHEMA STRIPE.RAW TO ROLE ADMIN",
    "GRANT SELECT ON ALL TABLES IN SCHEMA STRIPE.RAW TO ROLE ADMIN",
    "GRANT SELECT ON ALL VIEWS IN SCHEMA STRIPE.RAW TO ROLE ADMIN",
    "GRANT SELECT ON FUTURE TABLES IN SCHEMA STRIPE.RAW TO ROLE ADMIN",
    "GRANT SELECT ON FUTURE VIEWS IN SCHEMA STRIPE.RAW TO ROLE ADMIN",
    "GRANT USAGE ON SCHEMA STRIPE.ANALYTICS TO ROLE ADMIN",
    "GRANT SELECT ON ALL TABLES IN SCHEMA STRIPE.ANALYTICS TO ROLE ADMIN",
    "GRANT SELECT ON ALL VIEWS IN SCHEMA STRIPE.ANALYTICS TO ROLE ADMIN",
    "CREATE ROLE IF NOT EXISTS ANALYST",
    "GRANT USAGE ON DATABASE STRIPE TO ROLE ANALYST",
    "GRANT USAGE ON WAREHOUSE WH TO ROLE ANALYST",
    "GRANT USAGE ON SCHEMA STRIPE.ANALYTICS TO ROLE ANALYST",
    "GRANT SELECT ON ALL TABLES IN SCHEMA STRIPE.ANALYTICS TO ROLE ANALYST",
    "GRANT SELECT ON ALL VIEWS IN SCHEMA STRIPE.ANALYTICS TO ROLE ANALYST",
    "ALTER MASKING POLICY IF EXISTS STRIPE.ANALYTICS.MASK_VARCHAR SET BODY -> "
    + ADMIN_BODY.format("'***MASKED***'"),
    *(
        f"ALTER MASKING POLICY IF EXISTS STRIPE.ANALYTICS.MASK_{t} SET BODY -> "
        + ADMIN_BODY.format("NULL")
        for t in ("NUMBER", "FLOAT", "DATE", "TIMESTAMP_NTZ", "TIMESTAMP_TZ", "BOOLEAN")
    ),
    # carol: through 2031-03-30 (UTC), 29.5 days after SF_NOW: 30 whole days.
    "CREATE USER IF NOT EXISTS CAROL DEFAULT_ROLE = ANALYST DAYS_TO_EXPIRY = 30",
    "ALTER USER CAROL SET DISABLED = FALSE DEFAULT_ROLE = ANALYST DAYS_TO_EXPIRY = 30",
    "GRANT ROLE ANALYST TO USER CAROL",
    "CREATE USER IF NOT EXISTS ERIN DEFAULT_ROLE = ADMIN",
    "ALTER USER ERIN SET DISABLED = FALSE DEFAULT_ROLE = ADMIN",
    "ALTER USER ERIN UNSET DAYS_TO_EXPIRY",
    "GRANT ROLE ADMIN TO USER ERIN",
    "ALTER USER IF EXISTS FRANK SET DISABLED = TRUE",
    'CREATE USER IF NOT EXISTS "jane.doe@example.com" DEFAULT_ROLE = ANALYST',
    'ALTER USER "jane.doe@example.com" SET DISABLED = FALSE DEFAULT_ROLE = ANALYST',
    'ALTER USER "jane.doe@example.com" UNSET DAYS_TO_EXPIRY',
    'GRANT ROLE ANALYST TO USER "jane.doe@example.com"',
]


@pytest.fixture
def sf(settings: Settings, tmp_path: Path) -> Settings:
    (tmp_path / "policy.yaml").write_text(SF_POLICY)
    return settings.model_copy(
        update={
            "warehouse": "snowflake",
            "snowflake_account": "acme",
            "snowflake_user": "platform",
            "snowflake_database": "STRIPE",
            "snowflake_warehouse": "WH",
            "access_policy": tmp_path / "policy.yaml",
        }
    )


def test_snowflake_statements_as_rendered(sf):
    changes = aw.snowflake_statements(sf, load_policy(sf), SF_NOW)
    assert [c.statement for c in changes] == SF_STATEMENTS
    assert {c.target for c in changes} == {"warehouse"}
    (frank,) = [c for c in changes if c.principal == "FRANK"]
    assert frank.action == "disable_user" and "access ended at 2031-02-02" in frank.reason


def _grants(*rows: tuple[str, str, str]) -> list[dict[str, Any]]:
    return [{"privilege": p, "granted_on": on, "name": name} for p, on, name in rows]


# SHOW output of an account that mostly matches SF_POLICY, in Snowflake's documented columns.
SF_ACCOUNT: dict[str, list[dict[str, Any]]] = {
    "SHOW ROLES": [{"name": "ADMIN"}, {"name": "ANALYST"}, {"name": "SYSADMIN"}],
    "SHOW GRANTS TO ROLE ADMIN": _grants(
        ("USAGE", "DATABASE", "STRIPE"),
        ("USAGE", "WAREHOUSE", "WH"),
        ("USAGE", "SCHEMA", "STRIPE.RAW"),
        ("USAGE", "SCHEMA", "STRIPE.ANALYTICS"),
        ("SELECT", "TABLE", "STRIPE.RAW.POSTGRES_CUSTOMER"),
        ("SELECT", "TABLE", "STRIPE.ANALYTICS.DIM_CUSTOMER"),
        ("SELECT", "TABLE", "STRIPE.ANALYTICS.FACT_REVENUE"),
    ),
    "SHOW GRANTS TO ROLE ANALYST": _grants(
        ("USAGE", "DATABASE", "STRIPE"),
        ("USAGE", "WAREHOUSE", "WH"),
        ("USAGE", "SCHEMA", "STRIPE.ANALYTICS"),
        ("SELECT", "TABLE", "STRIPE.ANALYTICS.DIM_CUSTOMER"),
        ("SELECT", "TABLE", "STRIPE.RAW.POSTGRES_CUSTOMER"),  # drift: raw is admin's
        ("USAGE", "ROLE", "ADMIN"),  # drift: analyst holds admin
        ("SELECT", "TABLE", "OTHER_DB.PUBLIC.T"),  # another database: not the policy's
    ),
    "SELECT schema_name FROM STRIPE.INFORMATION_SCHEMA.SCHEMATA": [
        {"schema_name": "RAW"},
        {"schema_name": "ANALYTICS"},
        {"schema_name": "INFORMATION_SCHEMA"},
    ],
    "SELECT table_name, table_type FROM STRIPE.INFORMATION_SCHEMA.TABLES WHERE table_schema = "
    "'ANALYTICS'": [
        {"table_name": "DIM_CUSTOMER", "table_type": "BASE TABLE"},
        {"table_name": "FACT_REVENUE", "table_type": "BASE TABLE"},  # analyst lacks it
    ],
    "SELECT table_name, table_type FROM STRIPE.INFORMATION_SCHEMA.TABLES WHERE table_schema = "
    "'RAW'": [{"table_name": "POSTGRES_CUSTOMER", "table_type": "BASE TABLE"}],
    "SHOW FUTURE GRANTS IN SCHEMA STRIPE.ANALYTICS": [
        # drift: a rebuilt mart would be readable before its masking
        {
            "privilege": "SELECT",
            "grant_on": "TABLE",
            "name": "STRIPE.ANALYTICS.<TABLE>",
            "grantee_name": "ANALYST",
        },
    ],
    "SHOW FUTURE GRANTS IN SCHEMA STRIPE.RAW": [
        {
            "privilege": "SELECT",
            "grant_on": kind,
            "name": f"STRIPE.RAW.<{kind}>",
            "grantee_name": "ADMIN",
        }
        for kind in ("TABLE", "VIEW")
    ],
    "SHOW USERS": [
        {
            "name": "CAROL",
            "disabled": "false",
            "default_role": "ANALYST",
            "expires_at_time": dt.datetime(2031, 3, 31, 12, tzinfo=dt.UTC),
        },
        {"name": "ERIN", "disabled": "false", "default_role": "ADMIN", "expires_at_time": None},
        {
            "name": "FRANK",
            "disabled": "false",
            "default_role": "ANALYST",
            "expires_at_time": dt.datetime(2031, 2, 2, tzinfo=dt.UTC),
        },
        {
            "name": "PLATFORM",
            "disabled": "false",
            "default_role": "SYSADMIN",
            "expires_at_time": None,
        },
    ],
    "SHOW GRANTS TO USER CAROL": [{"role": "ANALYST"}, {"role": "ADMIN"}],  # drift: admin
    "SHOW GRANTS TO USER ERIN": [{"role": "ADMIN"}],
    "SHOW GRANTS TO USER FRANK": [{"role": "ANALYST"}],
    "SHOW MASKING POLICIES IN SCHEMA STRIPE.ANALYTICS": [{"name": "MASK_VARCHAR"}],
    # drift: someone added ANALYST to the clear roles
    "DESCRIBE MASKING POLICY STRIPE.ANALYTICS.MASK_VARCHAR": [
        {
            "name": "MASK_VARCHAR",
            "body": "CASE WHEN IS_ROLE_IN_SESSION('ADMIN') OR "
            "IS_ROLE_IN_SESSION('ANALYST')\n THEN val ELSE '***MASKED***' END",
        }
    ],
}


def test_snowflake_plan_from_the_accounts_grants(sf):
    asked = []

    def query(statement: str) -> list[dict[str, Any]]:
        asked.append(statement)
        return SF_ACCOUNT[statement]

    policy = load_policy(sf)
    state = aw.read_snowflake_state(query, sf, policy)
    assert set(asked) == set(SF_ACCOUNT)
    assert [c.statement for c in aw.snowflake_diff(sf, policy, SF_NOW, state)] == [
        "GRANT SELECT ON ALL TABLES IN SCHEMA STRIPE.ANALYTICS TO ROLE ANALYST",
        "ALTER MASKING POLICY IF EXISTS STRIPE.ANALYTICS.MASK_VARCHAR SET BODY -> "
        + ADMIN_BODY.format("'***MASKED***'"),
        "ALTER USER IF EXISTS FRANK SET DISABLED = TRUE",
        'CREATE USER IF NOT EXISTS "jane.doe@example.com" DEFAULT_ROLE = ANALYST',
        'GRANT ROLE ANALYST TO USER "jane.doe@example.com"',
        "REVOKE SELECT ON TABLE STRIPE.RAW.POSTGRES_CUSTOMER FROM ROLE ANALYST",
        "REVOKE ROLE ADMIN FROM ROLE ANALYST",
        "REVOKE SELECT ON FUTURE TABLES IN SCHEMA STRIPE.ANALYTICS FROM ROLE ANALYST",
        "REVOKE ROLE ADMIN FROM USER CAROL",
        "REVOKE ROLE ANALYST FROM USER FRANK",  # ended: disabled and its roles taken back
    ]
    # The account once it holds all of that: nothing left.
    state.grants["ANALYST"] = {
        ("USAGE", "DATABASE", "STRIPE"),
        ("USAGE", "WAREHOUSE", "WH"),
        ("USAGE", "SCHEMA", "STRIPE.ANALYTICS"),
        ("SELECT", "TABLE", "STRIPE.ANALYTICS.DIM_CUSTOMER"),
        ("SELECT", "TABLE", "STRIPE.ANALYTICS.FACT_REVENUE"),
    }
    state.future["ANALYST"] = set()
    state.masking["VARCHAR"] = ADMIN_BODY.format("'***MASKED***'")
    state.users["FRANK"].disabled = True
    state.users["jane.doe@example.com"] = aw.SnowflakeUser(False, "ANALYST", None)
    state.user_roles["jane.doe@example.com"] = {"ANALYST"}
    state.user_roles["CAROL"] = {"ANALYST"}
    state.user_roles["FRANK"] = set()
    assert aw.snowflake_diff(sf, policy, SF_NOW, state) == []
    # An expiry Snowflake moved by more than its day of rounding is drift.
    state.users["CAROL"].expires_at = dt.datetime(2031, 4, 2, tzinfo=dt.UTC)
    assert [c.statement for c in aw.snowflake_diff(sf, policy, SF_NOW, state)] == [
        "ALTER USER CAROL SET DISABLED = FALSE DEFAULT_ROLE = ANALYST DAYS_TO_EXPIRY = 30"
    ]


def test_the_masking_macros_and_the_snowflake_plan_agree(sf):
    """dbt renders the policies' body from the same policy (tests/test_masking.py checks the
    rendered ALTER MASKING POLICY for the repository's policy; this checks the rule for several
    clear roles and none)."""
    assert aw.snowflake_masking_body("VARCHAR", ["admin", "auditor"]) == (
        "CASE WHEN IS_ROLE_IN_SESSION('ADMIN') OR IS_ROLE_IN_SESSION('AUDITOR') THEN val ELSE "
        "'***MASKED***' END"
    )
    assert aw.snowflake_masking_body("NUMBER", []) == "CASE WHEN FALSE THEN val ELSE NULL END"


def test_what_the_snowflake_stand_in_runs(sf, snowflake_server):
    """fakesnow 0.12 (the suite's Snowflake) parses none of the access statements: CREATE ROLE,
    GRANT, REVOKE, CREATE USER with properties, ALTER USER, ALTER MASKING POLICY and SHOW
    ROLES/GRANTS all fail to parse. It proves the names the plan reads (the information schema of
    a database laid out as the platform's) and that the plan refuses clearly when it cannot read
    the grants; not that Snowflake accepts or enforces the statements."""
    database = f"ACCESS_{SUFFIX.upper()}"
    params = {**snowflake_server, "network_timeout": 10, "login_timeout": 10, "socket_timeout": 10}
    conn = snowflake.connector.connect(**params)
    try:
        cur = conn.cursor()
        cur.execute(f"CREATE DATABASE {database}")
        for schema in ("RAW", "ANALYTICS"):
            cur.execute(f"CREATE SCHEMA {database}.{schema}")
        cur.execute(f"CREATE TABLE {database}.RAW.POSTGRES_CUSTOMER (CUSTOMERID NUMBER)")
        cur.execute(f"CREATE TABLE {database}.ANALYTICS.DIM_CUSTOMER (CUSTOMERKEY NUMBER)")
        cur.execute(f"CREATE VIEW {database}.ANALYTICS.V_CUSTOMER AS SELECT 1 AS ONE")
        s = sf.model_copy(update={"snowflake_database": database})
        accepted, refused = [], []
        for change in aw.snowflake_statements(s, load_policy(s), SF_NOW):
            try:
                cur.execute(change.statement)
                accepted.append(change.statement)
            except snowflake.connector.errors.ProgrammingError as exc:
                refused.append((change.statement, exc.errno))
        assert accepted == []
        assert len(refused) == len(SF_STATEMENTS)
        assert {errno for _, errno in refused} <= {1003, 9999}  # parse error, not implemented
        query = aw._snowflake_query(conn)
        schemas = {
            r["schema_name"]
            for r in query(f"SELECT schema_name FROM {database}.INFORMATION_SCHEMA.SCHEMATA")
        }
        assert {"RAW", "ANALYTICS"} <= schemas
        assert sorted(
            (r["table_name"], r["table_type"])
            for r in query(
                f"SELECT table_name, table_type FROM {database}.INFORMATION_SCHEMA.TABLES "
                "WHERE table_schema = 'ANALYTICS'"
            )
        ) == [("DIM_CUSTOMER", "BASE TABLE")]  # Snowflake lists V_CUSTOMER too, fakesnow no view
        with pytest.raises(snowflake.connector.errors.ProgrammingError):
            query("SHOW ROLES")
    finally:
        conn.close()
    stand_in = sf.model_copy(
        update={
            "snowflake_database": database,
            "snowflake_account": snowflake_server["account"],
            "snowflake_user": snowflake_server["user"],
            "snowflake_password": SecretStr(snowflake_server["password"]),
            "snowflake_host": snowflake_server["host"],
            "snowflake_port": snowflake_server["port"],
            "snowflake_protocol": "http",
        }
    )
    with pytest.raises(
        aw.WarehouseAccessError, match="cannot read the account's grants.*access snowflake-sql"
    ):
        aw.plan(stand_in, load_policy(stand_in), SF_NOW)


def test_access_snowflake_sql_prints_them(sf, monkeypatch):
    from stripe_platform.cli import access_warehouse as _  # noqa: F401 - registers the command
    from stripe_platform.cli import app

    env = {
        "STRIPE_PLATFORM_HOME": str(sf.home),
        "STRIPE_PLATFORM_ACCESS_POLICY": str(sf.access_policy),
    }
    from stripe_platform.config import get_settings

    get_settings.cache_clear()
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    try:
        result = CliRunner().invoke(
            app, ["access", "snowflake-sql", "--database", "stripe", "--warehouse", "wh"]
        )
        assert result.exit_code == 0, result.output
        statements = [line for line in result.output.splitlines() if not line.startswith("--")]
        assert statements[:3] == [
            "CREATE ROLE IF NOT EXISTS ADMIN;",
            "GRANT USAGE ON DATABASE STRIPE TO ROLE ADMIN;",
            "GRANT USAGE ON WAREHOUSE WH TO ROLE ADMIN;",
        ]
        assert 'GRANT ROLE ANALYST TO USER "jane.doe@example.com";' in statements
        as_json = CliRunner().invoke(app, ["access", "snowflake-sql", "--json"])
        assert as_json.exit_code == 0, as_json.output
        rows = json.loads(as_json.output)
        assert rows[0] == {
            "target": "warehouse",
            "action": "create_role",
            "principal": "ADMIN",
            "object": "role ADMIN",
            "statement": "CREATE ROLE IF NOT EXISTS ADMIN",
            "reason": f"policy role admin ({sf.access_policy}:3)",
        }
    finally:
        get_settings.cache_clear()
