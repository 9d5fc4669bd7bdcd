"""Document collections: specs, indexes, the brief's queries, and stand-in persistence."""

import subprocess
import sys

import pytest
from pymongo.errors import DuplicateKeyError, WriteError

from stripe_platform.docstore.queries import load_queries, run_query
from stripe_platform.docstore.specs import apply_specs, load_specs
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


def test_specs_cover_the_six_collections_with_exactly_the_brief_indexes():
    specs = {s.collection: s for s in load_specs()}
    assert set(specs) == set(BRIEF_INDEXES)
    for name, keys in BRIEF_INDEXES.items():
        assert [list(i.keys.items()) for i in specs[name].indexes] == [keys]
    assert [i.unique for i in specs["Transaction"].indexes] == [True]


def test_apply_creates_indexes_and_is_idempotent(docdb):
    first = apply_specs(docdb)
    assert all(r.created for r in first)
    for name, keys in BRIEF_INDEXES.items():
        info = docdb[name].index_information()
        assert any(list(v["key"]) == keys for v in info.values()), name
    again = apply_specs(docdb)
    assert not any(r.created or r.indexes_created for r in again)


def test_unique_transaction_index_rejects_a_duplicate(docdb):
    apply_specs(docdb)
    docdb.Transaction.insert_one({"transaction_id": 12345, "amount": 1.0})
    with pytest.raises(DuplicateKeyError):
        docdb.Transaction.insert_one({"transaction_id": 12345, "amount": 2.0})
    assert docdb.Transaction.count_documents({}) == 1


def run(docdb, name):
    return run_query(docdb, load_queries()[name])


def test_brief_queries_return_the_right_documents(docdb):
    apply_specs(docdb)
    brief_examples.load_documents(docdb)

    admin_errors = run(docdb, "admin-error-logs")
    # Only admin's session on the stripe database that has an ERROR line (not its plain LOG
    # query, not its error on another database, not postgres's error).
    assert [d["query_id"] for d in admin_errors] == [2]

    top = run(docdb, "top-operating-systems")
    counts = {}
    for doc in docdb.UserInteractionData.find():
        counts[doc["device"]["os"]] = counts.get(doc["device"]["os"], 0) + 1
    expected = sorted(counts.values(), reverse=True)[:5]
    assert [d["count"] for d in top] == expected
    assert len(top) == 5 and top[0]["_id"] == max(counts, key=counts.get)

    reviews = run(docdb, "customer-merchant-reviews")
    assert sorted(d["transaction_id"] for d in reviews) == [1, brief_examples.BRIEF_TRANSACTION_ID]
    assert all(d["customer_id"] == brief_examples.JOHN_DOC_ID for d in reviews)
    assert all(d["merchant_id"] == brief_examples.AMAZON_DOC_ID for d in reviews)


def test_loading_the_sample_twice_changes_nothing(docdb):
    first = brief_examples.load_documents(docdb)
    assert brief_examples.load_documents(docdb) == first


def test_standin_data_is_seen_by_another_process(tmp_path):
    from stripe_platform.config import load_settings
    from stripe_platform.docstore.client import connect, is_standin

    s = load_settings(home=tmp_path)
    db = connect(s)
    if not is_standin(db):
        pytest.skip("persistence across processes is a property of the stand-in")
    db.Merchant.insert_one({"name": "Amazon", "industry": "Retail"})
    code = (
        "from stripe_platform.config import load_settings;"
        "from stripe_platform.docstore.client import connect;"
        f"print(connect(load_settings(home={str(tmp_path)!r})).Merchant.count_documents({{}}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"


def test_validator_rejects_a_malformed_document(real_mongodb):
    apply_specs(real_mongodb)
    with pytest.raises(WriteError, match="Document failed validation"):
        real_mongodb.CustomerReview.insert_one({"rating": 9, "message": "no ids"})


def test_brief_log_query_runs_on_the_logdata_view(real_mongodb):
    apply_specs(real_mongodb)
    brief_examples.load_documents(real_mongodb)
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
