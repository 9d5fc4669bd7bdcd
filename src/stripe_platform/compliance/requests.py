"""Data-subject requests (issue 23 §1, docs/compliance.md): access, rectify, erase and opt-out,
recorded with their legal clock and executed across every store of compliance/stores.py.

A request is recorded (``submit``), then executed (``run``) step by step in the registry's order,
each step's outcome recorded as it ends. States::

    received -> running -> done
                        -> failed    a step failed: `run` again re-runs from that step
             -> refused              unknown subject, or the requester's identity not verified
             -> on_hold              an erasure of a subject under legal hold: nothing erased;
                                     `run` again once the hold is released

The request keeps the plan it was executed under (the steps and, per store, what the catalog made
it touch, with the catalog's digest), so a re-run later runs the same steps. Before the first
step of an erasure or rectification the subject's identifiers (e-mails, names, phones, IPs) are
gathered from the sources and kept in the request encrypted under the subject's own key: the
downstream steps find the subject's traces with them, and the erasure's last step (crypto-
shredding that key) makes this copy unreadable too. Nothing personal is stored in clear here.

An access request writes one JSON export (every item held, each with where it came from) under
``<home>/privacy/exports`` (directory 0700, file 0600): the export is the subject's personal data,
readable only by the platform's service account and handed to the subject through
``GET /v1/privacy/requests/{id}/export`` (scope privacy.requests, fresh MFA, access-logged).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, get_args

import psycopg
import psycopg.rows
from psycopg.types.json import Jsonb

from stripe_platform.config import Settings
from stripe_platform.errors import PlatformError
from stripe_platform.governance.classification import Catalog
from stripe_platform.oltp import db
from stripe_platform.security.envelope import shared_envelope
from stripe_platform.security.keys import KeyError_

from . import consent, stores

log = logging.getLogger(__name__)

Kind = Literal["access", "rectify", "erase", "opt_out"]
Law = Literal["gdpr", "ccpa"]
Source = Literal["cli", "api"]
State = Literal["received", "running", "done", "failed", "refused", "on_hold"]
KINDS: tuple[str, ...] = get_args(Kind)
LAWS: tuple[str, ...] = get_args(Law)
STATES: tuple[str, ...] = get_args(State)
OPEN_STATES = ("received", "running", "failed", "on_hold")
CONSENT_STEP = "consent"  # the one step of an opt-out: compliance/consent.py's opt_out


class RequestError(PlatformError, ValueError):
    """A request that cannot be recorded or run as asked; the message says why."""


class DuplicateRequest(RequestError):
    """An open request of the same kind exists for the subject: its id is ``existing``."""

    def __init__(self, message: str, existing: int) -> None:
        super().__init__(message)
        self.existing = existing


class UnknownRequest(PlatformError, LookupError):
    """No request with that id."""


@dataclass(frozen=True)
class StepState:
    store: str
    state: Literal["pending", "done", "failed"]
    detail: str = ""
    counts: dict[str, int] | None = None
    finished_at: dt.datetime | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "store": self.store,
            "state": self.state,
            "detail": self.detail,
            "counts": self.counts or {},
            "finished_at": None if self.finished_at is None else self.finished_at.isoformat(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StepState:
        finished = data.get("finished_at")
        return cls(
            data["store"],
            data["state"],
            data.get("detail", ""),
            data.get("counts") or {},
            None if finished is None else dt.datetime.fromisoformat(finished),
        )


@dataclass(frozen=True)
class PrivacyRequest:
    id: int
    kind: Kind
    customer_id: int
    law: Law
    state: State
    received_at: dt.datetime
    due_at: dt.datetime
    requested_by: str
    source: Source
    identity: str
    steps: list[StepState]
    export_path: str | None
    error: str | None
    plan: dict[str, Any] | None = None
    finished_at: dt.datetime | None = None

    def days_left(self, now: dt.datetime | None = None) -> float:
        now = now or dt.datetime.now(dt.UTC)
        return round((self.due_at - now).total_seconds() / 86_400, 1)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "customer_id": self.customer_id,
            "law": self.law,
            "state": self.state,
            "received_at": self.received_at.isoformat(),
            "due_at": self.due_at.isoformat(),
            "requested_by": self.requested_by,
            "source": self.source,
            "identity": self.identity,
            "steps": [s.to_json() for s in self.steps],
            "export_path": self.export_path,
            "error": self.error,
            "plan": self.plan,
            "finished_at": None if self.finished_at is None else self.finished_at.isoformat(),
        }


def legal_days(settings: Settings, law: Law) -> int:
    """The legal clock: GDPR Art. 12(3) one month, CCPA §1798.130 45 days (config.py)."""
    return settings.privacy_gdpr_days if law == "gdpr" else settings.privacy_ccpa_days


def _now(now: dt.datetime | None) -> dt.datetime:
    if now is None:
        return dt.datetime.now(dt.UTC)
    if now.tzinfo is None:
        raise RequestError(f"now={now.isoformat()} has no time zone (give UTC)")
    return now


def _connect(settings: Settings) -> psycopg.Connection:
    # Keyless: the privacy tables hold no column encrypted by the OLTP keys.
    return db.connect(settings, with_key=False, autocommit=True)


_COLUMNS = (
    "id, kind, customer_id, law, state, received_at, due_at, requested_by, source, identity, "
    "steps, export_path, error, plan, finished_at"
)


def _request(row: dict[str, Any]) -> PrivacyRequest:
    return PrivacyRequest(
        id=row["id"],
        kind=row["kind"],
        customer_id=row["customer_id"],
        law=row["law"],
        state=row["state"],
        received_at=row["received_at"],
        due_at=row["due_at"],
        requested_by=row["requested_by"],
        source=row["source"],
        identity=row["identity"],
        steps=[StepState.from_json(s) for s in row["steps"]],
        export_path=row["export_path"],
        error=row["error"],
        plan=row["plan"],
        finished_at=row["finished_at"],
    )


def get_request(settings: Settings, request_id: int) -> PrivacyRequest:
    with _connect(settings) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        row = cur.execute(
            f"SELECT {_COLUMNS} FROM privacy.request WHERE id = %s", (request_id,)
        ).fetchone()
    if row is None:
        raise UnknownRequest(f"no privacy request {request_id} (see `privacy requests`)")
    return _request(row)


def list_requests(
    settings: Settings, *, state: str | None = None, customer_id: int | None = None
) -> list[PrivacyRequest]:
    if state is not None and state not in STATES:
        raise RequestError(f"state {state!r}: expected one of {', '.join(STATES)}")
    with _connect(settings) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        rows = cur.execute(
            f"SELECT {_COLUMNS} FROM privacy.request WHERE (%(state)s::text IS NULL OR state = "
            "%(state)s) AND (%(customer)s::bigint IS NULL OR customer_id = %(customer)s) "
            "ORDER BY id",
            {"state": state, "customer": customer_id},
        ).fetchall()
    return [_request(r) for r in rows]


def summary(settings: Settings, now: dt.datetime | None = None) -> dict[str, Any]:
    """For the compliance dashboard: requests by state, how many open ones are past their legal
    deadline, and the open ones with their deadline (soonest first)."""
    now = _now(now)
    with _connect(settings) as conn:
        by_state = dict(
            conn.execute("SELECT state, count(*) FROM privacy.request GROUP BY state").fetchall()
        )
        rows = conn.execute(
            "SELECT id, kind, law, customer_id, due_at FROM privacy.request "
            "WHERE state = ANY(%s) ORDER BY due_at, id",
            (list(OPEN_STATES),),
        ).fetchall()
    return {
        "by_state": {s: by_state.get(s, 0) for s in STATES},
        "overdue": sum(1 for r in rows if r[4] < now),
        "open": [
            {
                "id": r[0],
                "kind": r[1],
                "law": r[2],
                "customer_id": r[3],
                "due_at": r[4].isoformat(),
                "days_left": round((r[4] - now).total_seconds() / 86_400, 1),
            }
            for r in rows
        ],
    }


# -- legal holds ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class LegalHold:
    customer_id: int
    reason: str
    placed_by: str
    placed_at: dt.datetime


def active_hold(settings: Settings, customer_id: int) -> LegalHold | None:
    with _connect(settings) as conn:
        row = conn.execute(
            "SELECT customer_id, reason, placed_by, placed_at FROM privacy.legal_hold "
            "WHERE customer_id = %s AND released_at IS NULL",
            (customer_id,),
        ).fetchone()
    return None if row is None else LegalHold(*row)


def hold(settings: Settings, customer_id: int, *, reason: str, by: str) -> LegalHold:
    """Place a legal hold: erasures of this subject end on_hold until it is released."""
    if not reason.strip():
        raise RequestError("a legal hold needs a reason (the case, the authority)")
    with _connect(settings) as conn:
        try:
            row = conn.execute(
                "INSERT INTO privacy.legal_hold (customer_id, reason, placed_by) "
                "VALUES (%s, %s, %s) RETURNING customer_id, reason, placed_by, placed_at",
                (customer_id, reason.strip(), by),
            ).fetchone()
        except psycopg.errors.UniqueViolation:
            current = active_hold(settings, customer_id)
            raise RequestError(
                f"customer {customer_id} is already under legal hold ({current.reason!r}, placed "
                f"by {current.placed_by} at {current.placed_at:%Y-%m-%d %H:%M} UTC)"
                if current
                else f"customer {customer_id} is already under legal hold"
            ) from None
    return LegalHold(*row)


def release(settings: Settings, customer_id: int, *, by: str) -> LegalHold:
    """Release the subject's active hold (an on_hold erasure runs with `privacy request run`)."""
    with _connect(settings) as conn:
        row = conn.execute(
            "UPDATE privacy.legal_hold SET released_at = clock_timestamp(), released_by = %s "
            "WHERE customer_id = %s AND released_at IS NULL "
            "RETURNING customer_id, reason, placed_by, placed_at",
            (by, customer_id),
        ).fetchone()
    if row is None:
        raise RequestError(f"customer {customer_id} is under no legal hold")
    return LegalHold(*row)


def _erased(settings: Settings, customer_id: int) -> tuple[int, str] | None:
    """(the request, when) that erased the subject, if one did: nothing is left to erase or
    correct (their key is shredded); an access request still answers what is kept."""
    with _connect(settings) as conn:
        return conn.execute(
            "SELECT e.request_id, r.state FROM privacy.erased_subject e "
            "JOIN privacy.request r ON r.id = e.request_id WHERE e.customer_id = %s",
            (customer_id,),
        ).fetchone()


# -- submit ---------------------------------------------------------------------------------------
def _subject_keys(settings: Settings):
    return shared_envelope(settings).subject_keys()


def _seal(settings: Settings, customer_id: int, request_id: int, data: dict) -> bytes:
    """JSON encrypted under the subject's own key, bound to the request."""
    return _subject_keys(settings).encrypt(
        customer_id, json.dumps(data).encode(), aad=f"privacy.request:{request_id}".encode()
    )


def _open(settings: Settings, request_id: int, ciphertext: bytes) -> dict:
    return json.loads(
        _subject_keys(settings).decrypt(
            bytes(ciphertext),
            aad=f"privacy.request:{request_id}".encode(),
            obj=f"privacy.request {request_id}",
        )
    )


def submit(
    settings: Settings,
    kind: Kind,
    customer_id: int,
    *,
    law: Law = "gdpr",
    requested_by: str,
    source: Source,
    identity: str,
    changes: dict[str, Any] | None = None,
    now: dt.datetime | None = None,
) -> PrivacyRequest:
    """Record a request with its legal deadline. A subject the sources do not know, or a
    requester whose identity was not verified, gives a `refused` request saying why (recorded:
    the refusal is an answer with a clock too). An open request of the same kind for the subject
    raises DuplicateRequest naming it."""
    now = _now(now)
    if kind not in KINDS:
        raise RequestError(f"kind {kind!r}: expected one of {', '.join(KINDS)}")
    if law not in LAWS:
        raise RequestError(f"law {law!r}: expected one of {', '.join(LAWS)}")
    if source not in get_args(Source):
        raise RequestError(f"source {source!r}: expected cli or api")
    if not requested_by.strip():
        raise RequestError("requested_by: who asked (the operator or the API principal)")
    if (kind == "rectify") != bool(changes):
        raise RequestError(
            "a rectification needs the corrections (--set field=value)"
            if kind == "rectify"
            else f"an {kind} request takes no corrections"
        )
    catalog = stores.catalog()
    for name in changes or {}:
        try:
            stores.POSTGRES.parse_change(catalog, name)
        except stores.StoreError as exc:  # names what may be corrected
            raise RequestError(str(exc)) from None
    refusal = None
    if not identity.strip():
        refusal = "the requester's identity was not verified"
    elif not stores.POSTGRES.exists(settings, catalog, customer_id):
        refusal = f"unknown subject: no customer {customer_id} in PostgreSQL"
    elif kind in ("erase", "rectify") and (erased := _erased(settings, customer_id)):
        refusal = (
            f"customer {customer_id} is erased at the source by request {erased[0]} "
            f"({erased[1]}): `privacy request show {erased[0]}`"
        )
    due = now + dt.timedelta(days=legal_days(settings, law))
    with _connect(settings) as conn:
        try:
            with conn.transaction():
                (request_id,) = conn.execute(
                    "INSERT INTO privacy.request (kind, customer_id, law, state, received_at, "
                    "due_at, requested_by, source, identity, error, finished_at) "
                    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
                    (
                        kind,
                        customer_id,
                        law,
                        "refused" if refusal else "received",
                        now,
                        due,
                        requested_by,
                        source,
                        identity,
                        refusal,
                        now if refusal else None,
                    ),
                ).fetchone()
                if changes and not refusal:
                    conn.execute(
                        "UPDATE privacy.request SET changes = %s WHERE id = %s",
                        (_seal(settings, customer_id, request_id, changes), request_id),
                    )
        except psycopg.errors.UniqueViolation:
            existing = conn.execute(
                "SELECT id, state FROM privacy.request WHERE customer_id = %s AND kind = %s "
                "AND state = ANY(%s)",
                (customer_id, kind, list(OPEN_STATES)),
            ).fetchone()
            raise DuplicateRequest(
                f"customer {customer_id} already has an open {kind} request: {existing[0]} "
                f"({existing[1]}); run it with `privacy request run {existing[0]}`",
                existing[0],
            ) from None
    return get_request(settings, request_id)


# -- run ------------------------------------------------------------------------------------------
def _steps_for(kind: str) -> list[str]:
    if kind == "opt_out":
        return [CONSENT_STEP]
    return [s.name for s in stores.registered()]


def _plan(kind: str, catalog: Catalog) -> dict[str, Any]:
    names = _steps_for(kind)
    if kind == "opt_out":
        return {"steps": names, "catalog_digest": stores.catalog_digest(catalog), "stores": {}}
    registered = {s.name: s for s in stores.registered()}
    return {
        "steps": names,
        "catalog_digest": stores.catalog_digest(catalog),
        "stores": {n: registered[n].plan(catalog) for n in names},
        "not_registered": [n for n in stores.ORDER if n not in registered],
    }


def _update(conn: psycopg.Connection, request_id: int, **values: Any) -> None:
    sets = ", ".join(f"{k} = %({k})s" for k in values)
    conn.execute(
        f"UPDATE privacy.request SET {sets}, updated_at = clock_timestamp() WHERE id = %(id)s",
        {
            **{k: Jsonb(v) if k in ("plan", "steps") else v for k, v in values.items()},
            "id": request_id,
        },
    )


def _gather(ctx: stores.SubjectContext) -> stores.Identifiers:
    """Every store's identifiers of the subject, each store seeing what the earlier ones found
    (the documents find the Transaction copies by the e-mails PostgreSQL gave)."""
    found = stores.Identifiers()
    for store in stores.registered():
        found = found.merged(store.identifiers(replace(ctx, identifiers=found)))
    return found


def _identifiers(
    settings: Settings, request: PrivacyRequest, ctx: stores.SubjectContext, conn
) -> stores.Identifiers:
    """The subject's identifiers: gathered from every store once (before any step changes
    anything) and kept encrypted under the subject's key; later runs read that copy."""
    (sealed,) = conn.execute(
        "SELECT identifiers FROM privacy.request WHERE id = %s", (request.id,)
    ).fetchone()
    if sealed is not None:
        try:
            return stores.Identifiers.from_json(_open(settings, request.id, sealed))
        except KeyError_ as exc:  # shredded: only the keys step (last) does it
            raise stores.StoreError(
                f"privacy request {request.id}: the subject's identifiers are unreadable "
                f"({exc}): the subject's key is shredded, nothing is left to find"
            ) from None
    found = _gather(ctx)
    _update(
        conn,
        request.id,
        identifiers=_seal(settings, request.customer_id, request.id, found.to_json()),
    )
    return found


def export_dir(settings: Settings) -> Path:
    return settings.home_dir / "privacy" / "exports"


def _write_export(settings: Settings, request: PrivacyRequest, items, now) -> Path:
    directory = export_dir(settings)
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    path = directory / f"request-{request.id}-customer-{request.customer_id}.json"
    document = {
        "request": {
            "id": request.id,
            "kind": request.kind,
            "law": request.law,
            "received_at": request.received_at.isoformat(),
            "generated_at": now.isoformat(),
        },
        "subject": {"customer_id": request.customer_id},
        "stores": {},
        "items": [],
    }
    for item in items:
        document["stores"][item.store] = document["stores"].get(item.store, 0) + 1
        document["items"].append(
            {
                "store": item.store,
                "dataset": item.dataset,
                "key": item.key,
                "where": item.where,
                "fields": item.fields,
            }
        )
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(document, out, indent=1, ensure_ascii=False, default=str)
    tmp.replace(path)
    return path


def _remove_exports(settings: Settings, customer_id: int) -> int:
    """An erased subject's earlier access exports are their personal data in clear, held by the
    platform: they go with the rest (idempotent: none left, none removed)."""
    removed = 0
    for path in export_dir(settings).glob(f"request-*-customer-{customer_id}.json"):
        path.unlink(missing_ok=True)
        removed += 1
    if removed:
        log.info("privacy: %d earlier export(s) of customer %s removed", removed, customer_id)
    return removed


def read_export(settings: Settings, request_id: int) -> dict[str, Any]:
    """The JSON export of a done access request."""
    request = get_request(settings, request_id)
    if request.kind != "access":
        raise RequestError(f"privacy request {request_id} is a {request.kind} request: no export")
    if request.state != "done" or request.export_path is None:
        raise RequestError(
            f"privacy request {request_id} is {request.state}: its export is written when it is "
            "done (`privacy request run`)"
        )
    path = Path(request.export_path)
    if not path.exists():
        raise RequestError(f"privacy request {request_id}: its export {path} is gone")
    return json.loads(path.read_text())


def _consent_opt_out(settings: Settings, request: PrivacyRequest, now: dt.datetime) -> dict:
    # The consent registry's own opt-out (compliance/consent.py), its source naming the request.
    consent.opt_out(
        settings, request.customer_id, source="request", by=request.requested_by, at=now
    )
    return {"opted_out": 1}


def run(settings: Settings, request_id: int, *, now: dt.datetime | None = None) -> PrivacyRequest:
    """Execute the request's steps not yet done, in order, recording each as it ends. Idempotent:
    a done or refused request is returned as it is; a failed one re-runs from its failed step
    (under the plan it was first run with); an erasure of a subject under legal hold ends
    `on_hold` having changed nothing."""
    now = _now(now)
    with _connect(settings) as conn:
        # One runner a request: a second `run` meanwhile is refused, not interleaved.
        (locked,) = conn.execute(
            "SELECT pg_try_advisory_lock(hashtext('privacy.request'), %s::int)", (request_id,)
        ).fetchone()
        if not locked:
            raise RequestError(f"privacy request {request_id} is being run by another process")
        try:
            return _run(settings, conn, get_request(settings, request_id), now)
        finally:
            conn.execute(
                "SELECT pg_advisory_unlock(hashtext('privacy.request'), %s::int)", (request_id,)
            )


def _run(
    settings: Settings, conn: psycopg.Connection, request: PrivacyRequest, now: dt.datetime
) -> PrivacyRequest:
    if request.state in ("done", "refused"):
        return request
    if request.kind == "erase":
        held = active_hold(settings, request.customer_id)
        if held is not None:
            _update(
                conn,
                request.id,
                state="on_hold",
                error=f"legal hold since {held.placed_at:%Y-%m-%d %H:%M} UTC by {held.placed_by}: "
                f"{held.reason}; nothing erased (release it, then `privacy request run "
                f"{request.id}`)",
            )
            return get_request(settings, request.id)
    catalog = stores.catalog()
    plan = request.plan or _plan(request.kind, catalog)
    previous = {s.store: s for s in request.steps}
    steps = [previous.get(n, StepState(n, "pending")) for n in plan["steps"]]
    _update(
        conn, request.id, state="running", error=None, plan=plan, steps=[s.to_json() for s in steps]
    )
    return _execute(settings, conn, request, plan, steps, catalog, now)


def _execute(
    settings: Settings,
    conn: psycopg.Connection,
    request: PrivacyRequest,
    plan: dict[str, Any],
    steps: list[StepState],
    catalog: Catalog,
    now: dt.datetime,
) -> PrivacyRequest:
    registered = {s.name: s for s in stores.registered()}
    missing = [n for n in plan["steps"] if n != CONSENT_STEP and n not in registered]
    if missing:
        error = (
            f"the plan's step(s) {', '.join(missing)} are not registered in this installation "
            "(compliance/stores.py registry)"
        )
        _update(conn, request.id, state="failed", error=error)
        return get_request(settings, request.id)
    ctx = stores.SubjectContext(
        settings=settings,
        customer_id=request.customer_id,
        request_id=request.id,
        identifiers=stores.Identifiers(),
        catalog=catalog,
        now=now,
    )
    changes: dict[str, Any] = {}
    items: list[stores.HeldItem] = []
    for i, step in enumerate(steps):
        # An access request reads everything again (the export is written whole); the others
        # skip what is done.
        if step.state == "done" and request.kind != "access":
            continue
        try:
            if request.kind in ("erase", "rectify") and not ctx.identifiers.values():
                ctx = replace(ctx, identifiers=_identifiers(settings, request, ctx, conn))
            if request.kind == "rectify" and not changes:
                (sealed,) = conn.execute(
                    "SELECT changes FROM privacy.request WHERE id = %s", (request.id,)
                ).fetchone()
                changes = _open(settings, request.id, sealed)
            if request.kind == "opt_out":
                counts, detail = _consent_opt_out(settings, request, now), "do-not-sell recorded"
            elif request.kind == "access":
                if not ctx.identifiers.values():  # read fresh: an export changes nothing
                    ctx = replace(ctx, identifiers=_gather(ctx))
                held = registered[step.store].access(ctx)
                items += held
                counts, detail = {"items": len(held)}, "read"
            else:
                store = registered[step.store]
                outcome = (
                    store.erase(ctx) if request.kind == "erase" else store.rectify(ctx, changes)
                )
                counts, detail = outcome.counts, outcome.detail
        except Exception as exc:  # recorded, named, re-runnable: the request says what failed
            if not isinstance(exc, PlatformError | psycopg.Error | OSError):
                log.exception("privacy request %s: step %s failed", request.id, step.store)
            steps[i] = StepState(step.store, "failed", f"{type(exc).__name__}: {exc}", None, now)
            _update(
                conn,
                request.id,
                state="failed",
                steps=[s.to_json() for s in steps],
                error=f"step {step.store} failed: {exc}; the steps before it are done; "
                f"`privacy request run {request.id}` re-runs from it",
            )
            return get_request(settings, request.id)
        steps[i] = StepState(step.store, "done", detail, counts, dt.datetime.now(dt.UTC))
        _update(conn, request.id, steps=[s.to_json() for s in steps])
    export = None
    if request.kind == "erase":
        _remove_exports(settings, request.customer_id)
    if request.kind == "access":
        try:
            export = str(_write_export(settings, request, items, now))
        except OSError as exc:
            _update(
                conn,
                request.id,
                state="failed",
                error=f"the export could not be written under {export_dir(settings)}: {exc}; "
                f"`privacy request run {request.id}` reads and writes it again",
            )
            return get_request(settings, request.id)
    _update(
        conn,
        request.id,
        state="done",
        error=None,
        export_path=export,
        finished_at=dt.datetime.now(dt.UTC),
    )
    return get_request(settings, request.id)
