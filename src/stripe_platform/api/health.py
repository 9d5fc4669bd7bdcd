"""Liveness and readiness.

``GET /healthz``: the process answers (no dependency is checked: a restart would not fix one).
``GET /readyz``: 200 when scores can be served (a model and warm online features), else 503; both
say what each component is doing, including a last good model kept after a failed check.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from stripe_platform.api.models import Component, Liveness, ModelInfo, Readiness
from stripe_platform.api.services import Services, services
from stripe_platform.api.serving import ServingModel

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> Liveness:
    return Liveness()


def model_info(current: ServingModel | None) -> ModelInfo | None:
    if current is None:
        return None
    scorer = current.scorer
    return ModelInfo(
        name=scorer.model_name,
        version=scorer.version,
        feature_version=scorer.feature_version,
        threshold=scorer.threshold,
    )


@router.get(
    "/readyz",
    summary="Readiness: a model and warm online features",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Not ready: no model or no features"}},
)
async def readyz(services: Annotated[Services, Depends(services)]) -> JSONResponse:
    holder, features = services.model, services.features
    body = Readiness(
        ready=services.ready,
        model=model_info(holder.current),
        components={
            "model": Component(
                ready=holder.current is not None,
                detail=holder.detail(),
                error=holder.error,
                checked_at=holder.checked_at,
            ),
            "features": Component(
                ready=features.state is not None,
                detail=features.detail(),
                error=features.error,
                checked_at=features.checked_at,
            ),
        },
    )
    return JSONResponse(body.model_dump(mode="json"), status_code=200 if body.ready else 503)
