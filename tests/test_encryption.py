"""pgcrypto: bcrypt passwords checked as the brief does, personal fields encrypted under their
table's data key (the ciphertext names it), email findable. Rotation, re-encryption, legacy
ciphertexts and bad input: test_column_encryption.py."""

import base64
import os

import psycopg
import pytest

from stripe_platform.oltp import db
from stripe_platform.paths import SQL_EXAMPLES_DIR
from stripe_platform.showcase.brief_examples import execute_unlogged


@pytest.fixture
def john(conn):
    with conn.transaction():  # the brief's statement as written, its literals kept out of the log
        execute_unlogged(conn, (SQL_EXAMPLES_DIR / "customer_insert.sql").read_text())
    return conn


def test_brief_password_check_true_and_false(john):
    assert john.execute((SQL_EXAMPLES_DIR / "password_check.sql").read_text()).fetchall() == [
        ("John42", True)
    ]
    wrong = john.execute(
        "SELECT (Password = crypt('password_jon', Password)) FROM Customer WHERE UserName = 'John42'"
    ).fetchone()
    assert wrong == (False,)
    stored = john.execute("SELECT Password FROM Customer").fetchone()[0]
    assert stored.startswith("$2a$") and "password_john" not in stored


def test_plaintext_password_is_refused(conn):
    with pytest.raises(psycopg.errors.CheckViolation):
        conn.execute(
            "INSERT INTO Customer (UserName, Password, Email) "
            "VALUES ('plain', 'hunter2', pii_encrypt('p@example.com'))"
        )


def test_personal_fields_are_stored_encrypted_and_decryptable_with_the_key(john):
    email, name = john.execute("SELECT Email, FullName FROM Customer").fetchone()
    assert b"john.doe" not in bytes(email) and b"John Doe" not in bytes(name)
    assert john.execute("SELECT pii_decrypt(FullName) FROM Customer").fetchone() == ("John Doe",)


def test_the_ciphertext_names_its_table_key_and_version(john):
    # The brief's one-argument pii_encrypt() uses the Customer table's key.
    email, name = john.execute("SELECT Email, FullName FROM Customer").fetchone()
    for value in (bytes(email), bytes(name)):
        assert value.startswith(b"SPK1postgres/customer:1:")
        # The PGP message follows: a symmetric-key session key packet (tag 3, new or old format).
        assert value[len(b"SPK1postgres/customer:1:")] in (0xC3, 0x8C)
    assert john.execute("SELECT (pii_key_ref(Email)).* FROM Customer").fetchone() == (
        "postgres/customer",
        1,
    )


def test_email_is_findable_through_its_keyed_hash(john):
    found = john.execute(
        "SELECT UserName FROM Customer WHERE EmailHash = pii_lookup_hash(' John.Doe@Stripe.com ')"
    ).fetchall()
    assert found == [("John42",)]


def test_without_the_key_nothing_decrypts(john, settings, database):
    plain = db.conninfo(settings, database=database, with_key=False)
    with psycopg.connect(plain) as c:
        with pytest.raises(
            psycopg.errors.InsufficientPrivilege,
            match="no key postgres/customer v1 in this session",
        ):
            c.execute("SELECT pii_decrypt(FullName) FROM Customer")
        c.rollback()
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="no key postgres/customer"):
            c.execute("SELECT pii_encrypt('x')")
        c.rollback()
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="no lookup key"):
            c.execute("SELECT pii_lookup_hash('john.doe@stripe.com')")


def test_a_different_key_cannot_decrypt(john, settings, database):
    forged = base64.b64encode(os.urandom(32)).decode()
    other = db.conninfo(
        settings,
        database=database,
        with_key=False,
        options=f"-c stripe.pii_keys=postgres/customer:1:{forged} "
        "-c stripe.pii_current=postgres/customer:1",
    )
    with (
        psycopg.connect(other) as c,
        pytest.raises(
            psycopg.errors.DataCorrupted,
            match=r"under key postgres/customer v1 fails its integrity check",
        ),
    ):
        c.execute("SELECT pii_decrypt(FullName) FROM Customer")
