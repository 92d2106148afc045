"""A revoked key is refused by every running API process at once (issue 39, item 6): each
caches authenticated keys for 60 s (KEY_CACHE_SECONDS) and drops one when PostgreSQL
notifies its change, so a refusal well inside that minute shows the notification did it."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from metering.config import Settings
from metering.storage.keys import KEY_CACHE_SECONDS
from tests.conftest import async_wait_for, serving

pytestmark = pytest.mark.services


async def test_a_revoked_key_is_refused_by_every_api_process(
    settings: Settings, tmp_path: Path, make_key
) -> None:  # type: ignore[no-untyped-def]
    key = await make_key("read")
    other = await make_key("read")
    prefix = key.split("_")[1]
    headers = {"Authorization": f"Bearer {key}"}
    with (
        serving(settings, tmp_path / "a.log") as first,
        serving(settings, tmp_path / "b.log") as second,
    ):
        async with httpx.AsyncClient(timeout=10) as client:
            for server in (first, second):  # authenticated, so cached by both
                answer = await client.get(f"{server.url}/v1/plans", headers=headers)
                assert answer.status_code == 200, answer.text
            assert await make_key.store.revoke(prefix)

            for server in (first, second):

                async def refused(url: str = server.url) -> bool:
                    answer = await client.get(f"{url}/v1/plans", headers=headers)
                    return answer.status_code == 401

                # far less than the cache's lifetime: the notification dropped the key
                await async_wait_for(
                    refused, timeout=KEY_CACHE_SECONDS / 12, what="the revoked key refused"
                )
                # the other keys stay cached and valid
                still = await client.get(
                    f"{server.url}/v1/plans", headers={"Authorization": f"Bearer {other}"}
                )
                assert still.status_code == 200
