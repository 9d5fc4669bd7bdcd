"""Encryption coverage (`keys coverage`) on real stores: a real PostgreSQL (the session's cluster)
with rows written by pgcrypto and crypt(), real envelope ciphertext in the document store, the
platform's own seeded OLTP database; a clear value planted in a protected column must be named and
pull the figure under 100 %. The marts' masking is measured in test_masking.py's builds."""

from __future__ import annotations

import json
import socket

import pytest
from bson import Binary

from stripe_platform.governance.classification import Catalog, DataClass, Entry, load_catalog
from stripe_platform.security.coverage import coverage_report, render_coverage
from stripe_platform.security.envelope import Envelope

# A table of the test's own, so every expected figure is known from the rows written below.
TABLE = """
CREATE TABLE cov_person (
    id integer PRIMARY KEY,
    email bytea,          -- pgcrypto with the key header (issue 20)
    phone bytea,          -- legacy pgcrypto, no header: still encrypted
    password text,        -- crypt(..., gen_salt('bf')): a one-way hash
    nickname bytea,       -- protected but never filled: empty, not counted
    country text          -- non_personal: not checked
)"""


def entries(store="postgres", dataset="cov_person"):
    def entry(field, data_class):
        return Entry(store, dataset, field, data_class, declared_at="tests/test_coverage.py")

    return [
        entry("email", DataClass.PII),
        entry("phone", DataClass.PII),
        entry("password", DataClass.CREDENTIAL),
        entry("nickname", DataClass.PII),
        entry("country", DataClass.NON_PERSONAL),
    ]


@pytest.fixture
def person_db(settings, database, conn):
    conn.execute(TABLE)
    conn.execute(
        "INSERT INTO cov_person (id, email, phone, password, country) "
        "SELECT i, 'SPK1postgres/cov_person:1:'::bytea "
        "          || pgp_sym_encrypt('p' || i || '@example.com', 'k', 'cipher-algo=aes256'), "
        "       pgp_sym_encrypt('+33 6 12 34 56 ' || lpad(i::text, 2, '0'), 'k'), "
        "       crypt('secret' || i, gen_salt('bf', 4)), 'FR' "
        "FROM generate_series(1, 30) AS i"
    )
    return settings.model_copy(update={"pg_database": database})


def test_encrypted_and_hashed_columns_cover_100_percent_and_a_planted_email_is_named(
    person_db, conn
):
    catalog = Catalog(tuple(entries()))
    report = coverage_report(person_db, catalog=catalog, stores=["postgres"], sample=50)
    store = report.store("postgres")
    statuses = {f.field: f.status for f in store.fields}
    assert statuses == {
        "email": "encrypted",
        "phone": "encrypted",
        "password": "hashed",
        "nickname": "empty",
    }
    assert (store.protected, store.total, store.percent) == (3, 3, 100.0)
    assert {f.sampled for f in store.fields if f.field != "nickname"} == {30}
    assert report.percent == 100.0 and report.in_clear == []

    # One clear e-mail among 30 ciphertexts in a protected column.
    conn.execute(
        "UPDATE cov_person SET email = convert_to('leak@example.com', 'UTF8') WHERE id = 7"
    )
    report = coverage_report(person_db, catalog=catalog, stores=["postgres"], sample=50)
    store = report.store("postgres")
    assert [f.name for f in report.in_clear] == ["postgres cov_person.email"]
    leaked = report.in_clear[0]
    assert (leaked.sampled, leaked.clear) == (30, 1)
    assert (store.protected, store.total, store.percent) == (2, 3, 66.7)
    data = report.as_dict()
    assert data["in_clear"] == ["postgres cov_person.email"]
    assert data["stores"]["postgres"]["percent"] == 66.7
    # Counts and names only: no sampled value in the report.
    assert "leak@example.com" not in json.dumps(data) and "leak" not in report.summary()
    assert "IN CLEAR: postgres cov_person.email" in report.summary()

    # A password stored as text instead of a bcrypt hash is in clear too; a hash of another
    # scheme is not taken for bcrypt.
    conn.execute("UPDATE cov_person SET password = 'hunter2' WHERE id = 3")
    conn.execute("UPDATE cov_person SET password = md5('x') WHERE id = 4")
    password = next(
        f
        for f in coverage_report(person_db, catalog=catalog, stores=["postgres"])
        .store("postgres")
        .fields
        if f.field == "password"
    )
    assert (password.status, password.clear) == ("in_clear", 2)


def test_bytes_that_are_not_ciphertext_count_as_clear(person_db, conn):
    conn.execute("UPDATE cov_person SET phone = '\\x00010203'::bytea WHERE id = 1")
    conn.execute(
        "UPDATE cov_person SET email = 'SPK1postgres/cov_person:x:abc'::bytea WHERE id = 2"
    )
    report = coverage_report(person_db, catalog=Catalog(tuple(entries())), stores=["postgres"])
    assert sorted(f.field for f in report.in_clear) == ["email", "phone"]


def test_the_seeded_oltp_database_is_fully_covered(loaded, settings, database):
    """The real catalog on the platform's own OLTP tables after the brief's example records."""
    s = settings.model_copy(update={"pg_database": database})
    catalog = load_catalog()
    report = coverage_report(s, catalog=catalog, stores=["postgres"])
    store = report.store("postgres")
    assert store.state == "checked"
    assert len(store.fields) == len(catalog.protected("postgres"))
    assert store.total > 0, store.as_dict()
    assert store.in_clear == [], [f.name for f in store.in_clear]
    assert store.percent == 100.0


def test_documents_with_envelope_ciphertext_and_a_clear_field(settings, database, docdb):
    s = settings.model_copy(update={"pg_database": database, "mongodb_database": docdb.name})
    envelope = Envelope(s)
    docdb["cov_people"].insert_many(
        [
            {
                "n": i,
                "email": Binary(
                    envelope.encrypt("documents/cov_people", f"p{i}@example.com".encode())
                ),
                "contact": {"phones": [Binary(envelope.encrypt("documents/cov_people", b"+3361"))]},
                "note": f"clear text {i}",
            }
            for i in range(12)
        ]
    )
    catalog = Catalog(
        (
            Entry("documents", "cov_people", "email", DataClass.PII),
            Entry("documents", "cov_people", "contact.phones", DataClass.PII),
            Entry("documents", "cov_people", "note", DataClass.PII),
            Entry("documents", "cov_missing", "email", DataClass.PII),
        )
    )
    store = coverage_report(s, catalog=catalog, stores=["documents"]).store("documents")
    assert {(f.dataset, f.field): (f.status, f.sampled) for f in store.fields} == {
        ("cov_people", "email"): ("encrypted", 12),
        ("cov_people", "contact.phones"): ("encrypted", 12),
        ("cov_people", "note"): ("in_clear", 12),
        ("cov_missing", "email"): ("absent", 0),
    }
    assert (store.protected, store.total, store.percent) == (2, 3, 66.7)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_and_unbuilt_stores_are_reported_as_such_not_as_zero(settings, tmp_path):
    s = settings.model_copy(
        update={
            "pg_port": free_port(),  # nothing listens there
            "warehouse": "duckdb",
            "warehouse_path": tmp_path / "never-built.duckdb",
            "lake_uri": str(tmp_path / "empty-lake"),
        }
    )
    catalog = Catalog(
        (
            *entries(),
            Entry("marts", "DIM_Customer", "UserName", DataClass.PII),
            Entry("warehouse_raw", "raw.postgres_customer", "email", DataClass.PII),
            Entry("lake", "postgres.customer", "email", DataClass.PII),
        )
    )
    report = coverage_report(
        s, catalog=catalog, stores=["postgres", "lake", "warehouse_raw", "marts"]
    )
    states = {st.store: (st.state, st.percent) for st in report.stores}
    assert states == {
        "postgres": ("unreachable", None),
        "lake": ("not_built", None),
        "warehouse_raw": ("not_built", None),
        "marts": ("not_built", None),
    }
    assert report.percent is None and report.total == 0
    assert str(s.warehouse_file) in report.store("marts").detail
    summary = report.summary()
    assert summary.startswith("encryption coverage n/a (0/0): postgres unreachable")

    from rich.console import Console

    console = Console(record=True, width=200)
    render_coverage(report, console)
    text = console.export_text()
    assert "unreachable" in text and "not_built" in text and summary in text


def test_bad_arguments_are_refused(settings):
    from stripe_platform.security.coverage import CoverageError

    with pytest.raises(CoverageError, match="sample must be at least 1"):
        coverage_report(settings, catalog=Catalog(()), sample=0)
    with pytest.raises(CoverageError, match="unknown store"):
        coverage_report(settings, catalog=Catalog(()), stores=["backups"])


def test_lake_parquet_ciphertext_a_clear_column_and_a_damaged_file(settings, database, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    s = settings.model_copy(update={"pg_database": database, "lake_uri": str(tmp_path / "lake")})
    envelope = Envelope(s)
    stream = tmp_path / "lake/raw/postgres/customer/extracted_date=2026-01-01"
    stream.mkdir(parents=True)
    pq.write_table(
        pa.table(
            {
                "id": list(range(5)),
                # Stored upper-case: matched to the catalog's "email" case-insensitively.
                "Email": [envelope.encrypt("lake/postgres.customer", b"p@example.com")] * 5,
                "phone": [f"+33 6 12 34 56 0{i}" for i in range(5)],
            }
        ),
        stream / "s1-0.parquet",
    )
    catalog = Catalog(
        (
            Entry("lake", "postgres.customer", "email", DataClass.PII),
            Entry("lake", "postgres.customer", "phone", DataClass.PII),
            Entry("lake", "postgres.address", "street", DataClass.PII),
        )
    )
    store = coverage_report(s, catalog=catalog, stores=["lake"]).store("lake")
    assert {(f.dataset, f.field): (f.status, f.sampled, f.detail) for f in store.fields} == {
        ("postgres.customer", "email"): ("encrypted", 5, ""),
        ("postgres.customer", "phone"): ("in_clear", 5, "5 of 5 sampled values in clear"),
        ("postgres.address", "street"): ("absent", 0, "no Parquet file yet"),
    }
    assert (store.protected, store.total) == (1, 2)

    # A damaged file: the store is reported unreachable, naming the file, not a crash.
    damaged = tmp_path / "lake/raw/postgres/address/extracted_date=2026-01-01"
    damaged.mkdir(parents=True)
    (damaged / "s1-0.parquet").write_bytes(b"not a Parquet file")
    store = coverage_report(s, catalog=catalog, stores=["lake"]).store("lake")
    assert store.state == "unreachable" and store.percent is None
    assert "address/extracted_date=2026-01-01/s1-0.parquet not readable" in store.detail
