"""RBAC, checked by logging in as members of each role."""

import datetime as dt
import itertools
import json
import secrets
import time

import psycopg
import pytest
from psycopg import sql

from stripe_platform.oltp import db, partitions
from stripe_platform.oltp.access import (
    AccessError,
    grant_temporary,
    list_temporary,
    revoke_expired,
)

_users = itertools.count()


@pytest.fixture
def login_as(settings, database, conn):
    """Connect as a fresh login role that is a member of the given group role."""
    created = []

    def connect(role: str) -> psycopg.Connection:
        user = f"{role}_{secrets.token_hex(3)}_{next(_users)}"
        password = secrets.token_urlsafe(12)
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} IN ROLE {}").format(
                sql.Identifier(user), sql.Literal(password), sql.Identifier(role)
            )
        )
        created.append(user)
        return psycopg.connect(
            db.conninfo(settings, database=database, user=user, password=password), autocommit=True
        )

    yield connect
    for user in created:
        conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(user)))
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(user)))


def test_readonly_user_reads_but_cannot_write(loaded, login_as):
    with login_as("readonlyuser") as c:
        assert c.execute("SELECT count(*) FROM Merchant").fetchone()[0] > 0
        assert c.execute("SELECT sum(Amount) FROM Transaction").fetchone()[0] > 0
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("INSERT INTO Merchant (Name, IndustryID, MerchantSizeID) VALUES ('x', 1, 1)")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("UPDATE Merchant SET Rating = 1")


# Every column labelled PII:, PCI:, SECRET: or QUASI: (classification RESTRICTED), written out by
# hand from sql/oltp so that a label lost or changed fails here.
HIDDEN = {
    "Customer": ("UserName", "Password", "Email", "EmailHash", "FullName", "Phone"),
    "Address": ("Line1", "PostalCode"),
    "Device": ("Fingerprint",),
    "PaymentInstrument": ("Last4", "PAN", "ExpiryMonth", "ExpiryYear"),
    "Transaction": ("IPAddress",),
}


@pytest.mark.parametrize("role", ["developer", "readonlyuser"])
def test_pii_and_passwords_are_hidden_from(role, loaded, login_as):
    with login_as(role) as c:
        assert c.execute("SELECT count(CountryCode) FROM Customer").fetchone()[0] == 6
        for table, columns in HIDDEN.items():
            for column in columns:
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    c.execute(f"SELECT {column} FROM {table}")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute(f"SELECT * FROM {table}")
    # Nothing else is hidden: a role below admin reads every other column of those tables.
    with login_as(role) as c:
        for table, hidden in HIDDEN.items():
            columns = [
                name
                for (name,) in loaded.execute(
                    """SELECT attname FROM pg_attribute
                       WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped""",
                    (table.lower(),),
                ).fetchall()
                if name not in {h.lower() for h in hidden}
            ]
            c.execute(f"SELECT {', '.join(columns)} FROM {table} LIMIT 1")


@pytest.mark.parametrize("role", ["developer", "readonlyuser"])
def test_pii_stays_hidden_in_partitions_read_directly(role, loaded, login_as):
    # `loaded` ran partition maintenance: the monthly partitions were created after the migrations
    # (default privileges grant them whole), the default partition by them.
    months = sorted(partitions.existing_partitions(loaded).values())
    assert len(months) > 30
    with login_as(role) as c:
        for table in (*months, "transaction_default"):
            c.execute(f"SELECT count(Amount) FROM {table}")  # the other columns stay readable
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
                c.execute(f"SELECT IPAddress FROM {table}")
        assert c.execute("SELECT count(Amount) FROM Transaction").fetchone()[0] > 1


def test_developer_writes_data_but_not_reference_tables_or_the_audit_trail(loaded, login_as):
    with login_as("developer") as c:
        c.execute("UPDATE Merchant SET Rating = 4.9 WHERE ID = 3")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("UPDATE TransactionStatus SET Name = 'paid' WHERE ID = 1")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("DELETE FROM TransactionStateChanges")


def test_admin_reads_everything(loaded, login_as):
    with login_as("admin") as c:
        assert c.execute("SELECT count(Email) FROM Customer").fetchone()[0] == 6


def test_contractor_access_expires(loaded, settings, database):
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
    expired, expired_pw = grant_temporary(
        loaded, f"contractor_old_{next(_users)}", "readonlyuser", days=1, now=past
    )
    active, active_pw = grant_temporary(
        loaded, f"contractor_new_{next(_users)}", "developer", days=7
    )

    def login(user, password):
        return psycopg.connect(
            db.conninfo(settings, database=database, user=user, password=password)
        )

    with login(active.user, active_pw) as c:
        assert c.execute("SELECT current_user").fetchone() == (active.user,)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        login(expired.user, expired_pw)

    listed = {g.user: g.expired for g in list_temporary(loaded)}
    assert listed[expired.user] is True and listed[active.user] is False
    assert expired.user in revoke_expired(loaded)
    remaining = {g.user for g in list_temporary(loaded)}
    assert expired.user not in remaining and active.user in remaining
    loaded.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(active.user)))


def test_password_never_appears_in_the_audit_log(loaded, settings):
    grant, password = grant_temporary(
        loaded, f"contractor_log_{next(_users)}", "readonlyuser", days=1
    )
    log_dir = db.embedded_cluster(settings).status().audit_log_dir
    text = "".join(p.read_text() for p in log_dir.glob("*.json"))
    assert grant.user in text and password not in text
    loaded.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(grant.user)))


def test_bind_parameters_never_appear_in_the_audit_log(conn, settings):
    """Every statement is logged, its bound values are not: they can be card numbers or keys."""
    secret = f"4970-{secrets.token_hex(8)}"
    marker = f"audit-marker-{secrets.token_hex(4)}"
    conn.execute("SELECT %s::text AS pan_probe", (secret,))
    with pytest.raises(psycopg.errors.DivisionByZero):
        conn.execute("SELECT %s::text AS pan_probe_failing, 1 / 0", (secret,))
    conn.execute(f"SELECT '{marker}'")
    log_dir = db.embedded_cluster(settings).status().audit_log_dir
    # The logging collector writes asynchronously: read until this session's last statement is in.
    deadline = time.monotonic() + 30
    text = ""
    while marker not in text and time.monotonic() < deadline:
        time.sleep(0.1)
        text = "".join(p.read_text() for p in log_dir.glob("*.json"))
    assert marker in text, "the audit log never received the session's statements"
    assert "SELECT $1::text AS pan_probe" in text
    assert "SELECT $1::text AS pan_probe_failing, 1 / 0" in text
    assert secret not in text


@pytest.mark.parametrize(
    ("user", "role", "days", "message"),
    [
        ("Bad Name", "readonlyuser", 5, "user name"),
        ("okname", "admin", 5, "role must be one of"),
        ("okname", "developer", 0, "days must be between"),
    ],
)
def test_bad_grant_requests_are_refused(conn, user, role, days, message):
    with pytest.raises(AccessError, match=message):
        grant_temporary(conn, user, role, days=days)


def test_the_briefs_example_secrets_never_reach_the_audit_log(loaded, settings):
    """The brief's example INSERT writes its password and e-mail as literals: the platform runs it
    with statement logging off for its transaction (brief_examples.execute_unlogged)."""
    pid = loaded.info.backend_pid
    marker = f"audit-marker-{secrets.token_hex(4)}"
    loaded.execute(f"SELECT '{marker}'")
    log_dir = db.embedded_cluster(settings).status().audit_log_dir
    deadline = time.monotonic() + 30
    mine: list[str] = []
    while not any(marker in m for m in mine) and time.monotonic() < deadline:
        time.sleep(0.1)
        lines = [json.loads(x) for p in log_dir.glob("*.json") for x in p.read_text().splitlines()]
        mine = [x.get("message", "") for x in lines if x.get("pid") == pid]
    assert any(marker in m for m in mine), "the audit log never received the session's statements"
    assert any("SET LOCAL log_statement = 'none'" in m for m in mine)
    assert any("INSERT INTO Customer" in m for m in mine)  # the parameterised ones are logged
    text = "\n".join(mine)
    assert "password_john" not in text and "john.doe@stripe.com" not in text
