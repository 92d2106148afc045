"""Who may call what: the bearer key, its scope, its organization."""

from collections.abc import Awaitable, Callable
from typing import Annotated
from uuid import UUID

from fastapi import Depends, Request

from metering.api.errors import ApiError
from metering.api.state import state_of
from metering.storage.keys import ApiKey


async def api_key(request: Request) -> ApiKey:
    """The key of `Authorization: Bearer <key>`; 401 when absent, unknown or revoked."""
    header = request.headers.get("authorization", "")
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        raise ApiError(401, "unauthenticated", "send Authorization: Bearer <key>")
    key = await state_of(request).keys.authenticate(presented.strip())
    if key is None:
        raise ApiError(401, "invalid_key", "the key is unknown or revoked")
    return key


def scoped(scope: str) -> Callable[..., Awaitable[ApiKey]]:
    """A dependency requiring a key with `scope` (403 otherwise)."""

    async def dependency(key: Annotated[ApiKey, Depends(api_key)]) -> ApiKey:
        if not key.allows(scope):
            raise ApiError(403, "missing_scope", f"this key lacks the {scope!r} scope")
        return key

    return dependency


def for_org(key: ApiKey, org_id: UUID) -> None:
    """403 unless `key` may act for `org_id` (a key bound to one org may not for others)."""
    if not key.may_access(org_id):
        raise ApiError(403, "other_organization", "this key is bound to another organization")


def key_actor(key: ApiKey) -> str:
    """How an API key appears in the audit trail and on what it changed."""
    return f"key:{key.prefix}" + (f" ({key.name})" if key.name else "")
