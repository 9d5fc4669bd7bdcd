"""The platform's API: one FastAPI app (``api.app.create_app``) with a router per section.

- ``health.py``: ``/healthz`` and ``/readyz``.
- ``fraud.py``: ``POST /v1/fraud/score``.
- ``models.py``: the request and response schemas; ``services.py``: what routers share;
  ``serving.py``: the champion and its refresher; ``online.py``: the online features.
"""
