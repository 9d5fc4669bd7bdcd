"""The one base class of the platform's expected failures."""

from __future__ import annotations


class PlatformError(Exception):
    """A failure the user can act on (a bad setting or argument, a missing prerequisite, a refused
    change): its message says what and what to do. The command line prints it as one line and
    exits 1; anything else is a bug and keeps its traceback.

    Subclasses keep the built-in base they had (``ValueError`` for bad input, ``RuntimeError``,
    ``LookupError``): callers and validators catch them as such, pydantic among them.
    """
