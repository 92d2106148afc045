"""`metering serve`: the HTTP API of contract section 5, assembled.

Transport only: routes (`metering.api.routes`) parse and authorize, then call
`metering.api.ingest` (domain) and the stores in `metering.storage` (SQL). Errors are JSON
`{"code", "reason", ...}` with a 4xx status; a 500 means a bug (`metering.api.errors`).
"""

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from prometheus_client import CollectorRegistry

from metering.api.errors import install_error_handlers
from metering.api.observability import ApiMetrics, MetricsMiddleware
from metering.api.routes import (
    admin,
    corrections,
    ingest,
    limits,
    meters,
    operations,
    pages,
    portal,
    reads,
    webhooks,
)
from metering.api.state import lifespan_for
from metering.config import Settings

__all__ = ["ApiMetrics", "create_app", "create_app_from_environment"]


def create_app(settings: Settings) -> FastAPI:
    """The API with its own metrics registry; its lifespan owns the pool and the producer."""
    registry = CollectorRegistry()
    metrics = ApiMetrics(registry)
    app = FastAPI(
        title="metering",
        version="1",
        lifespan=lifespan_for(settings, registry, metrics),
        description="Usage metering: ingest usage events, read aggregates, check access. "
        "Every /v1 call needs `Authorization: Bearer <key>` (see `metering keys create`).",
    )
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    if settings.portal_origin_list:
        # browsers of these origins may read with a portal token (contract section 11);
        # none by default. Reads only: GET with an Authorization header, no cookies.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.portal_origin_list,
            allow_methods=["GET"],
            allow_headers=["Authorization"],
            allow_credentials=False,
            max_age=600,
        )
    install_error_handlers(app)
    # The routes themselves, not `include_router`: FastAPI 0.165 wraps an included router in
    # a matcher of its own (`_IncludedRouter`) that every request walks through, measured at
    # ~10% of the access check's CPU in the server (py-spy, alternated with 910033e).
    for routes in (
        ingest,
        reads,
        admin,
        limits,
        meters,
        corrections,
        webhooks,
        portal,
        operations,
        pages,
    ):
        app.router.routes.extend(routes.router.routes)
    return app


def create_app_from_environment() -> FastAPI:
    """App factory for `metering serve --workers N`: each worker process reads the
    environment once (metering/config.py) and builds its own app, pools and producer."""
    from metering.api.server import configure
    from metering.config import load_settings

    settings = load_settings()
    configure(settings)  # this worker's connections get the configured timeouts
    return create_app(settings)
