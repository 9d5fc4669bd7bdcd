"""The erasure proof (issue 23 §1): a seeded platform synced by the real pipelines into a real lake
directory (two generations of the PostgreSQL streams: the second sync re-snapshots, so the first
is superseded history) and a real DuckDB warehouse built by dbt, one customer erased through a
privacy request (compliance/requests.py running every store step: the sources, then
compliance/stores_downstream.py's warehouse_raw, marts, lake, logs and keys), then every store
searched for that customer's e-mail, name, phone and IP addresses, taken before the erasure from
what the seed wrote (not from the code under test).

"Nothing readable" is checked as a reader with the platform's own keys would read: clear cells and
bytes are searched for the values; every ciphertext cell of the lake and the warehouse is
decrypted where the platform can, and the subject's own refuse (their key is shredded).

Plus: another customer's data is still there and readable (the erasure was targeted), the
subject's financial rows are kept without identity, and a second run changes nothing."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from bson import json_util
from psycopg import sql

from built_warehouse import _database, transform_cli
from conftest import TEMPLATE_DB
from stripe_platform.audit import access_log
from stripe_platform.compliance import requests, stores
from stripe_platform.compliance.stores_downstream import Identifiers
from stripe_platform.docstore import client as docstore
from stripe_platform.governance import classification
from stripe_platform.ingestion.catalog import load_catalog
from stripe_platform.ingestion.engine import open_writer, run_sync
from stripe_platform.ingestion.postgres import cdc
from stripe_platform.oltp import db
from stripe_platform.security.envelope import Envelope, SubjectKeys
from stripe_platform.security.keys import KeyError_, KeyShredded, TamperedCiphertext
from stripe_platform.security.subjects_layer import SUBJECT_SCOPE, decrypt_column
from stripe_platform.seed import load as seed_load
from stripe_platform.seed.dataset import build
from stripe_platform.seed.spec import make_spec

END = dt.date(2026, 11, 1)
LAKE = ("postgres-to-s3", "mongodb-to-s3")
WAREHOUSE = ("postgres-to-snowflake", "mongodb-to-snowflake")
DOWNSTREAM = ("warehouse_raw", "marts", "lake", "logs", "keys")


def _sync(s, names) -> None:
    catalog = load_catalog()
    for name in names:
        connection = catalog.resolve(name)
        run_sync(s, connection, open_writer(s, connection))


def _subjects(data) -> tuple[int, int, dict[int, dict[str, set[str]]]]:
    """(the subject, another customer, each customer's needles): the customer with the most
    transactions whose IP addresses no other customer's rows carry (an IP that another customer's
    transaction also records is that transaction's data as well), and the next such one."""
    customers = data.entities.customers.to_pylist()
    tx = data.transactions.select(["customerid", "ipaddress"]).to_pylist()
    ips: dict[int, set[str]] = {}
    owners: dict[str, set[int]] = {}
    for row in tx:
        ips.setdefault(row["customerid"], set()).add(row["ipaddress"])
        owners.setdefault(row["ipaddress"], set()).add(row["customerid"])
    eligible = sorted(
        (c for c in ips if all(owners[ip] == {c} for ip in ips[c])),
        key=lambda c: (-len([r for r in tx if r["customerid"] == c]), c),
    )
    by_id = {c["id"]: c for c in customers}
    needles = {
        c: {
            "email": {by_id[c]["email"]},
            "name": {by_id[c]["fullname"]},
            "phone": {by_id[c]["phone"]},
            "ip": ips[c],
        }
        for c in eligible[:2]
    }
    return eligible[0], eligible[1], needles


def _flat(needles: dict[str, set[str]]) -> set[str]:
    return {v for values in needles.values() for v in values if v}


@pytest.fixture(scope="module")
def platform(settings, tmp_path_factory) -> Iterator[dict]:
    name = f"erasure_{os.getpid()}"
    root = tmp_path_factory.mktemp("erasure")
    with _database(settings, name, TEMPLATE_DB) as source_db:
        s = settings.model_copy(
            update={
                "pg_database": source_db,
                "mongodb_database": name,
                "warehouse_path": root / "warehouse.duckdb",
                "lake_uri": str(root / "lake"),
            }
        )
        documents = docstore.connect(s)
        try:
            data = build(make_spec(scale=0.003, seed=23, end=END, max_documents=400))
            seed_load.seed(s, data, documents)
            subject, other, needles = _subjects(data)
            mine = needles[subject]
            # A Log document about the subject's session (a statement with their e-mail literal,
            # from their IP): what the logs step searches by identifiers.
            documents["Log"].insert_one(
                {
                    "query_id": 10_000_001,
                    "user": "support_agent",
                    "dbname": "stripe",
                    "pid": 4242,
                    "remote_host": sorted(mine["ip"])[0],
                    "session_id": "6752a1b0.1092",
                    "session_start": dt.datetime(2026, 10, 30, 9, 0, tzinfo=dt.UTC),
                    "application_name": "psql",
                    "lines": [
                        {
                            "timestamp": dt.datetime(2026, 10, 30, 9, 0, 1, tzinfo=dt.UTC),
                            "error_severity": "LOG",
                            "message": "statement: SELECT * FROM customer WHERE email = "
                            f"'{next(iter(mine['email']))}'",
                        }
                    ],
                    "isAnomaly": 0,
                }
            )
            # The same literal in PostgreSQL's own jsonlog (log_statement = all): a log file.
            with db.connect(s, autocommit=True) as conn:
                conn.execute(
                    sql.SQL("SELECT {} AS looked_up").format(sql.Literal(next(iter(mine["email"]))))
                )
            _sync(s, LAKE)
            # Lose the lake's replication slot: the next sync re-snapshots, and the first
            # generation of every PostgreSQL stream becomes superseded history.
            catalog = load_catalog()
            with db.connect(s, autocommit=True) as conn:
                lake_pg = catalog.resolve("postgres-to-s3")
                cdc.drop_slot(conn, lake_pg.slot(conn.info.dbname))
            _sync(s, LAKE)
            _sync(s, WAREHOUSE)
            summary = transform_cli(s)
            assert summary["counts"].get("error", 0) == 0, summary
            yield {"s": s, "data": data, "subject": subject, "other": other, "needles": needles}
        finally:
            with db.connect(s, autocommit=True) as conn:
                catalog = load_catalog()
                for c in catalog.connections:
                    connection = catalog.resolve(c.name)
                    if connection.source.kind == "postgres":
                        cdc.drop_slot(conn, connection.slot(conn.info.dbname))
            documents.client.drop_database(name)
            documents.client.close()


# --- what every store holds, as a reader with the platform's keys reads it --------------------


def _postgres_text(s) -> list[tuple[str, str]]:
    """(table, its rows as text) of every table of the source database, every schema."""
    out = []
    with db.connect(s) as conn:
        tables = conn.execute(
            "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n "
            "ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'p', 'm') "
            "AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')"
        ).fetchall()
        for schema, table in tables:
            query = sql.SQL("SELECT string_agg(t::text, E'\\n') FROM {}.{} t").format(
                sql.Identifier(schema), sql.Identifier(table)
            )
            out.append((f"{schema}.{table}", conn.execute(query).fetchone()[0] or ""))
    return out


def _documents_text(s) -> list[tuple[str, str]]:
    documents = docstore.connect(s)
    try:
        return [
            (name, "\n".join(json_util.dumps(doc) for doc in documents[name].find()))
            for name in documents.list_collection_names()
        ]
    finally:
        documents.client.close()


class _Reader:
    """Reads raw-layer ciphertexts the way the platform can (its keys); a shredded subject's
    refuse, and are recorded as refused."""

    def __init__(self, s) -> None:
        self.envelope = Envelope(s)
        self.subjects = SubjectKeys(self.envelope)
        self.refused: set[str] = set()  # key scopes whose ciphertexts did not decrypt: shredded

    def column(self, source: str, dataset: str, column: str, values: list) -> list[str]:
        out = []
        for value in values:
            if value is None:
                continue
            value = bytes(value)
            try:
                scope, _ = Envelope.key_ref(value)
            except TamperedCiphertext:  # not one of ours: raw bytes, searched as they are
                out.append(value.decode("latin-1"))
                continue
            if scope in self.refused:
                continue
            try:
                plain = decrypt_column(
                    self.envelope, source, dataset, column, [value], subjects=self.subjects
                )[0]
            except KeyShredded:
                self.refused.add(scope)
                continue
            except KeyError_:  # bound to another field (a copy elsewhere): not readable there
                continue
            out.append((plain or b"").decode("latin-1"))
        return out


def _table_text(table: pa.Table, reader: _Reader, source: str, dataset: str) -> str:
    """Every cell of a table as readable text, one line each."""
    parts: list[str] = []
    for name in table.column_names:
        column = table.column(name)
        if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
            parts += reader.column(source, dataset, name, column.to_pylist())
            continue
        try:
            parts += [v for v in pc.cast(column, pa.string()).to_pylist() if v is not None]
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            parts += [str(v) for v in column.to_pylist() if v is not None]
    return "\n".join(parts)


def _duckdb_text(s, reader: _Reader) -> list[tuple[str, str]]:
    out = []
    conn = duckdb.connect(str(s.warehouse_path), read_only=True)
    try:
        tables = conn.execute(
            "SELECT table_schema, table_name FROM information_schema.tables"
        ).fetchall()
        for schema, table in tables:
            data = conn.sql(f'SELECT * FROM "{schema}"."{table}"').to_arrow_table()
            source, _, stream = table.partition("_")
            out.append((f"{schema}.{table}", _table_text(data, reader, source, stream)))
    finally:
        conn.close()
    return out


def _lake_text(root: Path, reader: _Reader) -> list[tuple[str, str]]:
    out = []
    files = sorted(root.rglob("*.parquet"))
    assert any("superseded" in str(f) for f in files)  # history is part of what is searched
    for path in files:
        parts = path.relative_to(root).parts  # raw|superseded / source / stream / ...
        text = _table_text(pq.read_table(path), reader, parts[1], parts[2])
        out.append((str(path), text))
    for path in sorted(root.rglob("*")):  # state files and anything else the lake keeps
        if path.is_file() and path.suffix != ".parquet":
            out.append((str(path), path.read_bytes().decode("latin-1")))
    return out


def _log_files_text(s) -> list[tuple[str, str]]:
    out = []
    for directory in (access_log.log_dir(s), access_log.postgres_log_dir(s)):
        if directory is None or not directory.is_dir():
            continue
        for path in sorted(directory.iterdir()):
            if path.is_file():
                out.append((str(path), path.read_bytes().decode("latin-1")))
    return out


def _found(rows: list[tuple[str, str]], needles: set[str]) -> list[tuple[str, str]]:
    return [(where, n) for where, text in rows for n in needles if n in text]


def _everything(s) -> tuple[list[tuple[str, str]], _Reader]:
    reader = _Reader(s)
    rows = (
        _postgres_text(s)
        + _documents_text(s)
        + _duckdb_text(s, reader)
        + _lake_text(Path(s.lake_uri), reader)
        + _log_files_text(s)
    )
    return rows, reader


# --- the proof ----------------------------------------------------------------------------------


def test_the_subject_is_findable_before_the_erasure(platform):
    """The search can fail: before the erasure the subject's IPs are in clear downstream, their
    Log lines carry their e-mail, and an access request exports every needle."""
    s, subject, needles = (
        platform["s"],
        platform["subject"],
        platform["needles"][platform["subject"]],
    )
    rows, _ = _everything(s)
    found = _found(rows, _flat(needles))
    where = {w.split("/")[-1] if "/" in w else w for w, _ in found}
    assert any(n in needles["ip"] for _, n in found)
    assert "raw.postgres_transaction" in where and "Log" in where
    assert any("superseded" in w for w, _ in found)
    request = requests.submit(
        s, "access", subject, requested_by="test", source="cli", identity="test"
    )
    request = requests.run(s, request.id)
    assert request.state == "done", request.error
    export = json.dumps(requests.read_export(s, request.id))
    assert {n for n in _flat(needles) if n in export} == _flat(needles)
    # The downstream stores answered too, each item saying where it came from.
    stores_seen = {i["store"] for i in requests.read_export(s, request.id)["items"]}
    assert {"warehouse_raw", "marts", "lake", "logs", "keys"} <= stores_seen
    # The export is personal data too: left here, the erasure must remove it (checked there).
    assert Path(request.export_path).exists()


def test_after_erasure_nothing_of_the_subject_is_readable_anywhere(platform):
    s, subject, other = platform["s"], platform["subject"], platform["other"]
    needles, others = platform["needles"][subject], platform["needles"][other]
    with db.connect(s) as conn:
        kept_before = conn.execute(
            "SELECT count(*) FROM transaction WHERE customerid = %s", (subject,)
        ).fetchone()[0]
    assert kept_before > 0

    # A copy of the lake taken before (a backup, an exploration copy): out of the platform's
    # reach, so the erasure cannot rewrite it; crypto-shredding is what covers it.
    backup = Path(s.lake_uri).with_name("lake-backup")
    shutil.copytree(s.lake_uri, backup)

    request = requests.submit(
        s, "erase", subject, requested_by="test", source="cli", identity="test"
    )
    request = requests.run(s, request.id)
    assert request.state == "done", request.error
    assert [step.store for step in request.steps][-len(DOWNSTREAM) :] == list(DOWNSTREAM)
    counts = {step.store: step.counts for step in request.steps}
    assert counts["lake"].get("files_rewritten", 0) > 0
    assert counts["warehouse_raw"] and counts["marts"] and counts["logs"]
    assert counts["keys"] == {"subject_key.shredded": 1}

    rows, reader = _everything(s)
    assert _found(rows, _flat(needles)) == []
    # The earlier access request's export (the test before) went with the rest.
    assert list(requests.export_dir(s).glob(f"request-*-customer-{subject}.json")) == []
    # In the copy, the subject's protected values (e-mail, name, phone, street: pii, pci,
    # credentials) no longer decrypt, their key is gone; everyone else's still do. What the raw
    # layer keeps in clear (pii_quasi: IP addresses, user names, log lines) stays readable in a
    # copy the platform cannot reach: docs/compliance.md says so.
    copy_reader = _Reader(s)
    _lake_text(backup, copy_reader)
    assert copy_reader.refused == {f"{SUBJECT_SCOPE}{subject}"}
    # Nothing of theirs decrypts in the platform's own stores either (their rows were rewritten).
    assert reader.refused <= {f"{SUBJECT_SCOPE}{subject}"}
    # The request's own encrypted copy of the identifiers is unreadable too.
    with db.connect(s) as conn:
        (sealed,) = conn.execute(
            "SELECT identifiers FROM privacy.request WHERE id = %s", (request.id,)
        ).fetchone()
    assert sealed is not None
    with pytest.raises(KeyShredded):
        SubjectKeys(Envelope(s)).decrypt(bytes(sealed), aad=b"", obj="test")

    # Targeted: another customer's values are still there, and theirs still decrypt.
    assert {n for _, n in _found(rows, _flat(others))} >= others["ip"]

    # Financial records kept, stripped of identity: at the source and in every copy.
    with db.connect(s) as conn:
        kept, with_ip = conn.execute(
            "SELECT count(*), count(ipaddress) FROM transaction WHERE id = ANY(%s)",
            (
                [
                    t["id"]
                    for t in platform["data"].transactions.select(["id", "customerid"]).to_pylist()
                    if t["customerid"] == subject
                ],
            ),
        ).fetchone()
    assert (kept, with_ip) == (kept_before, 0)
    wh = duckdb.connect(str(s.warehouse_path), read_only=True)
    try:
        raw_kept, raw_ip = wh.execute(
            "SELECT count(*), count(ipaddress) FROM raw.postgres_transaction WHERE customerid = ?",
            [subject],
        ).fetchone()
    finally:
        wh.close()
    assert raw_kept == kept_before and raw_ip == 0


def test_a_second_run_changes_nothing(platform):
    s, subject = platform["s"], platform["subject"]
    done = [r for r in requests.list_requests(s, customer_id=subject) if r.kind == "erase"]
    assert done and done[0].state == "done"
    # The request itself: done stays done.
    assert requests.run(s, done[0].id).steps == done[0].steps
    # Each downstream step run again directly: nothing left to change.
    catalog = classification.load_catalog()
    ctx = stores.SubjectContext(
        settings=s,
        customer_id=subject,
        request_id=done[0].id,
        identifiers=Identifiers.from_json(
            {k: sorted(v) for k, v in _identifiers(platform["needles"][subject]).items()}
        ),
        catalog=catalog,
        now=dt.datetime.now(dt.UTC),
    )
    for name in DOWNSTREAM:
        outcome = stores.get_store(name).erase(ctx)
        assert outcome.changed == 0, (name, outcome.counts)


def _identifiers(needles: dict[str, set[str]]) -> dict[str, set[str]]:
    return {
        "emails": needles["email"],
        "names": needles["name"],
        "phones": needles["phone"],
        "ips": needles["ip"],
    }


def test_the_next_syncs_bring_nothing_back(platform):
    """The pipelines run again after the erasure (the sources' tombstones and anonymised rows
    arrive): nothing of the subject comes back downstream, and their key is not created again."""
    s, subject = platform["s"], platform["subject"]
    _sync(s, LAKE)
    _sync(s, WAREHOUSE)
    rows, _ = _everything(s)
    assert _found(rows, _flat(platform["needles"][subject])) == []
    assert SubjectKeys(Envelope(s)).is_shredded(subject)
