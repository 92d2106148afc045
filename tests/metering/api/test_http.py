"""The HTTP API on the real services: auth matrix, ingestion end to end, CloudEvents,
all-or-nothing batches, tenancy enforced down to row-level security."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import asyncpg
import httpx
import pytest

from metering.config import Settings
from tests.conftest import ConsumerProcess, Server, async_wait_for, read_topic

pytestmark = pytest.mark.services


def event(org: uuid.UUID, event_id: str, **extra: object) -> dict[str, object]:
    return {
        "id": event_id,
        "type": "api_call",
        "org_id": str(org),
        "quantity": 1,
        "occurred_at": datetime.now(UTC).isoformat(),
        **extra,
    }


async def test_auth_matrix(server: Server, make_key) -> None:  # type: ignore[no-untyped-def]
    org, other = uuid.uuid4(), uuid.uuid4()
    reader = await make_key("read")
    bound = await make_key("read", org=org)
    ingest_only = await make_key("ingest")
    revoked = await make_key("read")
    await make_key.store.revoke(revoked.split("_")[1])
    path = f"/v1/orgs/{org}/features/max_mau"
    async with httpx.AsyncClient(base_url=server.url) as client:

        async def status(key: str | None, url: str = path) -> tuple[int, str]:
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            response = await client.get(url, headers=headers)
            return response.status_code, response.json().get("code", "")

        assert await status(None) == (401, "unauthenticated")
        assert await status("mk_nothing_here") == (401, "invalid_key")
        assert await status(reader[:-2] + "xx") == (401, "invalid_key")
        assert await status(revoked) == (401, "invalid_key")
        assert await status(ingest_only) == (403, "missing_scope")
        assert await status(bound, f"/v1/orgs/{other}/features/max_mau") == (
            403,
            "other_organization",
        )
        assert (await status(bound))[0] == 200
        assert (await status(reader))[0] == 200
        response = await client.post(
            "/v1/events",
            json=[event(other, "x")],
            headers={"Authorization": f"Bearer {await make_key('ingest', org=org)}"},
        )
        assert response.status_code == 403 and response.json()["code"] == "other_organization"


async def test_ingestion_end_to_end_and_all_or_nothing(
    server: Server,
    make_key,
    settings: Settings,
    migrated_database: str,  # type: ignore[no-untyped-def]
    start_consumer: Callable[..., ConsumerProcess],
    start_aggregator: Callable[[], int],
) -> None:
    org = uuid.uuid4()
    headers = {"Authorization": f"Bearer {await make_key('ingest', 'read')}"}
    start_consumer()
    start_aggregator()
    async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=30) as client:
        bad = await client.post(
            "/v1/events", json=[event(org, "ok-1"), event(org, "bad", quantity=-5)]
        )
        assert bad.status_code == 422
        assert bad.json()["errors"] == [
            {
                "index": 1,
                "code": "negative_quantity",
                "reason": "quantity: quantity must be >= 0",
            }
        ]
        batch = [event(org, f"e{n}", quantity=10) for n in range(500)]
        accepted = await client.post("/v1/events", json=batch)
        assert accepted.status_code == 202 and accepted.json()["accepted"] == 500
        again = await client.post("/v1/events", json=batch[:10])  # a retry: stored once
        assert again.status_code == 202

        async def checked() -> bool:
            response = await client.get(
                f"/v1/orgs/{org}/features/max_api_calls_per_month", params={"quantity": 1}
            )
            body = response.json()
            return bool(response.status_code == 200 and body["used"] == 5000)

        await async_wait_for(checked, 30, "the access check to see all 500 events")
        denied = (await client.get(f"/v1/orgs/{org}/features/max_api_calls_per_month")).json()
        assert (denied["limit"], denied["allowed"], denied["remaining"]) == (1000, False, 0)
        usage = (await client.get(f"/v1/orgs/{org}/usage", params={"period": "day"})).json()
        assert [(r["event_type"], r["value"], r["event_count"]) for r in usage["rows"]] == [
            ("api_call", "5000", 500)
        ]
    conn = await asyncpg.connect(migrated_database)
    try:
        assert (
            await conn.fetchval("SELECT count(*) FROM usage_events WHERE org_id = $1", org) == 500
        )
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM usage_events WHERE org_id = $1 AND event_id = 'ok-1'", org
            )
            == 0
        )
    finally:
        await conn.close()


async def test_cloudevents_round_trip(server: Server, make_key, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    org = uuid.uuid4()
    cloudevents = [
        {
            "specversion": "1.0",
            "id": f"ce-{n}",
            "type": "com.example.ai_tokens_used",
            "source": "/chat",
            "time": datetime.now(UTC).isoformat(),
            "subject": str(org),
            "data": {"quantity": 100 + n},
        }
        for n in range(3)
    ]
    async with httpx.AsyncClient(base_url=server.url) as client:
        response = await client.post(
            "/v1/events",
            content=json.dumps(cloudevents),
            headers={
                "Authorization": f"Bearer {await make_key('ingest')}",
                "Content-Type": "application/cloudevents-batch+json",
            },
        )
    assert response.status_code == 202, response.text
    records = await read_topic(settings, settings.events_topic, expected=3)
    published = sorted((json.loads(r.value) for r in records), key=lambda e: e["id"])
    assert [(e["id"], e["type"], e["org_id"], e["quantity"]) for e in published] == [
        (f"ce-{n}", "ai_tokens_used", str(org), 100 + n) for n in range(3)
    ]
    assert all(e["metadata"] == {"ce_source": "/chat"} for e in published)
    assert {r.key for r in records} == {str(org).encode()}


async def test_bad_input_gets_4xx_with_a_code(server: Server, make_key) -> None:  # type: ignore[no-untyped-def]
    headers = {"Authorization": f"Bearer {await make_key('admin')}"}
    org = uuid.uuid4()
    async with httpx.AsyncClient(base_url=server.url, headers=headers) as client:
        cases = [
            (
                await client.post(
                    "/v1/events", content=b"{not json", headers={"Content-Type": "application/json"}
                ),
                400,
                "malformed_json",
            ),
            (await client.get("/v1/orgs/not-a-uuid/usage"), 400, "invalid_request"),
            (
                await client.get(f"/v1/orgs/{org}/usage", params={"from": "yesterday"}),
                400,
                "invalid_request",
            ),
            (await client.get(f"/v1/orgs/{org}/features/max_unicorns"), 404, "unknown_feature"),
            (
                await client.get(f"/v1/orgs/{org}/features/max_mau", params={"quantity": "NaN"}),
                400,
                "invalid_quantity",
            ),
            (
                await client.put(f"/v1/orgs/{org}/subscription", json={"plan": "platinum"}),
                422,
                "unknown_plan",
            ),
            (
                await client.put(
                    f"/v1/orgs/{org}/subscription", json={"plan": "pro", "timezone": "Mars/Olympus"}
                ),
                422,
                "unknown_timezone",
            ),
            (
                await client.put(
                    f"/v1/orgs/{org}/subscription", json={"plan": "pro", "colour": "red"}
                ),
                422,
                "invalid_request",
            ),
            (
                await client.post(
                    "/v1/events",
                    content=b"x" * (17 * 1024 * 1024),
                    headers={"Content-Type": "application/json"},
                ),
                413,
                "body_too_large",
            ),
        ]
        for response, status, code in cases:
            assert (response.status_code, response.json()["code"]) == (status, code), response.text
        put = await client.put(
            f"/v1/orgs/{org}/subscription",
            json={"plan": "business", "timezone": "Asia/Tokyo", "seats": 9},
        )
        assert put.status_code == 200 and put.json()["plan"] == "business"
        entitlements = (await client.get(f"/v1/orgs/{org}/entitlements")).json()["features"]
        assert len(entitlements) == 9
        assert next(f for f in entitlements if f["feature_key"] == "max_records")["limit"] == 100000
        plans = (await client.get("/v1/plans")).json()
        assert [p["plan"] for p in plans] == ["free", "pro", "business", "enterprise"]
        assert sum(len(p["features"]) for p in plans) == 36
        assert (await client.get("/readyz")).json() == {"status": "ready"}
        assert "metering_http_requests_total" in (await client.get("/metrics")).text


async def test_row_level_security_and_role_privileges(db: asyncpg.Connection) -> None:
    mine, theirs = uuid.uuid4(), uuid.uuid4()
    for org in (mine, theirs):
        await db.execute(
            "INSERT INTO usage_aggregations (org_id, event_type, period, period_start, value) "
            "VALUES ($1, 'api_call', 'month', '2026-11-01', 5)",
            org,
        )
    async with db.transaction():
        await db.execute("SET LOCAL ROLE metering_reader")
        await db.execute("SELECT set_config('metering.org_id', $1, true)", str(mine))
        seen = await db.fetch(
            "SELECT org_id FROM usage_aggregations WHERE org_id = ANY($1::uuid[])", [mine, theirs]
        )
        assert [r["org_id"] for r in seen] == [mine]
    async with db.transaction():
        await db.execute("SET LOCAL ROLE metering_reader")  # no organization set: sees nothing
        assert await db.fetchval("SELECT count(*) FROM usage_aggregations") == 0
    forbidden = [
        ("metering_reader", "UPDATE org_subscriptions SET plan = 'enterprise'"),
        (
            "metering_reader",
            "INSERT INTO usage_events (org_id, event_id, event_type, quantity, occurred_at) "
            "VALUES (gen_random_uuid(), 'x', 'api_call', 1, now())",
        ),
        ("metering_writer", "UPDATE plan_features SET limit_value = -1"),
        ("metering_writer", "DELETE FROM usage_events"),
        ("metering_writer", "UPDATE usage_aggregations SET value = 0"),
    ]
    for role, statement in forbidden:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            async with db.transaction():
                await db.execute(f"SET LOCAL ROLE {role}")
                await db.execute(statement)
