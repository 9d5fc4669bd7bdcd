"""The sealed audit trail (issue 22, docs/audit.md; tables in sql/oltp/0020_audit_trail.sql).

Records are appended per stream ("postgres", "api", "audit", ...), each chained to the previous one:

    hash = sha256(prev_hash || frame(stream) || frame(seq) || frame(at) || frame(kind)
                             || frame(source_key) || frame(payload))

frame(x) is the 4-byte big-endian length of x's UTF-8 bytes followed by those bytes (no separator
can be forged into a field); ``seq`` is decimal, ``at`` is UTC ``YYYY-MM-DDTHH:MM:SS.ffffffZ``,
``payload`` the canonical JSON text (sorted keys, no spaces, UTF-8) stored exactly as hashed. The
first record of a stream has prev_hash = 32 zero bytes. PostgreSQL computes the same hash in SQL,
which is how :func:`verify` checks a million records in a few seconds.

Signed checkpoints (Ed25519, ``cryptography``) pin (stream, seq, hash): one every
``audit_checkpoint_records`` records, one for each stream at ``audit checkpoint`` (the daily job),
and a 'retention' one anchoring a stream's new start after a retention cut. A rewritten chain or a
cut-off tail no longer matches the last signed checkpoint. The private key is stored wrapped by the
platform's Envelope (scope ``postgres/audit_signing``, associated data binding it to its public
key); the public key sits beside the checkpoints, so signatures verify without a secret, and verify
also unwraps each signing key once to prove the key is the platform's and not one an intruder with
the database added.

Only the retention job removes records (:func:`apply_retention`, through the SQL function
``audit.remove_expired``): records older than ``audit_hot_days`` leave PostgreSQL once they are in
the lake (:func:`export_lake`, parquet per stream per day); lake files older than
``audit_retention_days`` are removed by the same job (on the prod bucket, Object Lock in
compliance mode keeps them until their lock ends: lake/object_lock.py).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import struct
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from stripe_platform.config import Settings
from stripe_platform.errors import PlatformError

ZERO_HASH = bytes(32)
SIGNING_SCOPE = "postgres/audit_signing"  # the Envelope scope that wraps the signing key
CHECKPOINT_CONTEXT = b"stripe-platform/audit-checkpoint/v1"
RETENTION_STREAM = "audit"  # where the retention job records what it removed
LAKE_DIR = "audit/trail"  # under the audit lake root: stream=<s>/date=<d>/<first>-<last>.parquet
WHY = ("altered", "deleted", "reordered", "truncated", "bad signature", "wrong key")

__all__ = [
    "Checkpoint",
    "ExportResult",
    "RetentionCut",
    "RetentionResult",
    "StreamReport",
    "TrailError",
    "TrailRecord",
    "VerifyReport",
    "append",
    "apply_retention",
    "checkpoint",
    "export_lake",
    "raise_incident",
    "read",
    "record_hash",
    "verify",
]


class TrailError(PlatformError, ValueError):
    """A record or call the trail refuses; the message says which and why."""


# -- records and their hash ------------------------------------------------------------------------
@dataclass(frozen=True)
class TrailRecord:
    stream: str
    seq: int
    at: dt.datetime
    kind: str
    source_key: str
    payload: dict
    prev_hash: bytes
    hash: bytes


def canonical_payload(payload: dict) -> str:
    """The one serialisation of a payload: sorted keys, no spaces, UTF-8, no NaN."""
    if not isinstance(payload, dict):
        raise TrailError(f"an audit payload is a JSON object, got {type(payload).__name__}")
    try:
        return json.dumps(
            payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
    except (TypeError, ValueError) as exc:
        raise TrailError(f"audit payload is not plain JSON: {exc}") from exc


def format_at(at: dt.datetime) -> str:
    if at.tzinfo is None:
        raise TrailError(f"audit record time {at} has no time zone")
    return at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _frame(value: str) -> bytes:
    data = value.encode()
    return struct.pack(">I", len(data)) + data


def record_hash(
    prev_hash: bytes,
    stream: str,
    seq: int,
    at: dt.datetime | str,
    kind: str,
    source_key: str,
    payload_text: str,
) -> bytes:
    """sha256 over the previous hash and the framed fields (the module's docstring)."""
    at_text = at if isinstance(at, str) else format_at(at)
    return hashlib.sha256(
        prev_hash
        + _frame(stream)
        + _frame(str(seq))
        + _frame(at_text)
        + _frame(kind)
        + _frame(source_key)
        + _frame(payload_text)
    ).digest()


def _sql_frame(expr: str) -> str:
    return f"int4send(octet_length(convert_to({expr}, 'UTF8'))) || convert_to({expr}, 'UTF8')"


# The same hash, computed by PostgreSQL over a row of audit.trail_record.
SQL_HASH = (
    "sha256(prev_hash || "
    + " || ".join(
        _sql_frame(e)
        for e in (
            "stream",
            "seq::text",
            """to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')""",
            "kind",
            "source_key",
            "payload",
        )
    )
    + ")"
)


def _check_stream(stream: str) -> str:
    import re

    if not re.fullmatch(r"[a-z][a-z0-9_]{0,62}", stream or ""):
        raise TrailError(f"audit stream {stream!r}: lowercase letters, digits and _ only")
    return stream


def _connect(settings: Settings) -> psycopg.Connection:
    from stripe_platform.oltp import db

    return db.connect_to_table(
        settings,
        "audit.trail_record",
        what="audit trail",
        migration=20,
        error=TrailError,
        rows=False,
    )


# -- signing ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Checkpoint:
    stream: str
    seq: int
    hash: str  # hex
    kind: str  # periodic | retention
    key_id: str
    signed_at: dt.datetime


_keys_lock = threading.Lock()
_private_keys: dict[tuple[str, str], Ed25519PrivateKey] = {}  # (database identity, key_id)


def _key_aad(key_id: str, public_key: bytes) -> bytes:
    return b"audit-signing:" + key_id.encode() + b":" + public_key


def _key_id(public_key: bytes) -> str:
    return "ed25519:" + hashlib.sha256(public_key).hexdigest()[:16]


def _identity(settings: Settings) -> str:
    return f"{settings.profile}|{settings.home_dir}|{settings.pg_database}"


def _envelope(settings: Settings):
    from stripe_platform.security.envelope import shared_envelope

    return shared_envelope(settings)


def _signing_key(settings: Settings, conn: psycopg.Connection) -> tuple[str, Ed25519PrivateKey]:
    """The newest signing key (made, wrapped and stored on first use), unwrapped once a process."""
    row = conn.execute(
        "SELECT key_id, public_key, wrapped_private FROM audit.signing_key "
        "ORDER BY created_at DESC, key_id LIMIT 1"
    ).fetchone()
    with _keys_lock:
        if row is None:
            private = Ed25519PrivateKey.generate()
            public = private.public_key().public_bytes(
                serialization.Encoding.Raw, serialization.PublicFormat.Raw
            )
            raw = private.private_bytes(
                serialization.Encoding.Raw,
                serialization.PrivateFormat.Raw,
                serialization.NoEncryption(),
            )
            key_id = _key_id(public)
            wrapped = _envelope(settings).encrypt(SIGNING_SCOPE, raw, aad=_key_aad(key_id, public))
            conn.execute(
                "INSERT INTO audit.signing_key (key_id, public_key, wrapped_private) "
                "VALUES (%s, %s, %s)",
                (key_id, public, wrapped),
            )
            _private_keys[(_identity(settings), key_id)] = private
            return key_id, private
        key_id, public, wrapped = row[0], bytes(row[1]), bytes(row[2])
        cached = _private_keys.get((_identity(settings), key_id))
        if cached is None:
            cached = _unwrap(settings, key_id, public, wrapped)
            _private_keys[(_identity(settings), key_id)] = cached
        return key_id, cached


def _unwrap(settings: Settings, key_id: str, public: bytes, wrapped: bytes) -> Ed25519PrivateKey:
    """The private key, after proving it is the platform's: the Envelope decrypts it under the
    associated data naming this public key, and it derives that public key."""
    raw = _envelope(settings).decrypt(wrapped, aad=_key_aad(key_id, public), obj=key_id)
    private = Ed25519PrivateKey.from_private_bytes(raw)
    derived = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    if derived != public or _key_id(public) != key_id:
        raise TrailError(f"signing key {key_id}: the wrapped key does not match its public key")
    return private


def _checkpoint_message(
    stream: str, seq: int, hash_: bytes, kind: str, signed_at: dt.datetime
) -> bytes:
    return (
        CHECKPOINT_CONTEXT
        + _frame(stream)
        + _frame(str(seq))
        + _frame(hash_.hex())
        + _frame(kind)
        + _frame(format_at(signed_at))
    )


def _sign(
    settings: Settings, conn: psycopg.Connection, stream: str, seq: int, hash_: bytes, kind: str
) -> Checkpoint:
    key_id, private = _signing_key(settings, conn)
    (signed_at,) = conn.execute("SELECT date_trunc('milliseconds', clock_timestamp())").fetchone()
    signature = private.sign(_checkpoint_message(stream, seq, hash_, kind, signed_at))
    conn.execute(
        "INSERT INTO audit.trail_checkpoint (stream, seq, hash, kind, signed_at, key_id, signature) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
        (stream, seq, hash_, kind, signed_at, key_id, signature),
    )
    if kind == "periodic":
        conn.execute(
            "UPDATE audit.trail_head SET checkpoint_seq = greatest(checkpoint_seq, %s) "
            "WHERE stream = %s",
            (seq, stream),
        )
    return Checkpoint(stream, seq, hash_.hex(), kind, key_id, signed_at)


# -- append ----------------------------------------------------------------------------------------
def append(
    settings: Settings,
    stream: str,
    records: Sequence[tuple[str, dt.datetime, str, dict]],
    *,
    conn: psycopg.Connection | None = None,
) -> int:
    """Append ``records`` (source_key, at, kind, payload) to ``stream`` in one transaction (a
    savepoint inside the caller's, when ``conn`` is given: the collector saves its position in the
    same transaction). A source_key already in the stream, or twice in the batch, is skipped.
    Returns the number of records appended. Signs a checkpoint once ``audit_checkpoint_records``
    records have accumulated since the last one."""
    _check_stream(stream)
    prepared = []
    for item in records:
        source_key, at, kind, payload = item
        if not source_key or not kind:
            raise TrailError(f"audit record {item!r}: source_key and kind are required")
        prepared.append((source_key, format_at(at), kind, canonical_payload(payload)))
    if not prepared:
        return 0
    if conn is None:
        with _connect(settings) as own:
            return _append(settings, own, stream, prepared)
    return _append(settings, conn, stream, prepared)


def _append(
    settings: Settings, conn: psycopg.Connection, stream: str, prepared: list[tuple[str, ...]]
) -> int:
    if not conn.autocommit and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
        # Join the caller's transaction: psycopg begins it on a first statement, and then
        # transaction() below is a savepoint in it (on an idle connection it would commit alone).
        conn.execute("SELECT 1")
    with conn.transaction():
        conn.execute(
            "INSERT INTO audit.trail_head (stream) VALUES (%s) ON CONFLICT DO NOTHING", (stream,)
        )
        seq, prev, checkpoint_seq = conn.execute(
            "SELECT seq, hash, checkpoint_seq FROM audit.trail_head WHERE stream = %s FOR UPDATE",
            (stream,),
        ).fetchone()
        prev = bytes(prev)
        keys = [p[0] for p in prepared]
        existing = {
            k
            for (k,) in conn.execute(
                "SELECT source_key FROM audit.trail_record "
                "WHERE stream = %s AND source_key = ANY(%s)",
                (stream, keys),
            )
        }
        rows = []
        for source_key, at_text, kind, payload_text in prepared:
            if source_key in existing:
                continue
            existing.add(source_key)
            seq += 1
            digest = record_hash(prev, stream, seq, at_text, kind, source_key, payload_text)
            rows.append((stream, seq, at_text, kind, source_key, payload_text, prev, digest))
            prev = digest
        if not rows:
            return 0
        with conn.cursor().copy(
            "COPY audit.trail_record (stream, seq, at, kind, source_key, payload, prev_hash, hash) "
            "FROM STDIN"
        ) as copy:
            for row in rows:
                copy.write_row(row)
        conn.execute(
            "UPDATE audit.trail_head SET seq = %s, hash = %s, updated_at = clock_timestamp() "
            "WHERE stream = %s",
            (seq, prev, stream),
        )
        if seq - checkpoint_seq >= settings.audit_checkpoint_records:
            _sign(settings, conn, stream, seq, prev, "periodic")
    return len(rows)


def read(
    settings: Settings, stream: str, *, after_seq: int = 0, limit: int = 1000
) -> list[TrailRecord]:
    """Records of ``stream`` after ``after_seq``, in order (for readers and the CLI)."""
    with _connect(settings) as conn:
        rows = conn.execute(
            "SELECT stream, seq, at, kind, source_key, payload, prev_hash, hash "
            "FROM audit.trail_record WHERE stream = %s AND seq > %s ORDER BY seq LIMIT %s",
            (stream, after_seq, limit),
        ).fetchall()
    return [
        TrailRecord(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]), bytes(r[6]), bytes(r[7]))
        for r in rows
    ]


def checkpoint(settings: Settings, *, stream: str | None = None) -> list[Checkpoint]:
    """Sign a periodic checkpoint at the head of each stream (or ``stream``) that moved since its
    last one. Returns the checkpoints made."""
    made = []
    with _connect(settings) as conn:
        if stream is not None:
            streams = [_check_stream(stream)]
        else:
            streams = [s for (s,) in conn.execute("SELECT stream FROM audit.trail_head ORDER BY 1")]
        for name in streams:
            with conn.transaction():
                row = conn.execute(
                    "SELECT seq, hash, checkpoint_seq FROM audit.trail_head WHERE stream = %s "
                    "FOR UPDATE",
                    (name,),
                ).fetchone()
                if row is None:
                    raise TrailError(f"audit stream {name!r} has no records")
                seq, hash_, checkpoint_seq = row
                if seq > checkpoint_seq:
                    made.append(_sign(settings, conn, name, seq, bytes(hash_), "periodic"))
    return made


# -- verify ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BadRecord:
    stream: str
    seq: int
    why: str  # one of WHY
    detail: str


@dataclass
class StreamReport:
    stream: str
    records: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    checkpoints: int = 0
    anchored_at: int = 0  # the retention anchor's seq (0: the chain starts at seq 1)
    problem: BadRecord | None = None


@dataclass
class VerifyReport:
    ok: bool
    records: int
    checkpoints: int
    seconds: float
    streams: list[StreamReport] = field(default_factory=list)

    @property
    def first_bad(self) -> BadRecord | None:
        return next((s.problem for s in self.streams if s.problem), None)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        bad = self.first_bad
        out["first_bad"] = asdict(bad) if bad else None
        return out


def _streams(conn: psycopg.Connection) -> list[str]:
    # A loose index scan over the primary key: distinct streams without reading every record.
    found = conn.execute(
        "WITH RECURSIVE s AS ("
        " SELECT min(stream) AS stream FROM audit.trail_record"
        " UNION ALL SELECT (SELECT min(stream) FROM audit.trail_record r WHERE r.stream > s.stream)"
        " FROM s WHERE s.stream IS NOT NULL)"
        " SELECT stream FROM s WHERE stream IS NOT NULL"
        " UNION SELECT stream FROM audit.trail_head UNION SELECT stream FROM audit.trail_checkpoint"
    ).fetchall()
    return sorted(s for (s,) in found)


class _Keys:
    """Signing keys by id: public key for signatures, and whether the platform's Envelope proves
    the key is its own (checked once each)."""

    def __init__(self, settings: Settings, conn: psycopg.Connection, check: bool) -> None:
        self.settings, self.check = settings, check
        self.rows = {
            k: (bytes(p), bytes(w))
            for k, p, w in conn.execute(
                "SELECT key_id, public_key, wrapped_private FROM audit.signing_key"
            )
        }
        self.authentic: dict[str, str | None] = {}

    def problem(self, key_id: str) -> str | None:
        """None if ``key_id`` is a known, authentic key; else why not."""
        if key_id not in self.rows:
            return f"signing key {key_id} is not in audit.signing_key"
        if not self.check:
            return None
        if key_id not in self.authentic:
            public, wrapped = self.rows[key_id]
            try:
                _unwrap(self.settings, key_id, public, wrapped)
                self.authentic[key_id] = None
            except (PlatformError, ValueError) as exc:
                self.authentic[key_id] = (
                    f"signing key {key_id} is not the platform's (its wrapped private key does not "
                    f"open under the platform's key store for this public key: {exc})"
                )
        return self.authentic[key_id]

    def signature_ok(self, key_id: str, message: bytes, signature: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(self.rows[key_id][0]).verify(signature, message)
        except (InvalidSignature, ValueError):
            return False
        return True


def verify(
    settings: Settings, *, stream: str | None = None, check_keys: bool = True, lake: bool = False
) -> VerifyReport:
    """Prove each stream's chain intact: every hash recomputed, every link and seq in order, the
    start anchored (seq 1, or a signed retention checkpoint), every checkpoint's signature valid
    under an authentic platform key and matching the record it pins, nothing after the head
    missing. ``check_keys=False`` skips the key authenticity check (a verifier without the
    platform's key store: signatures are still checked against the stored public keys).
    ``lake=True`` also holds each stream to the lake's copy (on prod, an object-locked bucket an
    intruder with the database cannot touch): the last record exported must still be there with
    the hash the lake noted, which catches a tail cut together with its checkpoints."""
    import time

    started = time.perf_counter()
    with _connect(settings) as conn:
        names = [_check_stream(stream)] if stream else _streams(conn)
        keys = _Keys(settings, conn, check_keys)
        reports = [
            _verify_stream(conn, keys, name, _exported(settings, name) if lake else None)
            for name in names
        ]
    return VerifyReport(
        ok=all(r.problem is None for r in reports),
        records=sum(r.records for r in reports),
        checkpoints=sum(r.checkpoints for r in reports),
        seconds=round(time.perf_counter() - started, 3),
        streams=reports,
    )


CHAIN_SLICE = 200_000  # records a worker checks at least: below that, one query is quicker
_CHAIN_QUERY = (
    "SELECT seq, prev_seq, hash_ok FROM ("
    f" SELECT seq, prev_hash, hash = {SQL_HASH} AS hash_ok,"
    "  lag(seq) OVER w AS prev_seq, lag(hash) OVER w AS prev_stored"
    "  FROM audit.trail_record WHERE stream = %(stream)s AND seq <= %(hi)s AND seq >= coalesce("
    "   (SELECT max(seq) FROM audit.trail_record WHERE stream = %(stream)s AND seq < %(lo)s),"
    "   %(lo)s)"
    "  WINDOW w AS (ORDER BY seq)) r "
    "WHERE seq >= %(lo)s AND (NOT hash_ok OR (prev_seq IS NOT NULL"
    "  AND (seq <> prev_seq + 1 OR prev_hash <> prev_stored))) "
    "ORDER BY seq LIMIT 1"
)


def _chain_break(
    settings: Settings, conn: psycopg.Connection, stream: str, first_seq: int, last_seq: int
) -> tuple | None:
    """The first record (seq, prev_seq, hash_ok) whose hash, seq or link is wrong, or None. A
    long stream is checked in slices by parallel sessions (each slice starts from the record
    before it, so no link between slices goes unchecked): PostgreSQL runs one query on one core."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    workers = min(os.cpu_count() or 1, 8, max(1, (last_seq - first_seq + 1) // CHAIN_SLICE))
    if workers == 1:
        return conn.execute(
            _CHAIN_QUERY, {"stream": stream, "lo": first_seq, "hi": last_seq}
        ).fetchone()
    step = (last_seq - first_seq) // workers + 1
    slices = [(lo, min(lo + step - 1, last_seq)) for lo in range(first_seq, last_seq + 1, step)]

    def check(bounds: tuple[int, int]) -> tuple | None:
        with _connect(settings) as own:
            return own.execute(
                _CHAIN_QUERY, {"stream": stream, "lo": bounds[0], "hi": bounds[1]}
            ).fetchone()

    with ThreadPoolExecutor(len(slices)) as pool:
        found = [r for r in pool.map(check, slices) if r is not None]
    return min(found, key=lambda r: r[0]) if found else None


def _verify_stream(
    conn: psycopg.Connection, keys: _Keys, stream: str, exported: dict[str, Any] | None
) -> StreamReport:
    report = StreamReport(stream)
    problems: list[BadRecord] = []

    def bad(seq: int, why: str, detail: str) -> None:
        problems.append(BadRecord(stream, seq, why, detail))

    count, first_seq, last_seq = conn.execute(
        "SELECT count(*), min(seq), max(seq) FROM audit.trail_record WHERE stream = %s", (stream,)
    ).fetchone()
    report.records, report.first_seq, report.last_seq = count, first_seq, last_seq
    first_prev = None
    if first_seq is not None:
        (first_prev,) = conn.execute(
            "SELECT prev_hash FROM audit.trail_record WHERE stream = %s AND seq = %s",
            (stream, first_seq),
        ).fetchone()
        first_prev = bytes(first_prev)

    # Checkpoints: signature, key, then what they pin.
    checkpoints = conn.execute(
        "SELECT c.seq, c.hash, c.kind, c.signed_at, c.key_id, c.signature, r.hash "
        "FROM audit.trail_checkpoint c LEFT JOIN audit.trail_record r "
        "ON r.stream = c.stream AND r.seq = c.seq WHERE c.stream = %s ORDER BY c.seq, c.kind",
        (stream,),
    ).fetchall()
    valid = []
    for seq, hash_, kind, signed_at, key_id, signature, record_hash_ in checkpoints:
        hash_ = bytes(hash_)
        why_key = keys.problem(key_id)
        if why_key is not None:
            bad(seq, "wrong key", f"checkpoint at seq {seq} ({kind}): {why_key}")
            continue
        message = _checkpoint_message(stream, seq, hash_, kind, signed_at)
        if not keys.signature_ok(key_id, message, bytes(signature)):
            bad(seq, "bad signature", f"checkpoint at seq {seq} ({kind}) does not verify")
            continue
        valid.append((seq, hash_, kind, None if record_hash_ is None else bytes(record_hash_)))
    report.checkpoints = len(checkpoints)

    # The start: seq 1 after the zero hash, or the signed retention anchor just before it.
    (head_seq,) = conn.execute(
        "SELECT coalesce(max(seq), 0) FROM audit.trail_head WHERE stream = %s", (stream,)
    ).fetchone()
    start = first_seq if first_seq is not None else max([head_seq] + [c[0] for c in valid]) + 1
    anchor = 0
    if start > 1:
        anchors = [c for c in valid if c[2] == "retention" and c[0] == start - 1]
        if anchors and (first_prev is None or anchors[0][1] == first_prev):
            anchor = start - 1
        else:
            cuts = [c[0] for c in valid if c[2] == "retention" and c[0] < start - 1]
            first_missing = (max(cuts) if cuts else 0) + 1
            bad(
                first_missing,
                "deleted",
                f"records {first_missing}..{start - 1} are missing and no signed retention "
                "checkpoint accounts for them",
            )
    elif first_prev is not None and first_prev != ZERO_HASH:
        bad(1, "altered", "the first record does not start from the zero hash")
    report.anchored_at = anchor

    # The chain, in PostgreSQL: the first record whose hash, seq or link is wrong.
    if first_seq is not None:
        row = _chain_break(keys.settings, conn, stream, first_seq, last_seq)
        if row is not None:
            seq, prev_seq, hash_ok = row
            if prev_seq is not None and seq != prev_seq + 1:
                bad(prev_seq + 1, "deleted", f"records {prev_seq + 1}..{seq - 1} are missing")
            elif not hash_ok:
                why, detail = _classify(conn, stream, seq)
                bad(seq, why, detail)
            else:
                bad(
                    prev_seq,
                    "altered",
                    f"record {prev_seq}'s hash is not the one record {seq} was chained to",
                )

    # What the valid checkpoints pin: the records must still be there with the signed hash.
    last_good = anchor
    for seq, hash_, kind, record_hash_ in valid:
        if seq <= anchor:
            continue
        if record_hash_ is None:
            if last_seq is None or seq > last_seq:
                missing = (last_seq or anchor) + 1
                bad(
                    missing,
                    "truncated",
                    f"records {missing}..{seq} are gone; a signed {kind} checkpoint pins seq {seq}",
                )
                break
            continue  # a hole: the chain scan names it
        if record_hash_ != hash_:
            bad(
                last_good + 1,
                "altered",
                f"the chain was rewritten between seq {last_good + 1} and {seq}: the record at "
                f"seq {seq} no longer has the hash its signed {kind} checkpoint pins",
            )
            break
        last_good = seq
    if exported and exported["through_seq"] > anchor:
        seq, noted = exported["through_seq"], exported["hash"]
        row = conn.execute(
            "SELECT hash FROM audit.trail_record WHERE stream = %s AND seq = %s", (stream, seq)
        ).fetchone()
        if row is None and (last_seq is None or seq > last_seq):
            missing = (last_seq or anchor) + 1
            bad(missing, "truncated", f"records {missing}..{seq} are gone; the lake holds them")
        elif row is not None and bytes(row[0]).hex() != noted:
            bad(seq, "altered", f"record {seq} no longer has the hash the lake's copy noted")
    if head_seq > (last_seq or anchor) and not any(p.why == "truncated" for p in problems):
        missing = (last_seq or anchor) + 1
        bad(
            missing,
            "truncated",
            f"records {missing}..{head_seq} are gone (the head is at {head_seq})",
        )

    if problems:
        report.problem = min(problems, key=lambda p: (p.seq, WHY.index(p.why)))
    return report


REORDER_WINDOW = 1000  # how far from its place a moved record is looked for


def _classify(conn: psycopg.Connection, stream: str, seq: int) -> tuple[str, str]:
    """A record whose hash does not match its content: moved from another position (its content,
    unchanged, hashes right at another seq nearby, or at the seq after the record holding its
    prev_hash), or altered."""
    at, kind, source_key, payload, prev_hash, stored = conn.execute(
        "SELECT at, kind, source_key, payload, prev_hash, hash FROM audit.trail_record "
        "WHERE stream = %s AND seq = %s",
        (stream, seq),
    ).fetchone()
    prev_hash, stored = bytes(prev_hash), bytes(stored)
    candidates = list(range(max(1, seq - REORDER_WINDOW), seq + REORDER_WINDOW + 1))
    found = conn.execute(
        "SELECT seq FROM audit.trail_record WHERE stream = %s AND hash = %s LIMIT 1",
        (stream, prev_hash),
    ).fetchone()
    if found:
        candidates.insert(0, found[0] + 1)
    at_text = format_at(at)
    for written_as in candidates:
        if written_as != seq and (
            record_hash(prev_hash, stream, written_as, at_text, kind, source_key, payload) == stored
        ):
            return "reordered", f"record at seq {seq} was written as seq {written_as}"
    return "altered", f"record {seq}'s content no longer matches its hash"


def raise_incident(settings: Settings, report: VerifyReport) -> list | None:
    """A failed verify as an incident, through audit.incidents.raise_findings (issue 22, W5) and
    audit.detect.Finding; None when those modules are not there (or the report is ok)."""
    bad = report.first_bad
    if bad is None:
        return None
    try:
        from stripe_platform.audit.detect import Finding
        from stripe_platform.audit.incidents import raise_findings
    except ImportError:
        return None
    finding = Finding(
        rule="audit:trail_verify",
        severity="critical",
        title=f"audit trail {bad.stream} failed verification: {bad.why} at seq {bad.seq}",
        user=None,
        source=None,
        at=dt.datetime.now(dt.UTC),
        evidence=(f"trail:{bad.stream}:{bad.seq}",),
        dedup_key=f"audit:trail_verify:{bad.stream}:{bad.seq}:{bad.why}",
        detail=asdict(bad),
    )
    return raise_findings(settings, [finding])


# -- lake export -----------------------------------------------------------------------------------
@dataclass
class ExportResult:
    files: list[str] = field(default_factory=list)
    records: int = 0
    root: str = ""


def audit_lake_root(settings: Settings) -> str:
    """Where the trail's lake copy goes: under the lake root; on S3, the audit bucket beside the
    lake's (lake/object_lock.py: Object Lock is a whole-bucket setting, and the raw lake must stay
    erasable)."""
    from stripe_platform.lake.object_lock import audit_bucket_root

    return audit_bucket_root(settings)


def _lake_writer(settings: Settings):
    from stripe_platform.lake.writer import LakeWriter

    root = audit_lake_root(settings)
    base = LakeWriter.from_settings(settings.model_copy(update={"lake_uri": root}))
    return base


def export_lake(settings: Settings) -> ExportResult:
    """Copy every record not yet exported into the lake: parquet per stream per day, under
    ``<audit lake root>/audit/trail/stream=<s>/date=<YYYY-MM-DD>/<first>-<last>.parquet``. Files are
    written once (new records get new files, named by their seq range): an object-locked bucket
    never needs an overwrite. What was exported is remembered per stream in the lake itself
    (``_exported.json``): a crash between a write and that note exports those records again on the
    next run (a file may then repeat records of another: (stream, seq) is the key)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    writer = _lake_writer(settings)
    result = ExportResult(root=writer.uri(writer.base))
    with _connect(settings) as conn:
        for stream in _streams(conn):
            state_path = f"{writer.base}/{LAKE_DIR}/stream={stream}/_exported.json"
            state = json.loads(writer.get_bytes(state_path) or b'{"through_seq": 0}')
            done = state["through_seq"]
            with conn.transaction(), conn.cursor(name="audit_export") as cur:
                cur.itersize = 50_000
                cur.execute(
                    "SELECT seq, at, kind, source_key, payload, prev_hash, hash "
                    "FROM audit.trail_record WHERE stream = %s AND seq > %s ORDER BY seq",
                    (stream, done),
                )
                by_day: dict[dt.date, list[tuple]] = {}
                for row in cur:
                    by_day.setdefault(row[1].astimezone(dt.UTC).date(), []).append(row)
            if not by_day:
                continue
            for day, rows in sorted(by_day.items()):
                table = pa.table(
                    {
                        "stream": pa.array([stream] * len(rows), pa.string()),
                        "seq": pa.array([r[0] for r in rows], pa.int64()),
                        "at": pa.array([r[1] for r in rows], pa.timestamp("us", tz="UTC")),
                        "kind": pa.array([r[2] for r in rows], pa.string()),
                        "source_key": pa.array([r[3] for r in rows], pa.string()),
                        "payload": pa.array([r[4] for r in rows], pa.string()),
                        "prev_hash": pa.array([bytes(r[5]) for r in rows], pa.binary(32)),
                        "hash": pa.array([bytes(r[6]) for r in rows], pa.binary(32)),
                    }
                )
                path = (
                    f"{writer.base}/{LAKE_DIR}/stream={stream}/date={day.isoformat()}/"
                    f"{rows[0][0]:012d}-{rows[-1][0]:012d}.parquet"
                )
                buffer = pa.BufferOutputStream()
                pq.write_table(table, buffer, compression="zstd")
                writer.put_bytes(path, buffer.getvalue().to_pybytes())  # atomic, private
                result.files.append(writer.uri(path))
                result.records += len(rows)
            last = max((r for rows in by_day.values() for r in rows), key=lambda r: r[0])
            note = {"through_seq": last[0], "hash": bytes(last[6]).hex()}
            writer.put_bytes(state_path, json.dumps(note).encode())
    return result


def _exported(settings: Settings, stream: str) -> dict[str, Any]:
    """The lake's note of what of ``stream`` it holds: through_seq and that record's hash."""
    writer = _lake_writer(settings)
    state = writer.get_bytes(f"{writer.base}/{LAKE_DIR}/stream={stream}/_exported.json")
    return json.loads(state) if state else {"through_seq": 0, "hash": None}


def _exported_through(settings: Settings, stream: str) -> int:
    return _exported(settings, stream)["through_seq"]


def _remove_lake_days(settings: Settings, before: dt.date) -> list[str]:
    """Lake partitions of days before ``before`` (retention passed). On an object-locked bucket a
    delete only adds a delete marker; S3 removes the locked versions when their lock ends."""
    import pyarrow.fs as pafs

    writer = _lake_writer(settings)
    top = f"{writer.base}/{LAKE_DIR}"
    removed = []
    with writer.reaching(top, "read"):
        if writer.filesystem.get_file_info(top).type == pafs.FileType.NotFound:
            return removed
        for info in writer.filesystem.get_file_info(pafs.FileSelector(top, recursive=True)):
            if info.type != pafs.FileType.Directory or "/date=" not in info.path:
                continue
            day = dt.date.fromisoformat(info.path.rsplit("date=", 1)[1].split("/")[0])
            if day < before:
                writer.filesystem.delete_dir(info.path)
                removed.append(writer.uri(info.path))
    return removed


# -- retention -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RetentionCut:
    stream: str
    through_seq: int
    removed: int
    cutoff: dt.datetime


@dataclass
class RetentionResult:
    hot_cutoff: dt.datetime
    retention_cutoff: dt.datetime
    cuts: list[RetentionCut] = field(default_factory=list)
    exported: ExportResult = field(default_factory=ExportResult)
    lake_removed: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def apply_retention(settings: Settings, now: dt.datetime | None = None) -> RetentionResult:
    """The only path that removes audit records. First the lake copy is brought up to date; then
    each stream's prefix older than ``audit_hot_days`` (and already in the lake) leaves PostgreSQL:
    a signed 'retention' checkpoint anchors the new start, audit.remove_expired removes the prefix
    and records the cut, and a 'retention' record in the "audit" stream says what went (so verify
    still passes, and the removal is itself on the trail). Lake days older than
    ``audit_retention_days`` are removed last."""
    now = now or dt.datetime.now(dt.UTC)
    result = RetentionResult(
        hot_cutoff=now - dt.timedelta(days=settings.audit_hot_days),
        retention_cutoff=now - dt.timedelta(days=settings.audit_retention_days),
    )
    result.exported = export_lake(settings)
    records = []
    with _connect(settings) as conn:
        for stream in _streams(conn):
            exported = _exported_through(settings, stream)
            with conn.transaction():
                head = conn.execute(
                    "SELECT seq FROM audit.trail_head WHERE stream = %s FOR UPDATE", (stream,)
                ).fetchone()
                if head is None:
                    continue
                # The longest prefix entirely older than the cutoff (a late record stops it).
                (through,) = conn.execute(
                    "SELECT coalesce(min(seq) - 1, %s) FROM audit.trail_record "
                    "WHERE stream = %s AND at >= %s",
                    (head[0], stream, result.hot_cutoff),
                ).fetchone()
                through = min(through, exported)
                row = conn.execute(
                    "SELECT hash, (SELECT min(seq) FROM audit.trail_record WHERE stream = %s) "
                    "FROM audit.trail_record WHERE stream = %s AND seq = %s",
                    (stream, stream, through),
                ).fetchone()
                if row is None:
                    continue  # nothing (more) to remove
                _sign(settings, conn, stream, through, bytes(row[0]), "retention")
                (removed,) = conn.execute(
                    "SELECT audit.remove_expired(%s, %s, %s)",
                    (stream, through, result.hot_cutoff),
                ).fetchone()
            cut = RetentionCut(stream, through, removed, result.hot_cutoff)
            result.cuts.append(cut)
            records.append(
                (
                    f"retention:{stream}:{through}",
                    now,
                    "retention",
                    {
                        "stream": stream,
                        "through_seq": through,
                        "removed": removed,
                        "anchor_hash": bytes(row[0]).hex(),
                        "hot_cutoff": format_at(result.hot_cutoff),
                        "lake": result.exported.root,
                    },
                )
            )
    result.lake_removed = _remove_lake_days(settings, result.retention_cutoff.date())
    # The run itself, whatever it removed: the daily job leaves its trace on the trail.
    records.append(
        (
            f"retention:run:{format_at(now)}",
            now,
            "retention_run",
            {
                "cuts": [[c.stream, c.through_seq, c.removed] for c in result.cuts],
                "exported_records": result.exported.records,
                "lake_removed": result.lake_removed,
                "hot_cutoff": format_at(result.hot_cutoff),
                "retention_cutoff": format_at(result.retention_cutoff),
            },
        )
    )
    append(settings, RETENTION_STREAM, records)
    return result
