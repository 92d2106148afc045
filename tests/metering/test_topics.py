"""Creating and deleting topics on the real broker."""

from __future__ import annotations

import uuid

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from metering.config import Settings
from metering.topics import TopicSpec, delete_topics_with_prefix, ensure_topics

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
    assert await ensure_topics(settings, [TopicSpec(n, 1, {}) for n in made]) == []

    assert await delete_topics_with_prefix(settings, prefix) == made
    left = await names(settings)
    assert not left & set(made)
    assert settings.events_topic in left  # this test's own topics are not under the prefix


async def test_an_empty_prefix_is_refused(settings: Settings) -> None:
    with pytest.raises(ValueError, match="every topic"):
        await delete_topics_with_prefix(settings, "")
