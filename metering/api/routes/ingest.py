"""POST /v1/events: validate (metering.api.ingest), authorize, publish, answer 202."""

import asyncio
from typing import Annotated, Any

from aiokafka.errors import KafkaError
from fastapi import APIRouter, Depends, Request

from metering.api.dependencies import scoped
from metering.api.errors import ApiError
from metering.api.ingest import RejectedRequest, WireEvent, events_from_body
from metering.api.schemas import ERRORS, EVENT_EXAMPLE, EVENT_SCHEMA, Accepted
from metering.api.server import MAX_BODY_BYTES
from metering.api.state import AppState, state_of
from metering.models import now_to_the_millisecond, timestamp_ms
from metering.storage.keys import ApiKey

PUBLISH_TIMEOUT_SECONDS = 10.0
# Bodies up to this size are validated on the event loop (~10 µs an event); larger ones in a
# worker thread (bench.adversarial measures both).
INLINE_BODY_BYTES = 64 * 1024

router = APIRouter()


async def parse_off_the_loop(
    state: AppState, body: bytes, content_type: str, **rules: Any
) -> list[WireEvent]:
    """`events_from_body`, in a worker thread for a large body: 1,000 events of 16 KiB of
    decimals take seconds of CPU, which on the event loop would stall every other request
    (`/healthz` included). The thread still holds the GIL, but yields it every 5 ms."""
    if len(body) <= INLINE_BODY_BYTES:
        return events_from_body(body, content_type, **rules)
    async with state.parsing:
        return await asyncio.to_thread(events_from_body, body, content_type, **rules)


@router.post(
    "/v1/events",
    status_code=202,
    response_model=Accepted,
    responses=ERRORS,
    tags=["ingest"],
    summary="Publish one usage event or up to 1,000 (JSON or CloudEvents)",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "oneOf": [
                            EVENT_SCHEMA,
                            {
                                "type": "array",
                                "items": EVENT_SCHEMA,
                                "minItems": 1,
                                "maxItems": 1000,
                            },
                        ]
                    },
                    "examples": {
                        "one": {"value": EVENT_EXAMPLE},
                        "batch": {"value": [EVENT_EXAMPLE]},
                    },
                },
                "application/cloudevents+json": {
                    "schema": {"type": "object"},
                    "example": {
                        "specversion": "1.0",
                        "id": "evt-1",
                        "type": "com.example.api_call",
                        "source": "/billing",
                        "time": "2026-11-25T10:00:00Z",
                        "subject": "0b4e3e2c-5a8f-4c6b-9a2e-3f1d2c4b5a6e",
                        "data": {"quantity": 3},
                    },
                },
                "application/cloudevents-batch+json": {
                    "schema": {"type": "array", "items": {"type": "object"}}
                },
            },
        }
    },
)
async def ingest(request: Request, key: Annotated[ApiKey, Depends(scoped("ingest"))]) -> Accepted:
    """All or nothing: 202 only after Kafka acknowledged every event (acks=all); a
    request with any invalid event publishes none and names each bad one by index."""
    state = state_of(request)
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY_BYTES):
        raise ApiError(413, "body_too_large", f"the body limit is {MAX_BODY_BYTES} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise ApiError(413, "body_too_large", f"the body limit is {MAX_BODY_BYTES} bytes")
    content_type = request.headers.get("content-type", "application/json")
    if not any(t in content_type for t in ("json",)):
        raise ApiError(415, "unsupported_media_type", "send application/json or CloudEvents JSON")
    # The instant the events are judged at travels with them as their Kafka timestamp,
    # so the consumer judges lateness the same way (metering.models.accepted_at).
    accepted = now_to_the_millisecond()
    try:
        events = await parse_off_the_loop(
            state,
            bytes(body),
            content_type,
            now=accepted,
            lateness_window=state.settings.lateness_window,
            future_tolerance=state.settings.future_tolerance,
            known_types=state.accepted_types.current,
        )
    except RejectedRequest as rejected:
        raise ApiError(
            rejected.status,
            rejected.code,
            rejected.reason,
            errors=[vars(e) for e in rejected.errors],
        ) from None
    foreign = [i for i, e in enumerate(events) if not key.may_access(e.event.org_id)]
    if foreign:
        raise ApiError(
            403,
            "other_organization",
            "this key may not ingest events of another organization",
            errors=[
                {"index": i, "code": "other_organization", "reason": "org_id is not the key's"}
                for i in foreign
            ],
        )
    try:
        async with asyncio.timeout(PUBLISH_TIMEOUT_SECONDS):
            await state.publisher.publish(
                [(e.key, e.payload) for e in events], timestamp_ms=timestamp_ms(accepted)
            )
    except (KafkaError, TimeoutError, OSError) as error:
        # Some events may be on Kafka already: a retry of the same request is safe,
        # because every event carries its id and the consumer stores each id once.
        raise ApiError(
            503,
            "kafka_unavailable",
            f"Kafka did not acknowledge every event ({type(error).__name__}); "
            "retry the same request",
            retry_after=1.0,
        ) from None
    state.metrics.published.inc(len(events))
    return Accepted(accepted=len(events), ids=[e.event.id for e in events])
