"""The access policy's targets: plan, apply and expiry across every store (issue 21, docs/access.md).

Each target is a module (``TARGETS``) that compares the policy with what its store actually grants:

    NAME: str
    plan(settings, policy, now) -> list[Change]
    apply(settings, policy, changes) -> list[Change]          # all or nothing per target
    expired(settings, policy, now) -> list[ExpiredAccess]
    revoke_expired(settings, policy, now) -> list[ExpiredAccess]

A target whose module is not installed (yet) is skipped with a note (:func:`load_targets`) instead of
failing the others.
"""

from __future__ import annotations

import datetime as dt
import getpass
import importlib
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any

from stripe_platform.errors import PlatformError
from stripe_platform.security.policy import Policy, PolicyError, check_policy

if TYPE_CHECKING:
    from stripe_platform.config import Settings

TARGETS = (
    "stripe_platform.security.access_postgres",
    "stripe_platform.security.access_warehouse",
    "stripe_platform.security.access_api",
)


class AccessApplyError(PlatformError, RuntimeError):
    """A target could not apply its changes (nothing of that target was applied)."""


@dataclass(frozen=True)
class Change:
    """One difference between the policy and a store, and what makes the store match."""

    target: str
    action: str  # e.g. grant, revoke, create_role, alter_role, grant_role, revoke_role, drop_role
    principal: str  # the role, user or PUBLIC concerned
    object: str  # what on: "table public.merchant", "database", "role developer", ...
    statement: str | None  # what apply runs (None when not SQL)
    reason: str  # why: the policy line it comes from, or why it is drift
    # The one-time password of a login that apply created: shown once to the operator, never
    # logged, never in a plan.
    secret: str | None = field(default=None, repr=False, compare=False)

    def public(self) -> dict[str, Any]:
        """For --json and the access log: everything but the secret."""
        return {
            "target": self.target,
            "action": self.action,
            "principal": self.principal,
            "object": self.object,
            "statement": self.statement,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class ExpiredAccess:
    """Access still usable past its end date."""

    target: str
    principal: str
    ended_at: dt.datetime
    still: str  # how it is still usable, e.g. "login role exists with LOGIN, member of developer"
    remedy: str

    def public(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "principal": self.principal,
            "ended_at": self.ended_at.isoformat(),
            "still": self.still,
            "remedy": self.remedy,
        }


def target_name(module: str) -> str:
    """ "stripe_platform.security.access_postgres" -> "postgres"."""
    return module.rsplit(".", 1)[-1].removeprefix("access_")


def load_targets(targets: Iterable[str] | None = None) -> tuple[list[ModuleType], list[str]]:
    """The target modules (all, or those named: "postgres", "warehouse", "api" or a module path),
    and a note for each that is not installed."""
    wanted = list(TARGETS)
    if targets:
        known = {target_name(m): m for m in TARGETS}
        wanted = []
        for name in targets:
            if name in known.values():
                wanted.append(name)
            elif name in known:
                wanted.append(known[name])
            else:
                raise PlatformError(
                    f"unknown access target {name!r}; known: {', '.join(sorted(known))}"
                )
    modules, notes = [], []
    for name in wanted:
        try:
            modules.append(importlib.import_module(name))
        except ModuleNotFoundError as exc:
            if exc.name != name:  # the target exists but something it imports does not
                raise
            notes.append(f"target {target_name(name)}: skipped, {name} is not installed")
    return modules, notes


def plan_all(
    settings: Settings, policy: Policy, now: dt.datetime, targets: Iterable[str] | None = None
) -> list[Change]:
    modules, _ = load_targets(targets)
    return [change for module in modules for change in module.plan(settings, policy, now)]


def apply_all(
    settings: Settings,
    policy: Policy,
    now: dt.datetime,
    targets: Iterable[str] | None = None,
    changes: Sequence[Change] | None = None,
) -> list[Change]:
    """Make every target match the policy (or apply ``changes``, a plan shown to the operator).
    Refused, with nothing applied anywhere, when the policy has entries already expired."""
    problems = check_policy(policy, now)
    if problems:
        raise PolicyError(
            "access apply refused, nothing applied: the policy grants access already ended\n  "
            + "\n  ".join(problems)
        )
    modules, _ = load_targets(targets)
    applied: list[Change] = []
    for module in modules:
        mine = (
            module.plan(settings, policy, now)
            if changes is None
            else [c for c in changes if c.target == module.NAME]
        )
        if mine:
            applied += module.apply(settings, policy, mine)
    return applied


def expired_all(
    settings: Settings, policy: Policy, now: dt.datetime, targets: Iterable[str] | None = None
) -> list[ExpiredAccess]:
    modules, _ = load_targets(targets)
    return [found for module in modules for found in module.expired(settings, policy, now)]


def revoke_expired_all(
    settings: Settings, policy: Policy, now: dt.datetime, targets: Iterable[str] | None = None
) -> list[ExpiredAccess]:
    modules, _ = load_targets(targets)
    return [done for module in modules for done in module.revoke_expired(settings, policy, now)]


def operator() -> tuple[str, str]:
    """Who runs an apply or a revocation, and from where, for the access log."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return user, socket.gethostname()
