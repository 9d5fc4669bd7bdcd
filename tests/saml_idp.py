"""A real SAML 2.0 identity provider for the tests: pysaml2's IdP (``saml2.server.Server``) behind a
small ASGI app served by uvicorn over TLS (the platform's test certificates), signing with an RSA
key and self-signed certificate generated when it starts (rsa-sha256).

The browser side, as a real IdP does it:

- ``GET /idp/metadata``: its metadata (also written to :attr:`TestIdP.metadata_file`, which the
  API is configured with).
- ``GET /idp/sso`` (HTTP-Redirect): checks the SP's signed AuthnRequest and answers a login form
  holding a ticket for it.
- ``POST /idp/login`` (ticket, user, groups comma-separated): "logs the user in" and answers the
  HTTP-POST form that carries the signed SAMLResponse to the SP's ACS.

For the negative tests, :meth:`TestIdP.forge` answers a ticket with a chosen defect: unsigned,
signed by another key, expired, for another audience, tampered with after signing, or not in
response to the request at all. Forged assertions are edited as XML objects and signed again with
xmlsec1 (pysaml2's own signing), so each carries exactly one defect.
"""

from __future__ import annotations

import base64
import datetime as dt
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from saml2 import BINDING_HTTP_POST, BINDING_HTTP_REDIRECT, class_name, samlp
from saml2.config import IdPConfig
from saml2.metadata import create_metadata_string
from saml2.saml import NAMEID_FORMAT_UNSPECIFIED, NameID
from saml2.server import Server
from saml2.sigver import pre_signature_part
from saml2.time_util import instant
from saml2.xmldsig import DIGEST_SHA1, DIGEST_SHA256, SIG_RSA_SHA1, SIG_RSA_SHA256
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response
from starlette.routing import Route

from stripe_platform.api.server import bind

PASSWORD_CONTEXT = "urn:oasis:names:tc:SAML:2.0:ac:classes:PasswordProtectedTransport"
GROUPS_ATTRIBUTE = "groups"
DEFECTS = (
    "unsigned",  # neither the assertion nor the response signed
    "response_signed_only",  # the response signed, the assertion inside not
    "foreign_key",  # signed by a key that is not the IdP's (same issuer name)
    "sha1",  # signed by the IdP with rsa-sha1 and a sha1 digest (pysaml2's default)
    "expired",  # NotOnOrAfter an hour ago, signed by the IdP
    "wrong_audience",  # for another service provider, signed by the IdP
    "tampered",  # signed by the IdP, then a group added
    "unsolicited",  # signed by the IdP, in response to a request the SP never sent
    "idp_initiated",  # signed by the IdP, in response to nothing
)


def make_keypair(directory: Path, name: str, common_name: str) -> tuple[Path, Path]:
    """An RSA key (0600) and a self-signed certificate, as PEM files ``<name>.key``/``.crt``."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    key_file, cert_file = directory / f"{name}.key", directory / f"{name}.crt"
    key_file.touch(mode=0o600)
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_file, cert_file


class FormReader(HTMLParser):
    """The first form of an HTML page: its action and its inputs' values (what a browser posts)."""

    def __init__(self) -> None:
        super().__init__()
        self.action: str | None = None
        self.fields: dict[str, str] = {}
        self._done = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        if tag == "form" and self.action is None:
            self.action = values.get("action", "")
        elif tag == "input" and self.action is not None and not self._done and "name" in values:
            self.fields[values["name"]] = values.get("value", "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._done = True


def read_form(html: str) -> tuple[str, dict[str, str]]:
    reader = FormReader()
    reader.feed(html)
    assert reader.action is not None, f"no form in: {html[:300]}"
    return reader.action, reader.fields


@dataclass
class Pending:
    """An AuthnRequest the IdP received and checked, waiting for the user to log in."""

    request_id: str
    sp_entity_id: str
    destination: str  # the SP's ACS
    relay_state: str | None


class TestIdP:
    """The IdP; :meth:`start` serves it, :meth:`trust` gives it the SP's metadata."""

    __test__ = False  # not a test class, whatever pytest thinks of its name

    def __init__(self, directory: Path, tls_cert: Path, tls_key: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.tls_cert, self.tls_key = tls_cert, tls_key
        self.socket = bind("127.0.0.1", 0)
        self.url = f"https://127.0.0.1:{self.socket.getsockname()[1]}/idp"
        self.entity_id = f"{self.url}/metadata"
        self.key_file, self.cert_file = make_keypair(directory, "idp", "test IdP")
        # Another key, for assertions "signed by someone else" under this IdP's name.
        self.foreign_key_file, self.foreign_cert_file = make_keypair(directory, "foreign", "idp")
        self.metadata_file = directory / "idp-metadata.xml"
        xml = create_metadata_string(None, self._config(), valid=None, sign=False)
        self.metadata_file.write_bytes(xml if isinstance(xml, bytes) else xml.encode())
        self.server: Server | None = None
        self.pending: dict[str, Pending] = {}
        self.logins = 0  # responses issued through the browser flow
        self._uvicorn: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    # -- configuration --------------------------------------------------------------------------
    def _config(self, sp_metadata: str | None = None) -> IdPConfig:
        config = IdPConfig()
        config.load(
            {
                "entityid": self.entity_id,
                "key_file": str(self.key_file),
                "cert_file": str(self.cert_file),
                "xmlsec_binary": "/usr/bin/xmlsec1",
                "metadata": {"inline": [sp_metadata]} if sp_metadata else {},
                "service": {
                    "idp": {
                        "endpoints": {
                            "single_sign_on_service": [(f"{self.url}/sso", BINDING_HTTP_REDIRECT)],
                        },
                        "want_authn_requests_signed": True,
                        "signing_algorithm": SIG_RSA_SHA256,
                        "digest_algorithm": DIGEST_SHA256,
                        "name_id_format": [NAMEID_FORMAT_UNSPECIFIED],
                        "policy": {
                            "default": {
                                "lifetime": {"minutes": 5},
                                "attribute_restrictions": None,
                                "name_form": "urn:oasis:names:tc:SAML:2.0:attrname-format:basic",
                            }
                        },
                    }
                },
            }
        )
        return config

    def trust(self, sp_metadata: str) -> None:
        """Know the SP (its ACS and the certificate its AuthnRequests are signed with)."""
        self.server = Server(config=self._config(sp_metadata))

    # -- serving --------------------------------------------------------------------------------
    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/idp/metadata", self._metadata, methods=["GET"]),
                Route("/idp/sso", self._sso, methods=["GET"]),
                Route("/idp/login", self._login, methods=["POST"]),
            ]
        )

    def start(self) -> None:
        config = uvicorn.Config(
            self.app(),
            ssl_certfile=str(self.tls_cert),
            ssl_keyfile=str(self.tls_key),
            log_level="warning",
            lifespan="off",
        )
        self._uvicorn = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._uvicorn.run, kwargs={"sockets": [self.socket]}, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._uvicorn.started:
            assert self._thread.is_alive(), "the test IdP did not start"
            assert time.monotonic() < deadline, "the test IdP did not start within 10 s"
            time.sleep(0.02)

    def stop(self) -> None:
        if self._uvicorn is not None and self._thread is not None:
            self._uvicorn.should_exit = True
            self._thread.join(10)
        self.socket.close()

    async def _metadata(self, request: Request) -> Response:
        return Response(self.metadata_file.read_bytes(), media_type="application/samlmetadata+xml")

    async def _sso(self, request: Request) -> Response:
        if self.server is None:
            return PlainTextResponse("the IdP does not know the SP yet", status_code=503)
        query = request.query_params
        try:  # pysaml2 checks the request's signature with the SP's metadata key
            parsed = self.server.parse_authn_request(
                query["SAMLRequest"],
                BINDING_HTTP_REDIRECT,
                relay_state=query.get("RelayState"),
                sigalg=query.get("SigAlg"),
                signature=query.get("Signature"),
            )
        except Exception as exc:
            return PlainTextResponse(f"bad AuthnRequest: {exc}", status_code=400)
        message = parsed.message
        args = self.server.response_args(message, [BINDING_HTTP_POST])
        ticket = secrets.token_urlsafe(16)
        self.pending[ticket] = Pending(
            request_id=message.id,
            sp_entity_id=args["sp_entity_id"],
            destination=args["destination"],
            relay_state=query.get("RelayState"),
        )
        return HTMLResponse(
            '<html><body><form method="post" action="/idp/login">'
            f'<input type="hidden" name="ticket" value="{ticket}">'
            '<input name="user" value=""><input name="groups" value="">'
            '<button type="submit">Log in</button></form></body></html>'
        )

    async def _login(self, request: Request) -> Response:
        form = await request.form()
        pending = self.pending.get(str(form.get("ticket", "")))
        if pending is None:
            return PlainTextResponse("unknown ticket", status_code=400)
        groups = [g.strip() for g in str(form.get("groups", "")).split(",") if g.strip()]
        response = self.respond(pending, str(form["user"]), groups)
        self.logins += 1
        return HTMLResponse(self.post_form(pending, response))

    # -- responses ------------------------------------------------------------------------------
    def ticket(self, html: str) -> Pending:
        """The pending request behind the login form ``html`` (as /idp/sso answered it)."""
        _, fields = read_form(html)
        return self.pending[fields["ticket"]]

    def post_form(self, pending: Pending, response_xml: str) -> str:
        """The HTML page that posts ``response_xml`` to the SP (pysaml2's HTTP-POST binding)."""
        assert self.server is not None
        info = self.server.apply_binding(
            BINDING_HTTP_POST,
            response_xml,
            pending.destination,
            pending.relay_state or "",
            response=True,
        )
        return info["data"]

    def respond(self, pending: Pending, user: str, groups: list[str], **kwargs: Any) -> str:
        """The response XML for a logged-in ``user`` (assertion and response signed)."""
        assert self.server is not None
        arguments = {
            "identity": {GROUPS_ATTRIBUTE: groups},
            "in_response_to": pending.request_id,
            "destination": pending.destination,
            "sp_entity_id": pending.sp_entity_id,
            "name_id": NameID(text=user, format=NAMEID_FORMAT_UNSPECIFIED),
            "authn": {"class_ref": PASSWORD_CONTEXT},
            "sign_assertion": True,
            "sign_response": True,
            **kwargs,
        }
        return str(self.server.create_authn_response(**arguments))

    def forge(self, pending: Pending, user: str, groups: list[str], defect: str) -> str:
        """A response to ``pending`` with one ``defect`` (see :data:`DEFECTS`), base64 as the
        browser posts it."""
        assert defect in DEFECTS, defect
        if defect == "unsigned":
            xml = self.respond(pending, user, groups, sign_assertion=False, sign_response=False)
        elif defect == "response_signed_only":
            xml = self.respond(pending, user, groups, sign_assertion=False, sign_response=True)
        elif defect == "foreign_key":
            xml = self.signed_edit(pending, user, groups, None, key=self.foreign_key_file)
        elif defect == "sha1":
            xml = self.signed_edit(
                pending, user, groups, None, algorithms=(SIG_RSA_SHA1, DIGEST_SHA1)
            )
        elif defect == "tampered":
            signed = self.respond(pending, user, groups, sign_response=False)
            marker = f">{groups[0]}<"
            assert marker in signed
            xml = signed.replace(marker, ">platform-admins<", 1)
        else:
            xml = self.signed_edit(pending, user, groups, _EDITS[defect])
        return base64.b64encode(xml.encode()).decode()

    def signed_edit(
        self,
        pending: Pending,
        user: str,
        groups: list[str],
        edit: Callable[[Any, Any], None] | None,
        *,
        key: Path | None = None,
        algorithms: tuple[str, str] = (SIG_RSA_SHA256, DIGEST_SHA256),
    ) -> str:
        """An unsigned response, edited, then its assertion signed with ``key`` (the IdP's) and
        ``algorithms`` (signature, digest)."""
        assert self.server is not None
        xml = self.respond(pending, user, groups, sign_assertion=False, sign_response=False)
        response = samlp.response_from_string(xml)
        assertion = response.assertion[0]
        if edit is not None:
            edit(response, assertion)
        key_file = key or self.key_file
        cert_file = self.foreign_cert_file if key is not None else self.cert_file
        cert = "".join(cert_file.read_text().strip().splitlines()[1:-1])
        signing, digest = algorithms
        assertion.signature = pre_signature_part(assertion.id, cert, 1, digest, signing)
        return self.server.sec.sign_statement(
            str(response), class_name(assertion), key_file=str(key_file), node_id=assertion.id
        )


def _expired(response: Any, assertion: Any) -> None:
    now = int(time.time())
    assertion.conditions.not_before = instant(time_stamp=now - 7200)
    assertion.conditions.not_on_or_after = instant(time_stamp=now - 3600)
    for confirmation in assertion.subject.subject_confirmation:
        confirmation.subject_confirmation_data.not_on_or_after = instant(time_stamp=now - 3600)


def _wrong_audience(response: Any, assertion: Any) -> None:
    for restriction in assertion.conditions.audience_restriction:
        for audience in restriction.audience:
            audience.text = "https://other-service.example/saml/metadata"


def _answering(request_id: str | None) -> Callable[[Any, Any], None]:
    def edit(response: Any, assertion: Any) -> None:
        response.in_response_to = request_id
        for confirmation in assertion.subject.subject_confirmation:
            confirmation.subject_confirmation_data.in_response_to = request_id

    return edit


_EDITS: dict[str, Callable[[Any, Any], None]] = {
    "expired": _expired,
    "wrong_audience": _wrong_audience,
    "unsolicited": _answering("id-" + secrets.token_hex(16)),
    "idp_initiated": _answering(None),
}
