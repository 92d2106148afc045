"""Logging for every command: one format, and filters that keep an outage readable."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

# Libraries that log every failed reconnect (aiokafka: ~60 lines a second while the broker
# is down, measured with `metering consume` and the dev broker stopped).
CHATTY_LIBRARIES = ("aiokafka",)
REPEAT_WINDOW_SECONDS = 30.0
# Distinct lines remembered before the stale ones are forgotten.
MAX_REMEMBERED_LINES = 1000


class RepeatsSuppressed(logging.Filter):
    """A line from one of `libraries` that is identical to one let through less than
    `window_seconds` ago is dropped; the first one after the window says how many were
    dropped. Nothing is lost to the reader (the lines were identical) and our own loggers
    are never filtered: they say once what is retried and when it is back."""

    def __init__(
        self,
        libraries: tuple[str, ...] = CHATTY_LIBRARIES,
        window_seconds: float = REPEAT_WINDOW_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self._libraries = libraries
        self._window = window_seconds
        self._clock = clock
        # line -> (when it was last let through, how many were dropped since)
        self._seen: dict[tuple[str, int, str], tuple[float, int]] = {}

    def _from_library(self, name: str) -> bool:
        return any(name == lib or name.startswith(lib + ".") for lib in self._libraries)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._from_library(record.name):
            return True
        now = self._clock()
        key = (record.name, record.levelno, record.getMessage())
        seen = self._seen.get(key)
        if seen is not None and now - seen[0] < self._window:
            self._seen[key] = (seen[0], seen[1] + 1)
            return False
        if len(self._seen) >= MAX_REMEMBERED_LINES:
            self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self._window}
        self._seen[key] = (now, 0)
        if seen is not None and seen[1]:
            record.msg = (
                f"{key[2]} (and {seen[1]} more times like it in the last {now - seen[0]:.0f} s)"
            )
            record.args = ()
        return True


def configure_logging(verbose: bool) -> None:
    """Log to stderr at INFO (DEBUG with `verbose`), with a library's repeated lines
    suppressed and PostgreSQL outages logged one line per retry."""
    from metering.storage.pool import shorten_outage_logs

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("aiokafka").setLevel(logging.DEBUG if verbose else logging.WARNING)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RepeatsSuppressed) for f in handler.filters):
            handler.addFilter(RepeatsSuppressed())
    shorten_outage_logs()
