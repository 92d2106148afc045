"""The producer client for services (`metering.client`), against the real broker."""

from __future__ import annotations

import uuid

import pytest

from metering.client import UsageClient
from metering.config import Settings
from metering.errors import DependencyUnavailable, InvalidEvent
from metering.models import parse_event, utc_now
from tests.conftest import free_port, read_topic


async def test_no_broker_is_a_typed_error_naming_kafka(base_settings: Settings) -> None:
    nowhere = base_settings.model_copy(
        update={"kafka_bootstrap_servers": f"127.0.0.1:{free_port()}"}
    )
    with pytest.raises(DependencyUnavailable) as raised:
        async with UsageClient(nowhere):
            pass
    assert raised.value.dependency == "kafka"
    assert nowhere.kafka_bootstrap_servers in raised.value.reason


@pytest.mark.services
async def test_events_arrive_keyed_by_org_with_time_ordered_ids_and_bad_ones_never_leave(
    settings: Settings,
) -> None:
    org = uuid.uuid4()
    async with UsageClient(settings) as client:
        with pytest.raises(InvalidEvent) as refused:
            await client.send(org_id=org, type="user_active")  # needs a user_id
        assert refused.value.code == "user_required"
        sent = [await client.send(org_id=org, type="api_call", quantity=n) for n in (1, 2, 3)]
    assert all(uuid.UUID(e.id).version == 7 for e in sent)
    assert [e.id for e in sent] == sorted(e.id for e in sent)

    records = await read_topic(settings, settings.events_topic, expected=3)
    assert len(records) == 3
    assert {r.key for r in records} == {str(org).encode()}
    assert len({r.partition for r in records}) == 1  # one org, one partition, in order
    now = utc_now()
    received = [
        parse_event(r.value, now=now, lateness_window=settings.lateness_window) for r in records
    ]
    assert received == sent  # the invalid one was never published
