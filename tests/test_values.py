"""Edge values of PostgreSQL sources (numeric NaN and ±Infinity, float NaN and ±Infinity,
±infinity dates and timestamps, BC, years 1, 9999 and beyond, the largest and smallest numerics)
land the same whichever way they are read: snapshot (COPY binary), change data (pgoutput text) and
full refresh (query rows), in every destination. A value a destination type cannot hold is nulled
and recorded in ``_airbyte_meta.changes``, never fatal; the OLTP schema refuses a NaN amount."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import struct
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import psycopg
import pyarrow as pa
import pytest

from stripe_platform.config import Settings
from stripe_platform.ingestion.catalog import Stream, StreamGroup, SyncMode, load_catalog
from stripe_platform.ingestion.engine import Engine
from stripe_platform.ingestion.engine.sync import _typed
from stripe_platform.ingestion.postgres import cdc, pgcopy, pgoutput, pgvalues
from stripe_platform.lake.target import LakeRaw
from stripe_platform.lake.writer import LakeWriter
from stripe_platform.oltp import db
from stripe_platform.rawlayer import ARROW, Column, RawStream, prepare
from stripe_platform.warehouse.duckdb import DuckDBRaw
from stripe_platform.warehouse.postgres import PostgresRaw

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.filterwarnings("ignore:Arrow output on a DB-API result:UserWarning"),
]

UTC = dt.UTC
LAST = dt.datetime(9999, 12, 31, 23, 59, 59, 999999)
FIRST = dt.datetime(1, 1, 1)
NULLED = "nulled"  # expected: NULL in the destination, recorded in _airbyte_meta.changes

# -- the server's own text against both conversions ------------------------------------------------
# (SQL literal, expected microseconds since 1970 as Arrow holds them).
TIMESTAMPS = [
    ("'2026-01-02 03:04:05.123456'::timestamp", 1_767_323_045_123_456),
    ("'infinity'::timestamp", 253_402_300_799_999_999),  # 9999-12-31 23:59:59.999999
    ("'-infinity'::timestamp", -62_135_596_800_000_000),  # 0001-01-01
    ("'0001-01-01 00:00:00'::timestamp", -62_135_596_800_000_000),
    ("'9999-12-31 23:59:59.999999'::timestamp", 253_402_300_799_999_999),
    ("'0001-12-31 23:59:59.999999 BC'::timestamp", -62_135_596_800_000_001),
    ("'4713-01-01 00:00:00 BC'::timestamp", -210_863_520_000_000_000),
    ("'10000-01-01 00:00:00'::timestamp", 253_402_300_800_000_000),
    ("'294247-01-10 04:00:54.775807'::timestamp", 9_223_372_036_854_775_807),  # Arrow's last
    ("'294276-12-31 23:59:59.999999'::timestamp", 9_223_372_036_854_775_807),  # past it: saturates
    ("'2026-06-01 12:00:00+05:30'::timestamptz", 1_780_295_400_000_000),
    ("'infinity'::timestamptz", 253_402_300_799_999_999),
    ("'-infinity'::timestamptz", -62_135_596_800_000_000),
    ("'4713-01-01 00:00:00+00 BC'::timestamptz", -210_863_520_000_000_000),
    ("'0001-01-01 00:00:00+00'::timestamptz", -62_135_596_800_000_000),
    ("'9999-12-31 23:59:59.999999+00'::timestamptz", 253_402_300_799_999_999),
]
# (SQL literal, expected days since 1970).
DATES = [
    ("'2024-02-29'", 19_782),
    ("'infinity'", 2_932_896),  # 9999-12-31
    ("'-infinity'", -719_162),  # 0001-01-01
    ("'0001-01-01'", -719_162),
    ("'9999-12-31'", 2_932_896),
    ("'0001-12-31 BC'", -719_163),
    ("'4713-01-01 BC'", -2_440_550),
    ("'10000-01-01'", 2_932_897),
    ("'5874897-12-31'", 2_145_042_905),  # PostgreSQL's last date
]
# (SQL literal, the destination's decimal value, or NULLED).
NUMERICS = [
    ("'NaN'::numeric", NULLED),
    ("'Infinity'::numeric", NULLED),
    ("'-Infinity'::numeric", NULLED),
    ("99999999999999999999999999999.999999999", Decimal("99999999999999999999999999999.999999999")),
    (
        "-99999999999999999999999999999.999999999",
        Decimal("-99999999999999999999999999999.999999999"),
    ),
    ("100000000000000000000000000000", NULLED),  # 30 digits before the point: 29 fit
    ("0.000000001", Decimal("0.000000001")),
    ("0.0000000001", NULLED),  # a tenth digit after the point would be lost
    ("0.1000000000000", Decimal("0.1")),  # trailing zeros lose nothing
    ("1e1000", NULLED),
    ("1e128", NULLED),  # Arrow's parser alone reads 129 digits as 0
    ("round(1::numeric, 400)", Decimal(1)),  # 1.000...: a display scale of 400
    ("-1e-1000", NULLED),
    ("'NaN'::numeric(14, 2)", NULLED),
    ("999999999999.99::numeric(14, 2)", Decimal("999999999999.99")),
    ("-999999999999.99::numeric(14, 2)", Decimal("-999999999999.99")),
]
# (SQL literal, expected double; NaN compared as such).
FLOAT8 = [
    ("'NaN'", math.nan),
    ("'Infinity'", math.inf),
    ("'-Infinity'", -math.inf),
    ("'1.7976931348623157e308'", 1.7976931348623157e308),
    ("'5e-324'", 5e-324),
    ("0.1", 0.1),
]
FLOAT4 = [  # read as text by both paths (the snapshot casts float4 to text on the server)
    ("'NaN'", math.nan),
    ("'-Infinity'", -math.inf),
    ("'3.4028235e38'", 3.4028235e38),  # float4's shortest text, read as a double
    ("'1.1754944e-38'", 1.1754944e-38),
    ("0.1", 0.1),
]


@pytest.fixture
def source(settings: Settings, database: str) -> Iterator[psycopg.Connection]:
    with db.connect(settings, database=database, autocommit=True) as conn:
        conn.execute("SET synchronous_commit = on")  # the slot decodes flushed WAL only
        yield conn


def _server(conn: psycopg.Connection, literals: list[str]) -> tuple[pa.Array, list[str]]:
    """The values as the snapshot reads them (COPY binary), and the server's text of each, as
    pgoutput sends it (the decoding sessions' settings)."""
    values = ", ".join(f"({i}, {literal})" for i, literal in enumerate(literals))
    query = f"SELECT v FROM (VALUES {values}) AS t (i, v) ORDER BY i"
    (batch,) = pgcopy.read_arrow(conn, query)
    with conn.transaction():
        conn.execute(cdc._SESSION_SETTINGS)
        text = [row[0] for row in conn.execute(f"SELECT v::text FROM ({query}) AS q")]
    return batch.column(0), text


def _via_text(oid: int, text: list[str], kind: str) -> pa.Array:
    """The change-data path: pgoutput's conversion, then pgvalues."""
    return pgvalues.column([pgoutput.convert_value(oid, t) for t in text], kind)


def test_timestamps_and_dates_from_binary_and_from_text_agree(source) -> None:
    for oid, kind in ((1114, "timestamp"), (1184, "timestamp_tz")):
        cases = [(lit, us) for lit, us in TIMESTAMPS if lit.endswith("tz") == (oid == 1184)]
        binary, text = _server(source, [lit for lit, _ in cases])
        expected = [us for _, us in cases]
        assert binary.type == ARROW[kind]
        assert binary.cast(pa.int64()).to_pylist() == expected, text
        assert _via_text(oid, text, kind).cast(pa.int64()).to_pylist() == expected, text
    binary, text = _server(source, [f"{lit}::date" for lit, _ in DATES])
    expected = [days for _, days in DATES]
    assert binary.cast(pa.int32()).to_pylist() == expected, text
    assert _via_text(1082, text, "date").cast(pa.int32()).to_pylist() == expected, text
    # The literals above, checked by the server itself where its epoch arithmetic applies.
    with source.transaction():
        source.execute("SET LOCAL TimeZone = 'UTC'")
        for literal, us in TIMESTAMPS:
            if us < 9_223_372_036_854_775_807 and "infinity" not in literal:
                epoch = source.execute(
                    f"SELECT (extract(epoch FROM {literal}) * 1000000)::int8"
                ).fetchone()[0]
                assert epoch == us, literal
        for literal, days in DATES:
            if "infinity" not in literal:
                assert (
                    source.execute(f"SELECT {literal}::date - date '1970-01-01'").fetchone()[0]
                    == days
                ), literal


def test_numerics_and_floats_from_binary_and_from_text_agree(source) -> None:
    binary, text = _server(source, [lit for lit, _ in NUMERICS])
    assert binary.to_pylist() == text  # the snapshot reader writes numeric_out's text
    via_text = _via_text(1700, text, "decimal")
    stream = RawStream("raw", "n", (Column("v", "decimal"),))
    schema = pa.schema([("v", ARROW["decimal"])])
    landed = []
    for array in (binary, via_text):  # as the engine types them, then as every writer does
        batch = _typed(pa.RecordBatch.from_arrays([array], names=["v"]), schema)
        typed, nulled = prepare(stream, pa.table(batch), sync_id="s", generation_id=0)
        metas = [json.loads(m)["changes"] for m in typed.column("_airbyte_meta").to_pylist()]
        landed.append((typed.column("v").to_pylist(), nulled, metas))
    expected_values = [None if v is NULLED else v for _, v in NUMERICS]
    nulled_rows = [i for i, (_, v) in enumerate(NUMERICS) if v is NULLED]
    change = {"field": "v", "change": "NULLED", "reason": "DESTINATION_TYPECAST_ERROR"}
    for values, nulled, metas in landed:
        assert values == expected_values
        assert nulled == {"v": len(nulled_rows)}
        assert metas == [[change] if i in nulled_rows else [] for i in range(len(NUMERICS))]

    binary, text = _server(source, [f"{lit}::float8" for lit, _ in FLOAT8])
    snapshot4, text4 = _server(source, [f"{lit}::float4::text" for lit, _ in FLOAT4])
    assert snapshot4.to_pylist() == text4
    schema = pa.schema([("v", pa.float64())])
    for snapshot, via_text, cases in (
        (binary, _via_text(701, text, "number"), FLOAT8),
        (snapshot4, _via_text(700, text4, "number"), FLOAT4),
    ):
        typed = _typed(pa.RecordBatch.from_arrays([snapshot], names=["v"]), schema).column(0)
        for array in (typed, via_text):
            got = array.to_pylist()
            assert [math.isnan(v) for v in got] == [math.isnan(v) for _, v in cases]
            assert [v for v in got if not math.isnan(v)] == [
                v for _, v in cases if not math.isnan(v)
            ]


def test_the_change_decoder_keeps_what_it_cannot_convert_as_text() -> None:
    """No value stops decoding: a date Python cannot hold, or a value a converter refuses (bytea
    in the escape format), stays as the server's text, for the destination's cast to judge."""
    columns = [(1, b"id", 23), (0, b"at", 1184), (0, b"day", 1082), (0, b"raw", 17)]
    body = b"".join(bytes([f]) + n + b"\x00" + struct.pack("!Ii", t, -1) for f, n, t in columns)
    relation = b"R" + struct.pack("!I", 9) + b"\x00poison\x00d" + struct.pack("!h", 4) + body
    values = [b"1", b"4713-01-01 00:00:00+00 BC", b"10000-01-01", b"\\000"]
    insert = b"I" + struct.pack("!I", 9) + b"N" + struct.pack("!h", 4)
    insert += b"".join(b"t" + struct.pack("!i", len(v)) + v for v in values)
    decoder = pgoutput.Decoder()
    decoder.decode(relation)
    change = decoder.decode_change(insert)
    assert change.row == {
        "id": 1,
        "at": "4713-01-01 00:00:00+00 BC",
        "day": "10000-01-01",
        "raw": "\\000",
    }
    assert pgoutput.convert_value(1114, "infinity") == dt.datetime.max
    assert pgoutput.convert_value(1082, "0001-12-31 BC") == "0001-12-31 BC"


# -- end to end: snapshot, change data and full refresh into every destination ---------------------
COLUMNS = "num, amount, f4, f8, ts, tstz, d"
# One row per edge: SQL literals, then what lands (NULLED: nulled and recorded).
ROWS: list[tuple[int, tuple[str, ...], tuple[Any, ...]]] = [
    (
        1,
        ("'NaN'", "'NaN'", "'NaN'", "'NaN'", "'infinity'", "'-infinity'", "'infinity'"),
        (NULLED, NULLED, math.nan, math.nan, LAST, FIRST, dt.date(9999, 12, 31)),
    ),
    (
        2,
        ("'Infinity'", "0", "'Infinity'", "'-Infinity'", "'-infinity'", "'infinity'", "'-infinity'"),
        (NULLED, Decimal(0), math.inf, -math.inf, FIRST, LAST, dt.date(1, 1, 1)),
    ),
    (
        3,
        (
            "'-Infinity'", "0.01", "'3.4028235e38'", "'1.7976931348623157e308'",
            "'4713-01-01 00:00:00 BC'", "'4713-01-01 00:00:00+00 BC'", "'4713-01-01 BC'",
        ),
        (NULLED, Decimal("0.01"), 3.4028235e38, 1.7976931348623157e308, NULLED, NULLED, NULLED),
    ),
    (
        4,
        (
            "99999999999999999999999999999.999999999", "999999999999.99", "'1.1754944e-38'",
            "'5e-324'", "'0001-01-01 00:00:00'", "'0001-01-01 00:00:00+00'", "'0001-01-01'",
        ),
        (
            Decimal("99999999999999999999999999999.999999999"), Decimal("999999999999.99"),
            1.1754944e-38, 5e-324, FIRST, FIRST, dt.date(1, 1, 1),
        ),
    ),
    (
        5,
        (
            "-99999999999999999999999999999.999999999", "-999999999999.99", "'-3.4028235e38'",
            "'-2.2250738585072014e-308'", "'9999-12-31 23:59:59.999999'",
            "'9999-12-31 23:59:59.999999+00'", "'9999-12-31'",
        ),
        (
            Decimal("-99999999999999999999999999999.999999999"), Decimal("-999999999999.99"),
            -3.4028235e38, -2.2250738585072014e-308, LAST, LAST, dt.date(9999, 12, 31),
        ),
    ),
    (
        6,
        (
            "100000000000000000000000000000", "0", "0", "0", "'10000-01-01 00:00:00'",
            "'294276-12-31 23:59:59.999999+00'", "'5874897-12-31'",
        ),
        (NULLED, Decimal(0), 0.0, 0.0, NULLED, NULLED, NULLED),
    ),
    (
        7,
        (
            "0.000000001", "0", "0", "0", "'0001-12-31 23:59:59.999999 BC'",
            "'2026-06-01 12:00:00+05:30'", "'2024-02-29'",
        ),
        (
            Decimal("0.000000001"), Decimal(0), 0.0, 0.0, NULLED,
            dt.datetime(2026, 6, 1, 6, 30), dt.date(2024, 2, 29),
        ),
    ),
    (
        8,
        (
            "0.0000000001", "0", "0", "0", "'2026-01-02 03:04:05.123456'",
            "'2026-01-02 03:04:05.123456+00'", "'2026-01-02'",
        ),
        (
            NULLED, Decimal(0), 0.0, 0.0, dt.datetime(2026, 1, 2, 3, 4, 5, 123456),
            dt.datetime(2026, 1, 2, 3, 4, 5, 123456), dt.date(2026, 1, 2),
        ),
    ),
    (
        9,
        ("1e1000", "0", "0", "0", "NULL", "NULL", "NULL"),
        (NULLED, Decimal(0), 0.0, 0.0, None, None, None),
    ),
    (
        10,
        ("-1e-1000", "0", "0", "0", "NULL", "NULL", "NULL"),
        (NULLED, Decimal(0), 0.0, 0.0, None, None, None),
    ),
    (
        11,
        ("0.1000", "12.30", "1.5", "0.1", "NULL", "NULL", "NULL"),
        (Decimal("0.1"), Decimal("12.3"), 1.5, 0.1, None, None, None),
    ),
]  # fmt: skip
NAMES = COLUMNS.split(", ")
NULLED_PER_COLUMN = {"num": 7, "amount": 1, "ts": 3, "tstz": 2, "d": 2}
SCHEMA = (
    "(id int PRIMARY KEY, num numeric, amount numeric(14, 2), f4 real, f8 double precision, "
    "ts timestamp, tstz timestamptz, d date, updatedat timestamptz NOT NULL DEFAULT now())"
)


def _expected(offset: int = 0) -> dict[int, tuple[tuple[Any, ...], list[str]]]:
    """id -> (values, the fields recorded as nulled, in column order)."""
    return {
        row_id + offset: (
            tuple(None if v is NULLED else v for v in landed),
            [n for n, v in zip(NAMES, landed, strict=True) if v is NULLED],
        )
        for row_id, _, landed in ROWS
    }


def _insert(conn: psycopg.Connection, table: str, offset: int = 0) -> None:
    for row_id, literals, _ in ROWS:
        conn.execute(
            f"INSERT INTO {table} (id, {COLUMNS}) VALUES ({row_id + offset}, {', '.join(literals)})"
        )


def _norm(values: tuple[Any, ...]) -> tuple[Any, ...]:
    """NaN as a marker (NaN != NaN); timestamps with a zone in UTC without it."""
    out = []
    for v in values:
        if isinstance(v, float) and math.isnan(v):
            v = "NaN"
        elif isinstance(v, dt.datetime) and v.tzinfo is not None:
            v = v.astimezone(UTC).replace(tzinfo=None)
        out.append(v)
    return tuple(out)


def _landed(rows: list[tuple[Any, ...]]) -> dict[int, tuple[tuple[Any, ...], list[str]]]:
    """Rows read back as (id, the seven values, _airbyte_meta, ts/tstz/d IS NULL): id -> (values,
    nulled fields). The IS NULL flags are read in SQL because fakesnow returns a NULL
    timestamp as 1970-01-01 over the wire."""
    out = {}
    for row in rows:
        row_id, values, meta, null_flags = row[0], list(row[1:8]), row[8], row[9:12]
        for i, is_null in zip((4, 5, 6), null_flags, strict=True):
            if is_null:
                values[i] = None
        meta = json.loads(meta) if isinstance(meta, str) else meta
        fields = []
        for change in meta["changes"]:
            assert change["change"] == "NULLED"
            assert change["reason"] == "DESTINATION_TYPECAST_ERROR"
            fields.append(change["field"])
        out[row_id] = (_norm(tuple(values)), fields)
    return out


Reader = Callable[[str, bool], dict[int, tuple[tuple[Any, ...], list[str]]]]


def _sql_reader(run: Callable[[str], list[tuple[Any, ...]]], table: Callable[[str], str]) -> Reader:
    def read(stream: str, cdc_stream: bool) -> dict[int, tuple[tuple[Any, ...], list[str]]]:
        live = "WHERE _ab_cdc_deleted_at IS NULL" if cdc_stream else ""
        return _landed(
            run(
                f"SELECT id, {COLUMNS}, _airbyte_meta, ts IS NULL, tstz IS NULL, d IS NULL "
                f"FROM {table(stream)} {live} ORDER BY id"
            )
        )

    return read


@pytest.fixture(params=["duckdb", "postgres", "snowflake", "lake"])
def destination(
    request: pytest.FixtureRequest, settings: Settings, database: str, tmp_path: Path
) -> Iterator[tuple[str, Any, Reader]]:
    """(connection, writer, reader of a stream's live rows) for each destination."""
    kind = request.param
    if kind == "duckdb":
        warehouse = duckdb.connect(str(tmp_path / "w.duckdb"))
        warehouse.execute("SET TimeZone = 'UTC'")
        yield (
            "postgres-to-snowflake",
            DuckDBRaw(warehouse),
            _sql_reader(lambda q: warehouse.execute(q).fetchall(), lambda s: f"raw.postgres_{s}"),
        )
        warehouse.close()
    elif kind == "postgres":
        with psycopg.connect(
            db.conninfo(settings, database=database, with_key=False), autocommit=True
        ) as warehouse:
            warehouse.execute("SET TimeZone = 'UTC'")
            yield (
                "postgres-to-snowflake",
                PostgresRaw(warehouse),
                _sql_reader(
                    lambda q: warehouse.execute(q).fetchall(), lambda s: f"raw.postgres_{s}"
                ),
            )
    elif kind == "snowflake":
        import snowflake.connector

        from stripe_platform.warehouse.snowflake import SnowflakeRaw

        server = request.getfixturevalue("snowflake_server")
        sf = snowflake.connector.connect(**{**server, "database": f"VALUES_{database.upper()}"})

        def run(query: str) -> list[tuple[Any, ...]]:
            with sf.cursor() as cur:
                return [tuple(r) for r in cur.execute(query).fetchall()]

        yield (
            "postgres-to-snowflake",
            SnowflakeRaw(sf),
            _sql_reader(run, lambda s: f"RAW.POSTGRES_{s.upper()}"),
        )
        sf.close()
    else:
        lake = LakeWriter(tmp_path / "lake", fsync=False)

        def read(stream: str, cdc_stream: bool) -> dict[int, tuple[tuple[Any, ...], list[str]]]:
            files = f"{tmp_path}/lake/raw/postgres/{stream}/*/*.parquet"
            order = "_ab_cdc_lsn DESC" if cdc_stream else "_airbyte_generation_id DESC"
            live = "AND _ab_cdc_deleted_at IS NULL" if cdc_stream else ""
            with duckdb.connect() as reader:
                reader.execute("SET TimeZone = 'UTC'")
                rows = reader.execute(
                    f"SELECT id, {COLUMNS}, _airbyte_meta, ts IS NULL, tstz IS NULL, d IS NULL "
                    f"FROM (SELECT * FROM read_parquet('{files}') QUALIFY row_number() OVER "
                    f"(PARTITION BY id ORDER BY {order}) = 1) WHERE true {live} ORDER BY id"
                ).fetchall()
            return _landed(rows)

        yield "postgres-to-s3", LakeRaw(lake, "postgres"), read


@pytest.fixture
def platform(settings: Settings, database: str, source) -> Iterator[tuple[Settings, Any]]:
    """The test's database as the catalog's PostgreSQL source, with three streams of its own:
    the edge values read by snapshot then change data, the same values as a full-refresh stream,
    and a plain table that must keep syncing."""
    for table in ("edge_values", "edge_reference"):
        source.execute(f"CREATE TABLE {table} {SCHEMA}")
    source.execute("CREATE TABLE plain (id int PRIMARY KEY, v text, updatedat timestamptz)")
    catalog = load_catalog()
    incremental = SyncMode.INCREMENTAL_APPEND_DEDUPED
    group = StreamGroup(
        namespace="public",
        streams=(
            Stream(name="edge_values", sync_mode=incremental, primary_key=("id",),
                   cursor_field="updatedat"),
            Stream(name="edge_reference", sync_mode=SyncMode.FULL_REFRESH_OVERWRITE,
                   primary_key=("id",)),
            Stream(name="plain", sync_mode=incremental, primary_key=("id",),
                   cursor_field="updatedat"),
        ),
    )  # fmt: skip
    catalog = dataclasses.replace(catalog, streams={**catalog.streams, "postgres": group})
    s = settings.model_copy(update={"pg_database": database})
    yield s, catalog
    for c in catalog.connections:
        connection = catalog.resolve(c.name)
        if connection.source.kind == "postgres":
            cdc.drop_slot(source, connection.slot(database))


def test_edge_values_land_the_same_by_snapshot_change_data_and_full_refresh(
    platform, source, destination
) -> None:
    s, catalog = platform
    connection, writer, read = destination
    _insert(source, "edge_values")
    _insert(source, "edge_reference")
    source.execute("INSERT INTO plain VALUES (1, 'before', now())")

    first = Engine(s, catalog.resolve(connection), writer).sync()
    assert first.phase == "snapshot"
    assert first.streams["edge_values"].nulled == NULLED_PER_COLUMN
    assert first.streams["edge_reference"].nulled == NULLED_PER_COLUMN
    expected = _expected()
    assert read("edge_values", True) == {k: (_norm(v), f) for k, (v, f) in expected.items()}
    assert read("edge_reference", False) == read("edge_values", True)

    # The same values again through change data: new rows, and every row updated to itself.
    _insert(source, "edge_values", offset=100)
    source.execute(f"UPDATE edge_values SET ({COLUMNS}) = ({COLUMNS}) WHERE id < 100")
    second = Engine(s, catalog.resolve(connection), writer).sync()
    assert second.phase == "incremental"
    assert second.streams["edge_values"].nulled == {k: 2 * n for k, n in NULLED_PER_COLUMN.items()}
    both = {**expected, **_expected(offset=100)}
    assert read("edge_values", True) == {k: (_norm(v), f) for k, (v, f) in both.items()}

    # A poison row inserted then deleted, while another table changes: nothing stops.
    poison = ", ".join(ROWS[0][1])
    source.execute(f"INSERT INTO edge_values (id, {COLUMNS}) VALUES (999, {poison})")
    source.execute("UPDATE edge_values SET ts = '4713-01-01 BC' WHERE id = 999")
    source.execute("DELETE FROM edge_values WHERE id = 999")
    source.execute("INSERT INTO plain VALUES (2, 'after the poison', now())")
    poisoned = Engine(s, catalog.resolve(connection), writer).sync()
    assert poisoned.streams["plain"].rows == 1
    # insert: num and amount NaN; update: those and the BC ts; delete: the key only
    assert poisoned.streams["edge_values"].nulled == {"num": 2, "amount": 2, "ts": 1}
    source.execute("INSERT INTO plain VALUES (3, 'and later', now())")
    last = Engine(s, catalog.resolve(connection), writer).sync()
    assert last.phase == "incremental" and last.streams["plain"].rows == 1
    live = read("edge_values", True)
    assert 999 not in live and len(live) == 2 * len(ROWS)


def test_the_oltp_schema_refuses_a_nan_amount(loaded) -> None:
    """numeric's CHECK (Amount >= 0) lets NaN through (NaN sorts above every number): the
    migration's constraint refuses it, on every partition, old and new."""
    row = loaded.execute(
        "SELECT MerchantID, CurrencyID, PaymentMethodID, CustomerID FROM Transaction LIMIT 1"
    ).fetchone()
    insert = (
        "INSERT INTO Transaction (TransactionStatusID, MerchantID, Amount, CurrencyID, "
        "PaymentMethodID, CustomerID, DateTime) VALUES (1, %s, %s, %s, %s, %s, %s)"
    )
    for when in (dt.datetime.now(UTC), dt.datetime(1990, 1, 1, tzinfo=UTC)):  # month, default
        with pytest.raises(
            psycopg.errors.CheckViolation,
            match='violates check constraint "transaction_amount_not_nan"',
        ):
            loaded.execute(insert, (row[0], Decimal("NaN"), row[1], row[2], row[3], when))
    loaded.execute("CREATE TABLE transaction_y2100m01 PARTITION OF Transaction "
                   "FOR VALUES FROM ('2100-01-01') TO ('2100-02-01')")  # fmt: skip
    with pytest.raises(psycopg.errors.CheckViolation, match="transaction_amount_not_nan"):
        loaded.execute(insert, (row[0], "NaN", row[1], row[2], row[3], dt.datetime(2100, 1, 5)))
    loaded.execute(
        insert, (row[0], Decimal("0.00"), row[1], row[2], row[3], dt.datetime(2100, 1, 5))
    )


def test_the_migration_names_nan_amounts_already_there(loaded) -> None:
    """A database that already holds a NaN amount is not migrated half-way: the migration says
    how many rows to correct and leaves the schema as it was."""
    from stripe_platform.oltp.migrate import MigrationError, migrate

    loaded.execute("ALTER TABLE Transaction DROP CONSTRAINT transaction_amount_not_nan")
    loaded.execute("DELETE FROM schema_migrations WHERE name = 'amount_not_nan'")
    loaded.execute(
        "UPDATE Transaction SET Amount = 'NaN' WHERE ID = (SELECT min(ID) FROM Transaction)"
    )
    with pytest.raises(
        MigrationError, match=r"amount_not_nan.sql failed .*: 1 transaction\(s\) have Amount NaN"
    ):
        migrate(loaded)
    assert loaded.execute(
        "SELECT count(*) FROM pg_constraint WHERE conname = 'transaction_amount_not_nan'"
    ).fetchone() == (0,)
    loaded.execute("UPDATE Transaction SET Amount = 1 WHERE Amount = 'NaN'")
    assert [m.name for m in migrate(loaded)] == ["amount_not_nan"]
