"""`metering serve`: the HTTP API of contract section 5.

Transport only: handlers parse and authorize, then call `metering.api.ingest` (domain)
and the stores in `metering.storage` (SQL). Errors are JSON `{"code", "reason", ...}`
with a 4xx status; a 500 means a bug (it is logged with its traceback).
"""

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import date
from decimal import Decimal
from typing import Annotated, Any, Literal
from uuid import UUID

import asyncpg
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from fastapi import Depends, FastAPI, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, Field
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from metering.api.ingest import RejectedRequest, WireEvent, events_from_body
from metering.api.server import MAX_BODY_BYTES
from metering.config import Settings
from metering.kafka_batches import EventPublisher
from metering.metrics import LATENCY_BUCKETS
from metering.models import (
    ID_PATTERN,
    EventType,
    now_to_the_millisecond,
    quantity_from_text,
    timestamp_ms,
)
from metering.partitioner import OrgKeyPartitioner
from metering.storage.keys import ApiKey, KeyStore
from metering.storage.pool import TRANSIENT_DB_ERRORS, create_pool
from metering.storage.reads import ReadStore, SubscriptionStore

log = logging.getLogger("metering.api")
PUBLISH_TIMEOUT_SECONDS = 10.0
# Bodies up to this size are validated on the event loop (~10 µs an event); larger ones in a
# worker thread, at most PARALLEL_LARGE_BODIES at a time (bench.adversarial measures both).
INLINE_BODY_BYTES = 64 * 1024
PARALLEL_LARGE_BODIES = 2


OrgId = Annotated[UUID, Path(description="organization UUID")]


class ApiError(Exception):
    """An error the API answers with: status, stable code, human reason, extra fields."""

    def __init__(self, status: int, code: str, reason: str, **extra: Any) -> None:
        super().__init__(reason)
        self.status = status
        self.code = code
        self.reason = reason
        self.extra = extra


class ErrorBody(BaseModel):
    code: str = Field(examples=["invalid_events"])
    reason: str = Field(examples=["1 of 2 events are invalid; none was accepted"])
    errors: list[dict[str, Any]] | None = Field(
        default=None,
        examples=[
            [{"index": 1, "code": "invalid_uuid", "reason": "org_id: must be a UUID string"}]
        ],
    )
    retry_after: float | None = None


class Accepted(BaseModel):
    accepted: int = Field(examples=[2])
    ids: list[str] = Field(examples=[["evt-1", "evt-2"]])


class UsageRow(BaseModel):
    event_type: str
    period: str
    period_start: date
    value: str = Field(description="exact decimal as a string", examples=["1234"])
    event_count: int
    updated_at: str


class Usage(BaseModel):
    org_id: UUID
    period: str
    rows: list[UsageRow]


class Access(BaseModel):
    model_config = {"extra": "allow"}
    feature_key: str = Field(examples=["max_api_calls_per_month"])
    allowed: bool
    plan: str = Field(examples=["free"])
    limit: int | None = Field(default=None, examples=[1000])
    unlimited: bool | None = None
    used: float | None = Field(default=None, examples=[37])
    remaining: float | None = Field(default=None, examples=[963])


class Entitlements(BaseModel):
    org_id: UUID
    features: list[Access]


class SubscriptionIn(BaseModel):
    model_config = {"extra": "forbid"}
    plan: str = Field(examples=["pro"], pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    status: Literal["active", "trialing", "past_due", "canceled"] = "active"
    seats: int = Field(default=1, ge=0, le=1_000_000)
    seats_in_use: int = Field(default=0, ge=0, le=1_000_000)
    timezone: str = Field(
        default="UTC", examples=["Europe/Berlin"], pattern=r"^[A-Za-z0-9_+/-]{1,64}$"
    )


class SubscriptionOut(BaseModel):
    org_id: UUID
    plan: str
    status: str
    seats: int
    seats_in_use: int
    timezone: str
    updated_at: str


class PlanFeature(BaseModel):
    feature_key: str
    limit_value: int | None
    flags: dict[str, bool]


class Plan(BaseModel):
    plan: str
    features: list[PlanFeature]


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody} for status in (400, 401, 403, 404, 413, 415, 422, 503)
}
EVENT_EXAMPLE = {
    "id": "evt-2026-0001",
    "type": "api_call",
    "org_id": "0b4e3e2c-5a8f-4c6b-9a2e-3f1d2c4b5a6e",
    "user_id": None,
    "quantity": 1,
    "occurred_at": "2026-11-25T10:00:00Z",
    "metadata": {"path": "/v1/x"},
}
EVENT_SCHEMA = {
    "type": "object",
    "required": ["id", "type", "org_id", "occurred_at"],
    "additionalProperties": False,
    "properties": {
        "id": {"type": "string", "pattern": ID_PATTERN.pattern},
        "type": {"type": "string", "enum": [t.value for t in EventType]},
        "org_id": {"type": "string", "format": "uuid"},
        "user_id": {"type": ["string", "null"], "format": "uuid"},
        "quantity": {"type": "number", "minimum": 0},
        "occurred_at": {"type": "string", "format": "date-time"},
        "metadata": {"type": "object"},
    },
}


class ApiMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "metering_http_requests",
            "HTTP requests by route and status.",
            ["route", "method", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "metering_http_request_seconds",
            "HTTP request latency by route.",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.published = Counter(
            "metering_http_events_published",
            "Events accepted over HTTP and acknowledged by Kafka.",
            registry=registry,
        )


class MetricsMiddleware:
    """Pure ASGI middleware (Starlette's BaseHTTPMiddleware costs ~0.3 ms per request)."""

    def __init__(self, app: Any, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def capture(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.latency.labels(route, scope["method"]).observe(
                time.perf_counter() - started
            )
            self.metrics.requests.labels(route, scope["method"], str(status)).inc()


def create_app(settings: Settings) -> FastAPI:
    registry = CollectorRegistry()
    metrics = ApiMetrics(registry)
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        pool = await create_pool(settings, max_size=10)
        partitioner = OrgKeyPartitioner()
        producer = AIOKafkaProducer(
            bootstrap_servers=settings.kafka_bootstrap_servers,
            acks="all",
            enable_idempotence=True,
            linger_ms=2,
            max_batch_size=512 * 1024,
            partitioner=partitioner,
        )
        await producer.start()
        publisher = EventPublisher(producer, partitioner, settings.events_topic)
        state.update(
            pool=pool,
            producer=producer,
            publisher=publisher,
            keys=KeyStore(pool),
            reads=ReadStore(pool),
            subscriptions=SubscriptionStore(pool),
        )
        try:
            yield
        finally:
            await publisher.close()
            await producer.stop()
            await pool.close()

    app = FastAPI(
        title="metering",
        version="1",
        lifespan=lifespan,
        description="Usage metering: ingest usage events, read aggregates, check access. "
        "Every /v1 call needs `Authorization: Bearer <key>` (see `metering keys create`).",
    )

    app.add_middleware(MetricsMiddleware, metrics=metrics)

    def error_response(status: int, code: str, reason: str, **extra: Any) -> JSONResponse:
        headers = (
            {"Retry-After": str(int(extra["retry_after"]))} if extra.get("retry_after") else None
        )
        if status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        return JSONResponse(
            {"code": code, "reason": reason, **extra}, status_code=status, headers=headers
        )

    @app.exception_handler(ApiError)
    async def on_api_error(_: Request, error: ApiError) -> JSONResponse:
        return error_response(error.status, error.code, error.reason, **error.extra)

    @app.exception_handler(RequestValidationError)
    async def on_validation(_: Request, error: RequestValidationError) -> JSONResponse:
        details = [
            {"field": ".".join(str(p) for p in e["loc"]), "reason": e["msg"]}
            for e in error.errors()
        ]
        first = details[0] if details else {"field": "request", "reason": "invalid"}
        return error_response(
            422 if any(d["field"].startswith("body") for d in details) else 400,
            "invalid_request",
            f"{first['field']}: {first['reason']}",
            errors=details,
        )

    @app.exception_handler(StarletteHTTPException)
    async def on_http(_: Request, error: StarletteHTTPException) -> JSONResponse:
        return error_response(error.status_code, "http_error", str(error.detail))

    @app.exception_handler(ClientDisconnect)
    async def on_disconnect(_: Request, __: ClientDisconnect) -> Response:
        # The client left while sending its body: nothing was published, no one reads the
        # answer. Not an error of ours (it was logged with a traceback and counted as 500).
        return Response(status_code=499)

    @app.exception_handler(asyncpg.DataError)
    async def on_bad_value(_: Request, error: asyncpg.DataError) -> JSONResponse:
        # a value Postgres cannot take (e.g. a NUL character): the client's input, not a bug
        return error_response(400, "invalid_value", f"a value was refused by the database: {error}")

    @app.exception_handler(Exception)
    async def on_unexpected(_: Request, error: Exception) -> JSONResponse:
        if isinstance(error, TRANSIENT_DB_ERRORS):
            return error_response(
                503, "database_unavailable", "PostgreSQL is unavailable; retry", retry_after=1.0
            )
        log.exception("unexpected error")
        return error_response(500, "internal_error", "unexpected error; it was logged")

    parsing = asyncio.Semaphore(PARALLEL_LARGE_BODIES)

    async def parse_off_the_loop(body: bytes, content_type: str, **rules: Any) -> list[WireEvent]:
        """`events_from_body`, in a worker thread for a large body: 1,000 events of 16 KiB of
        decimals take seconds of CPU, which on the event loop would stall every other request
        (`/healthz` included). The thread still holds the GIL, but yields it every 5 ms."""
        if len(body) <= INLINE_BODY_BYTES:
            return events_from_body(body, content_type, **rules)
        async with parsing:
            return await asyncio.to_thread(events_from_body, body, content_type, **rules)

    async def api_key(request: Request) -> ApiKey:
        header = request.headers.get("authorization", "")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise ApiError(401, "unauthenticated", "send Authorization: Bearer <key>")
        keys: KeyStore = state["keys"]
        key = await keys.authenticate(presented.strip())
        if key is None:
            raise ApiError(401, "invalid_key", "the key is unknown or revoked")
        return key

    def scoped(scope: str) -> Callable[..., Awaitable[ApiKey]]:
        async def dependency(key: Annotated[ApiKey, Depends(api_key)]) -> ApiKey:
            if not key.allows(scope):
                raise ApiError(403, "missing_scope", f"this key lacks the {scope!r} scope")
            return key

        return dependency

    def for_org(key: ApiKey, org_id: UUID) -> None:
        if not key.may_access(org_id):
            raise ApiError(403, "other_organization", "this key is bound to another organization")

    # ------------------------------------------------------------ ingest
    @app.post(
        "/v1/events",
        status_code=202,
        response_model=Accepted,
        responses=ERRORS,
        tags=["ingest"],
        summary="Publish one usage event or up to 1,000 (JSON or CloudEvents)",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "oneOf": [
                                EVENT_SCHEMA,
                                {
                                    "type": "array",
                                    "items": EVENT_SCHEMA,
                                    "minItems": 1,
                                    "maxItems": 1000,
                                },
                            ]
                        },
                        "examples": {
                            "one": {"value": EVENT_EXAMPLE},
                            "batch": {"value": [EVENT_EXAMPLE]},
                        },
                    },
                    "application/cloudevents+json": {
                        "schema": {"type": "object"},
                        "example": {
                            "specversion": "1.0",
                            "id": "evt-1",
                            "type": "com.example.api_call",
                            "source": "/billing",
                            "time": "2026-11-25T10:00:00Z",
                            "subject": "0b4e3e2c-5a8f-4c6b-9a2e-3f1d2c4b5a6e",
                            "data": {"quantity": 3},
                        },
                    },
                    "application/cloudevents-batch+json": {
                        "schema": {"type": "array", "items": {"type": "object"}}
                    },
                },
            }
        },
    )
    async def ingest(
        request: Request, key: Annotated[ApiKey, Depends(scoped("ingest"))]
    ) -> Accepted:
        """All or nothing: 202 only after Kafka acknowledged every event (acks=all); a
        request with any invalid event publishes none and names each bad one by index."""
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY_BYTES):
            raise ApiError(413, "body_too_large", f"the body limit is {MAX_BODY_BYTES} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                raise ApiError(413, "body_too_large", f"the body limit is {MAX_BODY_BYTES} bytes")
        content_type = request.headers.get("content-type", "application/json")
        if not any(t in content_type for t in ("json",)):
            raise ApiError(
                415, "unsupported_media_type", "send application/json or CloudEvents JSON"
            )
        # The instant the events are judged at travels with them as their Kafka timestamp,
        # so the consumer judges lateness the same way (metering.models.accepted_at).
        accepted = now_to_the_millisecond()
        try:
            events = await parse_off_the_loop(
                bytes(body),
                content_type,
                now=accepted,
                lateness_window=settings.lateness_window,
                future_tolerance=settings.future_tolerance,
            )
        except RejectedRequest as rejected:
            raise ApiError(
                rejected.status,
                rejected.code,
                rejected.reason,
                errors=[vars(e) for e in rejected.errors],
            ) from None
        foreign = [i for i, e in enumerate(events) if not key.may_access(e.event.org_id)]
        if foreign:
            raise ApiError(
                403,
                "other_organization",
                "this key may not ingest events of another organization",
                errors=[
                    {"index": i, "code": "other_organization", "reason": "org_id is not the key's"}
                    for i in foreign
                ],
            )
        publisher: EventPublisher = state["publisher"]
        try:
            async with asyncio.timeout(PUBLISH_TIMEOUT_SECONDS):
                await publisher.publish(
                    [(e.key, e.payload) for e in events], timestamp_ms=timestamp_ms(accepted)
                )
        except (KafkaError, TimeoutError, OSError) as error:
            # Some events may be on Kafka already: a retry of the same request is safe,
            # because every event carries its id and the consumer stores each id once.
            raise ApiError(
                503,
                "kafka_unavailable",
                f"Kafka did not acknowledge every event ({type(error).__name__}); "
                "retry the same request",
                retry_after=1.0,
            ) from None
        metrics.published.inc(len(events))
        return Accepted(accepted=len(events), ids=[e.event.id for e in events])

    # ------------------------------------------------------------- reads
    @app.get("/v1/orgs/{org_id}/usage", response_model=Usage, responses=ERRORS, tags=["read"])
    async def usage(
        org_id: OrgId,
        key: Annotated[ApiKey, Depends(scoped("read"))],
        period: Literal["day", "month"] = "month",
        from_: Annotated[
            date | None, Query(alias="from", description="first period start (date)")
        ] = None,
        to: Annotated[date | None, Query(description="period starts before this date")] = None,
        type: Annotated[
            str | None, Query(max_length=64, description="only this event type")
        ] = None,
    ) -> Usage:
        for_org(key, org_id)
        rows = await state["reads"].usage(org_id, period, from_, to, type)
        return Usage(
            org_id=org_id,
            period=period,
            rows=[
                UsageRow(
                    event_type=r["event_type"],
                    period=r["period"],
                    period_start=r["period_start"],
                    value=format(r["value"].normalize(), "f"),
                    event_count=r["event_count"],
                    updated_at=r["updated_at"].isoformat(),
                )
                for r in rows
            ],
        )

    @app.get(
        "/v1/orgs/{org_id}/features/{feature_key}",
        response_model=Access,
        responses=ERRORS,
        tags=["read"],
    )
    async def feature(
        org_id: OrgId,
        feature_key: Annotated[str, Path(max_length=64)],
        key: Annotated[ApiKey, Depends(scoped("read"))],
        quantity: Annotated[str, Query(max_length=40, description="quantity requested")] = "1",
    ) -> dict[str, Any]:
        for_org(key, org_id)
        try:
            requested = quantity_from_text(quantity)
        except PydanticCustomError as error:
            raise ApiError(400, error.type, f"quantity: {error}") from None
        result = await state["reads"].check(org_id, feature_key, requested)
        if result is None:
            raise ApiError(404, "unknown_feature", f"no plan has the feature {feature_key!r}")
        return _jsonable(result)

    @app.get(
        "/v1/orgs/{org_id}/entitlements",
        response_model=Entitlements,
        responses=ERRORS,
        tags=["read"],
    )
    async def entitlements(
        org_id: OrgId, key: Annotated[ApiKey, Depends(scoped("read"))]
    ) -> dict[str, Any]:
        for_org(key, org_id)
        return {
            "org_id": org_id,
            "features": [_jsonable(f) for f in await state["reads"].entitlements(org_id)],
        }

    @app.put(
        "/v1/orgs/{org_id}/subscription",
        response_model=SubscriptionOut,
        responses=ERRORS,
        tags=["admin"],
    )
    async def put_subscription(
        org_id: OrgId,
        subscription: SubscriptionIn,
        key: Annotated[ApiKey, Depends(scoped("admin"))],
    ) -> SubscriptionOut:
        for_org(key, org_id)
        store: SubscriptionStore = state["subscriptions"]
        if not await store.plan_exists(subscription.plan):
            raise ApiError(422, "unknown_plan", f"no plan named {subscription.plan!r}")
        if not await store.zone_valid(subscription.timezone):
            raise ApiError(
                422, "unknown_timezone", f"{subscription.timezone!r} is not an IANA time zone"
            )
        try:
            row = await store.put(
                org_id,
                subscription.plan,
                subscription.status,
                subscription.seats,
                subscription.seats_in_use,
                subscription.timezone,
            )
        except asyncpg.CheckViolationError as error:
            raise ApiError(422, "invalid_subscription", str(error)) from None
        return SubscriptionOut(**{**dict(row), "updated_at": row["updated_at"].isoformat()})

    @app.get("/v1/plans", response_model=list[Plan], responses=ERRORS, tags=["read"])
    async def plans(_: Annotated[ApiKey, Depends(api_key)]) -> list[Plan]:
        import json

        grouped: dict[str, list[PlanFeature]] = {}
        for row in await state["reads"].plans():
            grouped.setdefault(row["plan"], []).append(
                PlanFeature(
                    feature_key=row["feature_key"],
                    limit_value=row["limit_value"],
                    flags=json.loads(row["flags"]),
                )
            )
        return [Plan(plan=name, features=features) for name, features in grouped.items()]

    # -------------------------------------------------------- operations
    @app.get("/healthz", tags=["operations"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"], responses={503: {"model": ErrorBody}})
    async def readyz() -> JSONResponse:
        problems = []
        try:
            async with asyncio.timeout(2):
                await state["reads"].ping()
        except Exception as error:  # readiness reports, it does not raise
            problems.append(f"postgres: {type(error).__name__}")
        try:
            async with asyncio.timeout(2):
                await state["producer"].client.fetch_all_metadata()
        except Exception as error:
            problems.append(f"kafka: {type(error).__name__}")
        if problems:
            return error_response(503, "not_ready", "; ".join(problems))
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", tags=["operations"], response_class=Response)
    async def prometheus() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


def create_app_from_environment() -> FastAPI:
    """App factory for `metering serve --workers N`: each worker process reads the
    environment once (metering/config.py) and builds its own app, pools and producer."""
    from metering.api.server import configure
    from metering.config import load_settings

    settings = load_settings()
    configure(settings)  # this worker's connections get the configured timeouts
    return create_app(settings)


def _jsonable(result: dict[str, Any]) -> dict[str, Any]:
    return {k: (float(v) if isinstance(v, Decimal) else v) for k, v in result.items()}
