"""Log documents shaped like PostgreSQL's session/query logs (the brief's Log collection), with
planted, labelled anomalies for the log anomaly model. Documented in docs/seed.md.

Normal traffic: the payments API, the ELT service, analysts, developers and administrators, mostly
in business hours, with the everyday mistakes (42P01 unknown table, 42703 unknown column, 42501
permission denied on a PII column). Anomalies (isAnomaly=1, anomalyType):
- off_hours_pii_read: a developer account reading PII tables at 1-4 am, repeatedly refused;
- failed_login_burst: tens of failed logins (FATAL 28P01) for one user within two minutes from an
  unknown host;
- mass_export: a read-only account exporting whole tables (COPY ... TO STDOUT) off hours.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from stripe_platform.seed.documents import oid, utc
from stripe_platform.seed.generate import to_ms
from stripe_platform.seed.spec import SeedSpec

HOUR = 3_600_000
ACTORS = (  # (user, application, remote host prefix, share)
    ("payments_api", "payments-api", "10.0.1.", 0.55),
    ("airbyte", "airbyte", "10.0.2.", 0.10),
    ("analyst_marie", "metabase", "10.0.3.", 0.08),
    ("analyst_tom", "psql", "10.0.3.", 0.06),
    ("dev_lucas", "psql", "10.0.4.", 0.08),
    ("dev_amina", "DBeaver", "10.0.4.", 0.06),
    ("admin", "psql", "10.0.9.", 0.07),
)
STATEMENTS = {
    "payments_api": [
        "INSERT INTO Transaction (TransactionStatusID, MerchantID, Amount, CurrencyID, PaymentMethodID, CustomerID, DateTime) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        "SELECT change_transaction_status($1, $2, $3, $4)",
        "SELECT ID, UserName FROM Customer WHERE EmailHash = pii_lookup_hash($1)",
    ],
    "airbyte": [
        "SELECT * FROM Transaction WHERE UpdatedAt > $1 ORDER BY UpdatedAt",
        "SELECT * FROM pg_logical_slot_peek_binary_changes('airbyte_slot', NULL, 10000)",
    ],
    "analyst": [
        "SELECT MerchantID, sum(Amount) FROM Transaction GROUP BY 1",
        "SELECT count(*) FROM Transaction WHERE TransactionStatusID = 6",
        "SELECT * FROM CustomerInteractions",
    ],
    "dev": [
        "SELECT * FROM Merchant WHERE ID = 42",
        "EXPLAIN SELECT * FROM Transaction WHERE CustomerID = 7",
        "SELECT Email FROM Customer LIMIT 10",
    ],
    "admin": [
        "VACUUM ANALYZE Transaction",
        "SELECT * FROM pg_stat_activity",
        "DROP TABLE TransactionStateChanges",
        "ALTER TABLE Merchant ADD COLUMN Website text",
    ],
}
ERRORS = {  # statement -> (SQLSTATE, message) when it fails
    "SELECT * FROM CustomerInteractions": (
        "42P01",
        'relation "customerinteractions" does not exist',
    ),
    "SELECT Email FROM Customer LIMIT 10": ("42501", "permission denied for table customer"),
    "DROP TABLE TransactionStateChanges": (
        "42501",
        "must be owner of table transactionstatechanges",
    ),
    "ALTER TABLE Merchant ADD COLUMN Website text": (
        "42701",
        'column "website" of relation "merchant" already exists',
    ),
}
PII_READS = [
    "SELECT Email, FullName, Phone FROM Customer",
    "SELECT * FROM Customer",
    "SELECT Line1, PostalCode FROM Address",
    "SELECT PAN FROM PaymentInstrument",
]
EXPORTS = [
    "COPY (SELECT * FROM Transaction) TO STDOUT WITH CSV HEADER",
    "COPY Customer TO STDOUT",
    "COPY (SELECT * FROM Address) TO STDOUT",
]


def _doc(
    n: int,
    user: str,
    app: str,
    host: str,
    pid: int,
    session_ms: int,
    lines: list[dict],
    anomaly: str | None,
) -> dict[str, Any]:
    doc = {
        "_id": oid("Log", n),
        "query_id": n,
        "user": user,
        "dbname": "stripe",
        "pid": pid,
        "remote_host": host,
        "session_id": f"{session_ms // 1000:x}.{pid:x}",
        "session_start": utc(session_ms),
        "application_name": app,
        "lines": lines,
        "isAnomaly": int(anomaly is not None),
    }
    if anomaly:
        doc["anomalyType"] = anomaly
    return doc


def _statement_lines(at: int, statement: str, error: tuple[str, str] | None) -> list[dict]:
    lines = [{"timestamp": utc(at), "error_severity": "LOG", "message": f"statement: {statement}"}]
    if error:
        lines.append(
            {
                "timestamp": utc(at + 3),
                "error_severity": "ERROR",
                "state_code": error[0],
                "message": error[1],
                "statement": statement,
            }
        )
    return lines


def log_documents(spec: SeedSpec, rng: np.random.Generator) -> Iterator[dict[str, Any]]:
    n_total = spec.cap(spec.n_logs)
    n_anomalous = max(9, round(0.02 * n_total))
    end_ms = to_ms(spec.end)
    window_start = end_ms - 90 * 86_400_000  # the document store keeps 90 days of logs
    share = np.array([a[3] for a in ACTORS])
    n = 0

    # Normal traffic, mostly 8:00-19:00 UTC+1 on weekdays.
    normal = n_total - n_anomalous
    actor = rng.choice(len(ACTORS), normal, p=share / share.sum())
    day = rng.integers(0, 90, normal)
    hour = np.where(
        rng.random(normal) < 0.9, rng.integers(7, 18, normal), rng.integers(0, 24, normal)
    )
    when = np.sort(window_start + day * 86_400_000 + hour * HOUR + rng.integers(0, HOUR, normal))
    for k in range(normal):
        user, app, host, _ = ACTORS[actor[k]]
        family = (
            "analyst" if user.startswith("analyst") else "dev" if user.startswith("dev") else user
        )
        statement = STATEMENTS[family][int(rng.integers(len(STATEMENTS[family])))]
        error = ERRORS.get(statement) if rng.random() < 0.5 else None
        pid = int(rng.integers(1000, 60000))
        n += 1
        yield _doc(
            n,
            user,
            app,
            f"{host}{int(rng.integers(2, 250))}",
            pid,
            int(when[k]) - 60_000,
            _statement_lines(int(when[k]), statement, error),
            None,
        )

    # Anomalies, in bursts.
    left, burst_number = n_anomalous, 0
    while left > 0:
        kind = burst_number % 3  # every kind is present, even at the smallest scale
        burst_number += 1
        burst = int(min(left, rng.integers(3, 12), max(3, n_anomalous // 3)))
        day = int(rng.integers(0, 90))
        pid = int(rng.integers(1000, 60000))
        if kind == 0:
            user, app, host, anomaly = "dev_lucas", "psql", "10.0.4.77", "off_hours_pii_read"
            t = window_start + day * 86_400_000 + int(rng.integers(0, 3)) * HOUR  # 1-4 am UTC+1
        elif kind == 1:
            user, app, host, anomaly = (
                "admin",
                "",
                f"185.{int(rng.integers(1, 255))}.44.9",
                "failed_login_burst",
            )
            t = window_start + day * 86_400_000 + int(rng.integers(0, 24)) * HOUR
        else:
            user, app, host, anomaly = "analyst_tom", "psql", "10.0.3.15", "mass_export"
            t = window_start + day * 86_400_000 + 21 * HOUR + int(rng.integers(0, 3)) * HOUR
        session = t - 30_000
        for _ in range(burst):
            t += int(rng.integers(500, 8_000))
            n += 1
            if anomaly == "off_hours_pii_read":
                lines = _statement_lines(
                    t,
                    PII_READS[int(rng.integers(len(PII_READS)))],
                    ("42501", "permission denied for table customer"),
                )
            elif anomaly == "failed_login_burst":
                lines = [
                    {
                        "timestamp": utc(t),
                        "error_severity": "FATAL",
                        "state_code": "28P01",
                        "message": f'password authentication failed for user "{user}"',
                    }
                ]
            else:
                rows = int(rng.integers(200_000, 2_000_000))
                lines = _statement_lines(t, EXPORTS[int(rng.integers(len(EXPORTS)))], None)
                lines.append(
                    {
                        "timestamp": utc(t + rows // 50),
                        "error_severity": "LOG",
                        "message": f"duration: {rows / 50:.3f} ms  rows: {rows}",
                    }
                )
            yield _doc(n, user, app, host, pid, session, lines, anomaly)
        left -= burst
