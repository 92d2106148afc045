"""The organization page, built at most once per second per organization and view.

A page costs ~15 ms of CPU (about 30 usage queries and 60 KiB of HTML) and ~45 ms of time;
a page that many people keep open, or a wall screen reloading it, would cost that on every
request. Each (organization, meters the credential reads) is built once and served to the
requests of the next PAGE_SECONDS; after that, the next request starts a new build in the
background and is answered the page it replaces, as long as that is at most STALE_SECONDS
old (so no request waits for a build but the first one of an organization, or one after a
quiet spell). The numbers are then at most ~1 s older than the aggregation, whose own
freshness objective is one second; the page says when it was built.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field

PAGE_SECONDS = 1.0
STALE_SECONDS = 5.0
MAX_PAGES = 1000


@dataclass
class _Entry:
    built_at: float
    page: asyncio.Future[str]
    refreshing: asyncio.Task[None] | None = field(default=None)


class PageCache:
    def __init__(self, seconds: float = PAGE_SECONDS, stale: float = STALE_SECONDS) -> None:
        self._seconds = seconds
        self._stale = stale
        self._entries: dict[Hashable, _Entry] = {}

    async def get(self, key: Hashable, build: Callable[[], Awaitable[str]]) -> str:
        """The page of `key`: built at most `seconds` ago; or, up to `stale` seconds old,
        while `build()` makes its successor in the background; else `build()`'s, once for
        all the requests waiting for it. A failed build is not kept."""
        now = time.monotonic()
        entry = self._entries.get(key)
        if entry is not None:
            age = now - entry.built_at
            if age < self._seconds:
                return await asyncio.shield(entry.page)
            if age < self._stale and entry.page.done() and not entry.page.exception():
                if entry.refreshing is None:
                    entry.refreshing = asyncio.create_task(self._refresh(key, entry, build))
                return entry.page.result()
        if len(self._entries) >= MAX_PAGES:
            self._entries = {
                k: e for k, e in self._entries.items() if now - e.built_at < self._stale
            }
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._entries[key] = _Entry(now, future)
        try:
            page = await build()
        except BaseException as error:
            self._entries.pop(key, None)
            future.set_exception(error)
            future.exception()  # retrieved: waiting requests get it, nobody logs it twice
            raise
        future.set_result(page)
        return page

    async def _refresh(
        self, key: Hashable, entry: _Entry, build: Callable[[], Awaitable[str]]
    ) -> None:
        started = time.monotonic()
        try:
            page = await build()
        except Exception:  # the stale page stays until it is too old; then a request retries
            entry.refreshing = None
            return
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        future.set_result(page)
        if self._entries.get(key) is entry:
            self._entries[key] = _Entry(started, future)
