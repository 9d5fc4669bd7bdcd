"""The access policy file (security/policy.py): what it says, and every bad input refused with the
line named and nothing applied."""

from __future__ import annotations

import datetime as dt
import json
import textwrap
from pathlib import Path

import pytest
from psycopg import sql
from typer.testing import CliRunner

from stripe_platform.cli import app as cli_app
from stripe_platform.config import get_settings
from stripe_platform.paths import REPO_ROOT
from stripe_platform.security import access_postgres
from stripe_platform.security.access import apply_all
from stripe_platform.security.policy import PolicyError, check_policy, load_policy

NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)

# A small valid policy; the bad inputs below replace or add one line of it.
BASE = """\
version: 1
roles:
  admin:
    postgres:
      - GRANT ALL PRIVILEGES ON DATABASE mydb TO Admin
    clear: [pii, pci]
    api: [access.admin]
  readonlyuser:
    postgres:
      - GRANT SELECT ON ALL TABLES IN SCHEMA public TO ReadOnlyUser
groups:
  engineers: [readonlyuser]
users:
  ann:
    roles: [admin]
"""


def write(tmp_path: Path, text: str, name: str = "policy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_the_default_policy_holds_the_briefs_roles_and_grants_as_written():
    policy = load_policy(path=REPO_ROOT / "access" / "policy.yaml")
    assert set(policy.roles) == {"admin", "developer", "readonlyuser", "analyst", "fraud_service"}
    texts = {role: [r.text for r in policy.roles[role].postgres] for role in policy.roles}
    # The brief's three GRANT statements, each as the brief writes it (`mydb`, `TO Admin`).
    assert "GRANT ALL PRIVILEGES ON DATABASE mydb TO Admin" in texts["admin"][0]
    assert any(
        t.startswith(
            "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO Developer"
        )
        for t in texts["developer"]
    )
    assert "GRANT SELECT ON ALL TABLES IN SCHEMA public TO ReadOnlyUser" in texts["readonlyuser"]
    # Below admin, nothing restricted is read in clear.
    for role in ("developer", "readonlyuser", "analyst", "fraud_service"):
        assert policy.roles[role].clear == {"non_personal"}
    assert policy.roles["admin"].clear == {"non_personal", "pii_quasi", "pii", "pci", "credential"}
    assert policy.roles["fraud_service"].api == {"fraud.score"}
    assert policy.roles["analyst"].warehouse == ("marts_masked",)
    assert policy.groups["platform-admins"] == ("admin",)
    # One machine identity: the checkout scoring payments, on the API only, with no end date.
    (checkout,) = policy.users.values()
    assert checkout.name == "checkout-service" and checkout.roles == ("fraud_service",)
    assert checkout.stores == {"api"} and checkout.until is None
    assert policy.mfa.step_up_seconds == 600 and policy.mfa.max_failures == 5
    assert check_policy(policy, dt.datetime.now(dt.UTC)) == []


def test_questions_the_api_and_the_targets_ask(tmp_path):
    path = write(
        tmp_path,
        BASE
        + """\
  joe:
    roles: [readonlyuser]
    until: 2026-05-31
""",
    )
    policy = load_policy(path=path)
    # A date means through that whole day (UTC).
    assert policy.users["joe"].until == dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
    before, after = dt.datetime(2026, 5, 31, 23, 59, tzinfo=dt.UTC), NOW
    assert policy.roles_for("joe", now=before) == {"readonlyuser"}
    assert policy.roles_for("joe", now=after) == frozenset()  # ended
    assert policy.roles_for("joe", ["engineers", "unknown-group"], now=after) == {"readonlyuser"}
    assert policy.roles_for("stranger", ["engineers"]) == {"readonlyuser"}
    assert policy.roles_for("ann") == {"admin"}
    assert policy.may_read_clear(["admin"], "pii") and not policy.may_read_clear(
        ["admin"], "credential"
    )
    assert not policy.may_read_clear(["readonlyuser"], "pii_quasi")
    assert policy.may_read_clear(["readonlyuser"], "non_personal")
    assert policy.has_scope(["admin"], "access.admin") and not policy.has_scope(
        ["readonlyuser"], "fraud.score"
    )
    with pytest.raises(PolicyError, match="unknown API scope 'fraud.scores'"):
        policy.has_scope(["admin"], "fraud.scores")
    with pytest.raises(PolicyError, match="unknown data class 'secret'"):
        policy.may_read_clear(["admin"], "secret")
    # The default MFA rules: pii, pci, credential and bulk exports need a fresh second factor.
    assert policy.needs_step_up(["pii"]) and policy.needs_step_up([], bulk=True)
    assert not policy.needs_step_up(["pii_quasi", "non_personal"])
    # Expired entries are what apply refuses on, with the line named.
    assert check_policy(policy, before) == []
    (problem,) = check_policy(policy, after)
    assert problem.startswith(f"{path}:16: user joe: temporary grant ended at 2026-06-01T00:00:00")


def test_the_policy_is_cached_until_the_file_changes(tmp_path):
    path = write(tmp_path, BASE)
    first = load_policy(path=path)
    assert load_policy(path=path) is first
    path.write_text(BASE.replace("ann:", "anne:"))
    second = load_policy(path=path)
    assert second is not first and set(second.users) == {"anne"}


# (what replaces the marked line of BASE or is appended, the line named, what the message says)
BAD = {
    "unknown role of a user": (BASE.replace("roles: [admin]", "roles: [auditor]"), 15, "unknown role 'auditor'"),
    "unknown role of a group": (BASE.replace("engineers: [readonlyuser]", "engineers: [developer]"), 12, "unknown role 'developer'"),
    "grant to a table that does not exist": (
        BASE.replace("ON DATABASE mydb TO Admin", "ON DATABASE mydb TO Admin\n      - GRANT SELECT ON Invoices"),
        6, "no table 'invoices' in the OLTP schema",
    ),
    "grant to a schema that does not exist": (
        BASE.replace("IN SCHEMA public TO", "IN SCHEMA billing TO"), 10, "no schema 'billing'",
    ),
    "grant on the key store": (
        BASE.replace("IN SCHEMA public TO", "IN SCHEMA keys TO"), 10, "schema keys belongs to the platform",
    ),
    "overlapping rule": (
        BASE.replace("TO ReadOnlyUser", "TO ReadOnlyUser\n      - GRANT SELECT ON Merchant"),
        11, "overlaps line 10 (SELECT on table merchant granted twice)",
    ),
    "contradicting rules": (
        BASE.replace("ON ALL TABLES IN SCHEMA public TO ReadOnlyUser", "ON Merchant\n      - REVOKE SELECT ON Merchant"),
        11, "contradicts line 10",
    ),
    "a revoke of nothing granted": (
        BASE.replace("TO ReadOnlyUser", "TO ReadOnlyUser\n      - REVOKE DELETE ON Merchant"),
        11, "revokes DELETE on merchant, which no GRANT of this role gives",
    ),
    "a rule naming another role": (BASE.replace("TO ReadOnlyUser", "TO Developer"), 10, "under role readonlyuser but names Developer"),
    "column lists": (BASE.replace("GRANT SELECT ON ALL", "GRANT SELECT (email) ON ALL"), 10, "no column lists"),
    "not a GRANT": (BASE.replace("GRANT ALL PRIVILEGES ON DATABASE mydb TO Admin", "ALLOW everything"), 5, "expected `GRANT"),
    "unknown privilege": (BASE.replace("GRANT SELECT ON ALL", "GRANT READ ON ALL"), 10, "'READ' is not a privilege on a tables"),
    "user listed twice": (BASE + "  ann:\n    roles: [readonlyuser]\n", 16, "'ann' is listed twice (first at line 14)"),
    "role listed twice": (BASE.replace("groups:", "  admin:\n    clear: []\ngroups:"), 11, "'admin' is listed twice (first at line 3)"),
    "unknown data class": (BASE.replace("clear: [pii, pci]", "clear: [pii, card]"), 6, "unknown data class 'card'"),
    "unknown scope": (BASE.replace("api: [access.admin]", "api: [access.root]"), 7, "unknown API scope 'access.root'"),
    "unknown store": (BASE + "    stores: [lake]\n", 16, "unknown store 'lake'"),
    "a date that does not exist": (BASE + "    until: 2026-02-30\n", 16, "until '2026-02-30' is not a date"),
    "a time without its zone": (BASE + "    until: 2026-02-01T10:00:00\n", 16, "give a time zone"),
    "not a date at all": (BASE + "    until: next friday\n", 16, "'next friday' is not a date"),
    "unknown key": (BASE.replace("groups:", "owners:"), 11, "unknown key 'owners'"),
    "bad YAML": (BASE.replace("roles: [admin]", "roles: [admin"), 16, "not valid YAML"),
    "a role named like a platform role": (BASE.replace("  readonlyuser:", "  keyadmin:"), 8, "not pg_* nor a platform role"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_bad_policies_are_refused_with_the_line_named(case, tmp_path):
    text, line, message = BAD[case]
    path = write(tmp_path, text)
    with pytest.raises(PolicyError) as refused:
        load_policy(path=path)
    problems = [p.strip() for p in str(refused.value).splitlines()]
    assert any(p.startswith(f"{path}:{line}: ") and message in p for p in problems), problems


def test_every_problem_is_listed_at_once(tmp_path):
    text = BASE.replace("roles: [admin]", "roles: [auditor]").replace(
        "api: [access.admin]", "api: [x]"
    )
    with pytest.raises(PolicyError, match=r"2 problem\(s\)") as refused:
        load_policy(path=write(tmp_path, text))
    lines = str(refused.value).splitlines()
    assert ":7: " in lines[1] and ":15: " in lines[2]  # in file order


def test_cli_check_names_the_line(tmp_path, monkeypatch):
    monkeypatch.delenv("STRIPE_PLATFORM_ACCESS_POLICY", raising=False)
    runner = CliRunner()
    good = runner.invoke(cli_app, ["access", "check", "--policy", str(write(tmp_path, BASE))])
    assert good.exit_code == 0, good.output
    assert "policy OK" in good.output
    bad = write(tmp_path, BAD["grant to a table that does not exist"][0], "bad.yaml")
    refused = runner.invoke(cli_app, ["access", "check", "--policy", str(bad)])
    assert refused.exit_code == 1
    assert f"{bad}:6: role admin: 'GRANT SELECT ON Invoices': no table 'invoices'" in refused.output
    as_json = runner.invoke(cli_app, ["access", "check", "--policy", str(bad), "--json"])
    assert as_json.exit_code == 1
    (problem,) = json.loads(as_json.stdout)["problems"]
    assert problem.startswith(f"{bad}:6: ")
    ended = write(tmp_path, BASE + "    until: 2020-01-01\n", "ended.yaml")
    expired = runner.invoke(cli_app, ["access", "check", "--policy", str(ended)])
    assert expired.exit_code == 1
    assert (
        f"{ended}:14: user ann: temporary grant ended at 2020-01-02T00:00:00+00:00"
        in expired.output
    )
    get_settings.cache_clear()


def test_an_expired_temporary_grant_is_refused_and_nothing_is_applied(
    settings, database, conn, tmp_path
):
    """The policy adds a grant and a contractor whose end date passed: apply refuses it all, names
    the line; plan (and revoke-expired) still work with such a policy."""
    s = settings.model_copy(update={"pg_database": database})
    text = (REPO_ROOT / "access" / "policy.yaml").read_text()
    text = text.replace(
        "  # jane.contractor:\n", "  fresh_hire:\n    roles: [readonlyuser]\n  old_contractor:\n"
    ).replace(
        "  #   roles: [readonlyuser]\n  #   until: 2027-03-31\n",
        "    roles: [readonlyuser]\n    until: 2020-03-31\n",
    )
    path = write(tmp_path, text)
    line = next(i for i, t in enumerate(text.splitlines(), 1) if t.startswith("  old_contractor:"))
    policy = load_policy(path=path)
    now = dt.datetime.now(dt.UTC)
    # A database cloned from the migrated template lacks the database-level grants (CREATE
    # DATABASE does not copy them): the default policy puts them back first.
    default = load_policy(path=REPO_ROOT / "access" / "policy.yaml")
    access_postgres.apply(s, default, access_postgres.plan(s, default, now))
    planned = access_postgres.plan(s, policy, now)
    assert [c.statement for c in planned] == [
        "CREATE ROLE fresh_hire LOGIN IN ROLE readonlyuser, access_policy_user"
    ]
    for attempt in (
        lambda: apply_all(s, policy, now, targets=["postgres"]),
        lambda: access_postgres.apply(s, policy, planned),
    ):
        with pytest.raises(PolicyError, match="nothing applied") as refused:
            attempt()
        assert f"{path}:{line}: user old_contractor: temporary grant ended at 2020-04-01" in str(
            refused.value
        )
    assert conn.execute(
        "SELECT count(*) FROM pg_roles WHERE rolname = 'fresh_hire'"
    ).fetchone() == (0,)
    assert access_postgres.plan(s, policy, now) == planned
    # Safety net for a failure above: never leave a login behind in the shared cluster.
    conn.execute(sql.SQL("DROP ROLE IF EXISTS fresh_hire"))
