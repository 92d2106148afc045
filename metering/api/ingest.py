"""Turning an ingestion request body into validated events, or per-event errors.

Accepted bodies (contract section 5):
- one usage event (contract section 1) or a JSON array of them (at most 1,000);
- CloudEvents 1.0 structured mode (`application/cloudevents+json`): one CloudEvent;
- CloudEvents batch mode (`application/cloudevents-batch+json`): an array of them.

CloudEvents map onto usage events as: `id` -> id, `type` -> type (a `com.example.` style
reverse-DNS prefix is allowed: the last dot-separated part is used), `time` -> occurred_at
(required), `subject` -> org_id (or `data.org_id`), `data.quantity`, `data.user_id`,
`data.metadata` -> the same fields; `source` is kept as metadata `ce_source`. The envelope
attributes `specversion` (must be "1.0"), `datacontenttype` and `dataschema` are accepted;
any other attribute is an extension and is kept in metadata under `ce_<name>`.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from metering.errors import InvalidEvent, MeteringError
from metering.event_json import decode_json
from metering.models import MAX_EVENT_BYTES, SEEDED_TYPES, UsageEvent, validate_event

MAX_EVENTS_PER_REQUEST = 1000
CLOUDEVENTS = "application/cloudevents+json"
CLOUDEVENTS_BATCH = "application/cloudevents-batch+json"
CE_ENVELOPE = {
    "specversion",
    "id",
    "type",
    "source",
    "subject",
    "time",
    "data",
    "datacontenttype",
    "dataschema",
}


@dataclass(frozen=True)
class WireEvent:
    """A validated event with the bytes and key that go to Kafka, built once."""

    event: UsageEvent
    payload: bytes
    key: bytes


@dataclass(frozen=True)
class EventError:
    index: int
    code: str
    reason: str


class RejectedRequest(MeteringError):
    """The request cannot be accepted: nothing of it is published.

    `status` is the HTTP status (400 malformed, 413 too large, 422 invalid events);
    `errors` names each bad event by index.
    """

    def __init__(
        self, status: int, code: str, reason: str, errors: list[EventError] | None = None
    ) -> None:
        super().__init__(reason)
        self.status = status
        self.code = code
        self.reason = reason
        self.errors = errors or []


def _from_cloudevent(envelope: object) -> object:
    if not isinstance(envelope, dict):
        raise InvalidEvent("not_object", "a CloudEvent must be a JSON object")
    if envelope.get("specversion") != "1.0":
        raise InvalidEvent("invalid_cloudevent", 'specversion must be "1.0"', "specversion")
    data = envelope.get("data", {})
    if not isinstance(data, dict):
        raise InvalidEvent("invalid_cloudevent", "data must be a JSON object", "data")
    kind = envelope.get("type")
    metadata: dict[str, Any] = (
        dict(data.get("metadata") or {}) if isinstance(data.get("metadata"), dict) else {}
    )
    if "metadata" in data and not isinstance(data["metadata"], dict):
        raise InvalidEvent(
            "invalid_metadata", "data.metadata must be a JSON object", "data.metadata"
        )
    if "source" in envelope:
        metadata["ce_source"] = envelope["source"]
    for name, value in envelope.items():
        if name not in CE_ENVELOPE:
            metadata[f"ce_{name}"] = value
    unknown = set(data) - {"org_id", "user_id", "quantity", "metadata"}
    if unknown:
        raise InvalidEvent("unknown_field", f"unknown field 'data.{sorted(unknown)[0]}'", "data")
    document: dict[str, Any] = {
        "id": envelope.get("id"),
        "type": kind.rsplit(".", 1)[-1] if isinstance(kind, str) else kind,
        "org_id": envelope.get("subject", data.get("org_id")),
        "occurred_at": envelope.get("time"),
    }
    for field in ("user_id", "quantity"):
        if field in data:
            document[field] = data[field]
    if metadata:
        document["metadata"] = metadata
    return {k: v for k, v in document.items() if v is not None or k in {"user_id"}}


def events_from_body(
    body: bytes,
    content_type: str,
    *,
    now: datetime,
    lateness_window: timedelta,
    future_tolerance: timedelta,
    known_types: Collection[str] = SEEDED_TYPES,
) -> list[WireEvent]:
    """Every event of the request, validated exactly as the consumer validates them, with
    its wire form (the 16 KiB limit applies to those bytes, as published).

    Raises `RejectedRequest` naming each bad event by index: a request is all or nothing.
    """
    media = content_type.split(";", 1)[0].strip().lower()
    try:
        document = decode_json(body.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise RejectedRequest(
            400, "malformed_json", f"the body is not UTF-8 (at byte {error.start})"
        ) from None
    except (ValueError, RecursionError) as error:
        raise RejectedRequest(
            400, "malformed_json", f"the body is not valid JSON: {str(error)[:200]}"
        ) from None
    cloudevents = media in {CLOUDEVENTS, CLOUDEVENTS_BATCH}
    items = document if isinstance(document, list) else [document]
    if media == CLOUDEVENTS_BATCH and not isinstance(document, list):
        raise RejectedRequest(400, "malformed_batch", "a CloudEvents batch must be a JSON array")
    if not items:
        raise RejectedRequest(422, "empty_batch", "the request holds no events")
    if len(items) > MAX_EVENTS_PER_REQUEST:
        raise RejectedRequest(
            413,
            "too_many_events",
            f"{len(items)} events; at most {MAX_EVENTS_PER_REQUEST} per request",
        )
    events: list[WireEvent] = []
    errors: list[EventError] = []
    for index, item in enumerate(items):
        try:
            candidate = _from_cloudevent(item) if cloudevents else item
            if isinstance(candidate, dict) and "id" not in candidate:
                raise InvalidEvent(
                    "missing_field", "required field 'id' is missing (the idempotency key)", "id"
                )
            event = validate_event(
                candidate,
                now=now,
                lateness_window=lateness_window,
                future_tolerance=future_tolerance,
                known_types=known_types,
            )
            payload = event.to_json()
            if len(payload) > MAX_EVENT_BYTES:
                raise InvalidEvent(
                    "too_large", f"event is {len(payload)} bytes; the limit is 16 KiB"
                )
            events.append(WireEvent(event, payload, event.partition_key()))
        except InvalidEvent as error:
            errors.append(EventError(index, error.code, error.reason))
    if errors:
        raise RejectedRequest(
            422,
            "invalid_events",
            f"{len(errors)} of {len(items)} events are invalid; none was accepted",
            errors,
        )
    return events
