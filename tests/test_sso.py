"""SSO through SAML: the platform's API (``create_app``) served by uvicorn over TLS as the service
provider, a real pysaml2 IdP (tests/saml_idp.py) served by uvicorn over TLS, and a client that
acts as the browser (httpx, its own cookie jar): /saml/login -> the IdP -> POST /saml/acs ->
the session cookie -> authenticated requests.

Negative cases, each with a real signed (or unsigned) XML response: unsigned, signed by another
key, expired, for another audience, tampered with after signing, unsolicited, replayed, answered
through another browser, a user whose groups map to no role. Each is refused with its reason,
logged in the access log, and leaves no session.

Real components: the session's PostgreSQL (a database of this module: sessions and the replay
cache live there), xmlsec1 (the signatures), the access policy of the repository (access/
policy.yaml: group `engineers` -> developer, `analysts` -> analyst).
"""

from __future__ import annotations

import base64
import datetime as dt
import os
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from psycopg import sql

from conftest import TEMPLATE_DB
from saml_idp import TestIdP, read_form
from stripe_platform.api.app import create_app
from stripe_platform.api.models import EXAMPLE_REQUEST
from stripe_platform.api.server import bind
from stripe_platform.audit import access_log
from stripe_platform.config import Settings
from stripe_platform.oltp import db
from stripe_platform.runtime.tls import ensure_certificates
from stripe_platform.security import saml

START_TIMEOUT = 30.0  # an upper bound on a server's start, never a wait by itself


@dataclass
class Sso:
    settings: Settings  # the API's
    url: str
    idp: TestIdP
    ca: ssl.SSLContext

    def browser(self) -> httpx.Client:
        """A new browser: its own cookie jar, TLS verified against the platform's CA."""
        return httpx.Client(verify=self.ca, timeout=20, follow_redirects=False)


def serve_in_thread(app, sock, tls) -> tuple[uvicorn.Server, threading.Thread]:
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            ssl_certfile=str(tls.server_cert),
            ssl_keyfile=str(tls.server_key),
            log_level="warning",
            timeout_graceful_shutdown=5,  # a connection a failed test left open cannot hold it
        )
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT
    while not server.started:
        assert thread.is_alive(), "the API did not start"
        assert time.monotonic() < deadline, "the API did not start in time"
        time.sleep(0.02)
    return server, thread


@pytest.fixture(scope="module")
def sso(settings, tmp_path_factory) -> Iterator[Sso]:
    """One database, one IdP and one API server for the module."""
    name = f"test_sso_{os.getpid()}"
    with db.connect(settings, database="postgres", autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {} STRATEGY FILE_COPY").format(
                sql.Identifier(name), sql.Identifier(TEMPLATE_DB)
            )
        )
    tls = ensure_certificates(settings.home_dir / "tls")
    ca = ssl.create_default_context(cafile=str(tls.ca_cert))
    idp = TestIdP(tmp_path_factory.mktemp("idp"), tls.server_cert, tls.server_key)
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    s = settings.model_copy(
        update={
            "pg_database": name,
            "api_port": port,
            "saml_idp_metadata": str(idp.metadata_file),
        }
    )
    server, thread = serve_in_thread(create_app(s), sock, tls)
    try:
        url = f"https://127.0.0.1:{port}"
        metadata = httpx.get(f"{url}/saml/metadata", verify=ca, timeout=20)
        assert metadata.status_code == 200, metadata.text
        idp.trust(metadata.text)
        idp.start()
        yield Sso(s, url, idp, ca)
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()
        idp.stop()
        with db.connect(settings, database="postgres", autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def new_browser(sso) -> Iterator[Callable[[], httpx.Client]]:
    """Makes browsers for one test, closed after it whatever happened."""
    opened: list[httpx.Client] = []

    def new() -> httpx.Client:
        opened.append(sso.browser())
        return opened[-1]

    yield new
    for client in opened:
        client.close()


def start_login(sso: Sso, browser: httpx.Client, next_path: str = "/saml/session"):
    """/saml/login, then the IdP's login page: the request the IdP is waiting to answer."""
    started = browser.get(f"{sso.url}/saml/login", params={"next": next_path})
    assert started.status_code == 303, started.text
    location = started.headers["location"]
    assert location.startswith(f"{sso.idp.url}/sso?SAMLRequest="), location
    assert "SigAlg=http%3A%2F%2Fwww.w3.org%2F2001%2F04%2Fxmldsig-more%23rsa-sha256" in location
    page = browser.get(location)
    assert page.status_code == 200, page.text  # the IdP checked the request's signature
    return page


def log_in_at_idp(sso: Sso, browser: httpx.Client, page, user: str, groups: list[str]):
    """The user logs in at the IdP; returns the SAML form the IdP answers (ACS URL, fields)."""
    action, fields = read_form(page.text)
    fields.update(user=user, groups=",".join(groups))
    answered = browser.post(f"{sso.idp.url.removesuffix('/idp')}{action}", data=fields)
    assert answered.status_code == 200, answered.text
    return read_form(answered.text)


def sessions_of(sso: Sso, user: str) -> list[tuple]:
    with db.connect(sso.settings, with_key=False, autocommit=True) as conn:
        return conn.execute(
            """SELECT via, roles, idp_groups, host(source_ip), revoked_at
               FROM access.api_session WHERE user_name = %s ORDER BY created_at""",
            (user,),
        ).fetchall()


def acs_events(sso: Sso, user: str | None, since: dt.datetime) -> list[access_log.AccessEvent]:
    return [
        e
        for e in access_log.events(sso.settings, since=since, origins=("api",))
        if e.kind == "authn" and e.resource == "/saml/acs" and e.user == user
    ]


def test_the_sp_metadata_names_the_acs_and_the_key_kept_private(sso):
    s = sso.settings
    response = httpx.get(f"{sso.url}/saml/metadata", verify=sso.ca)
    assert response.headers["content-type"] == "application/samlmetadata+xml"
    xml = response.text
    assert f'entityID="{sso.url}/saml/metadata"' in xml
    assert f'Location="{sso.url}/saml/acs"' in xml
    assert 'AuthnRequestsSigned="true"' in xml and 'WantAssertionsSigned="true"' in xml
    cert = (s.home_dir / "saml" / "sp.crt").read_text()
    assert "".join(cert.strip().splitlines()[1:-1]) in xml.replace("\n", "")
    assert (s.home_dir / "saml").stat().st_mode & 0o777 == 0o700
    assert (s.home_dir / "saml" / "sp.key").stat().st_mode & 0o777 == 0o600


def test_round_trip_opens_a_session_that_authenticates_then_logs_out(sso, new_browser):
    since = dt.datetime.now(dt.UTC)
    browser = new_browser()
    began = time.perf_counter()
    page = start_login(sso, browser, next_path="/saml/session")
    action, fields = log_in_at_idp(sso, browser, page, "dana.dev", ["engineers"])
    assert action == f"{sso.url}/saml/acs"
    done = browser.post(action, data=fields)
    elapsed = time.perf_counter() - began
    assert done.status_code == 303, done.text
    assert done.headers["location"] == "/saml/session"
    cookie = next(c for c in done.headers.get_list("set-cookie") if c.startswith("sp_session="))
    attributes = {a.strip().lower() for a in cookie.split(";")[1:]}
    assert {"secure", "httponly", "samesite=lax", "path=/"} <= attributes
    print(f"SAML round trip (login, IdP, ACS) over TLS: {elapsed * 1000:.0f} ms")

    me = browser.get(f"{sso.url}/saml/session")
    assert me.status_code == 200, me.text
    assert me.json() == {
        "user": "dana.dev",
        "roles": ["developer"],
        "via": "session",
        "login": "saml",
        "mfa_verified_at": None,
    }
    # The session carries the role the policy maps `engineers` to: the scoring route's auth passes
    # (developer holds fraud.score); what it answers next is the model's business, not auth's.
    scored = browser.post(f"{sso.url}/v1/fraud/score", json=EXAMPLE_REQUEST)
    assert scored.status_code not in (401, 403), scored.text
    anonymous = httpx.post(f"{sso.url}/v1/fraud/score", json=EXAMPLE_REQUEST, verify=sso.ca)
    assert anonymous.status_code == 401

    assert sessions_of(sso, "dana.dev") == [
        ("saml", ["developer"], ["engineers"], "127.0.0.1", None)
    ]
    (allowed,) = acs_events(sso, "dana.dev", since)
    assert (allowed.outcome, allowed.via, allowed.source) == ("allow", "saml", "127.0.0.1")
    assert allowed.detail["roles"] == ["developer"]
    assert (
        fields["SAMLResponse"]
        not in (sso.settings.home_dir / "logs")
        .joinpath("access", f"api-{dt.datetime.now(dt.UTC).date()}.jsonl")
        .read_text()
    )

    out = browser.post(f"{sso.url}/saml/logout")
    assert out.json() == {"logged_out": True}
    assert browser.get(f"{sso.url}/saml/session").status_code == 401
    ((*_, revoked_at),) = sessions_of(sso, "dana.dev")
    assert revoked_at is not None


# Each defect: the reason the SP gives. The user is named after the case, to find its traces.
DEFECTS = {
    "unsigned": "signature",
    "response_signed_only": "signature",
    "foreign_key": "signature",
    "tampered": "signature",
    "sha1": "weak_signature",
    "expired": "expired",
    "wrong_audience": "audience",
    "unsolicited": "unsolicited",
    "idp_initiated": "unsolicited",
}


@pytest.mark.parametrize("defect", list(DEFECTS))
def test_a_defective_response_is_refused_logged_and_opens_no_session(sso, new_browser, defect):
    since = dt.datetime.now(dt.UTC)
    user = f"mallory.{defect.replace('_', '-')}"
    browser = new_browser()
    pending = sso.idp.ticket(start_login(sso, browser).text)
    forged = sso.idp.forge(pending, user, ["engineers"], defect)
    refused = browser.post(f"{sso.url}/saml/acs", data={"SAMLResponse": forged})
    assert refused.status_code == 403, refused.text
    assert refused.json()["detail"]["reason"] == DEFECTS[defect], refused.text
    assert "sp_session" not in refused.headers.get("set-cookie", "")
    assert sessions_of(sso, user) == []
    # Logged, without a user name: nothing in a refused assertion is vouched for.
    denied = [e for e in acs_events(sso, None, since) if e.reason.startswith(DEFECTS[defect])]
    assert [e.outcome for e in denied] == ["deny"]


BOMB = (
    '<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;">]>'
    '<samlp:Response xmlns:samlp="urn:oasis:names:tc:SAML:2.0:protocol" InResponseTo="x">&b;'
    "</samlp:Response>"
)


@pytest.mark.parametrize(
    ("posted", "message"),
    [
        ("", "no SAMLResponse in the post"),
        ("not base64 at all!", "not base64"),
        (base64.b64encode(b"<html><body>hello</body></html>").decode(), "not a SAML 2.0 Response"),
        (base64.b64encode(b"<samlp:Response").decode(), "not well-formed XML"),
        (base64.b64encode(BOMB.encode()).decode(), "declares DTD entities"),
        ("A" * (saml.MAX_RESPONSE_BYTES + 4), "larger than"),
    ],
)
def test_what_is_not_a_saml_response_is_a_bad_request(sso, posted, message):
    refused = httpx.post(f"{sso.url}/saml/acs", data={"SAMLResponse": posted}, verify=sso.ca)
    assert refused.status_code == 400, refused.text
    assert refused.json()["detail"]["reason"] == "malformed"
    assert message in refused.json()["detail"]["message"]


def test_a_replayed_response_is_refused_from_any_browser(sso, new_browser):
    since = dt.datetime.now(dt.UTC)
    browser = new_browser()
    page = start_login(sso, browser)
    action, fields = log_in_at_idp(sso, browser, page, "rita.replay", ["analysts"])
    assert browser.post(action, data=fields).status_code == 303
    again = browser.post(action, data=fields)
    assert again.status_code == 403
    assert again.json()["detail"]["reason"] == "replayed"
    stolen = new_browser().post(action, data=fields)
    assert stolen.json()["detail"]["reason"] == "replayed"
    assert len(sessions_of(sso, "rita.replay")) == 1
    assert [e.outcome for e in acs_events(sso, "rita.replay", since)] == ["allow"]
    assert len([e for e in acs_events(sso, None, since) if e.reason.startswith("replayed")]) == 2


def test_the_same_response_posted_at_once_opens_one_session(sso, new_browser):
    """Four posts of one response racing (a double submit, or a replay timed to win): the
    database lets exactly one consume the request."""
    browser = new_browser()
    page = start_login(sso, browser)
    action, fields = log_in_at_idp(sso, browser, page, "carl.concurrent", ["engineers"])
    cookies = {"sp_saml_browser": browser.cookies["sp_saml_browser"]}
    barrier = threading.Barrier(4)

    def post() -> httpx.Response:
        with httpx.Client(verify=sso.ca, cookies=cookies, timeout=30) as client:
            barrier.wait()
            return client.post(action, data=fields)

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: post(), range(4)))
    assert sorted(a.status_code for a in answers) == [303, 403, 403, 403]
    assert {a.json()["detail"]["reason"] for a in answers if a.status_code == 403} == {"replayed"}
    assert len(sessions_of(sso, "carl.concurrent")) == 1


def test_an_assertion_id_used_before_is_refused_for_a_new_request(sso, new_browser):
    """The second line of defence: even a signed answer to a new request of ours is refused when
    it reuses an assertion id (the replay cache of assertions, not only of requests)."""
    first, second = new_browser(), new_browser()
    page = start_login(sso, first)
    action, fields = log_in_at_idp(sso, first, page, "ivan.reuse", ["engineers"])
    assert first.post(action, data=fields).status_code == 303
    (used,) = saml_assertions(sso, "ivan.reuse")
    pending = sso.idp.ticket(start_login(sso, second).text)

    def reuse(response, assertion):
        assertion.id = used

    xml = sso.idp.signed_edit(pending, "ivan.reuse", ["engineers"], reuse)
    reused = second.post(
        f"{sso.url}/saml/acs", data={"SAMLResponse": base64.b64encode(xml.encode()).decode()}
    )
    assert reused.status_code == 403
    assert reused.json()["detail"] == {
        "reason": "replayed",
        "message": f"the assertion {used} was used already",
    }
    assert len(sessions_of(sso, "ivan.reuse")) == 1


def saml_assertions(sso: Sso, user: str) -> list[str]:
    with db.connect(sso.settings, with_key=False, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT assertion_id FROM access.saml_assertion WHERE user_name = %s", (user,)
        ).fetchall()
    return [r[0] for r in rows]


def test_a_response_posted_through_another_browser_is_refused(sso, new_browser):
    """Login CSRF: a response the attacker obtained for their own login, posted from the victim's
    browser (which never asked), is refused; the browser that asked can still use it."""
    asked = new_browser()
    page = start_login(sso, asked)
    action, fields = log_in_at_idp(sso, asked, page, "olga.other", ["engineers"])
    injected = new_browser().post(action, data=fields)
    assert injected.status_code == 403
    assert injected.json()["detail"]["reason"] == "browser"
    assert sessions_of(sso, "olga.other") == []
    assert asked.post(action, data=fields).status_code == 303


def test_two_logins_started_in_one_browser_are_both_answered(sso, new_browser):
    """Two tabs: the second login does not disown the first (one binding cookie per browser)."""
    browser = new_browser()
    first = start_login(sso, browser)
    second = start_login(sso, browser)
    for page in (second, first):
        action, fields = log_in_at_idp(sso, browser, page, "tara.tabs", ["engineers"])
        assert browser.post(action, data=fields).status_code == 303
    assert len(sessions_of(sso, "tara.tabs")) == 2


def test_a_user_whose_groups_map_to_no_role_gets_no_session(sso, new_browser):
    since = dt.datetime.now(dt.UTC)
    browser = new_browser()
    page = start_login(sso, browser)
    action, fields = log_in_at_idp(sso, browser, page, "nora.norole", ["marketing", "interns"])
    refused = browser.post(action, data=fields)
    assert refused.status_code == 403
    detail = refused.json()["detail"]
    assert detail["reason"] == "no_role"
    assert "marketing, interns" in detail["message"]
    assert sessions_of(sso, "nora.norole") == []
    (denied,) = acs_events(sso, "nora.norole", since)
    assert denied.outcome == "deny" and denied.reason.startswith("no_role")


def test_login_answered_by_another_api_process_and_replay_refused_there(sso, new_browser):
    """Another worker (a separate `stripe-platform api` process, same database and public URL)
    accepts the answer to a request this one sent; the replay cache is the database's, so this
    one refuses the same response afterwards."""
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    sock.close()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRIPE_PLATFORM_")}
    env.update(
        STRIPE_PLATFORM_PROFILE="embedded",
        STRIPE_PLATFORM_HOME=str(sso.settings.home_dir),
        STRIPE_PLATFORM_PG_DATABASE=sso.settings.pg_database,
        STRIPE_PLATFORM_API_PORT=str(port),
        STRIPE_PLATFORM_API_PUBLIC_URL=sso.url,  # both workers behind one public address
        STRIPE_PLATFORM_SAML_IDP_METADATA=str(sso.idp.metadata_file),
    )
    log = Path(sso.idp.directory) / "worker2.log"
    with log.open("w") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "stripe_platform.cli", "api", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        other = f"https://127.0.0.1:{port}"
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert worker.poll() is None, log.read_text()[-3000:]
            try:
                httpx.get(f"{other}/healthz", verify=sso.ca, timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.1)
        browser = new_browser()
        page = start_login(sso, browser)
        _, fields = log_in_at_idp(sso, browser, page, "wanda.worker", ["analysts"])
        # The browser cookie is scoped to the public host; send it to the other worker as well.
        cookies = {"sp_saml_browser": browser.cookies["sp_saml_browser"]}
        with httpx.Client(verify=sso.ca, cookies=cookies, timeout=30) as direct:
            began = time.perf_counter()
            accepted = direct.post(f"{other}/saml/acs", data=fields)
            print(f"first login at a fresh worker: {time.perf_counter() - began:.2f} s")
        assert accepted.status_code == 303, accepted.text
        replay = browser.post(f"{sso.url}/saml/acs", data=fields)
        assert replay.json()["detail"]["reason"] == "replayed"
        assert [r[0] for r in sessions_of(sso, "wanda.worker")] == ["saml"]
    finally:
        worker.terminate()
        worker.wait(30)


def test_old_requests_and_assertions_are_forgotten_as_logins_go(sso, new_browser):
    with db.connect(sso.settings, with_key=False, autocommit=True) as conn:
        conn.execute(
            """INSERT INTO access.saml_request (request_id, next_path, browser_sha256, created_at,
                   expires_at)
               VALUES ('id-old', '/', repeat('0', 64), now() - interval '3 days',
                       now() - interval '2 days'),
                      ('id-recent', '/', repeat('0', 64), now() - interval '2 hours',
                       now() - interval '1 hour')"""
        )
        conn.execute(
            """INSERT INTO access.saml_assertion (assertion_id, issuer, request_id, user_name,
                   expires_at)
               VALUES ('a-old', 'idp', 'id-old', 'x', now() - interval '1 minute')"""
        )
        start_login(sso, new_browser())
        requests = {r for (r,) in conn.execute("SELECT request_id FROM access.saml_request")}
        assertions = conn.execute(
            "SELECT count(*) FROM access.saml_assertion WHERE assertion_id = 'a-old'"
        ).fetchone()
    # An expired request is kept a day (a late replay is named as such), then goes.
    assert "id-old" not in requests and "id-recent" in requests
    assert assertions == (0,)


def test_idp_metadata_from_https_or_a_file_and_what_is_refused(sso, tmp_path):
    s = sso.settings
    fetched = saml.service_provider(
        s.model_copy(update={"saml_idp_metadata": f"{sso.idp.url}/metadata"})
    )
    assert fetched.idp_entity_id == sso.idp.entity_id  # over TLS, verified with the platform CA

    def refusal(source: str) -> str:
        with pytest.raises(saml.SamlNotConfigured) as refused:
            saml.service_provider(s.model_copy(update={"saml_idp_metadata": source})).require_idp()
        return str(refused.value)

    assert "plain http is refused" in refusal("http://127.0.0.1:1/idp/metadata")
    assert f"names {tmp_path / 'missing.xml'}, which cannot be read" in refusal(
        str(tmp_path / "missing.xml")
    )
    sp_only = tmp_path / "sp-only.xml"
    sp_only.write_text(httpx.get(f"{sso.url}/saml/metadata", verify=sso.ca).text)
    assert "describes 0 identity providers" in refusal(str(sp_only))


def test_without_an_idp_the_login_routes_say_which_variable_to_set(settings):
    app = create_app(settings.model_copy(update={"saml_idp_metadata": None}))
    client = TestClient(app, base_url="https://testserver")  # no lifespan: no model, no follower
    for response in (client.get("/saml/login"), client.post("/saml/acs", data={})):
        assert response.status_code == 503, response.text
        assert "STRIPE_PLATFORM_SAML_IDP_METADATA" in response.json()["detail"]["message"]
    assert client.get("/saml/metadata").status_code == 200  # the IdP needs it to be set up


@pytest.mark.parametrize(
    ("asked", "kept"),
    [
        ("/v1/customers/1?x=1", "/v1/customers/1?x=1"),
        ("/", "/"),
        ("https://evil.example/", "/"),
        ("//evil.example/", "/"),
        ("/\\evil.example/", "/"),
        ("javascript:alert(1)", "/"),
        ("/ok\r\nSet-Cookie: x=1", "/"),
        ("", "/"),
    ],
)
def test_next_is_a_path_on_this_site(asked, kept):
    assert saml.safe_next(asked) == kept
