"""Field-level encryption of the documents' protected fields (docstore/fields.py), on the real
document server: the seed writes no e-mail in clear (searched in FerretDB's own PostgreSQL tables
and in the raw BSON), values decrypt back to the generated ones, lookups by e-mail go through the
keyed hash, and a ciphertext altered or moved to another field, document or collection does not
decrypt."""

from __future__ import annotations

import hashlib
import os
import re

import pytest
from bson import Binary, ObjectId
from bson.raw_bson import RawBSONDocument
from psycopg import sql

from stripe_platform.docstore import client as docstore
from stripe_platform.docstore import ferretdb, validation
from stripe_platform.docstore.fields import (
    DocumentFields,
    FieldEncryptionError,
    associated_data,
    protected_fields,
)
from stripe_platform.oltp import db
from stripe_platform.security.envelope import Envelope
from stripe_platform.security.keys import TamperedCiphertext, UnknownKeyVersion
from stripe_platform.seed import incremental
from stripe_platform.seed import load as seed_load
from stripe_platform.seed.dataset import build
from stripe_platform.seed.spec import make_spec

SPEC = {"scale": 0.005, "seed": 21, "end": "2026-11-01", "max_documents": 400}
EMAIL = re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9.\-]+")


def seeded_stores(settings, name: str, *, encrypt: bool):
    with db.connect(settings, database="postgres", autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE stripe_template STRATEGY FILE_COPY").format(
                sql.Identifier(name)
            )
        )
    s = settings.model_copy(
        update={"pg_database": name, "mongodb_database": name, "encrypt_at_rest": encrypt}
    )
    data = build(make_spec(**SPEC))
    docs = docstore.connect(s)
    seed_load.seed(s, data, docs)
    return s, docs, data


def drop(settings, name: str, docs) -> None:
    docs.client.drop_database(name)
    docs.client.close()
    with db.connect(settings, database="postgres", autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="module")
def seeded(settings):
    """A seed with encryption on (the default), shared by this module's read-only tests."""
    name = f"docenc_{os.getpid()}"
    s, docs, data = seeded_stores(settings, name, encrypt=True)
    try:
        yield s, docs, data
    finally:
        drop(settings, name, docs)


@pytest.fixture
def stores(settings, database, docdb):
    """Settings naming the test's own databases (its keys live in its PostgreSQL database)."""
    return settings.model_copy(update={"pg_database": database, "mongodb_database": docdb.name})


def generated_emails(data) -> dict[int, str]:
    t = data.entities.customers
    return dict(zip(t.column("id").to_pylist(), t.column("email").to_pylist(), strict=True))


def emails_in_backend(settings, database: str) -> set[str]:
    """Every e-mail-like string in the PostgreSQL tables FerretDB keeps the database's
    collections in (all of them, metadata included)."""
    found: set[str] = set()
    with ferretdb.backend_connection(settings) as conn:
        tables = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
            (database,),
        ).fetchall()
        assert tables, f"no FerretDB tables for database {database}"
        for (table,) in tables:
            query = sql.SQL("SELECT _jsonb::text FROM {}").format(sql.Identifier(database, table))
            for (text,) in conn.execute(query):
                found.update(m.lower() for m in EMAIL.findall(text))
    return found


def emails_in_raw_bson(docs) -> set[str]:
    """Every e-mail-like string in the BSON the server sends for every document."""
    found: set[str] = set()
    for name in docs.list_collection_names():
        for doc in (
            docs[name]
            .with_options(
                codec_options=docs.codec_options.with_options(document_class=RawBSONDocument)
            )
            .find()
        ):
            found.update(m.lower() for m in EMAIL.findall(doc.raw.decode("latin-1")))
    return found


def on_ferretdb(docs) -> bool:
    return docstore.server_kind(docs) == "ferretdb"


# -- the seed ----------------------------------------------------------------------------------------
def test_the_catalog_names_the_fields_and_their_hashes():
    fields = {c: {(f.path, f.hash_path) for f in fs} for c, fs in protected_fields().items()}
    assert ("email", "email_hash") in fields["Customer"]
    assert ("customer_email", "customer_email_hash") in fields["Transaction"]


def test_seeded_documents_hold_no_email_in_clear(seeded):
    s, docs, data = seeded
    emails = {e.lower() for e in generated_emails(data).values()}
    assert docs.Customer.count_documents({}) == len(emails) >= 100
    assert docs.Transaction.count_documents({}) == 400
    assert not emails & emails_in_raw_bson(docs)
    if on_ferretdb(docs) and s.mongodb_uri is None:
        assert not emails & emails_in_backend(s, docs.name)
    customer = docs.Customer.find_one()
    assert type(customer["email"]) is bytes and Envelope.is_ciphertext(customer["email"])
    assert Envelope.key_ref(customer["email"])[0] == "documents/customer"
    tx = docs.Transaction.find_one()
    assert Envelope.key_ref(tx["customer_email"])[0] == "documents/transaction"


def test_seeded_documents_decrypt_to_the_generated_values(seeded):
    s, docs, data = seeded
    fields, emails = DocumentFields(s), generated_emails(data)
    customers = fields.decrypt_documents("Customer", docs.Customer.find())
    assert {c["oltp_id"]: c["email"] for c in customers} == emails
    customer_of = dict(
        zip(
            data.transactions.column("id").to_pylist(),
            data.transactions.column("customerid").to_pylist(),
            strict=True,
        )
    )
    for tx in fields.decrypt_documents("Transaction", docs.Transaction.find()):
        assert tx["customer_email"] == emails[customer_of[tx["transaction_id"]]]


def test_lookup_by_email_through_the_keyed_hash(seeded):
    s, docs, data = seeded
    fields, emails = DocumentFields(s), generated_emails(data)
    cid, email = next(iter(emails.items()))
    found = fields.find_by_email(docs, "Customer", f"  {email.upper()} ")
    assert [(c["oltp_id"], c["email"]) for c in found] == [(cid, email)]
    # the keyed hash, not a plain digest of the address
    stored = found[0]["email_hash"]
    assert stored != hashlib.sha256(email.lower().encode()).hexdigest()
    assert fields.find_by_email(docs, "Customer", "nobody@example.invalid") == []

    # A customer's payments by their e-mail: the same hash in both collections.
    customer_of = zip(
        data.transactions.column("id").to_pylist(),
        data.transactions.column("customerid").to_pylist(),
        strict=True,
    )
    by_customer: dict[int, list[int]] = {}
    for tx, c in customer_of:
        by_customer.setdefault(c, []).append(tx)
    present = {d["transaction_id"] for d in docs.Transaction.find({}, {"transaction_id": 1})}
    cid = max(by_customer, key=lambda c: len(present.intersection(by_customer[c])))
    expected = present.intersection(by_customer[cid])
    assert expected
    payments = fields.find_by_email(docs, "Transaction", emails[cid])
    assert {p["transaction_id"] for p in payments} == expected
    assert {p["customer_email"] for p in payments} == {emails[cid]}
    assert {p["customer_email_hash"] for p in payments} == {
        fields.find_by_email(docs, "Customer", emails[cid])[0]["email_hash"]
    }


def test_the_scorers_set_fields_leaves_encrypted_fields_readable(seeded):
    s, docs, _ = seeded
    fields = DocumentFields(s)
    before = {
        d["transaction_id"]: d
        for d in fields.decrypt_documents("Transaction", docs.Transaction.find())
    }
    keys = sorted(before)[:50]
    result = validation.set_fields(
        docs, s, "Transaction", "transaction_id", [(k, {"AnomalyScore": 0.25}) for k in keys]
    )
    assert result.matched == 50
    for d in fields.decrypt_documents("Transaction", docs.Transaction.find()):
        k = d["transaction_id"]
        assert d["customer_email"] == before[k]["customer_email"]
        assert d["customer_email_hash"] == before[k]["customer_email_hash"]
        assert d["AnomalyScore"] == (0.25 if k in keys else before[k]["AnomalyScore"])


def test_incremental_activity_writes_encrypted_payments(settings):
    name = f"docenc_inc_{os.getpid()}"
    s, docs, data = seeded_stores(settings, name, encrypt=True)
    try:
        seeded_ids = {d["transaction_id"] for d in docs.Transaction.find({}, {"transaction_id": 1})}
        report = incremental.run(s, docs, seed=1, minutes=24 * 60)
        assert report.inserted["Transaction"] > 0
        new = [d for d in docs.Transaction.find() if d["transaction_id"] not in seeded_ids]
        assert len(new) == report.inserted["Transaction"]
        with db.connect(s) as conn:
            owner = dict(
                conn.execute(
                    "SELECT ID, CustomerID FROM Transaction WHERE ID = ANY(%s)",
                    ([d["transaction_id"] for d in new],),
                ).fetchall()
            )
        emails, fields = generated_emails(data), DocumentFields(s)
        for d in new:
            assert type(d["customer_email"]) is bytes
            clear = fields.decrypt_document("Transaction", d)["customer_email"]
            assert clear == emails[owner[d["transaction_id"]]]
    finally:
        drop(settings, name, docs)


def test_with_encryption_off_the_seed_writes_strings(settings):
    """The bench's comparison; also shows the searches above find clear e-mails when present."""
    name = f"docenc_off_{os.getpid()}"
    s, docs, data = seeded_stores(settings, name, encrypt=False)
    try:
        emails = generated_emails(data)
        got = {c["oltp_id"]: c["email"] for c in docs.Customer.find()}
        assert got == emails
        assert docs.Customer.count_documents({"email_hash": {"$exists": True}}) == 0
        assert all(type(d["customer_email"]) is str for d in docs.Transaction.find())
        lowered = {e.lower() for e in emails.values()}
        assert lowered <= emails_in_raw_bson(docs)
        if on_ferretdb(docs) and s.mongodb_uri is None:
            assert lowered <= emails_in_backend(s, docs.name)
        cid, email = next(iter(emails.items()))
        found = DocumentFields(s).find_by_email(docs, "Customer", email)
        assert [c["oltp_id"] for c in found] == [cid]
        # Documents written in clear stay readable once encryption is turned on.
        on = DocumentFields(s.model_copy(update={"encrypt_at_rest": True}))
        assert (
            on.decrypt_document("Customer", docs.Customer.find_one({"oltp_id": cid}))["email"]
            == email
        )
    finally:
        drop(settings, name, docs)


# -- moved and altered ciphertexts ------------------------------------------------------------------
def customer(n: int, email: str) -> dict:
    import datetime as dt

    return {
        "_id": ObjectId(f"{n:024x}"),
        "oltp_id": n,
        "userName": f"user{n}",
        "email": email,
        "preferences": {"device": "Mobile", "paymentMethod": "Wallet", "currency": "EUR"},
        "lastUpdated": dt.datetime(2026, 11, 1, tzinfo=dt.UTC),
    }


def transaction(n: int, email: str) -> dict:
    import datetime as dt

    return {
        "_id": ObjectId(f"{n:024x}"),
        "transaction_id": n,
        "transaction_status_id": 1,
        "merchant_id": 1,
        "amount": 10.0,
        "currency_id": 1,
        "customer_email": email,
        "timestamp": dt.datetime(2026, 11, 1, tzinfo=dt.UTC),
    }


def test_a_ciphertext_moved_elsewhere_does_not_decrypt(stores, docdb):
    fields = DocumentFields(stores)
    a, b = customer(1, "ann@example.com"), customer(2, "bob@example.com")
    validation.insert_many(docdb.Customer, fields.encrypt_documents("Customer", [a, b]))
    validation.insert_many(
        docdb.Transaction,
        [fields.encrypt_document("Transaction", transaction(1, "ann@example.com"))],
    )
    stolen = docdb.Customer.find_one({"_id": a["_id"]})["email"]

    # into another customer's document
    docdb.Customer.update_one({"_id": b["_id"]}, {"$set": {"email": Binary(stolen)}})
    with pytest.raises(
        TamperedCiphertext, match=r"Customer\.email of document _id=ObjectId\('0+2'\)"
    ):
        fields.decrypt_document("Customer", docdb.Customer.find_one({"_id": b["_id"]}))
    # into another collection's document with the same _id
    docdb.Transaction.update_one({"_id": a["_id"]}, {"$set": {"customer_email": Binary(stolen)}})
    with pytest.raises(TamperedCiphertext, match=r"Transaction\.customer_email"):
        fields.decrypt_document("Transaction", docdb.Transaction.find_one({"_id": a["_id"]}))
    # bound to its field: the same document and key, another field's associated data
    envelope = Envelope(stores)
    assert (
        envelope.decrypt(stolen, aad=associated_data("Customer", "email", a["_id"]))
        == b"ann@example.com"
    )
    with pytest.raises(TamperedCiphertext):
        envelope.decrypt(stolen, aad=associated_data("Customer", "userName", a["_id"]))
    # the document it belongs to still reads
    assert (
        fields.decrypt_document("Customer", docdb.Customer.find_one({"_id": a["_id"]}))["email"]
        == "ann@example.com"
    )


def test_a_tampered_ciphertext_is_refused_naming_the_field(stores, docdb):
    fields = DocumentFields(stores)
    doc = fields.encrypt_document("Customer", customer(3, "cy@example.com"))
    validation.insert_many(docdb.Customer, [doc])
    stored = bytearray(docdb.Customer.find_one({"_id": doc["_id"]})["email"])
    stored[-1] ^= 0x01  # the GCM tag
    docdb.Customer.update_one({"_id": doc["_id"]}, {"$set": {"email": Binary(bytes(stored))}})
    with pytest.raises(TamperedCiphertext, match=r"Customer\.email of document _id=ObjectId"):
        fields.decrypt_document("Customer", docdb.Customer.find_one({"_id": doc["_id"]}))

    # bytes that are no envelope ciphertext at all
    docdb.Customer.update_one({"_id": doc["_id"]}, {"$set": {"email": Binary(b"cy@example.com")}})
    with pytest.raises(TamperedCiphertext, match=r"Customer\.email"):
        fields.decrypt_document("Customer", docdb.Customer.find_one({"_id": doc["_id"]}))

    # a key version this platform never had
    good = bytes(fields.encrypt_document("Customer", customer(3, "cy@example.com"))["email"])
    n = int.from_bytes(good[4:6], "big")
    unknown = good[: 6 + n] + (99).to_bytes(4, "big") + good[10 + n :]
    with pytest.raises(UnknownKeyVersion, match=r"Customer\.email"):
        fields.decrypt_document("Customer", {**doc, "email": unknown})


def test_a_protected_value_that_is_no_string_is_refused_before_writing(stores, docdb):
    fields = DocumentFields(stores)
    bad = customer(4, "dee@example.com") | {"email": 42}
    with pytest.raises(FieldEncryptionError, match=r"Customer document _id=.*'email'.*int"):
        validation.insert_many(
            docdb.Customer,
            fields.encrypt_documents("Customer", [customer(5, "eve@example.com"), bad]),
        )
    assert docdb.Customer.count_documents({}) == 0


def test_encrypting_leaves_the_callers_document_and_ciphertexts_alone(stores):
    fields = DocumentFields(stores)
    doc = customer(6, "fay@example.com")
    once = fields.encrypt_document("Customer", doc)
    assert doc["email"] == "fay@example.com" and "email_hash" not in doc
    assert fields.encrypt_document("Customer", once)["email"] == once["email"]  # not twice
    assert fields.decrypt_document("Customer", once)["email"] == "fay@example.com"
    unprotected = {"_id": 1, "name": "Shop", "industry": "Retail"}
    assert fields.encrypt_document("Merchant", unprotected) == unprotected


def test_the_validator_takes_the_ciphertext_and_a_well_formed_hash(stores):
    fields = DocumentFields(stores)
    doc = fields.encrypt_document("Customer", customer(7, "gus@example.com"))
    validation.check_documents("Customer", [doc])  # binData e-mail, hex hash: valid
    with pytest.raises(validation.DocumentRefused, match="email_hash"):
        validation.check_documents("Customer", [doc | {"email_hash": "gus@example.com"}])
    with pytest.raises(validation.DocumentRefused, match="'email'"):
        validation.check_documents("Customer", [doc | {"email": "not an address"}])
