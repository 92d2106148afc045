"""Reads: usage, the access check, entitlements, plans (as the reader role, per org)."""

import json
from datetime import date
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from pydantic_core import PydanticCustomError

from metering.api.dependencies import api_key, for_meter, for_org, scoped
from metering.api.errors import ApiError
from metering.api.schemas import (
    ERRORS,
    Access,
    Entitlements,
    OrgId,
    Plan,
    PlanFeature,
    Usage,
    UsageRow,
)
from metering.api.state import state_of
from metering.models import quantity_from_text
from metering.portal.tokens import PORTAL_SCOPE
from metering.storage.keys import ApiKey

router = APIRouter()


@router.get("/v1/orgs/{org_id}/usage", response_model=Usage, responses=ERRORS, tags=["read"])
async def usage(
    org_id: OrgId,
    request: Request,
    key: Annotated[ApiKey, Depends(scoped("read", portal=True))],
    period: Annotated[
        Literal["day", "month", "cycle"],
        Query(description="cycle: the organization's billing cycles (it needs an anchor)"),
    ] = "month",
    from_: Annotated[
        date | None, Query(alias="from", description="first period start (date)")
    ] = None,
    to: Annotated[date | None, Query(description="period starts before this date")] = None,
    type: Annotated[str | None, Query(max_length=64, description="only this event type")] = None,
) -> Usage:
    state = state_of(request)
    for_org(key, org_id)
    rows = await state.reads.usage(org_id, period, from_, to, type)
    if key.meters is not None:  # a portal token's meters (the seeded ones: key = type)
        rows = [r for r in rows if key.may_read_meter(r["event_type"])]
    return Usage(
        org_id=org_id,
        period=period,
        rows=[
            UsageRow(
                event_type=r["event_type"],
                period=r["period"],
                period_start=r["period_start"],
                period_end=r.get("period_end"),
                value=format(r["value"].normalize(), "f"),
                event_count=r["event_count"],
                updated_at=r["updated_at"].isoformat(),
            )
            for r in rows
        ],
    )


@router.get(
    "/v1/orgs/{org_id}/features/{feature_key}",
    response_model=Access,
    responses=ERRORS,
    tags=["read"],
)
async def feature(
    org_id: OrgId,
    request: Request,
    feature_key: Annotated[str, Path(max_length=64)],
    key: Annotated[ApiKey, Depends(scoped("read", portal=True))],
    quantity: Annotated[str, Query(max_length=40, description="quantity requested")] = "1",
) -> Response:
    state = state_of(request)
    for_org(key, org_id)
    try:
        requested = quantity_from_text(quantity)
    except PydanticCustomError as error:
        raise ApiError(400, error.type, f"quantity: {error}") from None
    if key.meters is not None and feature_key in await state.hidden_features(key):
        for_meter(key, feature_key)
    raw = await state.reads.check_json(org_id, feature_key, requested)
    if raw is None:
        raise ApiError(404, "unknown_feature", f"no plan has the feature {feature_key!r}")
    # PostgreSQL's JSON text as it is: every number exact, and no parse and re-encode
    return Response(raw, media_type="application/json")


@router.get(
    "/v1/orgs/{org_id}/entitlements",
    response_model=Entitlements,
    responses=ERRORS,
    tags=["read"],
)
async def entitlements(
    org_id: OrgId,
    request: Request,
    key: Annotated[ApiKey, Depends(scoped("read", portal=True))],
) -> Response:
    state = state_of(request)
    for_org(key, org_id)
    features = await state.reads.entitlements_json(org_id, await state.hidden_features(key))
    body = f'{{"org_id": "{org_id}", "features": [{", ".join(features)}]}}'
    return Response(body, media_type="application/json")


@router.get("/v1/plans", response_model=list[Plan], responses=ERRORS, tags=["read"])
async def plans(request: Request, key: Annotated[ApiKey, Depends(api_key)]) -> list[Plan]:
    if PORTAL_SCOPE in key.scopes:
        raise ApiError(403, "portal_token", "a portal token only reads its organization's usage")
    state = state_of(request)
    grouped: dict[str, list[PlanFeature]] = {}
    for row in await state.reads.plans():
        grouped.setdefault(row["plan"], []).append(
            PlanFeature(
                feature_key=row["feature_key"],
                limit_value=row["limit_value"],
                flags=json.loads(row["flags"]),
            )
        )
    return [Plan(plan=name, features=features) for name, features in grouped.items()]
