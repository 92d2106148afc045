"""Kafka's default key partitioning, without re-hashing the same organization each time."""

from __future__ import annotations

from collections.abc import Sequence

from aiokafka.partitioner import DefaultPartitioner, murmur2

MAX_REMEMBERED_KEYS = 100_000


class OrgKeyPartitioner:
    """Picks the partition exactly as Kafka's default partitioner does (murmur2 of the key,
    the same as the Java client), so every producer sends an organization to the same
    partition. aiokafka's murmur2 is pure Python (~15 µs for a 36-byte org id, measured as
    17% of the API's CPU while ingesting); keys are org ids, few and repeated, so each
    key's hash is computed once and remembered (at most 100,000, then forgotten at once).
    """

    def __init__(self) -> None:
        self._hashes: dict[bytes, int] = {}
        self._fallback = DefaultPartitioner()

    def __call__(
        self, key: bytes | None, all_partitions: Sequence[int], available: Sequence[int]
    ) -> int:
        if key is None:
            partition: int = self._fallback(key, all_partitions, available)
            return partition
        hashed = self._hashes.get(key)
        if hashed is None:
            if len(self._hashes) >= MAX_REMEMBERED_KEYS:
                self._hashes.clear()
            hashed = murmur2(key) & 0x7FFFFFFF
            self._hashes[key] = hashed
        return all_partitions[hashed % len(all_partitions)]
