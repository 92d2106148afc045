"""The exception tree. Everything we raise on purpose is a `MeteringError`."""

from __future__ import annotations


class MeteringError(Exception):
    """Root of every error this service raises on purpose."""


class InvalidEvent(MeteringError):
    """A usage event broke a rule of contract section 1.

    `code` is stable and machine-readable (it becomes the DLQ `error.code` header);
    `reason` is for humans and names the field and the rule.
    """

    def __init__(self, code: str, reason: str, field: str | None = None) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason
        self.field = field


class DependencyUnavailable(MeteringError):
    """Postgres or Kafka did not answer; the caller should retry after `retry_after` seconds."""

    def __init__(self, dependency: str, reason: str, retry_after: float) -> None:
        super().__init__(f"{dependency} unavailable: {reason} (retrying in {retry_after:.1f}s)")
        self.dependency = dependency
        self.reason = reason
        self.retry_after = retry_after


class RetentionTooShort(MeteringError):
    """A retention horizon inside the lateness window: dropping those events' dedupe keys
    would let a re-sent copy, still accepted as on time, be stored and counted again.
    Keep at least `earliest_allowed` worth of raw events (choose an older horizon)."""

    def __init__(self, keep_from: object, earliest_allowed: object, reason: str) -> None:
        super().__init__(reason)
        self.keep_from = keep_from
        self.earliest_allowed = earliest_allowed
        self.reason = reason


class DevEnvironmentError(MeteringError):
    """The local Kafka or Postgres could not be set up; `reason` says what to fix."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class MigrationError(MeteringError):
    """A migration file failed; nothing of it was applied (each runs in one transaction)."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"migration {name} failed: {reason}")
        self.name = name
        self.reason = reason


class AggregatorNotActive(MeteringError):
    """Another aggregator holds the lead (one runs passes and publishes at a time), or this
    one lost it: its lock connection to PostgreSQL dropped, or a newer aggregator's Kafka
    producer fenced this one's. `holder` names the active one when known. Nothing is lost:
    the active aggregator does the same work; a continuous aggregator stands by and takes
    over when the lead is free."""

    def __init__(self, reason: str, holder: str | None = None) -> None:
        super().__init__(reason if holder is None else f"{reason}: {holder}")
        self.reason = reason
        self.holder = holder


class EventNotFound(MeteringError):
    """No event `event_id` of `org_id` is stored (it never was, or retention dropped it).
    Check the id and the organization: ids are case-sensitive."""

    def __init__(self, org_id: object, event_id: str) -> None:
        super().__init__(f"no event {event_id!r} is stored for organization {org_id}")
        self.org_id = org_id
        self.event_id = event_id


class OutsideLatenessWindow(MeteringError):
    """The event occurred before the lateness window: its periods are closed (billed), so it
    can no longer be cancelled. Correct the invoice instead, by hand."""

    def __init__(self, org_id: object, event_id: str, occurred_before: object) -> None:
        super().__init__(
            f"event {event_id!r} of organization {org_id} occurred before {occurred_before}, "
            "outside the lateness window; it can no longer be cancelled"
        )
        self.org_id = org_id
        self.event_id = event_id
        self.occurred_before = occurred_before
