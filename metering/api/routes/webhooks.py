"""Webhook endpoints and their deliveries (contract section 9), admin keys only."""

from typing import Annotated, Any, Literal
from uuid import UUID

from fastapi import APIRouter, Depends, Path, Query, Request
from pydantic import BaseModel, Field

from metering.api.dependencies import scoped
from metering.api.errors import ApiError
from metering.api.schemas import ERRORS
from metering.api.state import state_of
from metering.models import utc_now
from metering.storage.keys import ApiKey
from metering.webhooks.addresses import UnsafeWebhookUrl, check_url
from metering.webhooks.signing import new_secret
from metering.webhooks.store import WEBHOOK_TYPES, Attempt, Delivery, TooManyEndpoints

router = APIRouter()
EndpointId = Annotated[UUID, Path(description="the endpoint's id")]


class EndpointIn(BaseModel):
    model_config = {"extra": "forbid"}
    url: str = Field(max_length=2048, examples=["https://billing.example.com/hooks/metering"])
    org_id: UUID | None = Field(default=None, description="only this organization's messages")
    types: list[Literal["limit.crossed", "meter.backfilled"]] = Field(
        default=list(WEBHOOK_TYPES), min_length=1
    )
    description: str = Field(default="", max_length=500)


def delivery_document(delivery: Delivery, attempts: list[Attempt]) -> dict[str, Any]:
    def when(moment: Any) -> str | None:
        return moment.isoformat() if moment is not None else None

    return {
        "id": delivery.id,
        "message_id": delivery.message_id,
        "type": delivery.type,
        "org_id": str(delivery.org_id) if delivery.org_id else None,
        "status": delivery.status,
        "attempts": delivery.attempts,
        "created_at": when(delivery.created_at),
        "next_attempt_at": when(delivery.next_attempt_at) if delivery.status == "pending" else None,
        "delivered_at": when(delivery.delivered_at),
        "last_error": delivery.last_error,
        "log": [
            {
                "attempt": a.attempt,
                "at": a.started_at.isoformat(),
                "status_code": a.status_code,
                "latency_ms": round(a.latency_ms, 1),
                "error": a.error,
            }
            for a in attempts
        ],
    }


def _admin_of_all(key: ApiKey) -> None:
    if key.org_id is not None:
        raise ApiError(403, "other_organization", "webhooks need an admin key of every org")


@router.post("/v1/webhooks", status_code=201, responses=ERRORS, tags=["webhooks"])
async def add_endpoint(
    body: EndpointIn, request: Request, key: Annotated[ApiKey, Depends(scoped("admin"))]
) -> dict[str, Any]:
    """Add an endpoint. The answer holds its signing secret, shown this once: verify each
    message's `webhook-signature` with it (Standard Webhooks). At most 20 endpoints."""
    _admin_of_all(key)
    state = state_of(request)
    try:
        check_url(body.url, allow_private=state.settings.webhook_allow_private)
    except UnsafeWebhookUrl as error:
        raise ApiError(422, "unsafe_url", error.reason, field="url") from None
    try:
        endpoint = await state.webhooks.add_endpoint(
            body.url,
            body.org_id,
            list(dict.fromkeys(body.types)),
            body.description,
            new_secret(),
            key.name or key.prefix,
        )
    except TooManyEndpoints as error:
        raise ApiError(409, "too_many_endpoints", str(error)) from None
    return endpoint.document(with_secret=True)


@router.get("/v1/webhooks", responses=ERRORS, tags=["webhooks"])
async def list_endpoints(
    request: Request, key: Annotated[ApiKey, Depends(scoped("admin"))]
) -> dict[str, Any]:
    _admin_of_all(key)
    endpoints = await state_of(request).webhooks.endpoints()
    return {"endpoints": [e.document() for e in endpoints]}


@router.delete("/v1/webhooks/{endpoint_id}", status_code=204, responses=ERRORS, tags=["webhooks"])
async def remove_endpoint(
    endpoint_id: EndpointId, request: Request, key: Annotated[ApiKey, Depends(scoped("admin"))]
) -> None:
    """Remove an endpoint: nothing more is sent to it; its delivery log stays readable."""
    _admin_of_all(key)
    if not await state_of(request).webhooks.remove_endpoint(endpoint_id):
        raise ApiError(404, "unknown_endpoint", f"no endpoint {endpoint_id}")


@router.get("/v1/webhooks/{endpoint_id}/deliveries", responses=ERRORS, tags=["webhooks"])
async def list_deliveries(
    endpoint_id: EndpointId,
    request: Request,
    key: Annotated[ApiKey, Depends(scoped("admin"))],
    status: Annotated[Literal["pending", "delivered", "failed"] | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    before: Annotated[int | None, Query(ge=1, description="deliveries with a smaller id")] = None,
) -> dict[str, Any]:
    """An endpoint's deliveries, newest first, each with its log of attempts (status code,
    latency, error). Page with `before` = the last `id` seen."""
    _admin_of_all(key)
    store = state_of(request).webhooks
    if await store.endpoint(endpoint_id) is None:
        raise ApiError(404, "unknown_endpoint", f"no endpoint {endpoint_id}")
    found = await store.deliveries(endpoint_id, status=status, before_id=before, limit=limit)
    return {
        "deliveries": [delivery_document(d, a) for d, a in found],
        "next_before": found[-1][0].id if len(found) == limit else None,
    }


@router.post(
    "/v1/webhooks/{endpoint_id}/deliveries/{delivery_id}/redeliver",
    responses=ERRORS,
    tags=["webhooks"],
)
async def redeliver(
    endpoint_id: EndpointId,
    delivery_id: Annotated[int, Path(ge=1)],
    request: Request,
    key: Annotated[ApiKey, Depends(scoped("admin"))],
) -> dict[str, Any]:
    """Send a message again (delivered or failed), now, with a fresh 24 hours of retries
    and the same `webhook-id`."""
    _admin_of_all(key)
    found = await state_of(request).webhooks.redeliver(endpoint_id, delivery_id, utc_now())
    if found is None:
        raise ApiError(404, "unknown_delivery", f"no delivery {delivery_id} of {endpoint_id}")
    return delivery_document(found, [])
