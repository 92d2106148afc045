"""The shared validator at the level of JSON text (issue 42): any number token, any nesting.

Hypothesis writes the numbers as text, the way a producer can: any count of digits, any
exponent, in the quantity and anywhere in metadata, nested to any depth. Every input must be
either accepted and storable or refused with a reason, and what the API accepts and
re-serialises the consumer must accept as the same event. How long the worst of these takes
is measured by `python -m bench.adversarial`, not asserted here.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metering.errors import InvalidEvent
from metering.event_json import (
    MAX_EXPONENT,
    MAX_NUMBER_DIGITS,
    OutOfRangeNumber,
    decode_json,
    dump_json,
    int_out_of_range,
)
from metering.models import MAX_METADATA_DEPTH, parse_event, significant_digits
from metering.storage.events import EventStore, IncomingEvent

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
RULES = {"now": NOW, "lateness_window": timedelta(days=35)}
ORG = "00000000-0000-4000-8000-00000000abcd"

digits = st.text("0123456789", min_size=1, max_size=40) | st.text(
    "0123456789", min_size=1, max_size=3000
)


@st.composite
def number_tokens(draw: st.DrawFn) -> str:
    """Any JSON number, as text: sign, integer part, fraction, exponent of any size."""
    sign = draw(st.sampled_from(["", "-"]))
    whole = draw(digits).lstrip("0") or "0"
    fraction = draw(st.none() | digits)
    exponent = draw(
        st.none()
        | st.tuples(
            st.sampled_from(["e", "E"]),
            st.sampled_from(["", "+", "-"]),
            st.text("0123456789", min_size=1, max_size=25),
        ).map("".join)
    )
    return sign + whole + ("." + fraction if fraction else "") + (exponent or "")


@st.composite
def nested(draw: st.DrawFn, leaf: str) -> str:
    """`leaf` inside arrays and objects, up to 1,200 levels deep."""
    depth = draw(st.integers(0, 40) | st.integers(0, 1200))
    opening, closing = [], []
    for level in range(depth):
        if draw(st.booleans()):
            opening.append("[")
            closing.append("]")
        else:
            opening.append(f'{{"k{level}":')
            closing.append("}")
    return "".join(opening) + leaf + "".join(reversed(closing))


@st.composite
def events_as_text(draw: st.DrawFn) -> bytes:
    fields = [
        '"id":"f1"',
        '"type":"api_call"',
        f'"org_id":"{ORG}"',
        f'"occurred_at":"{NOW.isoformat()}"',
    ]
    if draw(st.booleans()):
        fields.append('"quantity":' + draw(number_tokens()))
    if draw(st.booleans()):
        leaf = draw(number_tokens() | st.sampled_from(["NaN", "Infinity", "-Infinity", '"t"']))
        fields.append('"metadata":{"v":' + draw(nested(leaf)) + "}")
    return ("{" + ",".join(draw(st.permutations(fields))) + "}").encode()


def depth(value: object) -> int:
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    return 0


@given(number_tokens())
@settings(max_examples=400, deadline=None)
def test_any_number_decodes_bounded_or_out_of_range(token: str) -> None:
    try:
        value = decode_json(token)
    except ValueError:  # Python's own limit: an integer of more than 4,300 digits
        assert "e" not in token.lower() and "." not in token and len(token) > 4300
        return
    if isinstance(value, OutOfRangeNumber):
        return
    if isinstance(value, int):
        value = int_out_of_range(value) or value  # the validator's bound for integers
        if isinstance(value, OutOfRangeNumber):
            return
    assert isinstance(value, int | Decimal)
    number = Decimal(value)
    assert number.is_finite()
    assert number == 0 or abs(number.adjusted()) <= MAX_EXPONENT
    assert len(number.as_tuple().digits) <= MAX_NUMBER_DIGITS
    again = decode_json(dump_json(value))  # written back exactly, and accepted again
    assert not isinstance(again, OutOfRangeNumber) and again == value


@given(events_as_text())
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_event_is_accepted_and_storable_or_refused_with_a_reason(raw: bytes) -> None:
    try:
        event = parse_event(raw, **RULES)  # type: ignore[arg-type]
    except InvalidEvent as refused:
        assert refused.code and refused.reason
        return
    # accepted: its row can be made, and the wire form the API publishes is accepted by the
    # consumer as the same event (what the API accepts, the consumer stores)
    row = IncomingEvent(event)
    again = parse_event(event.to_json(), **RULES)  # type: ignore[arg-type]
    assert again == event
    assert significant_digits(event.quantity) <= 18
    if event.metadata is not None:
        assert row.metadata_json is not None
        assert decode_json(row.metadata_json) == event.metadata  # numbers exactly as sent
        assert depth(event.metadata) <= MAX_METADATA_DEPTH


@pytest.mark.services
@given(st.lists(events_as_text(), min_size=1, max_size=12))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_every_accepted_number_and_nesting_is_stored_by_postgres(
    migrated_database: str, batch: list[bytes]
) -> None:
    """Validation and PostgreSQL agree on numbers and nesting: no accepted event makes its
    batch fail (1e5000 once did, forever), and jsonb holds the number that was sent."""
    org = uuid.uuid4()
    accepted: list[IncomingEvent] = []
    for n, raw in enumerate(batch):
        text = raw.replace(ORG.encode(), str(org).encode()).replace(b'"f1"', b'"f%d"' % n)
        try:
            accepted.append(IncomingEvent(parse_event(text, **RULES)))  # type: ignore[arg-type]
        except InvalidEvent:
            continue

    async def write() -> list[asyncpg.Record]:
        pool = await asyncpg.create_pool(migrated_database, min_size=1, max_size=1)
        assert pool is not None
        try:
            await EventStore(pool).write_batch(accepted)
            return list(
                await pool.fetch(
                    "SELECT event_id, quantity, metadata::text AS metadata FROM usage_events "
                    "WHERE org_id = $1 ORDER BY event_id",
                    org,
                )
            )
        finally:
            await pool.close()

    rows = {r["event_id"]: r for r in asyncio.run(write())}
    assert sorted(rows) == sorted(item.event.id for item in accepted)
    for item in accepted:
        row = rows[item.event.id]
        assert row["quantity"] == item.event.quantity
        if item.event.metadata is not None:
            stored = json.loads(row["metadata"], parse_float=Decimal, parse_int=Decimal)
            sent = json.loads(item.metadata_json or "", parse_float=Decimal, parse_int=Decimal)
            assert stored == sent
