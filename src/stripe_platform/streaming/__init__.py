"""The real-time consumers of change data: fraud scoring on the CDC stream (ARCHITECTURE §6)."""

from stripe_platform.errors import PlatformError


class StreamError(PlatformError, RuntimeError):
    """The fraud stream cannot do what was asked (start, stop, read its status, a bad option);
    the message says why."""
