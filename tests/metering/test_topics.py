"""Creating and deleting topics on the real broker."""

from __future__ import annotations

import uuid

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from metering.config import Settings
from metering.topics import TopicSpec, delete_topics_with_prefix, ensure_topics
from tests.conftest import async_wait_for

pytestmark = pytest.mark.services


async def names(settings: Settings) -> set[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()


async def test_delete_by_prefix_takes_those_topics_only(settings: Settings) -> None:
    prefix = f"scratch.{uuid.uuid4().hex[:8]}."
    made = [f"{prefix}a", f"{prefix}b"]
    assert await ensure_topics(settings, [TopicSpec(n, 1, {}) for n in made]) == made
    # the broker's metadata shows a new topic a moment after it is created, and a deleted
    # one a moment after it is deleted
    await async_wait_for(
        lambda: _has_all(settings, made), timeout=10, what="the new topics in the metadata"
    )

    assert await delete_topics_with_prefix(settings, prefix) == made
    await async_wait_for(
        lambda: _has_none(settings, made), timeout=10, what="the topics to be gone"
    )
    assert settings.events_topic in await names(settings)  # not under the prefix: kept


async def _has_all(settings: Settings, wanted: list[str]) -> bool:
    return set(wanted) <= await names(settings)


async def _has_none(settings: Settings, unwanted: list[str]) -> bool:
    return not set(unwanted) & await names(settings)


async def test_an_empty_prefix_is_refused(settings: Settings) -> None:
    with pytest.raises(ValueError, match="every topic"):
        await delete_topics_with_prefix(settings, "")
