"""Log filters that keep an outage readable."""

from __future__ import annotations

import logging

from metering.logs import RepeatsSuppressed


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def line(name: str, message: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord(name, logging.ERROR, __file__, 1, message, args, None)


def test_a_library_line_repeated_within_the_window_is_let_through_once() -> None:
    clock = Clock()
    repeats = RepeatsSuppressed(("aiokafka",), window_seconds=30, clock=clock)
    first = line("aiokafka", "Unable connect to node with id %s", 1)
    assert repeats.filter(first)
    for _ in range(50):
        clock.now += 0.1
        assert not repeats.filter(line("aiokafka", "Unable connect to node with id %s", 1))
    # a different line, and the same text from a child logger, are lines of their own
    assert repeats.filter(line("aiokafka", "Unable connect to node with id %s", 2))
    assert repeats.filter(line("aiokafka.consumer.fetcher", "Unable connect to node with id 1"))


def test_the_first_line_after_the_window_says_how_many_were_dropped() -> None:
    clock = Clock()
    repeats = RepeatsSuppressed(("aiokafka",), window_seconds=30, clock=clock)
    assert repeats.filter(line("aiokafka", "metadata failed"))
    for _ in range(3):
        clock.now += 5
        assert not repeats.filter(line("aiokafka", "metadata failed"))
    clock.now += 16  # 31 s after the first
    after = line("aiokafka", "metadata failed")
    assert repeats.filter(after)
    assert after.getMessage() == "metadata failed (and 3 more times like it in the last 31 s)"
    clock.now += 31
    quiet = line("aiokafka", "metadata failed")
    assert repeats.filter(quiet) and quiet.getMessage() == "metadata failed"


def test_our_own_loggers_and_other_libraries_are_never_filtered() -> None:
    repeats = RepeatsSuppressed(("aiokafka",), window_seconds=30, clock=Clock())
    for name in ("metering.retry", "aiokafkax", "asyncpg.pool"):
        assert all(repeats.filter(line(name, "kafka unavailable")) for _ in range(5))
