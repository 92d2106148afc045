"""The API's request and response bodies (OpenAPI at /openapi.json is built from these)."""

from datetime import date
from typing import Annotated, Any, Literal
from uuid import UUID

from fastapi import Path
from pydantic import BaseModel, Field

from metering.models import event_json_schema

OrgId = Annotated[UUID, Path(description="organization UUID")]


class ErrorBody(BaseModel):
    code: str = Field(examples=["invalid_events"])
    reason: str = Field(examples=["1 of 2 events are invalid; none was accepted"])
    errors: list[dict[str, Any]] | None = Field(
        default=None,
        examples=[
            [{"index": 1, "code": "invalid_uuid", "reason": "org_id: must be a UUID string"}]
        ],
    )
    retry_after: float | None = None


class Accepted(BaseModel):
    accepted: int = Field(examples=[2])
    ids: list[str] = Field(examples=[["evt-1", "evt-2"]])


class UsageRow(BaseModel):
    event_type: str
    period: str
    period_start: date
    period_end: date | None = Field(default=None, description="cycle rows: the next start")
    value: str = Field(description="exact decimal as a string", examples=["1234"])
    event_count: int
    updated_at: str


class Usage(BaseModel):
    org_id: UUID
    period: str
    rows: list[UsageRow]


class Access(BaseModel):
    model_config = {"extra": "allow"}
    feature_key: str = Field(examples=["max_api_calls_per_month"])
    allowed: bool
    plan: str = Field(examples=["free"])
    limit: int | None = Field(default=None, examples=[1000])
    unlimited: bool | None = None
    # JSON numbers written exactly as PostgreSQL's numeric holds them (never via a float)
    used: float | None = Field(default=None, examples=[37])
    remaining: float | None = Field(default=None, examples=[963])


class Entitlements(BaseModel):
    org_id: UUID
    features: list[Access]


class SubscriptionIn(BaseModel):
    model_config = {"extra": "forbid"}
    plan: str = Field(examples=["pro"], pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    status: Literal["active", "trialing", "past_due", "canceled"] = "active"
    seats: int = Field(default=1, ge=0, le=1_000_000)
    seats_in_use: int = Field(default=0, ge=0, le=1_000_000)
    timezone: str = Field(
        default="UTC", examples=["Europe/Berlin"], pattern=r"^[A-Za-z0-9_+/-]{1,64}$"
    )
    billing_anchor: date | None = Field(
        default=None,
        examples=["2026-01-31"],
        description="cycles run from this day of month (the last day of shorter months); "
        "null: calendar months; left out: unchanged",
    )


class SubscriptionOut(BaseModel):
    org_id: UUID
    plan: str
    status: str
    seats: int
    seats_in_use: int
    timezone: str
    billing_anchor: date | None = None
    updated_at: str


class PlanFeature(BaseModel):
    feature_key: str
    limit_value: int | None
    flags: dict[str, bool]


class Plan(BaseModel):
    plan: str
    features: list[PlanFeature]


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody} for status in (400, 401, 403, 404, 413, 415, 422, 503)
}
EVENT_EXAMPLE = {
    "id": "evt-2026-0001",
    "type": "api_call",
    "org_id": "0b4e3e2c-5a8f-4c6b-9a2e-3f1d2c4b5a6e",
    "user_id": None,
    "quantity": 1,
    "occurred_at": "2026-11-25T10:00:00Z",
    "metadata": {"path": "/v1/x"},
}
# The event as the model defines it (one definition: metering.models.UsageEvent).
EVENT_SCHEMA = event_json_schema()
