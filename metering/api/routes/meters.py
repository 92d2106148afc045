"""Meters (contract section 2): define (admin), list and show (read), archive (admin),
and usage by window and dimensions (contract section 5)."""

import csv
import io
import json
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, Path, Query, Request, Response
from fastapi.responses import JSONResponse

from metering.api.dependencies import for_meter, for_org, scoped
from metering.api.errors import ApiError
from metering.api.schemas import ERRORS, OrgId
from metering.api.state import state_of
from metering.meters.definition import InvalidMeter, MeterSpec
from metering.meters.store import MeterConflict, MeterNotFound
from metering.meters.windows import (
    DEFAULT_PAGE,
    MAX_PAGE,
    InvalidUsageQuery,
    decode_cursor,
    encode_cursor,
)
from metering.models import utc_now
from metering.storage.keys import ApiKey

router = APIRouter()
CONFLICTS = {**ERRORS, 409: ERRORS[400]}
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


@router.post("/v1/meters", status_code=201, responses=CONFLICTS, tags=["meters"])
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
    request: Request, key: Annotated[ApiKey, Depends(scoped("read", portal=True))]
) -> dict[str, Any]:
    meters = await state_of(request).meters.list()
    return {"meters": [m.document() for m in meters if key.may_read_meter(m.key)]}


@router.get("/v1/meters/{meter_key}", responses=ERRORS, tags=["meters"])
async def show_meter(
    request: Request,
    meter_key: MeterKey,
    key: Annotated[ApiKey, Depends(scoped("read", portal=True))],
) -> dict[str, Any]:
    """One meter, with its backfill's progress."""
    for_meter(key, meter_key)
    try:
        return (await state_of(request).meters.get(meter_key)).document()
    except MeterNotFound as error:
        raise _not_found(error) from None


@router.delete("/v1/meters/{meter_key}", responses=CONFLICTS, tags=["meters"])
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


CSV_COLUMNS = ("window_start", "window_end", "dimensions", "value", "event_count")


@router.get(
    "/v1/orgs/{org_id}/meters/{meter_key}/usage",
    responses=ERRORS,
    tags=["meters"],
    openapi_extra={
        "parameters": [
            {
                "name": "filter",
                "in": "query",
                "style": "deepObject",
                "explode": True,
                "required": False,
                "description": "filter[<dimension>]=value keeps the rows of that value",
                "schema": {
                    "type": "object",
                    "additionalProperties": {"type": "string", "maxLength": 128},
                },
            }
        ]
    },
)
async def meter_usage(
    org_id: OrgId,
    meter_key: MeterKey,
    request: Request,
    key: Annotated[ApiKey, Depends(scoped("read", portal=True))],
    window: Literal["hour", "day", "month"] = "day",
    from_: Annotated[
        str | None,
        Query(alias="from", max_length=40, description="RFC 3339 timestamp or date (in tz)"),
    ] = None,
    to: Annotated[str | None, Query(max_length=40, description="exclusive; like from")] = None,
    tz: Annotated[
        str | None, Query(max_length=64, description="IANA zone; default the org's")
    ] = None,
    group_by: Annotated[
        str | None,
        Query(max_length=400, description="dimensions to keep, comma-separated; none: totals"),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = DEFAULT_PAGE,
    cursor: Annotated[str | None, Query(max_length=2000)] = None,
) -> Response:
    """Usage of one meter by window (hour, day, month aligned to `tz`) and dimensions.
    `filter[<dimension>]=value` keeps the rows of that dimension value. Day and month
    windows in the organization's own zone come from the stored rollups; hour windows and
    other zones are computed from raw events, over at most 7 days (hour) or 31 days."""
    state = state_of(request)
    for_org(key, org_id)
    for_meter(key, meter_key)
    filters = {
        name[len("filter[") : -1]: value
        for name, value in request.query_params.items()
        if name.startswith("filter[") and name.endswith("]")
    }
    kept = None if group_by is None else [g for g in group_by.split(",") if g]
    try:
        answer = await state.meter_usage.usage(
            org_id,
            meter_key,
            window=window,
            tz=tz,
            start=from_,
            end=to,
            group_by=kept,
            filters=filters,
            now=utc_now(),
        )
        after = decode_cursor(cursor) if cursor else None
    except MeterNotFound as error:
        raise _not_found(error) from None
    except InvalidUsageQuery as error:
        raise ApiError(400, "invalid_query", str(error), field=error.field) from None
    rows = [r for r in answer.rows if after is None or (r.start, r.dimensions) > after]
    page, more = rows[:limit], len(rows) > limit
    next_cursor = encode_cursor(page[-1].start, page[-1].dimensions) if more else None
    zone = answer.windows.zone
    bounds: dict[datetime, tuple[str, str]] = {}  # a page holds few distinct windows
    items = []
    for r in page:
        texts = bounds.get(r.start)
        if texts is None:
            texts = bounds[r.start] = (
                r.start.astimezone(zone).isoformat(),
                answer.window_end(r).astimezone(zone).isoformat(),
            )
        items.append(
            {
                "window_start": texts[0],
                "window_end": texts[1],
                "dimensions": json.loads(r.dimensions),
                "value": format(r.value.normalize(), "f"),
                "event_count": r.event_count,
            }
        )
    if "text/csv" in request.headers.get("accept", ""):
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(CSV_COLUMNS)
        for item in items:
            writer.writerow(
                [item[c] if c != "dimensions" else json.dumps(item[c]) for c in CSV_COLUMNS]
            )
        headers = {"Link": f'<?cursor={next_cursor}>; rel="next"'} if next_cursor else None
        return Response(out.getvalue(), media_type="text/csv", headers=headers)
    return JSONResponse(
        {
            "meter": meter_key,
            "window": window,
            "tz": answer.windows.zone.key,
            "from": answer.windows.start_instant.isoformat(),
            "to": answer.windows.end_instant.isoformat(),
            "complete": answer.status != "backfilling",
            "source": "rollups" if answer.from_rollups else "events",
            "rows": items,
            "next_cursor": next_cursor,
        }
    )
