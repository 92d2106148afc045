"""Stopping the crossing publisher's producer on the real Kafka, with the broker gone."""

from __future__ import annotations

import asyncio
import logging

import pytest
from aiokafka import AIOKafkaProducer

from aggregator.publisher import stop_producer, transactional_id
from metering.config import Settings
from metering.devenv.services import DevServices

pytestmark = pytest.mark.services


async def test_a_producer_stuck_in_a_transaction_without_a_broker_is_abandoned(
    settings: Settings, dev_services: DevServices, caplog: pytest.LogCaptureFixture
) -> None:
    """aiokafka's stop() waits for every undelivered record; a record of a transaction whose
    partition the broker never added is never delivered, so stop() alone waits forever."""
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        transactional_id=transactional_id(settings) + ".stuck",
        enable_idempotence=True,
    )
    await producer.start()
    try:
        async with producer.transaction():  # the topic's metadata is known from here on
            await (await producer.send(settings.limits_topic, b"{}"))
        await asyncio.to_thread(dev_services.stop_kafka)
        await producer.begin_transaction()
        undelivered = await producer.send(settings.limits_topic, b"{}")
        with caplog.at_level(logging.WARNING, logger="metering.aggregator"):
            # bounded: without the give-up this waited for the broker
            await asyncio.wait_for(stop_producer(producer, 1.0), 30)
        assert "did not stop within 1 s" in caplog.text
        assert not undelivered.done()
    finally:
        await asyncio.to_thread(dev_services.start_kafka)
