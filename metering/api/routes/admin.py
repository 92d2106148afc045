"""Admin writes: an organization's subscription (plan, status, seats, time zone)."""

from typing import Annotated

import asyncpg
from fastapi import APIRouter, Depends, Request

from metering.api.dependencies import for_org, key_actor, scoped
from metering.api.errors import ApiError
from metering.api.schemas import ERRORS, OrgId, SubscriptionIn, SubscriptionOut
from metering.api.state import state_of
from metering.storage.keys import ApiKey

router = APIRouter()


@router.put(
    "/v1/orgs/{org_id}/subscription",
    response_model=SubscriptionOut,
    responses=ERRORS,
    tags=["admin"],
)
async def put_subscription(
    org_id: OrgId,
    request: Request,
    subscription: SubscriptionIn,
    key: Annotated[ApiKey, Depends(scoped("admin"))],
) -> SubscriptionOut:
    state = state_of(request)
    for_org(key, org_id)
    store = state.subscriptions
    if not await store.plan_exists(subscription.plan):
        raise ApiError(422, "unknown_plan", f"no plan named {subscription.plan!r}")
    if not await store.zone_valid(subscription.timezone):
        raise ApiError(
            422, "unknown_timezone", f"{subscription.timezone!r} is not an IANA time zone"
        )
    try:
        row = await store.put(
            org_id,
            subscription.plan,
            subscription.status,
            subscription.seats,
            subscription.seats_in_use,
            subscription.timezone,
            subscription.billing_anchor,
            set_anchor="billing_anchor" in subscription.model_fields_set,
            actor=key_actor(key),
        )
    except asyncpg.CheckViolationError as error:
        raise ApiError(422, "invalid_subscription", str(error)) from None
    return SubscriptionOut(**{**dict(row), "updated_at": row["updated_at"].isoformat()})
