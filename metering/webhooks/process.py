"""`metering webhooks deliver`: the delivery process, with its pool and metrics server
owned here and closed on the way out. `metering run` starts one as a child."""

from __future__ import annotations

import asyncio
import logging
import signal

from prometheus_client import CollectorRegistry, start_http_server

from metering.config import Settings
from metering.metrics import WebhookMetrics
from metering.retry import retry_postgres
from metering.storage.pool import create_pool
from metering.webhooks.deliverer import Deliverer
from metering.webhooks.store import WebhookStore

log = logging.getLogger("metering.webhooks")


async def run_deliverer(settings: Settings, *, once: bool = False) -> int:
    """Deliver until SIGTERM/SIGINT (or, with `once`, what is due now); returns the number
    of attempts made with `once`, else 0."""
    registry = CollectorRegistry()
    metrics = WebhookMetrics(registry)
    server = thread = None
    if not once:
        server, thread = start_http_server(settings.metrics_port, registry=registry)
        log.info("metrics on :%d/metrics", settings.metrics_port)
    pool = await retry_postgres(
        lambda: create_pool(settings, max_size=4), settings=settings, metrics=metrics.dependencies
    )
    deliverer = Deliverer(
        WebhookStore(pool),
        metrics,
        timeout_seconds=settings.webhook_timeout_seconds,
        allow_private=settings.webhook_allow_private,
    )
    try:
        if once:
            return await deliverer.run_once()
        main = asyncio.current_task()
        assert main is not None
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, main.cancel)
        log.info("delivering webhooks")
        try:
            await deliverer.run_forever(settings.database_url.get_secret_value())
        except asyncio.CancelledError:
            log.info("stopping: signal received (deliveries cut short are sent again)")
        return 0
    finally:
        await deliverer.close()
        await pool.close()
        if server is not None and thread is not None:
            server.shutdown()
            thread.join(timeout=5)
