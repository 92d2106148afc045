"""Pure parts of the local environment set-up."""

from __future__ import annotations

import re

from metering.devenv.services import _kafka_cluster_id


def test_cluster_ids_never_look_like_an_option() -> None:
    """kafka-storage format reads an id starting with '-' as an option and fails (one id in
    64 did). 5,000 draws: a leading '-' would show with probability 1 - (63/64)**5000."""
    ids = [_kafka_cluster_id() for _ in range(5000)]
    assert all(re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_-]{21}", cluster_id) for cluster_id in ids)
    assert len(set(ids)) == len(ids)
