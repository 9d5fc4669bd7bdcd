"""Consent, do-not-sell / GPC and non-discrimination (issue 23: compliance/consent.py,
compliance/non_discrimination.py, api/consent.py, cli/privacy_consent.py).

Real components: one seeded platform per module (the session's PostgreSQL and document server,
``seed.load`` as `stripe-platform seed` runs it, so the seed's own consents), a champion trained by
``ml.train.train_fraud`` into a real MLflow store (SQLite), the platform's app served by uvicorn
over TLS with a bearer token checked against an access policy file. Expected figures come from the
test's own SQL or Python over the stored rows, never from the code under test.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from psycopg import sql
from pydantic import SecretStr
from typer.testing import CliRunner

from api_server import served_over_tls
from conftest import TEMPLATE_DB
from stripe_platform.audit import access_log
from stripe_platform.cli import app as cli_app
from stripe_platform.compliance import consent, non_discrimination
from stripe_platform.config import Settings, get_settings
from stripe_platform.docstore.client import connect as connect_docs
from stripe_platform.oltp import db
from stripe_platform.seed import load as seed_load
from stripe_platform.seed.dataset import build
from stripe_platform.seed.spec import make_spec

SEED = 5
END = dt.date(2026, 1, 1)
END_AT = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


@dataclass
class Platform:
    settings: Settings
    conn: object  # psycopg.Connection on the seeded database


@pytest.fixture(scope="module")
def platform(settings, tmp_path_factory) -> Iterator[Platform]:
    name = f"test_consent_{os.getpid()}"
    with db.connect(settings, database="postgres", autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {} STRATEGY FILE_COPY").format(
                sql.Identifier(name), sql.Identifier(TEMPLATE_DB)
            )
        )
    tmp = tmp_path_factory.mktemp("consent")
    s = settings.model_copy(
        update={
            "pg_database": name,
            "mongodb_database": name,
            "mlflow_tracking_uri": SecretStr(f"sqlite:///{tmp}/mlflow.db"),
        }
    )
    docs = connect_docs(s)
    cwd = os.getcwd()
    os.chdir(tmp)  # an MLflow store named by URI keeps its artifacts in ./mlruns
    try:
        seed_load.seed(s, build(make_spec(scale=0.01, seed=SEED, end=END, max_documents=300)), docs)
        with db.connect(s, autocommit=True) as conn:
            yield Platform(s, conn)
    finally:
        os.chdir(cwd)
        docs.client.drop_database(name)
        docs.client.close()
        with db.connect(settings, database="postgres", autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def cli(platform, monkeypatch):
    """`stripe-platform privacy ...` on the module's platform."""
    s = platform.settings
    monkeypatch.setenv("STRIPE_PLATFORM_PROFILE", "embedded")
    monkeypatch.setenv("STRIPE_PLATFORM_HOME", str(s.home_dir))
    monkeypatch.setenv("STRIPE_PLATFORM_PG_DATABASE", s.pg_database)
    monkeypatch.setenv(
        "STRIPE_PLATFORM_MLFLOW_TRACKING_URI", s.mlflow_tracking_uri.get_secret_value()
    )
    get_settings.cache_clear()
    runner = CliRunner()
    yield lambda *args: runner.invoke(cli_app, ["privacy", *args])
    get_settings.cache_clear()


def customers_with_payments(conn, n: int, *, offset: int = 0) -> list[int]:
    rows = conn.execute(
        """SELECT CustomerID FROM Transaction GROUP BY CustomerID ORDER BY count(*) DESC, CustomerID
           OFFSET %s LIMIT %s""",
        (offset, n),
    ).fetchall()
    return [r[0] for r in rows]


def current(conn, customer_id: int, purpose: str):
    """The latest record, read by the test's own query on the table (not the view)."""
    return conn.execute(
        """SELECT Granted, Source FROM Consent WHERE CustomerID = %s AND Purpose = %s
           ORDER BY RecordedAt DESC, ID DESC LIMIT 1""",
        (customer_id, purpose),
    ).fetchone()


# -- the registry ----------------------------------------------------------------------------------
def test_the_seed_records_its_customers_consents_deterministically(platform):
    conn = platform.conn
    customers = conn.execute("SELECT ID, CreatedAt FROM Customer ORDER BY ID").fetchall()
    expected = set()
    for cid, created in customers:
        for purpose, share in {
            "analytics": 0.9, "ml_training": 1.0, "marketing": 0.6, "sale": 0.1
        }.items():  # fmt: skip
            digest = hashlib.md5(
                f"{SEED}:{purpose}:{cid}".encode(), usedforsecurity=False
            ).hexdigest()
            if int(digest[:8], 16) / 2**32 < share:
                expected.add((cid, purpose, purpose != "sale", created))
    got = set(
        conn.execute(
            "SELECT CustomerID, Purpose, Granted, RecordedAt FROM Consent WHERE Source = 'seed'"
        ).fetchall()
    )
    assert got == expected
    shares = {p: sum(1 for e in expected if e[1] == p) / len(customers) for p in ("marketing",)}
    assert 0.45 < shares["marketing"] < 0.75  # most, not all: the filters have work to do
    # A resumed seed's finish adds nothing twice.
    assert consent.seed_consents(conn, SEED) == 0


def test_record_keeps_history_latest_wins_and_refuses_bad_input(platform):
    s, conn = platform.settings, platform.conn
    cid = customers_with_payments(conn, 1, offset=40)[0]
    t0 = dt.datetime(2026, 2, 1, 9, tzinfo=dt.UTC)
    consent.record(s, cid, "marketing", True, source="cli", by="alice", at=t0)
    consent.record(
        s, cid, "marketing", False, source="api", by="bob", at=t0 + dt.timedelta(hours=1)
    )
    # Recorded later but given earlier (a paper form typed in): the later decision still wins.
    consent.record(
        s, cid, "marketing", True, source="cli", by="carol", at=t0 - dt.timedelta(days=9)
    )
    assert current(conn, cid, "marketing") == (False, "api")
    state = consent.subject(s, cid)
    assert state.purposes["marketing"] is False and not state.allows("marketing")
    history = [
        (r.granted, r.recorded_by) for r in consent.history(s, cid) if r.purpose == "marketing"
    ]
    assert history[-3:] == [(True, "carol"), (True, "alice"), (False, "bob")]

    unknown = conn.execute("SELECT max(ID) + 1000 FROM Customer").fetchone()[0]
    with pytest.raises(consent.UnknownSubject, match=f"customer {unknown}: no such customer"):
        consent.record(s, unknown, "marketing", True, source="cli", by="alice")
    with pytest.raises(consent.ConsentError, match="purpose 'profiling' is not one of"):
        consent.record(s, cid, "profiling", True, source="cli", by="alice")
    with pytest.raises(consent.ConsentError, match="source 'fax' is not one of"):
        consent.record(s, cid, "marketing", True, source="fax", by="alice")
    count = conn.execute("SELECT count(*) FROM Consent WHERE CustomerID = %s", (cid,))
    assert count.fetchone()[0] == len(consent.history(s, cid))  # nothing recorded by the refusals


def test_opt_out_is_recorded_once_and_rates_count_what_holds(platform):
    s, conn = platform.settings, platform.conn
    cid = next(
        c for c in customers_with_payments(conn, 60, offset=50)
        if current(conn, c, "sale") is None
    )  # fmt: skip
    first = consent.opt_out(s, cid, source="cli", by="alice")
    again = consent.opt_out(s, cid, source="gpc", by="front-end")
    assert (first.source, again.source) == ("cli", "cli")  # the opt-out in force, not a new one
    rows = conn.execute(
        "SELECT count(*) FROM Consent WHERE CustomerID = %s AND Purpose = 'sale'", (cid,)
    ).fetchone()[0]
    assert rows == 1
    assert consent.subject(s, cid).opted_out and cid in consent.opted_out(s)

    # The rates, against the test's own reading of the latest records.
    latest = {}
    for c, p, g in conn.execute(
        "SELECT CustomerID, Purpose, Granted FROM Consent ORDER BY RecordedAt, ID"
    ).fetchall():
        latest[(c, p)] = g
    subjects = conn.execute("SELECT count(*) FROM Customer").fetchone()[0]
    rates = consent.rates(s)
    assert rates["subjects"] == subjects
    for purpose in consent.PURPOSES:
        n = sum(1 for (c, p), g in latest.items() if p == purpose and g)
        assert rates["by_purpose"][purpose] == {"granted": n, "rate": round(n / subjects, 4)}
    opted = sum(1 for (c, p), g in latest.items() if p == "sale" and not g)
    assert (rates["opted_out"], rates["opt_out_rate"]) == (opted, round(opted / subjects, 4))
    assert consent.allowed(s, "sale") == (
        {r[0] for r in conn.execute("SELECT ID FROM Customer").fetchall()} - consent.opted_out(s)
    )


def test_cli_sets_shows_and_opts_out_and_refuses_an_unknown_customer(platform, cli):
    conn = platform.conn
    cid = not_opted_out(conn, 1, offset=120)[0]
    done = cli("consent", "set", "--customer", str(cid), "--purpose", "analytics", "--revoked",
               "--by", "dpo", "--json")  # fmt: skip
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["granted"] is False
    assert records(conn, cid, "analytics")[-1] == (False, "cli", "dpo")

    opted = cli("opt-out", "--customer", str(cid), "--by", "dpo", "--json")
    assert opted.exit_code == 0 and json.loads(opted.stdout)["source"] == "cli"
    shown = cli("consent", "show", "--customer", str(cid), "--history", "--json")
    state = json.loads(shown.stdout)
    assert state["opted_out"] is True and state["purposes"]["analytics"] is False
    assert (
        len(state["records"])
        == conn.execute("SELECT count(*) FROM Consent WHERE CustomerID = %s", (cid,)).fetchone()[0]
    )
    rates = json.loads(cli("consent", "rates", "--json").stdout)
    assert rates == consent.rates(platform.settings)

    missing = conn.execute("SELECT max(ID) + 5 FROM Customer").fetchone()[0]
    refused = cli("consent", "set", "--customer", str(missing), "--purpose", "marketing",
                  "--granted")  # fmt: skip
    assert refused.exit_code == 1 and f"customer {missing}: no such customer" in refused.output
    bad = cli("consent", "set", "--customer", str(cid), "--purpose", "profiling", "--granted")
    assert bad.exit_code == 1 and "purpose 'profiling' is not one of" in bad.output


# -- pipelines honour it --------------------------------------------------------------------------
def test_ml_training_leaves_out_subjects_without_ml_training_consent(platform):
    from stripe_platform.ml.split import SplitSpec
    from stripe_platform.ml.train import load_transactions, train_fraud

    s, conn = platform.settings, platform.conn
    refusing = customers_with_payments(conn, 3)
    for cid in refusing:
        consent.record(s, cid, "ml_training", False, source="cli", by="tests")
    theirs = conn.execute(
        "SELECT count(*) FROM Transaction WHERE CustomerID = ANY(%s)", (refusing,)
    ).fetchone()[0]
    total = conn.execute("SELECT count(*) FROM Transaction").fetchone()[0]
    assert theirs > 0

    loaded = load_transactions(s, require_labels=False)
    ids = set(loaded.table["customer_id"].to_pylist())
    assert not ids & {str(c) for c in refusing}
    assert loaded.num_rows == total - theirs

    # The real training entry point reads the same: the refusing subjects' payments are not in it.
    result = train_fraud(s, split=SplitSpec(test_days=180), num_boost_round=10)
    assert result.rows == total - theirs and result.promoted

    # Consent given again (latest wins): back in the training set.
    consent.record(s, refusing[0], "ml_training", True, source="cli", by="tests")
    back = conn.execute(
        "SELECT count(*) FROM Transaction WHERE CustomerID = %s", (refusing[0],)
    ).fetchone()[0]
    assert load_transactions(s, require_labels=False).num_rows == total - theirs + back


# -- non-discrimination ---------------------------------------------------------------------------
def test_non_discrimination_the_flag_changes_no_feature_limit_or_decision(platform, cli):
    s = platform.settings
    report = non_discrimination.check(s, end=END_AT, days=120)  # the champion trained above
    c = report.counterfactual
    payments = platform.conn.execute(
        "SELECT count(*) FROM Transaction WHERE DateTime >= %s AND DateTime < %s",
        (END_AT - dt.timedelta(days=120), END_AT),
    ).fetchone()[0]
    assert c.payments == payments > 1000
    assert c.flag_dropped_by_contract
    assert (c.features_differ, c.rule_decisions_differ) == (0, 0)
    assert c.model.startswith("fraud") and (c.scores_differ, c.model_decisions_differ) == (0, 0)
    assert report.passed

    # The outcomes, by group: the test's own counts of the opted-out customers' payments.
    opted = [
        r[0] for r in platform.conn.execute(
            "SELECT DISTINCT CustomerID FROM Consent WHERE Purpose = 'sale'"
        ).fetchall()
        if current(platform.conn, r[0], "sale")[0] is False
    ]  # fmt: skip
    theirs, declined = platform.conn.execute(
        """SELECT count(*), count(*) FILTER (WHERE TransactionStatusID = 4) FROM Transaction
           WHERE CustomerID = ANY(%s) AND DateTime >= %s AND DateTime < %s""",
        (opted, END_AT - dt.timedelta(days=120), END_AT),
    ).fetchone()
    assert report.opted_out.payments == theirs > 0
    assert report.others.payments == payments - theirs
    assert report.opted_out.declined == declined
    assert set(report.z) == {"declined_rate", "rules_flagged_rate", "model_flagged_rate"}
    shown = cli("non-discrimination", "--end", "2026-01-01", "--days", "120", "--json")
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["passed"] is True


def test_non_discrimination_fails_when_the_flag_reaches_a_price(platform, cli, monkeypatch):
    """A planted regression: a contract that charges opted-out customers 5% more. The check must
    see it in the features, and the CLI must exit 1."""
    from stripe_platform.ml import contract

    real = contract.canonicalize

    def surcharging(table, **kwargs):
        out = real(table, **kwargs)
        if non_discrimination.FLAG not in table.column_names:
            return out
        import pyarrow as pa
        import pyarrow.compute as pc

        flag = table[non_discrimination.FLAG]
        amount = pc.if_else(flag, pc.multiply(out.table["amount"], 1.05), out.table["amount"])
        index = out.table.column_names.index("amount")
        return contract.Transactions(
            **{**out.__dict__, "table": out.table.set_column(index, "amount", pa.array(amount))}
        )

    monkeypatch.setattr(contract, "canonicalize", surcharging)
    report = non_discrimination.check(platform.settings, end=END_AT, days=120, use_champion=False)
    assert report.counterfactual.features_differ > 0 and not report.passed
    result = cli("non-discrimination", "--end", "2026-01-01", "--days", "120", "--no-model")
    assert result.exit_code == 1, result.output
    assert "FAILED" in result.output


# -- the API and the Global Privacy Control signal -------------------------------------------------
POLICY = """\
version: 1
roles:
  privacy_front:
    description: the customer-facing front end, relaying what subjects choose
    api: [privacy.requests]
  viewer:
    description: customers, masked
    api: [customers.read]
users:
  front-end:
    roles: [privacy_front]
    stores: [api]
  reader:
    roles: [viewer]
    stores: [api]
"""


@dataclass
class Api:
    settings: Settings
    client: httpx.Client
    front: str  # a bearer token of the front end (scope privacy.requests)
    reader: str  # a bearer token without it

    def call(self, method: str, path: str, token: str | None, *, gpc: bool = False, **kwargs):
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        if gpc:
            headers["Sec-GPC"] = "1"
        return self.client.request(method, path, headers=headers, **kwargs)


@pytest.fixture(scope="module")
def api(platform, tmp_path_factory) -> Iterator[Api]:
    from stripe_platform.api.app import create_app
    from stripe_platform.security import sessions

    policy = tmp_path_factory.mktemp("consent-policy") / "policy.yaml"
    policy.write_text(POLICY)
    s = platform.settings.model_copy(update={"access_policy": policy})

    def token(user: str, roles: list[str]) -> str:
        expires = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
        return sessions.issue_token(
            s, user=user, roles=roles, expires_at=expires, created_by="tests"
        )[1]

    with served_over_tls(create_app(s), s, name="consent") as client:
        yield Api(s, client, token("front-end", ["privacy_front"]), token("reader", ["viewer"]))


def records(conn, customer_id: int, purpose: str) -> list[tuple]:
    return conn.execute(
        """SELECT Granted, Source, RecordedBy FROM Consent
           WHERE CustomerID = %s AND Purpose = %s ORDER BY RecordedAt, ID""",
        (customer_id, purpose),
    ).fetchall()


def not_opted_out(conn, n: int, offset: int) -> list[int]:
    return [
        c for c in customers_with_payments(conn, 200, offset=offset)
        if current(conn, c, "sale") is None
    ][:n]  # fmt: skip


def test_api_consent_routes_need_the_privacy_scope(api, platform):
    cid = customers_with_payments(platform.conn, 1, offset=70)[0]
    assert api.call("GET", f"/v1/privacy/consent/{cid}", None).status_code == 401
    refused = api.call("GET", f"/v1/privacy/consent/{cid}", api.reader)
    assert refused.status_code == 403 and refused.json()["detail"]["reason"] == "missing_scope"
    body = {"customer_id": cid, "purpose": "marketing", "granted": True}
    assert api.call("POST", "/v1/privacy/consent", api.reader, json=body).status_code == 403
    assert records(platform.conn, cid, "marketing") == [
        r for r in records(platform.conn, cid, "marketing") if r[1] == "seed"
    ]  # nothing recorded by the refused call

    missing = platform.conn.execute("SELECT max(ID) + 77 FROM Customer").fetchone()[0]
    gone = api.call("GET", f"/v1/privacy/consent/{missing}", api.front)
    assert gone.status_code == 404 and f"customer {missing}" in gone.json()["detail"]
    bad = {"customer_id": cid, "purpose": "profiling", "granted": True}
    assert api.call("POST", "/v1/privacy/consent", api.front, json=bad).status_code == 422
    # Beyond Customer.ID's bigint: refused as invalid, not a server error.
    assert api.call("GET", f"/v1/privacy/consent/{2**63}", api.front).status_code == 422
    huge = {"customer_id": 2**70}
    assert api.call("POST", "/v1/privacy/opt-out", api.front, json=huge).status_code == 422
    with pytest.raises(consent.UnknownSubject, match=f"customer {2**63}: no such customer"):
        consent.opt_out(platform.settings, 2**63, source="cli")


def test_api_records_consent_and_the_gpc_signal_opts_out(api, platform):
    conn = platform.conn
    plain, signalled, conflicting, reader_side = not_opted_out(conn, 4, offset=80)

    # A consent change without the signal: recorded as given, source api, by the caller.
    ok = api.call(
        "POST", "/v1/privacy/consent", api.front,
        json={"customer_id": plain, "purpose": "marketing", "granted": False},
    )  # fmt: skip
    assert ok.status_code == 200, ok.text
    assert records(conn, plain, "marketing")[-1] == (False, "api", "front-end")
    assert ok.json()["gpc"] is None and ok.json()["consent"]["purposes"]["marketing"] is False
    assert records(conn, plain, "sale") == []

    # The same with Sec-GPC: 1: the subject's browser says do not sell. Twice: recorded once.
    for _ in range(2):
        r = api.call(
            "POST", "/v1/privacy/consent", api.front, gpc=True,
            json={"customer_id": signalled, "purpose": "marketing", "granted": True},
        )  # fmt: skip
        assert r.status_code == 200, r.text
        assert r.json()["gpc"]["source"] == "gpc" and r.json()["consent"]["opted_out"] is True
    assert records(conn, signalled, "sale") == [(False, "gpc", "front-end")]
    assert records(conn, signalled, "marketing")[-2:] == [(True, "api", "front-end")] * 2

    # A grant of sale carrying the signal: refused, the opt-out recorded.
    r = api.call(
        "POST", "/v1/privacy/consent", api.front, gpc=True,
        json={"customer_id": conflicting, "purpose": "sale", "granted": True},
    )  # fmt: skip
    assert r.status_code == 409 and "Sec-GPC: 1" in r.json()["detail"]
    assert records(conn, conflicting, "sale") == [(False, "gpc", "front-end")]

    # A read carrying the header is someone reading, not the subject asking: nothing recorded.
    assert (
        api.call("GET", f"/v1/privacy/consent/{reader_side}", api.front, gpc=True).json()[
            "opted_out"
        ]
        is False
    )
    assert records(conn, reader_side, "sale") == []

    # The explicit opt-out route: source api without the signal, gpc with it.
    r = api.call("POST", "/v1/privacy/opt-out", api.front, json={"customer_id": reader_side})
    assert r.status_code == 200 and r.json()["consent"]["opted_out"] is True
    assert records(conn, reader_side, "sale") == [(False, "api", "front-end")]

    # Every change is in the access log with who, the subject and the source.
    log_dir = access_log.log_dir(api.settings)
    events = [
        json.loads(line)
        for path in sorted(log_dir.glob("*"))
        for line in path.read_text().splitlines()
        if '"consent.' in line
    ]
    changes = {(e["action"], e["detail"]["customer_id"], e["detail"]["source"]) for e in events}
    assert {
        ("consent.record", plain, "api"),
        ("consent.opt_out", signalled, "gpc"),
        ("consent.opt_out", conflicting, "gpc"),
        ("consent.opt_out", reader_side, "api"),
    } <= changes
    mine = {plain, signalled, conflicting, reader_side}
    assert {e["user"] for e in events if e["detail"]["customer_id"] in mine} == {"front-end"}


# -- the warehouse: datasets shared with third parties ---------------------------------------------
@pytest.fixture(scope="module")
def warehouse(platform, tmp_path_factory) -> Iterator[Settings]:
    """The module's source synced by the real engine into a DuckDB warehouse of its own."""
    from stripe_platform.ingestion.catalog import load_catalog
    from stripe_platform.ingestion.postgres import cdc

    path = tmp_path_factory.mktemp("warehouse") / "warehouse.duckdb"
    s = platform.settings.model_copy(update={"warehouse_path": path})
    try:
        yield s
    finally:
        catalog = load_catalog()
        for c in catalog.connections:
            connection = catalog.resolve(c.name)
            if connection.source.kind == "postgres":
                cdc.drop_slot(platform.conn, connection.slot(platform.conn.info.dbname))


def mart_keys(s: Settings, mart: str, column: str) -> set[int]:
    import duckdb

    with duckdb.connect(str(s.warehouse_path), read_only=True) as con:
        (schema,) = con.execute(
            "SELECT table_schema FROM information_schema.tables WHERE lower(table_name) = ? "
            "AND table_type = 'BASE TABLE'",
            [mart.lower()],
        ).fetchone()
        return {r[0] for r in con.execute(f'SELECT "{column}" FROM "{schema}"."{mart}"').fetchall()}


def shareable(conn) -> set[int]:
    """The test's own reading of the source: latest marketing granted, latest sale not false."""
    latest = {}
    for c, p, g in conn.execute(
        "SELECT CustomerID, Purpose, Granted FROM Consent ORDER BY RecordedAt, ID"
    ).fetchall():
        latest[(c, p)] = g
    customers = {r[0] for r in conn.execute("SELECT ID FROM Customer").fetchall()}
    return {
        c for c in customers
        if latest.get((c, "marketing")) is True and latest.get((c, "sale")) is not False
    }  # fmt: skip


def test_marts_shared_with_third_parties_keep_only_consenting_subjects(
    platform, warehouse, monkeypatch
):
    from built_warehouse import sync_all, transform_cli

    s, conn = warehouse, platform.conn
    # The shared mart and what it reads, with only the tests of those (dbt's cautious indirect
    # selection): the other marts' relationship tests to DIM_Customer need marts not built here.
    monkeypatch.setenv("DBT_INDIRECT_SELECTION", "cautious")
    shared = consent.shared_marts()
    assert shared == {"MKT_MarketingAudience": "CustomerKey"}
    sync_all(s)
    transform_cli(s, "--select", "+MKT_MarketingAudience")  # its dbt test runs in the build
    expected = shareable(conn)
    customers = {r[0] for r in conn.execute("SELECT ID FROM Customer").fetchall()}
    marketing_but_opted_out = {
        c for (c,) in conn.execute(
            "SELECT CustomerID FROM Consent WHERE Purpose = 'marketing' AND Granted "
            "INTERSECT SELECT CustomerID FROM Consent WHERE Purpose = 'sale' AND NOT Granted"
        ).fetchall()
    }  # fmt: skip
    # Both filters have someone to leave out, and the mart holds exactly the rest.
    assert marketing_but_opted_out and len(expected) < len(customers) - len(marketing_but_opted_out)
    for mart, column in shared.items():
        assert mart_keys(s, mart, column) == expected

    # A withdrawal and a GPC opt-out reach the shared mart at the next sync and build.
    withdrawn, signalled = sorted(expected)[:2]
    consent.record(s, withdrawn, "marketing", False, source="cli", by="tests")
    consent.opt_out(s, signalled, source="gpc", by="front-end")
    sync_all(s)
    transform_cli(s, "--select", "+MKT_MarketingAudience")
    assert mart_keys(s, "MKT_MarketingAudience", "CustomerKey") == expected - {withdrawn, signalled}
