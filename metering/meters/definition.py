"""A meter (contract section 2): which events of which type become which number, as data.

Pure: `MeterSpec` validates a definition as a user writes it (API body, CLI options) and
raises `InvalidMeter` naming the field and the rule; nothing here touches a database.
`read_event` is the one plain-Python statement of what a meter reads from an event (its
value, whether the filter lets the event in, its dimensions, or why it skips it): the
aggregation oracle (`aggregator.semantics`) and the tests use it, and the SQL of the
aggregator does the same thing row by row.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from typing import Any

from metering.errors import MeteringError

KEY_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
EVENT_TYPE_PATTERN = re.compile(r"^[a-z][a-z0-9_.]{0,63}$")
# A metadata path is dotted segments of letters, digits, '_' and '-': what a JSON key of a
# sane producer holds, and nothing that needs quoting anywhere.
PATH_SEGMENT = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_PATH_SEGMENTS = 8
MAX_GROUP_BY = 3
MAX_FILTER_PATHS = 8
MAX_FILTER_VALUES = 100
MAX_FILTER_COMBINATIONS = 1000
MAX_DIMENSION_CHARS = 128
MAX_DESCRIPTION_CHARS = 1000
MAX_LIMIT_UNIT = Decimal(10) ** 18
# A numeric string a value path may hold: plain decimal notation, no spaces, no NaN or
# Infinity, an exponent of at most three digits (the SQL applies the same pattern).
NUMERIC_TEXT = re.compile(r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]{1,3})?$")
MAX_NUMERIC_TEXT = 100


class Aggregation(StrEnum):
    SUM = "sum"
    COUNT = "count"
    MAX = "max"
    LATEST = "latest"
    UNIQUE_COUNT = "unique_count"
    TIME_WEIGHTED = "time_weighted"


class MeterStatus(StrEnum):
    BACKFILLING = "backfilling"
    ACTIVE = "active"
    ARCHIVED = "archived"


class InvalidMeter(MeteringError):
    """A meter definition broke a rule of contract section 2: `field` says which, `reason`
    how to fix it. Nothing was created."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def parse_path(text: str, field: str) -> tuple[str, ...]:
    """`a.b.c` as its segments; raises InvalidMeter for anything else."""
    if not isinstance(text, str) or not text:
        raise InvalidMeter(field, "a metadata path must be a non-empty string like 'model'")
    segments = tuple(text.split("."))
    if len(segments) > MAX_PATH_SEGMENTS:
        raise InvalidMeter(field, f"{text!r} is deeper than {MAX_PATH_SEGMENTS} segments")
    for segment in segments:
        if not PATH_SEGMENT.match(segment):
            raise InvalidMeter(
                field,
                f"{text!r}: each dotted segment must be 1-64 of A-Z a-z 0-9 _ -",
            )
    return segments


def _value_source(aggregation: Aggregation, value: str | None) -> str:
    if aggregation is Aggregation.COUNT:
        if value not in (None, "quantity"):
            raise InvalidMeter("value", "a count meter counts events and reads no value")
        return "quantity"
    default = "user_id" if aggregation is Aggregation.UNIQUE_COUNT else "quantity"
    value = default if value is None else value
    if value == "quantity":
        if aggregation is Aggregation.UNIQUE_COUNT:
            raise InvalidMeter("value", "unique_count counts 'user_id' or 'metadata.<path>'")
        return value
    if value == "user_id":
        if aggregation is not Aggregation.UNIQUE_COUNT:
            raise InvalidMeter("value", "only unique_count reads 'user_id'")
        return value
    if isinstance(value, str) and value.startswith("metadata."):
        parse_path(value.removeprefix("metadata."), "value")
        return value
    raise InvalidMeter("value", "must be 'quantity', 'user_id' or 'metadata.<dotted.path>'")


def _merged(document: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    """`document` with `value` at `path` (a copy; the paths of a filter never overlap)."""
    copy = json.loads(json.dumps(document))
    node = copy
    for segment in path[:-1]:
        node = node.setdefault(segment, {})
    node[path[-1]] = value
    result: dict[str, Any] = copy
    return result


def _filter(raw: object) -> dict[str, tuple[Any, ...]]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InvalidMeter("filter", 'must be an object: {"<metadata path>": value or [values]}')
    if len(raw) > MAX_FILTER_PATHS:
        raise InvalidMeter("filter", f"at most {MAX_FILTER_PATHS} paths")
    result: dict[str, tuple[Any, ...]] = {}
    for path, wanted in raw.items():
        parse_path(path, f"filter.{path}")
        values = tuple(wanted) if isinstance(wanted, list) else (wanted,)
        if not values or len(values) > MAX_FILTER_VALUES:
            raise InvalidMeter(f"filter.{path}", f"1 to {MAX_FILTER_VALUES} values")
        for item in values:
            if isinstance(item, dict | list | float):
                raise InvalidMeter(
                    f"filter.{path}", "values are strings, integers, booleans or null"
                )
        result[path] = values
    for shorter in result:
        for longer in result:
            if longer.startswith(shorter + "."):
                raise InvalidMeter("filter", f"{shorter!r} and {longer!r} overlap; keep one")
    combinations = 1
    for values in result.values():
        combinations *= len(values)
    if combinations > MAX_FILTER_COMBINATIONS:
        raise InvalidMeter(
            "filter",
            f"{combinations} combinations of values; at most {MAX_FILTER_COMBINATIONS}",
        )
    return result


@dataclass(frozen=True)
class MeterSpec:
    """A validated meter definition, as created (a meter is immutable but for its
    description)."""

    key: str
    event_type: str
    aggregation: Aggregation
    value: str
    filter: dict[str, tuple[Any, ...]]
    group_by: tuple[str, ...]
    limit_key: str | None
    limit_scope: str | None
    limit_unit: Decimal
    description: str

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> MeterSpec:
        """Validate a definition as a user wrote it; raises InvalidMeter."""
        known = {
            "key",
            "event_type",
            "aggregation",
            "value",
            "filter",
            "group_by",
            "limit_key",
            "limit_scope",
            "limit_unit",
            "description",
        }
        for name in raw:
            if name not in known:
                raise InvalidMeter(name, "unknown field (a typo must not pass)")
        key = raw.get("key")
        if not isinstance(key, str) or not KEY_PATTERN.match(key):
            raise InvalidMeter("key", "must match [a-z][a-z0-9_]{0,62}")
        event_type = raw.get("event_type")
        if not isinstance(event_type, str) or not EVENT_TYPE_PATTERN.match(event_type):
            raise InvalidMeter("event_type", "must match [a-z][a-z0-9_.]{0,63}")
        try:
            aggregation = Aggregation(str(raw.get("aggregation")))
        except ValueError:
            raise InvalidMeter(
                "aggregation", "must be one of: " + ", ".join(a.value for a in Aggregation)
            ) from None
        value = _value_source(aggregation, raw.get("value"))
        group_by = raw.get("group_by") or []
        if not isinstance(group_by, list):
            raise InvalidMeter("group_by", "must be a list of metadata paths")
        if len(group_by) > MAX_GROUP_BY:
            raise InvalidMeter("group_by", f"at most {MAX_GROUP_BY} dimensions")
        for path in group_by:
            parse_path(path, "group_by")
        if len(set(group_by)) != len(group_by):
            raise InvalidMeter("group_by", "a dimension is listed twice")
        limit_key = raw.get("limit_key")
        limit_scope = raw.get("limit_scope")
        unit_raw = raw.get("limit_unit", 1)
        if limit_key is None:
            if limit_scope is not None or unit_raw != 1:
                raise InvalidMeter("limit_key", "limit_scope and limit_unit need a limit_key")
        else:
            if not isinstance(limit_key, str) or not KEY_PATTERN.match(limit_key):
                raise InvalidMeter("limit_key", "must be a plan feature key like max_api_calls")
            limit_scope = limit_scope or "period"
            if limit_scope not in ("period", "lifetime"):
                raise InvalidMeter("limit_scope", "must be 'period' or 'lifetime'")
            if group_by:
                raise InvalidMeter(
                    "limit_key", "a meter with dimensions cannot count against a limit"
                )
            if aggregation is Aggregation.TIME_WEIGHTED:
                raise InvalidMeter(
                    "limit_key", "a time_weighted meter cannot count against a limit (yet)"
                )
            if limit_scope == "lifetime" and aggregation not in (
                Aggregation.SUM,
                Aggregation.COUNT,
                Aggregation.MAX,
            ):
                raise InvalidMeter(
                    "limit_scope", "a lifetime limit needs a sum, count or max meter"
                )
        if isinstance(unit_raw, bool) or not isinstance(unit_raw, int | str | Decimal):
            raise InvalidMeter("limit_unit", "must be a positive integer like 1000000000")
        try:
            limit_unit = Decimal(unit_raw)
        except InvalidOperation:
            raise InvalidMeter("limit_unit", "must be a positive integer") from None
        if limit_unit != limit_unit.to_integral_value() or not 1 <= limit_unit <= MAX_LIMIT_UNIT:
            raise InvalidMeter("limit_unit", "must be an integer from 1 to 10^18")
        description = raw.get("description") or ""
        if not isinstance(description, str) or len(description) > MAX_DESCRIPTION_CHARS:
            raise InvalidMeter("description", f"text of at most {MAX_DESCRIPTION_CHARS} chars")
        return cls(
            key=key,
            event_type=event_type,
            aggregation=aggregation,
            value=value,
            filter=_filter(raw.get("filter")),
            group_by=tuple(group_by),
            limit_key=limit_key,
            limit_scope=limit_scope,
            limit_unit=limit_unit,
            description=description,
        )

    def filter_document(self) -> list[dict[str, Any]]:
        """The filter as stored (`meters.filter`): [{"path": [...], "values": [...]}]."""
        return [
            {"path": list(parse_path(path, "filter")), "values": list(values)}
            for path, values in self.filter.items()
        ]

    def filter_containments(self) -> list[dict[str, Any]] | None:
        """The filter as the JSON documents one of which an event's metadata must contain
        (`meters.filter_docs`, PostgreSQL's `@>`: one cheap operator per event instead of a
        function call): every combination of one value per path. None without a filter."""
        if not self.filter:
            return None
        documents: list[dict[str, Any]] = [{}]
        for path, values in self.filter.items():
            documents = [
                _merged(document, tuple(path.split(".")), value)
                for document in documents
                for value in values
            ]
        return documents


# Why a meter skips an event it reads the type of (metering_meter_skipped_total reason).
SKIP_MISSING = "value_missing"
SKIP_NOT_A_NUMBER = "not_a_number"
SKIP_DIMENSION_TOO_LONG = "dimension_too_long"


@dataclass(frozen=True)
class Reading:
    """What one meter takes from one event: its value (a Decimal, or the text counted by
    unique_count) and its dimensions; or `skipped`, the reason it takes nothing."""

    value: Decimal | str | None
    dimensions: dict[str, str | None]
    skipped: str | None = None


def _at(document: Any, path: tuple[str, ...]) -> Any:
    for segment in path:
        if not isinstance(document, dict) or segment not in document:
            return _ABSENT
        document = document[segment]
    return document


_ABSENT = object()


def json_text(value: Any) -> str | None:
    """A metadata value as dimension or unique text, as PostgreSQL's `#>>` spells it:
    strings as they are, booleans `true`/`false`, numbers in their JSON text, null None."""
    if value is None or value is _ABSENT:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int | Decimal):
        return format(Decimal(value), "f")
    return json.dumps(value, separators=(", ", ": "), default=str)


def number_of(value: Any) -> Decimal | None:
    """A JSON number or a numeric string as an exact Decimal; None for anything else."""
    if isinstance(value, bool) or value is None or value is _ABSENT:
        return None
    if isinstance(value, int | Decimal):
        return Decimal(value)
    if isinstance(value, str) and len(value) <= MAX_NUMERIC_TEXT and NUMERIC_TEXT.match(value):
        return Decimal(value)
    return None


def _matches(metadata: Any, wanted: dict[str, tuple[Any, ...]]) -> bool:
    for path, values in wanted.items():
        found = _at(metadata, tuple(path.split(".")))
        if found is _ABSENT or not any(_same_json(found, v) for v in values):
            return False
    return True


def _same_json(found: Any, wanted: Any) -> bool:
    if isinstance(found, bool) or isinstance(wanted, bool):
        return isinstance(found, bool) and isinstance(wanted, bool) and found == wanted
    if isinstance(found, int | Decimal) and isinstance(wanted, int | Decimal):
        return Decimal(found) == Decimal(wanted)
    return type(found) is type(wanted) and bool(found == wanted)


def read_event(
    spec: MeterSpec, quantity: Decimal, user_id: str | None, metadata: dict[str, Any] | None
) -> Reading | None:
    """What `spec` reads from an event of its type: None when its filter leaves the event
    out; a Reading with `skipped` set when the event is in but unreadable."""
    metadata = metadata or {}
    if spec.filter and not _matches(metadata, spec.filter):
        return None
    dimensions: dict[str, str | None] = {}
    for path in spec.group_by:
        text = json_text(_at(metadata, tuple(path.split("."))))
        if text is not None and len(text) > MAX_DIMENSION_CHARS:
            return Reading(None, {}, SKIP_DIMENSION_TOO_LONG)
        dimensions[path] = text
    value: Decimal | str | None
    if spec.aggregation is Aggregation.COUNT:
        value = Decimal(1)
    elif spec.value == "quantity":
        value = quantity
    elif spec.value == "user_id":
        if user_id is None:
            return Reading(None, dimensions, SKIP_MISSING)
        value = user_id
    else:
        found = _at(metadata, tuple(spec.value.removeprefix("metadata.").split(".")))
        if found is _ABSENT or found is None:
            return Reading(None, dimensions, SKIP_MISSING)
        if spec.aggregation is Aggregation.UNIQUE_COUNT:
            value = json_text(found)
        else:
            value = number_of(found)
            if value is None:
                return Reading(None, dimensions, SKIP_NOT_A_NUMBER)
    return Reading(value, dimensions)
