"""The aggregator's lead on the real PostgreSQL: one holder per database, freed when its
session ends."""

from __future__ import annotations

import asyncio

import pytest

from metering.config import Settings
from metering.errors import AggregatorNotActive
from metering.storage.lease import AggregatorLease

pytestmark = pytest.mark.services


async def test_one_lead_per_database_freed_when_its_session_ends(
    settings: Settings, migrated_database: str
) -> None:
    first, second = AggregatorLease(settings), AggregatorLease(settings)
    second.name = "metering aggregate on elsewhere (pid 2)"
    try:
        assert await first.try_acquire()
        assert await first.try_acquire()  # taking it again on its own session is harmless
        assert not await second.try_acquire()
        assert await second.holder() == f"{first.name} from 127.0.0.1"
        await first.check()
        with pytest.raises(AggregatorNotActive, match="no longer held"):
            await second.check()

        await first.release()  # as when the process dies: its session ends
        with pytest.raises(AggregatorNotActive, match="session ended"):
            await first.check()
        assert await second.try_acquire()
        assert not await first.try_acquire()
        assert (await first.holder()).startswith("metering aggregate on elsewhere (pid 2)")
    finally:
        await first.release()
        await second.release()


async def test_a_standby_waits_for_the_lead_and_gets_it_when_the_leader_goes(
    settings: Settings, migrated_database: str
) -> None:
    leader, standby = AggregatorLease(settings), AggregatorLease(settings)
    try:
        assert await leader.try_acquire()
        waiting = asyncio.create_task(standby.wait())
        await asyncio.sleep(0.5)
        assert not waiting.done(), "the standby must not lead while the leader's session lives"
        await leader.release()
        await asyncio.wait_for(waiting, 10)
        await standby.check()
    finally:
        await leader.release()
        await standby.release()


async def test_checks_from_two_tasks_at_once_both_see_the_lead(
    settings: Settings, migrated_database: str
) -> None:
    # the pass loop and the publishing task check the same lock session concurrently
    lease = AggregatorLease(settings)
    try:
        assert await lease.try_acquire()
        await asyncio.gather(*(lease.check() for _ in range(5)))
    finally:
        await lease.release()
