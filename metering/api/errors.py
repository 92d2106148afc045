"""How the API answers errors: JSON `{"code", "reason", ...}` with a 4xx status; 503 when a
dependency is away; a 500 only for a bug (logged with its traceback)."""

import logging
from typing import Any

import asyncpg
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from metering.storage.pool import TRANSIENT_DB_ERRORS

log = logging.getLogger("metering.api")


class ApiError(Exception):
    """An error the API answers with: status, stable code, human reason, extra fields."""

    def __init__(self, status: int, code: str, reason: str, **extra: Any) -> None:
        super().__init__(reason)
        self.status = status
        self.code = code
        self.reason = reason
        self.extra = extra


def error_response(status: int, code: str, reason: str, **extra: Any) -> JSONResponse:
    headers = {"Retry-After": str(int(extra["retry_after"]))} if extra.get("retry_after") else None
    if status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    return JSONResponse(
        {"code": code, "reason": reason, **extra}, status_code=status, headers=headers
    )


def install_error_handlers(app: FastAPI) -> None:
    """Every error the API can meet, mapped to its answer."""

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
