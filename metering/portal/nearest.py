"""The organizations nearest their limits, for the operator overview (`GET /`).

Candidates are the organizations with a crossing in the last LOOKBACK (every limit notifies
its lowest threshold, 80% unless a plan or an override says otherwise, so an organization
near a limit has one); each candidate's limits are read with the API's own entitlements
(the access checks), and the highest use of a limit ranks them.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime, timedelta
from uuid import UUID

from metering.limits.crossings import CrossingStore
from metering.portal.org_page import EntitlementView
from metering.storage.reads import ReadStore, exact_json

LOOKBACK = timedelta(days=35)
CANDIDATES = 50


@dataclass(frozen=True)
class NearLimit:
    org_id: UUID
    entitlement: EntitlementView
    last_crossed_at: datetime


async def nearest_limits(
    reads: ReadStore, crossings: CrossingStore, now: datetime, shown: int = 20
) -> list[NearLimit]:
    """Up to `shown` organizations, highest use of any one limit first."""
    candidates = await crossings.organizations_crossing_since(now - LOOKBACK, CANDIDATES)
    limit = asyncio.Semaphore(3)

    async def highest(org_id: UUID, crossed: datetime) -> NearLimit | None:
        async with limit:
            texts = await reads.entitlements_json(org_id)
        views = [
            EntitlementView(a["feature_key"], a, str(a.get("period") or "month"))
            for a in map(exact_json, texts)
        ]
        measured = [v for v in views if v.percent is not None]
        if not measured:
            return None
        return NearLimit(org_id, max(measured, key=lambda v: v.percent or 0.0), crossed)

    found = await asyncio.gather(*(highest(org, at) for org, at in candidates))
    ranked = sorted(
        (n for n in found if n is not None), key=lambda n: -(n.entitlement.percent or 0.0)
    )
    return ranked[:shown]
