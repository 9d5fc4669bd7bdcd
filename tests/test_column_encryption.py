"""Per-table data keys for the OLTP's encrypted columns (sql/oltp/0013), keyed sessions (oltp/db.py)
and the background re-encryption that retires an old version (security/reencrypt.py), on the
session's real PostgreSQL: rotation while reading, resumability, tampered and unknown-version
ciphertexts, legacy single-key ciphertexts, lookups by e-mail across rotations."""

from __future__ import annotations

import base64
import os
import threading
import time

import psycopg
import pytest
from pydantic import SecretStr

from stripe_platform.oltp import db
from stripe_platform.security.envelope import Envelope
from stripe_platform.security.reencrypt import ReencryptError, reencrypt
from stripe_platform.showcase import brief_examples

N = 1200  # customers beside the brief's: several batches of BATCH
BATCH = 100


@pytest.fixture
def s(settings, database):
    """The session's settings pointed at this test's database (its keys schema holds its keys)."""
    return settings.model_copy(update={"pg_database": database})


def _people(conn: psycopg.Connection, first: int = 1000, n: int = N) -> dict[int, tuple]:
    """n customers with an address and a card each, written through pii_encrypt; what they hold."""
    conn.execute(
        """INSERT INTO Customer (ID, UserName, Password, Email, FullName, Phone)
           SELECT g, 'user' || g, (SELECT crypt('pw', gen_salt('bf', 4))),
                  pii_encrypt('user' || g || '@example.com', 'postgres/customer'),
                  pii_encrypt('Person Number ' || g, 'postgres/customer'),
                  pii_encrypt('+33 6 00 00 ' || g, 'postgres/customer')
           FROM generate_series(%(a)s::bigint, %(b)s::bigint) g""",
        {"a": first, "b": first + n - 1},
    )
    conn.execute(
        """INSERT INTO Address (ID, CustomerID, Line1, LocationID)
           SELECT g, g, pii_encrypt(g || ' rue des Tests', 'postgres/address'),
                  (SELECT min(ID) FROM Location)
           FROM generate_series(%(a)s::bigint, %(b)s::bigint) g""",
        {"a": first, "b": first + n - 1},
    )
    conn.execute(
        """INSERT INTO PaymentInstrument (ID, CustomerID, PaymentMethodID, Last4, PAN)
           SELECT g, g, 1, '4242', pii_encrypt('424242424242' || lpad(g::text, 4, '0'),
                                                'postgres/paymentinstrument')
           FROM generate_series(%(a)s::bigint, %(b)s::bigint) g""",
        {"a": first, "b": first + n - 1},
    )
    return {
        i: (f"user{i}@example.com", f"Person Number {i}", f"+33 6 00 00 {i}")
        for i in range(first, first + n)
    }


@pytest.fixture
def people(loaded):
    return _people(loaded)


def _versions(conn: psycopg.Connection, table: str, column: str) -> dict[int, int]:
    rows = conn.execute(
        f"SELECT pii_key_version({column}), count(*) FROM {table} "
        f"WHERE {column} IS NOT NULL GROUP BY 1"
    ).fetchall()
    return dict(rows)


def _read_all(conn: psycopg.Connection) -> dict[int, tuple]:
    return {
        i: (e, n, p)
        for i, e, n, p in conn.execute(
            "SELECT ID, pii_decrypt(Email), pii_decrypt(FullName), pii_decrypt(Phone) "
            "FROM Customer WHERE ID >= 1000"
        ).fetchall()
    }


def _session_keys(conn: psycopg.Connection) -> str:
    return conn.execute("SELECT current_setting('stripe.pii_keys', true)").fetchone()[0]


# -- what is encrypted, under which key --------------------------------------------------------------
def test_the_encrypted_columns_are_the_catalogs_pii_and_pci_bytea_columns(conn):
    declared = conn.execute(
        """SELECT c.table_name, c.column_name FROM information_schema.columns c
           JOIN pg_class t ON t.relname = c.table_name AND t.relkind IN ('r', 'p')
           JOIN pg_namespace n ON n.oid = t.relnamespace AND n.nspname = 'public'
           WHERE c.table_schema = 'public' AND c.data_type = 'bytea'
             AND col_description(t.oid, c.ordinal_position) ~ '^(PII|PCI):'
           ORDER BY 1, 2"""
    ).fetchall()
    listed = sorted((t, c) for t, cols in db.ENCRYPTED_COLUMNS.items() for c in cols)
    assert declared == listed
    assert ("customer", "emailhash") not in listed  # a keyed hash, not a ciphertext


def test_each_table_writes_under_its_own_key(people, loaded):
    for table, column, scope in (
        ("customer", "email", "postgres/customer"),
        ("address", "line1", "postgres/address"),
        ("paymentinstrument", "pan", "postgres/paymentinstrument"),
    ):
        refs = loaded.execute(
            f"SELECT DISTINCT (pii_key_ref({column})).scope, (pii_key_ref({column})).version "
            f"FROM {table}"
        ).fetchall()
        assert refs == [(scope, 1)]
    pan = loaded.execute("SELECT PAN FROM PaymentInstrument WHERE ID = 1001").fetchone()[0]
    assert b"4242424242421001" not in bytes(pan)
    assert loaded.execute(
        "SELECT pii_decrypt(PAN) FROM PaymentInstrument WHERE ID = 1001"
    ).fetchone()[0] == ("4242424242421001")
    # Three independent keys: an address ciphertext relabelled as the customer's does not decrypt.
    with pytest.raises(psycopg.errors.DataCorrupted, match="postgres/customer v1"):
        loaded.execute(
            """SELECT pii_decrypt('SPK1postgres/customer:1:'::bytea
                                  || substr(Line1, length('SPK1postgres/address:1:') + 1))
               FROM Address WHERE ID = 1001"""
        )


def test_a_keyed_session_carries_every_postgres_key_and_the_log_never_sees_them(s, people):
    with db.connect(s, autocommit=True) as c:
        ring = _session_keys(c)
        assert c.execute("SELECT current_setting('stripe.pii_current')").fetchone()[0] == (
            "postgres/customer:1,postgres/address:1,postgres/paymentinstrument:1"
        )
        c.execute("SELECT pii_encrypt('probe-for-the-log', 'postgres/address')")
    envelope = Envelope(s)
    for table in db.ENCRYPTED_COLUMNS:
        key = envelope.data_key(f"postgres/{table}")
        assert f"postgres/{table}:1:{base64.b64encode(key.key).decode()}" in ring.split(",")
    log_dir = db.embedded_cluster(s).status().audit_log_dir
    deadline = time.monotonic() + 10
    text = ""
    while "probe-for-the-log" not in text and time.monotonic() < deadline:
        text = "".join(p.read_text() for p in log_dir.glob("*.json"))
        time.sleep(0.1)
    assert "probe-for-the-log" in text
    secrets = [entry.rsplit(":", 1)[1] for entry in ring.split(",")]
    secrets.append(base64.b64encode(envelope.lookup_key("postgres/customer")).decode())
    for secret in secrets:
        assert secret not in text


def test_a_rotation_reaches_the_next_keyed_session_of_this_process(s, people):
    with db.connect(s) as before:  # caches this process's keys
        assert before.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    Envelope(s).rotate("postgres/address")  # as `keys rotate` would, from anywhere
    with db.connect(s, autocommit=True) as c:
        current = c.execute("SELECT current_setting('stripe.pii_current')").fetchone()[0]
        assert "postgres/address:2" in current.split(",")
        assert {"postgres/address:1", "postgres/address:2"} <= {
            e.rsplit(":", 1)[0] for e in _session_keys(c).split(",")
        }
        line = c.execute("SELECT pii_encrypt('1 new street', 'postgres/address')").fetchone()[0]
        assert bytes(line).startswith(b"SPK1postgres/address:2:")
        assert c.execute("SELECT pii_decrypt(%s)", (line,)).fetchone() == ("1 new street",)
        assert c.execute("SELECT pii_decrypt(Line1) FROM Address WHERE ID = 1001").fetchone() == (
            "1001 rue des Tests",
        )


def test_an_unkeyed_session_stays_unkeyed(s, people):
    with psycopg.connect(db.conninfo(s, with_key=False)) as c:
        assert not _session_keys(c)
        assert not c.execute("SELECT current_setting('stripe.pii_lookup_key', true)").fetchone()[0]


def test_bad_scopes_are_refused_and_null_stays_null(loaded):
    for scope in ("documents/customer", "postgres/Customer", "postgres/no such"):
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="expected postgres/<table>"):
            loaded.execute("SELECT pii_encrypt('x', %s)", (scope,))
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="no key postgres/device"):
        loaded.execute("SELECT pii_encrypt('x', 'postgres/device')")  # no such data key
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="scope NULL"):
        loaded.execute("SELECT pii_encrypt('x', NULL)")
    assert loaded.execute(
        "SELECT pii_encrypt(NULL, 'postgres/customer'), pii_decrypt(NULL)"
    ).fetchone() == (None, None)


# -- bad input -------------------------------------------------------------------------------------
def test_a_tampered_ciphertext_is_refused_naming_its_key(people, loaded):
    # Flip one byte inside the PGP part (past the header), near the end: the encrypted data and
    # its integrity check (MDC).
    loaded.execute(
        "UPDATE Customer SET FullName = set_byte(FullName, length(FullName) - 5, "
        "get_byte(FullName, length(FullName) - 5) # 1) WHERE ID = 1003"
    )
    with pytest.raises(
        psycopg.errors.DataCorrupted,
        match=r"ciphertext under key postgres/customer v1 fails its integrity check",
    ):
        loaded.execute("SELECT pii_decrypt(FullName) FROM Customer WHERE ID = 1003")
    # Its neighbours still read.
    assert loaded.execute(
        "SELECT pii_decrypt(FullName) FROM Customer WHERE ID = 1004"
    ).fetchone() == ("Person Number 1004",)


def test_a_ciphertext_naming_an_unknown_version_is_refused(people, loaded):
    with pytest.raises(
        psycopg.errors.InsufficientPrivilege, match="no key postgres/customer v7 in this session"
    ):
        loaded.execute(
            """SELECT pii_decrypt('SPK1postgres/customer:7:'::bytea
                                  || substr(Email, length('SPK1postgres/customer:1:') + 1))
               FROM Customer WHERE ID = 1001"""
        )
    for header in ("SPK1postgres/customer:x:", "SPK1postgres/customer:", "SPK1:1:"):
        with pytest.raises(psycopg.errors.DataCorrupted, match="malformed SPK1 key header"):
            loaded.execute("SELECT pii_decrypt(%s::bytea || '\\xc30d'::bytea)", (header,))


def test_reencryption_stops_at_a_tampered_row_naming_it_and_keeps_its_batch_unwritten(
    s, people, loaded
):
    Envelope(s).rotate("postgres/customer")
    loaded.execute(
        "UPDATE Customer SET Phone = set_byte(Phone, length(Phone) - 3, "
        "get_byte(Phone, length(Phone) - 3) # 128) WHERE ID = 1150"
    )
    with pytest.raises(ReencryptError, match=r"customer\.phone of id 1150") as error:
        reencrypt(s, scope="postgres/customer", batch_rows=BATCH)
    assert "postgres/customer v1" in str(error.value)
    # The batches before the one holding 1150 were committed; that batch and the rest were not.
    rewritten = loaded.execute(
        "SELECT count(*), max(ID) FROM Customer WHERE pii_key_version(Email) = 2"
    ).fetchone()
    assert rewritten[0] >= BATCH and rewritten[1] < 1150
    assert loaded.execute(
        "SELECT count(*) FROM Customer WHERE ID >= 1150 AND pii_key_version(Email) = 1"
    ).fetchone() == (N + 1000 - 1150,)
    # The old version is not retired while data needs it.
    with db.connect(s, autocommit=True) as c:
        assert "postgres/customer:1:" in _session_keys(c)


def test_reencrypt_refuses_an_unknown_scope_and_a_bad_batch_size(s):
    with pytest.raises(ReencryptError, match="encrypted tables are postgres/customer"):
        reencrypt(s, scope="postgres/device")
    with pytest.raises(ReencryptError, match="batch_rows 0"):
        reencrypt(s, batch_rows=0)


# -- rotation, re-encryption, retirement --------------------------------------------------------------
def test_rotation_while_reading(s, people, loaded):
    expected = _read_all(loaded)
    assert expected == people
    envelope = Envelope(s)
    assert envelope.rotate("postgres/customer").version == 2
    reader_errors: list[BaseException] = []
    seen: list[set[int]] = []
    mixed = threading.Event()
    done = threading.Event()

    def reader() -> None:
        try:
            # A fresh session every round: keyed connects while the versions change underneath.
            while not done.is_set():
                with db.connect(s, autocommit=True) as c:
                    if _read_all(c) != expected:
                        raise AssertionError("a read returned something else")
                    versions = {
                        v
                        for (v,) in c.execute(
                            "SELECT DISTINCT pii_key_version(Email) FROM Customer"
                        )
                    }
                seen.append(versions)
                if versions == {1, 2}:
                    mixed.set()
        except BaseException as exc:  # reported by the test below
            reader_errors.append(exc)
            mixed.set()

    def progress(table: str, rows: int, total: int) -> None:
        # Hold the job after its first batch until a read saw both versions at once.
        assert mixed.wait(30), "the reader never saw the table half re-encrypted"

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        result = reencrypt(s, scope="postgres/customer", batch_rows=BATCH, progress=progress)
        time.sleep(0.2)
    finally:
        done.set()
        thread.join(60)
    assert not reader_errors, reader_errors
    assert {1, 2} in seen and len(seen) >= 2
    assert result.rows_by_table == {"customer": N + 6}
    (only,) = result.scopes
    assert (only.target_version, only.retired, only.batches) == (2, (1,), -(-(N + 6) // BATCH))
    assert result.rows_per_second > 0
    # Everything names v2, nothing is in clear, v1 is retired and a new session reads all.
    for column, count in (("email", N + 6), ("fullname", N + 6), ("phone", N)):  # brief's: no phone
        assert _versions(loaded, "customer", column) == {2: count}
    for i, email, name, phone in loaded.execute(
        "SELECT ID, Email, FullName, Phone FROM Customer WHERE ID >= 1000"
    ).fetchall():
        for stored, plain in zip((email, name, phone), people[i], strict=True):
            assert plain.encode() not in bytes(stored)
    states = {
        (k.purpose, k.version, k.state) for k in envelope.scopes() if k.scope == "postgres/customer"
    }
    # The lookup key is not rotated with the data key.
    assert states == {
        ("encrypt", 1, "retired"),
        ("encrypt", 2, "current"),
        ("lookup", 1, "current"),
    }
    with db.connect(s, autocommit=True) as c:
        ring = _session_keys(c)
        assert "postgres/customer:1:" not in ring and "postgres/customer:2:" in ring
        assert _read_all(c) == expected
    # The other tables were not touched.
    assert _versions(loaded, "address", "line1") == {1: N + 6}
    event = loaded.execute(
        "SELECT detail FROM keys.key_event WHERE operation = 'reencrypt' AND scope = %s",
        ("postgres/customer",),
    ).fetchone()[0]
    assert event["rows"] == N + 6 and event["retired"] == [1]


def test_lookup_by_email_keeps_working_across_rotation_and_reencryption(s, people, loaded):
    def find(email: str) -> list:
        with db.connect(s, autocommit=True) as c:
            return c.execute(
                "SELECT UserName FROM Customer WHERE EmailHash = pii_lookup_hash(%s)", (email,)
            ).fetchall()

    assert find("John.Doe@stripe.com ") == [("John42",)]
    Envelope(s).rotate("postgres/customer")
    with db.connect(s, autocommit=True) as c:  # written after the rotation: under v2
        c.execute(
            "INSERT INTO Customer (UserName, Password, Email) VALUES "
            "('late', crypt('pw', gen_salt('bf', 4)), pii_encrypt('late@example.com'))"
        )
    assert find("late@example.com") == [("late",)] and find("user1001@example.com") == [
        ("user1001",)
    ]
    reencrypt(s, batch_rows=500)
    assert find("john.doe@stripe.com") == [("John42",)]
    assert find("late@example.com") == [("late",)]
    assert find("USER1001@example.com") == [("user1001",)]


def test_reencryption_resumes_after_an_interruption_and_rewrites_each_row_once(s, people, loaded):
    Envelope(s).rotate("postgres/address")

    class Stop(Exception):
        pass

    def stop_after_first(table: str, rows: int, total: int) -> None:
        raise Stop

    with pytest.raises(Stop):
        reencrypt(s, scope="postgres/address", batch_rows=BATCH, progress=stop_after_first)
    assert _versions(loaded, "address", "line1") == {2: BATCH, 1: N + 6 - BATCH}
    first = dict(
        loaded.execute(
            "SELECT ID, xmin::text FROM Address WHERE pii_key_version(Line1) = 2"
        ).fetchall()
    )
    assert loaded.execute(
        "SELECT last_id, rows_rewritten, batches, finished_at IS NULL "
        "FROM keys.column_reencryption WHERE scope = 'postgres/address'"
    ).fetchone() == (max(first), BATCH, 1, True)
    # Nothing was retired by the interrupted run.
    with db.connect(s, autocommit=True) as c:
        assert "postgres/address:1:" in _session_keys(c)

    seen = []
    result = reencrypt(
        s, scope="postgres/address", batch_rows=BATCH, progress=lambda t, n, total: seen.append(n)
    )
    (only,) = result.scopes
    assert only.rows == N + 6 - BATCH and only.resumed_after == max(first)
    assert sum(seen) == N + 6 - BATCH
    # The rows of the first run were not rewritten again (same row version).
    assert (
        dict(
            loaded.execute("SELECT ID, xmin::text FROM Address WHERE ID = ANY(%s)", (list(first),))
        )
        == first
    )
    assert _versions(loaded, "address", "line1") == {2: N + 6}
    assert loaded.execute(
        "SELECT rows_rewritten, batches, finished_at IS NOT NULL FROM keys.column_reencryption "
        "WHERE scope = 'postgres/address'"
    ).fetchone() == (N + 6, 1 + only.batches, True)
    # UpdatedAt is kept: re-encryption is not a change of the data.
    assert loaded.execute(
        "SELECT count(*) FROM Address WHERE UpdatedAt > CreatedAt + interval '1 second'"
    ).fetchone() == (0,)
    # A second run has nothing to do.
    again = reencrypt(s, scope="postgres/address").scopes[0]
    assert (again.rows, again.resumed_after, again.retired) == (0, None, ())


def test_a_session_opened_before_the_rotation_cannot_leave_data_under_the_retired_version(
    s, people
):
    old = db.connect(s, autocommit=True)  # holds v1 only, as its current
    Envelope(s).rotate("postgres/paymentinstrument")
    written: list[int] = []
    refused: list[str] = []
    stop = threading.Event()

    def old_writer() -> None:
        i = 5000
        while not stop.is_set():
            try:
                old.execute(
                    "INSERT INTO PaymentInstrument (ID, CustomerID, PaymentMethodID, PAN) "
                    "VALUES (%s, 1001, 1, pii_encrypt(%s, 'postgres/paymentinstrument'))",
                    (i, f"5555{i:012d}"),
                )
                written.append(i)
            except psycopg.errors.InsufficientPrivilege as exc:
                refused.append(str(exc))
                return
            i += 1

    thread = threading.Thread(target=old_writer)
    thread.start()
    try:
        while len(written) < 20:  # writing under v1 while the job runs
            time.sleep(0.01)
        result = reencrypt(s, scope="postgres/paymentinstrument", batch_rows=BATCH)
        thread.join(30)
    finally:
        stop.set()
        thread.join(30)
        old.close()
    assert result.scopes[0].retired == (1,)
    assert result.rows == N + len(written)  # the old session's rows too, each once
    assert refused and "key postgres/paymentinstrument v1 was retired" in refused[0]
    with db.connect(s, autocommit=True) as c:
        assert _versions(c, "paymentinstrument", "pan") == {2: N + len(written)}
        pans = dict(
            c.execute(
                "SELECT ID, pii_decrypt(PAN) FROM PaymentInstrument WHERE ID >= 5000"
            ).fetchall()
        )
    assert pans == {i: f"5555{i:012d}" for i in written}


# -- legacy single-key ciphertexts -----------------------------------------------------------------
LEGACY_OPTIONS = "cipher-algo=aes256, compress-algo=0, s2k-mode=1"


def test_legacy_ciphertexts_are_read_then_reencrypted_and_the_legacy_key_retired(s, conn):
    legacy_key = base64.urlsafe_b64encode(os.urandom(36)).decode()
    ls = s.model_copy(update={"pii_key": SecretStr(legacy_key)})
    brief_examples.load_oltp(conn)
    # As migration 0001's pii_encrypt and pii_lookup_hash wrote them (the trigger recomputing the
    # hash is off, as in a database written before issue 20).
    with db.connect(ls) as c, c.transaction():
        c.execute("SET LOCAL session_replication_role = replica")
        c.execute(
            """INSERT INTO Customer (ID, UserName, Password, Email, EmailHash, FullName)
               SELECT g, 'old' || g, (SELECT crypt('pw', gen_salt('bf', 4))),
                      pgp_sym_encrypt('old' || g || '@example.com', %(k)s, %(o)s),
                      hmac('old' || g || '@example.com', %(k)s, 'sha256'),
                      pgp_sym_encrypt('Old Timer ' || g, %(k)s, %(o)s)
               FROM generate_series(2000, 2249) g""",
            {"k": legacy_key, "o": LEGACY_OPTIONS},
        )
        c.execute(
            """INSERT INTO Address (ID, CustomerID, Line1, LocationID)
               SELECT g, g, pgp_sym_encrypt(g || ' old street', %(k)s, %(o)s),
                      (SELECT min(ID) FROM Location)
               FROM generate_series(2000, 2249) g""",
            {"k": legacy_key, "o": LEGACY_OPTIONS},
        )
    with db.connect(ls, autocommit=True) as c:
        assert c.execute("SELECT current_setting('stripe.pii_key')").fetchone() == (legacy_key,)
        assert c.execute(
            "SELECT pii_decrypt(FullName) FROM Customer WHERE ID = 2007"
        ).fetchone() == ("Old Timer 2007",)
        # Until re-encrypted, a legacy customer's lookup hash is the legacy key's (documented).
        assert not c.execute(
            "SELECT 1 FROM Customer WHERE EmailHash = pii_lookup_hash('old2007@example.com')"
        ).fetchall()
    with (
        psycopg.connect(db.conninfo(s, with_key=False)) as c,
        pytest.raises(psycopg.errors.InsufficientPrivilege, match="no key legacy"),
    ):
        c.execute("SELECT pii_decrypt(FullName) FROM Customer WHERE ID = 2007")

    result = reencrypt(ls, batch_rows=BATCH)
    assert result.legacy_retired
    assert result.rows_by_table == {"customer": 250, "address": 250, "paymentinstrument": 0}
    assert _versions(conn, "customer", "email") == {1: 256}
    assert _versions(conn, "customer", "fullname") == {1: 256}
    assert _versions(conn, "address", "line1") == {1: 256}
    with db.connect(ls, autocommit=True) as c:
        # Retired: no longer handed to sessions, and nothing needs it.
        assert not c.execute("SELECT current_setting('stripe.pii_key', true)").fetchone()[0]
        assert c.execute(
            "SELECT pii_decrypt(FullName), pii_decrypt(Email) FROM Customer WHERE ID = 2007"
        ).fetchone() == ("Old Timer 2007", "old2007@example.com")
        assert c.execute(
            "SELECT UserName FROM Customer WHERE EmailHash = pii_lookup_hash('old2007@example.com')"
        ).fetchall() == [("old2007",)]
        assert c.execute("SELECT pii_decrypt(Line1) FROM Address WHERE ID = 2249").fetchone() == (
            "2249 old street",
        )
    assert conn.execute(
        "SELECT count(*) FROM keys.key_event WHERE operation = 'retire' AND scope = 'postgres/legacy'"
    ).fetchone() == (1,)
