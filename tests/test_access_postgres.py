"""The access policy's PostgreSQL target, on the real cluster: plans written out by hand, applies
checked by logging in as the logins it creates, expiry, drift made by hand."""

from __future__ import annotations

import datetime as dt
import json
import textwrap
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from typer.testing import CliRunner

from stripe_platform.audit import access_log
from stripe_platform.cli import app as cli_app
from stripe_platform.config import get_settings
from stripe_platform.oltp import db, partitions
from stripe_platform.oltp.access import grant_temporary
from stripe_platform.oltp.migrate import migrate
from stripe_platform.paths import REPO_ROOT
from stripe_platform.security import access_postgres
from stripe_platform.security.access import Change
from stripe_platform.security.access_postgres import AccessTargetError
from stripe_platform.security.policy import Policy, load_policy

DEFAULT = REPO_ROOT / "access" / "policy.yaml"
UNTIL = "2030-03-31"  # through that day: VALID UNTIL the next midnight, UTC
VALID_UNTIL = "2030-04-01T00:00:00+00:00"


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def policy_with(tmp_path: Path, *edits: tuple[str, str], users: str = "") -> Policy:
    """The default policy with (old, new) text edits and users: a new file, so a new policy."""
    text = DEFAULT.read_text()
    for old, new in edits:
        assert old in text, old
        text = text.replace(old, new)
    if users:
        text = text.replace(
            "\nusers:\n", "\nusers:\n" + textwrap.indent(textwrap.dedent(users), "  ")
        )
    path = tmp_path / f"policy-{len(list(tmp_path.glob('*.yaml')))}.yaml"
    path.write_text(text)
    return load_policy(path=path)


def statements(changes: list[Change]) -> list[str | None]:
    return [c.statement for c in changes]


@pytest.fixture
def pg(settings, database, conn):
    """Settings on this test's database, at the default policy (a clone of the migrated template
    lacks the database-level grants: CREATE DATABASE does not copy them). Logins left by a test
    are dropped: roles belong to the whole cluster."""
    s = settings.model_copy(update={"pg_database": database})
    default = load_policy(path=DEFAULT)
    assert {c.object for c in access_postgres.plan(s, default, now())} <= {"database"}
    access_postgres.apply(s, default, access_postgres.plan(s, default, now()))
    before = {r for (r,) in conn.execute("SELECT rolname FROM pg_roles")}
    yield s
    for (role,) in conn.execute("SELECT rolname FROM pg_roles").fetchall():
        if role not in before:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def login(settings, user: str, password: str) -> psycopg.Connection:
    return psycopg.connect(
        db.conninfo(settings, user=user, password=password, with_key=False), autocommit=True
    )


def test_the_default_policy_matches_a_freshly_migrated_database(settings):
    name = "access_fresh"
    s = settings.model_copy(update={"pg_database": name})
    with db.connect(settings, database="postgres", autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        with db.connect(s, autocommit=True) as conn:
            migrate(conn)
            policy = load_policy(path=DEFAULT)
            assert access_postgres.plan(s, policy, now()) == []
            # Partitions created afterwards (default privileges, then the narrowing) match too.
            partitions.maintain(conn, today=dt.date.today(), months_ahead=2, retention_months=36)
            assert access_postgres.plan(s, policy, now()) == []
            # Partitions past retention, moved to `archive`, keep nothing the policy does not
            # give there (developer and readonlyuser read them in `public`, not in `archive`).
            five_years_ago = dt.date.today() - dt.timedelta(days=5 * 365)
            partitions.maintain(conn, today=five_years_ago, months_ahead=1, retention_months=2)
            report = partitions.maintain(
                conn, today=dt.date.today(), months_ahead=2, retention_months=36
            )
            assert report.archived
            assert access_postgres.plan(s, policy, now()) == []
    finally:
        with db.connect(settings, database="postgres", autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


CONTRACTOR = f"""\
  jane.contractor:
    roles: [readonlyuser]
    until: {UNTIL}
    reason: CHG-1234
    stores: [postgres]
"""
TIGHTER = (
    "      - REVOKE UPDATE, DELETE ON TransactionStateChanges\n",
    "      - REVOKE UPDATE, DELETE ON TransactionStateChanges\n      - REVOKE DELETE ON Merchant\n",
)
WIDER = (
    "TO ReadOnlyUser  # the brief, as written\n",
    "TO ReadOnlyUser  # the brief, as written\n      - GRANT INSERT ON Merchant\n",
)


def test_a_policy_change_plans_the_statements_apply_runs(pg, conn, tmp_path):
    policy = policy_with(tmp_path, TIGHTER, WIDER, users=CONTRACTOR)
    planned = access_postgres.plan(pg, policy, now())
    assert statements(planned) == [
        'CREATE ROLE "jane.contractor" LOGIN VALID UNTIL '
        f"'{VALID_UNTIL}' IN ROLE readonlyuser, access_policy_user",
        "REVOKE DELETE ON public.merchant FROM developer",
        "GRANT INSERT ON public.merchant TO readonlyuser",
    ]
    source = policy.source
    # The reasons name the lines the edits wrote, wherever the default policy puts them.
    lines = Path(source).read_text().splitlines()
    revoke = lines.index("      - REVOKE DELETE ON Merchant") + 1
    grant = lines.index("      - GRANT INSERT ON Merchant") + 1
    assert planned[1].reason == f"{source}:{revoke}: REVOKE DELETE ON Merchant"
    assert planned[2].reason == f"{source}:{grant}: GRANT INSERT ON Merchant"

    applied = access_postgres.apply(pg, policy, planned)
    assert statements(applied) == statements(planned)
    password = applied[0].secret
    assert password and len(password) >= 24 and all(c.secret is None for c in applied[1:])
    assert password not in repr(applied[0])
    # The password reaches no log: the server gets a SCRAM verifier, the access log the statements.
    events = [e for e in access_log.events(pg) if e.action == "access.apply"]
    assert events and events[-1].outcome == "allow" and events[-1].user
    logs = [
        *access_log.log_dir(pg).glob("*"),
        *db.embedded_cluster(pg).status().audit_log_dir.glob("*"),
    ]
    assert logs and not any(password in p.read_text() for p in logs)
    assert access_postgres.plan(pg, policy, now()) == []
    (valid_until,) = conn.execute(
        "SELECT rolvaliduntil FROM pg_roles WHERE rolname = 'jane.contractor'"
    ).fetchone()
    assert valid_until == dt.datetime(2030, 4, 1, tzinfo=dt.UTC)

    with login(pg, "jane.contractor", password) as jane:
        jane.execute("INSERT INTO Merchant (Name, IndustryID, MerchantSizeID) VALUES ('x', 1, 1)")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
            jane.execute("UPDATE Merchant SET Rating = 1")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
            jane.execute("SELECT Email FROM Customer")

    # Back to the default policy: the grants return, the contractor's login goes.
    default = load_policy(path=DEFAULT)
    back = access_postgres.plan(pg, default, now())
    assert statements(back) == [
        "REVOKE INSERT ON public.merchant FROM readonlyuser",
        "GRANT DELETE ON public.merchant TO developer",
        'DROP OWNED BY "jane.contractor"; DROP ROLE "jane.contractor"',
    ]
    assert back[2].reason == "user jane.contractor is no longer in the policy"
    access_postgres.apply(pg, default, back)
    assert access_postgres.plan(pg, default, now()) == []
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        login(pg, "jane.contractor", password)


def test_clear_classes_widen_the_columns_and_migrations_keep_them(pg, conn, tmp_path):
    policy = policy_with(
        tmp_path,
        ("    clear: []\n    api: []\n", "    clear: [pii_quasi]\n    api: []\n"),
        users="  reader:\n    roles: [readonlyuser]\n",
    )
    assert policy.roles["readonlyuser"].clear == {"non_personal", "pii_quasi"}
    planned = access_postgres.plan(pg, policy, now())
    transaction_visible = (
        "id, transactionstatusid, merchantid, amount, currencyid, paymentmethodid, "
        "paymentinstrumentid, deviceid, customerid, billingaddressid, transactionlocationid, "
        "datetime, createdat, updatedat"
    )
    assert sorted(statements(planned)) == sorted(
        [
            "CREATE ROLE reader LOGIN IN ROLE readonlyuser, access_policy_user",
            # Every hidden column of consent, device and transaction is a quasi-identifier:
            # whole tables.
            "REVOKE SELECT (id, customerid, purpose, granted, source, recordedat, createdat, "
            "updatedat) ON public.consent FROM readonlyuser",
            "GRANT SELECT ON public.consent TO readonlyuser",
            "REVOKE SELECT (id, customerid, devicetype, os, osversion, browser, browserversion, "
            "firstseenat, updatedat) ON public.device FROM readonlyuser",
            f"REVOKE SELECT ({transaction_visible}) ON public.transaction FROM readonlyuser",
            f"REVOKE SELECT ({transaction_visible}) ON public.transaction_default FROM readonlyuser",
            "GRANT SELECT ON public.device TO readonlyuser",
            "GRANT SELECT ON public.transaction TO readonlyuser",
            "GRANT SELECT ON public.transaction_default TO readonlyuser",
            # The others keep hiding their PII, PCI and secrets.
            "GRANT SELECT (postalcode) ON public.address TO readonlyuser",
            "GRANT SELECT (username, emailhash) ON public.customer TO readonlyuser",
            "GRANT SELECT (last4, expirymonth, expiryyear) ON public.paymentinstrument "
            "TO readonlyuser",
            "INSERT INTO access.column_clear (role, labels) VALUES ('readonlyuser', "
            "ARRAY['NONE', 'QUASI']) ON CONFLICT (role) DO UPDATE SET labels = EXCLUDED.labels",
        ]
    )
    applied = access_postgres.apply(pg, policy, planned)
    password = next(c.secret for c in applied if c.principal == "reader")
    with login(pg, "reader", password) as reader:
        reader.execute("SELECT Fingerprint, IPAddress FROM Device, Transaction LIMIT 1")
        reader.execute("SELECT UserName, EmailHash, CountryCode FROM Customer")
        for column in ("Email", "Password", "FullName"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
                reader.execute(f"SELECT {column} FROM Customer")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
            reader.execute("SELECT PAN FROM PaymentInstrument")
    # The narrowing that migrations and partition maintenance run reads the policy's classes
    # (access.column_clear): it keeps what apply did, new partitions included.
    migrate(conn)
    partitions.maintain(conn, today=dt.date.today(), months_ahead=1, retention_months=36)
    assert access_postgres.plan(pg, policy, now()) == []
    with login(pg, "reader", password) as reader:
        month = sorted(partitions.existing_partitions(conn).values())[-1]
        reader.execute(f"SELECT IPAddress FROM {month}")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
            reader.execute("SELECT Email FROM Customer")


USERS = """\
  ann:
    roles: [admin]
  dev1:
    roles: [developer]
  ro1:
    roles: [readonlyuser]
  analyst1:
    roles: [analyst]
"""


def test_each_login_does_what_the_policy_says_and_nothing_more(pg, loaded, tmp_path):
    policy = policy_with(tmp_path, users=USERS)
    planned = access_postgres.plan(pg, policy, now())
    # The analyst has no PostgreSQL rules: no login here (the warehouse and the API serve it).
    assert statements(planned) == [
        "CREATE ROLE ann LOGIN IN ROLE admin, access_policy_user",
        "CREATE ROLE dev1 LOGIN IN ROLE developer, access_policy_user",
        "CREATE ROLE ro1 LOGIN IN ROLE readonlyuser, access_policy_user",
    ]
    passwords = {c.principal: c.secret for c in access_postgres.apply(pg, policy, planned)}
    assert access_postgres.plan(pg, policy, now()) == []
    months = sorted(partitions.existing_partitions(loaded).values())
    denied = pytest.raises

    with login(pg, "ann", passwords["ann"]) as ann:
        assert ann.execute("SELECT count(Email) FROM Customer").fetchone()[0] == 6
        ann.execute("SELECT PAN, Password FROM PaymentInstrument, Customer LIMIT 1")
        ann.execute("UPDATE Merchant SET Rating = 4.5 WHERE ID = 3")
        with denied(psycopg.errors.InsufficientPrivilege, match="permission denied"):
            ann.execute("DELETE FROM TransactionStateChanges")  # append-only, even for admins
        for table in ("keys.data_key", "access.api_session", "access.column_clear"):
            with denied(psycopg.errors.InsufficientPrivilege, match="permission denied"):
                ann.execute(f"SELECT * FROM {table}")

    with login(pg, "dev1", passwords["dev1"]) as dev:
        dev.execute("UPDATE Merchant SET Rating = 4.9 WHERE ID = 3")
        dev.execute("SELECT CountryCode FROM Customer")
        for statement in (
            "SELECT Email FROM Customer",
            "SELECT UserName FROM Customer",  # quasi-identifier
            "SELECT * FROM PaymentInstrument",
            "UPDATE TransactionStatus SET Name = 'paid' WHERE ID = 1",
            "DELETE FROM TransactionStateChanges",
            "SELECT IPAddress FROM Transaction",
            f"SELECT IPAddress FROM {months[-1]}",  # a partition read directly
            "SELECT * FROM keys.data_key",
            "CREATE TABLE public.scratch (x int)",
        ):
            with denied(psycopg.errors.InsufficientPrivilege, match="permission denied"):
                dev.execute(statement)

    with login(pg, "ro1", passwords["ro1"]) as ro:
        assert ro.execute("SELECT count(Amount) FROM Transaction").fetchone()[0] > 0
        ro.execute(f"SELECT count(Amount) FROM {months[0]}")
        for statement in (
            "INSERT INTO Merchant (Name, IndustryID, MerchantSizeID) VALUES ('x', 1, 1)",
            "UPDATE Merchant SET Rating = 1",
            "SELECT Phone FROM Customer",
            "SELECT Line1 FROM Address",
            f"SELECT IPAddress FROM {months[0]}",
        ):
            with denied(psycopg.errors.InsufficientPrivilege, match="permission denied"):
                ro.execute(statement)


def test_expired_logins_are_listed_then_revoked(pg, conn, tmp_path):
    soon = now() + dt.timedelta(hours=1)
    policy = policy_with(
        tmp_path,
        users=f"""\
          short:
            roles: [developer]
            until: {soon.isoformat()}
          extended:
            roles: [readonlyuser]
            until: {UNTIL}
        """,
    )
    passwords = {
        c.principal: c.secret
        for c in access_postgres.apply(pg, policy, access_postgres.plan(pg, policy, now()))
    }
    # A contractor of `db grant-temporary` (outside the policy) whose validity already passed.
    old, _ = grant_temporary(
        conn, "contractor_old", "readonlyuser", days=1, now=now() - dt.timedelta(days=3)
    )
    # Someone set VALID UNTIL in the past by hand: the password stops, the membership stays.
    conn.execute("ALTER ROLE extended VALID UNTIL 'yesterday'")
    # A login with no part in this database (e.g. the warehouse target's, on a shared cluster): not
    # this target's to report.
    conn.execute("CREATE ROLE stranger LOGIN VALID UNTIL 'yesterday'")

    found = {e.principal: e for e in access_postgres.expired(pg, policy, now())}
    assert set(found) == {"contractor_old", "extended"}
    assert "member of readonlyuser" in found["extended"].still
    assert "db grant-temporary" in found["contractor_old"].still
    assert found["contractor_old"].ended_at == old.valid_until
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        login(pg, "extended", passwords["extended"])
    # Not drift for the plan: the temporary grant is outside the policy; the policy user's VALID
    # UNTIL is put back as the policy says.
    assert statements(access_postgres.plan(pg, policy, now())) == [
        f"ALTER ROLE extended VALID UNTIL '{VALID_UNTIL}'"
    ]

    # Two hours later the policy user `short` has ended too (its VALID UNTIL says so as well).
    later = now() + dt.timedelta(hours=2)
    found = {e.principal: e for e in access_postgres.expired(pg, policy, later)}
    assert set(found) == {"contractor_old", "extended", "short"}
    assert abs(found["short"].ended_at - soon) < dt.timedelta(seconds=1)
    assert "member of developer" in found["short"].still
    with login(pg, "short", passwords["short"]) as short:  # still usable now, by its password
        short.execute("SELECT count(*) FROM Merchant")
    revoked = access_postgres.revoke_expired(pg, policy, later)
    assert {r.principal for r in revoked} == {"contractor_old", "extended", "short"}
    assert all(r.remedy == "dropped" for r in revoked)
    assert access_postgres.expired(pg, policy, later) == []
    remaining = {r for (r,) in conn.execute("SELECT rolname FROM pg_roles")}
    assert not remaining & {"contractor_old", "extended", "short"}
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        login(pg, "short", passwords["short"])


def test_grants_made_by_hand_are_drift(pg, conn, tmp_path):
    conn.execute("GRANT INSERT ON Merchant TO ReadOnlyUser")
    conn.execute("GRANT SELECT ON Customer TO PUBLIC")
    conn.execute("GRANT USAGE ON SCHEMA keys TO Developer")
    conn.execute("CREATE ROLE mallory LOGIN PASSWORD 'mallory-pw-0123' IN ROLE developer")
    default = load_policy(path=DEFAULT)
    planned = access_postgres.plan(pg, default, now())
    assert sorted(statements(planned)) == sorted(
        [
            "REVOKE ALL ON public.customer FROM PUBLIC",
            "REVOKE USAGE ON SCHEMA keys FROM developer",
            "REVOKE INSERT ON public.merchant FROM readonlyuser",
            "REVOKE developer FROM mallory",
        ]
    )
    by_principal = {c.principal: c for c in planned}
    assert by_principal["mallory"].reason == (
        "mallory is a member of developer outside the policy (neither a policy user nor a "
        "temporary grant)"
    )
    with login(pg, "mallory", "mallory-pw-0123") as mallory:
        mallory.execute("SELECT count(*) FROM Merchant")
    access_postgres.apply(pg, default, planned)
    assert access_postgres.plan(pg, default, now()) == []
    with (
        login(pg, "mallory", "mallory-pw-0123") as mallory,
        pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"),
    ):
        mallory.execute("SELECT count(*) FROM Merchant")


def test_apply_is_all_or_nothing(pg, conn, tmp_path):
    policy = policy_with(tmp_path, WIDER, users=CONTRACTOR)
    planned = access_postgres.plan(pg, policy, now())
    broken = Change(
        "postgres", "grant", "readonlyuser", "table public.nope",
        "GRANT SELECT ON public.nope TO readonlyuser", "a statement that fails",
    )  # fmt: skip
    with pytest.raises(AccessTargetError, match="rolled back, nothing applied") as failed:
        access_postgres.apply(pg, policy, [*planned, broken])
    assert "public.nope" in str(failed.value)
    assert access_postgres.plan(pg, policy, now()) == planned
    assert (
        conn.execute("SELECT 1 FROM pg_roles WHERE rolname = 'jane.contractor'").fetchone() is None
    )


def test_cli_plan_apply_and_expired(pg, tmp_path, monkeypatch):
    policy = policy_with(tmp_path, WIDER, users=CONTRACTOR)
    monkeypatch.setenv("STRIPE_PLATFORM_PROFILE", "embedded")
    monkeypatch.setenv("STRIPE_PLATFORM_HOME", str(pg.home_dir))
    monkeypatch.setenv("STRIPE_PLATFORM_PG_DATABASE", pg.pg_database)
    monkeypatch.setenv("STRIPE_PLATFORM_ACCESS_POLICY", str(policy.source))
    get_settings.cache_clear()
    runner = CliRunner()

    def run(*args: str):
        return runner.invoke(cli_app, ["access", *args, "--target", "postgres"])

    try:
        drift = run("plan", "--json")
        assert drift.exit_code == 2, drift.output
        assert [c["statement"] for c in json.loads(drift.stdout)["changes"]] == [
            'CREATE ROLE "jane.contractor" LOGIN VALID UNTIL '
            f"'{VALID_UNTIL}' IN ROLE readonlyuser, access_policy_user",
            "GRANT INSERT ON public.merchant TO readonlyuser",
        ]
        applied = run("apply", "--yes", "--json")
        assert applied.exit_code == 0, applied.output
        password = json.loads(applied.stdout)["passwords"]["jane.contractor"]
        with login(pg, "jane.contractor", password) as jane:
            jane.execute("SELECT count(*) FROM Merchant")
        clean = run("plan")
        assert clean.exit_code == 0 and "no drift" in clean.output
        assert run("expired").exit_code == 0
        with db.connect(pg, autocommit=True) as conn:
            conn.execute("""ALTER ROLE "jane.contractor" VALID UNTIL 'yesterday'""")
        listed = run("expired", "--json")
        assert listed.exit_code == 1
        assert [e["principal"] for e in json.loads(listed.stdout)] == ["jane.contractor"]
        assert "jane.contractor" in run("revoke-expired").output
        assert run("expired").exit_code == 0
    finally:
        get_settings.cache_clear()
