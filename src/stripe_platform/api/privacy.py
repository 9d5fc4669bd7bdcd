"""The API's privacy section (issue 23): placeholder until its owner fills it in."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["privacy"])
