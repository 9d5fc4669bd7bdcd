"""``POST /v1/fraud/score``: one payment scored by the champion with its online features.

The request path reads memory only: the model the refresher loaded, the feature state the
follower keeps (``api/serving.py``, ``api/online.py``). Without either it answers 503 and
``/readyz`` says why. Callers hold the scope ``fraud.score`` (api/auth.py): machines send a bearer
token (`stripe-platform access token issue --user <a fraud_service user>`).
"""

from __future__ import annotations

import math
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException

from stripe_platform.api.auth import AUTH_RESPONSES, require_scope
from stripe_platform.api.health import model_info
from stripe_platform.api.models import (
    Contribution,
    Problem,
    ScoreRequest,
    ScoreResponse,
)
from stripe_platform.api.online import FeaturesNotReady
from stripe_platform.api.services import Services, services
from stripe_platform.ml.score import ScoringError

router = APIRouter(prefix="/v1/fraud", tags=["fraud"])


def _value(x: float) -> float | None:
    return None if math.isnan(x) else x


@router.post(
    "/score",
    summary="Score one payment",
    description="The champion's fraud probability for the payment, the decision at the model's "
    "threshold, the features that moved the score most and every feature it read. The "
    "features come from the platform's recent payments (the online state the stream keeps); "
    "the payment itself is not recorded. Needs the scope `fraud.score`.",
    dependencies=[Depends(require_scope("fraud.score"))],
    responses={
        400: {"model": Problem, "description": "The body cannot be read (not UTF-8 text)"},
        **AUTH_RESPONSES,
        503: {"model": Problem, "description": "No model or no warm features yet"},
    },
)
async def score(
    payment: ScoreRequest,
    services: Annotated[Services, Depends(services)],
) -> ScoreResponse:
    model = services.model.current  # one read: a refresh swapping it mid-request is harmless
    if model is None:
        raise HTTPException(503, f"no model to score with: {services.model.detail()}")
    try:
        features = services.features.features(payment.record())
        scored = model.score(features)
    except (FeaturesNotReady, ScoringError) as exc:
        raise HTTPException(503, str(exc)) from None
    return ScoreResponse(
        transaction_id=str(payment.transaction_id),
        score=scored.score,
        is_fraud=scored.is_fraud,
        model=model_info(model),
        contributions=None
        if scored.contributions is None
        else [
            Contribution(feature=name, value=_value(value), contribution=contribution)
            for name, value, contribution in scored.contributions
        ],
        features={
            name: _value(float(v))
            for name, v in zip(model.names, features[model.order], strict=True)
        },
    )
