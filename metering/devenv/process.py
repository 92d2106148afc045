"""Helpers of the local services: logging, ports, pid files, waiting for readiness."""

from __future__ import annotations

import contextlib
import socket
import sys
import time
from pathlib import Path

import psutil

from metering.errors import DevEnvironmentError


def say(message: str) -> None:
    print(f"dev: {message}", file=sys.stderr, flush=True)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.3)
        return sock.connect_ex((host, port)) == 0


def read_pid(path: Path) -> int | None:
    try:
        pid = int(path.read_text().split("\n", 1)[0].strip())
    except (OSError, ValueError):
        return None
    return pid if psutil.pid_exists(pid) else None


def wait_until(predicate: object, timeout: float, what: str, log_file: Path) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    delay = 0.05
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)
    tail = ""
    with contextlib.suppress(OSError):
        tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-15:])
    raise DevEnvironmentError(f"{what} not ready after {timeout:.0f}s; end of {log_file}:\n{tail}")
