"""Cancelling events over HTTP on the real API and PostgreSQL (contract section 10): who
may cancel, what each answer says, idempotence, and the audit trail."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
import httpx
import pytest

from metering.models import UsageEvent
from metering.storage.events import EventStore, IncomingEvent
from tests.conftest import Server

pytestmark = pytest.mark.services


@pytest.fixture
async def stored(migrated_database: str) -> AsyncIterator[EventStore]:
    pool = await asyncpg.create_pool(migrated_database, min_size=1, max_size=2)
    yield EventStore(pool)
    await pool.close()


async def store(events: EventStore, org: uuid.UUID, event_id: str, days_ago: int = 0) -> None:
    event = UsageEvent(
        id=event_id,
        type="api_call",
        org_id=org,
        quantity=Decimal(3),
        occurred_at=datetime.now(UTC) - timedelta(days=days_ago),
    )
    await events.write_batch([IncomingEvent(event)])


async def test_cancel_over_http(server: Server, make_key, stored: EventStore) -> None:  # type: ignore[no-untyped-def]
    org, other = uuid.uuid4(), uuid.uuid4()
    for event_id in ("e1", "e2", "e3"):
        await store(stored, org, event_id)
    await store(stored, org, "old", days_ago=40)
    admin = {"Authorization": f"Bearer {await make_key('admin')}"}
    own_ingest = {"Authorization": f"Bearer {await make_key('ingest', org=org)}"}
    other_ingest = {"Authorization": f"Bearer {await make_key('ingest', org=other)}"}
    any_ingest = {"Authorization": f"Bearer {await make_key('ingest')}"}
    reader = {"Authorization": f"Bearer {await make_key('read', org=org)}"}
    bound_admin = {"Authorization": f"Bearer {await make_key('admin', org=other)}"}
    reason = {"reason": "sent twice under a new id"}

    def url(event_id: str, of: uuid.UUID = org) -> str:
        return f"/v1/orgs/{of}/events/{event_id}/cancel"

    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        done = await client.post(url("e1"), json=reason, headers=admin)
        assert done.status_code == 200, done.text
        body = done.json()
        assert (body["status"], body["event_id"], body["type"], body["quantity"]) == (
            "cancelled",
            "e1",
            "api_call",
            "3",
        )
        assert body["cancelled_by"].startswith("key:") and body["reason"] == reason["reason"]
        again = await client.post(url("e1"), json={"reason": "other"}, headers=admin)
        assert again.status_code == 200
        assert again.json()["status"] == "already_cancelled"
        assert again.json()["reason"] == reason["reason"]
        assert again.json()["cancelled_at"] == body["cancelled_at"]

        own = await client.post(url("e2"), json=reason, headers=own_ingest)
        assert own.status_code == 200, own.text
        for headers in (other_ingest, any_ingest, reader, bound_admin):
            refused = await client.post(url("e3"), json=reason, headers=headers)
            assert refused.status_code == 403, (headers, refused.text)
        unknown = await client.post(url("nope"), json=reason, headers=admin)
        assert (unknown.status_code, unknown.json()["code"]) == (404, "unknown_event")
        old = await client.post(url("old"), json=reason, headers=admin)
        assert (old.status_code, old.json()["code"]) == (409, "outside_lateness_window")
        assert "earliest" in old.json()
        for bad in ({}, {"reason": ""}, {"reason": "x", "extra": 1}):
            invalid = await client.post(url("e3"), json=bad, headers=admin)
            assert invalid.status_code == 422, (bad, invalid.text)
        bad_id = await client.post(url("a b"), json=reason, headers=admin)
        assert bad_id.status_code in (400, 404, 422)
        unauthenticated = await client.post(url("e3"), json=reason)
        assert unauthenticated.status_code == 401

        trail = await client.get("/v1/audit", params={"org": str(org)}, headers=admin)
        assert trail.status_code == 200, trail.text
        entries = trail.json()["entries"]
        assert [(e["action"], e["details"]["ids"]) for e in entries] == [
            ("events.cancel", ["e2"]),
            ("events.cancel", ["e1"]),
        ]
        assert (await client.get("/v1/audit", headers=bound_admin)).status_code == 403
        assert (await client.get("/v1/audit", headers=reader)).status_code == 403
        bad_org = await client.get("/v1/audit", params={"org": "x"}, headers=admin)
        assert bad_org.status_code == 400
    assert "e3" not in {e["details"]["ids"][0] for e in entries}
