"""The classification catalog: what every column and field of every store holds (issue 20 §1).

ONE source of truth, gathered from where each schema is declared:
- OLTP columns: the migrations' ``COMMENT ON COLUMN`` labels in sql/oltp (``PCI:``, ``PII:``, ...);
- document fields: the ``classification`` map of each spec in mongo/collections;
- raw/lake streams: derived from the source column or field each stream selects (airbyte/catalog.yaml);
- mart columns: dbt ``meta.classification`` in dbt_project/models/marts/*.yml.

Readers (encryption, masking, coverage, privacy requests, retention, the compliance dashboard) call
:func:`load_catalog` and never parse those files themselves.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import yaml

from stripe_platform.docstore.specs import load_specs
from stripe_platform.errors import PlatformError
from stripe_platform.ingestion.catalog import CDC_COLUMNS, oltp_column_comments, oltp_columns
from stripe_platform.ingestion.catalog import CatalogError as AirbyteCatalogError
from stripe_platform.ingestion.catalog import load_catalog as load_airbyte_catalog
from stripe_platform.paths import REPO_ROOT

Store = Literal["postgres", "documents", "lake", "warehouse_raw", "marts"]
STORES: tuple[Store, ...] = ("postgres", "documents", "lake", "warehouse_raw", "marts")


class DataClass(StrEnum):
    PCI = "pci"  # card data (PAN, ...): PCI-DSS scope
    PII = "pii"  # direct identifier: names, e-mail, phone, street address
    PII_QUASI = "pii_quasi"  # quasi-identifier or pseudonym: IP, postal code, keyed hashes, handles
    CREDENTIAL = "credential"  # passwords (one-way hashes), tokens, secrets
    NON_PERSONAL = "non_personal"


# Classes that must be encrypted (or hashed, for credentials) at rest in every store, or masked in
# the warehouse for every role below admin: what `keys coverage` measures.
PROTECTED = frozenset({DataClass.PCI, DataClass.PII, DataClass.CREDENTIAL})
# Classes hidden from roles below admin (RBAC, masking).
RESTRICTED = frozenset({DataClass.PCI, DataClass.PII, DataClass.PII_QUASI, DataClass.CREDENTIAL})


class CatalogError(PlatformError, ValueError):
    """A declaration is missing, unknown or contradicts the schema; the message says where."""


@dataclass(frozen=True)
class Entry:
    store: Store
    dataset: str  # OLTP table, collection, stream, or mart model, as the store names it
    field: str  # column, or dotted document path ("preferences.device", "lines.message")
    data_class: DataClass
    category: str | None = None  # fideslang data category, e.g. "user.contact.email"
    subject: str | None = None  # the field naming the data subject (customer id) of this dataset
    declared_at: str = ""  # "sql/oltp/0003_parties.sql:21", for error messages and reviewers


# Ordered by what a leak costs: a dataset or a column derived from several takes the most
# sensitive of them. Credentials and card data rank alike (both must never be readable).
SENSITIVITY = {
    DataClass.NON_PERSONAL: 0,
    DataClass.PII_QUASI: 1,
    DataClass.PII: 2,
    DataClass.PCI: 3,
    DataClass.CREDENTIAL: 3,
}

# The label that starts an OLTP column comment (sql/oltp/0011_classification.sql), and its class.
OLTP_LABELS = {
    "PCI": DataClass.PCI,
    "PII": DataClass.PII,
    "QUASI": DataClass.PII_QUASI,
    "SECRET": DataClass.CREDENTIAL,
    "NONE": DataClass.NON_PERSONAL,
}
# Columns Airbyte (and the embedded engine) add to every stream: sync bookkeeping, no personal data.
METADATA_PREFIXES = ("_airbyte_", "_ab_cdc_")
METADATA_CATEGORY = "system.operations"
# A document field the validator does not name is kept by the raw layer in this JSON column.
EXTRA_COLUMN = "_extra"


def most_sensitive(classes: Iterable[DataClass]) -> DataClass:
    """The class of something made of these (non_personal when there is nothing)."""
    return max(classes, key=SENSITIVITY.__getitem__, default=DataClass.NON_PERSONAL)


@dataclass(frozen=True)
class Catalog:
    """Every classified column and field, and every declaration problem found while loading.

    Loading never raises for a missing or unknown class: :meth:`check` (the CI gate) does, listing
    them all, so `catalog` can still show what is declared while the gate fails.
    """

    entries: tuple[Entry, ...]
    problems: tuple[str, ...] = ()

    def for_store(self, store: Store) -> tuple[Entry, ...]:
        _known_store(store)
        return tuple(e for e in self.entries if e.store == store)

    def datasets(self, store: Store) -> tuple[str, ...]:
        return tuple(dict.fromkeys(e.dataset for e in self.for_store(store)))

    def dataset(self, store: Store, dataset: str) -> tuple[Entry, ...]:
        found = tuple(e for e in self.for_store(store) if e.dataset == dataset)
        if not found:
            raise CatalogError(f"catalog: no dataset {dataset!r} in store {store}")
        return found

    def get(self, store: Store, dataset: str, field: str) -> Entry:
        for entry in self.dataset(store, dataset):
            if entry.field == field:
                return entry
        raise CatalogError(f"catalog: {store} {dataset} has no classified field {field!r}")

    def protected(self, store: Store | None = None) -> tuple[Entry, ...]:
        """What must be encrypted (hashed, for credentials) at rest or masked: PROTECTED classes."""
        entries = self.entries if store is None else self.for_store(store)
        return tuple(e for e in entries if e.data_class in PROTECTED)

    def restricted(self, store: Store | None = None) -> tuple[Entry, ...]:
        """What roles below admin must not read: RESTRICTED classes."""
        entries = self.entries if store is None else self.for_store(store)
        return tuple(e for e in entries if e.data_class in RESTRICTED)

    def subject(self, store: Store, dataset: str) -> str | None:
        """The field naming the data subject (customer) of a dataset's rows, if it has one."""
        return self.dataset(store, dataset)[0].subject

    def unclassified(self) -> tuple[str, ...]:
        """Every column or field without a class, or with an unknown one, and where."""
        return self.problems

    def check(self) -> None:
        """The CI gate: raise listing every problem, or return when everything is classified."""
        if self.problems:
            raise CatalogError(
                f"classification catalog: {len(self.problems)} problem(s)\n  "
                + "\n  ".join(self.problems)
            )

    def summary(self) -> dict[str, dict[str, int]]:
        """store -> class -> number of columns/fields, every class listed."""
        counts = {s: dict.fromkeys((c.value for c in DataClass), 0) for s in STORES}
        for entry in self.entries:
            counts[entry.store][entry.data_class.value] += 1
        return counts


def _known_store(store: str) -> None:
    if store not in STORES:
        raise CatalogError(f"catalog: unknown store {store!r}; known: {', '.join(STORES)}")


def _data_class(value: object, where: str, problems: list[str]) -> DataClass | None:
    try:
        return DataClass(value)  # type: ignore[arg-type]
    except ValueError:
        known = ", ".join(c.value for c in DataClass)
        problems.append(f"{where}: unknown class {value!r} (known: {known})")
        return None


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


# --- OLTP: column comments ------------------------------------------------------------------

_OLTP_COMMENT = re.compile(r"^(?P<label>[A-Za-z]+):(?P<text>.*)$", re.DOTALL)
_TAG = re.compile(r"\[([a-z_][a-z0-9_.]*)\]")


def _comment_line(path: Path, table: str, column: str) -> int:
    """The line of the last COMMENT on this column in its migration (for reviewers)."""
    pattern = re.compile(
        rf"COMMENT\s+ON\s+COLUMN\s+(?:\w+\.)?\"?{table}\"?\.\"?{column}\"?\s+IS", re.IGNORECASE
    )
    text = path.read_text()
    matches = list(pattern.finditer(text))
    return text.count("\n", 0, matches[-1].start()) + 1 if matches else 0


def _oltp_entries(root: Path, problems: list[str]) -> list[Entry]:
    sql_dir = root / "sql" / "oltp"
    comments = oltp_column_comments(sql_dir)
    entries: list[Entry] = []
    for table, columns in oltp_columns(sql_dir).items():
        declared: list[Entry] = []
        for column in columns:
            comment = comments.get((table, column))
            if comment is None:
                problems.append(
                    f"{_relative(sql_dir, root)}: postgres {table}.{column}: unclassified (no "
                    "COMMENT ON COLUMN with a PCI:/PII:/QUASI:/SECRET:/NONE: label)"
                )
                continue
            text, path = comment
            where = f"{_relative(path, root)}:{_comment_line(path, table, column)}"
            match = _OLTP_COMMENT.match(text)
            label = match["label"].upper() if match else None
            if label not in OLTP_LABELS:
                known = ", ".join(f"{k}:" for k in OLTP_LABELS)
                problems.append(
                    f"{where}: postgres {table}.{column}: unknown label in comment {text!r} "
                    f"(known: {known})"
                )
                continue
            tags = _TAG.findall(match["text"])  # type: ignore[index]
            categories = [t for t in tags if t != "subject"]
            declared.append(
                Entry(
                    store="postgres",
                    dataset=table,
                    field=column,
                    data_class=OLTP_LABELS[label],
                    category=categories[-1] if categories else None,
                    subject=column if "subject" in tags else None,
                    declared_at=where,
                )
            )
        entries += _with_subject(declared, f"postgres {table}", problems)
    return entries


def _with_subject(entries: list[Entry], what: str, problems: list[str]) -> list[Entry]:
    """Every entry of one dataset carries the dataset's subject field (at most one)."""
    subjects = sorted({e.subject for e in entries if e.subject})
    if len(subjects) > 1:
        problems.append(f"{what}: more than one subject field: {', '.join(subjects)}")
    subject = subjects[0] if subjects else None
    return [replace(e, subject=subject) for e in entries]


# --- documents: the specs' classification maps ------------------------------------------------


def document_paths(schema: Mapping[str, Any], prefix: str = "") -> dict[str, bool]:
    """Every field path of a $jsonSchema at every depth (arrays of objects: ``lines.message``)
    -> whether it is a leaf (a container's class is derived from its sub-fields)."""
    paths: dict[str, bool] = {}
    for name, sub in schema.get("properties", {}).items():
        path = f"{prefix}{name}"
        inner = sub.get("items", sub) if isinstance(sub.get("items"), dict) else sub
        nested = inner.get("properties") if isinstance(inner, dict) else None
        paths[path] = not nested
        if nested:
            paths.update(document_paths(inner, f"{path}."))
    return paths


def _declared_class(
    value: Any, where: str, problems: list[str]
) -> tuple[DataClass | None, str | None, bool]:
    if isinstance(value, str):
        return _data_class(value, where, problems), None, False
    if isinstance(value, dict) and set(value) <= {"class", "category", "subject"}:
        category = value.get("category")
        if category is not None and not isinstance(category, str):
            problems.append(f"{where}: category must be a string")
        return (
            _data_class(value.get("class"), where, problems),
            category,
            value.get("subject") is True,
        )
    problems.append(
        f'{where}: expected a class or {{"class", "category", "subject"}}, got {value!r}'
    )
    return None, None, False


def _document_entries(root: Path, problems: list[str]) -> list[Entry]:
    directory = root / "mongo" / "collections"
    entries: list[Entry] = []
    for spec in load_specs(directory):
        file = _relative(directory / f"{spec.collection}.json", root)
        schema = spec.validator.get("$jsonSchema", {})
        paths = {"_id": True, **document_paths(schema)}
        declared: list[Entry] = []
        for path, value in spec.classification.items():
            where = f"{file}: classification.{path}"
            data_class, category, subject = _declared_class(value, where, problems)
            if data_class is not None:
                declared.append(
                    Entry(
                        store="documents",
                        dataset=spec.collection,
                        field=path,
                        data_class=data_class,
                        category=category,
                        subject=path if subject else None,
                        declared_at=where,
                    )
                )
        problems += [
            f"{file}: documents {spec.collection}.{path}: unclassified (add it to the spec's "
            '"classification" map)'
            for path, leaf in paths.items()
            if leaf and path not in spec.classification
        ]
        entries += _with_subject(declared, f"documents {spec.collection}", problems)
    return entries


# --- raw layer and lake: derived from the sources, per connection -----------------------------


def _stream_entries(root: Path, base: list[Entry], problems: list[str]) -> list[Entry]:
    """Each connection's streams as its destination lands them (``<namespace>.<prefix><stream>``,
    lower case, as the sync engine names them): every selected column takes the class of the
    source column or field; a top-level document object the most sensitive of its sub-fields."""
    try:
        airbyte = load_airbyte_catalog(
            root / "airbyte", sql_dir=root / "sql" / "oltp", mongo_dir=root / "mongo"
        )
    except AirbyteCatalogError as exc:
        problems.append(f"{_relative(root / 'airbyte', root)}: {exc}")
        return []
    source_store = {"postgres": "postgres", "mongodb": "documents"}
    by_source: dict[tuple[str, str], list[Entry]] = {}
    for entry in base:
        by_source.setdefault((entry.store, entry.dataset.lower()), []).append(entry)
    entries: list[Entry] = []
    for connection in airbyte.connections:
        resolved = airbyte.resolve(connection.name)
        store: Store = "lake" if resolved.to_lake else "warehouse_raw"
        kind = resolved.source.kind
        for stream in resolved.streams:
            dataset = f"{connection.namespace}.{connection.prefix}{stream.name}".lower()
            source = by_source.get((source_store[kind], stream.name.lower()), [])
            where = f"airbyte/catalog.yaml: {resolved.source.name} stream {stream.name}"
            selected = airbyte.selected_fields(resolved.source.name, stream)
            columns = list(selected or airbyte.fields[resolved.source.name][stream.name])
            if kind == "mongodb":
                columns.append(EXTRA_COLUMN)
            columns += [c for c in _metadata_columns(kind, stream.sync_mode.incremental)]
            typed = set(airbyte.fields[resolved.source.name][stream.name])
            subject = _stream_subject(source, kind, typed)
            for column in dict.fromkeys(columns):
                derived = _derived(column, source, kind, typed)
                if derived is None:  # its source is unclassified: reported there, once
                    continue
                data_class, category = derived
                entries.append(Entry(store, dataset, column, data_class, category, subject, where))
    return entries


def _metadata_columns(kind: str, incremental: bool) -> list[str]:
    columns = [
        "_airbyte_raw_id",
        "_airbyte_extracted_at",
        "_airbyte_meta",
        "_airbyte_generation_id",
    ]
    if incremental:
        columns += [*CDC_COLUMNS[kind]]
    return columns


def _derived(
    column: str, source: list[Entry], kind: str, typed: set[str]
) -> tuple[DataClass, str | None] | None:
    if column.startswith(METADATA_PREFIXES):
        return DataClass.NON_PERSONAL, METADATA_CATEGORY
    if kind == "postgres":
        found = next((e for e in source if e.field == column), None)
        return (found.data_class, found.category) if found else None
    if column == EXTRA_COLUMN:  # the fields the validator does not name, kept as JSON
        parts = [e for e in source if e.field.split(".")[0] not in typed]
    else:
        parts = [e for e in source if e.field == column or e.field.startswith(f"{column}.")]
        if not parts:
            return None
    data_class = most_sensitive(e.data_class for e in parts)
    categories = {e.category for e in parts if e.data_class == data_class and e.category}
    return data_class, categories.pop() if len(categories) == 1 else None


def _stream_subject(source: list[Entry], kind: str, typed: set[str]) -> str | None:
    """The subject column of a stream; a document subject the validator does not name (so not a
    typed column) is a key of the ``_extra`` JSON column: ``_extra.customer_id``."""
    subject = source[0].subject if source else None
    if subject is None:
        return None
    if kind == "postgres":
        return subject
    return subject if subject.split(".")[0] in typed else f"{EXTRA_COLUMN}.{subject}"


# --- marts: dbt meta ----------------------------------------------------------------------------


# libyaml's safe loader when present: the marts' YAML is most of the catalog's load time.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _normalised(name: str) -> str:
    return name.replace("_", "").lower()


def _mart_entries(root: Path, sources: list[Entry], problems: list[str]) -> list[Entry]:
    directory = root / "dbt_project" / "models" / "marts"
    # A mart column named like a source column or field (UserName, user_name, userName) derives
    # from it where every such source agrees: it must be at least as sensitive as the least of them.
    floor: dict[str, DataClass] = {}
    for entry in sources:
        name = _normalised(entry.field.rsplit(".", 1)[-1])
        known = floor.get(name)
        if known is None or SENSITIVITY[entry.data_class] < SENSITIVITY[known]:
            floor[name] = entry.data_class
    entries: list[Entry] = []
    for path in sorted(directory.glob("*.yml")):
        file = _relative(path, root)
        try:
            document = yaml.load(path.read_text(), Loader=_YAML_LOADER) or {}  # noqa: S506 (safe loaders)
        except yaml.YAMLError as exc:
            problems.append(f"{file}: invalid YAML: {exc}")
            continue
        for model in document.get("models", []):
            declared: list[Entry] = []
            for column in model.get("columns", []):
                where = f"{file}: {model['name']}.{column['name']}"
                config = column.get("config") or {}
                meta = {**(column.get("meta") or {}), **(config.get("meta") or {})}
                if "classification" not in meta:
                    problems.append(f"{where}: unclassified (no meta.classification)")
                    continue
                data_class = _data_class(meta["classification"], where, problems)
                if data_class is None:
                    continue
                source = floor.get(_normalised(column["name"]))
                if source is not None and SENSITIVITY[data_class] < SENSITIVITY[source]:
                    problems.append(
                        f"{where}: {data_class} is less sensitive than its source columns "
                        f"named {column['name']} ({source})"
                    )
                declared.append(
                    Entry(
                        store="marts",
                        dataset=model["name"],
                        field=column["name"],
                        data_class=data_class,
                        category=meta.get("category"),
                        subject=column["name"] if meta.get("subject") is True else None,
                        declared_at=where,
                    )
                )
            entries += _with_subject(declared, f"marts {model['name']}", problems)
    return entries


def load_catalog(root: Path = REPO_ROOT) -> Catalog:
    """Parse every declaration under ``root`` (a checkout: sql/oltp, mongo/collections, airbyte,
    dbt_project/models/marts). No database, no cache: it reads the files each call."""
    problems: list[str] = []
    try:
        oltp = _oltp_entries(root, problems)
        documents = _document_entries(root, problems)
    except (PlatformError, OSError) as exc:  # a spec or migration that cannot be read at all
        raise CatalogError(f"classification catalog: {exc}") from exc
    streams = _stream_entries(root, [*oltp, *documents], problems)
    marts = _mart_entries(root, [*oltp, *documents], problems)
    return Catalog(entries=(*oltp, *documents, *streams, *marts), problems=tuple(problems))
