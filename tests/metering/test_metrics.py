"""observe_many against the client library's own observe."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram

from metering.metrics import LATENCY_BUCKETS, observe_many


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for metric in registry.collect()
        for sample in metric.samples
        if not sample.name.endswith("_created")
    }


@given(
    st.lists(
        st.tuples(
            st.floats(min_value=0, max_value=100, allow_nan=False),
            st.integers(min_value=0, max_value=50),
        ),
        max_size=10,
    )
)
def test_observe_many_equals_observing_one_by_one(ages: list[tuple[float, int]]) -> None:
    one_by_one, at_once = CollectorRegistry(), CollectorRegistry()
    slow = Histogram("freshness", "test", buckets=LATENCY_BUCKETS, registry=one_by_one)
    fast = Histogram("freshness", "test", buckets=LATENCY_BUCKETS, registry=at_once)
    for age, count in ages:
        for _ in range(count):
            slow.observe(age)
        observe_many(fast, age, count)
    expected, got = samples(one_by_one), samples(at_once)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert abs(got[key] - value) <= 1e-6 * max(1.0, abs(value)), key
    assert got[("freshness_count", ())] == sum(count for _, count in ages)
