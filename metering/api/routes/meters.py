"""Meters (contract section 2): define (admin), list and show (read), archive (admin)."""

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Path, Request

from metering.api.dependencies import scoped
from metering.api.errors import ApiError
from metering.api.schemas import ERRORS
from metering.api.state import state_of
from metering.meters.definition import InvalidMeter, MeterSpec
from metering.meters.store import MeterConflict, MeterNotFound
from metering.storage.keys import ApiKey

router = APIRouter()
MeterKey = Annotated[str, Path(max_length=63, pattern=r"^[a-z][a-z0-9_]{0,62}$")]
METER_EXAMPLE = {
    "key": "ai_tokens_by_model",
    "event_type": "ai_tokens_used",
    "aggregation": "sum",
    "value": "quantity",
    "filter": {"env": "production"},
    "group_by": ["model"],
    "description": "AI tokens per model, production only",
}


def _not_found(error: MeterNotFound) -> ApiError:
    return ApiError(404, "unknown_meter", str(error), meter=error.key)


@router.post("/v1/meters", status_code=201, responses=ERRORS, tags=["meters"])
async def create_meter(
    request: Request,
    key: Annotated[ApiKey, Depends(scoped("admin"))],
    definition: Annotated[dict[str, Any], Body(examples=[METER_EXAMPLE])],
) -> dict[str, Any]:
    """Define a meter. It starts `backfilling`: the aggregator counts every stored event of
    its type, then marks it `active` (watch `GET /v1/meters/{key}`)."""
    try:
        spec = MeterSpec.parse(definition)
    except InvalidMeter as error:
        raise ApiError(422, "invalid_meter", str(error), field=error.field) from None
    try:
        meter = await state_of(request).meters.create(spec, created_by=key.name)
    except MeterConflict as error:
        status = 422 if error.code == "unknown_limit_key" else 409
        raise ApiError(status, error.code, error.reason) from None
    return meter.document()


@router.get("/v1/meters", responses=ERRORS, tags=["meters"])
async def list_meters(
    request: Request, _: Annotated[ApiKey, Depends(scoped("read"))]
) -> dict[str, Any]:
    meters = await state_of(request).meters.list()
    return {"meters": [m.document() for m in meters]}


@router.get("/v1/meters/{meter_key}", responses=ERRORS, tags=["meters"])
async def show_meter(
    request: Request, meter_key: MeterKey, _: Annotated[ApiKey, Depends(scoped("read"))]
) -> dict[str, Any]:
    """One meter, with its backfill's progress."""
    try:
        return (await state_of(request).meters.get(meter_key)).document()
    except MeterNotFound as error:
        raise _not_found(error) from None


@router.delete("/v1/meters/{meter_key}", responses=ERRORS, tags=["meters"])
async def archive_meter(
    request: Request, meter_key: MeterKey, _: Annotated[ApiKey, Depends(scoped("admin"))]
) -> dict[str, Any]:
    """Archive a meter: it stops counting, its numbers stay, its key is never reused."""
    try:
        return (await state_of(request).meters.archive(meter_key)).document()
    except MeterNotFound as error:
        raise _not_found(error) from None
    except MeterConflict as error:
        raise ApiError(409, error.code, error.reason) from None
