"""Pure limit logic: which thresholds a usage level has crossed, and crossing ids.

No I/O here; the aggregator feeds it rows and stores what it returns.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal

UNLIMITED = -1
# The thresholds of a limit whose plan row or override names none (contract section 8)
THRESHOLDS = (80, 100)
# Namespace for deterministic crossing ids (uuid5): same crossing, same id, everywhere.
CROSSING_NAMESPACE = uuid.UUID("6f1c1f6e-3c39-4b8e-9a7a-4f6f0c2f5d11")


@dataclass(frozen=True)
class LimitUsage:
    """How much of a limited feature an organization used in a period."""

    org_id: uuid.UUID
    feature_key: str
    period: str  # 'month' or 'lifetime'
    period_start: date | None  # None for lifetime limits
    used: Decimal
    limit: int
    notified: frozenset[int] = frozenset()  # thresholds already recorded for this period
    thresholds: tuple[int, ...] = THRESHOLDS  # this limit's (plan feature or override)


@dataclass(frozen=True)
class Crossing:
    id: uuid.UUID
    org_id: uuid.UUID
    feature_key: str
    period: str
    period_start: date | None
    threshold_percent: int
    used: Decimal
    limit: int
    crossed_at: datetime

    def message(self) -> dict[str, object]:
        """The `usage.limits` message of contract section 3."""
        return {
            "id": str(self.id),
            "org_id": str(self.org_id),
            "feature_key": self.feature_key,
            "period": self.period,
            "period_start": self.period_start.isoformat() if self.period_start else None,
            "threshold_percent": self.threshold_percent,
            "used": str(self.used),
            "limit": self.limit,
            "crossed_at": self.crossed_at.isoformat(),
        }


def thresholds_reached(
    used: Decimal, limit: int, thresholds: tuple[int, ...] = THRESHOLDS
) -> list[int]:
    """The thresholds (percent of `limit`, in increasing order, each once) that `used` has
    reached. Unlimited (-1) reaches none and is never compared as a number; a limit of 0
    is reached by any use above 0."""
    ordered = sorted(set(thresholds))
    if limit == UNLIMITED:
        return []
    if limit == 0:
        return ordered if used > 0 else []
    return [t for t in ordered if used * 100 >= Decimal(limit) * t]


def crossing_id(
    org_id: uuid.UUID,
    feature_key: str,
    period: str,
    period_start: date | None,
    threshold_percent: int,
) -> uuid.UUID:
    """Deterministic id of a crossing: one per (org, feature, period, threshold)."""
    start = period_start.isoformat() if period_start else "lifetime"
    return uuid.uuid5(
        CROSSING_NAMESPACE, f"{org_id}|{feature_key}|{period}|{start}|{threshold_percent}"
    )


def crossings(usages: list[LimitUsage], now: datetime) -> list[Crossing]:
    """Every crossing the given usage levels have reached and that is not in their
    `notified` thresholds (the caller stores each once; ids make a repeat harmless)."""
    found = []
    for usage in usages:
        for threshold in thresholds_reached(usage.used, usage.limit, usage.thresholds):
            if threshold in usage.notified:
                continue
            found.append(
                Crossing(
                    id=crossing_id(
                        usage.org_id, usage.feature_key, usage.period, usage.period_start, threshold
                    ),
                    org_id=usage.org_id,
                    feature_key=usage.feature_key,
                    period=usage.period,
                    period_start=usage.period_start,
                    threshold_percent=threshold,
                    used=usage.used,
                    limit=usage.limit,
                    crossed_at=now,
                )
            )
    return found
