"""The usage event of contract section 1, and the one validator every entry point uses.

`parse_event` turns raw bytes into a `UsageEvent` or raises `InvalidEvent` with a stable
code. It never raises anything else, whatever the input (a hypothesis property holds it to
that), so one bad message can never take a good one down with it.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Any
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema, field_validator
from pydantic_core import PydanticCustomError

from metering.errors import InvalidEvent
from metering.event_json import OutOfRangeNumber, decode_json, dump_json, int_out_of_range

MAX_EVENT_BYTES = 16 * 1024
MAX_SIGNIFICANT_DIGITS = 18
MAX_METADATA_DEPTH = 32
_EIGHTEEN_DIGITS = 10**MAX_SIGNIFICANT_DIGITS
ID_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
TYPE_PATTERN = re.compile(r"^[a-z][a-z0-9_.]{0,63}$")
# RFC 3339 date-time: full date, 'T' or space, full time with seconds, mandatory offset.
RFC3339 = re.compile(
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?"
    r"(?P<offset>[Zz]|[+-][0-9]{2}:[0-9]{2})?$"
)


class EventType(StrEnum):
    """The seven event types of v1, each read by its seeded meter (contract section 2).
    Other types are opened at run time by meters (`metering.meters.registry`)."""

    API_CALL = "api_call"
    RECORD_CREATED = "record_created"
    AUTOMATION_RUN = "automation_run"
    SCHEDULE_EXECUTED = "schedule_executed"
    AI_TOKENS_USED = "ai_tokens_used"
    STORAGE_USED = "storage_used"
    USER_ACTIVE = "user_active"


SEEDED_TYPES: frozenset[str] = frozenset(t.value for t in EventType)
_SEEDED: dict[str, str] = {t.value: t for t in EventType}


class UsageEvent(BaseModel):
    """One accepted usage event. Instances are valid by construction."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: Annotated[str, Field(pattern=ID_PATTERN.pattern)]
    # a seeded type comes back as its EventType member (a str): `event.type is EventType.X`
    type: Annotated[str, Field(pattern=TYPE_PATTERN.pattern)]
    org_id: UUID
    user_id: UUID | None = None
    # a JSON number (not a string), whatever pydantic would say of a Decimal
    quantity: Annotated[Decimal, WithJsonSchema({"type": "number", "minimum": 0})] = Decimal(1)
    occurred_at: datetime
    metadata: dict[str, Any] | None = None

    @field_validator("type")
    @classmethod
    def _seeded_type(cls, value: str) -> str:
        return _SEEDED.get(value, value)

    @field_validator("quantity", mode="before")
    @classmethod
    def _quantity(cls, value: object) -> Decimal:
        return check_quantity(value)

    @field_validator("occurred_at", mode="before")
    @classmethod
    def _occurred_at(cls, value: object) -> datetime:
        if isinstance(value, datetime):
            if value.tzinfo is None:
                raise PydanticCustomError("timestamp_without_offset", "occurred_at needs an offset")
            return value
        if not isinstance(value, str):
            raise PydanticCustomError("invalid_timestamp", "occurred_at must be an RFC 3339 string")
        match = RFC3339.match(value)
        if match is None:
            raise PydanticCustomError(
                "invalid_timestamp", "occurred_at must be RFC 3339, e.g. 2026-01-31T23:59:59Z"
            )
        if match.group("offset") is None:
            raise PydanticCustomError(
                "timestamp_without_offset", "occurred_at must carry an offset (Z or +hh:mm)"
            )
        try:
            parsed = datetime.fromisoformat(value.replace("z", "Z").replace("t", "T"))
        except ValueError:
            raise PydanticCustomError(
                "invalid_timestamp", "occurred_at is not a real date"
            ) from None
        return parsed

    @field_validator("metadata")
    @classmethod
    def _metadata_storable(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        # What JSON can spell but the store cannot take, refused here so that such an event
        # alone goes to the dead-letter topic instead of failing its batch: U+0000 and lone
        # UTF-16 surrogates (PostgreSQL's jsonb refuses them), numbers out of range (see
        # metering.event_json) and nesting deeper than MAX_METADATA_DEPTH.
        if value is not None:
            problem = metadata_problem(value)
            if problem is not None:
                raise PydanticCustomError(
                    "invalid_metadata", "cannot be stored: {what}", {"what": problem}
                )
        return value

    def to_json(self) -> bytes:
        """Serialise to the wire form of contract section 1 (exact decimals, RFC 3339).

        Built directly: id and type are restricted to characters JSON never escapes, the
        ids are UUIDs, the time is ISO text, the quantity is its Decimal's own text (`1.5`,
        `1E-70`: the same digits, so it passes the same bounds again) and metadata goes
        through `dump_json`. Hot path of ingestion over HTTP.
        """
        user = f'"{uuid_text(self.user_id)}"' if self.user_id is not None else "null"
        metadata = "" if self.metadata is None else ',"metadata":' + dump_json(self.metadata)
        return (
            f'{{"id":"{self.id}","type":"{self.type}","org_id":"{uuid_text(self.org_id)}",'
            f'"user_id":{user},"occurred_at":"{self.occurred_at.isoformat()}"{metadata},'
            f'"quantity":{self.quantity}}}'
        ).encode()

    def partition_key(self) -> bytes:
        """The Kafka message key: the org id's text, so one organization stays on one
        partition (one writer, in order)."""
        return uuid_text(self.org_id).encode()


def check_quantity(value: object) -> Decimal:
    """An event's quantity (or a requested one) by the rules of contract section 1: a JSON
    number, finite, >= 0, at most 1e30 and 18 significant digits. Raises
    PydanticCustomError with the rule's code (`invalid_quantity`, `negative_quantity`,
    `quantity_too_precise`)."""
    # bool is an int subclass; strings are refused so "5" cannot pass for 5.
    if type(value) is int and 0 <= value < _EIGHTEEN_DIGITS:
        return Decimal(value)  # the common case: a small whole number
    if type(value) is int:
        value = int_out_of_range(value) or value
    if isinstance(value, OutOfRangeNumber):
        raise PydanticCustomError("invalid_quantity", "{what}", {"what": value.describe()})
    if isinstance(value, bool) or not isinstance(value, int | Decimal):
        raise PydanticCustomError("invalid_quantity", "quantity must be a JSON number")
    number = Decimal(value)
    if not number.is_finite():
        raise PydanticCustomError("invalid_quantity", "quantity must be finite")
    if number < 0:
        raise PydanticCustomError("negative_quantity", "quantity must be >= 0")
    if number.adjusted() > 30:
        raise PydanticCustomError("invalid_quantity", "quantity is too large (max 1e30)")
    if significant_digits(number) > MAX_SIGNIFICANT_DIGITS:
        raise PydanticCustomError(
            "quantity_too_precise", "quantity has more than 18 significant digits"
        )
    return number


_JSON_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")


def quantity_from_text(text: str) -> Decimal:
    """`check_quantity` for a quantity written as a JSON number in text (a query string);
    raises PydanticCustomError as `check_quantity` does."""
    if not _JSON_NUMBER.fullmatch(text):
        raise PydanticCustomError("invalid_quantity", "quantity must be a number, e.g. 1 or 2.5")
    return check_quantity(decode_json(text))


# A lone surrogate: a JSON \udXXX escape without its pair. UTF-8 (and so jsonb) cannot encode it.
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _text_problem(text: str) -> str | None:
    if "\x00" in text:
        return "the character U+0000"
    if _SURROGATE.search(text):
        return "an unpaired UTF-16 surrogate"
    return None


_PLAIN = frozenset({Decimal, bool, type(None)})  # decoded values that are always storable


def metadata_problem(value: object, path: str = "metadata", depth: int = 1) -> str | None:
    """Why a decoded metadata value cannot be stored as it is (naming where), or None."""
    kind = type(value)
    if kind in _PLAIN:
        return None
    if kind is int:
        huge = int_out_of_range(value)  # type: ignore[arg-type]
        return None if huge is None else f"{path}: {huge.describe()}"
    if kind is str:
        problem = _text_problem(value)  # type: ignore[arg-type]
        return None if problem is None else f"{path} holds {problem}"
    if kind is OutOfRangeNumber:
        return f"{path}: {value.describe()}"  # type: ignore[attr-defined]
    if depth > MAX_METADATA_DEPTH:
        return f"{path} is nested deeper than {MAX_METADATA_DEPTH} levels"
    if kind is dict:
        for key, item in value.items():  # type: ignore[attr-defined]
            problem = _text_problem(key)
            if problem is not None:
                return f"a key in {path} holds {problem}"
            if type(item) not in _PLAIN:
                found = metadata_problem(item, f"{path}.{key[:40]}", depth + 1)
                if found:
                    return found
    elif kind is list:
        for index, item in enumerate(value):  # type: ignore[arg-type]
            if type(item) not in _PLAIN:
                found = metadata_problem(item, f"{path}[{index}]", depth + 1)
                if found:
                    return found
    return None


def significant_digits(number: Decimal) -> int:
    """Significant digits of a finite Decimal, exactly (`normalize()` would first round to
    the context's 28 digits, so a 31-digit number would count as 28)."""
    digits = number.as_tuple().digits
    end = len(digits)
    while end > 1 and digits[end - 1] == 0:
        end -= 1
    start = 0
    while start < end - 1 and digits[start] == 0:
        start += 1
    return end - start if any(digits) else 0


_UUID_TEXTS: dict[UUID, str] = {}


def uuid_text(value: UUID) -> str:
    """`str(value)`, remembered: org and user ids repeat across events and `UUID.__str__`
    is pure Python (~7% of the API's CPU while ingesting). Bounded at 100,000 ids."""
    text = _UUID_TEXTS.get(value)
    if text is None:
        if len(_UUID_TEXTS) >= 100_000:
            _UUID_TEXTS.clear()
        text = _UUID_TEXTS[value] = str(value)
    return text


# Errors pydantic-core raises itself are reported by field, with the rule of contract §1.
_FIELD_CODES = {
    "id": ("invalid_id", "must be 1-128 characters of A-Z a-z 0-9 . _ : -"),
    "type": ("invalid_type", "must be 1-64 characters [a-z][a-z0-9_.]*, e.g. api_call"),
    "org_id": ("invalid_uuid", "must be a UUID string"),
    "user_id": ("invalid_uuid", "must be a UUID string or null"),
    "metadata": ("invalid_metadata", "must be a JSON object"),
}
_OWN_CODES = {
    "invalid_uuid",
    "invalid_metadata",
    "invalid_quantity",
    "negative_quantity",
    "quantity_too_precise",
    "invalid_timestamp",
    "timestamp_without_offset",
    "user_required",
}


def _pydantic_to_invalid(error: ValidationError) -> InvalidEvent:
    first = error.errors(include_url=False)[0]
    loc = ".".join(str(part) for part in first["loc"]) or None
    kind = first["type"]
    if kind not in _OWN_CODES | {"missing", "extra_forbidden"} and loc in _FIELD_CODES:
        code, rule = _FIELD_CODES[loc]
        return InvalidEvent(code, f"{loc}: {rule}", loc)
    if kind == "extra_forbidden":
        return InvalidEvent("unknown_field", f"unknown field '{loc}' (a typo must not pass)", loc)
    if kind == "missing":
        return InvalidEvent("missing_field", f"required field '{loc}' is missing", loc)
    if kind in {"model_type", "model_attributes_type", "dict_type"}:
        return InvalidEvent("not_object", "the event must be a JSON object", loc)
    where = f"{loc}: " if loc else ""
    return InvalidEvent(kind, f"{where}{first['msg']}", loc)


def parse_event(
    raw: bytes | bytearray | memoryview | None,
    *,
    now: datetime,
    lateness_window: timedelta,
    future_tolerance: timedelta = timedelta(minutes=5),
    known_types: Collection[str] = SEEDED_TYPES,
) -> UsageEvent:
    """Validate one message against contract section 1; `known_types` are the types an
    active meter reads (others are `unknown_type`).

    Returns the event, or raises `InvalidEvent` whose `code` says which rule broke.
    Raises nothing else for any input.
    """
    if raw is None:
        raise InvalidEvent("empty", "the message has no value")
    data = bytes(raw)
    if len(data) > MAX_EVENT_BYTES:
        raise InvalidEvent("too_large", f"event is {len(data)} bytes; the limit is 16 KiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidEvent("not_utf8", f"not UTF-8 at byte {error.start}") from None
    try:
        document = decode_json(text)
    except (ValueError, RecursionError) as error:
        raise InvalidEvent("not_json", f"not JSON: {str(error)[:200]}") from None
    return validate_event(
        document,
        now=now,
        lateness_window=lateness_window,
        future_tolerance=future_tolerance,
        known_types=known_types,
    )


def validate_event(
    document: object,
    *,
    now: datetime,
    lateness_window: timedelta,
    future_tolerance: timedelta = timedelta(minutes=5),
    known_types: Collection[str] = SEEDED_TYPES,
) -> UsageEvent:
    """Validate an already-decoded JSON document; same promise as `parse_event`."""
    if not isinstance(document, dict):
        raise InvalidEvent("not_object", "the event must be a JSON object")
    try:
        event = UsageEvent.model_validate(document)
    except ValidationError as error:
        raise _pydantic_to_invalid(error) from None
    except (ValueError, TypeError, ArithmeticError, RecursionError) as error:
        raise InvalidEvent("invalid_event", str(error)[:200]) from None
    if event.type not in known_types:
        raise InvalidEvent(
            "unknown_type",
            f"no active meter reads type {event.type!r} (create one first: metering meters "
            "create; a typo must not pass)",
            "type",
        )
    if event.type is EventType.USER_ACTIVE and event.user_id is None:
        raise InvalidEvent("user_required", "user_active events need a user_id", "user_id")
    occurred = event.occurred_at
    if occurred > now + future_tolerance:
        raise InvalidEvent(
            "timestamp_in_future",
            f"occurred_at {occurred.isoformat()} is more than {future_tolerance} ahead of now",
            "occurred_at",
        )
    if occurred < now - lateness_window:
        raise InvalidEvent(
            "timestamp_too_old",
            f"occurred_at {occurred.isoformat()} is older than the lateness window "
            f"({lateness_window.days} days)",
            "occurred_at",
        )
    return event


# How far back a Kafka record's timestamp may carry the time an event was judged at. A
# consumer that lags less than this judges every event as it was judged when accepted; one
# that lags more judges against `now - MAX_ACCEPTANCE_DELAY`. Retention keeps raw events
# (and their dedupe keys) for the lateness window plus this, see metering.storage.retention.
MAX_ACCEPTANCE_DELAY = timedelta(days=1)


def accepted_at(timestamp_ms: int | None, now: datetime) -> datetime:
    """The time a consumed event's lateness and future tolerance are judged against: when it
    was accepted, not when it happens to be read.

    That is the Kafka record's timestamp: the API sets it to the instant it validated the
    event (so an event answered 202 is never refused later for the consumer's lag), other
    producers' clients to when they sent it, or the broker to when it appended it
    (LogAppendTime). It is trusted within [now - MAX_ACCEPTANCE_DELAY, now]: a producer's
    clock ahead of ours cannot widen the future tolerance, and a stale or missing timestamp
    cannot reopen a window retention has closed.
    """
    if timestamp_ms is None or timestamp_ms < 0:
        return now
    moment = _EPOCH + timedelta(milliseconds=timestamp_ms)
    return min(max(moment, now - MAX_ACCEPTANCE_DELAY), now)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MILLISECOND = timedelta(milliseconds=1)


def timestamp_ms(moment: datetime) -> int:
    """`moment` as a Kafka record timestamp: whole milliseconds since the epoch, exactly
    (`accepted_at` turns it back into the same instant when `moment` has no microseconds)."""
    return (moment - _EPOCH) // _MILLISECOND


def now_to_the_millisecond() -> datetime:
    """The current UTC time without its microseconds: an instant a Kafka timestamp can carry
    exactly, so an event judged at it is judged the same way by the consumer."""
    now = utc_now()
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


_SCHEMA_NOISE = frozenset({"title", "description", "default"})


def event_json_schema() -> dict[str, Any]:
    """The JSON Schema of an event, from the model (the API's OpenAPI uses it): definitions
    inlined, so that it can be embedded anywhere; titles and defaults dropped."""
    schema = UsageEvent.model_json_schema()
    definitions = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(definitions[node["$ref"].rsplit("/", 1)[-1]])
            return {k: inline(v) for k, v in node.items() if k not in _SCHEMA_NOISE}
        if isinstance(node, list):
            return [inline(item) for item in node]
        return node

    result: dict[str, Any] = inline(schema)
    return result


def utc_now() -> datetime:
    return datetime.now(UTC)
