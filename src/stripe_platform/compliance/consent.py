"""The consent registry and do-not-sell (issue 23, docs/compliance.md; the table ``Consent``,
sql/oltp/0025_consent.sql).

Per data subject (a customer) and purpose, every consent given or withdrawn is kept with when and
through what (``source``: cli, api, gpc, request, seed); the latest record wins. Two regimes, one
table:

- ``analytics``, ``ml_training``, ``marketing`` (:data:`PURPOSES`) are **opt-in** (GDPR Art. 6(1)(a)
  and 7): a subject with no record has not consented, and is left out of that purpose's outputs.
- ``sale`` is the CCPA right to opt out of the sale or sharing of personal information
  (1798.120): a subject with no record has not opted out; :func:`opt_out` records ``granted =
  false``, the same for the CLI, the API, a data-subject request and a browser's Global Privacy
  Control signal (``Sec-GPC: 1``, api/consent.py).

Pipelines honour it where they read: the fraud model's training set, read from the OLTP
database, leaves out subjects without ``ml_training`` (:func:`allowed_sql` in
ml/contract.py ``load_platform_transactions(purpose=...)``, used by ml/train.py); in the warehouse,
the table reaches dbt through the stream catalog like every table (``raw.postgres_consent``,
staged as ``stg_postgres__consent``: the latest record per subject and purpose), and a mart
flagged ``shared_with_third_parties`` keeps only subjects with ``marketing`` consent who did not
opt out of sale (dbt_project/models/marts/MKT_MarketingAudience.sql).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import psycopg
import yaml
from psycopg import sql

from stripe_platform.config import Settings
from stripe_platform.errors import PlatformError

Purpose = Literal["analytics", "ml_training", "marketing"]
Source = Literal["cli", "api", "gpc", "request", "seed"]
PURPOSES: tuple[str, ...] = get_args(Purpose)
SALE = "sale"  # the do-not-sell flag's purpose in the registry: granted = false is opted out
SOURCES: tuple[str, ...] = get_args(Source)


class ConsentError(PlatformError, ValueError):
    """A consent that cannot be recorded or read as asked: the message says what and where."""


class UnknownSubject(ConsentError, LookupError):
    """No customer with that id."""


@dataclass(frozen=True)
class ConsentRecord:
    customer_id: int
    purpose: str
    granted: bool
    source: str
    recorded_at: dt.datetime
    recorded_by: str

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["recorded_at"] = self.recorded_at.astimezone(dt.UTC).isoformat()
        return data


@dataclass(frozen=True)
class SubjectConsent:
    """What holds now for one subject: each opt-in purpose (None = never asked: no consent) and
    the do-not-sell flag, with the records they come from."""

    customer_id: int
    purposes: dict[str, bool | None]
    opted_out: bool
    records: tuple[ConsentRecord, ...]  # the latest per purpose

    def allows(self, purpose: str) -> bool:
        return bool(self.purposes.get(purpose))

    def to_json(self) -> dict[str, Any]:
        return {
            "customer_id": self.customer_id,
            "purposes": self.purposes,
            "opted_out": self.opted_out,
            "records": [r.to_json() for r in self.records],
        }


# What holds now: the latest record per (customer, purpose). The one definition every query here
# reads (the warehouse's staging model says the same in dbt).
CURRENT = """(SELECT DISTINCT ON (CustomerID, Purpose)
        CustomerID AS customer_id, Purpose AS purpose, Granted AS granted, Source AS source,
        RecordedAt AS recorded_at, RecordedBy AS recorded_by
    FROM Consent ORDER BY CustomerID, Purpose, RecordedAt DESC, ID DESC)"""
OPTED_OUT = f"SELECT customer_id FROM {CURRENT} k WHERE purpose = 'sale' AND NOT granted"


def _connect(settings: Settings) -> psycopg.Connection:
    from stripe_platform.oltp import db

    return db.connect_to_table(
        settings, "public.consent", what="consent registry", migration=25, error=ConsentError
    )


def _check(value: str, allowed: Iterable[str], what: str) -> str:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ConsentError(f"{what} {value!r} is not one of {', '.join(allowed)}")
    return value


def _aware(when: dt.datetime | None) -> dt.datetime:
    if when is None:
        return dt.datetime.now(dt.UTC)
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)


def _require_customer(conn: psycopg.Connection, customer_id: int) -> None:
    if (
        not 0 < customer_id < 2**63
        or conn.execute("SELECT 1 FROM Customer WHERE ID = %s", (customer_id,)).fetchone() is None
    ):
        raise UnknownSubject(f"customer {customer_id}: no such customer in {conn.info.dbname}")


def _insert(
    conn: psycopg.Connection,
    customer_id: int,
    purpose: str,
    granted: bool,
    source: str,
    at: dt.datetime,
    by: str,
) -> ConsentRecord:
    row = conn.execute(
        """INSERT INTO Consent (CustomerID, Purpose, Granted, Source, RecordedAt, RecordedBy)
           VALUES (%s, %s, %s, %s, %s, %s)
           RETURNING CustomerID AS customer_id, Purpose AS purpose, Granted AS granted,
               Source AS source, RecordedAt AS recorded_at, RecordedBy AS recorded_by""",
        (customer_id, purpose, granted, source, at, by),
    ).fetchone()
    return ConsentRecord(**row)


# -- recording ----------------------------------------------------------------------------------
def record(
    settings: Settings,
    customer_id: int,
    purpose: str,
    granted: bool,
    *,
    source: str,
    by: str | None = None,
    at: dt.datetime | None = None,
) -> ConsentRecord:
    """Record that ``customer_id`` gave (``granted``) or withdrew consent for ``purpose`` (one of
    :data:`PURPOSES`, or ``sale``: granted = false is the do-not-sell opt-out) at ``at`` (now),
    through ``source``, recorded by ``by`` (default: the source's name). Kept beside the earlier
    records; the latest wins."""
    _check(purpose, (*PURPOSES, SALE), "purpose")
    _check(source, SOURCES, "source")
    with _connect(settings) as conn:
        _require_customer(conn, customer_id)
        return _insert(conn, customer_id, purpose, bool(granted), source, _aware(at), by or source)


def opt_out(
    settings: Settings,
    customer_id: int,
    *,
    source: str,
    by: str | None = None,
    at: dt.datetime | None = None,
) -> ConsentRecord:
    """CCPA do not sell or share: ``customer_id`` opts out (``sale`` = false). Idempotent: a subject
    already opted out keeps the record that opted them out (a browser sends ``Sec-GPC: 1`` on
    every request; the registry records the decision once, not each request)."""
    _check(source, SOURCES, "source")
    with _connect(settings) as conn, conn.transaction():
        _require_customer(conn, customer_id)
        # One writer at a time per subject: two concurrent GPC requests record one opt-out.
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('consent'), %s::int)",
                     (customer_id % 2**31,))  # fmt: skip
        current = conn.execute(
            f"SELECT * FROM {CURRENT} k WHERE customer_id = %s AND purpose = %s",
            (customer_id, SALE),
        ).fetchone()
        if current is not None and not current["granted"]:
            return ConsentRecord(**current)
        return _insert(conn, customer_id, SALE, False, source, _aware(at), by or source)


# -- reading ------------------------------------------------------------------------------------
def subject(settings: Settings, customer_id: int) -> SubjectConsent:
    """What holds now for ``customer_id`` (an unknown customer: :class:`UnknownSubject`)."""
    with _connect(settings) as conn:
        _require_customer(conn, customer_id)
        rows = conn.execute(
            f"SELECT * FROM {CURRENT} k WHERE customer_id = %s ORDER BY purpose", (customer_id,)
        ).fetchall()
    records = tuple(ConsentRecord(**r) for r in rows)
    latest = {r.purpose: r.granted for r in records}
    return SubjectConsent(
        customer_id=customer_id,
        purposes={p: latest.get(p) for p in PURPOSES},
        opted_out=latest.get(SALE) is False,
        records=records,
    )


def history(settings: Settings, customer_id: int) -> list[ConsentRecord]:
    """Every record of ``customer_id``, oldest first."""
    with _connect(settings) as conn:
        rows = conn.execute(
            """SELECT CustomerID AS customer_id, Purpose AS purpose, Granted AS granted,
                   Source AS source, RecordedAt AS recorded_at, RecordedBy AS recorded_by
               FROM Consent WHERE CustomerID = %s ORDER BY RecordedAt, ID""",
            (customer_id,),
        ).fetchall()
    return [ConsentRecord(**r) for r in rows]


def allowed_sql(purpose: str, customer_id: sql.Composable) -> sql.Composed:
    """A condition true when the customer ``customer_id`` (an SQL expression, e.g.
    ``sql.SQL("t.CustomerID")``) consents to ``purpose`` now: the one filter pipelines put in
    their queries on the OLTP database (no record = no consent)."""
    _check(purpose, PURPOSES, "purpose")
    return sql.SQL("{} IN (SELECT customer_id FROM {} k WHERE purpose = {} AND granted)").format(
        customer_id, sql.SQL(CURRENT), sql.Literal(purpose)
    )


def shareable_sql(customer_id: sql.Composable) -> sql.Composed:
    """The condition for a dataset shared with third parties: ``marketing`` consent and not
    opted out of sale or sharing."""
    return sql.SQL("{} AND {} NOT IN ({})").format(
        allowed_sql("marketing", customer_id), customer_id, sql.SQL(OPTED_OUT)
    )


def allowed(settings: Settings, purpose: str) -> set[int]:
    """The customers consenting to ``purpose`` now (``sale``: those not opted out)."""
    _check(purpose, (*PURPOSES, SALE), "purpose")
    with _connect(settings) as conn:
        if purpose == SALE:
            rows = conn.execute(
                f"SELECT ID AS id FROM Customer WHERE ID NOT IN ({OPTED_OUT})"
            ).fetchall()
        else:
            rows = conn.execute(
                sql.SQL("SELECT c.ID AS id FROM Customer c WHERE {}").format(
                    allowed_sql(purpose, sql.SQL("c.ID"))
                )
            ).fetchall()
    return {r["id"] for r in rows}


def opted_out(settings: Settings) -> set[int]:
    """The customers opted out of sale or sharing now."""
    with _connect(settings) as conn:
        rows = conn.execute(OPTED_OUT).fetchall()
    return {r["customer_id"] for r in rows}


def rates(settings: Settings) -> dict[str, Any]:
    """The dashboard's consent KPIs: over the customers there are now, how many consent to each
    purpose and how many opted out of sale (rates in [0, 1]; 0 when there are no customers)."""
    with _connect(settings) as conn:
        subjects = conn.execute("SELECT count(*) AS n FROM Customer").fetchone()["n"]
        rows = conn.execute(
            f"""SELECT k.purpose, k.granted, count(*) AS n
               FROM {CURRENT} k JOIN Customer c ON c.ID = k.customer_id
               GROUP BY k.purpose, k.granted"""
        ).fetchall()
    counts = {(r["purpose"], r["granted"]): r["n"] for r in rows}

    def rate(n: int) -> float:
        return round(n / subjects, 4) if subjects else 0.0

    by_purpose = {}
    for purpose in PURPOSES:
        granted = counts.get((purpose, True), 0)
        by_purpose[purpose] = {"granted": granted, "rate": rate(granted)}
    opted = counts.get((SALE, False), 0)
    return {
        "subjects": subjects,
        "by_purpose": by_purpose,
        "opted_out": opted,
        "opt_out_rate": rate(opted),
    }


# -- the seed's synthetic subjects ----------------------------------------------------------------
# The share of seeded customers who consented at sign-up (synthetic data, docs/seed.md). Every one
# accepted the fraud model's training (so the seed's training set is what it was before consent
# existed), most accepted analytics, fewer marketing; a tenth opted out of sale. Which customers
# is a hash of the seed, the purpose and the id: deterministic, and no draw from the seed's
# generators (the rest of the seeded data is unchanged).
SEED_SHARES = {"analytics": 0.9, "ml_training": 1.0, "marketing": 0.6, SALE: 0.1}


def seed_consents(conn: psycopg.Connection, seed: int) -> int:
    """Record the seeded customers' consents (``source`` seed, at their sign-up time) on the
    seed's connection; customers already holding a seed record are skipped (a resumed seed adds
    nothing twice). Returns the records added."""
    shares = sql.SQL(", ").join(
        sql.SQL("({}, {}::float8)").format(sql.Literal(p), sql.Literal(s))
        for p, s in SEED_SHARES.items()
    )
    cursor = conn.execute(
        sql.SQL(
            """INSERT INTO Consent (CustomerID, Purpose, Granted, Source, RecordedAt, RecordedBy)
               SELECT c.ID, p.purpose, p.purpose <> 'sale', 'seed', c.CreatedAt, 'seed'
               FROM Customer c CROSS JOIN (VALUES {shares}) AS p (purpose, share)
               WHERE ('x' || substr(md5({seed} || ':' || p.purpose || ':' || c.ID), 1, 8))
                         ::bit(32)::bigint / 4294967296.0 < p.share
                 AND NOT EXISTS (SELECT FROM Consent k WHERE k.CustomerID = c.ID
                                 AND k.Purpose = p.purpose AND k.Source = 'seed')"""
        ).format(shares=shares, seed=sql.Literal(str(seed)))
    )
    return cursor.rowcount


# -- datasets shared with third parties ----------------------------------------------------------
def shared_marts(root: Path | None = None) -> dict[str, str]:
    """The marts flagged ``shared_with_third_parties: true`` in their meta (dbt_project/models/
    marts/*.yml) and each one's subject column (the catalog's): every one of them keeps only
    customers with ``marketing`` consent who did not opt out of sale."""
    from stripe_platform.governance.classification import REPO_ROOT, load_catalog

    root = root or REPO_ROOT
    flagged = {}
    for path in sorted((root / "dbt_project" / "models" / "marts").glob("*.yml")):
        for model in (yaml.safe_load(path.read_text()) or {}).get("models", []):
            meta = {**(model.get("meta") or {}), **((model.get("config") or {}).get("meta") or {})}
            if meta.get("shared_with_third_parties") is True:
                flagged[model["name"]] = None
    catalog = load_catalog(root)
    for name in flagged:
        subject = catalog.subject("marts", name)
        if subject is None:
            raise ConsentError(
                f"mart {name} is shared with third parties but names no subject column "
                "(meta subject: true): consent cannot be applied to it"
            )
        flagged[name] = subject
    return flagged
