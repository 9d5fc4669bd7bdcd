"""The brief's ACID example, the atomic status-change operation and the append-only audit trail."""

import psycopg
import pytest

from stripe_platform.oltp.status import StatusChangeError, change_status
from stripe_platform.paths import SQL_EXAMPLES_DIR
from stripe_platform.showcase import brief_examples
from stripe_platform.showcase.demo import run_brief_acid_example


def status_of(conn, tx_id):
    return conn.execute(
        "SELECT s.Name FROM Transaction t JOIN TransactionStatus s ON s.ID = t.TransactionStatusID "
        "WHERE t.ID = %s",
        (tx_id,),
    ).fetchone()[0]


def changes_of(conn, tx_id):
    return conn.execute(
        "SELECT FromStatusID, ToStatusID, Reason, UpdatedBy FROM TransactionStateChanges "
        "WHERE TransactionID = %s ORDER BY ID",
        (tx_id,),
    ).fetchall()


def test_brief_acid_example_runs_as_written(loaded):
    assert status_of(loaded, 12345) == "completed"
    run_brief_acid_example(loaded)
    assert status_of(loaded, 12345) == "refunded"
    assert changes_of(loaded, 12345) == [(1, 2, "Exceptional refund", "Customer service")]
    trail_dt = loaded.execute(
        "SELECT TransactionDateTime FROM TransactionStateChanges WHERE TransactionID = 12345"
    ).fetchone()[0]
    assert trail_dt == brief_examples.BRIEF_TIMESTAMP


def test_failure_between_the_two_steps_leaves_neither(loaded):
    script = (SQL_EXAMPLES_DIR / "acid_status_change.sql").read_text()
    broken = script.replace("VALUES (012345, 1, 2,", "VALUES (012345, 1, 99,")
    assert broken != script
    with pytest.raises(psycopg.errors.IntegrityError):
        try:
            loaded.execute(broken)
        finally:
            loaded.execute("ROLLBACK")
    assert status_of(loaded, 12345) == "completed"
    assert changes_of(loaded, 12345) == []


def test_service_changes_status_and_records_it(loaded):
    change = change_status(loaded, 12345, "disputed", reason="customer dispute", updated_by="ops")
    assert (change.from_status, change.to_status) == ("completed", "disputed")
    change_status(loaded, 12345, "charged_back", reason="lost", updated_by="ops")
    assert status_of(loaded, 12345) == "charged_back"
    assert changes_of(loaded, 12345) == [(1, 5, "customer dispute", "ops"), (5, 6, "lost", "ops")]


def test_invalid_transition_is_rejected_and_changes_nothing(loaded):
    change_status(loaded, 12345, "refunded", reason="refund", updated_by="ops")
    before = loaded.execute("SELECT UpdatedAt FROM Transaction WHERE ID = 12345").fetchone()
    with pytest.raises(StatusChangeError, match="refunded -> pending"):
        change_status(loaded, 12345, "pending", reason="oops", updated_by="ops")
    assert status_of(loaded, 12345) == "refunded"
    assert len(changes_of(loaded, 12345)) == 1
    assert loaded.execute("SELECT UpdatedAt FROM Transaction WHERE ID = 12345").fetchone() == before


def test_raw_update_cannot_bypass_the_transition_rules(loaded):
    with pytest.raises(psycopg.errors.CheckViolation, match="completed -> pending"):
        loaded.execute("UPDATE Transaction SET TransactionStatusID = 3 WHERE ID = 12345")


def test_unknown_transaction_and_status_are_clear_errors(loaded):
    with pytest.raises(StatusChangeError, match="transaction 999999 does not exist"):
        change_status(loaded, 999999, "refunded", reason="x", updated_by="ops")
    with pytest.raises(StatusChangeError, match="unknown status 'lost'"):
        change_status(loaded, 12345, "lost", reason="x", updated_by="ops")


def test_audit_row_for_a_missing_transaction_is_refused(loaded):
    with pytest.raises(psycopg.errors.ForeignKeyViolation, match="does not exist"):
        loaded.execute(
            "INSERT INTO TransactionStateChanges (TransactionID, FromStatusID, ToStatusID, UpdatedBy)"
            " VALUES (424242, 1, 2, 'x')"
        )


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE TransactionStateChanges SET Reason = 'rewritten'",
        "DELETE FROM TransactionStateChanges",
        "TRUNCATE TransactionStateChanges",
    ],
)
def test_state_changes_are_append_only_even_for_the_owner(loaded, statement):
    change_status(loaded, 12345, "refunded", reason="refund", updated_by="ops")
    owner = loaded.execute(
        "SELECT tableowner FROM pg_tables WHERE tablename = 'transactionstatechanges'"
    ).fetchone()[0]
    assert loaded.execute("SELECT current_user").fetchone()[0] == owner
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
        loaded.execute(statement)
    assert changes_of(loaded, 12345) == [(1, 2, "refund", "ops")]
