"""The PostgreSQL CDC path never loses a change across a slot loss, ``kill -9`` and slot sharing.

Each kill lands on an observed event, never after a delay: the sync runs in a child process
(this file run as a script) whose writer tells the parent on stdout when it reached the event
(the first durable snapshot write of an incremental stream, or the end of a snapshot before its
state is saved) and then blocks; the parent checks the child is alive, in that phase, with its new
replication slot on the server, and only then SIGKILLs it. Every test ends with the destination
equal to the source: every live row with the same values, no deleted row, no duplicate.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import psycopg
import pytest
from psycopg import sql

from stripe_platform.config import load_settings
from stripe_platform.docstore.client import connect as connect_docs
from stripe_platform.ingestion.catalog import load_catalog
from stripe_platform.ingestion.engine import Engine, follow, open_writer
from stripe_platform.ingestion.postgres import cdc
from stripe_platform.oltp import db
from stripe_platform.seed import incremental
from stripe_platform.seed.dataset import build
from stripe_platform.seed.spec import make_spec

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.filterwarnings("ignore:Arrow output on a DB-API result:UserWarning"),  # fakesnow
]

WAREHOUSE = "postgres-to-snowflake"
LAKE = "postgres-to-s3"
END = dt.date(2026, 11, 1)
# Compared with the source after every scenario: (table, columns), the first column the key.
COMPARED = (
    ("transaction", ("id", "transactionstatusid", "amount")),
    ("transactionstatechanges", ("id", "transactionid", "tostatusid")),
    ("device", ("id", "customerid", "devicetype")),
    ("customer", ("id", "preferreddevice")),
    ("merchant", ("id", "rating")),
)
_names = itertools.count()


# -- the child: one sync that stops at an event ------------------------------------------------
class _PausingWriter:
    """A raw writer that, at ``pause`` ("snapshot-write": after the first batch of an
    incremental stream is durable, snapshot or change rows; "snapshot-finish": when the
    snapshot's streams are all written, before its generation is finished and its state saved),
    prints one JSON line on stdout and blocks until the process is killed or told to go on
    (:attr:`resume`, a line on stdin), after which it no longer stops."""

    def __init__(self, writer: Any, pause: str) -> None:
        self._writer, self._pause = writer, pause
        self._lock, self.resume = threading.Lock(), threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._writer, name)

    def _stop(self, event: str, stream: str, phase: str) -> None:
        with self._lock:  # the lake writes two batches at once: one line only
            if self.resume.is_set():
                return
            print(json.dumps({"event": event, "stream": stream, "phase": phase}), flush=True)
        self.resume.wait()

    def write(self, stream: Any, batch: Any, **kwargs: Any) -> Any:
        result = self._writer.write(stream, batch, **kwargs)
        if self._pause == "snapshot-write" and stream.cdc is not None:
            # Change rows carry a deletion column; snapshot rows do not.
            phase = "change" if "_ab_cdc_deleted_at" in batch.column_names else "snapshot"
            self._stop("snapshot-write", stream.name, phase)
        return result

    def finish_overwrite(self, stream: Any, generation_id: int, state: Any) -> Any:
        if self._pause == "snapshot-finish" and stream.cdc is not None:
            self._stop("snapshot-finish", stream.name, "snapshot")
        return self._writer.finish_overwrite(stream, generation_id, state)


def _open_destination(spec: dict[str, Any], settings: Any, catalog: Any) -> Any:
    kind = spec["kind"]
    if kind == "duckdb":
        from stripe_platform.warehouse.duckdb import DuckDBRaw

        return DuckDBRaw(duckdb.connect(spec["path"]))
    if kind == "postgres":
        from stripe_platform.warehouse.postgres import PostgresRaw

        dsn = db.conninfo(settings, database=spec["database"], with_key=False)
        return PostgresRaw(psycopg.connect(dsn, autocommit=True))
    if kind == "snowflake":
        import snowflake.connector

        from stripe_platform.warehouse.snowflake import SnowflakeRaw

        # qmark: fakesnow reads a client-interpolated `$date` (Mongo state) as a variable.
        conn = snowflake.connector.connect(**spec["params"], paramstyle="qmark")
        return SnowflakeRaw(conn, database=spec["params"]["database"])
    assert kind == "lake", kind
    return open_writer(settings.model_copy(update={"lake_uri": spec["uri"]}), catalog.resolve(LAKE))


def _close_destination(writer: Any) -> None:
    conn = getattr(writer, "conn", None)
    if conn is not None:
        conn.close()


def _child(spec_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    settings = load_settings(**spec["settings"])
    catalog = load_catalog()
    writer = _PausingWriter(
        _open_destination(spec["destination"], settings, catalog), spec["pause"]
    )

    def watch_parent() -> None:
        for _ in sys.stdin:  # a line: go on past the pause
            writer.resume.set()
        os._exit(3)  # the parent holds our stdin: if it dies, stop too, rather than hold the slot

    threading.Thread(target=watch_parent, daemon=True).start()
    report = Engine(settings, catalog.resolve(spec["connection"]), writer).sync()
    print(json.dumps({"event": "done", "phase": report.phase}), flush=True)


# -- the parent --------------------------------------------------------------------------------
class Destination:
    """One destination of a connection: opened in this process for clean syncs and reads, and
    described (``spec``) for a child process to open the same."""

    def __init__(self, spec: dict[str, Any], connection: str, settings: Any) -> None:
        self.spec, self.connection, self.settings = spec, connection, settings

    def sync(self, catalog: Any) -> Any:
        writer = _open_destination(self.spec, self.settings, catalog)
        try:
            return Engine(self.settings, catalog.resolve(self.connection), writer).sync()
        finally:
            _close_destination(writer)  # DuckDB: one process at a time holds the file

    def state(self, catalog: Any) -> dict[str, Any] | None:
        writer = _open_destination(self.spec, self.settings, catalog)
        try:
            return writer.load_state(f"connection:{self.connection}")
        finally:
            _close_destination(writer)

    def live(self, table: str, columns: tuple[str, ...]) -> list[tuple[Any, ...]]:
        """The destination's live rows (one per key, deletions dropped), as a reader sees them."""
        kind, cols = self.spec["kind"], ", ".join(columns)
        where = "WHERE _ab_cdc_deleted_at IS NULL"
        if kind == "duckdb":
            with duckdb.connect(self.spec["path"], read_only=True) as conn:
                rows = conn.execute(f"SELECT {cols} FROM raw.postgres_{table} {where}").fetchall()
        elif kind == "postgres":
            dsn = db.conninfo(self.settings, database=self.spec["database"], with_key=False)
            with psycopg.connect(dsn) as conn:
                rows = conn.execute(f"SELECT {cols} FROM raw.postgres_{table} {where}").fetchall()
        elif kind == "snowflake":
            import snowflake.connector

            with snowflake.connector.connect(**self.spec["params"]) as conn:
                rows = [
                    tuple(r)
                    for r in conn.cursor()
                    .execute(f"SELECT {cols.upper()} FROM RAW.POSTGRES_{table.upper()} {where}")
                    .fetchall()
                ]
        else:
            # The lake appends: the latest version of each key (by LSN) unless it is a deletion,
            # read from the live prefix (raw/), which holds the live generation and its changes.
            glob = f"{self.spec['uri']}/raw/postgres/{table}/extracted_date=*/*.parquet"
            key = columns[0]
            rows = (
                duckdb.connect()
                .execute(
                    f"SELECT {cols} FROM read_parquet('{glob}', hive_partitioning = true, "
                    f"union_by_name = true) QUALIFY row_number() OVER (PARTITION BY {key} "
                    f"ORDER BY _ab_cdc_lsn DESC) = 1 AND _ab_cdc_deleted_at IS NULL"
                )
                .fetchall()
            )
        return sorted((tuple(_plain(v) for v in r) for r in rows), key=lambda r: r[0])


def _plain(value: Any) -> Any:
    """Numbers compared by value whatever the engine's type (DECIMAL(38,9), NUMBER, numeric)."""
    if isinstance(value, Decimal | float):
        return Decimal(str(value)).quantize(Decimal("0.0001"))
    return value


def source_rows(s: Any, table: str, columns: tuple[str, ...]) -> list[tuple[Any, ...]]:
    with db.connect(s) as conn:
        rows = conn.execute(f"SELECT {', '.join(columns)} FROM {table}").fetchall()
    return sorted((tuple(_plain(v) for v in r) for r in rows), key=lambda r: r[0])


def assert_equal_to_source(s: Any, destination: Destination) -> None:
    for table, columns in COMPARED:
        expected = source_rows(s, table, columns)
        got = destination.live(table, columns)
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        assert (missing, extra, len(got)) == ([], [], len(expected)), (
            f"{destination.spec['kind']} {table}: {len(missing)} source rows missing or "
            f"different (first {missing[:3]}), {len(extra)} rows the source does not have "
            f"(first {extra[:3]}), {len(got)} rows for {len(expected)}"
        )


def write_at_source(s: Any, seed: int) -> None:
    """Inserts, updates and deletes, as the payments API would make them: new payments with their
    state changes, refunds, a device registered and one removed, preferences changed (the load
    generator's own step, three days of activity at once), plus merchant ratings and removed
    devices."""
    docs = connect_docs(s)
    try:
        incremental.run(s, docs, seed=seed, minutes=3 * 1440)
    finally:
        docs.client.close()
    with db.connect(s, autocommit=True) as conn:
        conn.execute(
            "UPDATE Merchant SET Rating = ((ID * %s) %% 50) / 10.0 WHERE ID %% 3 = %s",
            (seed, seed % 3),
        )
        removed = conn.execute(
            "DELETE FROM Device WHERE ID IN (SELECT d.ID FROM Device d WHERE NOT EXISTS "
            "(SELECT FROM Transaction t WHERE t.DeviceID = d.ID) ORDER BY d.ID LIMIT 3) "
            "RETURNING ID"
        ).fetchall()
        assert removed, "no device to delete: the scenario would not test deletions"


@pytest.fixture
def source(settings, database, docdb, seed_templates):
    """A seeded source database and document database (the test's own, on the session's
    servers); its connections' slots are dropped afterwards."""
    s = settings.model_copy(update={"pg_database": database, "mongodb_database": docdb.name})
    seed_templates.seed(s, build(make_spec(scale=0.003, seed=4, end=END, max_documents=100)), docdb)
    yield s
    catalog = load_catalog()
    with db.connect(s, autocommit=True) as conn:
        for connection in (WAREHOUSE, LAKE):
            drop_slot(conn, catalog.resolve(connection).slot(conn.info.dbname))


@pytest.fixture
def make_destination(source, settings, tmp_path, request):
    """Destination factory by kind: DuckDB and the lake in tmp_path, PostgreSQL raw in a
    database of its own, Snowflake raw in a database of its own on the session's fakesnow."""
    made: list[str] = []

    def make(kind: str) -> Destination:
        n = next(_names)
        if kind == "duckdb":
            spec: dict[str, Any] = {"kind": kind, "path": str(tmp_path / f"w{n}.duckdb")}
        elif kind == "postgres":
            name = f"{source.pg_database}_wh{n}"
            with db.connect(settings, database="postgres", autocommit=True) as conn:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            made.append(name)
            spec = {"kind": kind, "database": name}
        elif kind == "snowflake":
            server = request.getfixturevalue("snowflake_server")
            timeouts = {"login_timeout": 10, "network_timeout": 30, "socket_timeout": 30}
            database = f"CRASH_{os.getpid()}_{n}"
            # A current schema for every session: fakesnow's MERGE fails in a session without
            # one once another session created the tables (HTTP 500, retried until timeout).
            params = {**server, **timeouts, "database": database, "schema": "RAW"}
            spec = {"kind": kind, "params": params}
        else:
            spec = {"kind": "lake", "uri": str(tmp_path / f"lake{n}")}
        return Destination(spec, LAKE if kind == "lake" else WAREHOUSE, source)

    yield make
    with db.connect(settings, database="postgres", autocommit=True) as conn:
        for name in made:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


class PausedSync:
    """A sync in a child process, stopped at ``pause``; :meth:`kill` sends it SIGKILL."""

    def __init__(self, destination: Destination, pause: str, tmp: Path) -> None:
        n = next(_names)
        spec_file, self.stderr_path = tmp / f"child{n}.json", tmp / f"child{n}.err"
        settings = destination.settings.model_dump(
            mode="json",
            include={"home", "pg_fsync", "profile", "pg_database", "mongodb_database"},
        )
        spec_file.write_text(
            json.dumps(
                {
                    "settings": settings,
                    "destination": destination.spec,
                    "connection": destination.connection,
                    "pause": pause,
                }
            )
        )
        with open(self.stderr_path, "w") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, __file__, str(spec_file)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # blocks until the child reaches the event, or ends
        assert line, f"the child ended before {pause}: {self.stderr_path.read_text()[-3000:]}"
        self.event = json.loads(line)

    def resume(self) -> dict[str, Any]:
        """Let the child go on past its pause; returns its last line (``done`` and its phase)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"the child failed after its pause: {self.stderr_path.read_text()[-3000:]}"
        return json.loads(line)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(timeout=60) == -signal.SIGKILL

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def drop_slot(conn: psycopg.Connection, slot: str) -> None:
    """Drop a slot once a killed or closed holder has let it go (it retains WAL otherwise)."""
    cdc.slot_info_when_free(conn, slot)
    cdc.drop_slot(conn, slot)


def wal_insert_lsn(s: Any) -> int:
    with db.connect(s) as conn:
        return conn.execute("SELECT (pg_current_wal_insert_lsn() - '0/0')::int8").fetchone()[0]


def slot_of(s: Any, connection: str) -> cdc.SlotInfo | None:
    with db.connect(s, autocommit=True) as conn:
        return cdc.slot_info(conn, load_catalog().resolve(connection).slot(conn.info.dbname))


def kill_inside_the_window(
    source: Any, destination: Destination, pause: str, tmp: Path
) -> dict[str, Any]:
    """Slot dropped (as a DBA, max_slot_wal_keep_size or a failover would) after rows were
    written, then a sync killed at ``pause``, after it created the new slot and before it saved
    the state that names it. Returns the event the child stopped at."""
    with db.connect(source, autocommit=True) as conn:
        dropped = cdc.drop_slot(
            conn, load_catalog().resolve(destination.connection).slot(conn.info.dbname)
        )
    assert dropped
    before = wal_insert_lsn(source)
    child = PausedSync(destination, pause, tmp)
    try:
        assert child.event == {"event": pause, "stream": child.event["stream"], "phase": "snapshot"}
        assert child.proc.poll() is None, "the child must still be inside the window"
        new = slot_of(source, destination.connection)
        # The new slot exists, and starts past every position written before the sync began.
        assert new is not None and new.confirmed_flush_lsn > before
        child.kill()
    finally:
        child.close()
    return child.event


# -- the kill window, every destination --------------------------------------------------------
@pytest.mark.parametrize(
    ("kind", "pause"),
    [
        ("duckdb", "snapshot-write"),
        ("duckdb", "snapshot-finish"),
        ("postgres", "snapshot-write"),
        ("snowflake", "snapshot-write"),
        ("lake", "snapshot-write"),
    ],
)
def test_a_sync_killed_between_the_new_slot_and_its_state_loses_nothing(
    source, make_destination, tmp_path, kind, pause
):
    catalog = load_catalog()
    destination = make_destination(kind)
    assert destination.sync(catalog).phase == "snapshot"
    write_at_source(source, seed=1)  # the gap: in no snapshot yet, and in no slot once dropped
    kill_inside_the_window(source, destination, pause, tmp_path)
    write_at_source(source, seed=2)

    after = destination.sync(catalog)
    assert after.phase == "snapshot", after.as_dict()
    assert "did not finish" in after.snapshot_reason
    again = destination.sync(catalog)
    assert (again.phase, again.snapshot_reason) == ("incremental", None)
    assert_equal_to_source(source, destination)


def test_a_first_sync_killed_mid_snapshot_starts_over_from_the_cli(
    source, make_destination, tmp_path
):
    """The first snapshot of a destination killed after a batch was durable; the next run (the
    command line, as a user would) says why it takes a new snapshot and ends equal to the
    source."""
    destination = make_destination("duckdb")
    child = PausedSync(destination, "snapshot-write", tmp_path)
    try:
        assert child.event["phase"] == "snapshot" and child.proc.poll() is None
        assert slot_of(source, WAREHOUSE) is not None
        child.kill()
    finally:
        child.close()
    write_at_source(source, seed=3)
    env = {
        **os.environ,
        "STRIPE_PLATFORM_HOME": str(source.home_dir),
        "STRIPE_PLATFORM_PG_DATABASE": source.pg_database,
        "STRIPE_PLATFORM_MONGODB_DATABASE": source.mongodb_database,
        "STRIPE_PLATFORM_WAREHOUSE": "duckdb",
        "STRIPE_PLATFORM_WAREHOUSE_PATH": destination.spec["path"],
    }
    done = subprocess.run(
        [sys.executable, "-m", "stripe_platform.cli", "sync", WAREHOUSE, "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["phase"] == "snapshot"
    assert "did not finish" in report["snapshot_reason"]
    assert "taking a new snapshot: the previous snapshot" in done.stderr  # the warning
    assert_equal_to_source(source, destination)


# -- one slot, two destinations, no kill -------------------------------------------------------
def test_a_sync_to_another_lake_does_not_make_the_first_lose_changes(source, make_destination):
    """The slot is per connection and database, the state per destination: a sync of the same
    connection to another lake re-creates the slot the first lake's state resumed from. The first
    lake must notice and take a new snapshot rather than resume past the changes in between."""
    catalog = load_catalog()
    default, other = make_destination("lake"), make_destination("lake")
    assert default.sync(catalog).phase == "snapshot"
    write_at_source(source, seed=4)
    taken = other.sync(catalog)
    assert taken.phase == "snapshot"
    assert "exists without a state here" in taken.snapshot_reason
    write_at_source(source, seed=5)
    back = default.sync(catalog)
    assert back.phase == "snapshot", back.as_dict()
    assert "re-created past this destination's position" in back.snapshot_reason
    assert_equal_to_source(source, default)
    assert default.sync(catalog).phase == "incremental"


# -- the source's identity: positions compare only within one server history -----------------
def server_identity(s: Any) -> tuple[str, int]:
    """The cluster's system id and timeline from its control file, as SQL reads them: not the
    replication protocol's IDENTIFY_SYSTEM the engine uses."""
    with db.connect(s) as conn:
        (system_id,) = conn.execute("SELECT system_identifier FROM pg_control_system()").fetchone()
        (timeline,) = conn.execute("SELECT timeline_id FROM pg_control_checkpoint()").fetchone()
    return str(system_id), timeline


def save_state(destination: Destination, catalog: Any, state: dict[str, Any]) -> None:
    writer = _open_destination(destination.spec, destination.settings, catalog)
    try:
        writer.save_state(f"connection:{destination.connection}", state)
    finally:
        _close_destination(writer)


def test_a_snapshot_records_the_source_system_and_timeline(source, make_destination):
    catalog = load_catalog()
    destination = make_destination("duckdb")
    assert destination.sync(catalog).phase == "snapshot"
    state = destination.state(catalog)
    system_id, timeline = server_identity(source)
    assert (state["system_id"], state["timeline"]) == (system_id, timeline)
    assert destination.sync(catalog).phase == "incremental"


def test_a_state_from_another_postgresql_system_takes_a_new_snapshot(source, make_destination):
    """A restore or migration to another cluster: a slot there, created between the state's
    snapshot and saved positions, would pass the position checks, so the system id decides."""
    catalog = load_catalog()
    destination = make_destination("duckdb")
    assert destination.sync(catalog).phase == "snapshot"
    state = destination.state(catalog)
    system_id, _ = server_identity(source)
    elsewhere = str(int(system_id) + 1)
    save_state(destination, catalog, {**state, "system_id": elsewhere})
    write_at_source(source, seed=4)
    report = destination.sync(catalog)
    assert report.phase == "snapshot", report.as_dict()
    assert report.snapshot_reason.startswith(
        f"the source is another PostgreSQL system (system id {system_id}, the state's "
        f"{elsewhere}): restored or migrated"
    )
    assert_equal_to_source(source, destination)
    assert destination.state(catalog)["system_id"] == system_id
    assert destination.sync(catalog).phase == "incremental"


def test_a_state_from_a_different_timeline_takes_a_new_snapshot(source, make_destination):
    catalog = load_catalog()
    destination = make_destination("duckdb")
    assert destination.sync(catalog).phase == "snapshot"
    state = destination.state(catalog)
    _, timeline = server_identity(source)
    save_state(destination, catalog, {**state, "timeline": timeline + 1})
    report = destination.sync(catalog)
    assert report.phase == "snapshot", report.as_dict()
    assert report.snapshot_reason.startswith(
        f"the source's timeline changed (failover or point-in-time recovery: timeline "
        f"{timeline}, the state's {timeline + 1})"
    )
    assert destination.state(catalog)["timeline"] == timeline


def test_a_state_saved_before_identities_were_recorded_still_resumes(source, make_destination):
    """No forced new snapshot for existing users: the identity is recorded at the next complete
    snapshot only."""
    catalog = load_catalog()
    destination = make_destination("duckdb")
    assert destination.sync(catalog).phase == "snapshot"
    state = destination.state(catalog)
    older = {k: v for k, v in state.items() if k not in ("system_id", "timeline")}
    assert len(older) == len(state) - 2
    save_state(destination, catalog, older)
    write_at_source(source, seed=4)
    report = destination.sync(catalog)
    assert (report.phase, report.snapshot_reason) == ("incremental", None), report.as_dict()
    assert report.rows > 0
    assert_equal_to_source(source, destination)
    assert "system_id" not in destination.state(catalog)


def test_following_notices_its_slot_created_again(source, make_destination):
    """engine.follow checks the slot after every read: a slot dropped and created again (by a
    DBA, a failover, or a sync that does not take the connection's run lock) while the follower
    writes a batch (after its read, before its next one) makes the follower take a new
    snapshot, not read on from the new slot past the changes committed in between."""
    from stripe_platform.warehouse.duckdb import DuckDBRaw

    catalog = load_catalog()
    followed = make_destination("duckdb")
    raw = DuckDBRaw(duckdb.connect(followed.spec["path"]))
    real_write, armed, blocked, release = (
        raw.write,
        threading.Event(),
        threading.Event(),
        threading.Event(),
    )

    def write(stream, batch, **kwargs):
        if (
            armed.is_set()
            and stream.name == "postgres_device"
            and "_ab_cdc_deleted_at" in (batch.column_names)
        ):
            armed.clear()
            blocked.set()  # the follower read the changes and is writing them
            release.wait()
        return real_write(stream, batch, **kwargs)

    raw.write = write
    stop, out = threading.Event(), {}

    def run():
        try:
            out["report"] = follow(source, catalog.resolve(WAREHOUSE), stop, 0.05, writer=raw)
        except BaseException as exc:  # re-raised below
            out["error"] = exc

    reader = raw.conn.cursor()  # DuckDB: a cursor per thread

    def wait_for(query, expected):
        for _ in range(1200):  # up to ~60 s, until the follower's commit shows it
            try:
                if "error" in out or reader.execute(query).fetchall() == expected:
                    break
            except duckdb.CatalogException:  # the first sync has not made the table yet
                pass
            time.sleep(0.05)
        assert "error" not in out, out["error"]
        assert reader.execute(query).fetchall() == expected

    merchants = source_rows(source, "merchant", ("id",))
    thread = threading.Thread(target=run)
    thread.start()
    try:
        wait_for("SELECT count(*) FROM raw.postgres_merchant", [(len(merchants),)])
        armed.set()
        with db.connect(source, autocommit=True) as conn:
            conn.execute("UPDATE Merchant SET Rating = 0.1 WHERE ID = %s", (merchants[0][0],))
            conn.execute(
                "DELETE FROM Device WHERE ID = (SELECT min(d.ID) FROM Device d WHERE NOT EXISTS "
                "(SELECT FROM Transaction t WHERE t.DeviceID = d.ID))"
            )
        assert blocked.wait(60), "the follower never wrote the device change"
        write_at_source(source, seed=6)  # after the follower's read: in no batch of it yet
        resolved = catalog.resolve(WAREHOUSE)
        with db.connect(source, autocommit=True) as conn:  # a new slot past those changes
            slot = resolved.slot(conn.info.dbname)
            assert cdc.drop_slot(conn, slot)
        conninfo = db.conninfo(source, with_key=False)
        tables = [s.name for s in resolved.incremental]
        with cdc.consistent_snapshot(conninfo, slot, resolved.publication, tables):
            pass
        release.set()
        count = source_rows(source, "transaction", ("count(*)",))
        wait_for(
            "SELECT count(*) FROM raw.postgres_transaction WHERE _ab_cdc_deleted_at IS NULL", count
        )
    finally:
        release.set()
        stop.set()
        thread.join(timeout=120)
    assert not thread.is_alive()
    assert "error" not in out, out["error"]
    report = out["report"]
    assert "re-created past this destination's position" in report.snapshot_reason
    reader.close()
    raw.conn.close()
    assert_equal_to_source(source, followed)


# -- one run of a connection at a time ----------------------------------------------------------
def run_lock_waiters(s: Any, connection: str) -> int:
    """Sessions waiting for the connection's run lock: the documented advisory lock key,
    hashtextextended('stripe_platform:' || slot, 0), split as pg_locks shows a bigint key."""
    with db.connect(s, autocommit=True) as conn:
        slot = load_catalog().resolve(connection).slot(conn.info.dbname)
        return conn.execute(
            """SELECT count(*) FROM pg_locks l, hashtextextended(%s, 0) AS k(key)
               WHERE l.locktype = 'advisory' AND NOT l.granted
                 AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                 AND l.classid::int8 = (k.key >> 32) & 4294967295
                 AND l.objid::int8 = k.key & 4294967295 AND l.objsubid = 1""",
            (f"stripe_platform:{slot}",),
        ).fetchone()[0]


@pytest.mark.parametrize("first_ends", ["done", "killed"])
def test_a_second_sync_of_a_connection_waits_for_the_first(
    source, make_destination, tmp_path, caplog, first_ends
):
    """Two syncs of one connection at once (the 5-minute CDC DAG and the 03:00 DAG, or a DAG
    beside `sync --follow`): the second waits for the first's run lock, then resumes where the
    first left the slot: no new snapshot, nothing lost. Killed (-9) instead of ending, the first
    releases the lock with its process. Without the lock the second loads the state, the first
    moves the slot past it, and the second takes the moved slot for a re-created one."""
    catalog = load_catalog()
    destination = make_destination("postgres")  # one database, written by both processes
    assert destination.sync(catalog).phase == "snapshot"
    write_at_source(source, seed=7)
    first = PausedSync(destination, "snapshot-write", tmp_path)
    loaded, first_over, out = threading.Event(), threading.Event(), {}

    def second() -> None:
        writer = _open_destination(destination.spec, source, catalog)
        load = writer.load_state

        def load_state(key: str) -> Any:
            state = load(key)
            loaded.set()
            first_over.wait(120)  # reads the slot only once the first run is over
            return state

        writer.load_state = load_state
        try:
            out["report"] = Engine(source, catalog.resolve(WAREHOUSE), writer).sync()
        except BaseException as exc:  # re-raised below
            out["error"] = exc
        finally:
            _close_destination(writer)

    thread = threading.Thread(target=second)
    try:
        # The first is reading changes (its slot read, its batch not yet saved), lock held.
        assert first.event["phase"] == "change" and first.proc.poll() is None
        thread.start()
        for _ in range(2400):  # until the second is seen waiting (or, with no lock, reading)
            if loaded.is_set() or "error" in out or run_lock_waiters(source, WAREHOUSE):
                break
            time.sleep(0.05)
        waited = not loaded.is_set() and run_lock_waiters(source, WAREHOUSE) == 1
        if first_ends == "done":
            assert first.resume() == {"event": "done", "phase": "incremental"}
            assert first.proc.wait(timeout=60) == 0
        else:
            first.kill()
        first_over.set()
        thread.join(timeout=180)
    finally:
        first_over.set()
        first.close()
    assert not thread.is_alive()
    assert "error" not in out, out["error"]
    report = out["report"]
    assert (report.phase, report.snapshot_reason) == ("incremental", None), report.as_dict()
    assert waited, "the second sync did not wait for the first"
    assert f"connection {WAREHOUSE}: waiting up to" in caplog.text
    assert_equal_to_source(source, destination)


def test_a_sync_waiting_too_long_for_another_run_names_it(source, make_destination, monkeypatch):
    """The wait is bounded: past it, a clear error naming the connection and the server process
    holding the lock, and nothing touched (no slot, no state)."""
    from stripe_platform.ingestion.engine import SyncError
    from stripe_platform.ingestion.engine import sync as engine_sync

    monkeypatch.setattr(engine_sync, "RUN_LOCK_TIMEOUT", 0.5)
    catalog = load_catalog()
    destination = make_destination("duckdb")
    with db.connect(source, autocommit=True, application_name="nightly backfill") as holder:
        slot = catalog.resolve(WAREHOUSE).slot(holder.info.dbname)
        holder.execute(
            "SELECT pg_advisory_lock(hashtextextended(%s, 0))", (f"stripe_platform:{slot}",)
        )
        with pytest.raises(SyncError) as raised:
            destination.sync(catalog)
        message = str(raised.value)
        assert message.startswith(f"connection {WAREHOUSE}: another run of it still runs after")
        assert f"PID {holder.info.backend_pid}, nightly backfill" in message
        assert "sync --follow" in message
    assert slot_of(source, WAREHOUSE) is None
    assert destination.state(catalog) is None
    assert destination.sync(catalog).phase == "snapshot"  # the holder gone, the sync runs


# -- what the resume check stands on -----------------------------------------------------------
def test_a_slot_created_again_starts_past_every_earlier_position(source):
    """The server's side of the resume check: a logical slot dropped and created again under
    its name starts (confirmed_flush_lsn, its consistent point) past every position flushed
    before, because creating it writes new WAL (a running-transactions record)."""
    conninfo = db.conninfo(source, with_key=False)
    slot = f"crash_check_{os.getpid()}_{next(_names)}"
    with db.connect(source, autocommit=True) as conn:
        try:
            with cdc.consistent_snapshot(conninfo, slot, "stripe_cdc_check", ["merchant"]) as snap:
                first = snap.lsn
            conn.execute("SET synchronous_commit = on")
            conn.execute("UPDATE Merchant SET Rating = 1.0 WHERE ID = 1")
            flushed = conn.execute("SELECT (pg_current_wal_flush_lsn() - '0/0')::int8").fetchone()[
                0
            ]
            assert cdc.advance(conn, slot, flushed) == flushed  # as a sync that read it all
            assert cdc.slot_info_when_free(conn, slot).confirmed_flush_lsn == flushed >= first
            cdc.drop_slot(conn, slot)
            with cdc.consistent_snapshot(conninfo, slot, "stripe_cdc_check", ["merchant"]) as snap:
                again = snap.lsn
            assert again > flushed
            assert cdc.slot_info_when_free(conn, slot).confirmed_flush_lsn == again
        finally:
            drop_slot(conn, slot)
            conn.execute("DROP PUBLICATION IF EXISTS stripe_cdc_check")


def test_a_slot_held_by_another_session_is_waited_for_then_refused(source):
    """A sync killed mid-read leaves its slot held until the server notices (a peek runs to its
    end): the next sync waits for it, and refuses a slot another session keeps holding."""
    conninfo = db.conninfo(source, with_key=False)
    slot = f"crash_held_{os.getpid()}_{next(_names)}"
    with db.connect(source, autocommit=True) as conn:
        with cdc.consistent_snapshot(conninfo, slot, "stripe_cdc_check", ["merchant"]):
            pass
        # A replication connection streaming from the slot holds it until it closes.
        repl = cdc._replication_connect(conninfo, slot)
        try:
            started = repl.exec_(
                f"START_REPLICATION SLOT {slot} LOGICAL 0/0 (proto_version '1', "
                "publication_names 'stripe_cdc_check')".encode()
            )
            assert started.status == psycopg.pq.ExecStatus.COPY_BOTH
            with pytest.raises(cdc.SlotInUseError, match="another sync of this connection"):
                cdc.slot_info_when_free(conn, slot, timeout=0.2)
            repl.finish()
            info = cdc.slot_info_when_free(conn, slot)
            assert info is not None and info.active_pid is None
        finally:
            repl.finish()
            drop_slot(conn, slot)
            conn.execute("DROP PUBLICATION IF EXISTS stripe_cdc_check")


if __name__ == "__main__":  # the child process of PausedSync
    _child(sys.argv[1])
