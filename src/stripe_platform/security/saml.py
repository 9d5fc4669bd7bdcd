"""The API as a SAML 2.0 service provider (SP), with pysaml2 and Debian's ``xmlsec1``.

What a login is (api/sso.py serves it over HTTP):

1. :func:`start_login`: an AuthnRequest for the configured identity provider (IdP), signed
   (rsa-sha256), sent through the browser (HTTP-Redirect binding). Its id, where the browser goes
   afterwards and a digest of the browser's own random cookie are stored in PostgreSQL
   (``access.saml_request``, sql/oltp/0018) for :data:`REQUEST_SECONDS`.
2. :func:`finish_login`: the IdP's answer, posted by the browser (HTTP-POST binding). Accepted only
   when pysaml2 validated it: the assertion signed by the key in the IdP's metadata (and with
   SHA-256 or stronger: xmlsec1 still accepts SHA-1), issued by that IdP, for this SP (audience),
   within its validity window
   (NotBefore/NotOnOrAfter, :data:`CLOCK_SKEW_SECONDS` of slack), in response to an AuthnRequest of
   ours still outstanding and sent to this browser, and never accepted before (the request is
   marked answered and the assertion id recorded in ``access.saml_assertion``, in one
   transaction). Shared state in the database rather than memory: any API worker takes the answer
   to a request another sent, and a replay is refused across workers and restarts.

Every refusal is a :class:`SamlError` whose ``reason`` is a short code (for the access log and
tests) and whose message says what was wrong. The SAMLResponse itself is never logged: pysaml2
logs refused assertions in full, so its logger is kept quiet here.

The SP's signing key and self-signed certificate are generated once into ``<home>/saml/``
(directory 0700, key 0600); the certificate is in the SP metadata the IdP is given
(GET /saml/metadata).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime as dt
import fcntl
import hashlib
import logging
import os
import re
import secrets
import shutil
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from stripe_platform.errors import PlatformError

if TYPE_CHECKING:
    import psycopg
    from saml2.config import SPConfig

    from stripe_platform.config import Settings

IDP_METADATA_VARIABLE = "STRIPE_PLATFORM_SAML_IDP_METADATA"
REQUEST_SECONDS = 600  # how long the IdP has to answer an AuthnRequest (the user logs in meanwhile)
CLOCK_SKEW_SECONDS = 60  # slack on the assertion's NotBefore/NotOnOrAfter between IdP and SP clocks
ANSWERED_KEPT_SECONDS = 86_400  # an answered request is kept a day: a replay is named as such
MAX_RESPONSE_BYTES = 256 * 1024  # a SAMLResponse is a few KB; this bounds the XML work per post
METADATA_REFRESH_SECONDS = 3600  # IdP metadata from a URL is fetched again after this long
KEY_BITS = 3072
CERT_VALIDITY = dt.timedelta(days=3650)  # SAML signing certificates are pinned, not CA-verified

# pysaml2 logs the refused assertion or response in full at ERROR: our refusal says why instead.
logging.getLogger("saml2").setLevel(logging.CRITICAL)

# What an IdP signature may use: SHA-1 (pysaml2's default, and xmlsec1 still verifies it) is out.
STRONG_SIGNATURES = frozenset(
    f"http://www.w3.org/2001/04/xmldsig-more#{name}"
    for name in ("rsa-sha256", "rsa-sha384", "rsa-sha512", "ecdsa-sha256", "ecdsa-sha384",
                 "ecdsa-sha512")
)  # fmt: skip
STRONG_DIGESTS = frozenset(
    {
        "http://www.w3.org/2001/04/xmlenc#sha256",
        "http://www.w3.org/2001/04/xmldsig-more#sha384",
        "http://www.w3.org/2001/04/xmlenc#sha512",
    }
)

_PROTOCOL_NS = "urn:oasis:names:tc:SAML:2.0:protocol"
_NEXT_PATH = re.compile(r"^/(?![/\\])[\x21-\x7e]*$")


class SamlError(PlatformError, ValueError):
    """A login refused (or SSO unusable); ``reason``: a short code, the message says why."""

    status = 403

    def __init__(self, reason: str, message: str, *, user: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.user = user  # the asserted user, once the assertion's signature was verified


class SamlNotConfigured(SamlError):
    """SSO is not set up (no IdP metadata, an unreadable one, no xmlsec1): 503."""

    status = 503

    def __init__(self, message: str) -> None:
        super().__init__("not_configured", message)


class SamlUnavailable(SamlError):
    """The replay cache (PostgreSQL) cannot be used: 503, the login can be tried again."""

    status = 503

    def __init__(self, message: str) -> None:
        super().__init__("unavailable", message)


class SamlBadRequest(SamlError):
    """The post is not a SAML response at all (missing, not base64, not XML, too large): 400."""

    status = 400


# -- the SP's key and certificate -----------------------------------------------------------------
@dataclass(frozen=True)
class SpKeyPair:
    key_file: Path
    cert_file: Path


def sp_keypair(settings: Settings) -> SpKeyPair:
    """The SP's signing key and certificate, generated on first use into ``<home>/saml/``.
    Serialised by a lock file: two API workers starting at once make one pair."""
    directory = settings.home_dir / "saml"
    pair = SpKeyPair(directory / "sp.key", directory / "sp.crt")
    if pair.key_file.exists() and pair.cert_file.exists():
        return pair
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.chmod(0o700)
    with (directory / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (pair.key_file.exists() and pair.cert_file.exists()):
            key_pem, cert_pem = _self_signed(settings)
            _write(pair.key_file, key_pem, 0o600)
            _write(pair.cert_file, cert_pem, 0o644)  # the cert last: its presence means both are
    return pair


def _self_signed(settings: Settings) -> tuple[bytes, bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "stripe-platform"),
            x509.NameAttribute(NameOID.COMMON_NAME, "stripe-platform SAML service provider"),
        ]
    )
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + CERT_VALIDITY)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write ``path`` whole (a partial file, then renamed), created with ``mode``."""
    partial = path.with_name(path.name + ".partial")
    partial.unlink(missing_ok=True)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    partial.replace(path)


# -- configuration --------------------------------------------------------------------------------
def entity_id(settings: Settings) -> str:
    return settings.saml_sp_entity_id or f"{settings.api_url}/saml/metadata"


def acs_url(settings: Settings) -> str:
    return f"{settings.api_url}/saml/acs"


@dataclass(frozen=True)
class ServiceProvider:
    """pysaml2's SP configuration for ``settings``, with the one IdP it trusts, and its client.

    One client per configuration, shared by the requests: making one loads the SP's RSA key
    (~0.3 s of key checks). Its calls keep their state in per-call objects; the one thing it would
    keep, each identity it parsed, it is told to forget (:func:`_forgetful_cache`)."""

    entity_id: str
    acs_url: str
    idp_entity_id: str | None  # None: no IdP configured (the SP metadata can still be served)
    config: SPConfig
    client: Any  # saml2.client.Saml2Client

    def require_idp(self) -> str:
        if self.idp_entity_id is None:
            raise SamlNotConfigured(
                f"SSO is not configured: set {IDP_METADATA_VARIABLE} to the identity provider's "
                "SAML metadata (a file path or an https:// URL)"
            )
        return self.idp_entity_id


_providers: dict[tuple, tuple[float, ServiceProvider]] = {}
_providers_lock = threading.Lock()


def service_provider(settings: Settings) -> ServiceProvider:
    """The SP for ``settings``; cached until the IdP metadata file changes (or, for a URL, for
    :data:`METADATA_REFRESH_SECONDS`)."""
    source = (settings.saml_idp_metadata or "").strip() or None
    stamp: Any = None
    if source is not None and not source.lower().startswith(("https://", "http://")):
        path = Path(source).expanduser()
        try:
            stat = path.stat()
        except OSError as exc:
            raise SamlNotConfigured(
                f"{IDP_METADATA_VARIABLE} names {path}, which cannot be read ({exc.strerror}): "
                "give the identity provider's SAML metadata file or an https:// URL"
            ) from None
        stamp = (stat.st_mtime_ns, stat.st_size)
    key = (entity_id(settings), acs_url(settings), str(settings.home_dir), source, stamp)
    now = time.monotonic()
    with _providers_lock:
        cached = _providers.get(key)
        if cached is not None and (stamp is not None or now - cached[0] < METADATA_REFRESH_SECONDS):
            return cached[1]
    provider = _build(settings, source)
    with _providers_lock:
        _providers[key] = (now, provider)
    return provider


def _build(settings: Settings, source: str | None) -> ServiceProvider:
    from saml2 import BINDING_HTTP_POST
    from saml2.client import Saml2Client
    from saml2.config import SPConfig
    from saml2.saml import NAMEID_FORMAT_UNSPECIFIED
    from saml2.xmldsig import DIGEST_SHA256, SIG_RSA_SHA256

    xmlsec = shutil.which("xmlsec1")
    if xmlsec is None:
        raise SamlNotConfigured(
            "xmlsec1 is not installed (it verifies the SAML signatures): install the Debian "
            "package xmlsec1 (`stripe-platform` bootstrap does)"
        )
    pair = sp_keypair(settings)
    metadata_xml = _idp_metadata(settings, source) if source is not None else None
    config = SPConfig()
    config.load(
        {
            "entityid": entity_id(settings),
            "key_file": str(pair.key_file),
            "cert_file": str(pair.cert_file),
            "xmlsec_binary": xmlsec,
            "metadata": {"inline": [metadata_xml]} if metadata_xml else {},
            "accepted_time_diff": CLOCK_SKEW_SECONDS,
            # Only keys from the IdP's metadata verify its signatures (pysaml2's default, kept
            # explicit): a certificate embedded in the response proves nothing.
            "only_use_keys_in_metadata": True,
            "allow_unknown_attributes": True,  # the groups attribute has no standard name
            "service": {
                "sp": {
                    "endpoints": {
                        "assertion_consumer_service": [(acs_url(settings), BINDING_HTTP_POST)],
                    },
                    "want_assertions_signed": True,
                    "want_response_signed": False,  # the assertion's signature is what counts
                    "allow_unsolicited": False,
                    "authn_requests_signed": True,
                    # pysaml2's default is rsa-sha1; these are read here, under service.sp.
                    "signing_algorithm": SIG_RSA_SHA256,
                    "digest_algorithm": DIGEST_SHA256,
                    # The user's own name, as the policy knows it (not a transient id).
                    "name_id_format": NAMEID_FORMAT_UNSPECIFIED,
                    "name_id_format_allow_create": True,
                }
            },
        }
    )
    idp = None
    if metadata_xml is not None:
        idps = sorted(config.metadata.identity_providers())
        if len(idps) != 1:
            raise SamlNotConfigured(
                f"{IDP_METADATA_VARIABLE} ({source}) describes {len(idps)} identity providers "
                f"({', '.join(idps) or 'none'}): give the metadata of exactly one"
            )
        idp = idps[0]
    client = Saml2Client(config, identity_cache=_forgetful_cache())
    return ServiceProvider(entity_id(settings), acs_url(settings), idp, config, client)


def _forgetful_cache() -> Any:
    """An identity cache for pysaml2's client that keeps nothing: the client would otherwise keep
    every user's attributes for as long as the process lives; the session is ours to keep."""
    from saml2.cache import Cache

    class Forgetful(Cache):
        def set(self, name_id: Any, entity_id: Any, info: Any, not_on_or_after: Any = 0) -> None:
            return None

    return Forgetful()


def _idp_metadata(settings: Settings, source: str) -> str:
    """The IdP's metadata XML from a file or an https:// URL (TLS-verified: the metadata carries
    the key every assertion is checked with)."""
    scheme = urlsplit(source).scheme.lower()
    if scheme == "http":
        raise SamlNotConfigured(
            f"{IDP_METADATA_VARIABLE} must be a file or an https:// URL (plain http is refused: "
            "the metadata carries the key that assertions are verified with)"
        )
    if scheme == "https":
        import httpx

        from stripe_platform.runtime.tls import ca_file

        context = ssl.create_default_context()
        platform_ca = ca_file(settings)
        if platform_ca.exists():  # an IdP served with the platform's own certificates
            context.load_verify_locations(cafile=str(platform_ca))
        try:
            response = httpx.get(source, verify=context, timeout=10, follow_redirects=False)
            response.raise_for_status()
        except httpx.HTTPError as exc:
            raise SamlNotConfigured(
                f"cannot fetch the IdP metadata at {source} ({IDP_METADATA_VARIABLE}): {exc}"
            ) from None
        return response.text
    path = Path(source).expanduser()
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise SamlNotConfigured(f"cannot read the IdP metadata {path}: {exc}") from None


def sp_metadata(settings: Settings) -> str:
    """The SP's metadata XML (entity id, ACS, signing certificate): what the IdP is given."""
    from saml2.metadata import create_metadata_string

    xml = create_metadata_string(None, service_provider(settings).config, valid=None, sign=False)
    return xml.decode() if isinstance(xml, bytes) else xml


# -- logins ---------------------------------------------------------------------------------------
def safe_next(next_path: str | None) -> str:
    """Where the browser may be sent after the login: a path on this site, else ``/``. Refused:
    absolute URLs, scheme-relative ``//host`` and ``/\\host`` (browsers read both as a host)."""
    if next_path and _NEXT_PATH.match(next_path):
        return next_path
    return "/"


def browser_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_browser_token() -> str:
    """The random value of the cookie that ties a login's answer to the browser that asked."""
    return secrets.token_urlsafe(32)


@dataclass(frozen=True)
class LoginRequest:
    request_id: str
    redirect_url: str  # the IdP's SSO endpoint with the signed AuthnRequest in the query


def start_login(
    settings: Settings, *, next_path: str, browser_token: str, source_ip: str | None
) -> LoginRequest:
    """A signed AuthnRequest for the IdP, remembered as outstanding for this browser."""
    from saml2 import BINDING_HTTP_REDIRECT
    from saml2.xmldsig import DIGEST_SHA256, SIG_RSA_SHA256

    provider = service_provider(settings)
    idp = provider.require_idp()
    try:
        request_id, info = provider.client.prepare_for_authenticate(
            entityid=idp,
            binding=BINDING_HTTP_REDIRECT,
            sigalg=SIG_RSA_SHA256,
            digest_alg=DIGEST_SHA256,
        )
    except Exception as exc:  # pysaml2 raises bare exceptions for metadata it cannot use
        raise SamlNotConfigured(
            f"cannot make an AuthnRequest for {idp} (an HTTP-Redirect single sign-on endpoint in "
            f"its metadata is needed): {exc}"
        ) from None
    location = dict(info["headers"])["Location"]
    with _connection(settings) as conn, conn.transaction():
        _purge(conn)
        conn.execute(
            """INSERT INTO access.saml_request (request_id, next_path, browser_sha256, source_ip,
                   expires_at)
               VALUES (%s, %s, %s, %s, clock_timestamp() + make_interval(secs => %s))""",
            (
                request_id,
                safe_next(next_path),
                browser_digest(browser_token),
                source_ip,
                REQUEST_SECONDS,
            ),
        )
    return LoginRequest(request_id, location)


@dataclass(frozen=True)
class Login:
    """A login the IdP vouched for, in answer to one of our requests, used once."""

    user: str
    groups: tuple[str, ...]
    next_path: str
    issuer: str
    assertion_id: str
    request_id: str
    session_index: str | None


def finish_login(settings: Settings, saml_response: str, *, browser_token: str | None) -> Login:
    """Validate the posted SAMLResponse (base64) and consume it; :class:`SamlError` says why not."""
    provider = service_provider(settings)
    idp = provider.require_idp()
    encoded = _compact(saml_response)
    request_id = _in_response_to(encoded)
    with _connection(settings) as conn:
        next_path = _outstanding(conn, request_id, browser_token)
        login, expires = _validate(provider, idp, encoded, request_id, next_path, settings)
        _consume(conn, request_id, login.assertion_id, login.issuer, login.user, expires)
    return login


def _validate(
    provider: ServiceProvider,
    idp: str,
    encoded: str,
    request_id: str,
    next_path: str,
    settings: Settings,
) -> tuple[Login, dt.datetime]:
    """The login the response vouches for (pysaml2's checks, then ours), and until when its
    assertion could be accepted."""
    from saml2 import BINDING_HTTP_POST

    try:
        response = provider.client.parse_authn_request_response(
            encoded, BINDING_HTTP_POST, outstanding={request_id: next_path}
        )
    except Exception as exc:  # pysaml2 raises its own classes and bare Exceptions alike
        raise _refusal(exc, idp) from None
    if response is None or response.assertion is None:
        raise _no_response(encoded, provider.acs_url)

    assertion = response.assertion
    _strong_signatures(response.response, assertion)
    issuer = (response.issuer() or "").strip()
    asserted_by = (assertion.issuer.text or "").strip() if assertion.issuer is not None else ""
    # The metadata holds one IdP (checked when it is loaded); the issuer must be it, said outright.
    for claimed in (issuer, asserted_by):
        if claimed != idp:
            raise SamlError("issuer", f"issued by {claimed or 'nobody'}, not by the IdP {idp}")
    name_id = response.name_id
    user = (name_id.text or "").strip() if name_id is not None else ""
    if not user:
        raise SamlError("subject", "the assertion names no user (no NameID)")
    restrictions = assertion.conditions.audience_restriction if assertion.conditions else []
    audiences = {(a.text or "").strip() for r in restrictions for a in r.audience}
    if provider.entity_id not in audiences:  # pysaml2 lets an assertion without Conditions pass
        raise SamlError(
            "audience",
            f"the assertion is for {', '.join(sorted(audiences)) or 'no audience'}, not for this "
            f"service ({provider.entity_id})",
            user=user,
        )
    if not assertion.id:
        raise SamlError("invalid", "the assertion has no ID", user=user)
    session_index = None
    if assertion.authn_statement:
        session_index = assertion.authn_statement[0].session_index
    groups = _groups(response, settings.saml_groups_attribute)
    login = Login(user, groups, next_path, issuer, assertion.id, request_id, session_index)
    return login, _assertion_expiry(assertion)


def _compact(saml_response: str) -> str:
    """The posted value without the line breaks some IdPs put in, bounded in size."""
    if not saml_response:
        raise SamlBadRequest("malformed", "no SAMLResponse in the post")
    encoded = "".join(saml_response.split())
    if len(encoded) > MAX_RESPONSE_BYTES:
        raise SamlBadRequest(
            "malformed", f"the SAMLResponse is larger than {MAX_RESPONSE_BYTES} bytes"
        )
    return encoded


def _in_response_to(encoded: str) -> str:
    """The request the response says it answers. Read before validation only to find that
    request; pysaml2 then checks the signed assertion answers the same one."""
    from defusedxml import ElementTree
    from defusedxml.common import DefusedXmlException

    try:
        xml = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise SamlBadRequest("malformed", "the SAMLResponse is not base64") from None
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError:
        raise SamlBadRequest("malformed", "the SAMLResponse is not well-formed XML") from None
    except DefusedXmlException:  # a SAML message needs neither; an entity bomb uses them
        raise SamlBadRequest(
            "malformed", "the SAMLResponse declares DTD entities or external references: refused"
        ) from None
    if root.tag != f"{{{_PROTOCOL_NS}}}Response":
        raise SamlBadRequest("malformed", "the SAMLResponse is not a SAML 2.0 Response")
    request_id = (root.get("InResponseTo") or "").strip()
    if not request_id:
        raise SamlError(
            "unsolicited",
            "the response answers no AuthnRequest (IdP-initiated logins are refused: start at "
            "/saml/login)",
        )
    return request_id


def _outstanding(conn: psycopg.Connection, request_id: str, browser_token: str | None) -> str:
    """The request's next path, if it is ours, unanswered, unexpired and this browser's."""
    row = conn.execute(
        """SELECT next_path, browser_sha256, answered_at IS NOT NULL,
                  expires_at <= clock_timestamp()
           FROM access.saml_request WHERE request_id = %s""",
        (request_id,),
    ).fetchone()
    if row is None:
        raise SamlError(
            "unsolicited", f"the response answers {_short(request_id)}, which is no request of ours"
        )
    next_path, browser, answered, expired = row
    if answered:
        raise SamlError(
            "replayed",
            f"the request {_short(request_id)} was answered already: a replayed response",
        )
    if expired:
        raise SamlError(
            "request_expired",
            f"the request {_short(request_id)} expired ({REQUEST_SECONDS} s to log in): start again",
        )
    if browser_token is None or not secrets.compare_digest(browser_digest(browser_token), browser):
        raise SamlError(
            "browser", "the login was started in another browser (its login cookie is missing)"
        )
    return next_path


def _consume(
    conn: psycopg.Connection,
    request_id: str,
    assertion_id: str,
    issuer: str,
    user: str,
    expires: dt.datetime,
) -> None:
    """Mark the request answered and the assertion used, together; a second use of either (two
    posts racing, a replay) finds them taken and is refused."""
    with conn.transaction():
        answered = conn.execute(
            """UPDATE access.saml_request
               SET answered_at = clock_timestamp(), assertion_id = %s
               WHERE request_id = %s AND answered_at IS NULL AND expires_at > clock_timestamp()
               RETURNING 1""",
            (assertion_id, request_id),
        ).fetchone()
        if answered is None:  # raising rolls the transaction back
            raise SamlError(
                "replayed",
                f"the request {_short(request_id)} was answered already: a replayed response",
                user=user,
            )
        fresh = conn.execute(
            """INSERT INTO access.saml_assertion (assertion_id, issuer, request_id, user_name,
                   expires_at)
               VALUES (%s, %s, %s, %s, %s) ON CONFLICT (assertion_id) DO NOTHING RETURNING 1""",
            (assertion_id, issuer, request_id, user, expires),
        ).fetchone()
        if fresh is None:
            raise SamlError(
                "replayed", f"the assertion {_short(assertion_id)} was used already", user=user
            )


def _strong_signatures(*signed: Any) -> None:
    """Every signature present (the assertion's is, pysaml2 made sure) uses SHA-2."""
    for element in signed:
        signature = element.signature
        if signature is None:
            continue
        info = signature.signed_info
        method = info.signature_method.algorithm if info.signature_method else None
        digests = {r.digest_method.algorithm for r in info.reference if r.digest_method}
        weak = digests - STRONG_DIGESTS
        if method not in STRONG_SIGNATURES:
            weak.add(str(method))
        if weak or not digests:
            used = ", ".join(sorted(weak)) or "no digest"
            raise SamlError(
                "weak_signature",
                f"the {type(element).__name__} is signed with {used}: SHA-256 or stronger is "
                "required (set the IdP's signature and digest algorithms)",
            )


def _groups(response: Any, attribute: str) -> tuple[str, ...]:
    """The values of the groups attribute, by its name or its friendly name."""
    values: list[str] = list(response.ava.get(attribute, [])) if response.ava else []
    for statement in response.assertion.attribute_statement:
        for attr in statement.attribute:
            if attribute in (attr.name, attr.friendly_name):
                values += [v.text for v in attr.attribute_value if v.text]
    return tuple(dict.fromkeys(v.strip() for v in values if v and v.strip()))


def _assertion_expiry(assertion: Any) -> dt.datetime:
    """The latest time the assertion could still be accepted (its NotOnOrAfter and the slack);
    its replay-cache row is kept until then."""
    from saml2.time_util import str_to_time

    times = []
    if assertion.conditions is not None and assertion.conditions.not_on_or_after:
        times.append(assertion.conditions.not_on_or_after)
    if assertion.subject is not None:
        for confirmation in assertion.subject.subject_confirmation:
            data = confirmation.subject_confirmation_data
            if data is not None and data.not_on_or_after:
                times.append(data.not_on_or_after)
    now = dt.datetime.now(dt.UTC)
    latest = max(
        (dt.datetime(*str_to_time(t)[:6], tzinfo=dt.UTC) for t in times),
        default=now + dt.timedelta(seconds=ANSWERED_KEPT_SECONDS),
    )
    return max(latest, now) + dt.timedelta(seconds=CLOCK_SKEW_SECONDS)


def _refusal(exc: Exception, idp: str) -> SamlError:
    """pysaml2's exception as a refusal with its reason."""
    from saml2.response import (
        IncorrectlySigned,
        StatusError,
        UnsolicitedResponse,
        VerificationError,
    )
    from saml2.sigver import MissingKey, SignatureError
    from saml2.validate import ResponseLifetimeExceed, ToEarly

    text = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
    if isinstance(exc, MissingKey):
        return SamlError("issuer", f"issued by {text}, not by the configured IdP {idp}")
    if isinstance(exc, SignatureError | IncorrectlySigned):
        return SamlError(
            "signature",
            f"the assertion is not signed by the configured IdP {idp} ({text}): refused",
        )
    if isinstance(exc, ResponseLifetimeExceed):
        return SamlError("expired", f"the assertion has expired ({text})")
    if isinstance(exc, ToEarly):
        return SamlError("not_yet_valid", f"the assertion is not valid yet ({text})")
    if isinstance(exc, UnsolicitedResponse):
        return SamlError("unsolicited", f"the assertion answers no request of ours ({text})")
    if isinstance(exc, StatusError):
        return SamlError("idp_refused", f"the IdP did not log the user in ({text})")
    if "AudienceRestriction" in text:
        return SamlError("audience", f"the assertion is not for this service ({text})")
    if isinstance(exc, VerificationError):
        return SamlError("conditions", f"the assertion's conditions do not hold ({text})")
    return SamlError("invalid", f"the SAML response was refused ({type(exc).__name__}: {text})")


def _no_response(encoded: str, acs: str) -> SamlError:
    """pysaml2 answered None: say which check it was when we can tell."""
    from defusedxml import ElementTree

    root = ElementTree.fromstring(base64.b64decode(encoded))
    destination = root.get("Destination")
    if destination and destination != acs:
        return SamlError("destination", f"the response was sent to {destination}, not to {acs}")
    return SamlError("invalid", "the SAML response was refused (no valid assertion in it)")


def _short(identifier: str) -> str:
    return identifier if len(identifier) <= 48 else identifier[:45] + "..."


# -- the replay cache's storage -------------------------------------------------------------------
@contextlib.contextmanager
def _connection(settings: Settings) -> Iterator[psycopg.Connection]:
    """An autocommit connection to the OLTP database (unkeyed: no personal data here); the
    writes that go together take a transaction of their own."""
    import psycopg

    from stripe_platform.oltp import db

    try:
        with db.connect(settings, with_key=False, autocommit=True) as conn:
            yield conn
    except psycopg.errors.UndefinedTable as exc:
        raise SamlNotConfigured(
            f"the SAML replay cache is not in the database ({exc.diag.message_primary}): run "
            "`stripe-platform db migrate`"
        ) from None
    except psycopg.OperationalError as exc:
        raise SamlUnavailable(f"the SAML replay cache is unreachable: {exc}") from None


def _purge(conn: psycopg.Connection) -> None:
    """Forget requests and assertions that are refused for their age anyway."""
    conn.execute(
        """DELETE FROM access.saml_request
           WHERE expires_at < clock_timestamp() - make_interval(secs => %s)""",
        (ANSWERED_KEPT_SECONDS,),
    )
    conn.execute("DELETE FROM access.saml_assertion WHERE expires_at < clock_timestamp()")
