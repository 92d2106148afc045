"""Corrections (contract section 10): cancel a stored event; the audit trail (admin)."""

from datetime import datetime
from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Depends, Path, Query, Request
from pydantic import BaseModel, Field

from metering.api.dependencies import api_key, for_org, key_actor
from metering.api.errors import ApiError
from metering.api.schemas import ERRORS, OrgId
from metering.api.state import state_of
from metering.corrections.cancel import Cancellation
from metering.errors import EventNotFound, OutsideLatenessWindow
from metering.storage.keys import ApiKey

router = APIRouter()
EventId = Annotated[str, Path(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$")]


class CancelIn(BaseModel):
    model_config = {"extra": "forbid"}
    reason: str = Field(min_length=1, max_length=500, examples=["sent twice under a new id"])


def cancellation_document(org_id: Any, outcome: Cancellation) -> dict[str, Any]:
    return {
        "org_id": str(org_id),
        "event_id": outcome.event_id,
        "status": outcome.status,
        "type": outcome.event_type,
        "occurred_at": outcome.occurred_at.isoformat() if outcome.occurred_at else None,
        "quantity": str(outcome.quantity) if outcome.quantity is not None else None,
        "cancelled_at": outcome.cancelled_at.isoformat() if outcome.cancelled_at else None,
        "cancelled_by": outcome.cancelled_by,
        "reason": outcome.reason,
    }


@router.post(
    "/v1/orgs/{org_id}/events/{event_id}/cancel",
    responses={**ERRORS, 409: ERRORS[400]},
    tags=["corrections"],
)
async def cancel_event(
    org_id: OrgId,
    event_id: EventId,
    body: CancelIn,
    request: Request,
    key: Annotated[ApiKey, Depends(api_key)],
) -> dict[str, Any]:
    """Cancel a stored event: it stays stored (its id stays claimed, a re-send is never
    counted), marked cancelled with who, when and why, and every aggregate it was in is
    recounted by the aggregator's next pass. Idempotent: a second call answers the first
    cancellation (`status` `already_cancelled`). Admin keys, or an ingest key bound to
    this organization. 404 for an id never stored, 409 outside the lateness window."""
    if not (key.allows("admin") or (key.allows("ingest") and key.org_id == org_id)):
        raise ApiError(
            403,
            "missing_scope",
            "cancelling needs an admin key or an ingest key bound to this organization",
        )
    for_org(key, org_id)
    try:
        outcome = await state_of(request).cancels.cancel_one(
            org_id, event_id, actor=key_actor(key), reason=body.reason
        )
    except EventNotFound as error:
        raise ApiError(404, "unknown_event", str(error), event_id=event_id) from None
    except OutsideLatenessWindow as error:
        raise ApiError(
            409,
            "outside_lateness_window",
            str(error),
            event_id=event_id,
            earliest=str(error.occurred_before),
        ) from None
    return cancellation_document(org_id, outcome)


@router.get("/v1/audit", responses=ERRORS, tags=["corrections"])
async def audit_trail(
    request: Request,
    key: Annotated[ApiKey, Depends(api_key)],
    since: Annotated[datetime | None, Query(description="entries at or after (RFC 3339)")] = None,
    action: Annotated[str | None, Query(max_length=64, examples=["events.cancel"])] = None,
    org: Annotated[str | None, Query(description="only this organization")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    before: Annotated[int | None, Query(ge=1, description="entries with a smaller id")] = None,
) -> dict[str, Any]:
    """Corrections, newest first (admin keys not bound to an organization): who cancelled,
    replayed or imported what, and when. Page with `before` = the last `id` seen."""
    if not key.allows("admin") or key.org_id is not None:
        raise ApiError(403, "missing_scope", "the audit trail needs an admin key of every org")
    try:
        org_id = UUID(org) if org else None
    except ValueError:
        raise ApiError(400, "invalid_uuid", f"org: {org!r} is not a UUID") from None
    if since is not None and since.tzinfo is None:
        raise ApiError(400, "timestamp_without_offset", "since: give an offset (e.g. Z)")
    entries = await state_of(request).audit.entries(
        since=since, action=action, org_id=org_id, limit=limit, before_id=before
    )
    return {
        "entries": [e.document() for e in entries],
        "next_before": entries[-1].id if len(entries) == limit else None,
    }
