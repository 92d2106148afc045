"""Meters over HTTP on the real services: define, list, show, archive; bad definitions get
4xx with a reason; a type opened by a new meter reaches the running API and consumer
without a restart, and an event of a type no meter reads is dead-lettered `unknown_type`."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import asyncpg
import httpx
import pytest
from aiokafka import AIOKafkaProducer

from metering.config import Settings
from tests.conftest import ConsumerProcess, Server, async_wait_for, read_topic

pytestmark = pytest.mark.services


def a_type() -> str:
    return f"t_{uuid.uuid4().hex[:10]}"


def event(org: uuid.UUID, event_id: str, kind: str) -> dict[str, object]:
    return {
        "id": event_id,
        "type": kind,
        "org_id": str(org),
        "occurred_at": datetime.now(UTC).isoformat(),
        "metadata": {"model": "m1"},
    }


async def test_define_list_show_and_archive(server: Server, make_key) -> None:  # type: ignore[no-untyped-def]
    admin = {"Authorization": f"Bearer {await make_key('admin')}"}
    reader = {"Authorization": f"Bearer {await make_key('read')}"}
    kind = a_type()
    key = f"m_{kind[2:]}"
    definition = {
        "key": key,
        "event_type": kind,
        "aggregation": "sum",
        "value": "metadata.tokens",
        "filter": {"env": ["prod", "staging"]},
        "group_by": ["model"],
        "description": "tokens by model",
    }
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        refused = await client.post("/v1/meters", json=definition, headers=reader)
        assert refused.status_code == 403
        created = await client.post("/v1/meters", json=definition, headers=admin)
        assert created.status_code == 201, created.text
        body = created.json()
        assert body["status"] == "backfilling"
        assert (body["key"], body["value"], body["group_by"]) == (key, "metadata.tokens", ["model"])
        assert body["filter"] == {"env": ["prod", "staging"]}
        listed = await client.get("/v1/meters", headers=reader)
        keys = [m["key"] for m in listed.json()["meters"]]
        assert key in keys and "api_call" in keys  # the seeded meters are listed too
        shown = await client.get(f"/v1/meters/{key}", headers=reader)
        assert shown.json()["backfill"]["waiting_for_aggregator"] is True
        missing = await client.get("/v1/meters/no_such_meter", headers=reader)
        assert (missing.status_code, missing.json()["code"]) == (404, "unknown_meter")
        archived = await client.delete(f"/v1/meters/{key}", headers=admin)
        assert archived.json()["status"] == "archived"
        again = await client.post("/v1/meters", json=definition, headers=admin)
        assert (again.status_code, again.json()["code"]) == (409, "key_taken")
        seeded = await client.delete("/v1/meters/api_call", headers=admin)
        assert (seeded.status_code, seeded.json()["code"]) == (409, "builtin_meter")


@pytest.mark.parametrize(
    ("change", "status", "code", "field"),
    [
        ({"aggregation": "median"}, 422, "invalid_meter", "aggregation"),
        ({"value": "metadata.a..b"}, 422, "invalid_meter", "value"),
        ({"value": "quantity", "aggregation": "unique_count"}, 422, "invalid_meter", "value"),
        ({"group_by": ["a", "b", "c", "d"]}, 422, "invalid_meter", "group_by"),
        ({"key": "Bad-Key"}, 422, "invalid_meter", "key"),
        ({"event_type": "API CALL"}, 422, "invalid_meter", "event_type"),
        ({"colour": "red"}, 422, "invalid_meter", "colour"),
        ({"filter": {"env": {"nested": 1}}}, 422, "invalid_meter", "filter.env"),
        ({"limit_key": "max_api_calls_per_month"}, 409, "limit_taken", None),
        ({"limit_key": "max_unicorns"}, 422, "unknown_limit_key", None),
    ],
)
async def test_bad_definitions_get_a_reason(  # type: ignore[no-untyped-def]
    server: Server, make_key, change: dict[str, object], status: int, code: str, field: str | None
) -> None:
    admin = {"Authorization": f"Bearer {await make_key('admin')}"}
    kind = a_type()
    definition = {"key": f"b_{kind[2:]}", "event_type": kind, "aggregation": "sum", **change}
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        response = await client.post("/v1/meters", json=definition, headers=admin)
    assert response.status_code == status, response.text
    assert response.json()["code"] == code
    assert response.json()["reason"]
    if field is not None:
        assert response.json()["field"] == field


async def test_a_new_type_is_accepted_without_a_restart(  # type: ignore[no-untyped-def]
    server: Server,
    make_key,
    settings: Settings,
    migrated_database: str,
    producer: AIOKafkaProducer,
    start_consumer: Callable[..., ConsumerProcess],
) -> None:
    org = uuid.uuid4()
    kind = a_type()
    admin = {"Authorization": f"Bearer {await make_key('admin', 'ingest')}"}
    start_consumer()
    async with httpx.AsyncClient(base_url=server.url, headers=admin, timeout=30) as client:
        before = await client.post("/v1/events", json=[event(org, "early", kind)])
        assert before.status_code == 422
        assert before.json()["errors"][0]["code"] == "unknown_type"
        # straight to Kafka, past the API: the consumer dead-letters it
        await producer.send_and_wait(
            settings.events_topic, json.dumps(event(org, "early", kind)).encode(), key=b"k"
        )
        letters = await read_topic(settings, settings.dlq_topic, 1)
        assert dict(letters[0].headers)["error.code"] == b"unknown_type"

        created = await client.post(
            "/v1/meters", json={"key": f"n_{kind[2:]}", "event_type": kind, "aggregation": "count"}
        )
        assert created.status_code == 201
        opened = time.monotonic()

        async def accepted() -> bool:
            response = await client.post("/v1/events", json=[event(org, "after", kind)])
            return response.status_code == 202

        # the registry follows NOTIFY; the bound is generous on purpose (not a timing test:
        # bench/meters.py measures how long it takes)
        await async_wait_for(accepted, 10, "the API to accept the new type", interval=0.02)
        print(f"API accepted the new type {time.monotonic() - opened:.3f} s after creation")

    conn = await asyncpg.connect(migrated_database)
    try:

        async def stored() -> bool:
            return bool(
                await conn.fetchval(
                    "SELECT count(*) FROM usage_events WHERE org_id = $1 AND event_id = 'after'",
                    org,
                )
            )

        await async_wait_for(stored, 30, "the consumer to store the new type")
        assert not await conn.fetchval(
            "SELECT count(*) FROM usage_events WHERE org_id = $1 AND event_id = 'early'", org
        )
    finally:
        await conn.close()
