"""`python -m stripe_platform.cli`: the same command line as `stripe-platform`."""

from stripe_platform.cli import app

app()
