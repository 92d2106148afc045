"""Portal tokens and crossings (contract section 11): hand a browser or an app's backend a
short-lived token that reads one organization, and read that organization's crossings."""

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field

from metering.api.dependencies import for_org, key_actor, scoped
from metering.api.errors import ApiError
from metering.api.schemas import ERRORS, OrgId
from metering.api.state import state_of
from metering.portal.tokens import InvalidPortalToken, lifetime_of
from metering.storage.keys import ApiKey

router = APIRouter()


class PortalTokenIn(BaseModel):
    model_config = {"extra": "forbid", "strict": True}
    meters: list[Annotated[str, Field(max_length=63)]] | None = Field(
        default=None,
        description="the only meters the token reads (default: every meter)",
        examples=[["api_call", "ai_tokens_by_model"]],
    )
    expires_in: int | None = Field(
        default=None, ge=60, le=86400, description="seconds (default 3600)", examples=[3600]
    )


@router.post("/v1/orgs/{org_id}/portal-tokens", status_code=201, responses=ERRORS, tags=["portal"])
async def create_portal_token(
    org_id: OrgId,
    request: Request,
    key: Annotated[ApiKey, Depends(scoped("read"))],
    body: PortalTokenIn | None = None,
) -> dict[str, Any]:
    """A token that reads only this organization's usage, entitlements, crossings and
    (when `meters` is given) only those meters, until it expires; refused by every other
    route. The token is shown once. Open `page_url` in a browser, or send it as
    `Authorization: Bearer <token>` from a page of an allowed origin
    (`METERING_PORTAL_ORIGINS`)."""
    for_org(key, org_id)
    wanted = body or PortalTokenIn()
    state = state_of(request)
    try:
        issued = await state.portal_tokens.issue(
            org_id, wanted.meters, lifetime_of(wanted.expires_in), created_by=key_actor(key)
        )
    except InvalidPortalToken as error:
        raise ApiError(422, "invalid_portal_token", str(error), field=error.field) from None
    credential = issued.credential
    assert credential.expires_at is not None
    return {
        "token": issued.token,
        "org_id": str(org_id),
        "meters": None if credential.meters is None else sorted(credential.meters),
        "expires_at": credential.expires_at.isoformat(),
        "page_url": f"/orgs/{org_id}?token={issued.token}",
    }


@router.get("/v1/orgs/{org_id}/crossings", responses=ERRORS, tags=["read"])
async def crossings(
    org_id: OrgId,
    request: Request,
    key: Annotated[ApiKey, Depends(scoped("read", portal=True))],
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> dict[str, Any]:
    """The organization's latest threshold crossings (section 3's messages), newest first."""
    for_org(key, org_id)
    state = state_of(request)
    found = await state.crossings.recent(org_id, limit, await state.hidden_features(key))
    return {"org_id": str(org_id), "crossings": [c.document() for c in found]}
