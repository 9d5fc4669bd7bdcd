"""The log collector (issue 22 "Collect", docs/audit.md): PostgreSQL's jsonlog and the API's access
log shipped, incrementally, into the document store's ``Log`` collection, the sealed audit trail
(audit/trail.py) and the lake.

**Where from.** Two sources, each a directory of files read in name order (names sort by day):
``postgres`` = the embedded cluster's ``postgresql-*.json`` (access_log.postgres_log_dir), ``api``
= ``<home>/logs/access/api-*.jsonl``. A line is complete once its newline is there: a half-written
last line is left for the next pass.

**Exactly once.** Lines are read in batches. For each batch, in this order: the Log documents are
written by a deterministic ``_id`` (inserted; one whose ``_id`` is taken is merged with the stored
one by its lines' ``source_key`` and replaced, so writing the same batch again changes nothing), the batch's lake file is
written (named by the batch's first byte: written again, it is replaced), then ONE PostgreSQL
transaction appends the trail records (``source_key = "<source>:<file>:<offset>"``, which the
trail skips when already present), the quarantined lines, the grouping state and the file's new
byte offset. Killed at any point, the collector resumes from the last committed offset and
rewrites the same documents and lake file: no line lost, none twice.

**Rotation.** A file is known by name and identity (device, inode, sha256 of its first bytes up to
4 KiB of what was read). A file replaced or truncated under the same name starts a new generation,
read from its start; its keys name it ``<name>~<generation>``. A file that disappears is simply
not read any more.

**Grouping (the brief's shape).** PostgreSQL: one document per session and query: ``_id =
"pg:<session_id>:<query_id>"``; query 0 holds the session's own lines (connection received and
authorised, a refused login, disconnection); each ``statement:``/``execute`` line opens the next
query, and the lines after it in that session (its ERROR, a duration) join it; an ERROR whose
statement is not the current one (a syntax error is never logged as a statement first) opens a
query of its own. Lines of the server's own processes are kept too (a session of their own). The embedded
document server's own sessions (FerretDB's SQL, user stripe_docstore on database ferretdb) go to
the trail and the lake but not to the Log collection: each Log document written through FerretDB
is a few statements of its, which, written as Log documents in turn, would feed on themselves.
API: one document per request (``_id = "api:<request_id>"``: the request line and the authn/authz
events recorded while serving it), ``dbname "api"``, ``application_name "api"``; an event outside
a request is a document of its own (``api:<file>:<offset>``). An API line's ``message`` is
``"<METHOD> <path> -> <status>"`` for a request, ``"<kind> <outcome> <action> <resource>[:
<reason>]"`` otherwise; severity LOG for allow, ERROR for deny/error, FATAL for a refused
authentication; state code 28000 (refused authentication), 42501 (refused authorisation).

**Secrets.** Nothing leaves unredacted: statements through access_log.redact_sql, messages through
access_log.redact_message; a line's other fields (detail, hint, context, parameters) are not
shipped at all.

**Bad input** goes, as read, to ``audit.collector_quarantine`` with its reason and is counted:
``corrupt`` (not JSON), ``truncated`` (JSON cut short; or the unfinished last line of a file that
was rotated away long ago), ``unknown_format`` (JSON, but not a line of that log), and
``clock_backwards`` (a time more than CLOCK_TOLERANCE before the newest time seen from that source).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import re
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg

from stripe_platform.audit import access_log, trail
from stripe_platform.errors import PlatformError
from stripe_platform.runtime import ferretdb

if TYPE_CHECKING:
    from stripe_platform.config import Settings

SOURCES = ("postgres", "api")
COLLECTION = "Log"
LAKE_DIR = "audit/log"  # under the audit lake root: source=<s>/date=<d>/<file>-<offset>.parquet
BATCH_LINES = 5_000
BATCH_BYTES = 8 * 1024 * 1024
HEAD_BYTES = 4096
CLOCK_TOLERANCE = dt.timedelta(seconds=60)  # concurrent writers stamp then write: a little disorder
ORPHAN_TAIL_AGE = 300  # s: an unfinished last line of a rotated file this old is quarantined
SESSION_IDLE = dt.timedelta(days=7)  # grouping state of a session never disconnected is dropped
LOCK_KEY = 0x5A_75_D1_7C  # pg advisory lock: one collector per database at a time
PAUSE_ENV = "STRIPE_PLATFORM_AUDIT_COLLECT_PAUSE"  # test hook: seconds to sleep after each batch
_SEVERITIES = frozenset({"DEBUG", "INFO", "NOTICE", "WARNING", "LOG", "ERROR", "FATAL", "PANIC"})
_SEVERITY_ALIASES = {f"DEBUG{i}": "DEBUG" for i in range(1, 6)}
_SESSION_LINE = re.compile(
    r"^(?:connection (?:received|authenticated|authorized)|replication connection authorized|"
    r"disconnection|password authentication failed)"
)
# The embedded document server's own sessions on the cluster (runtime/ferretdb.py): every Log
# document written through it is a few statements of its, which, shipped as Log documents in turn,
# would feed on themselves. Its lines go to the trail and the lake, not to the Log collection.
_DOCUMENT_SERVER = (ferretdb.ROLE, ferretdb.BACKEND_DATABASE)
_FAILURE = frozenset({"ERROR", "FATAL", "PANIC"})
_SESSION_ID = re.compile(rb'"session_id":\s*"([^"]*)"')  # read before parsing: its state is loaded
DUPLICATE_KEY = 11000  # MongoDB's (and FerretDB's) error code of an _id already taken
_SQLSTATE = re.compile(r"^[0-9A-Z]{5}$")

__all__ = ["CollectResult", "CollectorBusy", "CollectorError", "LogSource", "collect", "sources"]


class CollectorError(PlatformError, RuntimeError):
    """The collector cannot run (no trail migration, a log directory it may not read)."""


class CollectorBusy(CollectorError):
    """Another collector holds this database's collector lock."""


@dataclass(frozen=True)
class LogSource:
    name: str  # postgres | api
    directory: Path
    pattern: str


def sources(settings: Settings) -> list[LogSource]:
    """The logs this host can read: the API's always; PostgreSQL's on the embedded profile."""
    found = [
        LogSource(
            "api",
            access_log.log_dir(settings),
            f"{access_log.API_LOG_PREFIX}*{access_log.API_LOG_SUFFIX}",
        )
    ]
    pg_dir = access_log.postgres_log_dir(settings)
    if pg_dir is not None:
        found.insert(0, LogSource("postgres", pg_dir, "postgresql-*.json"))
    return found


@dataclass
class CollectResult:
    lines_read: int = 0
    bytes_read: int = 0
    documents_written: int = 0  # Log documents inserted or changed
    trail_records: int = 0
    quarantined: dict[str, int] = field(default_factory=dict)  # reason -> lines
    lake_files: int = 0
    kept_out_of_log: int = 0  # the document server's own SQL: in the trail and the lake only
    batches: int = 0
    files: int = 0
    notes: list[str] = field(default_factory=list)  # rotations, unreadable directories
    seconds: float = 0.0

    @property
    def lines_per_second(self) -> float:
        return self.lines_read / self.seconds if self.seconds else 0.0

    @property
    def bytes_per_second(self) -> float:
        return self.bytes_read / self.seconds if self.seconds else 0.0

    def add(self, other: CollectResult) -> None:
        for name in ("lines_read", "bytes_read", "documents_written", "trail_records"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in ("lake_files", "kept_out_of_log", "batches", "files", "seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for reason, n in other.quarantined.items():
            self.quarantined[reason] = self.quarantined.get(reason, 0) + n
        self.notes += other.notes

    def as_dict(self) -> dict[str, Any]:
        return {
            "lines_read": self.lines_read,
            "bytes_read": self.bytes_read,
            "documents_written": self.documents_written,
            "trail_records": self.trail_records,
            "quarantined": dict(self.quarantined),
            "quarantined_total": sum(self.quarantined.values()),
            "lake_files": self.lake_files,
            "kept_out_of_log": self.kept_out_of_log,
            "batches": self.batches,
            "files": self.files,
            "notes": list(self.notes),
            "seconds": round(self.seconds, 3),
            "lines_per_second": round(self.lines_per_second, 1),
            "bytes_per_second": round(self.bytes_per_second, 1),
        }


# -- the pass --------------------------------------------------------------------------------------
def collect(
    settings: Settings,
    *,
    until_idle: bool = True,
    interval: float = 5.0,
    log_sources: Sequence[LogSource] | None = None,
    batch_lines: int = BATCH_LINES,
    stop: threading.Event | None = None,
    on_pass: Any = None,
) -> CollectResult:
    """Collect every complete line written since the saved positions. ``until_idle`` (default):
    one pass, up to the files' sizes when it started (the collector's own statements, logged by
    the cluster, wait for the next pass). Otherwise follow: a pass every ``interval`` seconds
    until ``stop`` is set or SIGTERM/SIGINT; ``on_pass(result_of_the_pass)`` after each."""
    from stripe_platform.oltp import db

    chosen = list(log_sources) if log_sources is not None else sources(settings)
    total = CollectResult()
    stop = stop or threading.Event()
    with db.connect(settings, with_key=False, autocommit=True) as conn:
        _check_schema(conn)
        (locked,) = conn.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,)).fetchone()
        if not locked:
            raise CollectorBusy(
                f"another collector is running on database {conn.info.dbname} (advisory lock "
                f"{LOCK_KEY}): wait for it, or stop it"
            )
        conn.autocommit = False
        docs = _log_collection(settings, total.notes)
        lake = _lake_writer(settings)
        restore = _stop_on_signals(stop) if not until_idle else None
        try:
            while True:
                one = CollectResult()
                started = time.perf_counter()
                for source in chosen:
                    _collect_source(settings, conn, docs, lake, source, one, batch_lines, stop)
                    if stop.is_set():
                        break
                one.seconds = time.perf_counter() - started
                total.add(one)
                if on_pass is not None:
                    on_pass(one)
                if until_idle or stop.wait(interval):
                    break
        finally:
            if restore:
                restore()
            docs.database.client.close()
            conn.rollback()
            conn.autocommit = True
            conn.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
    return total


def _stop_on_signals(stop: threading.Event):
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for s in previous:
        signal.signal(s, lambda *_: stop.set())

    def restore() -> None:
        for s, handler in previous.items():
            signal.signal(s, handler)

    return restore


def _check_schema(conn: psycopg.Connection) -> None:
    (present,) = conn.execute(
        "SELECT to_regclass('audit.collector_file') IS NOT NULL "
        "AND to_regclass('audit.trail_record') IS NOT NULL"
    ).fetchone()
    if not present:
        raise CollectorError(
            f"database {conn.info.dbname} has no audit trail or collector tables (migrations 0020, "
            "0021): run `stripe-platform db migrate` first"
        )


def _log_collection(settings: Settings, notes: list[str]):
    """The Log collection; on the embedded FerretDB with the GIN index on ``_id`` that lets a
    replace by ``_id`` use an index instead of reading the whole table (docstore/ferretdb.py)."""
    from stripe_platform.docstore import client as docstore
    from stripe_platform.docstore import ferretdb as backend

    database = docstore.connect(settings)
    if settings.mongodb_uri is None and docstore.server_kind(database) == "ferretdb":
        if COLLECTION not in database.list_collection_names():
            database.create_collection(COLLECTION)
        try:
            backend.ensure_keyed_indexes(settings, database.name, COLLECTION, ["_id"])
        except (PlatformError, psycopg.Error) as exc:
            notes.append(f"no keyed _id index on {COLLECTION} (replaces scan the table): {exc}")
    return database[COLLECTION]


def _lake_writer(settings: Settings):
    from stripe_platform.lake.writer import LakeWriter

    root = trail.audit_lake_root(settings)
    return LakeWriter.from_settings(settings.model_copy(update={"lake_uri": root}))


# -- one source ------------------------------------------------------------------------------------
@dataclass
class _FileState:
    name: str
    generation: int
    device: int
    inode: int
    head_hash: bytes
    offset: int
    lines: int
    known: bool  # a row exists

    @property
    def file_id(self) -> str:
        return self.name if self.generation == 1 else f"{self.name}~{self.generation}"


def _collect_source(
    settings: Settings,
    conn: psycopg.Connection,
    docs: Any,
    lake: Any,
    source: LogSource,
    result: CollectResult,
    batch_lines: int,
    stop: threading.Event,
) -> None:
    try:
        paths = sorted(p for p in source.directory.glob(source.pattern) if p.is_file())
    except OSError as exc:
        result.notes.append(f"{source.name}: cannot list {source.directory}: {exc.strerror}")
        return
    with conn.transaction():
        states = {
            row[0]: _FileState(*row, known=True)
            for row in conn.execute(
                'SELECT name, generation, device, inode, head_hash, "offset", lines '
                "FROM audit.collector_file WHERE source = %s",
                (source.name,),
            )
        }
        row = conn.execute(
            "SELECT high_water FROM audit.collector_source WHERE source = %s", (source.name,)
        ).fetchone()
    high_water = row[0] if row else None
    pause = float(os.environ.get(PAUSE_ENV) or 0)
    for index, path in enumerate(paths):
        if stop.is_set():
            return
        last_file = index == len(paths) - 1
        try:
            handle = path.open("rb")
        except OSError as exc:
            result.notes.append(f"{source.name}: cannot read {path}: {exc.strerror}")
            continue
        with handle:
            st = os.fstat(handle.fileno())
            state = states.get(path.name)
            state = _identify(source, path, handle, st, state, result)
            size = st.st_size  # this pass reads up to here
            if state.offset >= size:
                continue
            result.files += 1
            while state.offset < size and not stop.is_set():
                handle.seek(state.offset)
                data = handle.read(min(BATCH_BYTES, size - state.offset))
                raw = _complete_lines(data, batch_lines)
                if not raw:
                    if len(data) == BATCH_BYTES:  # one line longer than a batch: take it whole
                        data += handle.readline()
                        raw = _complete_lines(data, 1)
                    if not raw:
                        if not last_file and time.time() - st.st_mtime > ORPHAN_TAIL_AGE:
                            raw = [data]  # never finished, never will be: quarantined below
                        else:
                            break  # still being written: next pass
                high_water = _batch(
                    settings, conn, docs, lake, source, state, handle, raw, high_water, result
                )
                if pause:
                    time.sleep(pause)


def _complete_lines(data: bytes, limit: int) -> list[bytes]:
    """Up to ``limit`` whole lines (with their newline) from the start of ``data``."""
    lines, start = [], 0
    while len(lines) < limit:
        end = data.find(b"\n", start)
        if end < 0:
            break
        lines.append(data[start : end + 1])
        start = end + 1
    return lines


def _head_hash(handle: Any, length: int) -> bytes:
    handle.seek(0)
    return hashlib.sha256(handle.read(min(length, HEAD_BYTES))).digest()


def _identify(
    source: LogSource,
    path: Path,
    handle: Any,
    st: os.stat_result,
    state: _FileState | None,
    result: CollectResult,
) -> _FileState:
    """The file's saved state, or a new generation if it was replaced or truncated."""
    if state is None:
        return _FileState(path.name, 1, st.st_dev, st.st_ino, b"", 0, 0, known=False)
    why = None
    if (st.st_dev, st.st_ino) != (state.device, state.inode):
        why = "replaced (another inode)"
    elif st.st_size < state.offset:
        why = f"truncated ({st.st_size} bytes, {state.offset} already read)"
    elif state.offset and _head_hash(handle, state.offset) != state.head_hash:
        why = "rewritten (its first bytes changed)"
    if why is None:
        return state
    result.notes.append(
        f"{source.name}: {path.name} {why}: read again from its start as generation "
        f"{state.generation + 1}"
    )
    return _FileState(
        path.name, state.generation + 1, st.st_dev, st.st_ino, b"", 0, 0, known=state.known
    )


# -- one batch -------------------------------------------------------------------------------------
@dataclass
class _Parsed:
    key: str  # the trail's source_key
    at: dt.datetime
    doc_id: str
    header: dict[str, Any]  # the Log document's fields but lines
    line: dict[str, Any]  # one of its lines
    kind: str  # the trail record's kind
    sort: tuple
    to_log: bool = True  # False: the document server's own SQL (trail and lake only)


class _Bad(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _batch(
    settings: Settings,
    conn: psycopg.Connection,
    docs: Any,
    lake: Any,
    source: LogSource,
    state: _FileState,
    handle: Any,
    raw: list[bytes],
    high_water: dt.datetime | None,
    result: CollectResult,
) -> dt.datetime | None:
    start = state.offset
    offset = start
    parsed: list[_Parsed] = []
    bad: list[tuple[str, str, str, bytes]] = []  # key, reason, detail, line
    sessions: dict[str, list] = {}  # pg session_id -> [query_id, statement hash, closed]
    if source.name == "postgres":
        ids = set()
        for line in raw:
            match = _SESSION_ID.search(line)
            if match:
                ids.add(match.group(1).decode("ascii", "replace"))
        with conn.transaction():
            for sid, qid, shash in conn.execute(
                "SELECT session_id, query_id, statement_hash FROM audit.collector_session "
                "WHERE session_id = ANY(%s)",
                (sorted(ids),),
            ):
                sessions[sid] = [qid, shash and bytes(shash), False]
    touched: set[str] = set()
    for line in raw:
        key = f"{source.name}:{state.file_id}:{offset}"
        offset += len(line)
        try:
            item = _parse(source.name, key, state, offset - len(line), line, sessions, touched)
            if high_water is not None and item.at < high_water - CLOCK_TOLERANCE:
                raise _Bad(
                    "clock_backwards",
                    f"time {item.at.isoformat()} is before {high_water.isoformat()}, the newest "
                    f"already seen from {source.name}",
                )
        except _Bad as exc:
            bad.append((key, exc.reason, exc.detail, line))
            continue
        if high_water is None or item.at > high_water:
            high_water = item.at
        parsed.append(item)
    written = _write_documents(docs, [p for p in parsed if p.to_log])
    lake_file = _write_lake(lake, source.name, state, start, parsed)
    records = [
        (p.key, p.at, p.kind, {**{k: v for k, v in p.header.items() if k != "session_start"},
                               **_line_payload(p.line), "log_id": p.doc_id})
        for p in parsed
    ]  # fmt: skip
    with conn.transaction():
        appended = trail.append(settings, source.name, records, conn=conn) if records else 0
        if bad:
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO audit.collector_quarantine (source_key, source, reason, detail, "
                    "line) VALUES (%s, %s, %s, %s, %s) ON CONFLICT (source_key) DO NOTHING",
                    [(k, source.name, r, d, ln) for k, r, d, ln in bad],
                )
        if sessions:
            _save_sessions(conn, sessions)
        state.offset = offset
        state.lines += len(raw)
        if start < HEAD_BYTES or not state.head_hash:  # the identity of what was read so far
            state.head_hash = _head_hash(handle, state.offset)
        conn.execute(
            "INSERT INTO audit.collector_file (source, name, generation, device, inode, "
            'head_hash, "offset", lines) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) '
            "ON CONFLICT (source, name) DO UPDATE SET generation = EXCLUDED.generation, "
            "device = EXCLUDED.device, inode = EXCLUDED.inode, head_hash = EXCLUDED.head_hash, "
            '"offset" = EXCLUDED."offset", lines = EXCLUDED.lines, updated_at = clock_timestamp()',
            (
                source.name,
                state.name,
                state.generation,
                state.device,
                state.inode,
                state.head_hash,
                state.offset,
                state.lines,
            ),
        )
        conn.execute(
            "INSERT INTO audit.collector_source (source, high_water) VALUES (%s, %s) "
            "ON CONFLICT (source) DO UPDATE SET high_water = EXCLUDED.high_water, "
            "updated_at = clock_timestamp()",
            (source.name, high_water),
        )
    state.known = True
    result.lines_read += len(raw)
    result.bytes_read += offset - start
    result.documents_written += written
    result.kept_out_of_log += sum(not p.to_log for p in parsed)
    result.trail_records += appended
    result.lake_files += lake_file
    result.batches += 1
    for _, reason, _, _ in bad:
        result.quarantined[reason] = result.quarantined.get(reason, 0) + 1
    return high_water


def _save_sessions(conn: psycopg.Connection, sessions: dict[str, list]) -> None:
    closed = [sid for sid, (_, _, done) in sessions.items() if done]
    open_ = [(sid, q, h) for sid, (q, h, done) in sessions.items() if not done]
    if closed:
        conn.execute("DELETE FROM audit.collector_session WHERE session_id = ANY(%s)", (closed,))
    if open_:
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO audit.collector_session (session_id, query_id, statement_hash) "
                "VALUES (%s, %s, %s) ON CONFLICT (session_id) DO UPDATE SET "
                "query_id = EXCLUDED.query_id, statement_hash = EXCLUDED.statement_hash, "
                "updated_at = clock_timestamp()",
                open_,
            )
    conn.execute(
        "DELETE FROM audit.collector_session WHERE updated_at < clock_timestamp() - %s",
        (SESSION_IDLE,),
    )


# -- parsing and mapping ---------------------------------------------------------------------------
def _parse(
    source: str,
    key: str,
    state: _FileState,
    offset: int,
    line: bytes,
    sessions: dict[str, list],
    touched: set[str],
) -> _Parsed:
    text = line.rstrip(b"\r\n")
    if not line.endswith(b"\n"):
        raise _Bad("truncated", "the last line of a rotated file, never finished")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        cut = exc.msg.startswith("Unterminated") or exc.pos >= len(text.rstrip())
        raise _Bad("truncated" if cut else "corrupt", f"{exc.msg} at byte {exc.pos}") from None
    except ValueError as exc:  # not UTF-8
        raise _Bad("corrupt", str(exc)[:200]) from None
    if not isinstance(obj, dict):
        raise _Bad("unknown_format", f"a JSON {type(obj).__name__}, not an object")
    sort = (state.name, state.generation, offset)
    if source == "postgres":
        return _postgres(obj, key, sort, sessions)
    return _api(obj, key, sort, state, offset)


def _field(obj: dict, name: str, kind: type, source: str) -> Any:
    value = obj.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise _Bad("unknown_format", f"not a {source} log line: no {kind.__name__} {name!r}")
    return value


def _statement_hash(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def _postgres(obj: dict, key: str, sort: tuple, sessions: dict[str, list]) -> _Parsed:
    stamp = _field(obj, "timestamp", str, "PostgreSQL")
    severity = _field(obj, "error_severity", str, "PostgreSQL")
    severity = _SEVERITY_ALIASES.get(severity, severity)
    message = _field(obj, "message", str, "PostgreSQL")
    pid = _field(obj, "pid", int, "PostgreSQL")
    session_id = _field(obj, "session_id", str, "PostgreSQL")
    if severity not in _SEVERITIES:
        raise _Bad("unknown_format", f"not a PostgreSQL log line: severity {severity!r}")
    try:
        at = access_log.pg_time(stamp)
    except ValueError:
        raise _Bad("unknown_format", f"timestamp {stamp[:60]!r} is not a time") from None
    state_code = obj.get("state_code")
    state_code = state_code if isinstance(state_code, str) and _SQLSTATE.match(state_code) else None
    if state_code == "00000":
        state_code = None  # successful completion: what a LOG line says anyway
    context = obj.get("context") if isinstance(obj.get("context"), str) else None
    redacted = access_log.redact_message(message, state_code, context)
    raw_statement = obj.get("statement")
    statement = access_log.redact_sql(raw_statement) if isinstance(raw_statement, str) else None

    session = sessions.setdefault(session_id, [0, None, False])
    opened = access_log._STATEMENT_MESSAGE.match(message) if severity == "LOG" else None
    if opened and not message.startswith(("bind ", "parse ")):
        session[0] += 1
        session[1] = _statement_hash(access_log.redact_sql(opened.group(2)))
        query_id, kind = session[0], "statement"
    elif severity in _FAILURE and statement is not None:
        digest = _statement_hash(statement)
        if digest != session[1]:  # never logged as a statement (a syntax error): its own query
            session[0] += 1
            session[1] = digest
        query_id, kind = session[0], "error"
    elif _SESSION_LINE.match(message) or (severity in _FAILURE and statement is None):
        query_id = 0
        kind = "error" if severity in _FAILURE else (
            "disconnection" if message.startswith("disconnection") else "connection"
        )  # fmt: skip
    else:
        query_id, kind = session[0], "log"
    if message.startswith("disconnection:"):
        session[2] = True

    header: dict[str, Any] = {
        "source": "postgres",
        "query_id": query_id,
        "user": obj.get("user") or "",
        "dbname": obj.get("dbname") or "",
        "pid": pid,
        "session_id": session_id,
        "application_name": obj.get("application_name") or "",
        "backend_type": obj.get("backend_type") or "",
    }
    if isinstance(obj.get("remote_host"), str):
        header["remote_host"] = obj["remote_host"]
    if isinstance(obj.get("session_start"), str):
        with contextlib.suppress(ValueError):  # a session start that is not a time: left out
            header["session_start"] = access_log.pg_time(obj["session_start"])
    line: dict[str, Any] = {"timestamp": at, "error_severity": severity, "message": redacted}
    if state_code:
        line["state_code"] = state_code
    if statement is not None:
        line["statement"] = statement
    line["source_key"] = key
    own = (header["user"], header["dbname"]) == _DOCUMENT_SERVER
    return _Parsed(key, at, f"pg:{session_id}:{query_id}", header, line, kind, (at, *sort), not own)


def _api(obj: dict, key: str, sort: tuple, state: _FileState, offset: int) -> _Parsed:
    stamp = _field(obj, "time", str, "API access")
    kind = _field(obj, "kind", str, "API access")
    outcome = _field(obj, "outcome", str, "API access")
    action = _field(obj, "action", str, "API access")
    try:
        at = dt.datetime.fromisoformat(stamp)
    except ValueError:
        raise _Bad("unknown_format", f"time {stamp[:60]!r} is not a time") from None
    if at.tzinfo is None:
        raise _Bad("unknown_format", f"time {stamp[:60]!r} has no time zone")
    resource = obj.get("resource") or ""
    reason = obj.get("reason")
    detail = obj.get("detail") if isinstance(obj.get("detail"), dict) else {}
    if kind == "request":
        message = f"{action} {resource} -> {detail.get('status', '?')}"
    else:
        message = f"{kind} {outcome} {action} {resource}".rstrip() + (
            f": {reason}" if reason else ""
        )
    if outcome == "allow":
        severity, state_code = "LOG", None
    elif kind == "authn" and outcome == "deny":
        severity, state_code = "FATAL", "28000"
    else:
        severity = "ERROR"
        state_code = "42501" if kind == "authz" and outcome == "deny" else None
    request_id = obj.get("request_id")
    doc_id = f"api:{request_id}" if request_id else f"api:{state.file_id}:{offset}"
    pid = obj.get("pid")
    header: dict[str, Any] = {
        "source": "api",
        "user": obj.get("user") or "",
        "dbname": "api",
        "pid": pid if isinstance(pid, int) and not isinstance(pid, bool) else 0,
        "session_id": request_id or f"{state.file_id}:{offset}",
        "session_start": at,
        "application_name": "api",
    }
    if isinstance(obj.get("source"), str):
        header["remote_host"] = obj["source"]
    line: dict[str, Any] = {"timestamp": at, "error_severity": severity, "message": message}
    if state_code:
        line["state_code"] = state_code
    line["source_key"] = key
    return _Parsed(key, at, doc_id, header, line, kind, (at, *sort))


def _line_payload(line: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.isoformat() if isinstance(v, dt.datetime) else v) for k, v in line.items()}


# -- writing ---------------------------------------------------------------------------------------
def _line_order(line: dict[str, Any]) -> tuple:
    file_id, _, offset = line["source_key"].rpartition(":")
    when = line["timestamp"]
    return (when.astimezone(dt.UTC) if when.tzinfo else when.replace(tzinfo=dt.UTC), file_id,
            int(offset))  # fmt: skip


def _write_documents(collection: Any, parsed: list[_Parsed]) -> int:
    """Write the batch's Log documents; returns how many were new or changed. Each is inserted
    (one statement a batch on FerretDB, which filters ``$in`` by reading the whole table, and
    costs a statement per updated document); one whose ``_id`` is taken (a session or request
    that began in an earlier batch, or a batch written again after a crash) is read back by
    ``_id``, merged with it by line source_key and replaced, unless it holds nothing new."""
    from pymongo import ReplaceOne
    from pymongo.errors import BulkWriteError

    from stripe_platform.docstore import validation

    if not parsed:
        return 0
    grouped: dict[str, tuple[dict, dict[str, dict]]] = {}
    for p in parsed:
        header, lines = grouped.setdefault(p.doc_id, ({}, {}))
        _merge_header(header, p.header)
        lines[p.line["source_key"]] = p.line
    docs = [
        {"_id": doc_id, **header, "lines": sorted(lines.values(), key=_line_order)}
        for doc_id, (header, lines) in grouped.items()
    ]
    taken: list[dict] = []
    try:  # checked against the Log validator where the server does not enforce it (FerretDB)
        validation.insert_many(collection, docs, ordered=False)
    except BulkWriteError as exc:
        errors = exc.details.get("writeErrors", [])
        if any(e.get("code") != DUPLICATE_KEY for e in errors):
            raise
        taken = [docs[e["index"]] for e in errors]
    requests = []
    for doc in taken:
        old = collection.find_one({"_id": doc["_id"]}) or {}
        old_header = {k: v for k, v in old.items() if k not in ("_id", "lines")}
        old_lines = {ln.get("source_key"): ln for ln in old.get("lines", [])}
        header = dict(old_header)
        _merge_header(header, {k: v for k, v in doc.items() if k not in ("_id", "lines")})
        if {ln["source_key"] for ln in doc["lines"]} <= set(old_lines) and header == old_header:
            continue  # written before (a replay): nothing new
        lines = {**old_lines, **{ln["source_key"]: ln for ln in doc["lines"]}}
        merged = {"_id": doc["_id"], **header, "lines": sorted(lines.values(), key=_line_order)}
        requests.append(ReplaceOne({"_id": doc["_id"]}, merged, upsert=True))
    if requests:
        validation.bulk_write(collection, requests, ordered=False)
    return len(docs) - len(taken) + len(requests)


def _merge_header(into: dict[str, Any], new: dict[str, Any]) -> None:
    """Empty fields filled, the earliest session start kept."""
    for name, value in new.items():
        if name == "session_start" and into.get(name) is not None:
            into[name] = min(into[name], value, key=_aware)
        elif name not in into or (into[name] in (None, "") and value not in (None, "")):
            into[name] = value


def _aware(when: dt.datetime) -> dt.datetime:
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


_LAKE_COLUMNS = (
    ("log_id", "string"), ("source", "string"), ("source_key", "string"),
    ("timestamp", "timestamp"), ("error_severity", "string"), ("state_code", "string"),
    ("message", "string"), ("statement", "string"), ("user", "string"), ("dbname", "string"),
    ("pid", "int64"), ("remote_host", "string"), ("session_id", "string"),
    ("session_start", "timestamp"), ("application_name", "string"), ("query_id", "int64"),
)  # fmt: skip


def _write_lake(
    lake: Any, source: str, state: _FileState, start: int, parsed: list[_Parsed]
) -> int:
    """The batch's lines, one row each with its document's fields, as one parquet file named by
    the batch's first byte (a replay replaces it)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not parsed:
        return 0
    types = {"string": pa.string(), "int64": pa.int64(), "timestamp": pa.timestamp("us", tz="UTC")}
    rows = [{**p.header, **p.line, "log_id": p.doc_id} for p in parsed]
    table = pa.table(
        {name: pa.array([r.get(name) for r in rows], types[kind]) for name, kind in _LAKE_COLUMNS}
    )
    day = parsed[0].at.astimezone(dt.UTC).date().isoformat()
    path = f"{lake.base}/{LAKE_DIR}/source={source}/date={day}/{state.file_id}-{start:012d}.parquet"
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer, compression=lake.compression)
    lake.put_bytes(path, buffer.getvalue().to_pybytes())
    return 1


# -- reading back (CLI, tests) ---------------------------------------------------------------------
def quarantine(settings: Settings, *, limit: int = 100) -> list[dict[str, Any]]:
    """The newest quarantined lines (reason, detail, the line as read)."""
    from stripe_platform.oltp import db

    with db.connect(settings, with_key=False, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT source_key, source, reason, detail, line, quarantined_at "
            "FROM audit.collector_quarantine ORDER BY quarantined_at DESC, source_key LIMIT %s",
            (limit,),
        ).fetchall()
    return [
        {
            "source_key": r[0],
            "source": r[1],
            "reason": r[2],
            "detail": r[3],
            "line": bytes(r[4]).decode("utf-8", "replace"),
            "quarantined_at": r[5],
        }
        for r in rows
    ]
