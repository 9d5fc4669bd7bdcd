"""The raw-layer contract (``stripe_platform.rawlayer``), held by every raw writer: DuckDB,
PostgreSQL (the session's cluster, a database per test), Snowflake (the session's fakesnow server,
a database per test) and the lake (a local directory).

Each contract test runs once per writer (the ``backend`` fixture). What differs between writers is
how they are read back and how a failed write is provoked, in the ``Backend`` classes below; what
only one writer does is tested in tests/test_duckdb_raw.py, test_postgres_raw.py,
test_snowflake_raw.py and test_lake.py. The lake is read as docs/ingestion.md tells its readers:
the stream's live prefix through DuckDB's glob, the latest version of each key by
``_airbyte_generation_id``, then ``_ab_cdc_lsn``, then ``_airbyte_extracted_at`` (tombstones kept, as the raw tables keep them). Where the lake
legitimately differs (append-only parquet files carry their own columns and types: nothing to
add, widen or refuse, and its JSON is text), the test says so.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, ClassVar

import duckdb
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from psycopg.types.string import TextLoader

from raw_streams import MERCHANT, batch
from stripe_platform import rawlayer
from stripe_platform.lake.target import LakeRaw
from stripe_platform.lake.writer import LakeWriter
from stripe_platform.oltp.db import conninfo
from stripe_platform.rawlayer import Column, RawStream, RawWriter, SchemaChangeError
from stripe_platform.warehouse.duckdb import DuckDBRaw
from stripe_platform.warehouse.postgres import PostgresRaw

pytestmark = [
    pytest.mark.timeout(60),
    # fakesnow's own server code, not ours.
    pytest.mark.filterwarnings("ignore:Arrow output on a DB-API result:UserWarning"),
]

_snowflake_databases = itertools.count()


def json_value(text: str | None) -> Any:
    return None if text is None else json.loads(text)


# -- the writers -------------------------------------------------------------------------------------
class Backend:
    """One writer, and how a test reads back what it wrote."""

    writer: RawWriter
    # Tables with declared column types: new columns are added and reported, incompatible changes
    # and a changed primary key refused, JSON columns typed. The lake's files carry their own.
    typed = True
    # What a widening of ``amount`` integer -> number and ``note`` string -> json leaves.
    widened: ClassVar[dict[str, str]]

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        """The result of ``sql``, JSON values as their text."""
        raise NotImplementedError

    def column_types(self, namespace: str, name: str) -> dict[str, str]:
        """Column name (lower case) -> the destination's data type."""
        raise NotImplementedError

    def break_next_write(self, monkeypatch: pytest.MonkeyPatch) -> AbstractContextManager[Any]:
        """Make the next write of MERCHANT fail part way; returns the ``pytest.raises`` for it."""
        raise NotImplementedError

    def nothing_left_behind(self) -> None:
        """After a failed write: no staging table or temporary file is left."""

    def next_writer(self) -> RawWriter:
        """A new writer on the same store, as the next sync opens it."""
        raise NotImplementedError


class DuckDBBackend(Backend):
    widened: ClassVar[dict[str, str]] = {"amount": "DOUBLE", "note": "JSON"}

    def __init__(self, path: Path) -> None:
        self.conn = duckdb.connect(str(path))
        self.writer = DuckDBRaw(self.conn)

    def next_writer(self) -> RawWriter:
        return DuckDBRaw(self.conn)

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        return self.conn.execute(sql).fetchall()

    def column_types(self, namespace: str, name: str) -> dict[str, str]:
        return dict(
            self.rows(
                "SELECT column_name, data_type FROM information_schema.columns "
                f"WHERE table_schema = '{namespace}' AND table_name = '{name}'"
            )
        )

    def break_next_write(self, monkeypatch: pytest.MonkeyPatch) -> AbstractContextManager[Any]:
        # The batch's two rows share a name: the merge fails once the batch is staged.
        self.conn.execute("CREATE UNIQUE INDEX merchant_name ON raw_postgres.merchant (name)")
        return pytest.raises(duckdb.ConstraintException)


class PostgresBackend(Backend):
    widened: ClassVar[dict[str, str]] = {"amount": "double precision", "note": "jsonb"}

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn
        self.writer = PostgresRaw(conn)

    def next_writer(self) -> RawWriter:
        return PostgresRaw(self.conn)

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        with self.conn.cursor() as cur:
            cur.adapters.register_loader("jsonb", TextLoader)  # this cursor only: JSON as text
            return cur.execute(sql).fetchall()  # type: ignore[arg-type]

    def column_types(self, namespace: str, name: str) -> dict[str, str]:
        return dict(
            self.rows(
                "SELECT column_name, data_type FROM information_schema.columns "
                f"WHERE table_schema = '{namespace}' AND table_name = '{name}'"
            )
        )

    def break_next_write(self, monkeypatch: pytest.MonkeyPatch) -> AbstractContextManager[Any]:
        # The batch's two rows share a name: the merge fails once the batch is copied in.
        self.conn.execute("CREATE UNIQUE INDEX merchant_name ON raw_postgres.merchant (name)")
        return pytest.raises(psycopg.errors.UniqueViolation)

    def nothing_left_behind(self) -> None:
        assert self.rows("SELECT count(*) FROM pg_class WHERE relpersistence = 't'") == [(0,)]


class SnowflakeBackend(Backend):
    widened: ClassVar[dict[str, str]] = {"amount": "FLOAT", "note": "VARIANT"}

    def __init__(self, server: dict[str, Any]) -> None:
        import snowflake.connector

        from stripe_platform.warehouse.snowflake import SnowflakeRaw

        # fakesnow answers an unhandled error with HTTP 500, which the connector retries until
        # network_timeout: short timeouts. A database of its own: the server's store is shared.
        self.conn = snowflake.connector.connect(
            **{
                **server,
                "database": f"RAW_CONTRACT_{next(_snowflake_databases)}",
                "login_timeout": 10,
                "network_timeout": 10,
                "socket_timeout": 10,
            }
        )
        self.writer = SnowflakeRaw(self.conn)

    def next_writer(self) -> RawWriter:
        from stripe_platform.warehouse.snowflake import SnowflakeRaw

        return SnowflakeRaw(self.conn)

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        # Unquoted names: Snowflake folds them to the upper-case identifiers the writer created.
        with self.conn.cursor() as cur:
            return [tuple(r) for r in cur.execute(sql).fetchall()]

    def column_types(self, namespace: str, name: str) -> dict[str, str]:
        found = self.rows(
            "SELECT column_name, data_type FROM information_schema.columns "
            f"WHERE table_schema = '{namespace.upper()}' AND table_name = '{name.upper()}'"
        )
        return {column.lower(): kind for column, kind in found}

    def break_next_write(self, monkeypatch: pytest.MonkeyPatch) -> AbstractContextManager[Any]:
        from snowflake.connector.errors import ProgrammingError

        # Snowflake enforces no unique index, so fail the statement after the data instead: the
        # batch's rows are already in the table (this session sees them) when the state write fails.
        def failing_state(stream: RawStream, state: dict[str, Any]) -> None:
            assert self.rows("SELECT count(*) FROM raw_postgres.merchant") == [(3,)]
            self.rows("UPDATE airbyte_internal.no_such_table SET state = NULL")

        monkeypatch.setattr(self.writer, "_update_state", failing_state)
        return pytest.raises(ProgrammingError, match="NO_SUCH_TABLE")

    def nothing_left_behind(self) -> None:
        # The staging table went with the failed batch.
        assert self.rows(
            "SELECT table_name FROM information_schema.tables "
            "WHERE table_schema = 'AIRBYTE_INTERNAL'"
        ) == [("STRIPE_PLATFORM_SYNC_STATE",)]

    def close(self) -> None:
        self.conn.close()


class LakeBackend(Backend):
    typed = False
    # Each file keeps the types it was written with; DuckDB's union_by_name reads the common one.
    widened: ClassVar[dict[str, str]] = {"amount": "DOUBLE", "note": "VARCHAR"}
    # A reader knows each stream's primary key from the catalog.
    keys: ClassVar[dict[str, tuple[str, ...]]] = {MERCHANT.name: MERCHANT.primary_key}

    def __init__(self, root: Path) -> None:
        self.lake = LakeWriter(root, fsync=False)
        # The source is the connection's namespace, as the engine's open_writer has it.
        self.writer = LakeRaw(self.lake, MERCHANT.namespace)

    def next_writer(self) -> RawWriter:
        return LakeRaw(self.lake, MERCHANT.namespace)

    def _reader(self) -> duckdb.DuckDBPyConnection:
        """An in-memory DuckDB with a view per stream over its live prefix (docs/ingestion.md)."""
        reader = duckdb.connect()
        source = MERCHANT.namespace
        reader.execute(f"CREATE SCHEMA {source}")
        streams = Path(self.lake.base, "raw", source)
        for stream in sorted(p.name for p in streams.iterdir()) if streams.exists() else []:
            if not self.lake.list_files(source, stream):
                continue
            files = f"read_parquet('{self.lake.duckdb_glob(source, stream)}', hive_partitioning = true, union_by_name = true)"
            latest = ""
            if stream in self.keys:
                latest = (
                    f" QUALIFY row_number() OVER (PARTITION BY {', '.join(self.keys[stream])} "
                    "ORDER BY _airbyte_generation_id DESC, _ab_cdc_lsn DESC NULLS LAST, "
                    "_airbyte_extracted_at DESC) = 1"
                )
            reader.execute(f"CREATE VIEW {source}.{stream} AS SELECT * FROM {files}{latest}")
        return reader

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        return self._reader().execute(sql).fetchall()

    def column_types(self, namespace: str, name: str) -> dict[str, str]:
        described = self._reader().execute(f"DESCRIBE {namespace}.{name}").fetchall()
        return {row[0]: row[1] for row in described}

    def break_next_write(self, monkeypatch: pytest.MonkeyPatch) -> AbstractContextManager[Any]:
        def full_disk(*args: Any, **kwargs: Any) -> None:
            raise OSError("No space left on device")

        monkeypatch.setattr(pq.ParquetWriter, "write_table", full_disk)
        return pytest.raises(OSError, match="No space left")

    def nothing_left_behind(self) -> None:
        left = [p.name for p in Path(self.lake.base).rglob("*") if p.is_file()]
        assert not [name for name in left if name.startswith(".")], left  # no temporary file


WRITERS = ["duckdb", "postgres", "snowflake", "lake"]


@pytest.fixture(params=WRITERS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "duckdb":
        duck = DuckDBBackend(tmp_path / "warehouse.duckdb")
        yield duck
        duck.conn.close()
    elif request.param == "postgres":
        settings, database = (request.getfixturevalue(f) for f in ("settings", "database"))
        dsn = conninfo(settings, database=database, with_key=False)  # raw needs no PII key
        with psycopg.connect(dsn, autocommit=True) as connection:
            yield PostgresBackend(connection)
    elif request.param == "snowflake":
        snow = SnowflakeBackend(request.getfixturevalue("snowflake_server"))
        yield snow
        snow.close()
    else:
        yield LakeBackend(tmp_path / "lake")


def not_on_the_lake(reason: str) -> pytest.MarkDecorator:
    """Run a test on the warehouses only; the lake's run is reported skipped, with the reason."""
    return pytest.mark.parametrize(
        "backend",
        [
            w if w != "lake" else pytest.param(w, marks=pytest.mark.skip(reason=reason))
            for w in WRITERS
        ],
        indirect=True,
    )


# -- the contract --------------------------------------------------------------------------------------
def test_dedup_keeps_the_latest_version_by_lsn_and_state_follows(backend):
    raw = backend.writer
    raw.write(
        MERCHANT,
        batch(
            id=[1, 2, 1], name=["a", "b", "a2"], rating=[4.0, 3.0, 4.5], _ab_cdc_lsn=[10, 11, 12]
        ),
        sync_id="s1",
        generation_id=1,
        state={"lsn": 12},
    )
    # A re-delivered older change must not overwrite the newer row.
    raw.write(
        MERCHANT,
        batch(id=[1], name=["stale"], rating=[1.0], _ab_cdc_lsn=[10]),
        sync_id="s2",
        generation_id=1,
        state={"lsn": 12},
    )
    assert backend.rows("SELECT id, name, _ab_cdc_lsn FROM raw_postgres.merchant ORDER BY id") == [
        (1, "a2", 12),
        (2, "b", 11),
    ]
    assert raw.state(MERCHANT) == {"lsn": 12}
    meta = json.loads(
        backend.rows("SELECT _airbyte_meta FROM raw_postgres.merchant WHERE id = 2")[0][0]
    )
    assert meta == {"sync_id": "s1", "changes": []}


def test_deletes_are_kept_as_tombstones(backend):
    raw = backend.writer
    raw.write(
        MERCHANT,
        batch(id=[1], name=["a"], rating=[4.0], _ab_cdc_lsn=[10]),
        sync_id="s1",
        generation_id=1,
        state=None,
    )
    raw.write(
        MERCHANT,
        batch(
            id=[1],
            _ab_cdc_lsn=[20],
            _ab_cdc_deleted_at=pa.array(["2026-11-01T00:00:00+00:00"]).cast(
                pa.timestamp("us", tz="UTC")
            ),
        ),
        sync_id="s2",
        generation_id=1,
        state=None,
    )
    # Tested for NULL in SQL first: fakesnow returns a NULL TIMESTAMP_TZ as 1970-01-01.
    assert backend.rows(
        "SELECT id, name, _ab_cdc_deleted_at IS NOT NULL FROM raw_postgres.merchant"
    ) == [(1, None, True)]
    assert backend.rows("SELECT _ab_cdc_deleted_at FROM raw_postgres.merchant") == [
        (dt.datetime(2026, 11, 1, tzinfo=dt.UTC),)
    ]


def test_value_that_does_not_fit_is_nulled_and_recorded(backend):
    result = backend.writer.write(
        MERCHANT,
        batch(id=[1, 2], name=["a", "b"], rating=["4.5", "excellent"], _ab_cdc_lsn=[1, 2]),
        sync_id="s1",
        generation_id=1,
        state=None,
    )
    assert result.nulled == {"rating": 1}
    got = backend.rows("SELECT id, rating, _airbyte_meta FROM raw_postgres.merchant ORDER BY id")
    assert got[0][1] == 4.5 and got[1][1] is None
    assert json.loads(got[1][2])["changes"] == [
        {"field": "rating", "change": "NULLED", "reason": "DESTINATION_TYPECAST_ERROR"}
    ]


def test_new_nullable_column_is_added_and_filled_from_then_on(backend):
    raw = backend.writer
    raw.write(
        MERCHANT,
        batch(id=[1], name=["a"], rating=[4.0], _ab_cdc_lsn=[1]),
        sync_id="s1",
        generation_id=1,
        state=None,
    )
    grown = RawStream(
        **{**MERCHANT.__dict__, "columns": (*MERCHANT.columns, Column("website", "string"))}
    )
    result = raw.write(
        grown,
        batch(id=[2], name=["b"], rating=[3.0], website=["b.example"], _ab_cdc_lsn=[2]),
        sync_id="s2",
        generation_id=1,
        state=None,
    )
    # The lake adds no column: the new file has it, readers union the files by name.
    assert result.added_columns == (["website"] if backend.typed else [])
    assert backend.rows("SELECT id, website FROM raw_postgres.merchant ORDER BY id") == [
        (1, None),
        (2, "b.example"),
    ]


@not_on_the_lake(
    "the lake refuses no change: each file carries its own columns and types, nothing written "
    "is altered, and readers union the files by name"
)
def test_incompatible_changes_stop_only_that_stream(backend):
    raw = backend.writer
    other = RawStream(
        namespace="raw_postgres", name="currency", columns=(Column("code", "string"),)
    )
    raw.write(
        MERCHANT,
        batch(id=[1], name=["a"], rating=[4.0], _ab_cdc_lsn=[1]),
        sync_id="s1",
        generation_id=1,
        state=None,
    )
    narrowed = RawStream(
        **{
            **MERCHANT.__dict__,
            "columns": (
                Column("id", "integer"),
                Column("name", "string"),
                Column("rating", "integer"),
            ),
        }
    )
    with pytest.raises(
        SchemaChangeError,
        match=r"raw_postgres.merchant: column rating changed type number -> integer",
    ):
        raw.write(
            narrowed,
            batch(id=[2], name=["b"], rating=[3], _ab_cdc_lsn=[2]),
            sync_id="s2",
            generation_id=1,
            state=None,
        )
    no_key = RawStream(**{**MERCHANT.__dict__, "primary_key": ()})
    with pytest.raises(SchemaChangeError, match="primary key changed"):
        raw.write(
            no_key,
            batch(id=[2], name=["b"], rating=[3.0]),
            sync_id="s3",
            generation_id=1,
            state=None,
        )
    assert backend.rows("SELECT count(*) FROM raw_postgres.merchant") == [(1,)]
    raw.write(other, batch(code=["EUR"]), sync_id="s4", generation_id=1, state=None)
    assert backend.rows("SELECT code FROM raw_postgres.currency") == [("EUR",)]


def test_failed_write_leaves_neither_data_nor_state(backend, monkeypatch):
    raw = backend.writer
    raw.write(
        MERCHANT,
        batch(id=[1], name=["a"], rating=[4.0], _ab_cdc_lsn=[1]),
        sync_id="s1",
        generation_id=1,
        state={"lsn": 1},
    )
    with backend.break_next_write(monkeypatch):
        raw.write(
            MERCHANT,
            batch(id=[2, 3], name=["a", "a"], rating=[1.0, 2.0], _ab_cdc_lsn=[2, 3]),
            sync_id="s2",
            generation_id=1,
            state={"lsn": 3},
        )
    monkeypatch.undo()
    assert backend.rows("SELECT count(*) FROM raw_postgres.merchant") == [(1,)]
    assert raw.state(MERCHANT) == {"lsn": 1}
    backend.nothing_left_behind()


def test_full_refresh_replaces_the_previous_generation(backend):
    raw = backend.writer
    ref = RawStream(
        namespace="raw_postgres",
        name="currency",
        columns=(Column("code", "string"),),
        mode="overwrite",
    )
    raw.write(ref, batch(code=["EUR", "USD"]), sync_id="s1", generation_id=1, state=None)
    raw.finish_overwrite(ref, 1, None)
    raw.write(ref, batch(code=["EUR", "GBP"]), sync_id="s2", generation_id=2, state=None)
    assert raw.finish_overwrite(ref, 2, {"done": True}) == 2
    assert sorted(backend.rows("SELECT code FROM raw_postgres.currency")) == [("EUR",), ("GBP",)]
    assert raw.state(ref) == {"done": True}


def test_a_later_generation_wins_over_a_higher_lsn(backend):
    """A re-snapshot after the source's LSNs went backwards (a restore or migration to a new
    cluster, a failover to a lagging replica): its rows carry lower LSNs than the stored ones,
    yet they are the source's current state; within the new generation the LSN decides again."""
    raw = backend.writer
    raw.begin_snapshot(MERCHANT, 1)
    raw.write(
        MERCHANT,
        batch(
            id=[1, 2, 3, 4],
            name=["a", "b", "c", "d"],
            rating=[1.0, 2.0, 3.0, 4.0],
            _ab_cdc_lsn=[9_000_000] * 4,
        ),
        sync_id="s1",
        generation_id=1,
        state=None,
    )
    raw.finish_overwrite(MERCHANT, 1, None)
    raw.begin_snapshot(MERCHANT, 2)
    raw.write(
        MERCHANT,
        batch(id=[1, 2, 3], name=["a2", "b2", "c2"], rating=[1.5, 2.5, 3.5], _ab_cdc_lsn=[100] * 3),
        sync_id="s2",
        generation_id=2,
        state=None,
    )
    query = (
        "SELECT id, name, _ab_cdc_lsn, _airbyte_generation_id FROM raw_postgres.merchant "
        "ORDER BY id"
    )
    # Before the snapshot finishes, its rows already replace the older generation's; id 4, which
    # the new source does not have, is still there until the finish.
    assert backend.rows(query) == [
        (1, "a2", 100, 2),
        (2, "b2", 100, 2),
        (3, "c2", 100, 2),
        (4, "d", 9_000_000, 1),
    ]
    raw.finish_overwrite(MERCHANT, 2, None)
    assert backend.rows(query) == [(1, "a2", 100, 2), (2, "b2", 100, 2), (3, "c2", 100, 2)]
    # Changes read after the snapshot: a newer LSN wins, a re-delivered older one does not.
    raw.write(
        MERCHANT,
        batch(id=[1], name=["a3"], rating=[1.75], _ab_cdc_lsn=[200]),
        sync_id="s3",
        generation_id=2,
        state=None,
    )
    raw.write(
        MERCHANT,
        batch(id=[2], name=["stale"], rating=[0.0], _ab_cdc_lsn=[50]),
        sync_id="s4",
        generation_id=2,
        state=None,
    )
    assert backend.rows(query) == [(1, "a3", 200, 2), (2, "b2", 100, 2), (3, "c2", 100, 2)]


# (text written as a string, the JSON value it stands for once the column is json)
NOTES = [('{"k": 1}', {"k": 1}), ("[2]", [2]), ("plain", "plain")]


def test_compatible_type_changes_widen_the_column_and_keep_the_data(backend):
    raw = backend.writer
    v1 = RawStream(
        namespace="raw_postgres",
        name="payment",
        columns=(Column("id", "integer"), Column("amount", "integer"), Column("note", "string")),
    )
    raw.write(
        v1,
        batch(id=[1, 2, 3], amount=[10, 20, 30], note=[text for text, _ in NOTES]),
        sync_id="s1",
        generation_id=1,
        state=None,
    )
    v2 = RawStream(
        namespace="raw_postgres",
        name="payment",
        columns=(Column("id", "integer"), Column("amount", "number"), Column("note", "json")),
    )
    raw.write(
        v2, batch(id=[4], amount=[0.5], note=['["x"]']), sync_id="s2", generation_id=1, state=None
    )
    types = backend.column_types("raw_postgres", "payment")
    assert {c: types[c] for c in ("amount", "note")} == backend.widened
    got = backend.rows("SELECT id, amount, note FROM raw_postgres.payment ORDER BY id")
    if backend.typed:
        assert [(i, a, json_value(n)) for i, a, n in got] == [
            (1, 10.0, {"k": 1}),
            (2, 20.0, [2]),  # JSON text becomes its value
            (3, 30.0, "plain"),  # not JSON text: kept as a JSON string, not lost
            (4, 0.5, ["x"]),  # not truncated to the integer column it would have gone into
        ]
    else:  # the lake's JSON is the text as written
        assert got == [
            (1, 10.0, '{"k": 1}'),
            (2, 20.0, "[2]"),
            (3, 30.0, "plain"),
            (4, 0.5, '["x"]'),
        ]


def test_text_that_is_not_json_survives_a_widening_to_json(backend):
    """Text a plain cast to JSON refuses (DuckDB's did) becomes a JSON string."""
    raw = backend.writer
    columns = (Column("id", "integer"), Column("note", "string"))
    v1 = RawStream(namespace="raw_postgres", name="note", columns=columns)
    raw.write(
        v1, batch(id=[1, 2, 3], note=["plain", "", None]), sync_id="s1", generation_id=1, state=None
    )
    v2 = RawStream(
        namespace="raw_postgres", name="note", columns=(columns[0], Column("note", "json"))
    )
    raw.write(v2, batch(id=[4], note=['["x"]']), sync_id="s2", generation_id=1, state=None)
    got = backend.rows("SELECT id, note FROM raw_postgres.note ORDER BY id")
    if backend.typed:
        assert [(i, json_value(n)) for i, n in got] == [
            (1, "plain"),
            (2, ""),  # a JSON string, not NULL
            (3, None),
            (4, ["x"]),
        ]
    else:  # the lake's JSON is the text as written
        assert got == [(1, "plain"), (2, ""), (3, None), (4, '["x"]')]


def test_a_dropped_column_is_kept_null_from_then_on_and_reported_once(backend):
    """A column dropped at the source (docs/ingestion.md, "Schema drift"): the destination keeps
    it, rows written after the drop (new keys and a key's new version) hold NULL in it, and the
    drop is reported once, also to the next sync's writer, which reads what was recorded."""
    without_name = RawStream(
        namespace=MERCHANT.namespace,
        name=MERCHANT.name,
        columns=tuple(c for c in MERCHANT.columns if c.name != "name"),
        primary_key=MERCHANT.primary_key,
        mode=MERCHANT.mode,
        cdc=MERCHANT.cdc,
    )

    def write(raw: RawWriter, stream: RawStream, lsn: int, **columns: list[Any]) -> list[str]:
        table = batch(**columns, _ab_cdc_lsn=[lsn] * len(columns["id"]))
        return raw.write(
            stream, table, sync_id=f"s{lsn}", generation_id=1, state=None
        ).dropped_columns

    raw = backend.writer
    assert write(raw, MERCHANT, 1, id=[1, 2], name=["a", "b"], rating=[1.0, 2.0]) == []
    assert write(raw, without_name, 2, id=[1, 3], rating=[1.5, 3.0]) == ["name"]
    assert write(raw, without_name, 3, id=[2], rating=[2.5]) == []
    assert write(backend.next_writer(), without_name, 4, id=[3], rating=[3.5]) == []
    assert backend.rows("SELECT id, name, rating FROM raw_postgres.merchant ORDER BY id") == [
        (1, None, 1.5),
        (2, None, 2.5),
        (3, None, 3.5),
    ]


def test_state_under_any_key_is_upserted_on_its_own(backend):
    raw = backend.writer
    assert raw.load_state("connection:oltp") is None
    raw.save_state("connection:oltp", {"slot": "s", "lsn": 10})
    raw.save_state("connection:oltp", {"slot": "s", "lsn": 42})
    assert raw.load_state("connection:oltp") == {"slot": "s", "lsn": 42}
    raw.write(MERCHANT, batch(id=[1], _ab_cdc_lsn=[1]), sync_id="s1", generation_id=1, state=None)
    raw.save_state(MERCHANT.key, {"lsn": 1})
    assert raw.state(MERCHANT) == {"lsn": 1}
    # An empty batch still moves the state (a CDC read that found nothing for this stream).
    empty = batch(id=pa.array([], pa.int64()))
    assert raw.write(MERCHANT, empty, sync_id="s2", generation_id=1, state={"lsn": 9}).rows == 0
    assert raw.state(MERCHANT) == {"lsn": 9}
    assert backend.rows("SELECT count(*) FROM raw_postgres.merchant") == [(1,)]
    if backend.typed:  # the lake records no primary key (its readers take it from the catalog)
        # The recorded primary key survives: a changed key is still refused.
        with pytest.raises(SchemaChangeError, match="primary key changed"):
            raw.ensure(RawStream(**{**MERCHANT.__dict__, "primary_key": ("name",)}))


# -- prepare: the typing every writer shares ----------------------------------------------------------
def test_metadata_columns_are_built_in_bulk(monkeypatch):
    """Raw ids are distinct version-4 UUID text (also across int32-offset chunks), and only the
    rows whose value did not fit carry changes in their _airbyte_meta."""
    ids = rawlayer._uuid4_strings(1000).to_pylist()
    assert len(set(ids)) == 1000
    for text in ids:
        parsed = uuid.UUID(text)
        assert (str(parsed), parsed.version, parsed.variant) == (text, 4, uuid.RFC_4122)
    assert rawlayer._uuid4_strings(0).to_pylist() == []
    monkeypatch.setattr(rawlayer, "_MAX_STRING_BYTES", 36 * 3)  # 3 ids per chunk
    chunked = rawlayer._uuid4_strings(7)
    assert isinstance(chunked, pa.ChunkedArray) and chunked.num_chunks == 3
    assert all(uuid.UUID(t).version == 4 for t in chunked.to_pylist())
    assert rawlayer._repeat_string("{}", 4).to_pylist() == ["{}"] * 4

    typed, nulled = rawlayer.prepare(
        MERCHANT,
        batch(id=[1, 2, 3], name=["a", "b", "c"], rating=["4.5", "oops", "3"]),
        sync_id="s9",
        generation_id=7,
    )
    assert nulled == {"rating": 1}
    assert typed.column("rating").to_pylist() == [4.5, None, 3.0]
    metas = [json.loads(m) for m in typed.column("_airbyte_meta").to_pylist()]
    assert metas[0] == metas[2] == {"sync_id": "s9", "changes": []}
    assert metas[1]["changes"] == [
        {"field": "rating", "change": "NULLED", "reason": "DESTINATION_TYPECAST_ERROR"}
    ]
    assert typed.column("_airbyte_generation_id").to_pylist() == [7, 7, 7]
    assert len(set(typed.column("_airbyte_extracted_at").to_pylist())) == 1
