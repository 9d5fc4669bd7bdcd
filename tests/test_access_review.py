"""The hourly access review (orchestration/access_review.py, DAG security_access_review) on the real
cluster: a contractor's login past its end date is revoked and cannot log in any more; a grant made
by hand outside the policy raises a drift alert naming it, and is left for a reviewed apply."""

from __future__ import annotations

import datetime as dt

import psycopg
import pytest
from psycopg import sql
from pydantic import SecretStr

from stripe_platform.oltp import db
from stripe_platform.oltp.access import grant_temporary
from stripe_platform.orchestration import access_review, alerts
from stripe_platform.security import access_postgres
from stripe_platform.security.policy import load_policy


@pytest.fixture
def reviewed(settings, database, conn, monkeypatch):
    """Settings on this test's database at the default policy, alerts captured at the webhook's
    door (the delivery itself is tested in test_dags.py)."""
    s = settings.model_copy(
        update={
            "pg_database": database,
            "alert_webhook_url": SecretStr("http://127.0.0.1:9/alerts"),
        }
    )
    now = dt.datetime.now(dt.UTC)
    policy = load_policy(s)
    access_postgres.apply(s, policy, access_postgres.plan(s, policy, now))
    sent: list[dict] = []
    monkeypatch.setattr(alerts, "post_json", lambda url, payload: sent.append(payload) or 204)
    yield s, sent
    for role in ("review_contractor",):
        if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_the_review_revokes_expired_logins_and_alerts_on_drift(reviewed, conn):
    s, sent = reviewed
    now = dt.datetime.now(dt.UTC)
    _, password = grant_temporary(
        conn, "review_contractor", "readonlyuser", days=1, now=now - dt.timedelta(days=2)
    )
    conn.execute("GRANT INSERT ON Merchant TO readonlyuser")  # by hand, outside the policy

    result = access_review.review_access(s, now=now)

    assert [r["principal"] for r in result["revoked_expired"]] == ["review_contractor"]
    assert not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = 'review_contractor'").fetchone()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(
            db.conninfo(s, user="review_contractor", password=password, with_key=False)
        ).close()
    drift = [(c["action"], c["principal"], c["object"]) for c in result["drift"]]
    assert drift == [("revoke", "readonlyuser", "table public.merchant")]
    assert {a["kind"] for a in sent} == {"expired_access", "access_drift"}
    text = " ".join(a["text"] for a in sent)
    assert "review_contractor" in text and "readonlyuser" in text and "merchant" in text
    # Drift is reported, not corrected behind the reviewers' back.
    assert conn.execute(
        "SELECT has_table_privilege('readonlyuser', 'merchant', 'INSERT')"
    ).fetchone() == (True,)


def test_a_clean_review_sends_nothing(reviewed):
    s, sent = reviewed
    result = access_review.review_access(s)
    assert result["revoked_expired"] == [] and result["drift"] == []
    assert sent == []
