"""Who may call what: the bearer key or portal token, its scope, its organization."""

from collections.abc import Awaitable, Callable
from typing import Annotated
from uuid import UUID

from fastapi import Depends, Request

from metering.api.errors import ApiError
from metering.api.state import state_of
from metering.portal.tokens import PORTAL_SCOPE, TOKEN_PREFIX, ExpiredPortalToken
from metering.storage.keys import ApiKey


async def credential(request: Request, presented: str) -> ApiKey:
    """The API key or portal token `presented`; 401 when unknown, revoked or expired."""
    state = state_of(request)
    try:
        if presented.startswith(f"{TOKEN_PREFIX}_"):
            key = await state.portal_tokens.authenticate(presented)
        else:
            key = await state.keys.authenticate(presented)
    except ExpiredPortalToken as error:
        raise ApiError(
            401,
            "token_expired",
            f"{error}; ask the application that gave it for a new one",
            expired_at=error.expires_at.isoformat(),
        ) from None
    if key is None:
        raise ApiError(401, "invalid_key", "the key is unknown or revoked")
    return key


def bearer_of(request: Request) -> str | None:
    """The credential of `Authorization: Bearer <credential>`, or None without one."""
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        return None
    return presented.strip()


async def api_key(request: Request) -> ApiKey:
    """The key of `Authorization: Bearer <key>`; 401 when absent, unknown or revoked."""
    presented = bearer_of(request)
    if presented is None:
        raise ApiError(401, "unauthenticated", "send Authorization: Bearer <key>")
    return await credential(request, presented)


def scoped(scope: str, portal: bool = False) -> Callable[..., Awaitable[ApiKey]]:
    """A dependency requiring a key with `scope` (403 otherwise); with `portal`, a portal
    token is accepted too (the routes that read one organization's usage)."""

    async def dependency(key: Annotated[ApiKey, Depends(api_key)]) -> ApiKey:
        if key.allows(scope) or (portal and PORTAL_SCOPE in key.scopes):
            return key
        if PORTAL_SCOPE in key.scopes:
            raise ApiError(
                403, "portal_token", "a portal token only reads its organization's usage"
            )
        raise ApiError(403, "missing_scope", f"this key lacks the {scope!r} scope")

    return dependency


def for_org(key: ApiKey, org_id: UUID) -> None:
    """403 unless `key` may act for `org_id` (a key bound to one org may not for others)."""
    if not key.may_access(org_id):
        raise ApiError(403, "other_organization", "this key is bound to another organization")


def for_meter(key: ApiKey, meter_key: str) -> None:
    """403 unless `key` may read `meter_key` (a portal token limited to other meters)."""
    if not key.may_read_meter(meter_key):
        raise ApiError(
            403, "meter_not_allowed", f"this portal token does not read the meter {meter_key!r}"
        )


def key_actor(key: ApiKey) -> str:
    """How an API key appears in the audit trail and on what it changed."""
    return f"key:{key.prefix}" + (f" ({key.name})" if key.name else "")
