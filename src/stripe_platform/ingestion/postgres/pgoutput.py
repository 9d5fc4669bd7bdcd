"""Decoder for PostgreSQL's logical replication messages as written by the ``pgoutput`` plugin,
protocol version 1 (PostgreSQL docs, "Logical Replication Message Formats").

Pure and stdlib-only on purpose: the CDC reader (``cdc.py``) feeds it the bytes that
``pg_logical_slot_peek_binary_changes`` returns, and tests can feed it hand-made bytes. Column
values stay as the server's text output (``str``), ``None`` for SQL NULL, or :data:`UNCHANGED`
for a TOASTed value an UPDATE did not touch (the server does not resend it);
:func:`convert_value` turns text into Python values by type OID when the caller wants them; a
value it cannot take (a BC date) stays text, so that no value stops decoding.
"""

from __future__ import annotations

import codecs
import datetime as dt
import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Final, Literal, NamedTuple

__all__ = [
    "PG_EPOCH",
    "UNCHANGED",
    "Begin",
    "Column",
    "Commit",
    "DecodeError",
    "Decoder",
    "Delete",
    "Insert",
    "LogicalMessage",
    "Message",
    "Origin",
    "Relation",
    "RowChange",
    "Truncate",
    "Type",
    "Unchanged",
    "Update",
    "convert_value",
    "format_lsn",
    "parse_lsn",
    "parse_message",
    "pg_timestamp",
]

PG_EPOCH: Final = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)

_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_U64 = struct.Struct("!Q")
_BEGIN = struct.Struct("!QqI")  # final LSN, commit timestamp, xid
_COMMIT = struct.Struct("!BQQq")  # flags, commit LSN, end LSN, commit timestamp
_COLUMN_TAIL = struct.Struct("!Ii")  # type OID, type modifier
_TRUNCATE = struct.Struct("!iB")  # number of relations, option bits


class DecodeError(ValueError):
    """The bytes are not a pgoutput protocol-1 message this decoder understands."""


class Unchanged:
    """Marker for an unchanged TOASTed column (tuple kind 'u'): keep the value you already have."""

    _instance: Unchanged | None = None

    def __new__(cls) -> Unchanged:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNCHANGED"

    def __reduce__(self) -> str:
        return "UNCHANGED"


UNCHANGED: Final = Unchanged()

Value = str | bytes | None | Unchanged
"""One column as sent: text, raw bytes (only with the 'binary' option), NULL or unchanged."""


# -- messages ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Begin:
    final_lsn: int
    """LSN of the transaction's commit record."""
    commit_time: dt.datetime
    xid: int


@dataclass(frozen=True, slots=True)
class Commit:
    flags: int
    commit_lsn: int
    """LSN of the commit record (same as Begin.final_lsn)."""
    end_lsn: int
    """LSN just past the commit record: the position to confirm once the transaction is stored."""
    commit_time: dt.datetime


@dataclass(frozen=True, slots=True)
class Origin:
    commit_lsn: int
    """LSN of the commit on the origin server."""
    name: str


@dataclass(frozen=True, slots=True)
class Column:
    flags: int
    name: str
    type_oid: int
    type_modifier: int

    @property
    def is_key(self) -> bool:
        """Part of the relation's replica identity (flag bit 1)."""
        return bool(self.flags & 1)


@dataclass(frozen=True, slots=True)
class Relation:
    oid: int
    namespace: str
    """Schema name; the protocol sends '' for pg_catalog, which is translated back."""
    name: str
    replica_identity: str
    """'d' default (primary key), 'n' nothing, 'f' full, 'i' index."""
    columns: tuple[Column, ...]
    column_names: tuple[str, ...] = field(init=False, repr=False, compare=False)
    key_columns: tuple[str, ...] = field(init=False, repr=False, compare=False)
    """Replica-identity columns (the primary key by default)."""

    def __post_init__(self) -> None:
        # Derived once: the hot path reads these for every change.
        object.__setattr__(self, "column_names", tuple(c.name for c in self.columns))
        object.__setattr__(self, "key_columns", tuple(c.name for c in self.columns if c.is_key))


@dataclass(frozen=True, slots=True)
class Type:
    oid: int
    namespace: str
    name: str


@dataclass(frozen=True, slots=True)
class Insert:
    relation_oid: int
    new: tuple[Value, ...]


@dataclass(frozen=True, slots=True)
class Update:
    relation_oid: int
    new: tuple[Value, ...]
    old: tuple[Value, ...] | None
    """Old key ('K', only when the key changed or identity is an index) or old row ('O', FULL)."""
    old_kind: Literal["K", "O"] | None


@dataclass(frozen=True, slots=True)
class Delete:
    relation_oid: int
    old: tuple[Value, ...]
    old_kind: Literal["K", "O"]
    """'K': only key columns are set (others are None); 'O': the whole old row (FULL)."""


@dataclass(frozen=True, slots=True)
class Truncate:
    relation_oids: tuple[int, ...]
    cascade: bool
    restart_identity: bool


@dataclass(frozen=True, slots=True)
class LogicalMessage:
    """pg_logical_emit_message() output; only sent when the 'messages' option is on."""

    transactional: bool
    lsn: int
    prefix: str
    content: bytes


Message = (
    Begin | Commit | Origin | Relation | Type | Insert | Update | Delete | Truncate | LogicalMessage
)


# -- parsing -------------------------------------------------------------------------------------
def _cstring(buf: bytes, pos: int, encoding: str) -> tuple[str, int]:
    end = buf.find(b"\x00", pos)
    if end < 0:
        raise DecodeError("unterminated string")
    return buf[pos:end].decode(encoding), end + 1


def _tuple(buf: bytes, pos: int, encoding: str) -> tuple[tuple[Value, ...], int]:
    (count,) = _I16.unpack_from(buf, pos)
    pos += 2
    values: list[Value] = []
    append = values.append
    unpack_len = _I32.unpack_from
    for _ in range(count):
        kind = buf[pos]
        pos += 1
        if kind == 0x74:  # 't' text
            (length,) = unpack_len(buf, pos)
            pos += 4
            append(buf[pos : pos + length].decode(encoding))
            pos += length
        elif kind == 0x6E:  # 'n' null
            append(None)
        elif kind == 0x75:  # 'u' unchanged TOAST
            append(UNCHANGED)
        elif kind == 0x62:  # 'b' binary (only with the 'binary' option)
            (length,) = unpack_len(buf, pos)
            pos += 4
            append(bytes(buf[pos : pos + length]))
            pos += length
        else:
            raise DecodeError(f"unknown tuple column kind {chr(kind)!r}")
    return tuple(values), pos


def pg_timestamp(microseconds: int) -> dt.datetime:
    """Protocol timestamps are microseconds since 2000-01-01 UTC."""
    return PG_EPOCH + dt.timedelta(microseconds=microseconds)


def parse_message(data: bytes | bytearray | memoryview, encoding: str = "utf-8") -> Message:
    """Decode one pgoutput message (the ``data`` column of one peeked row)."""
    buf = bytes(data)
    if not buf:
        raise DecodeError("empty message")
    kind = buf[0]
    try:
        if kind == 0x49:  # 'I'
            (oid,) = _U32.unpack_from(buf, 1)
            if buf[5] != 0x4E:
                raise DecodeError("Insert without a new tuple ('N')")
            new, _ = _tuple(buf, 6, encoding)
            return Insert(oid, new)
        if kind == 0x55:  # 'U'
            (oid,) = _U32.unpack_from(buf, 1)
            pos = 5
            old: tuple[Value, ...] | None = None
            old_kind: Literal["K", "O"] | None = None
            if buf[pos] in (0x4B, 0x4F):
                old_kind = "K" if buf[pos] == 0x4B else "O"
                old, pos = _tuple(buf, pos + 1, encoding)
            if buf[pos] != 0x4E:
                raise DecodeError("Update without a new tuple ('N')")
            new, _ = _tuple(buf, pos + 1, encoding)
            return Update(oid, new, old, old_kind)
        if kind == 0x44:  # 'D'
            (oid,) = _U32.unpack_from(buf, 1)
            if buf[5] not in (0x4B, 0x4F):
                raise DecodeError("Delete without an old key ('K') or old tuple ('O')")
            old, _ = _tuple(buf, 6, encoding)
            return Delete(oid, old, "K" if buf[5] == 0x4B else "O")
        if kind == 0x42:  # 'B'
            final_lsn, ts, xid = _BEGIN.unpack_from(buf, 1)
            return Begin(final_lsn, pg_timestamp(ts), xid)
        if kind == 0x43:  # 'C'
            flags, commit_lsn, end_lsn, ts = _COMMIT.unpack_from(buf, 1)
            return Commit(flags, commit_lsn, end_lsn, pg_timestamp(ts))
        if kind == 0x52:  # 'R'
            (oid,) = _U32.unpack_from(buf, 1)
            namespace, pos = _cstring(buf, 5, encoding)
            name, pos = _cstring(buf, pos, encoding)
            identity = chr(buf[pos])
            (ncols,) = _I16.unpack_from(buf, pos + 1)
            pos += 3
            columns = []
            for _ in range(ncols):
                flags = buf[pos]
                colname, pos = _cstring(buf, pos + 1, encoding)
                type_oid, typmod = _COLUMN_TAIL.unpack_from(buf, pos)
                pos += 8
                columns.append(Column(flags, colname, type_oid, typmod))
            return Relation(oid, namespace or "pg_catalog", name, identity, tuple(columns))
        if kind == 0x59:  # 'Y'
            (oid,) = _U32.unpack_from(buf, 1)
            namespace, pos = _cstring(buf, 5, encoding)
            name, _ = _cstring(buf, pos, encoding)
            return Type(oid, namespace or "pg_catalog", name)
        if kind == 0x4F:  # 'O'
            (lsn,) = _U64.unpack_from(buf, 1)
            name, _ = _cstring(buf, 9, encoding)
            return Origin(lsn, name)
        if kind == 0x54:  # 'T'
            count, options = _TRUNCATE.unpack_from(buf, 1)
            oids = struct.unpack_from(f"!{count}I", buf, 6)
            return Truncate(tuple(oids), bool(options & 1), bool(options & 2))
        if kind == 0x4D:  # 'M'
            flags, lsn = buf[1], _U64.unpack_from(buf, 2)[0]
            prefix, pos = _cstring(buf, 10, encoding)
            (length,) = _I32.unpack_from(buf, pos)
            return LogicalMessage(bool(flags & 1), lsn, prefix, buf[pos + 4 : pos + 4 + length])
    except (struct.error, IndexError, UnicodeDecodeError) as exc:
        raise DecodeError(f"truncated or malformed {chr(kind)!r} message: {exc}") from exc
    raise DecodeError(f"unsupported pgoutput message type {chr(kind)!r} (protocol version 1)")


class RowChange(NamedTuple):
    """An Insert/Update/Delete resolved against its relation, with rows as dicts.

    A NamedTuple rather than a frozen dataclass: it is built once per change on the hot path,
    where a frozen dataclass costs several times more to construct.
    """

    op: Literal["insert", "update", "delete"]
    relation: Relation
    row: dict[str, Any]
    """insert/update: the new row; delete: the old key ('K': key columns only) or old row."""
    old: dict[str, Any] | None
    """update only: the old key ('K') or old row ('O') when the server sent one."""


_Plan = tuple[Relation, tuple[str, ...], tuple[Callable[[str], Any] | None, ...], tuple[bool, ...]]
_DML_OPS: Final = {0x49: "insert", 0x55: "update", 0x44: "delete"}


class Decoder:
    """Stateful wrapper around :func:`parse_message` that keeps the relation and type caches.

    pgoutput sends a Relation message before the first change of a relation in a decoding
    session (and again after its definition changes), so the cache must live at least as long
    as one decoding session; changes refer to relations only by OID.
    """

    def __init__(self, encoding: str = "utf-8") -> None:
        self.encoding = encoding
        # Values are sliced from the message decoded as latin-1 (one decode per message, byte
        # offsets preserved); an ASCII slice is then already right for ASCII-compatible encodings.
        self._ascii_fast = codecs.lookup(encoding).name in ("utf-8", "ascii", "iso8859-1")
        self.relations: dict[int, Relation] = {}
        self.types: dict[int, Type] = {}
        self._plans: dict[tuple[int, bool], _Plan] = {}

    def decode(self, data: bytes | bytearray | memoryview) -> Message:
        message = parse_message(data, self.encoding)
        if isinstance(message, Relation):
            self.relations[message.oid] = message
            self._plans.pop((message.oid, True), None)
            self._plans.pop((message.oid, False), None)
        elif isinstance(message, Type):
            self.types[message.oid] = message
        return message

    def decode_change(
        self, data: bytes | bytearray | memoryview, *, convert: bool = True
    ) -> RowChange | Message:
        """Like :meth:`decode`, but Insert/Update/Delete come back as a :class:`RowChange`
        with named (and, with ``convert``, typed) values, in a single pass over the bytes."""
        buf = bytes(data)
        op = _DML_OPS.get(buf[0]) if buf else None
        if op is None:
            return self.decode(buf)
        text = buf.decode("latin-1") if self._ascii_fast else None
        try:
            (oid,) = _U32.unpack_from(buf, 1)
            plan = self._plan(oid, convert)
            kind = buf[5]
            if op == "insert":
                if kind != 0x4E:
                    raise DecodeError("Insert without a new tuple ('N')")
                row, _ = self._row(buf, text, 6, plan, key_only=False)
                return RowChange("insert", plan[0], row, None)
            if op == "delete":
                if kind not in (0x4B, 0x4F):
                    raise DecodeError("Delete without an old key ('K') or old tuple ('O')")
                row, _ = self._row(buf, text, 6, plan, key_only=kind == 0x4B)
                return RowChange("delete", plan[0], row, None)
            pos = 5
            old = None
            if kind in (0x4B, 0x4F):
                old, pos = self._row(buf, text, 6, plan, key_only=kind == 0x4B)
            if buf[pos] != 0x4E:
                raise DecodeError("Update without a new tuple ('N')")
            row, _ = self._row(buf, text, pos + 1, plan, key_only=False)
            return RowChange("update", plan[0], row, old)
        except DecodeError:
            raise
        except (struct.error, IndexError, UnicodeDecodeError) as exc:
            raise DecodeError(f"truncated or malformed {chr(buf[0])!r} message: {exc}") from exc

    def relation(self, oid: int) -> Relation:
        try:
            return self.relations[oid]
        except KeyError:
            raise DecodeError(
                f"change for relation OID {oid} before its Relation message: decoding must "
                "start at the beginning of a decoding session"
            ) from None

    def _plan(self, oid: int, convert: bool) -> _Plan:
        plan = self._plans.get((oid, convert))
        if plan is None:
            relation = self.relation(oid)
            columns = relation.columns
            converters = tuple(_CONVERTERS.get(c.type_oid) if convert else None for c in columns)
            plan = (relation, relation.column_names, converters, tuple(c.is_key for c in columns))
            self._plans[(oid, convert)] = plan
        return plan

    def _row(
        self, buf: bytes, text: str | None, pos: int, plan: _Plan, *, key_only: bool
    ) -> tuple[dict[str, Any], int]:
        """One TupleData into a dict, converting as it goes: the decoder's hot loop, kept
        minimal for the common case (UTF-8 text or NULL columns, a full row)."""
        relation, names, converters, _ = plan
        (count,) = _I16.unpack_from(buf, pos)
        if count != len(names):
            raise DecodeError(
                f"{relation.namespace}.{relation.name}: {count} values for {len(names)} columns"
            )
        pos += 2
        if text is None or key_only:
            return self._row_general(buf, text, pos, plan, key_only=key_only)
        first = pos
        row: dict[str, Any] = {}
        unpack_len = _I32.unpack_from
        encoding = self.encoding
        try:
            for name, convert in zip(names, converters, strict=True):
                kind = buf[pos]
                if kind == 0x74:  # 't'
                    start = pos + 5
                    pos = start + unpack_len(buf, pos + 1)[0]
                    value = text[start:pos]
                    if not value.isascii():  # O(1); non-ASCII text needs the real decoding
                        value = buf[start:pos].decode(encoding)
                    row[name] = value if convert is None else convert(value)
                elif kind == 0x6E:  # 'n'
                    row[name] = None
                    pos += 1
                else:
                    return self._row_general(buf, text, first, plan, key_only=key_only)
        except (ValueError, ArithmeticError):  # a converter refused a value: that one stays text
            return self._row_general(buf, text, first, plan, key_only=key_only)
        return row, pos

    def _row_general(
        self, buf: bytes, text: str | None, pos: int, plan: _Plan, *, key_only: bool
    ) -> tuple[dict[str, Any], int]:
        """Any TupleData (``pos`` just past its column count): other encodings, unchanged
        TOAST, binary values, key-only tuples."""
        _, names, converters, keys = plan
        row: dict[str, Any] = {}
        unpack_len = _I32.unpack_from
        encoding = self.encoding
        for name, convert, is_key in zip(names, converters, keys, strict=True):
            kind = buf[pos]
            value: Any
            if kind == 0x74:  # 't'
                end = pos + 5 + unpack_len(buf, pos + 1)[0]
                value = buf[pos + 5 : end].decode(encoding)
                pos = end
                if convert is not None:
                    value = _convert(convert, value)
            elif kind == 0x6E:  # 'n'
                value = None
                pos += 1
            elif kind == 0x75:  # 'u'
                value = UNCHANGED
                pos += 1
            elif kind == 0x62:  # 'b'
                end = pos + 5 + unpack_len(buf, pos + 1)[0]
                value = buf[pos + 5 : end]
                pos = end
            else:
                raise DecodeError(f"unknown tuple column kind {chr(kind)!r}")
            if is_key or not key_only:
                row[name] = value
        return row, pos

    def row(
        self,
        relation_oid: int,
        values: tuple[Value, ...],
        *,
        key_only: bool = False,
        convert: bool = False,
    ) -> dict[str, Any]:
        """Pair a message's values with column names; ``key_only`` keeps replica-identity
        columns (for 'K' tuples, whose other columns are meaningless NULLs); ``convert``
        applies :func:`convert_value` by column type."""
        relation, names, converters, keys = self._plan(relation_oid, convert)
        if len(values) != len(names):
            raise DecodeError(
                f"{relation.namespace}.{relation.name}: {len(values)} values for "
                f"{len(names)} columns"
            )
        return {
            name: (_convert(f, v) if f is not None and v.__class__ is str else v)  # type: ignore[arg-type]
            for name, f, is_key, v in zip(names, converters, keys, values, strict=True)
            if is_key or not key_only
        }


# -- LSNs ------------------------------------------------------------------------------------------
def format_lsn(lsn: int) -> str:
    """64-bit LSN -> PostgreSQL's 'X/Y' text form."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def parse_lsn(text: str) -> int:
    """PostgreSQL's 'X/Y' text form -> 64-bit LSN."""
    high, sep, low = text.partition("/")
    if not sep:
        raise ValueError(f"not an LSN: {text!r}")
    return (int(high, 16) << 32) | int(low, 16)


# -- values ----------------------------------------------------------------------------------------
def _bool(text: str) -> bool:
    return text == "t"


def _bytea(text: str) -> bytes:
    if text.startswith("\\x"):
        return bytes.fromhex(text[2:])
    raise ValueError("bytea value not in hex format: the decoding session needs bytea_output=hex")


# Dates and timestamps Python cannot hold (BC, year 10000 on: PostgreSQL writes "4713-01-01 BC",
# "10000-01-01") stay as the server's text; pgvalues.py reads that text.
def _timestamptz(text: str) -> dt.datetime | str:
    if text in ("infinity", "-infinity"):
        bound = dt.datetime.max if text == "infinity" else dt.datetime.min
        return bound.replace(tzinfo=dt.UTC)
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        return text
    # Decoding sessions run with TimeZone=UTC, so '+00' (already UTC) is the common case.
    return value if text.endswith("+00") else value.astimezone(dt.UTC)


def _timestamp(text: str) -> dt.datetime | str:
    if text in ("infinity", "-infinity"):
        return dt.datetime.max if text == "infinity" else dt.datetime.min
    try:
        return dt.datetime.fromisoformat(text)
    except ValueError:
        return text


def _date(text: str) -> dt.date | str:
    if text in ("infinity", "-infinity"):
        return dt.date.max if text == "infinity" else dt.date.min
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        return text


def _str(text: str) -> str:
    return text


# Built-in type OIDs (pg_type.dat) -> converter. Types not listed stay as text.
_CONVERTERS: dict[int, Callable[[str], Any]] = {
    16: _bool,  # bool
    17: _bytea,  # bytea
    18: _str,  # "char"
    19: _str,  # name
    20: int,  # int8
    21: int,  # int2
    23: int,  # int4
    25: _str,  # text
    26: int,  # oid
    114: _str,  # json: the server's text, as snapshots read it (never re-serialised: Python
    # would write a number past a double's range, 1e400, as the non-JSON token Infinity)
    650: _str,  # cidr
    700: float,  # float4
    701: float,  # float8
    869: _str,  # inet
    1042: _str,  # bpchar
    1043: _str,  # varchar
    1082: _date,  # date
    1114: _timestamp,  # timestamp
    1184: _timestamptz,  # timestamptz
    1700: Decimal,  # numeric
    2950: uuid.UUID,  # uuid
    3802: _str,  # jsonb: as json
}
TYPED_OIDS: Final = frozenset(oid for oid, f in _CONVERTERS.items() if f is not _str)
"""OIDs that :func:`convert_value` turns into something other than ``str``."""


def _convert(converter: Callable[[str], Any], text: str) -> Any:
    """``converter(text)``, or the text itself if the converter refuses it: a value is never
    fatal here, the destination nulls and records what it cannot take."""
    try:
        return converter(text)
    except (ValueError, ArithmeticError):
        return text


def convert_value(type_oid: int, value: Value) -> Any:
    """Text output of a built-in type -> Python value (int, Decimal, float, bool, str, datetime,
    date, bytes, UUID; json and jsonb stay the server's text). NULL and UNCHANGED pass through;
    unknown types stay text.

    Timestamps with time zone come back as aware UTC datetimes; ±infinity maps to the
    datetime/date min and max; a date or timestamp outside Python's years 1-9999 (BC, year 10000
    on), or any value a converter refuses, stays as the server's text. Expects the server's
    default ISO DateStyle and hex bytea output.
    """
    if value is None or value is UNCHANGED or not isinstance(value, str):
        return value
    converter = _CONVERTERS.get(type_oid)
    return value if converter is None else _convert(converter, value)
