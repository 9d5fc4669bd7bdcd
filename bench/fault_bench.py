"""Fault suite: kill -9 syncs at random points while the source is written, then count what was
lost, duplicated or changed in each destination.

    uv run python bench/fault_bench.py [--runs 20] [--destinations duckdb,postgres,snowflake,lake]
                                       [--scale 0.003] [--tps 40] [--seed N] [--json] [--output FILE]

On the embedded profile, in a platform home of its own (a temporary directory unless --home):
an OLTP database seeded at --scale, and `seed --tps` writing inserts, updates and deletes for the
whole run. For each destination (the DuckDB, PostgreSQL and Snowflake raw layers through
`postgres-to-snowflake`, the lake through `postgres-to-s3`; Snowflake is fakesnow served on
loopback), --runs rounds of: `stripe-platform sync` as a process of its own, killed with SIGKILL
(its whole process group) after a random delay drawn from 0 to the time a clean sync of that
kind takes (a re-snapshot or an incremental sync, each timed once beforehand); one round
in four first drops the connection's replication slot (a DBA, max_slot_wal_keep_size or a
failover would), so kills land in re-snapshots too. Then the writer stops, two clean syncs run,
and every incremental stream of the source is compared with the destination's live rows (the
warehouse's rows without `_ab_cdc_deleted_at`; the lake's files deduplicated on primary key by
latest `_ab_cdc_lsn`, deletions dropped), column by column:

- lost: a source row the destination does not have;
- extra: a live destination row the source does not have (a deleted row that came back);
- duplicated: a key the warehouse holds more than once;
- differing: a key both have with different values.

Prints a table and writes JSON (default bench/results/fault-<UTC time>.json). Exit 1 if any count
is not 0. It measures correctness, not speed: a small scale is enough (run_all uses 0.01).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import decimal
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import duckdb
import psycopg
from psycopg import sql

from stripe_platform.config import load_settings
from stripe_platform.docstore.client import connect as connect_docs
from stripe_platform.ingestion.catalog import load_catalog
from stripe_platform.ingestion.postgres import cdc
from stripe_platform.oltp import db
from stripe_platform.oltp.migrate import migrate
from stripe_platform.runtime import embedded
from stripe_platform.seed.dataset import build
from stripe_platform.seed.load import seed
from stripe_platform.seed.spec import make_spec

HERE = Path(__file__).resolve().parent
DATABASE = "bench_fault"
WAREHOUSE_DB = "bench_fault_warehouse"
DESTINATIONS = ("duckdb", "postgres", "snowflake", "lake")


# -- values ----------------------------------------------------------------------------------------
def _norm(value: Any) -> Any:
    """One comparable form for a value read from any backend: numbers by value, times in UTC,
    JSON as canonical text."""
    if value is None:
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float, decimal.Decimal)):
        number = decimal.Decimal(str(value)) if isinstance(value, float) else decimal.Decimal(value)
        return format(number.normalize(), "f") if number == number else "NaN"
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC).isoformat()
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, default=str)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    text = str(value)
    if text[:1] in "{[":
        with contextlib.suppress(ValueError):
            return json.dumps(json.loads(text), sort_keys=True, default=str)
    return text


def _keyed(rows: list[tuple], names: list[str], key: list[str]) -> dict[tuple, tuple]:
    at = [names.index(k) for k in key]
    return {tuple(_norm(r[i]) for i in at): tuple(_norm(v) for v in r) for r in rows}


# -- destinations ----------------------------------------------------------------------------------
class Destination:
    """A destination's settings for the sync process, and its live rows once the run is over."""

    connection = "postgres-to-snowflake"

    def __init__(self, name: str, base_env: dict[str, str], home: Path) -> None:
        self.name, self.home = name, home
        self.env = dict(base_env)

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def live(self, table: str, names: list[str], key: list[str]) -> tuple[dict, int]:
        """(key -> row) of live rows, and how many keys appear more than once."""
        rows = self.query(
            f"SELECT {', '.join(names)} FROM {self.schema}.postgres_{table} "
            "WHERE _ab_cdc_deleted_at IS NULL"
        )
        at = [names.index(k) for k in key]
        counts = Counter(tuple(_norm(r[i]) for i in at) for r in rows)
        return _keyed(rows, names, key), sum(n - 1 for n in counts.values() if n > 1)

    schema = "raw"

    def query(self, text: str) -> list[tuple]:
        raise NotImplementedError


class DuckDBDestination(Destination):
    def __init__(self, name: str, base_env: dict[str, str], home: Path) -> None:
        super().__init__(name, base_env, home)
        self.file = home / "fault-warehouse.duckdb"
        self.env.update(
            STRIPE_PLATFORM_WAREHOUSE="duckdb", STRIPE_PLATFORM_WAREHOUSE_PATH=str(self.file)
        )

    def query(self, text: str) -> list[tuple]:
        with duckdb.connect(str(self.file), read_only=True) as conn:
            return conn.execute(text).fetchall()


class PostgresDestination(Destination):
    def __init__(self, name: str, base_env: dict[str, str], home: Path, settings) -> None:
        super().__init__(name, base_env, home)
        self.settings = settings
        self.dsn = db.conninfo(settings.model_copy(update={"pg_database": WAREHOUSE_DB}))
        self.env.update(
            STRIPE_PLATFORM_WAREHOUSE="postgres", STRIPE_PLATFORM_WAREHOUSE_DSN=self.dsn
        )

    def start(self) -> None:
        with db.connect(self.settings, database="postgres", autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(WAREHOUSE_DB)
                )
            )
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(WAREHOUSE_DB)))

    def query(self, text: str) -> list[tuple]:
        with psycopg.connect(self.dsn) as conn:
            return conn.execute(text).fetchall()


class SnowflakeDestination(Destination):
    schema = "ANALYTICS.RAW"

    def start(self) -> None:
        import fakesnow

        self._server = fakesnow.server(host="127.0.0.1")
        self.kwargs = self._server.__enter__()
        self.env.update(
            STRIPE_PLATFORM_WAREHOUSE="snowflake",
            STRIPE_PLATFORM_SNOWFLAKE_ACCOUNT=str(self.kwargs["account"]),
            STRIPE_PLATFORM_SNOWFLAKE_USER=str(self.kwargs["user"]),
            STRIPE_PLATFORM_SNOWFLAKE_PASSWORD=str(self.kwargs["password"]),
            STRIPE_PLATFORM_SNOWFLAKE_HOST=str(self.kwargs["host"]),
            STRIPE_PLATFORM_SNOWFLAKE_PORT=str(self.kwargs["port"]),
            STRIPE_PLATFORM_SNOWFLAKE_PROTOCOL="http",
            STRIPE_PLATFORM_SNOWFLAKE_SCHEMA="RAW",  # fakesnow's MERGE needs a current schema
        )

    def stop(self) -> None:
        self._server.__exit__(None, None, None)

    def query(self, text: str) -> list[tuple]:
        import snowflake.connector

        with snowflake.connector.connect(**self.kwargs, database="ANALYTICS") as conn:
            return conn.cursor().execute(text).fetchall()


class LakeDestination(Destination):
    connection = "postgres-to-s3"

    def __init__(self, name: str, base_env: dict[str, str], home: Path) -> None:
        super().__init__(name, base_env, home)
        self.root = home / "fault-lake"
        self.env.update(STRIPE_PLATFORM_LAKE_URI=str(self.root))

    def live(self, table: str, names: list[str], key: list[str]) -> tuple[dict, int]:
        glob = self.root / "raw" / "postgres" / table / "**" / "*.parquet"
        keys = ", ".join(key)
        rows = duckdb.sql(
            f"SELECT {', '.join(names)} FROM ("
            f"  SELECT *, row_number() OVER (PARTITION BY {keys}"
            f"    ORDER BY _airbyte_generation_id DESC, _ab_cdc_lsn DESC,"
            f"    _ab_cdc_deleted_at DESC NULLS LAST) AS n"
            f"  FROM read_parquet('{glob}', union_by_name = true, hive_partitioning = false)"
            f") WHERE n = 1 AND _ab_cdc_deleted_at IS NULL"
        ).fetchall()
        return _keyed(rows, names, key), 0


# -- the run ---------------------------------------------------------------------------------------
def _sync(env: dict[str, str], connection: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "stripe_platform.cli", "sync", connection, "--json"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: the kill takes its children too
    )


def _clean_sync(env: dict[str, str], connection: str) -> dict[str, Any]:
    proc = _sync(env, connection)
    out, err = proc.communicate(timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"clean sync of {connection} failed: {err.decode()[-2000:]}")
    return json.loads(out)


def _timed_clean_sync(env: dict[str, str], connection: str) -> float:
    started = time.monotonic()
    _clean_sync(env, connection)
    return time.monotonic() - started


def _writer(env: dict[str, str], tps: int, log: Path) -> subprocess.Popen:
    # Its output goes to a file: a pipe nobody reads fills up and blocks the writer.
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "stripe_platform.cli", "seed", "--tps", str(tps)],
            env=env,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )


def _stop_writer(writer: subprocess.Popen) -> str:
    """Ctrl-C, as a user stops `seed --tps` (its tick commits whole or not at all); a writer
    that has not stopped 30 s later is killed: the comparison reads what the source committed."""
    writer.send_signal(signal.SIGINT)
    try:
        writer.wait(timeout=30)
        return "interrupted"
    except subprocess.TimeoutExpired:
        os.killpg(writer.pid, signal.SIGKILL)
        writer.wait()
        return "killed (did not stop within 30 s of Ctrl-C)"


def _decrypted(settings, table: str, names: list[str], got: dict[tuple, tuple]) -> dict:
    """The destination's protected columns (encrypted at rest per data subject by the raw layer,
    security/subjects_layer.py) decrypted with the platform's keys, so they compare with the
    source's bytes (a crash that re-delivers a batch re-encrypts it under a new nonce)."""
    from stripe_platform.governance.classification import load_catalog
    from stripe_platform.security.envelope import shared_envelope
    from stripe_platform.security.subjects_layer import decrypt_column

    if not settings.encrypt_at_rest:
        return got
    protected = {
        e.field.lower()
        for e in load_catalog().protected("lake")
        if e.dataset == f"postgres.{table}"
    }
    at = [i for i, n in enumerate(names) if n.lower() in protected]
    if not at:
        return got
    envelope = shared_envelope(settings)
    out = {}
    for k, row in got.items():
        row = list(row)
        for i in at:
            if row[i] is not None:
                [clear] = decrypt_column(
                    envelope, "postgres", table, names[i], [bytes.fromhex(row[i])]
                )
                row[i] = clear.hex()
        out[k] = tuple(row)
    return out


def _compare(settings, catalog, dest: Destination) -> dict[str, dict[str, int]]:
    result: dict[str, dict[str, int]] = {}
    with db.connect(settings) as conn:
        for stream in catalog.resolve(dest.connection).incremental:
            names = [
                r[0]
                for r in conn.execute(
                    "SELECT a.attname FROM pg_attribute a WHERE a.attrelid = to_regclass(%s) "
                    "AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
                    (f"public.{stream.name}",),
                ).fetchall()
                if r[0] not in stream.exclude_columns
            ]
            key = [k.lower() for k in stream.primary_key]
            source = _keyed(
                conn.execute(
                    sql.SQL("SELECT {} FROM {}").format(
                        sql.SQL(", ").join(map(sql.Identifier, names)),
                        sql.Identifier("public", stream.name),
                    )
                ).fetchall(),
                names,
                key,
            )
            got, duplicated = dest.live(stream.name, names, key)
            got = _decrypted(settings, stream.name, names, got)
            result[stream.name] = {
                "source_rows": len(source),
                "lost": len(source.keys() - got.keys()),
                "extra": len(got.keys() - source.keys()),
                "duplicated": duplicated,
                "differing": sum(1 for k in source.keys() & got.keys() if source[k] != got[k]),
            }
    return result


def run_destination(settings, catalog, dest: Destination, runs: int, tps: int, rng) -> dict:
    connection = catalog.resolve(dest.connection)
    dest.start()
    try:
        with db.connect(settings, autocommit=True) as conn:
            cdc.drop_slot(conn, connection.slot(conn.info.dbname))
        snapshot_seconds = _timed_clean_sync(dest.env, dest.connection)  # the first: a snapshot
        incremental_seconds = _timed_clean_sync(dest.env, dest.connection)
        writer_log = dest.home / f"fault-writer-{dest.name}.log"
        writer = _writer(dest.env, tps, writer_log)
        kills = Counter()
        try:
            for number in range(runs):
                if number % 4 == 3:  # the slot is lost: this sync re-snapshots
                    with db.connect(settings, autocommit=True) as conn:
                        cdc.drop_slot(conn, connection.slot(conn.info.dbname))
                proc = _sync(dest.env, dest.connection)
                delay = rng.uniform(0, snapshot_seconds if number % 4 == 3 else incremental_seconds)
                try:
                    proc.wait(timeout=delay)
                    kills["finished before the kill"] += 1
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    kills["killed"] += 1
                print(
                    f"  {dest.name} run {number + 1}/{runs}: "
                    f"{'killed' if proc.returncode == -signal.SIGKILL else 'ended'} "
                    f"after {delay:.2f} s",
                    flush=True,
                )
                if proc.returncode not in (0, -signal.SIGKILL):
                    raise RuntimeError(
                        f"{dest.name} sync failed: {proc.stderr.read().decode()[-2000:]}"
                    )
        finally:
            writer_stop = _stop_writer(writer)
            if writer_stop != "interrupted":
                tail = writer_log.read_text(errors="replace")[-2000:]
                print(f"  {dest.name}: the writer was {writer_stop}; its last output:\n{tail}")
        reports = [_clean_sync(dest.env, dest.connection) for _ in range(2)]
        tables = _compare(settings, catalog, dest)
        return {
            "destination": dest.name,
            "connection": dest.connection,
            "runs": runs,
            "killed": kills["killed"],
            "finished_before_kill": kills["finished before the kill"],
            "clean_snapshot_seconds": round(snapshot_seconds, 2),
            "clean_incremental_seconds": round(incremental_seconds, 2),
            "writer": writer_stop,
            "final_phases": [r.get("phase") for r in reports],
            "tables": tables,
            **{
                what: sum(t[what] for t in tables.values())
                for what in ("lost", "extra", "duplicated", "differing")
            },
        }
    finally:
        dest.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--destinations", default=",".join(DESTINATIONS))
    parser.add_argument("--scale", type=float, default=0.003)
    parser.add_argument("--tps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=16)
    parser.add_argument("--home", type=Path, help="platform home (default: a temporary one)")
    parser.add_argument("--json", action="store_true", help="print the JSON result only")
    parser.add_argument("--output", type=Path, help="JSON file to write")
    args = parser.parse_args()
    chosen = [d.strip() for d in args.destinations.split(",") if d.strip()]
    unknown = set(chosen) - set(DESTINATIONS)
    if unknown or args.runs < 1:
        parser.error(f"--destinations takes {', '.join(DESTINATIONS)}; --runs at least 1")

    home = args.home or Path(tempfile.mkdtemp(prefix="stripe-platform-fault-"))
    home.mkdir(parents=True, exist_ok=True)
    home.chmod(0o755)  # the cluster runs as an unprivileged OS user under root
    # A cluster of its own on a free port: a port or profile set for another cluster stays out.
    base = load_settings(home=home, pg_fsync=True, profile="embedded", pg_port=None)
    embedded.up(base)
    s = base.model_copy(update={"pg_database": DATABASE, "mongodb_database": DATABASE})
    try:
        with db.connect(base, database="postgres", autocommit=True) as conn:
            if not conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)
            ).fetchone():
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE)))
        with db.connect(s, autocommit=True) as conn:
            migrate(conn)
        spec = make_spec(scale=args.scale, end=dt.date.today(), max_documents=200)
        seed(s, build(spec), connect_docs(s), reset_first=False)
        env = {
            **os.environ,
            "STRIPE_PLATFORM_HOME": str(home),
            "STRIPE_PLATFORM_PROFILE": "embedded",
            "STRIPE_PLATFORM_PG_DATABASE": DATABASE,
            "STRIPE_PLATFORM_MONGODB_DATABASE": DATABASE,
        }
        for name in ("MONGODB_URI", "STRIPE_PLATFORM_PG_PORT", "STRIPE_PLATFORM_PG_DSN"):
            env.pop(name, None)
        catalog = load_catalog()
        rng = random.Random(args.seed)
        factories = {
            "duckdb": lambda: DuckDBDestination("duckdb", env, home),
            "postgres": lambda: PostgresDestination("postgres", env, home, s),
            "snowflake": lambda: SnowflakeDestination("snowflake", env, home),
            "lake": lambda: LakeDestination("lake", env, home),
        }
        results = []
        for name in chosen:
            print(f"{name}: {args.runs} killed syncs under `seed --tps {args.tps}` ...", flush=True)
            started = time.monotonic()
            result = run_destination(s, catalog, factories[name](), args.runs, args.tps, rng)
            result["seconds"] = round(time.monotonic() - started, 1)
            results.append(result)
    finally:
        embedded.down(base)
        if args.home is None:
            shutil.rmtree(home, ignore_errors=True)

    output = {
        "benchmark": "fault",
        "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "scale": args.scale,
        "tps": args.tps,
        "seed": args.seed,
        "results": results,
    }
    path = args.output or HERE / "results" / f"fault-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(output, indent=2) + "\n")
    if args.json:
        print(json.dumps(output, indent=2))
    else:
        print("\n| destination | runs | killed | lost | extra | duplicated | differing | time |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in results:
            print(
                f"| {r['destination']} | {r['runs']} | {r['killed']} | {r['lost']} | "
                f"{r['extra']} | {r['duplicated']} | {r['differing']} | {r['seconds']} s |"
            )
        print(f"\nwritten to {path}")
    bad = any(r[w] for r in results for w in ("lost", "extra", "duplicated", "differing"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
