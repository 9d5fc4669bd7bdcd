"""`privacy`: data-subject requests, consent, do-not-sell and breaches (issue 23, docs/compliance.md).

This module holds the group; cli/privacy_requests.py, cli/privacy_consent.py and
cli/privacy_breach.py register their commands on `privacy_app`.
"""

from __future__ import annotations

from stripe_platform.cli.common import group

privacy_app = group(
    "Privacy: data-subject requests (access, rectify, erase, opt-out), consent, do-not-sell, "
    "personal-data breaches and their 72-hour clock."
)
