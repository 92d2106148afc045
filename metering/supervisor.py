"""`metering run`: every process of the service in one process tree, one log, clean Ctrl-C."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from dataclasses import dataclass

from metering.config import Settings


@dataclass(frozen=True)
class Child:
    name: str
    args: list[str]


def service_children(settings: Settings) -> list[Child]:
    """The long-running processes of the service, each with a metrics port of its own."""
    return [
        Child("consume", ["consume", "--metrics-port", str(settings.metrics_port)]),
        Child("aggregate", ["aggregate", "--metrics-port", str(settings.metrics_port + 1)]),
        Child("serve", ["serve", "--port", str(settings.http_port)]),
        Child(
            "webhooks",
            ["webhooks", "deliver", "--metrics-port", str(settings.metrics_port + 2)],
        ),
    ]


async def _pump(name: str, stream: asyncio.StreamReader) -> None:
    width = 8
    while line := await stream.readline():
        sys.stdout.write(f"{name:<{width}}| {line.decode(errors='replace')}")
        sys.stdout.flush()


async def supervise(children: list[Child], *, after_start: object = None) -> int:
    """Start the children, prefix their output, stop them all on SIGINT/SIGTERM or when one
    exits. Returns the first non-zero exit code (0 after a requested stop)."""
    processes: dict[str, asyncio.subprocess.Process] = {}
    for child in children:
        processes[child.name] = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "metering",
            *child.args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
    pumps = [
        asyncio.create_task(_pump(name, process.stdout))
        for name, process in processes.items()
        if process.stdout is not None
    ]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    waiters = {asyncio.create_task(p.wait()): name for name, p in processes.items()}
    extra = asyncio.create_task(after_start) if asyncio.iscoroutine(after_start) else None
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([*waiters, stopper], return_when=asyncio.FIRST_COMPLETED)
    exit_code = 0
    for task in done:
        if task in waiters and task.result() != 0:
            print(
                f"run: {waiters[task]} exited with {task.result()}; stopping the others",
                file=sys.stderr,
            )
            exit_code = task.result()
    if extra is not None:
        extra.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await extra
    for process in processes.values():
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
    for process in processes.values():
        try:
            await asyncio.wait_for(process.wait(), 30)
        except TimeoutError:
            process.kill()
    await asyncio.gather(*pumps, return_exceptions=True)
    stopper.cancel()
    return exit_code
