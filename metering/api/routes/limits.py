"""An organization's own limits (contract section 8): set and remove overrides (admin)."""

from typing import Annotated, Any

import asyncpg
from fastapi import APIRouter, Depends, Path, Request
from pydantic import BaseModel, Field

from metering.api.dependencies import for_org, key_actor, scoped
from metering.api.errors import ApiError
from metering.api.schemas import ERRORS, OrgId
from metering.api.state import state_of
from metering.limits.overrides import UnknownLimit
from metering.storage.keys import ApiKey

router = APIRouter()
FeatureKey = Annotated[str, Path(max_length=64, pattern=r"^[a-z][a-z0-9_]{0,63}$")]


class OverrideIn(BaseModel):
    # strict: "1" is not a limit, as "5" is not a quantity
    model_config = {"extra": "forbid", "strict": True}
    limit: int = Field(ge=-1, le=10**18, description="-1: unlimited", examples=[250000])
    soft: bool = Field(default=False, description="never refuse; report the overage")
    thresholds: list[Annotated[int, Field(ge=1, le=1000)]] | None = Field(
        default=None,
        min_length=1,
        max_length=10,
        description="percentages notified once per period (default: the plan's)",
        examples=[[50, 80, 100, 120]],
    )


@router.put("/v1/orgs/{org_id}/limits/{feature_key}", responses=ERRORS, tags=["limits"])
async def set_limit(
    org_id: OrgId,
    feature_key: FeatureKey,
    body: OverrideIn,
    request: Request,
    key: Annotated[ApiKey, Depends(scoped("admin"))],
) -> dict[str, Any]:
    """Give the organization its own limit for `feature_key`, taking precedence over its
    plan's from the next access check; audited (old and new value). Lowering a limit
    mid-period notifies the thresholds it now crosses, once."""
    for_org(key, org_id)
    store = state_of(request).overrides
    thresholds = sorted(set(body.thresholds)) if body.thresholds else None
    try:
        old, new = await store.set(
            org_id,
            feature_key,
            limit=body.limit,
            soft=body.soft,
            thresholds=thresholds,
            actor=key_actor(key),
        )
    except UnknownLimit as error:
        raise ApiError(404, "unknown_limit", str(error), feature_key=feature_key) from None
    except asyncpg.CheckViolationError as error:
        raise ApiError(422, "invalid_limit", str(error)) from None
    return {
        "org_id": str(org_id),
        "feature_key": feature_key,
        "source": "override",
        **new.document(),
        "previous": old.document() if old else None,
    }


@router.delete("/v1/orgs/{org_id}/limits/{feature_key}", responses=ERRORS, tags=["limits"])
async def unset_limit(
    org_id: OrgId,
    feature_key: FeatureKey,
    request: Request,
    key: Annotated[ApiKey, Depends(scoped("admin"))],
) -> dict[str, Any]:
    """Remove the organization's own limit: its plan's applies again (answered here)."""
    for_org(key, org_id)
    store = state_of(request).overrides
    old = await store.unset(org_id, feature_key, actor=key_actor(key))
    if old is None:
        raise ApiError(
            404, "no_override", f"organization {org_id} has no limit of its own for {feature_key}"
        )
    effective = await store.effective(org_id, feature_key)
    return {
        "org_id": str(org_id),
        "feature_key": feature_key,
        **effective.document(),
        "previous": old.document(),
    }
