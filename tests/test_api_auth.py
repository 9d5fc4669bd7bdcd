"""The API's authentication and authorisation (api/auth.py, security/sessions.py): bearer tokens,
SSO session cookies, scopes, data classes in clear and the MFA step-up, decided at request time
against the access policy; `access token issue|list|revoke`.

Real components: one uvicorn over TLS per module serving the platform's app (create_app) on a
database of its own cloned from the session's migrated template, the sessions and tokens in that
PostgreSQL, an access policy file of the test's (rewritten by a test to change the policy while
the server runs). Two probe routes added to the app exercise require_clear before the sensitive
routes exist; everything else is the app as `stripe-platform api` serves it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Annotated

import httpx
import pytest
from fastapi import APIRouter, Depends
from psycopg import sql
from pydantic import SecretStr
from typer.testing import CliRunner

from api_server import served_over_tls
from conftest import TEMPLATE_DB
from stripe_platform.api.app import create_app
from stripe_platform.api.auth import Principal, principal, require_clear
from stripe_platform.api.models import EXAMPLE_REQUEST
from stripe_platform.audit import access_log
from stripe_platform.cli import app as cli_app
from stripe_platform.config import Settings, get_settings
from stripe_platform.oltp import db
from stripe_platform.security import sessions
from stripe_platform.security.access import expired_all, plan_all, revoke_expired_all
from stripe_platform.security.access_api import apply as apply_api
from stripe_platform.security.policy import PolicyError, load_policy

TODAY = dt.datetime.now(dt.UTC).date()
ENDED = TODAY - dt.timedelta(days=10)  # a contractor's end, passed
LATER = TODAY + dt.timedelta(days=20)  # a contractor's end, to come


def policy_text(*, scorer_scope: str = "fraud.score", admin_group: str = "payments-admins") -> str:
    return f"""\
version: 1
roles:
  admin:
    description: everything
    clear: [pii_quasi, pii, pci, credential]
    api: [customers.read, payments.read, exports.run, access.admin]
  viewer:
    description: customers, masked
    api: [customers.read]
  clerk:
    description: a machine that may read PII in clear (not that it could step up)
    clear: [pii]
    api: [customers.read]
  fraud_service:
    description: the scorer
    api: [{scorer_scope}]
groups:
  {admin_group}: [admin]
users:
  scorer:
    roles: [fraud_service]
    stores: [api]
  reader:
    roles: [viewer]
  boss:
    roles: [admin]
  clerk-bot:
    roles: [clerk]
    stores: [api]
  contractor:
    roles: [fraud_service, viewer]
    until: {ENDED.isoformat()}
    reason: CHG-1 ended
  temp:
    roles: [fraud_service]
    until: {LATER.isoformat()}
    reason: CHG-2
  dba:
    roles: [admin]
    stores: [postgres]
"""


def policy_line(user: str) -> int:
    """The line of ``user``'s entry in the policy file (what refusals name)."""
    return policy_text().splitlines().index(f"  {user}:") + 1


# -- the server ------------------------------------------------------------------------------------
probe = APIRouter(prefix="/probe")


@probe.get("/whoami")
def whoami(who: Annotated[Principal, Depends(principal)]) -> dict:
    return {"user": who.user, "roles": sorted(who.roles), "via": who.via}


@probe.get("/pii")
def pii(who: Annotated[Principal, Depends(require_clear("pii"))]) -> dict:
    return {"user": who.user}


@probe.get("/export")
def export(who: Annotated[Principal, Depends(require_clear(bulk=True))]) -> dict:
    return {"user": who.user}


@probe.get("/plain")
def plain(who: Annotated[Principal, Depends(require_clear("non_personal"))]) -> dict:
    return {"user": who.user}


@dataclass
class Server:
    settings: Settings
    policy: Path
    client: httpx.Client

    def get(self, path: str, *, token: str | None = None, session: str | None = None):
        headers = {}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        if session is not None:
            headers["Cookie"] = f"{sessions.SESSION_COOKIE}={session}"
        return self.client.get(path, headers=headers)

    def score(self, token: str | None) -> httpx.Response:
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        return self.client.post("/v1/fraud/score", json=EXAMPLE_REQUEST, headers=headers)

    def token(self, user: str, roles: list[str], days: float = 1) -> str:
        return sessions.issue_token(
            self.settings,
            user=user,
            roles=roles,
            expires_at=dt.datetime.now(dt.UTC) + dt.timedelta(days=days),
            created_by="tests",
        )[1]


def refusal(response: httpx.Response, status: int) -> tuple[str, str]:
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    return detail["reason"], detail["message"]


@pytest.fixture(scope="module")
def server(settings, tmp_path_factory) -> Iterator[Server]:
    name = f"test_api_auth_{os.getpid()}"
    with db.connect(settings, database="postgres", autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {} STRATEGY FILE_COPY").format(
                sql.Identifier(name), sql.Identifier(TEMPLATE_DB)
            )
        )
    tmp = tmp_path_factory.mktemp("api-auth")
    policy = tmp / "policy.yaml"
    policy.write_text(policy_text())
    s = settings.model_copy(
        update={
            "pg_database": name,
            "access_policy": policy,
            "mlflow_tracking_uri": SecretStr(f"sqlite:///{tmp}/mlflow.db"),
        }
    )
    app = create_app(s)
    app.include_router(probe)
    try:
        with served_over_tls(app, s, name="api-auth", timeout=10) as client:
            yield Server(s, policy, client)
    finally:
        with db.connect(settings, database="postgres", autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


# -- tokens ----------------------------------------------------------------------------------------
def test_bearer_tokens_unknown_expired_revoked_get_401_and_scopes_403(server):
    s = server.settings
    # Open routes stay open.
    assert server.get("/healthz").status_code == 200
    assert server.get("/openapi.json").status_code == 200

    # No credentials: 401 with the challenge.
    response = server.score(None)
    assert refusal(response, 401)[0] == "no_credentials"
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="stripe-platform"'

    # A token of ours that the database never issued, and something that is no token at all.
    for wrong in ("spt_" + secrets.token_urlsafe(32), "not-a-token"):
        response = server.score(wrong)
        assert refusal(response, 401) == ("invalid_token", "unknown bearer token")
        assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]

    # The scorer's token passes authentication and authorisation: the route itself answers (no
    # champion in this database's MLflow store: 503, not 401/403).
    good = server.token("scorer", ["fraud_service"])
    response = server.score(good)
    assert response.status_code == 503, response.text
    assert "no model to score with" in response.json()["detail"]

    # Its time passed (as the database's clock sees it): refused at once (no cache in the way:
    # the rows change under the server, as another process's would, so wait out the cache).
    expiring = server.token("scorer", ["fraud_service"])
    assert server.score(expiring).status_code == 503
    with db.connect(s, autocommit=True) as conn:
        conn.execute(
            """UPDATE access.api_token SET created_at = now() - interval '2 days',
                   expires_at = now() - interval '1 minute'
               WHERE secret_sha256 = %s""",
            (sessions.digest(expiring),),
        )
    time.sleep(sessions.CACHE_SECONDS + 0.2)
    reason, message = refusal(server.score(expiring), 401)
    assert reason == "invalid_token" and " expired at " in message

    # Revoked in this process: refused at the very next request.
    token_id = sessions.resolve_token(s, good).token_id
    sessions.revoke_token(s, token_id, by="tests")
    reason, message = refusal(server.score(good), 401)
    assert reason == "invalid_token" and message.startswith(f"token {token_id} revoked at ")

    # Revoked by another process (a direct write here): refused within the cache's seconds.
    other = server.token("scorer", ["fraud_service"])
    assert server.score(other).status_code == 503
    with db.connect(s, autocommit=True) as conn:
        conn.execute(
            """UPDATE access.api_token SET revoked_at = now(), revoked_by = 'elsewhere'
               WHERE secret_sha256 = %s""",
            (sessions.digest(other),),
        )
    deadline = time.monotonic() + sessions.CACHE_SECONDS + 1.0
    while server.score(other).status_code != 401:
        assert time.monotonic() < deadline, "a revocation elsewhere was not seen in time"
        time.sleep(0.1)

    # A role without the scope: 403, saying which.
    reader = server.token("reader", ["viewer"])
    reason, message = refusal(server.score(reader), 403)
    assert reason == "missing_scope"
    assert message == "reader (roles viewer) lacks the scope fraud.score"

    # The database keeps digests only: no secret in any column.
    with db.connect(s, autocommit=True) as conn:
        rows = conn.execute("SELECT row_to_json(t)::text FROM access.api_token t").fetchall()
    assert rows and not any(good in r[0] or reader in r[0] for r in rows)
    assert any(sessions.digest(good) in r[0] for r in rows)


def test_the_policy_decides_at_request_time(server):
    # A contractor whose `until` passed: refused at once, whatever the token says.
    contractor = server.token("contractor", ["fraud_service"])
    reason, message = refusal(server.score(contractor), 401)
    assert reason == "access_expired"
    assert (
        f"the access of contractor ended at {ENDED + dt.timedelta(days=1):%Y-%m-%d} 00:00 UTC"
        in message
    )
    assert message.endswith(f"(policy.yaml:{policy_line('contractor')})")  # not the server's path
    # One still in time passes.
    assert server.score(server.token("temp", ["fraud_service"])).status_code == 503

    # Not provisioned on the API (stores: postgres): 403. Not in the policy at all: 401.
    reason, _ = refusal(server.get("/probe/whoami", token=server.token("dba", ["admin"])), 403)
    assert reason == "no_api_access"
    reason, message = refusal(server.score(server.token("stranger", ["fraud_service"])), 401)
    assert (reason, message) == (
        "access_ended",
        "user stranger is no longer in the access policy (policy.yaml)",
    )

    # A token carries at most its roles, and only those the policy still grants.
    wide = server.token("reader", ["viewer", "admin"])  # admin is not reader's in the policy
    assert server.get("/probe/whoami", token=wide).json() == {
        "user": "reader", "roles": ["viewer"], "via": "token"
    }  # fmt: skip

    # The policy changes while the server runs: the next request follows it.
    scorer = server.token("scorer", ["fraud_service"])
    assert server.score(scorer).status_code == 503
    try:
        server.policy.write_text(policy_text(scorer_scope="customers.read"))
        reason, message = refusal(server.score(scorer), 403)
        assert message == "scorer (roles fraud_service) lacks the scope fraud.score"
        # A broken policy file: closed, saying why (503), never open.
        server.policy.write_text(policy_text() + "  bogus: [\n")
        response = server.score(scorer)
        assert response.status_code == 503
        assert "the access policy cannot be read" in response.json()["detail"]
    finally:
        server.policy.write_text(policy_text())
    assert server.score(scorer).status_code == 503


def test_a_database_connection_dropped_meanwhile_fails_no_request(server):
    s = server.settings
    token = server.token("scorer", ["fraud_service"])
    assert server.score(token).status_code == 503  # through auth: pooled connections now idle
    with db.connect(s, autocommit=True) as conn:  # what a database restart does to them
        (dropped,) = conn.execute(
            """SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
               WHERE datname = current_database() AND pid <> pg_backend_pid()
                 AND state = 'idle' AND query LIKE '%%access.api_%%'"""
        ).fetchone()
    assert dropped >= 1
    sessions.forget_cached()
    response = server.score(token)
    assert response.status_code == 503 and "no model to score with" in response.text


# -- sessions --------------------------------------------------------------------------------------
def test_session_cookie_works_until_revoked_and_roles_follow_the_policy(server):
    s = server.settings
    cookie = sessions.create_session(
        s, user="boss", roles=["admin"], via="saml", source_ip="127.0.0.1"
    )
    assert server.get("/probe/whoami", session=cookie).json() == {
        "user": "boss", "roles": ["admin"], "via": "session"
    }  # fmt: skip
    assert refusal(server.get("/probe/whoami", session="nope"), 401)[0] == "invalid_session"
    sessions.revoke_session(s, sessions.digest(cookie), reason="logout")
    reason, message = refusal(server.get("/probe/whoami", session=cookie), 401)
    assert reason == "invalid_session" and "(logout)" in message

    # An SSO user known only through an IdP group: the group maps to its roles at each request;
    # once the policy no longer maps it, the session holds nothing.
    grouped = sessions.create_session(
        s, user="Someone@Example.com", roles=["admin"], via="saml", source_ip=None,
        groups=["payments-admins"],
    )  # fmt: skip
    assert server.get("/probe/whoami", session=grouped).json()["roles"] == ["admin"]
    try:
        server.policy.write_text(policy_text(admin_group="other-admins"))
        reason, _ = refusal(server.get("/probe/whoami", session=grouped), 403)
        assert reason == "no_role"
    finally:
        server.policy.write_text(policy_text())
    assert server.get("/probe/whoami", session=grouped).status_code == 200

    # A session of a contractor whose end passed: refused at once.
    ended = sessions.create_session(
        s, user="contractor", roles=["viewer"], via="saml", source_ip=None
    )
    assert refusal(server.get("/probe/whoami", session=ended), 401)[0] == "access_expired"

    # An expired session (its time passed in the database) is refused once the cache lets go.
    old = sessions.create_session(s, user="boss", roles=["admin"], via="saml", source_ip=None)
    with db.connect(s, autocommit=True) as conn:
        conn.execute(
            """UPDATE access.api_session SET created_at = now() - interval '9 hours',
                   expires_at = now() - interval '1 hour' WHERE session_id = %s""",
            (sessions.digest(old),),
        )
    sessions.forget_cached()
    reason, message = refusal(server.get("/probe/whoami", session=old), 401)
    assert reason == "invalid_session" and "session expired at" in message


def test_require_clear_and_the_mfa_step_up(server):
    s = server.settings
    step_up = 600  # the policy's default mfa.step_up_seconds
    boss = sessions.create_session(s, user="boss", roles=["admin"], via="saml", source_ip=None)
    sid = sessions.digest(boss)

    # Cleared for PII, never stepped up: 401 mfa_required with RFC 9470's challenge.
    for path in ("/probe/pii", "/probe/export"):
        response = server.get(path, session=boss)
        reason, message = refusal(response, 401)
        assert reason == "mfa_required"
        assert (
            f"a second factor within the last {step_up} s is required (last verified never)"
            in message
        )
        assert 'error="insufficient_user_authentication"' in response.headers["WWW-Authenticate"]
    # Non-personal data needs no step-up.
    assert server.get("/probe/plain", session=boss).status_code == 200

    # A fresh second factor: allowed, at once (the step-up drops the cached session).
    sessions.mark_step_up(s, sid, dt.datetime.now(dt.UTC))
    assert server.get("/probe/pii", session=boss).json() == {"user": "boss"}
    assert server.get("/probe/export", session=boss).status_code == 200
    # One older than the window: asked again.
    sessions.mark_step_up(s, sid, dt.datetime.now(dt.UTC) - dt.timedelta(seconds=step_up + 5))
    reason, message = refusal(server.get("/probe/pii", session=boss), 401)
    assert reason == "mfa_required" and "(last verified at " in message

    # Roles that may not read PII in clear: 403 whatever the second factor.
    reader = sessions.create_session(s, user="reader", roles=["viewer"], via="saml", source_ip=None)
    sessions.mark_step_up(s, sessions.digest(reader), dt.datetime.now(dt.UTC))
    reason, message = refusal(server.get("/probe/pii", session=reader), 403)
    assert (reason, message) == (
        "not_cleared",
        "reader (roles viewer) may not read pii data in clear",
    )

    # A token cleared for PII cannot step up: 403.
    clerk = server.token("clerk-bot", ["clerk"])
    reason, message = refusal(server.get("/probe/pii", token=clerk), 403)
    assert reason == "interactive_session_required"
    assert "API tokens cannot step up" in message
    assert server.get("/probe/plain", token=clerk).status_code == 200


def test_decisions_land_in_the_access_log(server):
    s = server.settings
    since = dt.datetime.now(dt.UTC)
    reader = server.token("reader", ["viewer"])
    assert server.score(reader).status_code == 403
    assert server.score("spt_" + secrets.token_urlsafe(32)).status_code == 401
    assert server.get("/probe/plain", token=reader).status_code == 200
    events = [e for e in access_log.events(s, since=since) if e.origin == "api"]
    decisions = [(e.kind, e.user, e.resource, e.outcome) for e in events if e.kind != "request"]
    assert decisions == [
        ("authz", "reader", "/v1/fraud/score", "deny"),
        ("authn", None, "/v1/fraud/score", "deny"),
        ("authz", "reader", "/probe/plain", "allow"),
    ]
    assert all(e.source == "127.0.0.1" for e in events)
    denied = next(e for e in events if e.kind == "authz" and e.outcome == "deny")
    assert denied.reason == "missing_scope: reader (roles viewer) lacks the scope fraud.score"
    # Every request is logged with its principal (the request log reads request.state).
    requests = [(e.user, e.via, e.outcome) for e in events if e.kind == "request"]
    assert requests == [
        ("reader", "token", "deny"),
        (None, None, "deny"),
        ("reader", "token", "allow"),
    ]
    # No secret reaches the log.
    text = "".join(p.read_text() for p in access_log.log_dir(s).glob("*"))
    assert reader not in text


# -- the CLI ---------------------------------------------------------------------------------------
@pytest.fixture
def cli(server, monkeypatch):
    monkeypatch.setenv("STRIPE_PLATFORM_PROFILE", "embedded")
    monkeypatch.setenv("STRIPE_PLATFORM_HOME", str(server.settings.home_dir))
    monkeypatch.setenv("STRIPE_PLATFORM_PG_DATABASE", server.settings.pg_database)
    monkeypatch.setenv("STRIPE_PLATFORM_ACCESS_POLICY", str(server.policy))
    get_settings.cache_clear()
    runner = CliRunner()

    def run(*args: str):
        return runner.invoke(cli_app, ["access", "token", *args])

    yield run
    get_settings.cache_clear()


def test_cli_issues_lists_and_revokes_tokens(server, cli):
    since = dt.datetime.now(dt.UTC)
    issued = cli("issue", "--user", "scorer", "--days", "7", "--json")
    assert issued.exit_code == 0, issued.output
    token = json.loads(issued.stdout)
    assert token["user"] == "scorer" and token["scopes"] == ["fraud.score"]
    expires = dt.datetime.fromisoformat(token["expires_at"])
    assert abs(expires - (dt.datetime.now(dt.UTC) + dt.timedelta(days=7))) < dt.timedelta(minutes=1)
    assert server.score(token["secret"]).status_code == 503  # through auth

    # The default expiry stops at the user's end; an explicit one past it is refused.
    temp = json.loads(cli("issue", "--user", "temp", "--json").stdout)
    assert temp["expires_at"] == f"{LATER + dt.timedelta(days=1)}T00:00:00+00:00"
    past_end = cli(
        "issue", "--user", "temp", "--expires", (LATER + dt.timedelta(days=1)).isoformat()
    )
    assert past_end.exit_code == 1
    assert "would outlive the access of temp, which ends at" in past_end.output
    assert f"{server.policy}:{policy_line('temp')}" in past_end.output

    for args, expected in [
        (("--user", "contractor"), "the access of contractor ended at"),
        (("--user", "dba"), "user dba is not provisioned on the API"),
        (("--user", "nobody"), "nobody is not a user of the access policy"),
        (("--user", "reader", "--role", "admin"), "user reader does not hold admin"),
        (("--user", "scorer", "--days", "3", "--expires", "2030-01-01"), "not both"),
        (("--user", "scorer", "--expires", "2020-01-01"), "has passed already"),
        (("--user", "scorer", "--expires", "tomorrow"), "a date (YYYY-MM-DD) or an ISO time"),
    ]:
        result = cli("issue", *args)
        assert result.exit_code == 1, (args, result.output)
        assert expected in result.output, (args, result.output)
        assert "Traceback" not in result.output

    listed = json.loads(cli("list", "--json").stdout)
    mine = next(t for t in listed if t["token_id"] == token["token_id"])
    assert mine["state"] == "usable" and "secret" not in mine
    assert token["secret"] not in cli("list").stdout

    revoked = cli("revoke", token["token_id"])
    assert (
        revoked.exit_code == 0 and f"revoked token {token['token_id']} (scorer)" in revoked.output
    )
    assert refusal(server.score(token["secret"]), 401)[0] == "invalid_token"
    again = json.loads(cli("revoke", token["token_id"], "--json").stdout)
    assert again["already_revoked"] is True
    missing = cli("revoke", "tok_000000000000")
    assert missing.exit_code == 1 and "no API token 'tok_000000000000'" in missing.output
    listed = json.loads(cli("list", "--json").stdout)
    assert next(t for t in listed if t["token_id"] == token["token_id"])["state"] == "revoked"
    # Issuing and revoking are administrative events of the access log (never the secret).
    admin = [
        (e.action, e.resource)
        for e in access_log.events(server.settings, since=since)
        if e.origin == "api" and e.kind == "admin"
    ]
    assert ("token.issue", f"api/token/{token['token_id']}") in admin
    assert admin.count(("token.revoke", f"api/token/{token['token_id']}")) == 1  # not twice
    text = "".join(p.read_text() for p in access_log.log_dir(server.settings).glob("*"))
    assert token["secret"] not in text


# -- the API target of `access plan|apply|expired|revoke-expired` ----------------------------------
def test_access_target_plans_revocations_and_revokes_expired_access(server):
    s = server.settings
    with db.connect(s, autocommit=True) as conn:  # a clean slate: the module's earlier credentials
        conn.execute(
            "UPDATE access.api_token SET revoked_at = now(), revoked_by = 'tests' WHERE revoked_at IS NULL"
        )
        conn.execute(
            "UPDATE access.api_session SET revoked_at = now(), revoked_reason = 'tests' WHERE revoked_at IS NULL"
        )
    sessions.forget_cached()

    def token_id(secret: str) -> str:
        return sessions.resolve_token(s, secret).token_id

    backed = server.token("scorer", ["fraud_service"])
    stranger = server.token("stranger", ["fraud_service"])
    wide = server.token("reader", ["viewer", "admin"])
    dba = server.token("dba", ["admin"])
    outliving = server.token("temp", ["fraud_service"], days=(LATER - TODAY).days + 5)
    ended = server.token("contractor", ["fraud_service"])
    boss = sessions.create_session(s, user="boss", roles=["admin"], via="saml", source_ip=None)
    grabby = sessions.create_session(s, user="reader", roles=["admin"], via="saml", source_ip=None)
    sessions.create_session(s, user="contractor", roles=["viewer"], via="saml", source_ip=None)
    policy = load_policy(path=server.policy)
    now = dt.datetime.now(dt.UTC)

    changes = plan_all(s, policy, now, targets=["api"])
    assert {(c.action, c.principal, c.object) for c in changes} == {
        ("revoke_token", "stranger", f"token {token_id(stranger)}"),
        ("revoke_token", "reader", f"token {token_id(wide)}"),
        ("revoke_token", "dba", f"token {token_id(dba)}"),
        ("revoke_token", "temp", f"token {token_id(outliving)}"),
        ("revoke_session", "reader", f"session {sessions.digest(grabby)}"),
    }
    reasons = {c.principal: c.reason for c in changes if c.action == "revoke_token"}
    assert reasons["stranger"] == "user stranger is not in the access policy (policy.yaml)"
    assert reasons["reader"].startswith(
        "the token carries admin, which the policy no longer grants reader"
    )
    assert reasons["dba"].startswith("user dba is not provisioned on the API")
    assert (
        f"after the end of temp's access, {LATER + dt.timedelta(days=1)} 00:00 UTC"
        in reasons["temp"]
    )

    # Expired access: the contractor's token and session, refused by the API already.
    found = expired_all(s, policy, now, targets=["api"])
    assert sorted((f.principal, f.still.split(" ")[0]) for f in found) == [
        ("contractor", "saml"), ("contractor", "token")
    ]  # fmt: skip
    assert all(f.still.endswith("refused at request time, row still present") for f in found)
    assert all(
        f.ended_at == dt.datetime.combine(ENDED + dt.timedelta(days=1), dt.time(), dt.UTC)
        for f in found
    )
    assert refusal(server.score(ended), 401)[0] == "access_expired"

    # apply refuses while the policy still grants the ended access, and changes nothing.
    with pytest.raises(
        PolicyError, match=f"{server.policy}:{policy_line('contractor')}: user contractor"
    ):
        apply_api(s, policy, changes)
    assert len(plan_all(s, policy, now, targets=["api"])) == 5

    revoked = revoke_expired_all(s, policy, now, targets=["api"])
    assert sorted(r.principal for r in revoked) == ["contractor", "contractor"]
    assert {r.remedy for r in revoked} == {"revoked"}
    assert expired_all(s, policy, now, targets=["api"]) == []
    assert sessions.resolve_token(s, backed) is not None  # only the ended access went

    # The contractor's entry removed from the policy: apply revokes the five, in one go.
    current = replace(
        policy, users=MappingProxyType({k: v for k, v in policy.users.items() if k != "contractor"})
    )
    applied = apply_api(s, current, changes)
    assert applied == changes
    assert plan_all(s, current, now, targets=["api"]) == []
    for secret in (stranger, wide, dba, outliving):
        assert refusal(server.score(secret), 401)[0] == "invalid_token"
    reason, message = refusal(server.get("/probe/whoami", session=grabby), 401)
    assert reason == "invalid_session" and "(access apply)" in message
    # What the policy backs is untouched.
    assert server.score(backed).status_code == 503
    assert server.get("/probe/whoami", session=boss).status_code == 200
