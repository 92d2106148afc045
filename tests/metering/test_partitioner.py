import uuid

import pytest
from aiokafka.partitioner import DefaultPartitioner
from hypothesis import given
from hypothesis import strategies as st

from metering import partitioner
from metering.partitioner import OrgKeyPartitioner


@given(st.lists(st.uuids(), min_size=1, max_size=50), st.integers(min_value=1, max_value=64))
def test_same_partition_as_kafkas_default_partitioner(orgs: list[uuid.UUID], count: int) -> None:
    partitions = list(range(count))
    cached = OrgKeyPartitioner()
    for org in orgs + orgs:  # the second time from what it remembered
        key = str(org).encode()
        assert cached(key, partitions, partitions) == DefaultPartitioner()(key, partitions, [])


def test_forgets_at_the_bound_and_still_agrees(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(partitioner, "MAX_REMEMBERED_KEYS", 3)
    cached = OrgKeyPartitioner()
    keys = [str(uuid.uuid4()).encode() for _ in range(10)]
    for key in keys:
        assert cached(key, [0, 1, 2, 3, 4, 5], []) == DefaultPartitioner()(key, list(range(6)), [])
    assert len(cached._hashes) <= 3


def test_no_key_picks_an_available_partition() -> None:
    assert OrgKeyPartitioner()(None, [0, 1, 2], [2]) == 2
