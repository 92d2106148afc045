"""Logging of the connection pool while PostgreSQL is away."""

from __future__ import annotations

import logging
import sys

import asyncpg
import pytest

from metering.storage.pool import OneLineOutageWarnings, shorten_outage_logs


def record_with(error: BaseException) -> logging.LogRecord:
    try:
        raise error
    except BaseException:
        exc_info = sys.exc_info()
    return logging.LogRecord(
        "asyncpg.pool",
        logging.WARNING,
        __file__,
        1,
        "Failed to restore the pool connection floor; %s",
        ("retrying",),
        exc_info,
    )


@pytest.mark.parametrize(
    "error",
    [
        ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 5432)"),
        asyncpg.CannotConnectNowError("the database system is shutting down"),
    ],
)
def test_a_transient_error_is_logged_on_one_line(error: BaseException) -> None:
    record = record_with(error)
    assert OneLineOutageWarnings().filter(record) is True
    line = logging.Formatter("%(name)s: %(message)s").format(record)
    assert "\n" not in line
    assert line.startswith("asyncpg.pool: Failed to restore the pool connection floor; retrying (")
    assert type(error).__name__ in line and str(error) in line


def test_any_other_error_keeps_its_traceback() -> None:
    record = record_with(ValueError("a bug"))
    assert OneLineOutageWarnings().filter(record) is True
    text = logging.Formatter("%(message)s").format(record)
    assert "Traceback" in text and "ValueError: a bug" in text


def test_the_filter_is_installed_once() -> None:
    logger = logging.getLogger("asyncpg.pool")
    shorten_outage_logs()
    shorten_outage_logs()
    assert sum(isinstance(f, OneLineOutageWarnings) for f in logger.filters) == 1
