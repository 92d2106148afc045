"""Webhooks on the real PostgreSQL with real HTTP receivers on loopback (contract §9):
signatures checked by an independent implementation, fan-out by organization and type,
retries on a clock of the test's own until delivered or given up after 24 hours, a hanging
endpoint that delays no other, a deliverer killed mid-request, the SSRF guard, and the API."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import asyncpg
import httpx
import pytest
from prometheus_client import CollectorRegistry

from metering.config import Settings
from metering.metrics import WebhookMetrics
from metering.models import utc_now
from metering.webhooks.addresses import UnsafeWebhookUrl, check_url, resolve
from metering.webhooks.deliverer import Deliverer
from metering.webhooks.schedule import DELAYS, JITTER, RETRY_FOR
from metering.webhooks.signing import new_secret
from metering.webhooks.store import WebhookStore
from tests.conftest import ROOT, Server, async_wait_for

pytestmark = pytest.mark.services


# ------------------------------------------------------------------ receivers on loopback
def independent_signature_ok(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """Standard Webhooks, written here from the specification (not with the library the
    service signs with): v1,base64(HMAC-SHA256(key, "id.timestamp.body"))."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return any(
        hmac.compare_digest(expected, given) for given in headers["webhook-signature"].split()
    )


@dataclass
class Receiver:
    """An HTTP server on 127.0.0.1 that answers `statuses` in turn (then 200), or holds
    requests open while `hold` is set; it records every request."""

    statuses: list[int] = field(default_factory=list)
    hold: threading.Event = field(default_factory=threading.Event)
    holding: threading.Event = field(default_factory=threading.Event)
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    secret: str = ""
    url: str = ""

    def accepted_ids(self) -> list[str]:
        """The webhook-ids it answered 2xx, once each (a receiver that dedupes by id)."""
        return list(dict.fromkeys(h["webhook-id"] for h, _ in self.answered_ok))

    answered_ok: list[tuple[dict[str, str], bytes]] = field(default_factory=list)


@pytest.fixture
def receivers() -> Iterator[Any]:
    servers: list[ThreadingHTTPServer] = []

    def make(**options: Any) -> Receiver:
        receiver = Receiver(**options)

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                headers = {k.lower(): v for k, v in self.headers.items()}
                receiver.requests.append((headers, body))
                if receiver.hold.is_set():
                    receiver.holding.set()
                    while receiver.hold.is_set():
                        threading.Event().wait(0.05)
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                if 200 <= status < 300:
                    receiver.answered_ok.append((headers, body))
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                return

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        receiver.url = f"http://127.0.0.1:{server.server_address[1]}/hooks"
        return receiver

    yield make
    for server in servers:
        server.shutdown()


# ------------------------------------------------------------------ helpers
class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
async def pool(migrated_database: str) -> AsyncIterator[asyncpg.Pool]:
    created = await asyncpg.create_pool(migrated_database, min_size=1, max_size=4)
    yield created
    await created.close()


@pytest.fixture(autouse=True)
async def no_endpoints_left(db: asyncpg.Connection) -> AsyncIterator[None]:
    """Each test's endpoints are removed after it: a global endpoint would otherwise take
    the next test's messages (to a receiver that is gone)."""
    yield
    await db.execute("UPDATE webhook_endpoints SET deleted_at = now() WHERE deleted_at IS NULL")


async def endpoint_for(
    store: WebhookStore,
    receiver: Receiver,
    org: uuid.UUID | None = None,
    types: list[str] | None = None,
) -> uuid.UUID:
    receiver.secret = new_secret()
    endpoint = await store.add_endpoint(
        receiver.url,
        org,
        types or ["limit.crossed", "meter.backfilled"],
        "",
        receiver.secret,
        "test",
    )
    return endpoint.id


async def cross(db: asyncpg.Connection, org: uuid.UUID, threshold: int = 80) -> uuid.UUID:
    """Record a crossing as the aggregator's pass does (FINISH_PASS)."""
    crossing = uuid.uuid4()
    await db.execute(
        "INSERT INTO limit_notifications (id, org_id, feature_key, period, period_start, "
        "threshold_percent, used, limit_value, crossed_at) "
        "VALUES ($1, $2, 'max_api_calls_per_month', 'month', $3, $4, 800.5, 1000, now())",
        crossing,
        org,
        date.today().replace(day=1),
        threshold,
    )
    return crossing


def deliverer(pool: asyncpg.Pool, clock: Clock | None = None, timeout: float = 10.0) -> Deliverer:
    return Deliverer(
        WebhookStore(pool),
        WebhookMetrics(CollectorRegistry()),
        timeout_seconds=timeout,
        allow_private=True,
        clock=clock or utc_now,
    )


# ------------------------------------------------------------------ tests
async def test_crossings_reach_the_endpoints_that_take_them_signed(
    pool: asyncpg.Pool, db: asyncpg.Connection, receivers: Any
) -> None:
    store = WebhookStore(pool)
    org, other = uuid.uuid4(), uuid.uuid4()
    everyone, mine, theirs, meters_only = (receivers() for _ in range(4))
    await endpoint_for(store, everyone)
    await endpoint_for(store, mine, org)
    await endpoint_for(store, theirs, other)
    await endpoint_for(store, meters_only, types=["meter.backfilled"])
    crossing = await cross(db, org)
    sender = deliverer(pool)
    try:
        assert await sender.run_once() >= 2
    finally:
        await sender.close()
    for receiver in (everyone, mine):
        ((headers, body),) = [r for r in receiver.requests if r[0]["webhook-id"] == str(crossing)]
        assert independent_signature_ok(receiver.secret, headers, body)
        assert headers["content-type"] == "application/json"
        message = json.loads(body)
        assert message["type"] == "limit.crossed"
        assert message["data"]["id"] == str(crossing)
        assert message["data"]["org_id"] == str(org)
        assert (message["data"]["used"], message["data"]["limit"]) == (800.5, 1000)
        assert message["data"]["threshold_percent"] == 80
        # a signature under another secret does not verify
        assert not independent_signature_ok(new_secret(), headers, body)
    assert not [r for r in theirs.requests if r[0]["webhook-id"] == str(crossing)]
    assert not [r for r in meters_only.requests if r[0]["webhook-id"] == str(crossing)]
    # meter.backfilled: to endpoints of every organization that take it
    notification = uuid.uuid4()
    await db.execute(
        "INSERT INTO meter_notifications (id, kind, meter_key, payload) "
        "VALUES ($1, 'meter.backfilled', 'api_call', '{\"meter\": \"api_call\", \"events\": 3}')",
        notification,
    )
    sender = deliverer(pool)
    try:
        await sender.run_once()
    finally:
        await sender.close()
    got = [json.loads(b) for h, b in meters_only.requests if h["webhook-id"] == str(notification)]
    assert got == [
        {
            "type": "meter.backfilled",
            "timestamp": got[0]["timestamp"],
            "data": {"meter": "api_call", "events": 3},
        }
    ]
    assert not [r for r in mine.requests if r[0]["webhook-id"] == str(notification)]


async def test_failures_are_retried_with_back_off_then_delivered_once(
    pool: asyncpg.Pool, db: asyncpg.Connection, receivers: Any
) -> None:
    store = WebhookStore(pool)
    flaky = receivers(statuses=[500, 503])
    org = uuid.uuid4()
    endpoint = await endpoint_for(store, flaky, org)
    crossing = await cross(db, org)
    clock = Clock()
    sender = deliverer(pool, clock)
    try:
        assert await sender.run_once() == 1  # 500
        assert await sender.run_once() == 0  # not due yet
        ((first, _),) = await store.deliveries(endpoint)
        wait = first.next_attempt_at - clock.now
        assert DELAYS[0] * (1 - JITTER) <= wait <= DELAYS[0] * (1 + JITTER) + timedelta(seconds=1)
        clock.now = first.next_attempt_at
        assert await sender.run_once() == 1  # 503
        ((second, _),) = await store.deliveries(endpoint)
        wait = second.next_attempt_at - clock.now
        assert DELAYS[1] * (1 - JITTER) <= wait <= DELAYS[1] * (1 + JITTER) + timedelta(seconds=1)
        clock.now = second.next_attempt_at
        assert await sender.run_once() == 1  # 200
    finally:
        await sender.close()
    ((delivered, attempts),) = await store.deliveries(endpoint)
    assert (delivered.status, delivered.attempts) == ("delivered", 3)
    assert [a.status_code for a in attempts] == [500, 503, 200]
    assert [a.error for a in attempts] == ["HTTP 500", "HTTP 503", None]
    assert [h["webhook-id"] for h, _ in flaky.requests] == [str(crossing)] * 3
    assert flaky.accepted_ids() == [str(crossing)]


async def test_an_endpoint_that_never_answers_2xx_is_given_up_after_24_hours(
    pool: asyncpg.Pool, db: asyncpg.Connection, receivers: Any
) -> None:
    store = WebhookStore(pool)
    org = uuid.uuid4()
    dead = receivers(statuses=[500] * 100)
    endpoint = await endpoint_for(store, dead, org)
    await cross(db, org)
    clock = Clock()
    started = clock.now
    sender = deliverer(pool, clock)
    waits = []
    try:
        for _ in range(60):
            await sender.run_once()
            ((delivery, _),) = await store.deliveries(endpoint)
            if delivery.status != "pending":
                break
            waits.append(delivery.next_attempt_at - clock.now)
            clock.now = delivery.next_attempt_at
    finally:
        await sender.close()
    assert delivery.status == "failed"
    ((_, attempts),) = await store.deliveries(endpoint)
    assert attempts[-1].started_at - started >= RETRY_FOR
    for n, wait in enumerate(waits):
        base = DELAYS[min(n, len(DELAYS) - 1)]
        assert base * (1 - JITTER) <= wait <= base * (1 + JITTER) + timedelta(seconds=1), n
    assert len(dead.requests) == len(attempts) == len(waits) + 1
    # redelivered by hand: due now, with a fresh 24 hours
    dead.statuses.clear()
    assert await store.redeliver(endpoint, delivery.id, clock.now) is not None
    sender = deliverer(pool, clock)
    try:
        assert await sender.run_once() == 1
    finally:
        await sender.close()
    ((again, _),) = await store.deliveries(endpoint)
    assert again.status == "delivered"


async def test_a_hanging_endpoint_delays_no_other(
    pool: asyncpg.Pool, db: asyncpg.Connection, receivers: Any, migrated_database: str
) -> None:
    store = WebhookStore(pool)
    org = uuid.uuid4()
    stuck, healthy = receivers(), receivers()
    stuck.hold.set()
    await endpoint_for(store, stuck, org)
    await endpoint_for(store, healthy, org)
    sender = deliverer(pool, timeout=30)
    running = asyncio.create_task(sender.run_forever(migrated_database, poll_seconds=0.2))
    try:
        crossing = await cross(db, org)

        async def healthy_got_it() -> bool:
            return any(h["webhook-id"] == str(crossing) for h, _ in healthy.requests)

        await async_wait_for(healthy_got_it, timeout=20, what="the healthy endpoint")
        # while the other endpoint still holds its request open
        assert stuck.holding.is_set() and not stuck.answered_ok
        second = await cross(db, org, threshold=100)

        async def healthy_got_both() -> bool:
            return any(h["webhook-id"] == str(second) for h, _ in healthy.requests)

        await async_wait_for(healthy_got_both, timeout=20, what="the second message")
        assert not stuck.answered_ok
    finally:
        stuck.hold.clear()
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await sender.close()


async def test_a_deliverer_killed_mid_request_loses_nothing(
    settings: Settings, pool: asyncpg.Pool, db: asyncpg.Connection, receivers: Any
) -> None:
    store = WebhookStore(pool)
    org = uuid.uuid4()
    slow = receivers()
    slow.hold.set()
    endpoint = await endpoint_for(store, slow, org)
    environment = settings.model_copy(
        update={"webhook_allow_private": True, "webhook_timeout_seconds": 2.0}
    ).child_environment()

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "metering", "webhooks", "deliver", "--metrics-port", "0"],
            env=environment,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    first = start()
    try:
        crossing = await cross(db, org)

        async def in_flight() -> bool:
            return slow.holding.is_set()

        await async_wait_for(in_flight, timeout=30, what="the first attempt")
        first.kill()
        first.wait(timeout=10)
        slow.hold.clear()
        second = start()
        try:

            async def delivered() -> bool:
                ((delivery, _),) = await store.deliveries(endpoint)
                return delivery.status == "delivered"

            await async_wait_for(delivered, timeout=60, what="the delivery after the restart")
        finally:
            second.terminate()
            second.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    ids = [h["webhook-id"] for h, _ in slow.requests]
    assert set(ids) == {str(crossing)} and len(ids) >= 2  # sent again, with the same id
    assert slow.accepted_ids() == [str(crossing)]


async def test_private_addresses_are_refused_unless_allowed(
    pool: asyncpg.Pool, db: asyncpg.Connection, receivers: Any
) -> None:
    for url in (
        "http://example.com/x",  # not https
        "https://127.0.0.1/x",
        "https://10.1.2.3/x",
        "https://169.254.169.254/latest/meta-data",
        "https://[::1]/x",
        "https://[::ffff:192.168.0.1]/x",
        "https://localhost/x",
        "https://user:pass@example.com/x",
        "ftp://example.com/x",
    ):
        with pytest.raises(UnsafeWebhookUrl):
            check_url(url, allow_private=False)
    assert check_url("https://93.184.216.34/hook", allow_private=False)[1] == "93.184.216.34"
    assert check_url("http://127.0.0.1:9/x", allow_private=True) == ("http", "127.0.0.1", 9)
    with pytest.raises(UnsafeWebhookUrl):
        await resolve("https://localhost./x", allow_private=False)
    # checked again when delivering: a stored private URL is refused, and logged
    store = WebhookStore(pool)
    org = uuid.uuid4()
    local = receivers()
    endpoint = await endpoint_for(store, local, org)
    await cross(db, org)
    guarded = Deliverer(store, WebhookMetrics(CollectorRegistry()), allow_private=False)
    try:
        assert await guarded.run_once() == 1
    finally:
        await guarded.close()
    assert not local.requests
    ((delivery, attempts),) = await store.deliveries(endpoint)
    assert delivery.status == "pending" and attempts[0].error is not None
    assert attempts[0].error.startswith("refused:")


async def test_webhooks_over_http(server: Server, make_key, receivers: Any) -> None:  # type: ignore[no-untyped-def]
    admin = {"Authorization": f"Bearer {await make_key('admin')}"}
    bound_admin = {"Authorization": f"Bearer {await make_key('admin', org=uuid.uuid4())}"}
    reader = {"Authorization": f"Bearer {await make_key('read')}"}
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        refused = await client.post("/v1/webhooks", json={"url": receivers().url}, headers=admin)
        assert (refused.status_code, refused.json()["code"]) == (422, "unsafe_url")
        created = await client.post(
            "/v1/webhooks",
            json={
                "url": "https://93.184.216.34/hook",
                "types": ["limit.crossed"],
                "description": "billing",
            },
            headers=admin,
        )
        assert created.status_code == 201, created.text
        body = created.json()
        assert body["secret"].startswith("whsec_") and body["types"] == ["limit.crossed"]
        for headers in (bound_admin, reader):
            assert (await client.get("/v1/webhooks", headers=headers)).status_code == 403
        listed = (await client.get("/v1/webhooks", headers=admin)).json()["endpoints"]
        mine = [e for e in listed if e["id"] == body["id"]]
        assert mine and "secret" not in mine[0]
        bad = await client.post("/v1/webhooks", json={"url": "x", "types": ["nope"]}, headers=admin)
        assert bad.status_code == 422
        deliveries = await client.get(f"/v1/webhooks/{body['id']}/deliveries", headers=admin)
        assert deliveries.status_code == 200 and deliveries.json()["deliveries"] == []
        unknown = await client.post(
            f"/v1/webhooks/{body['id']}/deliveries/999999999/redeliver", headers=admin
        )
        assert unknown.status_code == 404
        removed = await client.delete(f"/v1/webhooks/{body['id']}", headers=admin)
        assert removed.status_code == 204
        again = await client.delete(f"/v1/webhooks/{body['id']}", headers=admin)
        assert again.status_code == 404
