"""Delivering webhooks from the outbox (contract section 9).

The deliverer claims due deliveries (at most one per endpoint at a time, so an endpoint gets
its messages in order where possible, and a slow one holds only its own slot), sends each as
its own task with a 10-second timeout, logs the attempt and sets what comes next: delivered
on any 2xx; otherwise again after an exponential back-off with jitter, for at least 24 hours
(metering.webhooks.schedule), then failed. A claim is a lease: a deliverer killed mid-request
leaves the message to be sent again when the lease ends, with the same `webhook-id`, so a
receiver that dedupes by it sees each message once. It never blocks aggregation or the Kafka
publisher: it runs apart from them and only reads and writes its own tables.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from functools import partial
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx

from metering.metrics import WebhookMetrics
from metering.models import utc_now
from metering.webhooks.addresses import Target, UnsafeWebhookUrl, resolve
from metering.webhooks.schedule import after_failure
from metering.webhooks.signing import signed_headers
from metering.webhooks.store import Claimed, WebhookStore

log = logging.getLogger("metering.webhooks")
CHANNEL = "metering_webhooks"
USER_AGENT = "metering-webhooks/1"


class Deliverer:
    def __init__(
        self,
        store: WebhookStore,
        metrics: WebhookMetrics,
        *,
        timeout_seconds: float = 10.0,
        allow_private: bool = False,
        concurrency: int = 50,
        clock: Callable[[], datetime] = utc_now,
        rng: random.Random | None = None,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._timeout = timeout_seconds
        self._lease = timeout_seconds + 5.0
        self._allow_private = allow_private
        self._concurrency = concurrency
        self._clock = clock
        self._rng = rng or random.Random()
        self._in_flight: dict[uuid.UUID, asyncio.Task[None]] = {}
        self._client = httpx.AsyncClient(
            follow_redirects=False, timeout=timeout_seconds, trust_env=False
        )

    async def close(self) -> None:
        for task in self._in_flight.values():
            task.cancel()
        await asyncio.gather(*self._in_flight.values(), return_exceptions=True)
        await self._client.aclose()

    async def start_due(self) -> int:
        """Claim what is due now (endpoints not busy) and start sending it; returns how many
        deliveries it started."""
        room = self._concurrency - len(self._in_flight)
        if room <= 0:
            return 0
        claimed = await self._store.claim(self._clock(), list(self._in_flight), room, self._lease)
        for delivery in claimed:
            task = asyncio.create_task(self._deliver(delivery))
            self._in_flight[delivery.endpoint_id] = task
            task.add_done_callback(partial(self._finished, delivery.endpoint_id))
        return len(claimed)

    def _finished(self, endpoint_id: uuid.UUID, _: asyncio.Task[None]) -> None:
        self._in_flight.pop(endpoint_id, None)

    async def run_once(self) -> int:
        """Send everything due now and wait for the answers (tests, `--once`); returns how
        many attempts were made."""
        made = 0
        while started := await self.start_due():
            made += started
            await asyncio.gather(*self._in_flight.values(), return_exceptions=True)
        return made

    async def run_forever(self, dsn: str, poll_seconds: float = 1.0) -> None:
        """Deliver until cancelled: woken by the outbox triggers (LISTEN metering_webhooks),
        by a finished delivery, or every `poll_seconds` (retries come due by the clock)."""
        wake = asyncio.Event()
        listener: asyncpg.Connection | None = None
        try:
            while True:
                if listener is None or listener.is_closed():
                    listener = await self._listen(dsn, wake)
                wake.clear()
                try:
                    await self.start_due()
                    await self._report_backlog()
                except (asyncpg.PostgresError, OSError) as error:
                    log.warning("webhook deliveries: %s; trying again", error)
                waiters = [asyncio.ensure_future(wake.wait()), *self._in_flight.values()]
                await asyncio.wait(
                    waiters, timeout=poll_seconds, return_when=asyncio.FIRST_COMPLETED
                )
                waiters[0].cancel()
        finally:
            if listener is not None:
                listener.terminate()

    async def _listen(self, dsn: str, wake: asyncio.Event) -> asyncpg.Connection | None:
        try:
            conn = await asyncpg.connect(dsn)
            await conn.add_listener(CHANNEL, lambda *_: wake.set())
            return conn
        except (asyncpg.PostgresError, OSError) as error:
            log.warning("cannot listen for new webhooks (%s); polling", error)
            return None

    async def _report_backlog(self) -> None:
        pending, oldest = await self._store.backlog()
        self._metrics.pending.set(pending)
        age = (self._clock() - oldest).total_seconds() if oldest is not None else 0.0
        self._metrics.oldest_undelivered.set(max(0.0, age))

    async def _deliver(self, delivery: Claimed) -> None:
        started_at = self._clock()
        clock_started = time.perf_counter()
        status: int | None = None
        error: str | None = None
        try:
            target = await resolve(delivery.url, allow_private=self._allow_private)
            status = await self._post(target, delivery, started_at)
            if not 200 <= status < 300:
                error = f"HTTP {status}"
        except UnsafeWebhookUrl as refused:
            error = f"refused: {refused.reason}"
        except httpx.TimeoutException:
            error = f"no answer within {self._timeout:g} s"
        except (httpx.HTTPError, OSError) as failed:
            error = f"{type(failed).__name__}: {failed}"[:500]
        latency_ms = (time.perf_counter() - clock_started) * 1000
        finished_at = self._clock()
        self._metrics.attempt_seconds.observe(latency_ms / 1000)
        if error is None:
            outcome, next_at = "delivered", None
        else:
            next_at = after_failure(
                delivery.attempts + 1,
                delivery.first_attempt_at or started_at,
                finished_at,
                self._rng,
            )
            outcome = "pending" if next_at is not None else "failed"
        self._metrics.attempts.labels(outcome="success" if error is None else "error").inc()
        if outcome != "pending":
            self._metrics.deliveries.labels(result=outcome).inc()
        try:
            await self._store.record_attempt(
                delivery.id,
                started_at=started_at,
                status_code=status,
                latency_ms=latency_ms,
                error=error,
                outcome=outcome,
                next_attempt_at=next_at,
                finished_at=finished_at,
            )
        except (asyncpg.PostgresError, OSError) as failed:
            # the lease ends and the message is sent again (same webhook-id): at least once
            log.warning("could not record delivery %d (%s)", delivery.id, failed)
        if error is not None:
            log.info(
                "webhook %s to %s: %s (attempt %d, %s)",
                delivery.message_id,
                delivery.url,
                error,
                delivery.attempts + 1,
                "retrying" if outcome == "pending" else "gave up",
            )

    async def _post(self, target: Target, delivery: Claimed, at: datetime) -> int:
        """POST the body to the address that was checked; the Host header and TLS name are
        the URL's host. Returns the status code."""
        body = delivery.body.encode()
        parts = urlsplit(target.url)
        address = f"[{target.address}]" if ":" in target.address else target.address
        direct = urlunsplit(parts._replace(netloc=f"{address}:{target.port}"))
        default_port = 443 if target.scheme == "https" else 80
        host = target.host if target.port == default_port else f"{target.host}:{target.port}"
        headers = {
            **signed_headers(delivery.secret, delivery.message_id, at, body),
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            "host": host,
        }
        extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
        # streamed: only the status line and headers are read, whatever the body's size
        async with self._client.stream(
            "POST", direct, content=body, headers=headers, extensions=extensions
        ) as response:
            return response.status_code
