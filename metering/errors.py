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
