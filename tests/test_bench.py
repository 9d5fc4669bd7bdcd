"""The benchmarks stay runnable: a smoke run of bench/run_all.py at a tiny scale (seed and mongo: the
whole path of run_all, from a fresh platform home and its cluster to the table, in about a minute;
into a temporary home and output directory, never bench/results), a smoke run of the fault suite
(one killed sync into DuckDB, about 25 s), one of the ml benchmark through run_all at scale 0.01
(10,000 payments, about 40 s), and the table rows built from each other benchmark's JSON as its
script writes it (ingest, transform and demo take minutes even at a tiny scale). The real
benchmarks never run in `make test`."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


run_all = load("run_all")
demo_bench = load("demo_bench")


def positive(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


@pytest.mark.timeout(420)
def test_smoke_run_all_writes_json_and_markdown_with_real_numbers(tmp_path: Path) -> None:
    home = Path(tempfile.mkdtemp(prefix="stripe-platform-bench-test-"))
    home.chmod(0o755)  # the cluster runs as an unprivileged OS user under root
    out = tmp_path / "results"
    started = time.time()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRIPE_PLATFORM_")}
    env.pop("MONGODB_URI", None)
    env.update(STRIPE_PLATFORM_HOME=str(home), STRIPE_PLATFORM_PG_FSYNC="false")
    try:
        done = subprocess.run(
            [
                sys.executable,
                str(BENCH / "run_all.py"),
                *("--scale", "0.002", "--runs", "1", "--only", "seed,mongo"),
                *("--output-dir", str(out)),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=400,
            check=False,
        )
    finally:
        shutil.rmtree(home, ignore_errors=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    [json_file] = out.glob("*.json")
    [md_file] = out.glob("*.md")
    assert json_file.stem == md_file.stem  # YYYY-MM-DD
    report = json.loads(json_file.read_text())
    assert report["scale"] == 0.002 and report["runs"] == 1
    assert set(report["benchmarks"]) == {"seed", "mongo"}
    assert all(b["ok"] for b in report["benchmarks"].values())
    machine = report["machine"]
    assert machine["cores"] >= 1 and machine["memory_gb"] > 0
    for key in ("python", "postgresql", "duckdb", "dbt", "airflow"):
        assert machine[key] and machine[key] != "not installed", key

    rows = report["rows"]
    sections = {r["section"] for r in rows}
    assert {"seed", "document seed", "documents", "keyed access", "score updates"} <= sections
    assert all(positive(r["value"]) for r in rows), [r for r in rows if not positive(r["value"])]
    assert any(r["what"].startswith("seed into PostgreSQL: transaction") for r in rows)
    oltp = [r for r in rows if r["what"].startswith("seed into PostgreSQL")]
    assert oltp and all(" floor, " in r["ratio"] and "peer" in r["ratio"] for r in oltp), oltp
    # The document store is the embedded server, beside its PostgreSQL floors and the stand-in.
    assert report["benchmarks"]["mongo"]["result"]["server"] == "ferretdb"
    documents = [r for r in rows if r["section"] == "document seed"]
    assert len(documents) == 7, documents  # six collections and all of them
    assert all(r["what"].startswith("seed into the document store") for r in documents)
    assert all(r["ratio"].endswith("× floor") for r in documents), documents
    queries = [r for r in rows if r["section"] == "documents" and "stand-in (" not in r["what"]]
    standin = [r for r in rows if r["section"] == "documents" and "stand-in (" in r["what"]]
    assert len(queries) == len(standin) == 3  # the brief's three queries, each on both stores
    assert all("× floor, " in r["ratio"] and "× stand-in" in r["ratio"] for r in queries), queries
    # Every query answers what its SQL floor answers (FerretDB's $elemMatch is worked around).
    assert not any("different results" in r["reference"] for r in queries), queries
    keyed = [r for r in rows if r["section"] == "keyed access"]
    assert len(keyed) == 3 and all(r["rows"].endswith(" 1 scanned → 1") for r in keyed), keyed
    assert all("Index Scan on " in r["reference"] for r in keyed), keyed  # not a Seq Scan
    updates = [r for r in rows if r["section"] == "score updates"]
    # at most 40 updates in flight in all: FerretDB v1 hangs on an update command of ~49
    assert [re.search(r"\d+ writers?, at most \d+ per command", r["what"])[0] for r in updates] == [
        "1 writer, at most 40 per command",
        "2 writers, at most 20 per command",
        "4 writers, at most 10 per command",
    ]
    assert all("× floor, " in r["ratio"] and "× set-based" in r["ratio"] for r in updates)

    table = md_file.read_text()
    lines = [line for line in table.splitlines() if line.startswith("|")]
    assert lines[0].startswith("| measure | median | min – max |")
    assert len(lines) == 2 + len(rows)
    assert all(line.count(" | ") == lines[0].count(" | ") for line in lines[2:])
    assert "scale 0.002" in table and "PostgreSQL" in table
    assert table in done.stdout  # printed at the end
    assert run_all.render(json_file) == 0  # --render rebuilds the same table from the JSON
    assert md_file.read_text() == table

    # Nothing of this run lands in the repository (others' benchmarks may be writing there now).
    written = [
        p
        for p in (BENCH / "results").glob("*.json")
        if p.stat().st_mtime >= started and json.loads(p.read_text()).get("scale") == 0.002
    ]
    assert written == []


INGEST = {
    "benchmark": "ingest",
    "rows": 1000,
    "copy_binary_bytes": 2_000_000,
    "seconds": {
        "floor": [0.02, 0.01, 0.01, 0.012],
        "csv_arrow": [0.05, 0.03, 0.02, 0.04],
        "connectorx": ["not run: could not install connectorx (offline)"],
        "connectorx_partitioned": [0.05, 0.02, 0.02, 0.03],
        "duckdb_scanner": ["not run: could not install duckdb (offline)"],
        "lake": [0.2, 0.1, 0.1, 0.1],
        "duckdb": [0.3, 0.2, 0.2, 0.2],
    },
    "cdc": {
        "update_rows": 100_000,
        "rounds": [  # the first round is the warm-up
            {
                "changes": 500,
                "seconds": s,
                "floor_changes": 500,
                "floor_seconds": 0.05,
                "pgoutput_bytes": 60_000,
                "recvlogical_seconds": 0.1,
            }
            for s in (0.9, 0.5, 0.4, 0.6)
        ],
        "seconds": [0.9, 0.5, 0.4, 0.6],
    },
    "latency_s": {
        "sync_loop_commit": {"n": 10, "transactions": 5, "p50": 0.2, "p95": 0.5, "p99": 0.6},
        "follow_commit": {"n": 10, "transactions": 5, "p50": 0.1, "p95": 0.3, "p99": 0.4},
        "follow_createdat": {"n": 10, "transactions": 5, "p50": 1.0, "p95": 1.3, "p99": 1.4},
    },
}


def test_ingest_rows_stand_beside_floor_and_peer_with_ratios() -> None:
    rows = {r.what: r for r in run_all.rows_ingest(INGEST)}
    lake = rows["full-refresh sync → lake (parquet)"]
    assert lake.value == pytest.approx(10_000)  # warm-up dropped: 1000 rows / 0.1 s
    assert lake.median == "10,000 rows/s" and "20.0 MB/s" in lake.size
    # the fastest peer that ran, whichever it is
    assert lake.reference == (
        "floor 100,000 rows/s; best peer (connectorx, a partition per core) 50,000 rows/s"
    )
    assert lake.ratio == "0.10× floor, 0.20× peer"
    assert rows["extract, peer: connectorx → parquet (own venv)"].median.startswith("not run")
    scanner = rows["extract, peer: DuckDB 1.5 postgres scanner → parquet (own venv)"]
    assert scanner.median == "not run: could not install duckdb (offline)"
    cdc = [r for r in rows.values() if r.section == "cdc"]
    assert [r.median for r in cdc] == [
        "10,000 changes/s",  # floor: 500 changes / 0.05 s
        "5,000 changes/s",  # peer: pg_recvlogical, 0.1 s
        "1,000 changes/s",  # the platform: median of 0.5, 0.4, 0.6 s (warm-up 0.9 s dropped)
        "p50 0.20 s",
        "p50 0.10 s",
    ]
    sync = cdc[2]
    assert sync.what == "CDC sync of a 500-row UPDATE into DuckDB (3 runs)"
    assert sync.spread == "833 – 1,250" and sync.size == "60.0 kB pgoutput"
    assert sync.reference == "floor 10,000 changes/s; peer (pg_recvlogical) 5,000 changes/s"
    assert sync.ratio == "0.10× floor, 0.20× peer"
    assert cdc[1].ratio == "0.50× floor"
    assert "p99 0.60 s" in cdc[3].spread
    # rounds: the first is the warm-up; each percentile is the median of the others, min – max
    rounds = [
        {"n": 10, "transactions": 5, "p50": p, "p95": 2 * p, "p99": 3 * p}
        for p in (0.9, 0.1, 0.3, 0.2)
    ]
    result = {**INGEST, "latency_s": {"follow_commit": {"runs": rounds}}}
    (latency,) = [r for r in run_all.rows_ingest(result) if "latency" in r.what]
    assert latency.what.endswith("(3 runs)") and latency.median == "p50 0.20 s"
    assert "p95 0.40 s (0.20 – 0.60)" in latency.spread
    # an older result (one round, no reference) still renders
    old = run_all.rows_cdc({"changes": 500, "seconds": 0.5})
    assert [r.median for r in old] == ["1,000 changes/s"]
    assert old[0].reference == "no floor or peer measured"
    # a peer that could not run says so, and the platform keeps its floor
    failed = [
        {**r, "recvlogical_seconds": "not run: no pg_recvlogical"} for r in INGEST["cdc"]["rounds"]
    ]
    rows = run_all.rows_cdc({**INGEST["cdc"], "rounds": failed})
    assert rows[1].median == "not run: no pg_recvlogical"
    assert rows[2].ratio == "0.10× floor"


def test_seed_rows_stand_beside_floor_and_peer_with_ratios() -> None:
    def run(platform_s: float) -> dict:
        return {
            "oltp_total_s": 10.0,
            "state_changes": 2100,
            "tables": {
                "transaction": {
                    "rows": 2000,
                    "seconds": platform_s,
                    "rows_per_s": 2000 / platform_s,
                }
            },
            "reference": {
                "transaction": {
                    "rows": 2000,
                    "all_rows": 4100,
                    "binary_bytes": 3_000_000,
                    "csv_bytes": 2_000_000,
                    "floor_s": 0.1,
                    "psql_s": 0.4,
                }
            },
            "documents": {
                "Log": {"rows": 500, "seconds": platform_s, "rows_per_s": 500 / platform_s}
            },
            "document_reference": {
                "Log": {
                    "documents": 500,
                    "bson_bytes": 2_500_000,
                    "generate_s": 0.05,
                    "floor_s": 0.1,
                    "bulk_s": 0.25,
                }
            },
        }

    rows = run_all.rows_seed({"runs": [run(9.0), run(1.0), run(2.0), run(1.0)]})
    log = rows[-1]
    assert log.what == "seed into the document store: Log" and log.median == "500 docs/s"
    assert log.size == "2.5 MB as BSON"
    assert log.reference == (
        "floor (BSON into plain SQLite, same docs) 5,000 docs/s; stand-in's own insert_many "
        "(no indexes) 2,000 docs/s; generation alone 10,000 docs/s"
    )
    assert log.ratio == "0.10× floor, 0.25× insert_many"
    tx = rows[0]
    assert tx.what == "seed into PostgreSQL: transaction (+2,100 state changes)"
    assert tx.median == "2,000 rows/s" and tx.size == "3.0 MB as COPY binary"
    assert tx.reference == (
        "floor (COPY binary, same rows) 20,000 rows/s; peer (psql \\copy csv) 5,000 rows/s"
    )
    assert tx.ratio == "0.10× floor, 0.40× peer"
    older = run_all.rows_seed({"runs": [{**run(1.0), "reference": {}, "document_reference": {}}]})
    assert older[0].reference == "no floor or peer measured" and older[0].ratio == ""
    assert older[-1].reference == "no floor or peer measured"


def _ms(median: float, low: float, high: float, n: int) -> dict:
    return {"median": median, "p95": high, "min": low, "max": high, "n": n}


MONGO = {
    "benchmark": "mongo",
    "runs": 3,
    "server": "ferretdb",
    "backend": "FerretDB v1.24.2 on PostgreSQL",
    "goals": {
        "query_ms": 100.0,
        "seed_docs_per_s": 20_000.0,
        "keyed_ms": 5.0,
        "updates_per_s": 20_000.0,
    },
    "seed": {
        "collections": {
            "Log": {
                "documents": 5000,
                "seconds": 0.5,
                "docs_per_s": 10_000.0,
                "generate_s": 0.1,
                "check_s": 0.25,
                "checked_by_application": True,
                "stored_bytes": 2_000_000,
                "floor_s": 0.05,
            },
            "Transaction": {
                "documents": 45_000,
                "seconds": 1.5,
                "docs_per_s": 30_000.0,
                "generate_s": 0.4,
                "check_s": 1.5,
                "checked_by_application": True,
                "stored_bytes": 8_000_000,
                "floor_s": 0.95,
            },
        },
        "all": {
            "documents": 50_000,
            "seconds": 2.0,
            "docs_per_s": 25_000.0,
            "generate_s": 0.5,
            "check_s": 1.75,
            "floor_s": 1.0,
        },
    },
    "queries": {
        "top": {
            "documents_in_collection": 200_000,
            "scanned": 200_000,
            "results": 5,
            "ms": _ms(250.0, 200.0, 300.0, 6),
            "plan": {"nodes": ["Seq Scan"], "index": False},
            "floor": {"results": 5, "same_results": True, "ms": _ms(50.0, 40.0, 60.0, 30)},
        },
        "logs": {
            "documents_in_collection": 5_004,
            "scanned": 1_700,
            "results": 0,
            "ms": _ms(8.0, 7.0, 9.0, 30),
            "plan": {"nodes": ["Bitmap Heap Scan", "Bitmap Index Scan on log_user_gin"]},
            "floor": {"results": 85, "same_results": False, "ms": _ms(2.0, 1.0, 3.0, 30)},
        },
    },
    "standin": {
        "version": "0.2.0",
        "cap": 25_000,
        "queries": {
            "top": {
                "documents_in_collection": 25_000,
                "results": 5,
                "ms": _ms(12_500.0, 12_000.0, 13_000.0, 4),
            },
            "logs": {
                "documents_in_collection": 5_004,
                "results": 85,
                "ms": _ms(16.0, 15.0, 17.0, 30),
            },
        },
    },
    "keyed": {
        "documents": 1_000_000,
        "ops": {
            "find_one_by_id": {
                "ms": {"median": 1.0, "p95": 6.0, "min": 0.5, "max": 9.0, "n": 600},
                "plan": {"nodes": ["Bitmap Heap Scan", "Bitmap Index Scan on t_id_gin"]},
                "scanned": 1,
                "floor": {"ms": _ms(0.25, 0.2, 0.3, 600)},
            },
            "update_one_by_transaction_id": {
                "ms": {"median": 2.0, "p95": 4.0, "min": 1.0, "max": 7.0, "n": 600},
                "plan": {"nodes": ["Bitmap Heap Scan", "Bitmap Index Scan on t_tid_gin"]},
                "scanned": 1,
            },
        },
    },
    "bulk": {
        "writers": {
            "1": {
                "per_command": 40,
                "runs": [
                    {"updates": 5000, "updates_per_s": 500.0},
                    {"updates": 5000, "updates_per_s": 400.0},
                    {"updates": 4000, "updates_per_s": 600.0},
                ],
            }
        },
        "floor": {"updates_per_s": 1000.0, "per_transaction": 40},
        "set_based_floor": {"updates_per_s": 25_000.0, "per_statement": 1000},
    },
}


def test_mongo_rows_stand_beside_floors_and_the_stand_in_against_the_goals() -> None:
    rows = {r.what: r for r in run_all.rows_mongo(MONGO)}
    server = "(FerretDB v1.24.2 on PostgreSQL, 1 run, no cap)"
    log = rows[f"seed into the document store: Log {server}"]
    assert (log.median, log.spread, log.rows) == ("10,000 docs/s", "1 run", "5,000")
    assert log.size == "2.0 MB stored in PostgreSQL"
    assert log.reference == (
        "floor (the stored rows, COPY binary into a plain table) 100,000 docs/s; "
        "generation alone 50,000 docs/s; validator checks alone 20,000 docs/s"
    )
    assert log.ratio == "0.10× floor"
    everything = rows[f"seed into the document store: all (2 collections) {server}"]
    assert (
        everything.median == "25,000 docs/s" and everything.size == "10.0 MB stored in PostgreSQL"
    )
    assert everything.reference.startswith("goal ≥ 20,000 docs/s: met; floor (the stored rows")
    assert everything.ratio == "0.50× floor"

    top = rows["document query `top` (FerretDB v1.24.2 on PostgreSQL, 6 executions in 3 runs)"]
    assert (top.median, top.spread) == ("250 ms", "200 ms – 300 ms")
    assert top.rows == "200,000 docs, 200,000 scanned → 5"
    assert top.reference == (
        "goal < 100 ms: MISSED; plan: Seq Scan; floor (one SQL statement on FerretDB's table) "
        "50.00 ms → 5; stand-in at its 25,000 cap 12,500 ms on 25,000 docs → 5"
    )
    assert top.ratio == "5.00× floor, 0.02× stand-in"
    logs = rows["document query `logs` (FerretDB v1.24.2 on PostgreSQL, 30 executions in 3 runs)"]
    assert logs.reference.startswith(
        "goal < 100 ms: met; plan: Bitmap Heap Scan > Bitmap Index Scan on log_user_gin; "
        "floor (one SQL statement on FerretDB's table) 2.00 ms → 85 (different results); "
    )
    standin = rows[
        "document query `top`, stand-in (litemongo 0.2.0) at its 25,000-document cap "
        "(4 executions in 3 runs)"
    ]
    assert (standin.median, standin.rows) == ("12,500 ms", "25,000 docs → 5")

    by_id = rows["keyed find_one by _id (FerretDB v1.24.2 on PostgreSQL, 600 calls in 3 runs)"]
    assert (by_id.median, by_id.spread) == ("1.00 ms", "p95 6.00 ms, min 0.50 ms, max 9.00 ms")
    assert by_id.rows == "1,000,000 docs, 1 scanned → 1"
    assert by_id.reference == (
        "goal < 5 ms median and p95: MISSED; plan: Bitmap Heap Scan > Bitmap Index Scan on "
        "t_id_gin; floor (FerretDB's own SQL over psycopg) 0.25 ms"
    )
    assert by_id.ratio == "4.00× floor"
    update = rows[
        "keyed update_one by transaction_id ($set AnomalyScore) (FerretDB v1.24.2 on PostgreSQL, "
        "600 calls in 3 runs)"
    ]
    assert update.reference == (
        "goal < 5 ms median and p95: met; plan (of its lookup): Bitmap Heap Scan > "
        "Bitmap Index Scan on t_tid_gin"
    )
    assert update.ratio == ""

    [bulk] = [r for r in rows.values() if r.section == "score updates"]
    assert bulk.what == (
        "bulk score updates by transaction_id ($set AnomalyScore, isFraud), 1 writer, at most 40 "
        "per command (FerretDB v1.24.2 on PostgreSQL, 3 runs)"
    )
    assert (bulk.median, bulk.spread, bulk.rows) == (
        "500 updates/s",
        "400 – 600",
        "4,000 updates a run",
    )
    assert bulk.reference == (
        "goal ≥ 20,000/s: MISSED; floor (the same UPDATEs over one psycopg connection, 40 a "
        "transaction) 1,000 updates/s; set-based floor (one UPDATE joined to 1,000 new scores) "
        "25,000 updates/s"
    )
    assert bulk.ratio == "0.50× floor, 0.02× set-based"
    assert len(rows) == 2 + 1 + 2 + 2 + 2 + 1


def test_mongo_rows_of_the_stand_in_era_still_render() -> None:
    older = {
        "backend": "litemongo stand-in",
        "runs": 3,
        "executions_per_run": 10,
        "queries": {
            "top": {
                "documents_in_collection": 25_025,
                "results": 5,
                "ms": {"median": 12_224.0, "min": 11_114.0, "max": 13_423.0},
                "reference_ms": {"median": 11_594.0},
            }
        },
    }
    [row] = run_all.rows_mongo(older)
    assert row.what == "document query `top` (litemongo stand-in, 3 runs × 10)"
    assert (row.median, row.ratio) == ("12,224 ms", "1.05× scan")


def test_transform_and_demo_rows() -> None:
    spread = {"median": 2.0, "min": 1.5, "max": 3.0, "runs": 3}
    transform = {
        "transactions": 2000,
        "full_build_seconds": spread,
        "full_build_dbt_seconds": {**spread, "median": 1.0},
        "incremental_build_seconds": spread,
        "incremental_build_dbt_seconds": {**spread, "median": 0.5},
        "query_ms": {q: {**spread, "runs": 20} for q in ("a", "b", "c")},
    }
    rows = run_all.rows_transform(transform)
    assert [r.ratio for r in rows[:2]] == ["2.00× dbt's own", "4.00× dbt's own"]
    assert sum(r.section == "olap" for r in rows) == 3

    output = "  1.0s starting\n 95.2s done: runtime 1s, brief statements 3s, seed 12s, elt_warehouse_daily 70s\n"
    stages = demo_bench.parse_done(output)
    assert stages == {"runtime": 1, "brief statements": 3, "seed": 12, "elt_warehouse_daily": 70}
    run = {
        "first": {"wall_s": 100.0, "stages_s": stages},
        "incremental": {"wall_s": 50.0, "stages_s": stages},
    }
    demo = {
        "scale": 0.05,
        "first": demo_bench.summarise([run], "first"),
        "incremental": demo_bench.summarise([run], "incremental"),
    }
    rows = run_all.rows_demo(demo)
    assert rows[0].value == 100.0 and "first run" in rows[0].what
    assert any(r.ratio == "70% of wall" for r in rows)
    report = {
        "date": "2026-01-01",
        "scale": 0.05,
        "runs": 1,
        "machine": run_all.machine("15.0"),
        "load_average_at_end": (0.0, 0.0, 0.0),
        "rows": [vars(r) for r in rows],
        "not_measured": [run_all.GAPS["demo"]],
        "benchmarks": {"demo": {"seconds": 150.0}},
    }
    table = run_all.markdown(report)
    assert "PostgreSQL 15.0" in table and "| `stripe-platform demo --scale 0.05`" in table


@pytest.mark.timeout(330)
def test_smoke_fault_bench_kills_a_sync_and_counts_nothing_lost(tmp_path: Path) -> None:
    out = tmp_path / "fault.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRIPE_PLATFORM_")}
    env.pop("MONGODB_URI", None)
    done = subprocess.run(
        [
            sys.executable,
            str(BENCH / "fault_bench.py"),
            *("--runs", "1", "--destinations", "duckdb", "--scale", "0.002"),
            *("--output", str(out)),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["benchmark"] == "fault" and result["scale"] == 0.002
    [duckdb] = result["results"]
    assert duckdb["destination"] == "duckdb" and duckdb["runs"] == 1
    assert duckdb["killed"] + duckdb["finished_before_kill"] == 1
    for what in ("lost", "extra", "duplicated", "differing"):
        assert type(duckdb[what]) is int, what
    assert duckdb["lost"] == 0, duckdb["tables"]
    assert duckdb["tables"]["transaction"]["source_rows"] > 0  # rows were compared
    assert "| duckdb | 1 |" in done.stdout
    # run_all reads what the script writes
    [row] = run_all.rows_fault(result)
    assert row.section == "fault" and "duckdb" in row.what


def fault_result(**duckdb_counts: int) -> dict:
    def destination(name: str, connection: str, killed: int, seconds: float, **counts) -> dict:
        zero = {"lost": 0, "extra": 0, "duplicated": 0, "differing": 0}
        return {
            "destination": name,
            "connection": connection,
            "runs": 20,
            "killed": killed,
            "finished_before_kill": 20 - killed,
            "seconds": seconds,
            "tables": {
                "customer": {"source_rows": 100, **zero},
                "transaction": {"source_rows": 1900, **zero},
            },
            **zero,
            **counts,
        }

    return {
        "benchmark": "fault",
        "scale": 0.01,
        "tps": 40,
        "seed": 16,
        "results": [
            destination("duckdb", "postgres-to-snowflake", 19, 80.0, **duckdb_counts),
            destination("lake", "postgres-to-s3", 20, 9.5),
        ],
    }


def test_fault_rows_show_counts_and_fail_on_any_non_zero() -> None:
    duckdb, lake = run_all.rows_fault(fault_result())
    assert duckdb.what == (
        "sync killed (SIGKILL) at random points → duckdb (postgres-to-snowflake) "
        "under `seed --tps 40`, scale 0.01"
    )
    assert duckdb.median == "lost 0, extra 0, duplicated 0, differing 0"
    assert (
        duckdb.spread == "19/20 runs killed, 80.0 s" and lake.spread == "20/20 runs killed, 9.50 s"
    )
    assert duckdb.rows == "2,000 source rows"
    assert duckdb.value == 0 and not duckdb.failed and not lake.failed

    bad, lake = run_all.rows_fault(fault_result(lost=2, differing=1))
    assert bad.median == "FAILED: lost 2, extra 0, duplicated 0, differing 1"
    assert bad.value == 3 and bad.failed and not lake.failed

    # The script exits 1 with its counts written: its rows are kept, marked failed, nothing added.
    report = {"rows": [], "not_measured": []}
    entry = {"ok": False, "error": "| duckdb | 20 | 19 | 2 |", "result": fault_result(lost=2)}
    assert run_all.collect(report, "fault", entry) is True
    assert [r["failed"] for r in report["rows"]] == [True, False]
    assert report["not_measured"] == [run_all.GAPS["fault"]]
    report = {"rows": [], "not_measured": []}
    assert run_all.collect(report, "fault", {"ok": True, "result": fault_result()}) is False
    # a crash before any JSON: one FAILED row with the end of its output
    report = {"rows": [], "not_measured": []}
    assert run_all.collect(report, "fault", {"ok": False, "error": "Traceback: boom"}) is True
    [failed] = report["rows"]
    assert failed["what"] == "fault: FAILED" and failed["median"] == "Traceback: boom"

    report = {
        "date": "2026-01-01",
        "scale": 1.0,
        "runs": 3,
        "fault_runs": 20,
        "fault_scale": 0.01,
        "machine": run_all.machine("15.0"),
        "load_average_at_end": (0.0, 0.0, 0.0),
        "rows": [vars(r) for r in run_all.rows_fault(fault_result())],
        "not_measured": [run_all.GAPS["fault"]],
        "benchmarks": {"fault": {"seconds": 90.0}},
    }
    table = run_all.markdown(report)
    assert "fault suite at scale 0.01, 20 killed syncs per destination" in table
    assert "| lost 0, extra 0, duplicated 0, differing 0 | 19/20 runs killed, 80.0 s |" in table


def test_only_rejects_unknown_names() -> None:
    assert run_all.parse_only("demo,seed") == ["seed", "demo"]
    assert run_all.parse_only("fault") == ["fault"]
    assert run_all.parse_only("stream,api") == ["api", "stream"]  # `make bench ONLY=api,stream`
    with pytest.raises(SystemExit):
        run_all.parse_only("seed,nope")


def api_run(target: str, rate: float, p99: float, achieved: float, failed: int = 0) -> dict:
    """One locust run as api_bench.py writes it."""
    run = {
        "target": target,
        "offered_per_s": rate,
        "seconds": 20.0,
        "achieved_per_s": achieved,
        "requests": 4000,
        "failed": failed,
        "ms": {"n": 4000, "p50": p99 / 4, "p95": p99 / 2, "p99": p99, "max": p99 * 2},
        "warmup_requests": 400,
        "server_cpu_s": 8.8 if target == "score" else 2.2,
    }
    run["holds"] = p99 < 50 and achieved >= 0.95 * rate and failed <= 4
    return run


def test_api_rows_beside_healthz() -> None:
    result = {
        "goals": {"p99_ms_at_rate": 10.0, "rate": 200.0, "held_p99_ms": 50.0},
        "hold": {"p99_ms": 50.0, "achieved_share": 0.95, "failed_share": 0.001},
        "step_seconds": 8.0,
        "min_samples": 500,
        "fixed": {
            "score": [api_run("score", 200, 8.0, 199.0)],
            "healthz": [api_run("healthz", 200, 2.0, 200.0)],
        },
        "steps": {
            "score": [api_run("score", 300, 20.0, 299.0), api_run("score", 450, 80.0, 300.0)],
            "healthz": [api_run("healthz", 300, 3.0, 300.0), api_run("healthz", 450, 4.0, 450.0)],
        },
        "highest_held": {"score": 300.0, "healthz": 450.0},
        "step_stopped_by": "--max-steps 2",
    }
    fixed, score, healthz = run_all.rows_api(result)
    assert fixed.median == "p99 8.00 ms" and fixed.value == 8.0
    assert fixed.reference.startswith("goal p99 < 10.00 ms: met; `GET /healthz` at the same rate")
    assert fixed.ratio == "4.00× healthz p99"
    assert fixed.reference.endswith("; server CPU 2.00 ms a request (healthz 0.50 ms)")
    assert (score.median, score.ratio) == ("300 requests/s", "0.67× healthz")
    assert score.spread.endswith("450/s → p99 80.00 ms ✗")
    assert healthz.median == "450 requests/s" and not any(r.failed for r in (fixed, score, healthz))
    result["fixed"]["score"] = [api_run("score", 200, 900.0, 110.0)]
    result["highest_held"]["score"] = None
    fixed, score, _ = run_all.rows_api(result)
    assert "MISSED" in fixed.reference and score.median == "none held (down to 200/s)"
    # stepping down from a fixed rate not held: the first rate held
    result["steps"]["score"] = [
        api_run("score", 133, 90.0, 133.0),
        api_run("score", 89, 30.0, 89.0),
    ]
    result["highest_held"]["score"] = 89.0
    _, score, _ = run_all.rows_api(result)
    assert score.median == "89 requests/s"
    assert score.spread == "200/s → p99 900 ms ✗, 133/s → p99 90.00 ms ✗, 89/s → p99 30.00 ms"


def stream_window(rate: float, p95: float, reference_p95: float, backlog: int = 0) -> dict:
    """One load window as stream_bench.py writes it."""

    def ms(p: float) -> dict:
        return {"n": 1000, "p50": p / 2, "p95": p, "p99": p * 2, "max": p * 3}

    return {
        "source": "embedded",
        "rate": rate,
        "seconds": 60.0,
        "payments_committed": int(rate * 60),
        "committed_per_s": rate,
        "changes_scored": int(rate * 120),
        "payments_scored": int(rate * 60),
        "scored_per_s": rate * 2,
        "backlog_at_end": backlog,
        "drain_s": 1.5 if backlog else 0.0,
        "unscored_after_drain": 0,
        "commit_to_score_ms": ms(p95),
        "commit_to_document_ms": ms(p95 * 2),
        "reference_commit_to_visible_ms": ms(reference_p95),
    }


def test_stream_rows_goal_reference_and_parity() -> None:
    parity = {
        "features": 27,
        "run": {"payments_compared": 72_000, "mismatched_payments": 0},
        "older_changed": {"payments_compared": 1_500, "mismatched_payments": 40},
        "scores": {"payments_compared": 72_000, "mismatched": 0, "max_abs_difference": 0.0},
        "scores_older_changed": {"payments_compared": 1_500, "mismatched": 12},
    }
    result = {
        "goals": {"p95_ms": 100.0, "rate": 1000.0, "parity_mismatches": 0},
        "embedded": {
            "measured": True,
            "windows": [stream_window(200, 40.0, 10.0), stream_window(1000, 150.0, 30.0, 900)],
        },
        "kafka": {"measured": False, "reason": "not measured: the Kafka stack did not start"},
        "parity": parity,
    }
    low, high, kafka, features, scores = run_all.rows_stream(result)
    assert low.median == "p95 40.00 ms" and "goal" not in low.reference  # the goal is at 1,000/s
    assert low.ratio == "4.00× CDC alone (p95)"
    assert high.reference.startswith("goal p95 < 100 ms: MISSED; embedded CDC alone")
    assert "backlog at the end 900 payments, scored 1.50 s later" in high.reference
    assert kafka.median == "not measured: the Kafka stack did not start" and not kafka.failed
    assert features.median == "0 mismatching payments" and not features.failed
    assert "40 of 1,500 differ" in features.reference
    assert scores.median == "0 differing scores" and not scores.failed
    assert scores.reference.endswith("the stream's score of their first change: 12 of 1,500 differ")
    parity["run"]["mismatched_payments"] = 3
    parity["scores"].update(mismatched=5, max_abs_difference=0.13)
    *_, features, scores = run_all.rows_stream(result)
    assert features.failed and features.median == "FAILED: 3 mismatching payments"
    assert scores.failed and scores.median == "FAILED: 5 differing scores"


def ml_quality(ap: float, rules_ap: float) -> dict:
    def metrics(**values: float) -> dict:
        return {"alert_budget": 0.01, "budget_alerts": 750, "card_precision_k": 100, **values}

    return {
        "split": {
            "train_rows": 400_000,
            "gap_days": 7,
            "test_start": "2026-08-03",
            "test_end": "2026-11-01",
            "test_rows": 75_000,
            "test_positives": 300,
        },
        "model": metrics(
            average_precision=ap,
            roc_auc=0.99,
            recall_at_1pct_fpr=0.8,
            budget_precision=0.4,
            budget_recall=0.9,
            card_precision_at_k=0.04,
        ),
        "rules": metrics(
            average_precision=rules_ap,
            roc_auc=0.7,
            recall_at_1pct_fpr=0.0,
            budget_precision=0.1,
            budget_recall=0.25,
            card_precision_at_k=0.02,
        ),
        "ap_ratio": ap / rules_ap,
    }


ML = {
    "benchmark": "ml",
    "scale": 0.5,
    "runs": 2,
    "labels": "planted",
    "transactions": 500_000,
    "features_count": 27,
    "num_boost_round": 300,
    "goals": {
        "features_s_per_million": 60.0,
        "training_s_per_million": 300.0,
        "scoring_tx_per_s": 100_000.0,
        "ap_ratio": 2.0,
        "features_s": 30.0,
        "training_s": 150.0,
    },
    "features": {"seconds": [20.0, 40.0]},
    "training": [
        {"seconds": 100.0, "store_create_s": 5.0, "timings": {"features": 10.0, "fit": 80.0}},
        {"seconds": 120.0, "store_create_s": 7.0, "timings": {"features": 12.0, "fit": 90.0}},
    ],
    "scoring": [{"features_s": 2.0, "predict_s": 2.0}, {"features_s": 3.0, "predict_s": 2.0}],
    "quality": [ml_quality(0.9, 0.3), ml_quality(0.9, 0.3)],
    "quality_ceiling": {"budget_precision": 0.5, "card_precision_at_k": 0.06},
}


def test_ml_rows_stand_against_their_goals_and_beside_the_rules() -> None:
    features, training, scoring, *quality = run_all.rows_ml(ML)
    assert features.what == (
        "fraud features of every payment, batch engine (DuckDB), 27 features (2 runs)"
    )
    # 500,000 payments: the goal is half the 60 s; a median at the goal misses it
    assert (features.median, features.spread) == ("30.0 s", "20.0 s – 40.0 s")
    assert features.reference == "goal < 30.0 s (60 s per 1,000,000): MISSED; 16,667 payments/s"
    assert (training.median, training.rows) == (
        "110.0 s",
        "500,000 tx (400,000 train, 75,000 test)",
    )
    assert training.reference == (
        "goal < 150.0 s (300 s per 1,000,000): met; features 11.0 s, fit 85.0 s; "
        "store creation (before, not counted) 6.00 s"
    )
    # 500,000 payments in 4 s and 5 s (features + predictions): median 4.5 s
    assert (scoring.median, scoring.spread) == ("111,111 payments/s", "100,000 – 125,000")
    assert scoring.reference == (
        "goal > 100,000 payments/s: met; features alone 200,000 payments/s, predictions alone "
        "250,000 payments/s"
    )
    assert {r.section for r in quality} == {"ml quality"}
    ap, auc, recall, precision_budget, recall_budget, cards = quality
    assert ap.what == (
        "fraud model average precision (PR-AUC), test period 2026-08-03 .. 2026-11-01 after a "
        "7-day gap (75,000 tx, 300 frauds; 500,000 payments, planted labels)"
    )
    assert (ap.median, ap.ratio) == ("0.9000", "3.00× rules")
    assert ap.reference == "goal ≥ 2× the rules': met; rules baseline 0.3000"
    assert (auc.reference, auc.ratio) == ("rules baseline 0.7000; no goal", "1.41× rules")
    assert recall.ratio == "rules 0"
    assert precision_budget.what.startswith(
        "fraud model precision at a 1% alert budget (750 alerts)"
    )
    assert precision_budget.reference == (
        "rules baseline 0.1000; a perfect ranking 0.5000; no goal"
    )
    assert recall_budget.reference == "rules baseline 0.2500; no goal"
    assert (cards.median, cards.ratio) == ("0.0400", "2.00× rules")
    assert cards.reference == "rules baseline 0.0200; a perfect ranking 0.0600; no goal"

    # below twice the rules' average precision: the goal is missed
    worse = {**ML, "quality": [ml_quality(0.59, 0.3)]}
    ap = run_all.rows_ml(worse)[3]
    assert ap.reference.startswith("goal ≥ 2× the rules': MISSED") and ap.ratio == "1.97× rules"
    # a result written before the ceiling was measured still renders, without it
    older = {k: v for k, v in ML.items() if k != "quality_ceiling"}
    assert run_all.rows_ml(older)[-1].reference == "rules baseline 0.0200; no goal"


@pytest.mark.timeout(420)
def test_smoke_ml_bench_through_run_all(tmp_path: Path) -> None:
    out = tmp_path / "results"
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRIPE_PLATFORM_")}
    env.pop("MONGODB_URI", None)
    env["STRIPE_PLATFORM_HOME"] = str(tmp_path / "home")
    done = subprocess.run(
        [
            sys.executable,
            str(BENCH / "run_all.py"),
            *("--scale", "0.01", "--runs", "1", "--only", "ml", "--output-dir", str(out)),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [json_file] = out.glob("*.json")
    report = json.loads(json_file.read_text())
    assert set(report["benchmarks"]) == {"ml"} and report["benchmarks"]["ml"]["ok"]
    result = report["benchmarks"]["ml"]["result"]
    # scale 0.01: the seed's 10,000 payments, 0.5% of them planted fraud
    assert result["labels"] == "planted"
    assert (result["transactions"], result["positives"]) == (10_000, 50)
    assert result["goals"]["features_s"] == pytest.approx(0.6)
    assert result["goals"]["training_s"] == pytest.approx(3.0)
    [training] = result["training"]
    assert {"features", "fit", "evaluate", "register"} <= set(training["timings"])
    [quality] = result["quality"]
    assert quality["split"]["test_positives"] > 0
    assert quality["model"]["transactions"] == quality["split"]["test_rows"]

    rows = report["rows"]
    assert [r["section"] for r in rows] == ["ml"] * 3 + ["ml quality"] * 6
    assert all(positive(r["value"]) for r in rows[:3]), rows[:3]
    assert all(re.match(r"goal [<>] .*: (met|MISSED); ", r["reference"]) for r in rows[:3]), rows
    # the seed's planted fraud is far easier for the model than for the rules
    assert rows[3]["reference"].startswith("goal ≥ 2× the rules': met"), rows[3]
    table = json_file.with_suffix(".md").read_text()
    assert "| fraud features of every payment, batch engine (DuckDB)" in table
    assert table in done.stdout  # printed at the end
