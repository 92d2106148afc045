"""A real `metering serve` on a free port, against the test database and topics."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from metering.config import Settings
from metering.storage.keys import KeyStore
from tests.conftest import ROOT, free_port, settings_env


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log: Path


@pytest.fixture
def server(settings: Settings, tmp_path: Path) -> Iterator[Server]:
    port = free_port()
    log = tmp_path / "serve.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "metering", "serve", "--port", str(port)],
        env=settings_env(settings),
        cwd=ROOT,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=1):
                break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"serve did not start:\n{log.read_text()}") from None
            time.sleep(0.1)
    yield Server(url, process, log)
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture
async def make_key(migrated_database: str):  # type: ignore[no-untyped-def]
    pool = await asyncpg.create_pool(migrated_database, min_size=1, max_size=2)
    store = KeyStore(pool)

    async def make(*scopes: str, org: object = None) -> str:
        key, _ = await store.create(list(scopes), org)  # type: ignore[arg-type]
        return key

    make.store = store  # type: ignore[attr-defined]
    yield make
    await pool.close()
