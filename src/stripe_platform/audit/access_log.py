"""The centralised access log (issue 21 §5): who reached what, from where, and what was decided.

Two logs, one view:

- **The API's own log**, written by :func:`record` (authentication, authorisation decisions,
  sensitive reads, administrative changes) and by the request middleware of :func:`install` (one
  ``kind="request"`` event per request). One JSON object per line in
  ``<home>/logs/access/api-YYYY-MM-DD.jsonl`` (the UTC day of the event; directory 0700, files
  0600), on every profile: on prod the home is the service's persistent volume, and a file (not
  stdout) is what the audit trail of issue 22 reads incrementally, by file name and byte offset
  (names sort by day; a line is complete once its newline is there; files are only appended to).
- **PostgreSQL's jsonlog** (the embedded cluster logs connections, disconnections and every
  statement: runtime/postgres.py), read where the cluster writes it (``<home>/pg/data/log``).

:func:`events` reads both and normalises them to one :class:`AccessEvent` (time, user, source
address, database, resource, action, outcome, reason), merged in time order. Statements are shown
with every string and numeric literal redacted (:func:`redact_sql`): with ``log_statement=all`` a
password in ``crypt('...')`` or an e-mail literal sits in PostgreSQL's log in clear, and must go no
further. Error messages lose their quoted values for the same reason (they quote the input).

Writing never raises into the caller: an API request must not fail because its log line could not
be written. A failure is reported once to the stdlib logger ``stripe_platform.access_log`` (and
again only after writing has worked in between).
"""

from __future__ import annotations

import contextvars
import datetime as dt
import functools
import heapq
import json
import logging
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from stripe_platform.errors import PlatformError

if TYPE_CHECKING:
    from stripe_platform.config import Settings

LOGGER = logging.getLogger("stripe_platform.access_log")

KINDS = frozenset({"authn", "authz", "read", "admin", "request"})
OUTCOMES = frozenset({"allow", "deny", "error"})
ORIGINS = ("api", "postgres")
SCHEMA_VERSION = 1  # of the API log's lines; bumped if a field changes meaning

API_LOG_PREFIX = "api-"
API_LOG_SUFFIX = ".jsonl"
_DAY = re.compile(r"(\d{4}-\d{2}-\d{2})")
_HOST = socket.gethostname()

# Keys of `detail` that are dropped, whatever their value: a secret has no place in an access log.
# Compared without case, "_" or "-" ("SAMLResponse", "saml_response", "api-token" alike).
_SECRET_WORDS = (
    "password",
    "passwd",
    "passphrase",
    "secret",
    "token",
    "samlresponse",
    "samlrequest",
    "assertion",
    "cookie",
    "authorization",
    "apikey",
    "privatekey",
    "otp",
    "cardnumber",
    "credential",
)
_SECRET_KEYS = frozenset({"code", "key", "pin", "cvv", "cvc", "pan", "sp_session", "session"})
_MAX_TEXT = 1000  # characters of one value: a line stays small and is written in one piece
_MAX_DEPTH = 4
_SCALARS = (bool, int, float)

# The request id of the API request being served, for the events recorded while serving it.
_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "access_log_request_id", default=None
)


class AccessLogError(PlatformError, ValueError):
    """A request to read the access log that cannot be answered (e.g. an unknown log)."""


# -- writing ---------------------------------------------------------------------------------------
def log_dir(settings: Settings) -> Path:
    """Where the API's access log lives: ``<home>/logs/access``."""
    return settings.home_dir / "logs" / "access"


def api_log_file(settings: Settings, day: dt.date) -> Path:
    return log_dir(settings) / f"{API_LOG_PREFIX}{day.isoformat()}{API_LOG_SUFFIX}"


def record(
    settings: Settings,
    *,
    kind: str,
    user: str | None,
    source: str | None,
    resource: str,
    action: str,
    outcome: str,
    reason: str | None = None,
    via: str | None = None,
    detail: dict | None = None,
) -> None:
    """Append one access event. ``kind``: authn|authz|read|admin|request; ``outcome``:
    allow|deny|error; ``source``: the client's address; ``detail``: anything else worth keeping
    (keys naming secrets are dropped). Never raises: a failure is logged (see the module)."""
    try:
        if kind not in KINDS or outcome not in OUTCOMES:
            _warn_once(
                f"vocabulary:{kind}:{outcome}",
                f"access event with kind={kind!r} outcome={outcome!r} (expected one of "
                f"{sorted(KINDS)} / {sorted(OUTCOMES)}): written as given",
            )
        stamp = dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")
        event = {
            "time": stamp,
            "v": SCHEMA_VERSION,
            "kind": kind,
            "user": _text(user),
            "source": _text(source),
            "resource": _text(resource),
            "action": _text(action),
            "outcome": outcome,
            "reason": _text(reason),
            "via": _text(via),
            "request_id": _request_id.get(),
            "host": _HOST,
            "pid": os.getpid(),
            "detail": _clean(detail, 0) if detail else None,
        }
        line = _encode(event) + "\n"
        directory = _directory(settings)
        _append(directory, f"{directory}/{API_LOG_PREFIX}{stamp[:10]}{API_LOG_SUFFIX}", line)
    except Exception:
        _write_failed()
    else:
        _write_worked()


_encode = json.JSONEncoder(separators=(",", ":"), default=str).encode
_directories: dict[str, str] = {}  # home -> its access log directory (a Path costs microseconds)


def _directory(settings: Settings) -> str:
    home = str(settings.home_dir)
    directory = _directories.get(home)
    if directory is None:
        directory = _directories[home] = str(log_dir(settings))
    return directory


def _text(value: object) -> str | None:
    if value is None:
        return None
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= _MAX_TEXT else text[:_MAX_TEXT] + "…"


@functools.lru_cache(maxsize=1024)
def _is_secret(key: str) -> bool:
    folded = key.lower().replace("_", "").replace("-", "")
    return key.lower() in _SECRET_KEYS or any(word in folded for word in _SECRET_WORDS)


def _clean(value: Any, depth: int) -> Any:
    """``value`` with every key naming a secret dropped (at any depth), long texts cut."""
    if isinstance(value, Mapping):
        if depth >= _MAX_DEPTH:
            return "…"
        cleaned = {}
        for key, item in value.items():
            name = str(key)
            if not _is_secret(name):
                scalar = item is None or type(item) in _SCALARS
                cleaned[name] = item if scalar else _clean(item, depth + 1)
        return cleaned
    if isinstance(value, list | tuple | set | frozenset):
        if depth >= _MAX_DEPTH:
            return "…"
        return [_clean(v, depth + 1) for v in list(value)[:100]]
    if value is None or isinstance(value, bool | int | float):
        return value
    return _text(value)


def _append(directory: str, path: str, line: str) -> None:
    """One ``os.write`` of the whole line on an O_APPEND descriptor: the kernel appends it in one
    piece, so lines of concurrent threads and processes never interleave. The file is opened per
    line (a few microseconds): nothing to reopen at midnight, after a fork or a deleted file."""
    data = line.encode()
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except FileNotFoundError:
        os.makedirs(directory, exist_ok=True)
        os.chmod(directory, 0o700)
        fd = os.open(path, flags, 0o600)
    try:
        written = os.write(fd, data)
    finally:
        os.close(fd)
    if written != len(data):  # a full disk: the line is cut, and the reader will skip it
        raise OSError(f"short write to {path}: {written} of {len(data)} bytes")


_failing = threading.Event()
_warned: set[str] = set()


def _write_failed() -> None:
    if not _failing.is_set():
        _failing.set()
        LOGGER.exception("cannot write the access log; events are lost until it works again")


def _write_worked() -> None:
    if _failing.is_set():
        _failing.clear()
        LOGGER.warning("the access log is written again")


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        LOGGER.warning(message)


# -- the API's request log -------------------------------------------------------------------------
def install(app: Any, settings: Settings | None = None) -> None:
    """Add the request log to ``app``: one ``kind="request"`` event per HTTP request (method, path
    with the query's names but not its values, status, duration, the principal that api/auth.py
    set in ``request.state.principal``, the client's address) and an ``X-Request-ID`` response
    header that the request's other events carry too. ``settings``: default, the app's services'
    (``app.state.services.settings``), else the process's."""

    def settings_of() -> Settings:
        if settings is not None:
            return settings
        services = getattr(app.state, "services", None)
        if services is not None:
            return services.settings
        from stripe_platform.config import get_settings

        return get_settings()

    app.add_middleware(RequestLog, settings_of=settings_of)


class RequestLog:
    """A plain ASGI middleware (no BaseHTTPMiddleware: no extra task nor body buffering per
    request; the context variable set here reaches the endpoint and its dependencies)."""

    def __init__(self, app: Any, settings_of: Callable[[], Settings]) -> None:
        self.app = app
        self.settings_of = settings_of

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = secrets.token_hex(8)
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        header = (b"x-request-id", request_id.encode())
        status = 500  # what the client gets if the app fails before answering
        failed = False

        async def send_with_id(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        token = _request_id.set(request_id)
        try:
            await self.app(scope, receive, send_with_id)
        except BaseException:
            failed = True
            raise
        finally:
            self._record(scope, state, status, failed, started)  # with the request's id still set
            _request_id.reset(token)

    def _record(self, scope: dict, state: dict, status: int, failed: bool, started: float) -> None:
        try:
            elapsed_ms = (time.perf_counter() - started) * 1000
            principal = state.get("principal")
            client = scope.get("client")
            if failed or status >= 500:
                outcome = "error"
            elif status in (401, 403):
                outcome = "deny"
            else:
                outcome = "allow"
            record(
                self.settings_of(),
                kind="request",
                user=getattr(principal, "user", None),
                source=client[0] if client else None,
                resource=_resource(scope),
                action=scope.get("method", "?"),
                outcome=outcome,
                reason=None if outcome == "allow" else f"HTTP {status}",
                via=getattr(principal, "via", None),
                detail={"status": status, "ms": round(elapsed_ms, 2)},
            )
        except Exception:  # never fail a request for its log line
            _write_failed()


def _resource(scope: dict) -> str:
    """The path, and the names (never the values) of the query's parameters: a value can be an
    e-mail or a card number."""
    path = scope.get("path", "")
    query = scope.get("query_string", b"")
    if not query:
        return path
    names = dict.fromkeys(
        name for name, _ in parse_qsl(query.decode("latin-1"), keep_blank_values=True)
    )
    return f"{path}?{'&'.join(names)}" if names else path


# -- reading: one view over the API's log and PostgreSQL's ----------------------------------------
@dataclass(frozen=True, slots=True)
class AccessEvent:
    """One access event, from either log.

    ``origin``: which log ("api" or "postgres"); ``source``: the client's address. ``kind``: on
    the API authn|authz|read|admin|request; from PostgreSQL authn (a connection authorised, or
    refused: outcome deny), authz (permission denied: deny), session (a disconnection), statement
    (``action`` is its command, ``resource`` the relations it names when they can be read off the
    text, ``statement`` the text with its literals redacted; a statement that fails is followed by
    an event with outcome error, its ``sqlstate`` and ``reason``)."""

    time: dt.datetime
    origin: str
    kind: str
    user: str | None
    source: str | None
    database: str | None
    resource: str | None
    action: str
    outcome: str
    reason: str | None = None
    via: str | None = None
    request_id: str | None = None
    session: str | None = None
    sqlstate: str | None = None
    statement: str | None = None
    detail: Mapping[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["time"] = self.time.isoformat(timespec="microseconds")
        return data


class EventStream(Iterator[AccessEvent]):
    """The events of :func:`events`, in time order; ``skipped`` counts the lines that could not be
    read (per file), ``problems`` says what could not be read at all."""

    def __init__(self, events: Iterator[AccessEvent]) -> None:
        self._events = events
        self.skipped: dict[str, int] = {}
        self.problems: list[str] = []

    def __iter__(self) -> EventStream:
        return self

    def __next__(self) -> AccessEvent:
        return next(self._events)


def postgres_log_dir(settings: Settings) -> Path | None:
    """Where the embedded cluster writes its jsonlog; None on the compose and prod profiles (the
    server's log is on the server, shipped by its own means)."""
    if settings.profile != "embedded":
        return None
    from stripe_platform.oltp.db import embedded_cluster

    return embedded_cluster(settings).status().audit_log_dir


def events(
    settings: Settings,
    *,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    user: str | None = None,
    origins: Iterable[str] = ORIGINS,
) -> EventStream:
    """The access events between ``since`` and ``until`` (naive times are UTC), of ``user`` if
    given, from the logs of ``origins``, merged in time order. Files are chosen by the day in their
    name; a line that cannot be read is skipped and counted (``stream.skipped``), never fatal."""
    since, until = _utc(since), _utc(until)
    origins = set(origins)
    unknown = origins - set(ORIGINS)
    if unknown:
        raise AccessLogError(f"unknown log(s) {sorted(unknown)}: expected some of {list(ORIGINS)}")
    files: list[tuple[dt.date, str, Path]] = []
    stream = EventStream(iter(()))
    if "api" in origins:
        files += _dated(log_dir(settings), f"{API_LOG_PREFIX}*{API_LOG_SUFFIX}", "api", stream)
    if "postgres" in origins:
        pg_dir = postgres_log_dir(settings)
        if pg_dir is None:
            stream.problems.append(
                f"PostgreSQL's log is not on this machine on the {settings.profile} profile "
                "(read it where the server writes it)"
            )
        else:
            files += _dated(pg_dir, "postgresql-*.json", "postgres", stream)
    # A file named D holds that day's events, and a few of D+1's if rotation came late: D-1 counts.
    files = [
        f
        for f in files
        if (since is None or f[0] >= since.date() - dt.timedelta(days=1))
        and (until is None or f[0] <= until.date())
    ]
    stream._events = _merged(sorted(files), since, until, user, stream)
    return stream


def _utc(value: dt.datetime | None) -> dt.datetime | None:
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=dt.UTC)


def _dated(
    directory: Path, pattern: str, origin: str, stream: EventStream
) -> list[tuple[dt.date, str, Path]]:
    try:
        paths = sorted(directory.glob(pattern))
    except OSError as exc:
        stream.problems.append(f"cannot list {directory}: {exc.strerror}")
        return []
    found = []
    for path in paths:
        match = _DAY.search(path.name)
        if match:
            try:
                found.append((dt.date.fromisoformat(match.group(1)), origin, path))
            except ValueError:
                continue
    return found


def _merged(
    files: list[tuple[dt.date, str, Path]],
    since: dt.datetime | None,
    until: dt.datetime | None,
    user: str | None,
    stream: EventStream,
) -> Iterator[AccessEvent]:
    """Files are read a day at a time; an event is yielded once every file that could hold an
    earlier one has been read (one day of reordering: lines written just after midnight)."""
    pending: list[tuple[dt.datetime, int, AccessEvent]] = []
    sequence = 0
    index = 0
    while index < len(files):
        day = files[index][0]
        while index < len(files) and files[index][0] == day:
            _, origin, path = files[index]
            index += 1
            for event in _read(path, origin, since, until, stream):
                if user is None or event.user == user:
                    heapq.heappush(pending, (event.time, sequence, event))
                    sequence += 1
        horizon = dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC)
        while pending and pending[0][0] < horizon:
            yield heapq.heappop(pending)[2]
    while pending:
        yield heapq.heappop(pending)[2]


# A line's time is read from its first bytes (the field written first) before parsing the whole:
# lines outside the window cost a slice, not a JSON parse.
_TIME_PREFIX = {"api": b'{"time":"', "postgres": b'{"timestamp":"'}


def _read(
    path: Path,
    origin: str,
    since: dt.datetime | None,
    until: dt.datetime | None,
    stream: EventStream,
) -> Iterator[AccessEvent]:
    normalise = _api_event if origin == "api" else _postgres_event
    prefix = _TIME_PREFIX[origin]
    skipped = 0
    try:
        handle = path.open("rb")
    except OSError as exc:
        stream.problems.append(f"cannot read {path}: {exc.strerror}")
        return
    with handle:
        for number, line in enumerate(handle, 1):
            if not line.endswith(b"\n"):
                break  # the last line, still being written: read next time
            if line.startswith(prefix):
                end = line.find(b'"', len(prefix))
                when = _time(origin, line[len(prefix) : end].decode("ascii", "replace"))
                if when is not None and (
                    (since is not None and when < since) or (until is not None and when >= until)
                ):
                    continue
            try:
                event = normalise(json.loads(line))
            except Exception as exc:  # a damaged line: whatever it holds, the rest is still read
                skipped += 1
                if skipped == 1:
                    LOGGER.debug("%s:%d: unreadable access log line (%s)", path, number, exc)
                continue
            if event is None:
                continue
            if (since is not None and event.time < since) or (
                until is not None and event.time >= until
            ):
                continue
            yield event
    if skipped:
        stream.skipped[str(path)] = skipped
        LOGGER.warning("%s: skipped %d unreadable line(s)", path, skipped)


def _time(origin: str, text: str) -> dt.datetime | None:
    try:
        if origin == "api":
            return dt.datetime.fromisoformat(text)
        return _pg_time(text)
    except ValueError:
        return None


def _pg_time(text: str) -> dt.datetime:
    """jsonlog's "2026-12-07 20:25:57.628 UTC" (the platform's clusters log in UTC)."""
    if text.endswith(" UTC"):
        return dt.datetime.fromisoformat(text[:-4]).replace(tzinfo=dt.UTC)
    when = dt.datetime.fromisoformat(text)
    if when.tzinfo is None:
        raise ValueError(f"timestamp without a time zone: {text!r}")
    return when


def _api_event(line: dict) -> AccessEvent:
    return AccessEvent(
        time=dt.datetime.fromisoformat(line["time"]),
        origin="api",
        kind=line["kind"],
        user=line.get("user"),
        source=line.get("source"),
        database=None,
        resource=line.get("resource"),
        action=line["action"],
        outcome=line["outcome"],
        reason=line.get("reason"),
        via=line.get("via"),
        request_id=line.get("request_id"),
        detail=line.get("detail"),
    )


# -- PostgreSQL's jsonlog --------------------------------------------------------------------------
_STATEMENT = re.compile(r"^(?:statement|execute(?: fetch from)? [^:]*): (.*)$", re.DOTALL)
_SESSION_TIME = re.compile(r"session time: (\d+:\d{2}:\d{2}\.\d+)")
_CLIENT_BACKENDS = frozenset({"client backend", "walsender"})


def _postgres_event(line: dict) -> AccessEvent | None:
    """One jsonlog line as an access event; None for what is not access (the server's own
    processes, connection received/authenticated lines: the authorised or refused line follows)."""
    backend = line.get("backend_type")
    severity = line.get("error_severity")
    message = line.get("message") or ""
    failure = severity in ("ERROR", "FATAL", "PANIC")
    if backend not in _CLIENT_BACKENDS and not (failure and line.get("remote_host")):
        return None
    base = {
        "time": _pg_time(line["timestamp"]),
        "origin": "postgres",
        "user": line.get("user"),
        "source": line.get("remote_host"),
        "database": line.get("dbname"),
        "session": line.get("session_id"),
        "detail": {"application": line.get("application_name"), "pid": line.get("pid")},
    }
    if failure:
        sqlstate = line.get("state_code") or ""
        statement = line.get("statement")
        action, relations = summarise_sql(statement) if statement else ("connect", ())
        # RAISE in a function (class P0) words its own message, values and all: the code only.
        said = "raised by a function" if sqlstate.startswith("P0") else _redact_message(message)
        reason = f"{sqlstate} {said}".strip()
        if sqlstate.startswith("28"):  # invalid authorization: a refused login
            kind, outcome, action = "authn", "deny", "connect"
            resource = line.get("dbname")
        elif sqlstate == "42501":  # insufficient privilege
            kind, outcome = "authz", "deny"
            resource = ",".join(relations) or None
        else:
            kind, outcome = ("statement" if statement else "session"), "error"
            resource = ",".join(relations) or line.get("dbname")
        return AccessEvent(
            kind=kind,
            resource=resource,
            action=action,
            outcome=outcome,
            reason=reason,
            sqlstate=sqlstate or None,
            statement=redact_sql(statement) if statement else None,
            **base,
        )
    if severity != "LOG":
        return None
    if match := _STATEMENT.match(message):
        text = match.group(1)
        action, relations = summarise_sql(text)
        return AccessEvent(
            kind="statement",
            resource=",".join(relations) or None,
            action=action,
            outcome="allow",
            statement=redact_sql(text),
            **base,
        )
    if message.startswith(("connection authorized:", "replication connection authorized:")):
        return AccessEvent(
            kind="authn",
            resource=line.get("dbname"),
            action="connect",
            outcome="allow",
            via="replication" if message.startswith("replication") else None,
            **base,
        )
    if message.startswith("disconnection:"):
        match = _SESSION_TIME.search(message)
        detail = {**base.pop("detail"), "session_time": match.group(1) if match else None}
        return AccessEvent(
            kind="session",
            resource=line.get("dbname"),
            action="disconnect",
            outcome="allow",
            detail=detail,
            **base,
        )
    return None


_QUOTED = re.compile(r'"(?:[^"]|"")*"')
# A message that carries a statement's text after its prefix (log_statement, log_duration, the
# extended protocol's bind/execute/parse lines): the prefix is kept, the text redacted as SQL.
_STATEMENT_MESSAGE = re.compile(
    r"^((?:duration: [\d.]+ ms\s+)?(?:statement|(?:execute|bind|parse)(?: fetch from)? [^:]*): )(.*)$",
    re.DOTALL,
)


def redact_message(message: str, sqlstate: str | None = None, context: str | None = None) -> str:
    """A jsonlog ``message`` as it may leave the database host (the audit collector's one way to
    clean it): a statement's literals redacted (:func:`redact_sql`, its prefix kept); a function's
    RAISE (class P0, or a ``context`` that says "at RAISE": a NOTICE too) reduced to that, as it
    words its own message, values and all; any other message with its quoted parts hidden (they
    quote the input)."""
    if match := _STATEMENT_MESSAGE.match(message):
        return match.group(1) + redact_sql(match.group(2))
    if (sqlstate and sqlstate.startswith("P0")) or (context and " at RAISE" in context):
        return "raised by a function"
    return _redact_message(message)


def pg_time(text: str) -> dt.datetime:
    """A jsonlog timestamp as an aware datetime (ValueError if it is not one)."""
    return _pg_time(text)


def _redact_message(message: str) -> str:
    """A server message with its quoted parts hidden: they quote the input (`invalid input syntax
    for type integer: "..."`, `syntax error at or near "'secret"`). Whitespace made single."""
    return " ".join(_QUOTED.sub('"?"', message).split())


# -- SQL: literals redacted, command and relations read off the text ------------------------------
_LEX = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<line_comment>--[^\n]*)
  | (?P<block_comment>/\*)
  | (?P<estring>[eE]'(?:[^'\\]|\\.|'')*(?:'|\Z))
  | (?P<string>(?:[bBxXnN]|[uU]&)?'(?:[^']|'')*(?:'|\Z))
  | (?P<qident>(?:[uU]&)?"(?:[^"]|"")*(?:"|\Z))
  | (?P<dollar>\$(?P<tag>[A-Za-z_\x80-\uffff][A-Za-z0-9_\x80-\uffff]*)?\$)
  | (?P<param>\$\d+)
  | (?P<number>0[xXoObB][0-9A-Fa-f_]+|(?:\d[\d_]*(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<ident>[A-Za-z_\x80-\uffff][A-Za-z0-9_$\x80-\uffff]*)
  | (?P<other>.)
    """,
    re.VERBOSE | re.DOTALL,
)


_CLOSED_QIDENT = re.compile(r'(?:[uU]&)?"(?:[^"]|"")*"', re.DOTALL)


def _tokens(text: str) -> Iterator[tuple[str, str]]:
    """(kind, text) of PostgreSQL's lexical tokens, as far as redaction needs them: string
    constants in every form (standard, E'', B'', X'', N'', U&'', dollar-quoted), numbers, quoted
    and bare identifiers, comments (nested), positional parameters. An unterminated string or
    comment runs to the end, as the server's lexer has it."""
    pos, end = 0, len(text)
    while pos < end:
        match = _LEX.match(text, pos)
        assert match is not None  # `other` matches any one character
        kind = match.lastgroup
        if kind == "tag":
            kind = "dollar"
        if kind == "block_comment":
            depth, i = 1, match.end()
            while depth and i < end:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
            yield "comment", text[pos:i]
            pos = i
            continue
        if kind == "dollar":
            close = text.find(match.group("dollar"), match.end())
            stop = end if close < 0 else close + len(match.group("dollar"))
            yield "string", text[pos:stop]
            pos = stop
            continue
        token = match.group(0)
        if kind == "string" and "\\" in token:
            # 'a\' ...: one string to a server with standard_conforming_strings on (the default),
            # but an escaped quote with it off (a session can SET it). Which one the text was
            # written for is unknown: everything from here is taken as the literal, the only
            # reading that redacts all of both.
            yield "string", text[pos:]
            return
        if kind == "qident" and not _CLOSED_QIDENT.fullmatch(token):
            kind = "string"  # unterminated: the server refused it, and it may hide anything
        elif kind == "estring":
            kind = "string"
        elif kind == "line_comment":
            kind = "comment"
        yield kind, token
        pos = match.end()


def redact_sql(text: str) -> str:
    """``text`` with every literal replaced: strings (any quoting, dollar-quoted bodies included)
    by ``'?'``, numbers by ``?``; comments dropped (they can hold anything); whitespace made single.
    Identifiers, keywords, operators and ``$n`` parameters stay."""
    out: list[str] = []
    for kind, token in _tokens(text):
        if kind == "string":
            out.append("'?'")
        elif kind == "number":
            out.append("?")
        elif kind in ("ws", "comment"):
            if out and out[-1] != " ":
                out.append(" ")
        else:
            out.append(token)
    return "".join(out).strip()


# After these, a relation name follows (FROM and JOIN: one or more, comma-separated).
_RELATION_BEFORE = frozenset({"FROM", "JOIN", "INTO", "UPDATE", "TABLE", "COPY", "TRUNCATE"})
# Functions whose arguments use FROM without naming a relation (extract(year FROM ts)).
_FROM_FUNCTIONS = frozenset({"EXTRACT", "SUBSTRING", "TRIM", "OVERLAY", "POSITION"})
# UPDATE that is not a statement's: FOR [NO KEY] UPDATE, ON CONFLICT DO UPDATE; IS DISTINCT FROM.
_NOT_AFTER = frozenset({"FOR", "KEY", "DO", "DISTINCT"})
_MAIN_VERBS = frozenset({"SELECT", "INSERT", "UPDATE", "DELETE", "MERGE", "VALUES", "TABLE"})
_DDL = frozenset({"CREATE", "ALTER", "DROP", "COMMENT"})
_DDL_SKIP = frozenset(
    {"OR", "REPLACE", "TEMP", "TEMPORARY", "UNLOGGED", "UNIQUE", "GLOBAL", "LOCAL", "DEFAULT",
     "TRUSTED", "PROCEDURAL", "RECURSIVE", "CONSTRAINT", "ON"}
)  # fmt: skip
_MAX_RELATIONS = 20


def summarise_sql(text: str) -> tuple[str, tuple[str, ...]]:
    """(command, relations) of a statement, read off its tokens without parsing it: the command
    (``SELECT``, ``INSERT``, ``CREATE TABLE``, ``ALTER ROLE``: for ``WITH``, the main statement's
    verb), and the relations named after FROM/JOIN/INTO/UPDATE/TABLE/COPY (CTE names left out).
    Cheap and approximate by design: a name the heuristics miss is simply not listed."""
    tokens = [(k, t) for k, t in _tokens(text) if k not in ("ws", "comment")]
    words = [t.upper() if k == "ident" else None for k, t in tokens]
    action = _command(tokens, words)
    relations: dict[str, None] = {}
    ctes: set[str] = set()
    with_seen = False
    parens: list[str | None] = []  # per open parenthesis: the word before it (a function name?)
    i = 0
    while i < len(tokens) and len(relations) < _MAX_RELATIONS:
        piece = tokens[i][1]
        word = words[i]
        if piece == "(":
            parens.append(words[i - 1] if i else None)
        elif piece == ")" and parens:
            parens.pop()
        elif word == "WITH":
            with_seen = True
        elif word == "AS" and with_seen and i + 1 < len(tokens) and tokens[i + 1][1] == "(":
            if tokens[i - 1][0] in _NAMES:
                ctes.add(_name(tokens[i - 1]))  # WITH name AS (...)
        elif word in _RELATION_BEFORE:
            inside_function = bool(parens) and parens[-1] in _FROM_FUNCTIONS
            revoked_from = word == "FROM" and action == "REVOKE"  # REVOKE ... FROM a role
            if not (inside_function or revoked_from or (i and words[i - 1] in _NOT_AFTER)):
                listed = word in ("FROM", "JOIN", "TRUNCATE") or (
                    word == "TABLE" and i and words[i - 1] == "TRUNCATE"
                )
                i = _relations(tokens, words, i + 1, bool(listed), relations)
                continue
        i += 1
    return action, tuple(r for r in relations if r not in ctes)


def _command(tokens: list[tuple[str, str]], words: list[str | None]) -> str:
    first = next((i for i, w in enumerate(words) if w is not None), None)
    if first is None:
        return "UNKNOWN"
    verb = words[first]
    assert verb is not None
    if verb == "WITH":
        depth = 0
        for (_, piece), word in zip(tokens[first + 1 :], words[first + 1 :], strict=True):
            if piece == "(":
                depth += 1
            elif piece == ")":
                depth -= 1
            elif depth == 0 and word in _MAIN_VERBS:
                return word
        return "WITH"
    if verb in _DDL:
        rest = [w for w in words[first + 1 :] if w is not None]
        rest = [w for w in rest[:4] if w not in _DDL_SKIP]
        if rest:
            return (
                f"{verb} {rest[0]} {rest[1]}" if rest[0] == "MATERIALIZED" else f"{verb} {rest[0]}"
            )
    return verb


def _relations(
    tokens: list[tuple[str, str]],
    words: list[str | None],
    i: int,
    listed: bool,
    found: dict[str, None],
) -> int:
    """Read the relation name(s) from ``i``; ``listed``: a comma-separated list with aliases (FROM
    a x, b), where a name followed by "(" is a function (FROM generate_series(...)), skipped."""
    while i < len(tokens):
        while i < len(tokens) and words[i] in _BEFORE_NAME:
            i += 1  # FROM ONLY x, CREATE TABLE IF NOT EXISTS x
        if i >= len(tokens) or tokens[i][0] not in ("ident", "qident") or words[i] in _NOT_NAMES:
            return i
        parts = [_name(tokens[i])]
        i += 1
        while i + 1 < len(tokens) and tokens[i][1] == "." and tokens[i + 1][0] in _NAMES:
            parts.append(_name(tokens[i + 1]))
            i += 2
        if not listed:
            found[".".join(parts)] = None
            return i
        if i < len(tokens) and tokens[i][1] == "(":  # a function: skip its arguments
            depth = 0
            while i < len(tokens):
                depth += {"(": 1, ")": -1}.get(tokens[i][1], 0)
                i += 1
                if depth == 0:
                    break
        else:
            found[".".join(parts)] = None
        if i < len(tokens) and words[i] == "AS":  # an alias: [AS] name
            i += 1
        if i < len(tokens) and tokens[i][0] in _NAMES and words[i] not in _CLAUSES:
            i += 1
        if i < len(tokens) and tokens[i][1] == ",":
            i += 1
            continue
        return i
    return i


_NAMES = ("ident", "qident")
_BEFORE_NAME = frozenset({"ONLY", "LATERAL", "IF", "NOT", "EXISTS"})
_NOT_NAMES = frozenset({"STDIN", "STDOUT", "SELECT", "VALUES", "TABLE", "ON"})

# Words that end a FROM item (so they are not read as its alias).
_CLAUSES = frozenset(
    {"WHERE", "GROUP", "ORDER", "LIMIT", "OFFSET", "HAVING", "WINDOW", "UNION", "EXCEPT",
     "INTERSECT", "JOIN", "INNER", "LEFT", "RIGHT", "FULL", "CROSS", "NATURAL", "ON", "USING",
     "FOR", "RETURNING", "SET", "FETCH", "TABLESAMPLE", "WITH", "DO", "VALUES", "SELECT",
     "DEFAULT", "OVERRIDING", "LATERAL"}
)  # fmt: skip


def _name(token: tuple[str, str]) -> str:
    kind, text = token
    if kind == "qident":
        if text[:2].upper() == "U&":
            text = text[2:]
        return text[1:-1].replace('""', '"') if text.endswith('"') and len(text) > 1 else text[1:]
    return text.lower()
