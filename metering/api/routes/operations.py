"""Liveness, readiness (Kafka and PostgreSQL answer) and Prometheus metrics."""

import asyncio

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from metering.api.errors import error_response
from metering.api.schemas import ErrorBody
from metering.api.state import state_of

router = APIRouter()


@router.get("/healthz", tags=["operations"])
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", tags=["operations"], responses={503: {"model": ErrorBody}})
async def readyz(request: Request) -> JSONResponse:
    state = state_of(request)
    problems = []
    try:
        async with asyncio.timeout(2):
            await state.reads.ping()
    except Exception as error:  # readiness reports, it does not raise
        problems.append(f"postgres: {type(error).__name__}")
    try:
        async with asyncio.timeout(2):
            await state.producer.client.fetch_all_metadata()
    except Exception as error:
        problems.append(f"kafka: {type(error).__name__}")
    if problems:
        return error_response(503, "not_ready", "; ".join(problems))
    return JSONResponse({"status": "ready"})


@router.get("/metrics", tags=["operations"], response_class=Response)
async def prometheus(request: Request) -> Response:
    state = state_of(request)
    return Response(generate_latest(state.registry), media_type=CONTENT_TYPE_LATEST)
