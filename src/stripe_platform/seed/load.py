"""Writing a Dataset to both stores through their bulk paths.

PostgreSQL: COPY (CSV produced by pyarrow) in batches. Each batch is one database transaction that
also records itself in ``platform.seed_batch``, so an interrupted run resumes after the last
committed batch and never loads one twice. Foreign-key and audit triggers are switched off for the
batch (``session_replication_role = replica``, as for any bulk load) and the same invariants are
then checked set-wise before the batch commits: every reference resolves, every recorded status
change is a permitted transition, and each transaction's status is its last recorded one.
Personal data goes through a session-temporary staging table and is hashed (bcrypt) and encrypted
(pii_encrypt under the table's data key, postgres/<table>) by the database, as for any other write.

Documents: insert_many in batches with deterministic ids, each batch checked against its
collection's validator before it is sent where the server does not enforce it
(docstore/validation.py), the check of one batch overlapping the write of the one before; a batch
that was partly written before an interruption is completed with upserts.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import numpy as np
import psycopg
import pyarrow as pa
from pymongo import ReplaceOne
from pymongo.errors import BulkWriteError, DuplicateKeyError

from stripe_platform.compliance import consent
from stripe_platform.config import Settings
from stripe_platform.docstore import ferretdb, validation
from stripe_platform.docstore.fields import DocumentFields
from stripe_platform.docstore.specs import apply_specs, load_specs
from stripe_platform.oltp import db, partitions
from stripe_platform.seed import documents, logs
from stripe_platform.seed.dataset import Dataset
from stripe_platform.seed.spec import SeedError, SeedSpec

Progress = Callable[[str, int, int], None]  # (entity, rows just written, total rows)

OLTP_TABLES = (
    "consent",  # no foreign key to customer: named, or the restarted ids would inherit it
    "transactionstatechanges",
    "transaction",
    "paymentinstrument",
    "device",
    "address",
    "customer",
    "merchant",
    "location",
)
TX_BATCH = 100_000
CUSTOMER_BATCH = 2_500
DOC_BATCH = 2_000


@dataclass
class EntityTiming:
    rows: int = 0
    seconds: float = 0.0

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0


@dataclass
class SeedReport:
    run_key: str
    oltp_seconds: float = 0.0  # the whole PostgreSQL phase: partitions, batches, checks, ANALYZE
    oltp: dict[str, EntityTiming] = field(default_factory=dict)
    documents: dict[str, EntityTiming] = field(default_factory=dict)
    resumed_batches: int = 0


# -- PostgreSQL ------------------------------------------------------------------------------------
def _bulk(conn: psycopg.Connection) -> None:
    if not conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()[0]:
        raise SeedError(
            "seeding bulk-loads with triggers deferred and needs a superuser connection"
        )
    conn.execute("SET LOCAL session_replication_role = replica")


def _violations(conn: psycopg.Connection, checks: dict[str, str], params: dict[str, Any]) -> None:
    for what, query in checks.items():
        bad = conn.execute(query, params).fetchone()[0]  # type: ignore[arg-type]
        if bad:
            raise SeedError(f"bulk load refused: {bad} row(s) where {what}; nothing was committed")


TRANSACTION_CHECKS = {
    "a transaction references a missing row": """
        SELECT count(*) FROM Transaction t
        LEFT JOIN Merchant m ON m.ID = t.MerchantID
        LEFT JOIN Customer c ON c.ID = t.CustomerID
        LEFT JOIN Device d ON d.ID = t.DeviceID
        LEFT JOIN Address a ON a.ID = t.BillingAddressID
        LEFT JOIN Location l ON l.ID = t.TransactionLocationID
        LEFT JOIN PaymentInstrument p ON p.ID = t.PaymentInstrumentID
        WHERE t.ID BETWEEN %(lo)s AND %(hi)s
          AND (m.ID IS NULL OR c.ID IS NULL OR (t.DeviceID IS NOT NULL AND d.ID IS NULL)
               OR a.ID IS NULL OR l.ID IS NULL
               OR (t.PaymentInstrumentID IS NOT NULL AND p.ID IS NULL))""",
    "a status change is not a permitted transition": """
        SELECT count(*) FROM TransactionStateChanges s
        LEFT JOIN TransactionStatusTransition x
               ON x.FromStatusID = s.FromStatusID AND x.ToStatusID = s.ToStatusID
        WHERE s.TransactionID BETWEEN %(lo)s AND %(hi)s
          AND s.FromStatusID IS NOT NULL AND x.FromStatusID IS NULL""",
    "a status change points at no transaction": """
        SELECT count(*) FROM TransactionStateChanges s
        LEFT JOIN Transaction t ON t.ID = s.TransactionID AND t.DateTime = s.TransactionDateTime
                               AND t.ID BETWEEN %(lo)s AND %(hi)s  -- one hash join, ~3x
        WHERE s.TransactionID BETWEEN %(lo)s AND %(hi)s AND t.ID IS NULL""",
    "a transaction's status is not its last recorded change (or pending without any)": """
        SELECT count(*) FROM Transaction t
        LEFT JOIN (SELECT DISTINCT ON (s.TransactionID) s.TransactionID, s.ToStatusID
                   FROM TransactionStateChanges s
                   WHERE s.TransactionID BETWEEN %(lo)s AND %(hi)s
                   ORDER BY s.TransactionID, s.UpdatedAt DESC, s.ID DESC) last
               ON last.TransactionID = t.ID  -- one sort of the batch, not a lookup a row: ~4x
        WHERE t.ID BETWEEN %(lo)s AND %(hi)s
          AND coalesce(last.ToStatusID, 3) <> t.TransactionStatusID""",
}


@dataclass
class Batch:
    entity: str
    number: int
    rows: int
    write: Callable[[psycopg.Connection], None]


def _committed(conn: psycopg.Connection, run_key: str) -> set[tuple[str, int]]:
    rows = conn.execute(
        "SELECT entity, batch FROM platform.seed_batch WHERE run_key = %s", (run_key,)
    ).fetchall()
    return {(e, b) for e, b in rows}


def _run_batches(
    settings: Settings,
    run_key: str,
    batches: list[Batch],
    workers: int,
    done: set[tuple[str, int]],
    progress: Progress,
    report: SeedReport,
) -> None:
    todo = [b for b in batches if (b.entity, b.number) not in done]
    report.resumed_batches += len(batches) - len(todo)
    for b in batches:
        if (b.entity, b.number) in done:
            progress(b.entity, b.rows, sum(x.rows for x in batches))
    if not todo:
        return
    total = sum(b.rows for b in batches)
    timing = report.oltp.setdefault(todo[0].entity, EntityTiming())
    started = time.monotonic()

    def work(chunk: list[Batch]) -> None:
        with db.connect(settings, autocommit=True) as conn:
            for b in chunk:
                with conn.transaction():
                    _bulk(conn)
                    b.write(conn)
                    conn.execute(
                        "INSERT INTO platform.seed_batch (run_key, entity, batch, rows) "
                        "VALUES (%s, %s, %s, %s)",
                        (run_key, b.entity, b.number, b.rows),
                    )
                progress(b.entity, b.rows, total)

    # Round-robin over connections: the database does the hashing/encryption/parsing in parallel.
    chunks = [todo[i::workers] for i in range(min(workers, len(todo)))]
    with ThreadPoolExecutor(len(chunks)) as pool:
        for future in [pool.submit(work, c) for c in chunks]:
            future.result()
    timing.rows += sum(b.rows for b in todo)
    timing.seconds += time.monotonic() - started


def _slices(table: pa.Table, size: int) -> Iterator[tuple[int, pa.Table]]:
    for number, offset in enumerate(range(0, table.num_rows, size)):
        yield number, table.slice(offset, size)


def _staging(conn: psycopg.Connection, target: str, plain_columns: tuple[str, ...]) -> str:
    """A session-temporary copy of ``target`` whose encrypted columns hold plain text."""
    staging = f"seed_{target}_plain"
    if conn.execute("SELECT to_regclass(%s)", (f"pg_temp.{staging}",)).fetchone()[0] is None:
        conn.execute(f"CREATE TEMP TABLE {staging} (LIKE {target}) ON COMMIT DELETE ROWS")
        for column in plain_columns:
            conn.execute(
                f"ALTER TABLE {staging} ALTER {column} DROP NOT NULL, "
                f"ALTER {column} TYPE text USING NULL"
            )
    return staging


def _customer_writer(part: pa.Table) -> Callable[[psycopg.Connection], None]:
    def write(conn: psycopg.Connection) -> None:
        staging = _staging(conn, "customer", ("email", "fullname", "phone", "emailhash"))
        db.copy_arrow(conn, staging, part)
        # bcrypt at its minimum cost: these are synthetic accounts, and cost 6 would dominate the run.
        conn.execute(f"""
            INSERT INTO Customer (ID, UserName, Password, Email, EmailHash, FullName, Phone,
                                  CountryCode, PreferredDevice, PreferredPaymentMethodID,
                                  PreferredCurrencyID, CreatedAt, UpdatedAt)
            SELECT id, username, crypt(password, gen_salt('bf', 4)),
                   pii_encrypt(email, 'postgres/customer'), pii_lookup_hash(email),
                   pii_encrypt(fullname, 'postgres/customer'),
                   pii_encrypt(phone, 'postgres/customer'), countrycode, preferreddevice,
                   preferredpaymentmethodid, preferredcurrencyid, createdat, updatedat
            FROM {staging}""")

    return write


def _encrypting_writer(
    target: str, part: pa.Table, encrypted: str
) -> Callable[[psycopg.Connection], None]:
    def write(conn: psycopg.Connection) -> None:
        staging = _staging(conn, target, (encrypted,))
        db.copy_arrow(conn, staging, part)
        cols = ", ".join(part.column_names)
        values = ", ".join(
            f"pii_encrypt({c}, 'postgres/{target}')" if c == encrypted else c
            for c in part.column_names
        )
        conn.execute(f"INSERT INTO {target} ({cols}) SELECT {values} FROM {staging}")

    return write


def _transaction_writer(tx: pa.Table, changes: pa.Table) -> Callable[[psycopg.Connection], None]:
    lo, hi = tx.column("id")[0].as_py(), tx.column("id")[-1].as_py()

    def write(conn: psycopg.Connection) -> None:
        db.copy_arrow(conn, "transaction", tx)
        db.copy_arrow(conn, "transactionstatechanges", changes)
        _violations(conn, TRANSACTION_CHECKS, {"lo": lo, "hi": hi})

    return write


# Transaction's secondary indexes cost more than the COPY itself when rows arrive batch by batch
# (COPY of a 100,000-row batch at scale 1: 3.7 s with them, 1.4 s without): a fresh multi-batch
# load drops them and builds them once at the end, the standard bulk-load order. Each dropped definition is recorded in
# platform.seed_batch in the same transaction as the drop, so a run interrupted in between (or a
# --reset after it) builds them again; the primary key and the state changes' index stay (the
# batch checks use them).
DEFERRED_INDEX = "index:"  # seed_batch entity prefix: "index:" + pg_get_indexdef(...)


def _defer_transaction_indexes(conn: psycopg.Connection, run_key: str) -> None:
    with conn.transaction():
        indexes = conn.execute(
            "SELECT indexrelid::regclass::text, pg_get_indexdef(indexrelid) FROM pg_index "
            "WHERE indrelid = 'transaction'::regclass AND NOT indisprimary AND NOT indisunique"
        ).fetchall()
        for name, definition in indexes:
            # A partitioned index's definition reads "ON ONLY <table>" (the parent alone, left
            # invalid): built again it must cover every partition.
            definition = definition.replace(" ON ONLY ", " ON ", 1)
            conn.execute(
                "INSERT INTO platform.seed_batch (run_key, entity, batch, rows) "
                "VALUES (%s, %s, 0, 0)",
                (run_key, DEFERRED_INDEX + definition),
            )
            conn.execute(f"DROP INDEX {name}")


def _deferred_indexes(conn: psycopg.Connection) -> list[tuple[str, str]]:
    return conn.execute(
        "SELECT run_key, entity FROM platform.seed_batch WHERE starts_with(entity, %s)",
        (DEFERRED_INDEX,),
    ).fetchall()


def _build_deferred_index(conn: psycopg.Connection, run_key: str, entity: str) -> None:
    """Build one deferred index and forget it, in one transaction."""
    with conn.transaction():
        conn.execute(entity.removeprefix(DEFERRED_INDEX))
        conn.execute(
            "DELETE FROM platform.seed_batch WHERE run_key = %s AND entity = %s", (run_key, entity)
        )


def _restore_indexes(settings: Settings, conn: psycopg.Connection) -> None:
    """Build every index a seed deferred, two at a time: CREATE INDEX takes a SHARE lock, so
    builds on one table run side by side, one core each."""
    pending = _deferred_indexes(conn)

    def build(run_key: str, entity: str) -> None:
        with db.connect(settings, autocommit=True) as own:
            _build_deferred_index(own, run_key, entity)

    with ThreadPoolExecutor(2) as pool:
        for future in [pool.submit(build, *row) for row in pending]:
            future.result()


def _oltp_batches(data: Dataset) -> list[tuple[list[Batch], int]]:
    ent = data.entities
    loc = ent.locations
    locations = pa.table(
        {
            k: [r[i] for r in loc]
            for i, k in enumerate(
                ("id", "city", "region", "country", "countrycode", "latitude", "longitude")
            )
        }
    )
    plan: list[tuple[list[Batch], int]] = [
        (
            [
                Batch(
                    "location",
                    0,
                    locations.num_rows,
                    lambda c: db.copy_arrow(c, "location", locations),
                )
            ],
            1,
        ),
        (
            [
                Batch(
                    "merchant",
                    0,
                    ent.merchants.num_rows,
                    lambda c: db.copy_arrow(c, "merchant", ent.merchants),
                )
            ],
            1,
        ),
        (
            [
                Batch("customer", n, p.num_rows, _customer_writer(p))
                for n, p in _slices(ent.customers, CUSTOMER_BATCH)
            ],
            2,
        ),
        (
            [
                Batch(
                    "address",
                    0,
                    ent.addresses.num_rows,
                    _encrypting_writer("address", ent.addresses, "line1"),
                )
            ],
            1,
        ),
        (
            [
                Batch(
                    "device",
                    0,
                    ent.devices.num_rows,
                    lambda c: db.copy_arrow(c, "device", ent.devices),
                )
            ],
            1,
        ),
        (
            [
                Batch(
                    "paymentinstrument",
                    0,
                    ent.instruments.num_rows,
                    _encrypting_writer("paymentinstrument", ent.instruments, "pan"),
                )
            ],
            1,
        ),
    ]
    # State changes are ordered by transaction: each transaction batch takes its own history.
    change_tx = data.state_changes.column("transactionid").to_numpy()
    tx_batches = []
    for n, part in _slices(data.transactions, TX_BATCH):
        lo, hi = part.column("id")[0].as_py(), part.column("id")[-1].as_py()
        a, b = np.searchsorted(change_tx, [lo, hi + 1])
        changes = data.state_changes.slice(a, b - a)
        changes = changes.add_column(0, "id", pa.array(np.arange(a + 1, b + 1)))
        tx_batches.append(
            Batch("transaction", n, part.num_rows, _transaction_writer(part, changes))
        )
    plan.append((tx_batches, 2))
    return plan


def has_business_data(conn: psycopg.Connection) -> bool:
    return bool(
        conn.execute(
            "SELECT EXISTS (SELECT FROM Customer) OR EXISTS (SELECT FROM Merchant) "
            "OR EXISTS (SELECT FROM Transaction)"
        ).fetchone()[0]
    )


def reset(conn: psycopg.Connection, docdb: Any) -> None:
    """Empty every business table and collection (development only)."""
    with conn.transaction():
        _bulk(conn)  # the audit trail's TRUNCATE guard is a trigger, deferred here on purpose
        conn.execute(f"TRUNCATE {', '.join(OLTP_TABLES)} RESTART IDENTITY CASCADE")
        for run_key, entity in _deferred_indexes(conn):  # an interrupted seed's, on empty tables
            _build_deferred_index(conn, run_key, entity)
        conn.execute("TRUNCATE platform.seed_batch, platform.seed_run")
    for spec in load_specs():
        docdb[spec.collection].delete_many({})


def _finish(conn: psycopg.Connection, spec: SeedSpec) -> None:
    for table in (
        "location",
        "merchant",
        "customer",
        "address",
        "device",
        "paymentinstrument",
        "transaction",
        "transactionstatechanges",
    ):
        conn.execute(
            f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
            f"greatest((SELECT max(id) FROM {table}), 1))"
        )
    consent.seed_consents(conn, spec.seed)  # the synthetic customers' consents (issue 23)
    conn.execute(
        "UPDATE platform.seed_run SET finished_at = now() WHERE run_key = %s", (spec.run_key,)
    )
    conn.execute("ANALYZE")


# -- documents -------------------------------------------------------------------------------------
def _insert_documents(
    conn: psycopg.Connection,
    run_key: str,
    collection: Any,
    docs: Iterable[dict[str, Any]],
    entity: str,
    progress: Progress,
    total: int,
) -> int:
    """Insert in batches; each batch is recorded in platform.seed_batch once it is written.

    Where the application enforces the collection's validator (FerretDB), every batch is checked
    before it is sent. One writer thread sends batch k while this thread generates and checks
    batch k+1 (pymongo waits on the socket without the GIL; generation and the check are Python):
    an invalid document stops the seed before its batch is sent, once the batch in flight is
    written and recorded."""
    done = {b for e, b in _committed(conn, run_key) if e == f"doc:{entity}"}
    check = validation.enforced_by_application(collection.database)
    written = 0
    in_flight: tuple[Future[None], int, list[dict[str, Any]]] | None = None

    def write(batch: list[dict[str, Any]]) -> None:
        try:
            collection.insert_many(batch, ordered=False)
        except (BulkWriteError, DuplicateKeyError):
            # Part of this batch landed before an interruption: complete it idempotently (the
            # same documents, checked already).
            replace = [ReplaceOne({"_id": doc["_id"]}, doc, upsert=True) for doc in batch]
            ferretdb.bulk_write(collection, replace, ordered=False)

    def settle() -> None:
        """Wait for the batch in flight and record it; its write error, if any, is raised."""
        nonlocal in_flight, written
        if in_flight is None:
            return
        future, number, batch = in_flight
        in_flight = None
        future.result()
        conn.execute(
            "INSERT INTO platform.seed_batch (run_key, entity, batch, rows) VALUES (%s, %s, %s, %s)",
            (run_key, f"doc:{entity}", number, len(batch)),
        )
        written += len(batch)
        progress(entity, len(batch), total)

    it = iter(docs)
    with ThreadPoolExecutor(max_workers=1) as writer:
        try:
            for number, batch in enumerate(iter(lambda: list(islice(it, DOC_BATCH)), [])):
                if number in done:
                    progress(entity, len(batch), total)
                    continue
                if check:
                    validation.check_documents(collection.name, batch)
                settle()
                in_flight = (writer.submit(write, batch), number, batch)
        finally:
            settle()  # also when this thread stops: what was sent is recorded as written
    return written


def document_plan(data: Dataset) -> list[tuple[str, int, Callable[[], Iterable[dict[str, Any]]]]]:
    spec = data.spec
    n_tx = data.transactions.num_rows
    return [
        ("Customer", data.entities.customers.num_rows, lambda: documents.customers(data)),
        ("Merchant", data.entities.merchants.num_rows, lambda: documents.merchants(data)),
        (
            "Transaction",
            spec.cap(n_tx),
            lambda: documents.transactions(data, np.random.default_rng([spec.seed, 5])),
        ),
        (
            "CustomerReview",
            -1,
            lambda: documents.reviews(data, np.random.default_rng([spec.seed, 3])),
        ),
        (
            "UserInteractionData",
            spec.cap(round(0.2 * n_tx)),
            lambda: documents.sessions(data, np.random.default_rng([spec.seed, 4])),
        ),
        (
            "Log",
            spec.cap(spec.n_logs),
            lambda: logs.log_documents(spec, np.random.default_rng([spec.seed, 6])),
        ),
    ]


# -- the whole run ---------------------------------------------------------------------------------
def seed(
    settings: Settings,
    data: Dataset,
    docdb: Any,
    *,
    reset_first: bool = False,
    progress: Progress = lambda entity, rows, total: None,
) -> SeedReport:
    spec = data.spec
    report = SeedReport(run_key=spec.run_key)
    with db.connect(settings, autocommit=True) as conn:
        if reset_first:
            if settings.profile == "prod":
                raise SeedError("--reset is refused on the prod profile")
            reset(conn, docdb)
        oltp_started = time.monotonic()
        previous = conn.execute("SELECT run_key, spec FROM platform.seed_run").fetchall()
        if any(key != spec.run_key for key, _ in previous) or (
            not previous and has_business_data(conn)
        ):
            what = json.dumps(previous[0][1]) if previous else "rows not written by `seed`"
            raise SeedError(
                f"the database already holds other data ({what}); "
                "run `stripe-platform seed --reset` to replace it"
            )
        conn.execute(
            "INSERT INTO platform.seed_run (run_key, spec) VALUES (%s, %s) ON CONFLICT DO NOTHING",
            (spec.run_key, json.dumps(spec.model_dump(mode="json"))),
        )
        partitions.maintain(
            conn,
            today=max(spec.end, dt.date.today()),
            months_ahead=settings.partition_months_ahead,
            retention_months=settings.partition_retention_months,
            start=spec.start,
        )
        done = _committed(conn, spec.run_key)
        plan = _oltp_batches(data)
        tx_batches = plan[-1][0]
        if (
            len(tx_batches) > 1
            and not any(("transaction", b.number) in done for b in tx_batches)
            and not conn.execute("SELECT EXISTS (SELECT FROM Transaction)").fetchone()[0]
        ):
            _defer_transaction_indexes(conn, spec.run_key)
        for batches, workers in plan:
            _run_batches(settings, spec.run_key, batches, workers, done, progress, report)
        started = time.monotonic()
        _restore_indexes(settings, conn)
        if "transaction" in report.oltp:  # the index builds are part of loading the transactions
            report.oltp["transaction"].seconds += time.monotonic() - started
        _finish(conn, spec)
        report.oltp_seconds = time.monotonic() - oltp_started

        apply_specs(docdb, settings)
        fields = DocumentFields(settings)  # the catalog's protected fields, encrypted on write
        for name, total, make in document_plan(data):
            started = time.monotonic()
            docs = fields.encrypting(name, make())
            count = _insert_documents(conn, spec.run_key, docdb[name], docs, name, progress, total)
            report.documents[name] = EntityTiming(count, time.monotonic() - started)
    return report
