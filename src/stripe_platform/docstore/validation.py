"""The specs' ``$jsonSchema`` validators, enforced by the application where the server does not.

FerretDB v1 has no validators: ``create`` with ``validator`` and ``collMod`` answer NotImplemented
(code 238), so on it the platform's own document writes go through :func:`insert_many` and
:func:`bulk_write` here, which check every document (or update) against the collection's validator
before anything is sent: one bad document refuses the whole batch, with its collection, ``_id``
and field named. The seed checks each batch with :func:`check_documents` before it sends it, so
that the check of one batch overlaps the write of the one before (``seed/load.py``). On MongoDB the server enforces the validator (``strict``/``error``) and these
functions only write.

The check is the ``jsonschema`` library's, on a JSON Schema translated from MongoDB's dialect:
``bsonType`` becomes ``type`` with BSON type names that a type checker tests the way pymongo
encodes Python values (``int`` is a Python int that fits 32 bits, ``long`` an ``Int64`` or a
larger int, ``double`` a float, ``date`` a datetime, ...). A keyword the translation does not know
is a SpecError, never ignored.

What it does not cover: writes from outside the platform's code (a mongosh user on FerretDB is
not checked), and an update is checked on what it sets (each ``$set`` value against the schema at
its path, ``$unset`` against ``required``), not on the whole document after it as MongoDB does.

Setting fields by key (:func:`set_fields`) is the platform's one way to write "these fields on
these documents", fraud scores into Transaction documents by ``transaction_id`` among them. On
FerretDB v1 an update command costs one PostgreSQL statement, transaction and pooled connection
per document (a few hundred documents/s; ``docstore/ferretdb.py``), so on the embedded FerretDB,
whose PostgreSQL the platform reaches, the fields are written set-based: one UPDATE per chunk of
keys, straight into FerretDB's table, in its stored form (:func:`ferretdb.set_fields`). Elsewhere
(MongoDB, or a FerretDB at ``MONGODB_URI``) they go as ``UpdateOne`` requests through
:func:`ferretdb.bulk_write`. Both paths check everything first (the values' types, then the
validator on every server), so a refused value leaves nothing written, and both give the same
documents and report the same matched count and missing keys.
"""

from __future__ import annotations

import datetime as dt
import decimal
import functools
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from bson import Binary, Code, Decimal128, Int64, MaxKey, MinKey, ObjectId, Regex, Timestamp
from bson.datetime_ms import DatetimeMS
from jsonschema import Draft202012Validator, ValidationError, validators
from jsonschema.exceptions import best_match
from pymongo import DeleteMany, DeleteOne, InsertOne, ReplaceOne, UpdateMany, UpdateOne

from stripe_platform.config import Settings
from stripe_platform.docstore import ferretdb
from stripe_platform.docstore.client import server_kind
from stripe_platform.docstore.specs import CollectionSpec, SpecError, load_specs
from stripe_platform.errors import PlatformError

INT32 = (-(2**31), 2**31)
INT64 = (-(2**63), 2**63)


class DocumentRefused(PlatformError, ValueError):
    """A document (or update) that breaks its collection's validator; nothing of its batch was
    written."""


# -- BSON types as pymongo encodes Python values -------------------------------------------------------
def _is_int(value: Any) -> bool:
    return type(value) is int and INT32[0] <= value < INT32[1]


def _is_long(value: Any) -> bool:
    if isinstance(value, Int64):
        return True
    return type(value) is int and INT64[0] <= value < INT64[1] and not _is_int(value)


def _is_double(value: Any) -> bool:
    return isinstance(value, float)


BSON_TYPES = {
    "double": _is_double,
    "string": lambda v: isinstance(v, str),
    "object": lambda v: isinstance(v, Mapping),
    "array": lambda v: isinstance(v, list | tuple),
    "binData": lambda v: isinstance(v, bytes | Binary | uuid.UUID),
    "objectId": lambda v: isinstance(v, ObjectId),
    "bool": lambda v: isinstance(v, bool),
    "date": lambda v: isinstance(v, dt.datetime | DatetimeMS),
    "null": lambda v: v is None,
    "regex": lambda v: isinstance(v, re.Pattern | Regex),
    "javascript": lambda v: isinstance(v, Code),
    "int": _is_int,
    "timestamp": lambda v: isinstance(v, Timestamp),
    "long": _is_long,
    "decimal": lambda v: isinstance(v, Decimal128),
    "minKey": lambda v: isinstance(v, MinKey),
    "maxKey": lambda v: isinstance(v, MaxKey),
    # MongoDB's alias for the four numeric types.
    "number": lambda v: _is_int(v) or _is_long(v) or _is_double(v) or isinstance(v, Decimal128),
}
# `type` (JSON Schema's names) in MongoDB's dialect: the JSON names map onto BSON ones.
JSON_TYPES = {
    "object": "object",
    "array": "array",
    "number": "number",
    "boolean": "bool",
    "string": "string",
    "null": "null",
}


def _numeric(value: Any) -> Any:
    return value.to_decimal() if isinstance(value, Decimal128) else value


def _bound(keyword: str, holds: Any, words: str):
    # jsonschema's own bounds cannot compare a Decimal128; MongoDB does, by value.
    def check(validator: Any, limit: Any, instance: Any, schema: Any):
        if not validator.is_type(instance, "number"):
            return
        value = _numeric(instance)
        if isinstance(value, decimal.Decimal) and not value.is_finite():
            value = float(value)
        if not holds(value, limit):
            yield ValidationError(f"{instance!r} is {words} {limit!r}")

    check.__name__ = keyword
    return check


BsonValidator = validators.extend(
    Draft202012Validator,
    validators={
        "minimum": _bound("minimum", lambda v, m: v >= m, "less than the minimum of"),
        "maximum": _bound("maximum", lambda v, m: v <= m, "more than the maximum of"),
        "exclusiveMinimum": _bound(
            "exclusiveMinimum", lambda v, m: v > m, "less than or equal to the minimum of"
        ),
        "exclusiveMaximum": _bound(
            "exclusiveMaximum", lambda v, m: v < m, "more than or equal to the maximum of"
        ),
    },
    type_checker=Draft202012Validator.TYPE_CHECKER.redefine_many(
        {name: (lambda check: lambda _checker, v: check(v))(f) for name, f in BSON_TYPES.items()}
    ),
)


# -- MongoDB's $jsonSchema dialect -> JSON Schema -------------------------------------------------------
_SAME = {  # keywords that mean the same in both
    "required",
    "enum",
    "pattern",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "uniqueItems",
    "minProperties",
    "maxProperties",
    "multipleOf",
    "title",
    "description",
}
_SUBSCHEMA = {"not"}
_SUBSCHEMA_LISTS = {"allOf", "anyOf", "oneOf"}
_SUBSCHEMA_MAPS = {"properties", "patternProperties"}


def to_json_schema(schema: Mapping[str, Any], where: str = "$jsonSchema") -> dict[str, Any]:
    """Translate one MongoDB ``$jsonSchema`` (draft 4 with ``bsonType``) to JSON Schema 2020-12
    with BSON type names. Raises SpecError for what it does not know."""
    if not isinstance(schema, Mapping):
        raise SpecError(f"{where}: a schema is an object, not {schema!r}")
    out: dict[str, Any] = {}
    for key, value in schema.items():
        at = f"{where}.{key}"
        if key == "bsonType":
            names = [value] if isinstance(value, str) else list(value)
            unknown = [n for n in names if n not in BSON_TYPES]
            if unknown:
                raise SpecError(f"{at}: unknown BSON type(s) {unknown}")
            out["type"] = names if len(names) > 1 else names[0]
        elif key == "type":
            names = [value] if isinstance(value, str) else list(value)
            unknown = [n for n in names if n not in JSON_TYPES]
            if unknown:
                raise SpecError(f"{at}: unknown type(s) {unknown} (MongoDB has no 'integer')")
            mapped = [JSON_TYPES[n] for n in names]
            out["type"] = mapped if len(mapped) > 1 else mapped[0]
        elif key in _SAME:
            out[key] = value
        elif key in ("minimum", "maximum"):
            exclusive = schema.get("exclusive" + key.capitalize(), False)
            if not isinstance(exclusive, bool):
                raise SpecError(f"{where}.exclusive{key.capitalize()}: true or false (draft 4)")
            out[("exclusive" + key.capitalize()) if exclusive else key] = value
        elif key in ("exclusiveMinimum", "exclusiveMaximum"):
            continue  # draft 4's boolean form, folded into minimum/maximum above
        elif key in _SUBSCHEMA:
            out[key] = to_json_schema(value, at)
        elif key in _SUBSCHEMA_LISTS:
            out[key] = [to_json_schema(s, f"{at}[{i}]") for i, s in enumerate(value)]
        elif key in _SUBSCHEMA_MAPS:
            out[key] = {k: to_json_schema(s, f"{at}.{k}") for k, s in value.items()}
        elif key == "additionalProperties":
            out[key] = value if isinstance(value, bool) else to_json_schema(value, at)
        elif key == "items":
            if isinstance(value, list):  # draft 4's tuple form
                out["prefixItems"] = [to_json_schema(s, f"{at}[{i}]") for i, s in enumerate(value)]
                extra = schema.get("additionalItems", True)
                out["items"] = extra if isinstance(extra, bool) else to_json_schema(extra, at)
            else:
                out["items"] = to_json_schema(value, at)
        elif key == "additionalItems":
            continue  # meaningful only beside a tuple `items`, handled there
        elif key == "dependencies":
            for name, dep in value.items():
                if isinstance(dep, list):
                    out.setdefault("dependentRequired", {})[name] = dep
                else:
                    out.setdefault("dependentSchemas", {})[name] = to_json_schema(
                        dep, f"{at}.{name}"
                    )
        else:
            raise SpecError(f"{at}: keyword not supported by the application's validation")
    return out


_REMEMBERED = (int, bool, str, type(None))  # hashable, and equal only to values of their type


class CollectionValidator:
    """One collection's validator, compiled once."""

    def __init__(self, collection: str, validator: Mapping[str, Any]) -> None:
        if set(validator) != {"$jsonSchema"}:
            raise SpecError(
                f"{collection}: the application enforces $jsonSchema validators only, not "
                f"{sorted(set(validator) - {'$jsonSchema'})}"
            )
        self.collection = collection
        self.schema = to_json_schema(validator["$jsonSchema"], f"{collection}.$jsonSchema")
        self._validator = BsonValidator(self.schema)
        # per $set path: the compiled checker of the schema there (None: nothing constrains it);
        # compiling one costs more than checking a value with it
        self._set_checkers: dict[str, Any] = {}
        # (path, type, value) of valid $set values seen: a flag like isFraud takes a few values
        # over and over (bounded; floats are not kept)
        self._valid_sets: set[tuple[str, type, Any]] = set()

    def refusal(self, document: Mapping[str, Any], what: str) -> DocumentRefused | None:
        """None when the document is valid, else the error to raise."""
        if self._validator.is_valid(document):
            return None
        return self._refusal(self._validator, document, what, prefix="")

    def _refusal(self, validator: Any, value: Any, what: str, prefix: str) -> DocumentRefused:
        error = best_match(validator.iter_errors(value))
        path = [prefix] if prefix else []
        path += [str(p) for p in error.absolute_path]
        if error.validator == "required":
            missing = [r for r in error.validator_value if r not in error.instance]
            path += missing[:1]
        field = ".".join(path) or "(the document)"
        return DocumentRefused(
            f"{what} refused by the {self.collection} validator: field {field!r}: "
            f"{error.message}; nothing of this batch was written"
        )

    def check_document(self, document: Mapping[str, Any]) -> None:
        refused = self.refusal(document, _describe(self.collection, document))
        if refused is not None:
            raise refused

    def check_update(self, update: Mapping[str, Any] | Sequence[Any], what: str) -> None:
        if not isinstance(update, Mapping):
            raise DocumentRefused(
                f"{what}: an aggregation-pipeline update cannot be checked against the "
                f"{self.collection} validator here (FerretDB does not enforce it)"
            )
        for operator, fields in update.items():
            if operator in ("$set", "$setOnInsert"):
                self.check_set(fields, what)
            elif operator == "$unset":
                for path in fields:
                    parent, _, name = path.rpartition(".")
                    holder = self._schema_at(parent, what) if parent else self.schema
                    if holder is not None and name in holder.get("required", ()):
                        raise DocumentRefused(
                            f"{what} refused by the {self.collection} validator: field "
                            f"{path!r} is required; nothing of this batch was written"
                        )
            else:
                raise DocumentRefused(
                    f"{what}: the update operator {operator} cannot be checked against the "
                    f"{self.collection} validator here (FerretDB does not enforce it); use $set"
                )

    def check_set(self, fields: Mapping[str, Any], what: str) -> None:
        """Each value of a ``$set`` against the schema at its path."""
        for path, value in fields.items():
            if path in self._set_checkers:
                checker = self._set_checkers[path]
            else:
                schema = self._schema_at(path, what)  # raises for a path the schema forbids
                checker = self._set_checkers[path] = (
                    None if schema is None else BsonValidator(schema)
                )
            if checker is None:
                continue
            seen = (path, type(value), value) if type(value) in _REMEMBERED else None
            if seen is not None and seen in self._valid_sets:
                continue
            if not checker.is_valid(value):
                raise self._refusal(checker, value, what, prefix=path)
            if seen is not None and len(self._valid_sets) < 10_000:
                self._valid_sets.add(seen)

    def _schema_at(self, path: str, what: str) -> dict[str, Any] | None:
        """The schema that constrains the value at a dotted path; None when nothing does."""
        schema: Any = self.schema
        for part in path.split("."):
            positional = part.isdigit() or part == "$" or (part[:2] == "$[" and part[-1:] == "]")
            if positional and "items" in schema:
                schema = schema["items"] if isinstance(schema["items"], dict) else {}
            elif part in schema.get("properties", {}):
                schema = schema["properties"][part]
            elif schema.get("additionalProperties") is False:
                raise DocumentRefused(
                    f"{what} refused by the {self.collection} validator: field {path!r} is "
                    "not allowed (additionalProperties); nothing of this batch was written"
                )
            elif isinstance(schema.get("additionalProperties"), dict):
                schema = schema["additionalProperties"]
            else:
                return None
        return schema


def _describe(collection: str, document: Mapping[str, Any]) -> str:
    return f"{collection} document _id={document.get('_id', '(none yet)')!r}"


@functools.cache
def _validators() -> dict[str, CollectionValidator]:
    return compile_validators(load_specs())


def compile_validators(specs: Iterable[CollectionSpec]) -> dict[str, CollectionValidator]:
    return {s.collection: CollectionValidator(s.collection, s.validator) for s in specs}


def validator_for(collection: str) -> CollectionValidator | None:
    return _validators().get(collection)


def enforced_by_application(db: Any) -> bool:
    """True where the server does not enforce the specs' validators (FerretDB)."""
    return server_kind(db) == "ferretdb"


# -- the platform's document writes ---------------------------------------------------------------------
def check_documents(collection: str, documents: Iterable[Mapping[str, Any]]) -> None:
    validator = validator_for(collection)
    if validator is None:
        return
    for document in documents:
        validator.check_document(document)


def check_requests(collection: str, requests: Iterable[Any]) -> None:
    validator = validator_for(collection)
    if validator is None:
        return
    for request in requests:
        # pymongo keeps a request's document and filter in _doc and _filter (stable since 3.0).
        if isinstance(request, InsertOne | ReplaceOne):
            validator.check_document(request._doc)
        elif isinstance(request, UpdateOne | UpdateMany):
            what = f"update of {collection} {request._filter!r}"
            if request._upsert:
                # What it would insert is the filter's equalities plus the update: not checked.
                raise DocumentRefused(
                    f"{what}: an upserting update cannot be checked against the {collection} "
                    "validator here (FerretDB does not enforce it); use ReplaceOne with the "
                    "whole document"
                )
            validator.check_update(request._doc, what)
        elif not isinstance(request, DeleteOne | DeleteMany):
            raise TypeError(f"not a pymongo write request: {request!r}")


def insert_many(
    collection: Any, documents: list[Mapping[str, Any]], *, ordered: bool = True
) -> Any:
    """``collection.insert_many`` after checking every document where the server does not."""
    if enforced_by_application(collection.database):
        check_documents(collection.name, documents)
    return collection.insert_many(documents, ordered=ordered)


def bulk_write(
    collection: Any, requests: Sequence[Any], *, ordered: bool = True
) -> ferretdb.BulkCounts:
    """:func:`ferretdb.bulk_write` (<= 40 updates per command on FerretDB) after checking every
    request where the server does not enforce the validator."""
    if enforced_by_application(collection.database):
        check_requests(collection.name, requests)
    return ferretdb.bulk_write(collection, requests, ordered=ordered)


def set_fields(
    db: Any,
    settings: Settings,
    collection: str,
    key_field: str,
    updates: Iterable[tuple[Any, Mapping[str, Any]]],
    *,
    chunk_size: int = ferretdb.SET_FIELDS_CHUNK,
    writers: int = ferretdb.SET_FIELDS_WRITERS,
) -> ferretdb.SetFieldsResult:
    """Set fields on the documents of ``collection`` keyed by ``key_field``: ``updates`` is a
    sequence of ``(key, {field: value})``, one per document, values of simple BSON types (double,
    bool, int, long, string, date, null). Returns the documents matched and the keys no document
    has (``missing``, in the order given).

    Everything is checked before anything is written: the key field (``_id`` or a field with a
    unique index: one document per key), the keys (numbers, strings or ObjectIds, each once), the
    field names and value types (``ferretdb.FieldUpdateRefused``), then each value against the
    collection's validator (``DocumentRefused``). On the embedded FerretDB the write is set-based
    in its backend (:func:`ferretdb.set_fields`: ``chunk_size`` keys an UPDATE and a transaction,
    ``writers`` connections); elsewhere ``UpdateOne`` requests (:func:`ferretdb.bulk_write`: at
    most 40 a command on FerretDB, ``chunk_size`` a call on MongoDB). Either way a failure after
    the checks leaves the chunks before it written, and a re-run writes the same values again."""
    prepared = ferretdb.prepare_field_updates(key_field, updates)
    _check_unique_key(db[collection], key_field)
    validator = validator_for(collection)
    if validator is not None:
        for item in prepared.items:
            validator.check_set(item.fields, f"set_fields on {collection} {key_field}={item.key!r}")
    if server_kind(db) == "ferretdb" and settings.mongodb_uri is None:
        # the embedded FerretDB: its PostgreSQL is the platform's (as apply_specs decides)
        return ferretdb.set_fields(
            settings,
            db.name,
            collection,
            key_field,
            prepared,
            chunk_size=chunk_size,
            writers=writers,
        )
    return _set_fields_by_commands(db[collection], prepared, chunk_size)


def _check_unique_key(collection: Any, key_field: str) -> None:
    if key_field == "_id":
        return
    for index in collection.index_information().values():
        if index.get("unique") and [k for k, _ in index["key"]] == [key_field]:
            return
    raise ferretdb.FieldUpdateRefused(
        f"{collection.name}.{key_field} has no unique index: set_fields keys one document per "
        "key, by _id or a field with a unique index (is the collection there and its spec "
        "applied?)"
    )


def _set_fields_by_commands(
    collection: Any, prepared: ferretdb.FieldUpdates, chunk_size: int
) -> ferretdb.SetFieldsResult:
    """``UpdateOne`` requests; a slice whose matched count falls short is looked up key by key
    to name its missing keys (FerretDB pushes down only an equality, not ``$in``)."""
    key_field = prepared.key_field
    on_ferretdb = server_kind(collection.database) == "ferretdb"
    size = ferretdb.MAX_UPDATES_PER_COMMAND if on_ferretdb else max(1, chunk_size)
    result = ferretdb.SetFieldsResult(path="protocol")
    items = prepared.items
    for start in range(0, len(items), size):
        piece = items[start : start + size]
        counts = ferretdb.bulk_write(
            collection,
            [UpdateOne({key_field: i.key}, {"$set": i.fields}) for i in piece],
            ordered=False,
        )
        result.statements += counts.commands
        result.matched += counts.matched
        if counts.matched < len(piece):
            keys = [i.key for i in piece]
            if on_ferretdb:
                found = [k for k in keys if collection.find_one({key_field: k}, {"_id": 1})]
            else:
                found = [
                    d[key_field]
                    for d in collection.find({key_field: {"$in": keys}}, {key_field: 1})
                ]
            present = {_key_identity(k) for k in found}
            result.missing += [k for k in keys if _key_identity(k) not in present]
    return result


def _key_identity(key: Any) -> tuple[str, Any]:
    # 5, 5.0 and Int64(5) are one key; the string "5" and an ObjectId are others.
    if isinstance(key, int | float) and not isinstance(key, bool):
        return ("number", key)
    return (type(key).__name__, key)
