"""Document collections: specs, indexes (and the backend indexes keyed access uses on FerretDB),
the brief's queries, the validators and the bulk-write helper, on the session's document server."""

import datetime as dt
import threading
import time

import pymongo
import pytest
from bson import CodecOptions, Decimal128, Int64, ObjectId
from bson.raw_bson import RawBSONDocument
from psycopg import sql
from pydantic import SecretStr
from pymongo import UpdateOne, monitoring
from pymongo.errors import DuplicateKeyError, OperationFailure, WriteError

from stripe_platform.docstore import client as docstore
from stripe_platform.docstore import ferretdb, validation
from stripe_platform.docstore.queries import (
    DocumentQuery,
    QueryError,
    load_queries,
    run_query,
    without_elem_match,
)
from stripe_platform.docstore.specs import SpecError, apply_specs, load_specs
from stripe_platform.orchestration.maintenance import (
    IndexCheckError,
    check_document_indexes,
    missing_indexes,
)
from stripe_platform.seed import load
from stripe_platform.showcase import brief_examples

BRIEF_INDEXES = {
    "Customer": [
        ("preferences.device", 1),
        ("preferences.paymentMethod", 1),
        ("preferences.currency", 1),
    ],
    "CustomerReview": [("customer_id", 1), ("rating", 1)],
    "UserInteractionData": [("location.ip", 1)],
    "Transaction": [("transaction_id", 1)],
    "Log": [("user", 1), ("dbname", 1), ("lines.error_severity", 1)],
    "Merchant": [("industry", 1), ("rating.average", 1)],
}
# On FerretDB: _id and each index's first key when it is a top-level field.
KEYED_FIELDS = {
    "Customer": ["_id"],
    "CustomerReview": ["_id", "customer_id"],
    "UserInteractionData": ["_id"],
    "Transaction": ["_id", "transaction_id"],
    "Log": ["_id", "user"],
    "Merchant": ["_id", "industry"],
}
AT = dt.datetime(2025, 9, 9, 14, 49, 21, 808000, tzinfo=dt.UTC)


@pytest.fixture
def ferret(docdb):
    if docstore.server_kind(docdb) != "ferretdb":
        pytest.skip("pins FerretDB v1's behaviour; MONGODB_URI names a MongoDB server")
    return docdb


def test_specs_cover_the_six_collections_with_exactly_the_brief_indexes():
    specs = {s.collection: s for s in load_specs()}
    assert set(specs) == set(BRIEF_INDEXES)
    for name, keys in BRIEF_INDEXES.items():
        assert [list(i.keys.items()) for i in specs[name].indexes] == [keys]
    assert [i.unique for i in specs["Transaction"].indexes] == [True]


def test_apply_creates_indexes_and_is_idempotent(docdb, settings):
    first = apply_specs(docdb, settings)
    assert all(r.created for r in first)
    for name, keys in BRIEF_INDEXES.items():
        info = docdb[name].index_information()
        assert any(list(v["key"]) == keys for v in info.values()), name
    again = apply_specs(docdb, settings)
    assert not any(r.created or r.indexes_created or r.backend_indexes_created for r in again)
    if docstore.server_kind(docdb) == "ferretdb":
        for report in first:
            fields = [entry.split(":")[0] for entry in report.backend_indexes]
            assert fields == KEYED_FIELDS[report.collection], report.collection
            assert len(report.backend_indexes_created) == len(fields)
            assert "enforced by the application" in report.validator
        assert [r.backend_indexes for r in again] == [r.backend_indexes for r in first]


def test_unique_transaction_index_rejects_a_duplicate(docdb, settings):
    apply_specs(docdb, settings)
    docdb.Transaction.insert_one({"transaction_id": 12345, "amount": 1.0})
    with pytest.raises(DuplicateKeyError):
        docdb.Transaction.insert_one({"transaction_id": 12345, "amount": 2.0})
    assert docdb.Transaction.count_documents({}) == 1


# -- keyed access on FerretDB --------------------------------------------------------------------------
def plan_nodes(plan: dict) -> list[tuple[str, str | None]]:
    nodes = [(plan["Node Type"], plan.get("Index Name"))]
    for child in plan.get("Plans", []):
        nodes += plan_nodes(child)
    return nodes


def find_plan(db, filter_: dict) -> list[tuple[str, str | None]]:
    explained = db.command("explain", {"find": "Transaction", "filter": filter_})
    return plan_nodes(explained["queryPlanner"]["Plan"])


def test_keyed_finds_use_the_backend_gin_index_on_ferretdb(ferret, settings):
    ferret.Transaction.insert_many(
        [{"transaction_id": i, "amount": 1.0, "timestamp": AT} for i in range(2_000)]
    )
    some = ferret.Transaction.find_one({"transaction_id": 1234})
    # FerretDB's own btree index on transaction_id cannot serve the pushed-down `@>`: a scan.
    ferret.Transaction.create_index([("transaction_id", 1)], name="transaction_id_1", unique=True)
    assert find_plan(ferret, {"transaction_id": 1234}) == [("Seq Scan", None)]
    assert find_plan(ferret, {"_id": some["_id"]}) == [("Seq Scan", None)]

    report = next(r for r in apply_specs(ferret, settings) if r.collection == "Transaction")
    with ferretdb.backend_connection(settings) as conn:
        table = ferretdb.backend_table(conn, ferret.name, "Transaction")
        gin = {
            name: definition
            for name, definition in conn.execute(
                "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = %s AND "
                "tablename = %s AND indexdef LIKE '%%USING gin%%'",
                (ferret.name, table),
            )
        }
    by_field = dict(entry.split(": ") for entry in report.backend_indexes)
    assert set(gin) == set(by_field.values())
    assert "jsonb_path_ops" in gin[by_field["transaction_id"]]
    assert "fastupdate=off" in gin[by_field["transaction_id"]]  # no pending list after a load
    assert all(len(name) <= 63 for name in gin)
    # An update runs the same backend query as a find (FerretDB's msg_update.go passes its filter
    # to the same Query); FerretDB does not explain updates (it answers with an unfiltered scan),
    # so the find's plan is the proof for both.
    assert find_plan(ferret, {"transaction_id": 1234}) == [
        ("Bitmap Heap Scan", None),
        ("Bitmap Index Scan", by_field["transaction_id"]),
    ]
    assert find_plan(ferret, {"_id": some["_id"]}) == [
        ("Bitmap Heap Scan", None),
        ("Bitmap Index Scan", by_field["_id"]),
    ]
    assert ferret.Transaction.find_one({"transaction_id": 1234})["_id"] == some["_id"]


def test_gin_index_names_are_deterministic_and_short():
    long_table = "x" * 63
    assert ferretdb.gin_index_name(long_table, "transaction_id") == ferretdb.gin_index_name(
        long_table, "transaction_id"
    )
    assert len(ferretdb.gin_index_name(long_table, "a" * 100)) <= 63
    assert ferretdb.gin_index_name(long_table, "a-b") != ferretdb.gin_index_name(long_table, "a_b")
    assert ferretdb.keyed_fields([{"user": 1, "dbname": 1}, {"a.b": 1}, {"_id": 1}]) == [
        "_id",
        "user",
    ]


# -- the brief's queries ---------------------------------------------------------------------------------
def log(n: int, user: str, dbname: str, severities: list[str]) -> dict:
    return {
        "_id": ObjectId(f"{n:024x}"),
        "query_id": n,
        "user": user,
        "dbname": dbname,
        "pid": 1000 + n,
        "session_id": f"s.{n}",
        "session_start": AT,
        "lines": [
            {"timestamp": AT, "error_severity": s, "message": f"line {i}"}
            for i, s in enumerate(severities)
        ],
    }


LOGS = [
    log(1, "admin", "stripe", ["LOG", "ERROR"]),
    log(2, "admin", "stripe", ["LOG"]),
    log(3, "admin", "analytics", ["ERROR"]),
    log(4, "postgres", "stripe", ["ERROR"]),
    log(5, "admin", "stripe", ["ERROR", "FATAL"]),
]
OS_COUNTS = {"Android": 6, "iOS": 5, "Windows": 4, "macOS": 3, "Linux": 2, "ChromeOS": 1}
SESSIONS = [
    {
        "_id": ObjectId(f"{100 + n:024x}"),
        "session_id": f"{os_name}.{k}",
        "session_start": AT,
        "device": {"type": "mobile", "os": os_name},
        "location": {"ip": f"198.51.100.{n}"},
        "events": [],
    }
    for n, (os_name, k) in enumerate(
        (name, k) for name, count in OS_COUNTS.items() for k in range(count)
    )
]
JOHN, AMAZON, OTHER = (ObjectId(f"{n:024d}") for n in (12, 64, 99))


def review(n: int, customer: ObjectId, merchant: ObjectId) -> dict:
    return {
        "_id": ObjectId(f"{200 + n:024x}"),
        "transaction_id": n,
        "customer_id": customer,
        "merchant_id": merchant,
        "rating": 4,
        "timestamp": AT,
    }


REVIEWS = [review(1, JOHN, AMAZON), review(2, JOHN, OTHER), review(3, OTHER, AMAZON)]
REVIEWS.append(review(4, JOHN, AMAZON))


def by_id(docs: list[dict]) -> list[dict]:
    return sorted(docs, key=lambda d: d["_id"])


def test_brief_queries_return_the_right_documents(docdb, settings):
    apply_specs(docdb, settings)
    docdb.Log.insert_many(LOGS)
    docdb.UserInteractionData.insert_many(SESSIONS)
    docdb.CustomerReview.insert_many(REVIEWS)
    queries = load_queries()

    # admin's sessions on the stripe database with an ERROR line: not its LOG-only query, not its
    # error on another database, not postgres's error.
    assert by_id(run_query(docdb, queries["admin-error-logs"])) == [LOGS[0], LOGS[4]]
    assert run_query(docdb, queries["top-operating-systems"]) == [
        {"_id": "Android", "count": 6},
        {"_id": "iOS", "count": 5},
        {"_id": "Windows", "count": 4},
        {"_id": "macOS", "count": 3},
        {"_id": "Linux", "count": 2},
    ]
    assert by_id(run_query(docdb, queries["customer-merchant-reviews"])) == [
        REVIEWS[0],
        REVIEWS[3],
    ]


def test_ferretdb_elem_match_on_an_array_of_documents_matches_nothing(ferret):
    """Why run_query rewrites $elemMatch on FerretDB. When an upgrade fixes the bug this test
    fails: drop the rewrite (queries.without_elem_match) and this test."""
    ferret.Log.insert_many(LOGS)
    as_written = {"lines": {"$elemMatch": {"error_severity": "ERROR"}}}
    assert list(ferret.Log.find(as_written)) == []
    assert list(ferret.Log.aggregate([{"$match": as_written}])) == []
    dotted = by_id(list(ferret.Log.find({"lines.error_severity": "ERROR"})))
    assert [d["query_id"] for d in dotted] == [1, 3, 4, 5]


def test_elem_match_rewrite_takes_one_positive_field_condition_only():
    assert without_elem_match("q", {"u": "a", "lines": {"$elemMatch": {"s": "ERROR"}}}) == {
        "u": "a",
        "lines.s": "ERROR",
    }
    assert without_elem_match("q", {"$or": [{"a": {"$elemMatch": {"b": {"$gte": 3}}}}]}) == {
        "$or": [{"a.b": {"$gte": 3}}]
    }
    values = {"tags": {"$elemMatch": {"$gt": 3, "$lt": 9}}}  # an array of values: works as is
    assert without_elem_match("q", values) == values
    for bad in (
        {"lines": {"$elemMatch": {"s": "ERROR", "code": "42703"}}},
        {"lines": {"$elemMatch": {"n": {"$gte": 2, "$lte": 4}}}},
        {"lines": {"$elemMatch": {"s": {"$ne": "LOG"}}}},
        {"lines": {"$elemMatch": {"s": None}}},
        {"lines": {"$elemMatch": {"s": {"$in": ["ERROR", None]}}}},
        {"lines": {"$elemMatch": {"s": "ERROR"}, "$size": 2}},
    ):
        with pytest.raises(QueryError, match="query 'my-query'"):
            without_elem_match("my-query", bad)


def test_a_query_that_cannot_be_rewritten_is_refused_on_ferretdb(ferret):
    query = DocumentQuery(
        name="two-conditions",
        description="",
        collection="Log",
        find={"lines": {"$elemMatch": {"error_severity": "ERROR", "message": "x"}}},
    )
    with pytest.raises(QueryError, match="query 'two-conditions'.*not one positive field"):
        run_query(ferret, query)


def test_loading_the_sample_twice_changes_nothing(docdb, settings, database):
    apply_specs(docdb, settings)
    keyed = settings.model_copy(update={"pg_database": database})  # its field keys' store
    first = brief_examples.load_documents(docdb, keyed)
    assert brief_examples.load_documents(docdb, keyed) == first
    assert [d["query_id"] for d in run_query(docdb, load_queries()["admin-error-logs"])] == [2]


# -- validators -------------------------------------------------------------------------------------------
def transaction(**changes) -> dict:
    doc = {
        "_id": ObjectId(f"{7:024x}"),
        "transaction_id": 7,
        "transaction_status_id": 2,
        "merchant_id": 3,
        "amount": 12.5,
        "currency_id": 1,
        "device_id": None,
        "customer_email": "a@example.com",
        "AnomalyScore": None,
        "isFraud": 0,
        "timestamp": AT,
    }
    doc.update(changes)
    return {k: v for k, v in doc.items() if v is not ...}


def refusal(collection: str, doc: dict) -> str:
    with pytest.raises(validation.DocumentRefused) as caught:
        validation.check_documents(collection, [doc])
    return str(caught.value)


def test_every_spec_validator_translates_and_the_sample_passes():
    compiled = validation.compile_validators(load_specs())
    assert set(compiled) == set(BRIEF_INDEXES)
    assert compiled["Transaction"].schema["properties"]["timestamp"] == {"type": "date"}
    for collection, docs in brief_examples._documents().items():
        validation.check_documents(collection, docs)


def test_the_application_validator_refuses_what_mongodb_would():
    validation.check_documents("Transaction", [transaction()])
    validation.check_documents("Transaction", [transaction(amount=Decimal128("3.50"))])
    validation.check_documents("Transaction", [transaction(transaction_id=Int64(7))])
    validation.check_documents("Transaction", [transaction(transaction_id=2**40)])  # a long
    cases = {
        "timestamp": transaction(timestamp=...),  # missing required field
        "transaction_id": transaction(transaction_id="7"),  # string, not int/long
        "merchant_id": transaction(merchant_id=3.0),  # double, not int/long
        "currency_id": transaction(currency_id=True),  # bool, not int
        "amount": transaction(amount=Decimal128("-1")),  # minimum 0, on a decimal
        "isFraud": transaction(isFraud=2),  # enum [0, 1]
        "AnomalyScore": transaction(AnomalyScore=1.5),  # maximum 1
    }
    for field, doc in cases.items():
        message = refusal("Transaction", doc)
        assert message.startswith(
            f"Transaction document _id=ObjectId('{7:024x}') refused by the Transaction validator: "
            f"field {field!r}: "
        ), message
    assert "is a required property" in refusal("Transaction", cases["timestamp"])
    assert "is not one of [0, 1]" in refusal("Transaction", cases["isFraud"])

    bad_state = log(9, "admin", "stripe", ["ERROR"])
    bad_state["lines"][0]["state_code"] = "4270"
    assert "field 'lines.0.state_code': '4270' does not match" in refusal("Log", bad_state)
    assert "field 'lines'" in refusal("Log", {**log(9, "a", "b", []), "lines": []})  # minItems
    severity = log(9, "admin", "stripe", ["OOPS"])
    assert "field 'lines.0.error_severity': 'OOPS' is not one of" in refusal("Log", severity)
    preferences = {"device": "Mobile", "paymentMethod": "Wallet", "currency": "EUR"}
    bad_email = {"userName": "x", "email": "no-at", "preferences": preferences, "lastUpdated": AT}
    assert "field 'email'" in refusal("Customer", bad_email)


def test_updates_are_checked_on_what_they_set():
    fraud = {"$set": {"isFraud": 1, "AnomalyScore": 0.9}}
    validation.check_requests("Transaction", [UpdateOne({"transaction_id": 1}, fraud)])
    cases = [
        ("Log", {"$set": {"lines.$.error_severity": "OOPS"}}, r"field 'lines\.\$\.error_severity'"),
        (
            "Customer",
            {"$set": {"preferences": {"device": "Mobile"}}},
            "'preferences.paymentMethod'",
        ),
        ("Transaction", {"$set": {"AnomalyScore": "high"}}, "field 'AnomalyScore'"),
        ("Transaction", {"$unset": {"amount": ""}}, "field 'amount' is required"),
        ("Transaction", {"$inc": {"amount": 1}}, r"operator \$inc cannot be checked"),
    ]
    for collection, update, message in cases:
        with pytest.raises(validation.DocumentRefused, match=message):
            validation.check_requests(collection, [UpdateOne({"_id": 1}, update)])
    upsert = UpdateOne({"transaction_id": 1}, fraud, upsert=True)
    with pytest.raises(validation.DocumentRefused, match="upserting update cannot be checked"):
        validation.check_requests("Transaction", [upsert])


def test_translation_refuses_what_it_does_not_know():
    with pytest.raises(SpecError, match=r"X.\$jsonSchema.properties.a.bsonType: unknown BSON"):
        validation.CollectionValidator(
            "X", {"$jsonSchema": {"properties": {"a": {"bsonType": "integer"}}}}
        )
    with pytest.raises(SpecError, match="keyword not supported"):
        validation.CollectionValidator("X", {"$jsonSchema": {"encrypt": {}}})
    with pytest.raises(SpecError, match=r"\$jsonSchema validators only"):
        validation.CollectionValidator("X", {"amount": {"$gte": 0}})
    draft4 = validation.CollectionValidator(
        "X", {"$jsonSchema": {"properties": {"n": {"minimum": 1, "exclusiveMinimum": True}}}}
    )
    draft4.check_document({"n": 2})
    with pytest.raises(validation.DocumentRefused, match="field 'n'"):
        draft4.check_document({"n": 1})


def test_ferretdb_does_not_enforce_validators(ferret):
    """Why the application checks documents: when FerretDB supports validators this fails."""
    validator = next(s.validator for s in load_specs() if s.collection == "Transaction")
    with pytest.raises(OperationFailure) as created:
        ferret.create_collection("Transaction", validator=validator)
    assert created.value.code == 238  # NotImplemented
    ferret.create_collection("Transaction")
    with pytest.raises(OperationFailure) as modified:
        ferret.command("collMod", "Transaction", validator=validator)
    assert modified.value.code == 238
    ferret.Transaction.insert_one({"no": "fields the validator requires"})  # accepted as is


def test_a_bad_document_refuses_its_whole_batch_on_ferretdb(ferret, settings):
    apply_specs(ferret, settings)
    good = [transaction(_id=ObjectId(f"{n:024x}"), transaction_id=n) for n in range(1, 6)]
    bad = transaction(_id=ObjectId(f"{9:024x}"), transaction_id=9, isFraud=2)
    with pytest.raises(
        validation.DocumentRefused, match=f"_id=ObjectId\\('{9:024x}'\\).*'isFraud'"
    ):
        validation.insert_many(ferret.Transaction, [*good, bad])
    assert ferret.Transaction.count_documents({}) == 0

    validation.insert_many(ferret.Transaction, good)
    updates = [UpdateOne({"transaction_id": n}, {"$set": {"isFraud": 1}}) for n in (1, 2)]
    updates.append(UpdateOne({"transaction_id": 3}, {"$set": {"transaction_status_id": "paid"}}))
    with pytest.raises(
        validation.DocumentRefused,
        match=r"update of Transaction \{'transaction_id': 3\}.*'transaction_status_id'",
    ):
        validation.bulk_write(ferret.Transaction, updates)
    with pytest.raises(validation.DocumentRefused, match="'timestamp' is required"):
        validation.bulk_write(
            ferret.Transaction, [UpdateOne({"transaction_id": 1}, {"$unset": {"timestamp": ""}})]
        )
    assert ferret.Transaction.count_documents({"isFraud": 1}) == 0
    assert ferret.Transaction.count_documents({"timestamp": {"$exists": True}}) == 5


def test_mongodb_enforces_the_validator_itself(real_mongodb, settings):
    apply_specs(real_mongodb, settings)
    with pytest.raises(WriteError, match="Document failed validation"):
        real_mongodb.CustomerReview.insert_one({"rating": 9, "message": "no ids"})


def test_brief_log_query_runs_on_the_logdata_view(real_mongodb, settings, database):
    apply_specs(real_mongodb, settings)
    brief_examples.load_documents(
        real_mongodb, settings.model_copy(update={"pg_database": database})
    )
    assert "LogData" in real_mongodb.list_collection_names()
    found = list(
        real_mongodb.LogData.find(
            {
                "dbname": "stripe",
                "user": "admin",
                "lines": {"$elemMatch": {"error_severity": "ERROR"}},
            }
        )
    )
    assert [d["query_id"] for d in found] == [2]


# -- bulk writes ------------------------------------------------------------------------------------------
class UpdateCommands(monitoring.CommandListener):
    def __init__(self) -> None:
        self.sizes: list[int] = []

    def started(self, event) -> None:
        if event.command_name == "update":
            self.sizes.append(len(event.command["updates"]))

    def succeeded(self, event) -> None:
        pass

    def failed(self, event) -> None:
        pass


def test_bulk_updates_go_in_commands_of_at_most_40_on_ferretdb(ferret, settings):
    """A single update command of ~49 statements or more hangs FerretDB v1 for good: 100 updates
    through the helper must arrive as commands of <= 40 (seen on the wire)."""
    listener = UpdateCommands()
    client = pymongo.MongoClient(docstore.uri(settings), event_listeners=[listener], tz_aware=True)
    try:
        collection = client[ferret.name].Merchant
        collection.insert_many([{"_id": n, "rank": 0} for n in range(100)])
        counts = ferretdb.bulk_write(
            collection, [UpdateOne({"_id": n}, {"$set": {"rank": n + 1}}) for n in range(100)]
        )
        assert listener.sizes == [40, 40, 20]
        assert (counts.matched, counts.modified) == (100, 100)
        assert sorted(d["rank"] for d in collection.find()) == list(range(1, 101))
    finally:
        client.close()


# -- the seed's document inserts ---------------------------------------------------------------------------
def seed_transactions(n: int) -> list[dict]:
    return [transaction(_id=ObjectId(f"{i:024x}"), transaction_id=i) for i in range(1, n + 1)]


def recorded_batches(conn, run_key: str) -> list[tuple[int, int]]:
    return conn.execute(
        "SELECT batch, rows FROM platform.seed_batch WHERE run_key = %s "
        "AND entity = 'doc:Transaction' ORDER BY batch",
        (run_key,),
    ).fetchall()


def test_a_bad_document_stops_the_seed_after_the_batches_before_it(
    ferret, settings, conn, monkeypatch
):
    """Batches 0 and 1 are written and recorded, batch 2 (holding the bad document) is not sent;
    the corrected run resumes at batch 2."""
    monkeypatch.setattr(load, "DOC_BATCH", 50)
    apply_specs(ferret, settings)
    conn.execute("INSERT INTO platform.seed_run (run_key, spec) VALUES ('run', '{}')")
    docs = seed_transactions(200)
    docs[120]["isFraud"] = 2  # transaction 121, in batch 2
    seen: list[int] = []

    def progress(entity: str, rows: int, total: int) -> None:
        seen.append(rows)

    with pytest.raises(
        validation.DocumentRefused,
        match=r"Transaction document _id=ObjectId\('0{22}79'\) refused .*'isFraud'.*nothing of",
    ):
        load._insert_documents(conn, "run", ferret.Transaction, docs, "Transaction", progress, 200)
    assert recorded_batches(conn, "run") == [(0, 50), (1, 50)]
    stored = sorted(d["transaction_id"] for d in ferret.Transaction.find({}, {"transaction_id": 1}))
    assert stored == list(range(1, 101))
    assert seen == [50, 50]

    docs[120]["isFraud"] = 1
    written = load._insert_documents(
        conn, "run", ferret.Transaction, docs, "Transaction", progress, 200
    )
    assert written == 100
    assert recorded_batches(conn, "run") == [(0, 50), (1, 50), (2, 50), (3, 50)]
    assert ferret.Transaction.count_documents({}) == 200
    assert ferret.Transaction.count_documents({"isFraud": 1}) == 1


def test_the_seed_checks_the_next_batch_while_one_is_being_written(
    ferret, settings, conn, monkeypatch
):
    """The first batch's insert waits until the second batch has been checked: a seed that
    checked and wrote in turn would never check it and this insert would report so."""
    monkeypatch.setattr(load, "DOC_BATCH", 50)
    apply_specs(ferret, settings)
    conn.execute("INSERT INTO platform.seed_run (run_key, spec) VALUES ('run', '{}')")
    docs = seed_transactions(100)
    checked_second = threading.Event()
    overlapped: list[bool] = []
    real_check = validation.check_documents

    def check(collection: str, batch: list[dict]) -> None:
        real_check(collection, batch)
        if batch[0]["transaction_id"] == 51:
            checked_second.set()

    class FirstInsertWaits:
        def __init__(self, collection) -> None:
            self._collection = collection
            self.database, self.name = collection.database, collection.name

        def insert_many(self, batch, ordered: bool):
            if batch[0]["transaction_id"] == 1:
                overlapped.append(checked_second.wait(timeout=30))
            return self._collection.insert_many(batch, ordered=ordered)

    monkeypatch.setattr(validation, "check_documents", check)
    written = load._insert_documents(
        conn, "run", FirstInsertWaits(ferret.Transaction), docs, "Transaction", lambda *_: None, 100
    )
    assert overlapped == [True]
    assert written == 100
    assert recorded_batches(conn, "run") == [(0, 50), (1, 50)]
    assert ferret.Transaction.count_documents({}) == 100


# -- index maintenance ------------------------------------------------------------------------------------
def test_maintenance_reports_and_repairs_a_dropped_backend_index(ferret, settings):
    own = settings.model_copy(update={"mongodb_database": ferret.name})
    before = missing_indexes(ferret, settings=own)
    assert before["Transaction"] == [
        "transaction_id_1",
        "_id (backend GIN index)",
        "transaction_id (backend GIN index)",
    ]
    apply_specs(ferret, own)
    assert missing_indexes(ferret, settings=own) == {}

    with ferretdb.backend_connection(own) as conn:
        table = ferretdb.backend_table(conn, ferret.name, "Transaction")
        gin_on_transaction_id = (
            "SELECT indexname FROM pg_indexes WHERE schemaname = %s AND tablename = %s "
            "AND indexdef LIKE '%%USING gin%%' AND indexdef LIKE '%%''transaction_id''%%'"
        )
        [(name,)] = conn.execute(gin_on_transaction_id, (ferret.name, table)).fetchall()
        conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(ferret.name, name)))
        assert conn.execute(gin_on_transaction_id, (ferret.name, table)).fetchall() == []

        assert missing_indexes(ferret, settings=own) == {
            "Transaction": [f"transaction_id (backend GIN index {name})"]
        }
        assert missing_indexes(ferret) == {}  # the spec indexes alone are all there
        with pytest.raises(IndexCheckError, match="transaction_id \\(backend GIN index"):
            check_document_indexes(own, repair=False)

        repaired = check_document_indexes(own)
        assert repaired["created"] == {"Transaction": [name]}
        assert conn.execute(gin_on_transaction_id, (ferret.name, table)).fetchall() == [(name,)]
    assert missing_indexes(ferret, settings=own) == {}


# -- set_fields: fields by key, set-based on the embedded FerretDB --------------------------------------
LATER = dt.datetime(2026, 3, 4, 5, 6, 7, 891000, tzinfo=dt.UTC)
TRANSACTION_FIELDS = [  # transaction()'s order, as inserted
    "_id",
    "transaction_id",
    "transaction_status_id",
    "merchant_id",
    "amount",
    "currency_id",
    "device_id",
    "customer_email",
    "AnomalyScore",
    "isFraud",
    "timestamp",
]


def score_updates(ids) -> list:
    """Existing fields (AnomalyScore null -> double, isFraud int, merchant_id int -> long,
    device_id null -> null) and new ones of each simple type, given out of name order."""
    return [
        (
            i,
            {
                "scored_at": LATER,
                "AnomalyScore": i / 1_000,
                "isFraud": 1,
                "merchant_id": Int64(3_000_000_000 + i),
                "reviewed": i % 2 == 0,
                "model": "lgbm-3",
                "device_id": None,
                "model_version": 3,
            },
        )
        for i in ids
    ]


def raw_documents(db) -> list[bytes]:
    raw = db.Transaction.with_options(codec_options=CodecOptions(document_class=RawBSONDocument))
    return [d.raw for d in raw.find().sort("_id", 1)]


@pytest.fixture
def via_protocol(ferret, settings):
    """A second database on the same FerretDB reached through MONGODB_URI: its backend is out of
    the platform's reach, so set_fields sends update commands there."""
    own = settings.model_copy(
        update={
            "mongodb_uri": SecretStr(docstore.embedded_server(settings).uri()),
            "mongodb_database": f"{ferret.name}_protocol",
        }
    )
    db = docstore.connect(own)
    yield db, own
    db.client.drop_database(db.name)
    db.client.close()


def test_set_fields_on_the_backend_matches_update_commands(ferret, settings, via_protocol):
    protocol_db, protocol_settings = via_protocol
    docs = seed_transactions(60)
    for db, own in ((ferret, settings), (protocol_db, protocol_settings)):
        apply_specs(db, own)
        db.Transaction.insert_many(docs)
    odd = {  # another set of fields (a second UPDATE), with text and numbers JSON escapes
        "note": 'é😀\n"\\',
        "born": dt.datetime(1960, 1, 1, 0, 0, 0, 999),  # before 1970, naive (UTC), ms truncated
        "tiny": 1e-7,
        "huge": 1e22,
        "whole": 2.0,
    }
    updates = [*score_updates(range(2, 61, 2)), *score_updates([1_000, 999]), (1, odd)]

    done = validation.set_fields(ferret, settings, "Transaction", "transaction_id", updates)
    assert (done.path, done.matched, done.missing, done.statements) == (
        "backend",
        31,
        [1_000, 999],
        2,
    )

    # Read back through pymongo: the values with their types, the old fields in place, the new
    # ones appended in byte order of their names (FerretDB's $set sorts them).
    ten = ferret.Transaction.find_one({"transaction_id": 10})
    assert list(ten) == [*TRANSACTION_FIELDS, "model", "model_version", "reviewed", "scored_at"]
    expected = {
        "AnomalyScore": (0.01, float),
        "isFraud": (1, int),
        "merchant_id": (3_000_000_010, Int64),
        "device_id": (None, type(None)),
        "model": ("lgbm-3", str),
        "model_version": (3, int),
        "reviewed": (True, bool),
        "scored_at": (LATER, dt.datetime),
    }
    assert {k: (ten[k], type(ten[k])) for k in expected} == expected
    assert ferret.Transaction.find_one({"transaction_id": 11}) == docs[10]  # not in the updates
    one = ferret.Transaction.find_one({"transaction_id": 1})
    assert list(one) == [*TRANSACTION_FIELDS, "born", "huge", "note", "tiny", "whole"]
    assert {k: (one[k], type(one[k])) for k in odd} == {
        "note": ('é😀\n"\\', str),
        "born": (dt.datetime(1960, 1, 1, tzinfo=dt.UTC), dt.datetime),
        "tiny": (1e-7, float),
        "huge": (1e22, float),
        "whole": (2.0, float),
    }
    untouched = {
        k: ten[k] for k in ("transaction_status_id", "amount", "customer_email", "timestamp")
    }
    assert untouched == {
        "transaction_status_id": 2,
        "amount": 12.5,
        "customer_email": "a@example.com",
        "timestamp": AT,
    }
    assert ferret.Transaction.count_documents({"isFraud": 1}) == 30  # a filter on the new values
    assert ferret.Transaction.find_one({"scored_at": LATER, "transaction_id": 60})["reviewed"]

    by_commands = validation.set_fields(
        protocol_db, protocol_settings, "Transaction", "transaction_id", updates
    )
    assert (by_commands.path, by_commands.matched, by_commands.missing) == (
        "protocol",
        31,
        [1_000, 999],
    )
    # FerretDB's own $set and the backend path stored the same documents, byte for byte.
    written = raw_documents(ferret)
    assert written == raw_documents(protocol_db)

    again = validation.set_fields(ferret, settings, "Transaction", "transaction_id", updates)
    assert (again.matched, again.missing) == (31, [1_000, 999])
    assert raw_documents(ferret) == written  # a re-run changes nothing


def test_set_fields_refuses_before_writing_anything(ferret, settings):
    apply_specs(ferret, settings)
    docs = seed_transactions(20)
    ferret.Transaction.insert_many(docs)
    good = [(i, {"AnomalyScore": 0.5, "isFraud": 0}) for i in range(1, 20)]

    def refused(error, match, updates, key_field="transaction_id"):
        with pytest.raises(error, match=match):
            validation.set_fields(ferret, settings, "Transaction", key_field, updates)
        assert list(ferret.Transaction.find().sort("_id", 1)) == docs

    # the validator: AnomalyScore is at most 1, isFraud 0 or 1
    refused(
        validation.DocumentRefused,
        "transaction_id=20.*'AnomalyScore'",
        [*good, (20, {"AnomalyScore": 1.5})],
    )
    refused(validation.DocumentRefused, "'isFraud'", [*good, (20, {"isFraud": True})])
    # what set_fields does not write
    refused(ferretdb.FieldUpdateRefused, "Decimal128", [*good, (20, {"x": Decimal128("1")})])
    refused(ferretdb.FieldUpdateRefused, "not a finite double", [*good, (20, {"x": float("inf")})])
    refused(ferretdb.FieldUpdateRefused, "more than once", [*good, (1.0, {"isFraud": 1})])
    refused(ferretdb.FieldUpdateRefused, "does not change '_id'", [(1, {"_id": 5})])
    refused(ferretdb.FieldUpdateRefused, "top-level field name", [(1, {"a.b": 5})])
    refused(ferretdb.FieldUpdateRefused, "a key is a number", [(AT, {"isFraud": 1})])
    refused(ferretdb.FieldUpdateRefused, "has no unique index", good, key_field="merchant_id")


def test_set_fields_joins_on_the_keys_gin_index(ferret, settings):
    apply_specs(ferret, settings)
    ferret.Transaction.insert_many(seed_transactions(2_000))
    with ferretdb.backend_connection(settings) as conn:
        table = ferretdb.backend_table(conn, ferret.name, "Transaction")
        gin = ferretdb.gin_index_name(table, "transaction_id")
        conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(ferret.name, gin)))
        conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(ferret.name, table)))
    updates = [(i, {"AnomalyScore": 0.5, "isFraud": 1}) for i in range(1, 2_001, 7)]

    done = validation.set_fields(ferret, settings, "Transaction", "transaction_id", updates)
    assert done.matched == len(updates)  # and the missing index was made first
    plan = plan_nodes(
        ferretdb.explain_set_fields(settings, ferret.name, "Transaction", "transaction_id", updates)
    )
    assert ("Bitmap Index Scan", gin) in plan
    assert ("Seq Scan", None) not in plan
    assert ferret.Transaction.count_documents({"isFraud": 1}) == len(updates)


def test_set_fields_rolls_back_a_chunk_whose_key_matches_two_documents(ferret, settings):
    ferret.Merchant.insert_many([{"_id": n, "batch": min(n, 2), "rank": 0} for n in range(6)])
    with pytest.raises(ferretdb.BackendError, match="batch=2 matches more than one document"):
        ferretdb.set_fields(
            settings, ferret.name, "Merchant", "batch", [(b, {"rank": 1}) for b in range(3)]
        )
    assert [d["rank"] for d in ferret.Merchant.find()] == [0] * 6


def test_set_fields_waits_for_a_concurrent_writer_and_keeps_its_change(ferret, settings):
    """The UPDATE locks rows like any: a writer holding a document's row (as FerretDB's own
    UPDATE by _id does in its transaction) makes it wait, and it then writes over the committed
    row, the writer's change kept."""
    apply_specs(ferret, settings)
    ferret.Transaction.insert_many(seed_transactions(5))
    result: list = []
    with ferretdb.backend_connection(settings) as writer:
        table = sql.Identifier(
            ferret.name, ferretdb.backend_table(writer, ferret.name, "Transaction")
        )
        with writer.transaction():
            writer.execute(
                sql.SQL(
                    "UPDATE {} SET _jsonb = jsonb_set(_jsonb, '{{merchant_id}}', '42') "
                    "WHERE _jsonb -> 'transaction_id' = '3'"
                ).format(table)
            )
            backend_pid = writer.info.backend_pid
            thread = threading.Thread(
                target=lambda: result.append(
                    validation.set_fields(
                        ferret,
                        settings,
                        "Transaction",
                        "transaction_id",
                        [(i, {"AnomalyScore": 0.75, "isFraud": 1}) for i in range(1, 6)],
                        writers=1,
                    )
                )
            )
            thread.start()
            with ferretdb.backend_connection(settings) as watcher:
                # observed, not timed: a session waits for a lock the writer holds
                while not watcher.execute(
                    "SELECT 1 FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))",
                    (backend_pid,),
                ).fetchone():
                    assert thread.is_alive()
                    time.sleep(0.01)
            assert not result
        thread.join()
    assert result[0].matched == 5
    three = ferret.Transaction.find_one({"transaction_id": 3})
    assert (three["merchant_id"], three["AnomalyScore"], three["isFraud"]) == (42, 0.75, 1)
