"""The command line: its pure helpers, and what it says when PostgreSQL is not there."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, date, datetime, timedelta, timezone
from itertools import pairwise

import pytest

from metering.calendar import month_windows
from metering.config import Settings, child_environment
from metering.devenv.services import DevServices
from tests.conftest import ROOT, free_port

ORG = "00000000-0000-4000-8000-000000000001"


def metering(
    database_url: str, *args: str, kafka: str = "127.0.0.1:9092"
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "metering", *args],
        env=child_environment(
            {"METERING_DATABASE_URL": database_url, "METERING_KAFKA_BOOTSTRAP_SERVERS": kafka}
        ),
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_month_windows_cut_dates_at_each_month_start() -> None:
    assert month_windows(date(2026, 11, 15), date(2027, 2, 3)) == [
        (date(2026, 11, 15), date(2026, 12, 1)),
        (date(2026, 12, 1), date(2027, 1, 1)),
        (date(2027, 1, 1), date(2027, 2, 1)),
        (date(2027, 2, 1), date(2027, 2, 3)),
    ]


def test_month_windows_within_one_month_is_the_window_itself() -> None:
    assert month_windows(date(2026, 2, 1), date(2026, 2, 28)) == [
        (date(2026, 2, 1), date(2026, 2, 28))
    ]
    assert month_windows(date(2026, 2, 1), date(2026, 2, 1)) == []


def test_month_windows_of_datetimes_keep_the_zone_and_cover_without_gaps() -> None:
    zone = timezone(timedelta(hours=-5))
    first = datetime(2026, 1, 31, 22, 30, tzinfo=zone)
    last = datetime(2026, 4, 2, 1, 0, tzinfo=zone)
    windows = month_windows(first, last)
    assert windows[0] == (first, datetime(2026, 2, 1, tzinfo=zone))
    assert windows[-1] == (datetime(2026, 4, 1, tzinfo=zone), last)
    assert len(windows) == 4
    assert all(a[1] == b[0] for a, b in pairwise(windows))
    assert all(start.tzinfo is zone and end.tzinfo is zone for start, end in windows)
    assert month_windows(datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 3, 1, tzinfo=UTC)) == []


def test_an_unreachable_database_is_named_with_exit_status_3_and_no_traceback() -> None:
    port = free_port()  # nothing listens there
    url = f"postgresql://postgres@127.0.0.1:{port}/metering"
    for args in (["usage", ORG], ["check", ORG, "max_mau"], ["reconcile"], ["migrate"]):
        result = metering(url, *args)
        assert result.returncode == 3, (args, result.stderr)
        assert f"cannot connect to PostgreSQL at 127.0.0.1:{port}/metering" in result.stderr
        assert "Traceback" not in result.stderr


@pytest.mark.services
def test_a_database_without_the_schema_says_to_migrate(
    dev_services: DevServices, base_settings: Settings
) -> None:
    server = base_settings.database_url.get_secret_value().rsplit("/", 1)[0]
    result = metering(f"{server}/postgres", "usage", ORG)  # exists, never migrated
    assert result.returncode == 3, result.stderr
    assert "has no metering schema" in result.stderr
    assert "run `metering migrate`" in result.stderr
    assert "Traceback" not in result.stderr
    for command in ("reconcile", "migrate"):
        missing = metering(f"{server}/no_such_database", command)
        assert missing.returncode == 3, missing.stderr
        assert 'database "no_such_database" does not exist' in missing.stderr
        assert "Traceback" not in missing.stderr


def test_send_without_a_broker_names_kafka_with_exit_status_3() -> None:
    kafka = f"127.0.0.1:{free_port()}"
    for args in (["send", "--org", ORG], ["send", "--count", "5"]):
        result = metering("postgresql://unused", *args, kafka=kafka)
        assert result.returncode == 3, (args, result.stderr)
        assert f"cannot reach Kafka: no broker at {kafka} answered" in result.stderr
        assert "Traceback" not in result.stderr
