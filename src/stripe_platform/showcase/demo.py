"""The main job on the embedded profile, the whole pipeline:

1. the runtime up, the schema and collections applied;
2. the brief's OLTP statements and document queries on its own example records (brief_examples.py,
   in the `<database>_brief` databases, so they never mix with the synthetic data);
3. synthetic data seeded at ``scale`` (a re-run appends an hour of activity instead);
4. real Airflow runs, with ``airflow dags test``, ``ml_fraud_training`` (drift check, train the
   fraud model, gate, promote ``models:/fraud@champion``: a re-run retrains only on drift),
   ``ml_fraud_scoring`` (the champion scores every payment not scored yet: FraudScore and the
   Transaction documents), then the real-time path (the fraud stream service scores payments as they
   commit; the API scores one over HTTPS), ``elt_warehouse_daily`` (sync to the warehouse, dbt
   through cosmos, mart Assets) and ``elt_lake_daily`` (sync to the lake);
5. the brief's three OLAP queries answered from the marts, and where everything is.
Every stage is idempotent, so Ctrl-C and a re-run leave everything consistent."""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from stripe_platform.config import Settings
from stripe_platform.docstore import client as docstore
from stripe_platform.docstore.queries import load_queries, run_query
from stripe_platform.docstore.specs import apply_specs
from stripe_platform.oltp import db, partitions
from stripe_platform.oltp.migrate import migrate
from stripe_platform.oltp.status import StatusChangeError, change_status
from stripe_platform.paths import SQL_EXAMPLES_DIR
from stripe_platform.runtime import embedded
from stripe_platform.showcase import brief_examples


def table(title: str, columns: list[str], rows: list[Any]) -> Table:
    # Cells and titles are rendered as rich markup: data ("[a-z]" in a value) is escaped.
    out = Table(title=escape(title), title_justify="left", title_style="bold")
    for column in columns:
        out.add_column(escape(column))
    for row in rows:
        out.add_row(*("" if v is None else escape(str(v)) for v in row))
    return out


def run_brief_acid_example(conn: psycopg.Connection) -> None:
    """Run the brief's BEGIN/UPDATE/INSERT/COMMIT block; on any error, ROLLBACK as it says."""
    try:
        conn.execute((SQL_EXAMPLES_DIR / "acid_status_change.sql").read_text())
    except psycopg.Error:
        conn.execute("ROLLBACK")
        raise


def audit_log_tail(log_dir: Path, n: int = 3) -> list[dict[str, Any]]:
    files = sorted(log_dir.glob("*.json"))
    if not files:
        return []
    lines = files[-1].read_text().splitlines()[-n:]
    return [json.loads(line) for line in lines]


DEFAULT_SCALE = 0.05  # 50,000 payments: a first run takes a few minutes
ACTIVITY_MINUTES = 60  # appended by a re-run, so its syncs and builds are incremental
# The fraud model first: its scores (FraudScore, the Transaction documents) then reach the warehouse
# and the lake in the same run's syncs.
DAGS = ("ml_fraud_training", "ml_fraud_scoring", "elt_warehouse_daily", "elt_lake_daily")


def brief_settings(settings: Settings) -> Settings:
    """The databases holding the brief's example records."""
    return settings.model_copy(
        update={
            "pg_database": f"{settings.pg_database}_brief",
            "mongodb_database": f"{settings.mongodb_database}_brief",
        }
    )


def ensure_database(settings: Settings) -> None:
    with db.connect(settings, database="postgres", autocommit=True) as conn:
        if not conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (settings.pg_database,)
        ).fetchone():
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(settings.pg_database)))


def run(settings: Settings, console: Console, *, scale: float = DEFAULT_SCALE) -> dict[str, float]:
    """The main job; returns the seconds spent per stage."""
    started = time.monotonic()
    stages: dict[str, float] = {}
    stage_started = [started]

    def step(message: str) -> None:
        console.print(f"[dim]{time.monotonic() - started:6.1f}s[/dim] {escape(message)}")

    def stage_done(name: str) -> None:
        now = time.monotonic()
        stages[name] = now - stage_started[0]
        stage_started[0] = now

    if settings.profile == "embedded":
        step("starting the embedded PostgreSQL cluster and document server")
        status = embedded.up(settings)
        pg = status.postgres
        step(f"PostgreSQL {pg.version} on 127.0.0.1:{pg.port} (data {pg.datadir})")
        if status.documents is not None:
            docs = status.documents
            step(
                f"{docs.version} on 127.0.0.1:{docs.port}, TLS (documents in {docs.backend_database})"
            )
    stage_done("runtime")

    brief = brief_settings(settings)
    console.rule(f"[bold]The brief's example records (databases {brief.pg_database})")
    ensure_database(brief)
    showcase_brief(brief, console, step)
    stage_done("brief statements")

    console.rule(f"[bold]The pipeline (database {settings.pg_database}, scale {scale})")
    seed_or_append(settings, scale, step)
    stage_done("seed")

    orchestrate(settings, console, step, stage_done)

    console.rule("[bold]Security: classification, keys, encryption coverage, TLS")
    security(settings, console, step)
    stage_done("security")

    console.rule("[bold]Access: the policy as code applied, expired access detected and revoked")
    access(settings, console, step)
    stage_done("access")

    console.rule(
        "[bold]Audit: logs collected, the trail sealed and verified, anomalies to incidents"
    )
    audit(settings, console, step)
    stage_done("audit")

    console.rule(
        "[bold]Privacy and compliance: an access and an erasure request, the daily controls, "
        "the dashboard"
    )
    privacy(settings, console, step)
    stage_done("privacy")

    console.rule("[bold]The brief's OLAP queries, answered from the marts")
    answer_brief_queries(settings, console)
    stage_done("queries")
    where_things_are(settings, console)
    step("done: " + ", ".join(f"{name} {secs:.0f}s" for name, secs in stages.items()))
    return stages


def seed_or_append(settings: Settings, scale: float, step: Callable[[str], None]) -> None:
    """Seed the synthetic data, or resume an interrupted seed, or (when an earlier run finished)
    append an hour of activity: inserts, status changes, updates and deletes for CDC."""
    from stripe_platform.seed import incremental
    from stripe_platform.seed.dataset import build
    from stripe_platform.seed.load import seed
    from stripe_platform.seed.spec import make_spec

    documents = docstore.connect(settings)
    apply_specs(documents, settings)
    with db.connect(settings, autocommit=True) as conn:
        migrate(conn, on_apply=lambda m: step(f"applying {m.path.name}"))
        previous = {k for (k,) in conn.execute("SELECT run_key FROM platform.seed_run")}
    spec = make_spec(scale=scale)
    if not previous or spec.run_key in previous:
        # First run, or the same seed again (it resumes where an interrupted run stopped).
        step(f"seeding scale {scale}")
        report = seed(settings, build(spec), documents)
        if report.resumed_batches == 0 and not previous:
            rows = {name: t.rows for name, t in report.oltp.items()}
            step(
                f"seeded in {report.oltp_seconds:.1f}s: "
                + ", ".join(f"{n:,} {name}" for name, n in rows.items() if n)
            )
            return
    # The data was seeded by an earlier run: new activity makes this run's syncs and builds
    # incremental, as they are in production.
    activity = incremental.run(settings, documents, seed=int(time.time()), minutes=ACTIVITY_MINUTES)
    changes = {
        kind: sum(getattr(activity, kind).values()) for kind in ("inserted", "updated", "deleted")
    }
    step(
        f"appended {ACTIVITY_MINUTES} minutes of activity: "
        + ", ".join(f"{n:,} rows {kind}" for kind, n in changes.items())
    )


def orchestrate(
    settings: Settings,
    console: Console,
    step: Callable[[str], None],
    stage_done: Callable[[str], None],
) -> None:
    from stripe_platform.orchestration.airflow_runtime import airflow_home, migrate_airflow_db
    from stripe_platform.orchestration.dag_runs import dags_test
    from stripe_platform.transform.dbt import ensure_manifest

    step(f"Airflow metadata (SQLite) under {airflow_home(settings)}")
    if migrate_airflow_db(settings):
        step("airflow db migrate: done (once per Airflow version)")
    ensure_manifest(settings)
    step("dbt manifest written (cosmos renders the DAG from it)")
    stage_done("airflow setup")
    for dag_id in DAGS:
        step(f"airflow dags test {dag_id}")
        result = dags_test(
            settings,
            dag_id,
            on_task=lambda t: console.print(
                f"         [green]✓[/green] {escape(t.task_id):<58} {t.seconds:5.1f}s"
            ),
        )
        step(
            f"{dag_id}: {result.state} in {result.seconds:.0f}s, {len(result.tasks)} tasks (log {result.log})"
        )
        stage_done(dag_id)
        if dag_id == REALTIME_AFTER:
            console.rule("[bold]Fraud in real time: the stream scorer and the API")
            realtime(settings, console, step)
            stage_done("real-time fraud")


REALTIME_AFTER = (
    "ml_fraud_scoring"  # the champion exists; the warehouse sync after takes its scores
)
REALTIME_PAYMENTS_PER_SECOND = 10
REALTIME_SECONDS = 3
REALTIME_WAIT_S = 60  # the stream's start (champion, warm state) plus catching up on a re-run


def realtime(settings: Settings, console: Console, step: Callable[[str], None]) -> None:
    """The fraud stream as its supervisor runs it (a service process on the replication slot):
    a few payments committed now are scored as they commit; then the API scores one over HTTPS.
    Both are stopped at the end (``stripe-platform stream start`` and ``stripe-platform api`` run
    them for good)."""
    from stripe_platform.seed import incremental
    from stripe_platform.streaming import supervisor

    ensured = supervisor.ensure_running(settings, wait=REALTIME_WAIT_S)
    health = supervisor.health(settings)
    step(f"fraud stream {ensured.action} (pid {ensured.pid}): {health.summary()}")
    try:
        with db.connect(settings, autocommit=True, with_key=False) as conn:
            (before,) = conn.execute("SELECT coalesce(max(ID), 0) FROM Transaction").fetchone()
            documents = docstore.connect(settings)
            try:
                activity = incremental.run(
                    settings,
                    documents,
                    seed=int(time.time()),
                    tps=REALTIME_PAYMENTS_PER_SECOND,
                    duration=REALTIME_SECONDS,
                )
            finally:
                documents.client.close()
            new = conn.execute("SELECT count(*) FROM Transaction WHERE ID > %s", (before,))
            (committed,) = new.fetchone()
            step(
                f"committed {committed} payments at ~{REALTIME_PAYMENTS_PER_SECOND}/s "
                f"({sum(activity.inserted.values()):,} rows inserted in all)"
            )
            deadline = time.monotonic() + REALTIME_WAIT_S
            while True:
                (scored,) = conn.execute(
                    "SELECT count(DISTINCT TransactionID) FROM FraudScoreEvent "
                    "WHERE TransactionID > %s",
                    (before,),
                ).fetchone()
                if scored >= committed or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            # One row a payment: its first change (the insert), and how many changes were scored
            # (a status change in the same second is scored again).
            rows = conn.execute(
                """SELECT e.TransactionID, round(t.Amount, 2) || ' ' || c.Code,
                          round(e.Score::numeric, 4), CASE WHEN e.IsFraud THEN 'FRAUD' ELSE 'ok' END,
                          round(e.CommitToScoreMs::numeric, 1), n.changes
                   FROM (SELECT DISTINCT ON (TransactionID) * FROM FraudScoreEvent
                         WHERE TransactionID > %(before)s ORDER BY TransactionID, LSN) e
                   JOIN (SELECT TransactionID, count(*) AS changes FROM FraudScoreEvent
                         WHERE TransactionID > %(before)s GROUP BY TransactionID) n
                     ON n.TransactionID = e.TransactionID
                   JOIN Transaction t ON t.ID = e.TransactionID AND t.DateTime = e.TransactionDateTime
                   JOIN Currency c ON c.ID = t.CurrencyID
                   ORDER BY e.Score DESC, e.TransactionID LIMIT 8""",
                {"before": before},
            ).fetchall()
            latency = conn.execute(
                """SELECT percentile_cont(ARRAY[0.5, 0.95]) WITHIN GROUP (ORDER BY CommitToScoreMs)
                   FROM FraudScoreEvent WHERE TransactionID > %s""",
                (before,),
            ).fetchone()[0]
        console.print(
            table(
                f"scored as they committed: {scored} of {committed} payments "
                f"(the highest scores first; FraudScoreEvent and the Transaction documents)",
                ["transaction", "amount", "score", "decision", "commit→score ms", "changes scored"],
                rows,
            )
        )
        if latency:
            step(f"commit-to-score p50 {latency[0]:.0f} ms, p95 {latency[1]:.0f} ms")
        if scored < committed:
            step(f"[warning] {committed - scored} payments not scored within {REALTIME_WAIT_S}s")
    finally:
        stopped = supervisor.stop(settings)
        step(
            f"fraud stream stopped (pid {stopped}); `stripe-platform stream start` runs it for good"
        )
    score_over_https(settings, console, step)


def score_over_https(settings: Settings, console: Console, step: Callable[[str], None]) -> None:
    """`stripe-platform api` as users start it, on a free port; one payment scored over HTTPS."""
    import os
    import socket
    import subprocess
    import sys

    import httpx

    from stripe_platform.api.models import EXAMPLE_REQUEST
    from stripe_platform.api.server import endpoint
    from stripe_platform.security import sessions
    from stripe_platform.streaming.supervisor import settings_env

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    where = endpoint(settings, host="127.0.0.1", port=port)
    log = settings.home_dir / "api-demo.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "stripe_platform.cli", "api", "--port", str(port)],
            env=settings_env(settings, dict(os.environ)),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        with httpx.Client(base_url=where.url, verify=str(where.tls.ca_cert), timeout=5) as client:
            deadline = time.monotonic() + REALTIME_WAIT_S
            while True:
                if server.poll() is not None:
                    raise RuntimeError(f"stripe-platform api exited at start: see {log}")
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"stripe-platform api not ready in {REALTIME_WAIT_S}s: see {log}"
                    )
                time.sleep(0.2)
            step(f"stripe-platform api ready at {where.url} (OpenAPI at /docs)")
            # The checkout's machine identity (access/policy.yaml), a token for this run only.
            token_id, secret = sessions.issue_token(
                settings,
                user=DEMO_API_CLIENT,
                roles=["fraud_service"],
                expires_at=dt.datetime.now(dt.UTC) + dt.timedelta(minutes=10),
                created_by="demo",
            )
            try:
                refused = client.post("/v1/fraud/score", json=EXAMPLE_REQUEST).status_code
                started = time.perf_counter()
                response = client.post(
                    "/v1/fraud/score",
                    json=EXAMPLE_REQUEST,
                    headers={"Authorization": f"Bearer {secret}"},
                )
                millis = (time.perf_counter() - started) * 1000
            finally:
                sessions.revoke_token(settings, token_id)
            step(
                f"without a token: {refused}; with {DEMO_API_CLIENT}'s bearer token "
                f"({token_id}, scope fraud.score, revoked after): {response.status_code}"
            )
        response.raise_for_status()
        body = response.json()
        model = body["model"]
        step(
            f"POST /v1/fraud/score (payment {EXAMPLE_REQUEST['transaction_id']}, "
            f"{EXAMPLE_REQUEST['amount']} {EXAMPLE_REQUEST['currency']}): {response.status_code} "
            f"in {millis:.1f} ms, score {body['score']:.4f} "
            f"({'fraud' if body['is_fraud'] else 'not fraud'} at {model['threshold']}), "
            f"{model['name']} version {model['version']}"
        )
        console.print(
            table(
                "what moved the score most (log-odds)",
                ["feature", "value", "contribution"],
                [
                    (c["feature"], c["value"], f"{c['contribution']:+.3f}")
                    for c in (body.get("contributions") or [])[:5]
                ],
            )
        )
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def answer_brief_queries(settings: Settings, console: Console) -> None:
    from stripe_platform.transform.analyses import available, run_analysis

    for name in available():
        result = run_analysis(settings, name)
        console.print(f"[cyan]{escape(result.sql)}[/cyan]")
        rows = (
            result.rows if len(result.rows) <= 14 else [*result.rows[:6], ("…",), *result.rows[-6:]]
        )
        console.print(
            table(
                f"{name}: {len(result.rows)} rows in {result.seconds * 1000:.0f} ms",
                result.columns,
                rows,
            )
        )


def audit(settings: Settings, console: Console, step: Callable[[str], None]) -> None:
    """The audit trail (docs/audit.md): the cluster's and the API's logs collected into the Log
    collection, the hash-chained trail and the lake; the trail checkpointed and verified; the
    detection rules over the seeded logs (their planted anomalies are the ground truth) and the
    hourly watch's incidents."""
    from stripe_platform.audit import collector, trail
    from stripe_platform.audit.detect import evaluate_labelled
    from stripe_platform.audit.incidents import counts, list_incidents
    from stripe_platform.orchestration.audit import watch

    collected = collector.collect(settings)
    step(
        f"`audit collect`: {collected.lines_read:,} log lines (PostgreSQL jsonlog, API access log) "
        f"in {collected.seconds:.1f}s -> {collected.documents_written:,} Log documents, "
        f"{collected.trail_records:,} trail records, {collected.lake_files} lake files, "
        f"{sum(collected.quarantined.values())} quarantined"
    )
    trail.checkpoint(settings)
    report = trail.verify(settings)
    step(
        f"`audit verify`: {report.records:,} records in {len(report.streams)} streams, "
        f"{report.checkpoints} signed checkpoints, "
        + ("chain intact" if report.ok else f"BROKEN at {report.first_bad}")
        + f" ({report.seconds:.2f}s)"
    )

    database = docstore.connect(settings)
    try:
        seeded = list(database["Log"].find({"isAnomaly": {"$exists": True}}))
    finally:
        database.client.close()
    if seeded:
        quality = evaluate_labelled(settings, seeded)
        overall, false_alerts = quality["overall"], quality["false_alerts"]
        step(
            f"detection rules on the seed's {len(seeded):,} logs ({overall['anomalies']} planted "
            f"anomalies): precision {_ratio(overall['precision'])}, recall "
            f"{_ratio(overall['recall'])}, {false_alerts['total']} false alerts over "
            f"{quality['days']} days"
        )
        # The seed's logs span weeks: watched at once here, the last hours by the hourly DAG.
        oldest = min(t for d in seeded if (t := d.get("session_start")) is not None)
        hours = (dt.datetime.now(dt.UTC) - oldest.replace(tzinfo=dt.UTC)).total_seconds() / 3600
        watched = watch(settings, hours=hours + 1)
        step(
            f"watch: {watched['documents']:,} Log documents, {watched['rule_findings']} rule "
            f"findings, {watched['model_findings']} model findings -> "
            f"{len(watched['incidents']['new'])} new incident(s)"
        )
    summary = counts(settings)
    console.print(
        table(
            "Open incidents (`stripe-platform incidents list`)",
            ["id", "severity", "rule", "user", "count", "first seen"],
            [
                [
                    str(i.id),
                    i.severity,
                    i.rule,
                    i.user or "-",
                    str(i.count),
                    f"{i.first_seen:%Y-%m-%d %H:%M}",
                ]
                for i in list_incidents(settings, status="open", limit=8)
            ],
        )
    )
    step(
        f"incidents: {summary['total']} in all; unresolved by severity "
        + ", ".join(f"{k} {v}" for k, v in summary["unresolved_by_severity"].items())
    )


def privacy(settings: Settings, console: Console, step: Callable[[str], None]) -> None:
    """Issue 23 (docs/compliance.md): one access request (a JSON export of everything held about
    a customer, with where each item came from) and one erasure (every store the catalog lists,
    the subject's key shredded last), each on a customer no earlier run erased; then the daily
    controls and the compliance dashboard's KPIs, and where the dashboard is."""
    from stripe_platform.compliance import consent, requests
    from stripe_platform.compliance.kpis import kpis
    from stripe_platform.orchestration.compliance import daily

    with db.connect(settings) as conn:
        # Two customers with payments, neither erased nor held: a re-run picks the next ones.
        picked = [
            cid
            for (cid,) in conn.execute(
                "SELECT c.id FROM customer c"
                " WHERE NOT EXISTS (SELECT FROM privacy.erased_subject e WHERE e.customer_id = c.id)"
                " AND NOT EXISTS (SELECT FROM privacy.legal_hold h WHERE h.customer_id = c.id)"
                " AND EXISTS (SELECT FROM transaction t WHERE t.customerid = c.id)"
                " ORDER BY c.id LIMIT 2"
            )
        ]
    if len(picked) < 2:
        step("privacy: fewer than two customers left to show a request on; skipped")
        return
    reader, erased = picked
    for kind, customer in (("access", reader), ("erase", erased)):
        started = time.monotonic()
        request = requests.submit(
            settings,
            kind,
            customer,
            law="gdpr",
            requested_by="demo",
            source="cli",
            identity="demo: the account's login and a document check",
        )
        request = requests.run(settings, request.id)
        seconds = time.monotonic() - started
        per_step = ", ".join(
            f"{s.store} {sum(s.counts.values()) if s.counts else 0:,}" for s in request.steps
        )
        if kind == "access" and request.state == "done":
            step(
                f"`privacy request access --customer {customer}`: {request.state} in {seconds:.1f}s"
                f" (due {request.due_at:%Y-%m-%d}), items by store: {per_step}; export "
                f"{request.export_path}"
            )
        else:
            step(
                f"`privacy request {kind} --customer {customer}`: {request.state} in "
                f"{seconds:.1f}s; changed by step: {per_step}"
                + (f"; {request.error}" if request.error else "")
            )
    rates = consent.rates(settings)
    step(
        f"consent: {rates['subjects']:,} subjects; "
        + ", ".join(
            f"{purpose} {share['rate']:.0%}" for purpose, share in rates["by_purpose"].items()
        )
        + f"; opted out of sale {rates['opt_out_rate']:.0%}"
    )
    summary = daily(settings)
    step(
        "daily controls (`compliance check`): "
        + ", ".join(
            f"{name} {'pass' if c['passed'] else 'FAIL'}" for name, c in summary["controls"].items()
        )
    )
    figures = kpis(settings)
    console.print(
        table(
            "Compliance dashboard KPIs (`stripe-platform compliance kpis`)",
            ["KPI", "value", "status", "why"],
            [
                [
                    k.title,
                    "-" if k.value is None else f"{k.value:,.4g} {k.unit}".strip(),
                    k.status,
                    k.detail,
                ]
                for k in figures.kpis
            ],
        )
    )
    step(
        f"the compliance dashboard: {settings.api_url}/compliance (`stripe-platform api`, then "
        "an SSO login as an admin)"
    )


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


DEMO_CONTRACTOR = "demo_contractor"
DEMO_API_CLIENT = "checkout-service"  # access/policy.yaml


def access(settings: Settings, console: Console, step: Callable[[str], None]) -> None:
    """The access policy (access/policy.yaml) checked and applied to every target, then a
    contractor whose end date has passed (a login made by `db grant-temporary` three days ago for
    one day) found by `access expired` and revoked, as the hourly review DAG does."""
    from stripe_platform.oltp.access import grant_temporary
    from stripe_platform.security.access import apply_all, expired_all, plan_all, revoke_expired_all
    from stripe_platform.security.policy import load_policy

    now = dt.datetime.now(dt.UTC)
    policy = load_policy(settings)
    step(
        f"policy {policy.source.name}: {len(policy.roles)} roles, {len(policy.groups)} IdP "
        f"groups, {len(policy.users)} users"
    )
    drift = plan_all(settings, policy, now)
    applied = apply_all(settings, policy, now, changes=drift) if drift else []
    left = plan_all(settings, policy, now)
    step(
        f"`access apply`: {len(applied)} statement(s) applied; `access plan` now: "
        + ("no drift" if not left else f"{len(left)} difference(s) left")
    )

    with db.connect(settings, autocommit=True) as conn:
        if not conn.execute(
            "SELECT 1 FROM pg_roles WHERE rolname = %s", (DEMO_CONTRACTOR,)
        ).fetchone():
            grant_temporary(
                conn, DEMO_CONTRACTOR, "readonlyuser", days=1, now=now - dt.timedelta(days=3)
            )
    found = expired_all(settings, policy, now)
    console.print(
        table(
            "Access still usable past its end date (`stripe-platform access expired`)",
            ["target", "principal", "ended", "still usable because"],
            [[e.target, e.principal, f"{e.ended_at:%Y-%m-%d %H:%M}", e.still] for e in found],
        )
    )
    revoked = revoke_expired_all(settings, policy, now)
    step(
        f"`access revoke-expired`: {len(revoked)} revoked "
        f"({', '.join(sorted({r.principal for r in revoked})) or 'none'}); "
        f"{len(expired_all(settings, policy, now))} left"
    )


def security(settings: Settings, console: Console, step: Callable[[str], None]) -> None:
    """What the stores hold (the classification catalog), the keys that protect it, the share of
    protected fields really encrypted or masked in each store, and TLS on every listening port."""
    from stripe_platform.governance.classification import DataClass, load_catalog
    from stripe_platform.security.coverage import coverage_report
    from stripe_platform.security.envelope import shared_envelope
    from stripe_platform.security.tls_scan import scan

    catalog = load_catalog()
    classes = [c.value for c in DataClass]
    console.print(
        table(
            "The classification catalog (`stripe-platform catalog`): fields per store and class",
            ["store", *classes],
            [
                [store, *(str(counts[c]) for c in classes)]
                for store, counts in catalog.summary().items()
            ],
        )
    )
    catalog.check()  # the CI gate: raises naming every unclassified field
    step(f"catalog check: all {len(catalog.entries):,} columns and fields classified")

    envelope = shared_envelope(settings)
    keks = envelope.keks()
    scopes = envelope.scopes()
    live, shredded = envelope.subject_keys().counts()
    step(
        f"keys ({envelope.provider.name}): KEKs "
        + ", ".join(f"{store} v{versions[-1].version}" for store, versions in keks.items())
        + f"; {len({k.scope for k in scopes})} data-key scopes, {live:,} subject keys"
        + (f" ({shredded:,} shredded)" if shredded else "")
    )

    report = coverage_report(settings)
    console.print(
        table(
            "Encryption coverage at rest (`stripe-platform keys coverage`), from the stores' contents",
            ["store", "protected fields", "encrypted, hashed or masked", "coverage"],
            [
                [
                    s.store,
                    str(s.total),
                    str(s.protected),
                    "-" if s.percent is None else f"{s.percent:g} %",
                ]
                for s in report.stores
            ],
        )
    )
    step(report.summary())

    results = scan(settings)
    console.print(
        table(
            "TLS on every listening port (`stripe-platform tls scan`)",
            ["server", "port", "TLS", "plaintext"],
            [
                [
                    r.name,
                    str(r.port),
                    "verified" if r.tls_ok else "FAILED",
                    "refused" if r.plaintext_refused else "SERVED",
                ]
                for r in results
            ],
        )
    )
    bad = [r for r in results if not r.ok]
    step(
        f"{len(results)} port(s): every one TLS-only"
        if not bad
        else f"NOT TLS-only: {', '.join(f'{r.name}:{r.port}' for r in bad)}"
    )


def where_things_are(settings: Settings, console: Console) -> None:
    from stripe_platform.orchestration.airflow_runtime import airflow_home

    console.rule("[bold]Where things are")
    lines = [
        ("OLTP", f"`stripe-platform psql` (database {settings.pg_database})"),
        (
            "documents",
            "MONGODB_URI"
            if settings.mongodb_uri
            else "FerretDB on the embedded cluster "
            "(`stripe-platform status`, `stripe-platform mongo query NAME`)",
        ),
        ("warehouse", f"{settings.warehouse_file} (DuckDB; marts in schema analytics)"),
        (
            "fraud model",
            "MLflow store "
            + (
                "STRIPE_PLATFORM_MLFLOW_TRACKING_URI"
                if settings.mlflow_tracking_uri
                else str(settings.home_dir / "mlflow")
            )
            + " (`stripe-platform ml evaluate`, "
            "`ml drift`, `ml score`); models:/fraud@champion",
        ),
        ("lake", f"{settings.lake_root}/raw/<source>/<stream>/extracted_date=…/*.parquet"),
        (
            "security",
            "`stripe-platform catalog`, `keys list|coverage|audit`, `tls scan` (docs/security.md)",
        ),
        (
            "dbt",
            "`stripe-platform transform`, `stripe-platform query NAME`, `stripe-platform dbt docs generate`",
        ),
        (
            "Airflow",
            f"`stripe-platform airflow` → https://127.0.0.1:8080 (home {airflow_home(settings)})",
        ),
        (
            "compliance",
            f"`stripe-platform api` → {settings.api_url}/compliance (SSO, admin); `privacy "
            "requests`, `compliance check`, `compliance kpis` (docs/compliance.md)",
        ),
    ]
    console.print(table("", ["what", "where"], lines))


def showcase_brief(settings: Settings, console: Console, step: Callable[[str], None]) -> None:
    """The brief's OLTP statements and document queries, on its example records."""
    # Migrated first over a connection of its own: a keyed session carries the data keys that
    # existed when it opened, and a fresh database has none before its key migrations.
    with db.connect(settings, autocommit=True, with_key=False) as conn:
        applied = migrate(conn, on_apply=lambda m: step(f"applying {m.path.name}"))
        step(f"schema up to date ({len(applied)} migration(s) applied now)")
        report = partitions.maintain(
            conn,
            today=dt.date.today(),
            months_ahead=settings.partition_months_ahead,
            retention_months=settings.partition_retention_months,
        )
        step(
            f"Transaction partitions: {len(report.created)} created, {len(report.archived)} archived"
        )
    with db.connect(settings, autocommit=True) as conn:
        count = brief_examples.load_oltp(conn)
        step(f"sample loaded: {count} transactions")

        console.rule("[bold]The brief's OLTP statements")
        row = conn.execute(
            "SELECT TransactionStatusID FROM Transaction WHERE ID = 12345"
        ).fetchone()
        if row and row[0] == 1:
            run_brief_acid_example(conn)
            console.print("ACID example (sql/examples/acid_status_change.sql): committed")
        else:
            console.print("ACID example: transaction 12345 was refunded by an earlier run")
        trail = conn.execute(
            """SELECT c.ID, c.TransactionID, f.Name, t.Name, c.Reason, c.UpdatedBy, c.UpdatedAt
               FROM TransactionStateChanges c
               LEFT JOIN TransactionStatus f ON f.ID = c.FromStatusID
               JOIN TransactionStatus t ON t.ID = c.ToStatusID
               WHERE c.TransactionID = 12345 ORDER BY c.ID"""
        ).fetchall()
        console.print(
            table(
                "TransactionStateChanges for transaction 12345",
                ["id", "transaction", "from", "to", "reason", "by", "at"],
                trail,
            )
        )
        try:
            change_status(conn, 12345, "pending", reason="demo", updated_by="demo")
        except StatusChangeError as exc:
            console.print(
                "refunded -> pending is refused, nothing written: "
                f"[yellow]{escape(str(exc))}[/yellow]"
            )

        with conn.transaction():
            good = brief_examples.execute_unlogged(
                conn, (SQL_EXAMPLES_DIR / "password_check.sql").read_text()
            )
        bad = conn.execute(
            "SELECT UserName, (Password = crypt(%s, Password)) FROM Customer "
            "WHERE UserName = 'John42'",
            ("not-the-password",),
        ).fetchall()
        console.print(
            table(
                "Password check (crypt/gen_salt('bf'))",
                ["user", "IsGoodPassword"],
                [*good, *[(u, f"{ok} (wrong password)") for u, ok in bad]],
            )
        )
        john = conn.execute(
            """SELECT UserName, (pii_key_ref(Email)).scope || ' v' || (pii_key_ref(Email)).version,
                      '…' || encode(substr(Email, length(Email) - 11), 'hex'), pii_decrypt(FullName)
               FROM Customer WHERE EmailHash = pii_lookup_hash(%s)""",
            ("john.doe@stripe.com",),
        ).fetchall()
        console.print(
            table(
                "Customer found by email (keyed hash); Email stored encrypted under its table's key",
                ["user", "Email key", "Email (ciphertext, end)", "FullName (decrypted)"],
                john,
            )
        )

        roles = conn.execute(
            """SELECT r, has_column_privilege(r, 'transaction', 'amount', 'SELECT'),
                      has_column_privilege(r, 'transaction', 'ipaddress', 'SELECT'),
                      has_any_column_privilege(r, 'transaction', 'INSERT'),
                      has_column_privilege(r, 'customer', 'password', 'SELECT'),
                      has_column_privilege(r, 'customer', 'email', 'SELECT')
               FROM unnest(ARRAY['admin', 'developer', 'readonlyuser']) AS r"""
        ).fetchall()
        console.print(
            table(
                "RBAC (least privilege: no PII/PCI/secret columns below admin)",
                [
                    "role",
                    "read Transaction.Amount",
                    "read Transaction.IPAddress (PII)",
                    "write Transaction",
                    "read Customer.Password",
                    "read Customer.Email (PII)",
                ],
                roles,
            )
        )
        audit = conn.execute(
            "SELECT name, setting FROM pg_settings WHERE name IN ('log_connections', "
            "'log_disconnections', 'log_statement', 'log_destination', 'wal_level', 'ssl') "
            "ORDER BY name"
        ).fetchall()
        console.print(table("Audit and runtime settings", ["setting", "value"], audit))
        counts = [(n, c) for n, c in partitions.row_counts(conn) if c]
        console.print(
            table("Transaction rows per partition (non-empty)", ["partition", "rows"], counts)
        )

    documents = docstore.connect(settings)
    apply_specs(documents, settings)
    loaded = brief_examples.load_documents(documents, settings)
    step(
        "document collections applied, sample loaded: "
        + ", ".join(f"{k} {v}" for k, v in loaded.items())
    )
    console.rule("[bold]The brief's document queries")
    for query in load_queries().values():
        results = run_query(documents, query)
        console.print(
            f"[bold]{escape(query.description)}[/bold]\n[cyan]{escape(query.shell)}[/cyan]"
        )
        if query.aggregate is not None:
            console.print(table("", ["os", "sessions"], [(r["_id"], r["count"]) for r in results]))
        else:
            for doc in results:
                console.print_json(data=json.loads(json.dumps(doc, default=str)))
        console.print(f"{len(results)} document(s)\n")

    if settings.profile == "embedded":
        log_dir = db.embedded_cluster(settings).status().audit_log_dir
        console.print(f"Audit log (jsonlog): {escape(str(log_dir))}")
        for entry in audit_log_tail(log_dir, 1):
            console.print_json(data=entry)
