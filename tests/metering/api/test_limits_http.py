"""An organization's own limits over HTTP (contract sections 5 and 8): set, read through
the access check and the entitlements, removed; who may; what bad input gets."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import httpx
import pytest

from tests.conftest import Server

pytestmark = pytest.mark.services


async def test_overrides_over_http(server: Server, make_key) -> None:  # type: ignore[no-untyped-def]
    org = uuid.uuid4()
    admin = {"Authorization": f"Bearer {await make_key('admin')}"}
    other_admin = {"Authorization": f"Bearer {await make_key('admin', org=uuid.uuid4())}"}
    reader = {"Authorization": f"Bearer {await make_key('read', org=org)}"}
    url = f"/v1/orgs/{org}/limits/max_api_calls_per_month"
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        put = await client.put(
            url, json={"limit": 5000, "soft": True, "thresholds": [100, 50, 50]}, headers=admin
        )
        assert put.status_code == 200, put.text
        body = put.json()
        assert (body["limit"], body["soft"], body["thresholds"], body["previous"]) == (
            5000,
            True,
            [50, 100],
            None,
        )
        check = await client.get(
            f"/v1/orgs/{org}/features/max_api_calls_per_month",
            params={"quantity": 7000},
            headers=reader,
        )
        assert check.status_code == 200, check.text
        answer = check.json()
        assert (answer["limit"], answer["allowed"], answer["soft"], answer["overage"]) == (
            5000,
            True,
            True,
            2000,
        )
        entitlements = (await client.get(f"/v1/orgs/{org}/entitlements", headers=reader)).json()
        sources = {f["feature_key"]: f.get("source") for f in entitlements["features"]}
        assert sources["max_api_calls_per_month"] == "override"
        assert sources["max_records"] == "plan"

        again = await client.put(url, json={"limit": -1}, headers=admin)
        assert again.json()["previous"]["limit"] == 5000
        for headers in (other_admin, reader):
            refused = await client.put(url, json={"limit": 1}, headers=headers)
            assert refused.status_code == 403
        for bad in (
            {"limit": -2},
            {"limit": 1, "thresholds": [0]},
            {"limit": 1, "thresholds": []},
            {"limit": 1, "thresholds": list(range(1, 12))},
            {"limit": "1"},
            {"limit": 1, "extra": True},
        ):
            invalid = await client.put(url, json=bad, headers=admin)
            assert invalid.status_code == 422, (bad, invalid.text)
        unknown = await client.put(
            f"/v1/orgs/{org}/limits/max_nothing", json={"limit": 1}, headers=admin
        )
        assert (unknown.status_code, unknown.json()["code"]) == (404, "unknown_limit")
        flags = await client.put(
            f"/v1/orgs/{org}/limits/features", json={"limit": 1}, headers=admin
        )
        assert flags.status_code == 404

        removed = await client.delete(url, headers=admin)
        assert removed.status_code == 200, removed.text
        assert (removed.json()["limit"], removed.json()["source"]) == (1000, "plan")
        assert (await client.delete(url, headers=admin)).status_code == 404
        check = await client.get(f"/v1/orgs/{org}/features/max_api_calls_per_month", headers=reader)
        assert (check.json()["limit"], check.json()["soft"]) == (1000, False)
        trail = await client.get("/v1/audit", params={"org": str(org)}, headers=admin)
        actions = [e["action"] for e in trail.json()["entries"]]
        assert actions == ["limits.unset", "limits.set", "limits.set"]


async def test_billing_cycles_over_http(server: Server, make_key, migrated_database: str) -> None:  # type: ignore[no-untyped-def]
    import asyncpg

    from aggregator.service import decide_crossings
    from aggregator.store import AggregateStore
    from metering.models import UsageEvent
    from metering.storage.events import EventStore, IncomingEvent

    org = uuid.uuid4()
    admin = {"Authorization": f"Bearer {await make_key('admin')}"}
    reader = {"Authorization": f"Bearer {await make_key('read', org=org)}"}
    today = datetime.now(UTC).date()
    anchor = today - timedelta(days=2)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        put = await client.put(
            f"/v1/orgs/{org}/subscription",
            json={"plan": "free", "billing_anchor": anchor.isoformat()},
            headers=admin,
        )
        assert put.status_code == 200, put.text
        assert put.json()["billing_anchor"] == anchor.isoformat()
        # a PUT that leaves the anchor out keeps it
        kept = await client.put(
            f"/v1/orgs/{org}/subscription", json={"plan": "free"}, headers=admin
        )
        assert kept.json()["billing_anchor"] == anchor.isoformat()
        pool = await asyncpg.create_pool(migrated_database, min_size=1, max_size=2)
        try:
            user = uuid.uuid4()
            noon = datetime.combine(anchor, datetime.min.time(), UTC) + timedelta(hours=12)
            events = [
                UsageEvent(
                    id="c1",
                    type="api_call",
                    org_id=org,
                    quantity=Decimal(5),
                    occurred_at=noon - timedelta(days=1),
                ),  # the cycle before
                UsageEvent(
                    id="c2", type="api_call", org_id=org, quantity=Decimal(7), occurred_at=noon
                ),
                UsageEvent(
                    id="c3",
                    type="api_call",
                    org_id=org,
                    quantity=Decimal(8),
                    occurred_at=noon + timedelta(days=1),
                ),
                UsageEvent(id="u1", type="user_active", org_id=org, user_id=user, occurred_at=noon),
                UsageEvent(
                    id="u2",
                    type="user_active",
                    org_id=org,
                    user_id=user,
                    occurred_at=noon + timedelta(days=1),
                ),
            ]
            await EventStore(pool).write_batch([IncomingEvent(e) for e in events])
            for _ in range(5):
                await AggregateStore(pool).run_pass(decide_crossings)
        finally:
            await pool.close()
        usage = await client.get(
            f"/v1/orgs/{org}/usage",
            params={"period": "cycle", "from": (anchor - timedelta(days=40)).isoformat()},
            headers=reader,
        )
        assert usage.status_code == 200, usage.text
        rows = {(r["event_type"], r["period_start"]): r for r in usage.json()["rows"]}
        current = rows[("api_call", anchor.isoformat())]
        assert (current["value"], current["event_count"], current["period"]) == ("15", 2, "cycle")
        assert rows[("user_active", anchor.isoformat())]["value"] == "1"  # one user, 2 days
        previous = [r for (t, s), r in rows.items() if t == "api_call" and s < anchor.isoformat()]
        assert [r["value"] for r in previous] == ["5"]
        check = await client.get(f"/v1/orgs/{org}/features/max_api_calls_per_month", headers=reader)
        assert (check.json()["period"], check.json()["period_start"], check.json()["used"]) == (
            "cycle",
            anchor.isoformat(),
            15,
        )
