"""Pure parts of the local environment set-up."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from metering.config import Settings
from metering.devenv import kafka as services  # the module that resolves the jars
from metering.devenv.services import DevServices, _kafka_cluster_id
from metering.errors import DevEnvironmentError


def test_cluster_ids_never_look_like_an_option() -> None:
    """kafka-storage format reads an id starting with '-' as an option and fails (one id in
    64 did). 5,000 draws: a leading '-' would show with probability 1 - (63/64)**5000."""
    ids = [_kafka_cluster_id() for _ in range(5000)]
    assert all(re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_-]{21}", cluster_id) for cluster_id in ids)
    assert len(set(ids)) == len(ids)


def fake_mvn(tmp_path: Path, failures: int) -> Path:
    """A `mvn` that fails `failures` times (as an unreachable repository would), then
    'resolves' one jar into -DoutputDirectory."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "mvn"
    script.write_text(
        "#!/bin/sh\n"
        f'count="{tmp_path}/calls"; echo x >> "$count"\n'
        f'if [ "$(wc -l < "$count")" -le {failures} ]; then echo "Could not transfer"; exit 1; fi\n'
        'for arg in "$@"; do case "$arg" in -DoutputDirectory=*) '
        'touch "${arg#-DoutputDirectory=}/kafka_2.13.jar";; esac; done\n'
    )
    script.chmod(0o755)
    return bin_dir


def services_with_jars_in(tmp_path: Path) -> DevServices:
    return DevServices(Settings().model_copy(update={"kafka_jars_dir": tmp_path / "jars"}))


def test_jar_resolution_survives_a_network_hiccup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", f"{fake_mvn(tmp_path, failures=2)}:{os.environ['PATH']}")
    monkeypatch.setattr(services.time, "sleep", lambda seconds: None)
    jars = services_with_jars_in(tmp_path).kafka_jars()
    assert (jars / "kafka_2.13.jar").exists() and (jars / ".complete").exists()
    assert (tmp_path / "calls").read_text().count("x") == 3


def test_jar_resolution_gives_up_with_maven_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", f"{fake_mvn(tmp_path, failures=9)}:{os.environ['PATH']}")
    monkeypatch.setattr(services.time, "sleep", lambda seconds: None)
    with pytest.raises(DevEnvironmentError) as caught:
        services_with_jars_in(tmp_path).kafka_jars()
    assert "3 attempts" in caught.value.reason and "Could not transfer" in caught.value.reason
    assert not (tmp_path / "jars" / ".complete").exists()
