"""The job of the ``security_access_review`` DAG, callable without Airflow: the brief's
"automatic detection of expired access rights" and least privilege kept true on a schedule.

One run, over every target of the access policy (PostgreSQL, the warehouse, the API's sessions and
tokens; ``security.access``): access still usable past its end date is revoked, then the policy is
compared with what is really granted. Drift is not corrected silently (a grant made by hand may be
an incident, or a policy change not merged yet): it raises an alert with the statements that would
correct it, and ``stripe-platform access apply`` is the reviewed way to do so.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from stripe_platform.config import Settings


def review_access(settings: Settings, *, now: dt.datetime | None = None) -> dict[str, Any]:
    """Revoke expired access, then plan the policy against every target; alert on either."""
    from stripe_platform.orchestration.alerts import send_alert
    from stripe_platform.security.access import plan_all, revoke_expired_all
    from stripe_platform.security.policy import load_policy

    now = now or dt.datetime.now(dt.UTC)
    policy = load_policy(settings)
    revoked = revoke_expired_all(settings, policy, now)
    drift = plan_all(settings, policy, now)
    result = {
        "policy": str(policy.source),
        "revoked_expired": [r.public() for r in revoked],
        "drift": [c.public() for c in drift],  # never a secret
    }
    if revoked:
        send_alert(
            {
                "text": f"access review: {len(revoked)} access(es) still usable past their end "
                "date were revoked: "
                + ", ".join(f"{r.target}:{r.principal}" for r in revoked[:10]),
                "kind": "expired_access",
                "revoked": result["revoked_expired"],
            },
            settings,
        )
    if drift:
        send_alert(
            {
                "text": f"access review: {len(drift)} difference(s) between the access policy "
                "and what is granted (`stripe-platform access plan`): "
                + "; ".join(f"{c.target}:{c.action} {c.principal} {c.object}" for c in drift[:10]),
                "kind": "access_drift",
                "drift": result["drift"],
            },
            settings,
        )
    return result
