"""Serving the API with limits a public endpoint needs: uvicorn, plus timeouts and sizes.

uvicorn (0.55, httptools) closes a connection idle *between* requests after
`timeout_keep_alive`, but waits forever for a request's headers and body and reads headers of
any size: 1,100 slow connections were held 30 s, ~20,000 idle ones exhausted the process's
descriptors, and a 186 MB header was read and answered after 42 s of CPU. `GuardedProtocol`
adds, per connection:

- a request's line and headers must arrive within `HEADER_TIMEOUT_SECONDS` of connecting (or
  of the previous response): else 408 and the connection is closed;
- its body within `BODY_TIMEOUT_SECONDS` of the headers: else 408, closed;
- idle between requests at most `KEEP_ALIVE_SECONDS` (uvicorn's keep-alive): closed;
- request line and headers at most `MAX_HEADER_BYTES`: else 431, closed;
- any request's body at most `MAX_BODY_BYTES`: else 413, closed;
- at most `MAX_CONNECTIONS` open connections (more are closed at once) and requests in
  progress (uvicorn's `limit_concurrency`: 503).

Operators who need other values put a reverse proxy in front (which also limits per client);
these bound what one process holds whatever reaches it.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from metering.config import Settings

# Defaults; `configure` sets them from METERING_HTTP_HEADER_TIMEOUT_SECONDS and
# METERING_HTTP_BODY_TIMEOUT_SECONDS.
HEADER_TIMEOUT_SECONDS = 10.0
BODY_TIMEOUT_SECONDS = 30.0
KEEP_ALIVE_SECONDS = 5
MAX_HEADER_BYTES = 64 * 1024
# 1,000 events of at most 16 KiB each, plus the array's punctuation (POST /v1/events).
MAX_BODY_BYTES = 1000 * 16 * 1024 + 64 * 1024
MAX_CONNECTIONS = 4000

log = logging.getLogger("metering.api")

_REASONS = {
    408: b"Request Timeout",
    413: b"Content Too Large",
    431: b"Request Header Fields Too Large",
}


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits of the module docstring."""

    header_timeout = HEADER_TIMEOUT_SECONDS
    body_timeout = BODY_TIMEOUT_SECONDS
    _deadline: asyncio.TimerHandle | None = None
    _header_bytes = 0
    _body_bytes = 0
    _refused = False  # answered and closing: the parser's remaining callbacks are ignored

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > MAX_CONNECTIONS:
            transport.abort()
            return
        self._arm(self.header_timeout, "headers")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._refused:
            super().data_received(data)

    def on_message_begin(self) -> None:
        if self._refused:
            return
        super().on_message_begin()
        self._header_bytes = 0
        self._body_bytes = 0
        if self._deadline is None:  # the next request on a kept-alive connection
            self._arm(self.header_timeout, "headers")

    def on_url(self, url: bytes) -> None:
        if self._header_allowed(len(url)):
            super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._header_allowed(len(name) + len(value) + 4):
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._arm(self.body_timeout, "body")
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if self._refused:
            return
        if self.cycle is not None and self.cycle.response_started:
            # answered already (e.g. 413 from the declared length): uvicorn discards the
            # rest of the body, within the body timeout, and the client reads the answer
            super().on_body(body)
            return
        self._body_bytes += len(body)
        if self._body_bytes > MAX_BODY_BYTES:
            self._answer(413, f"the body limit is {MAX_BODY_BYTES} bytes")
            return
        super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        self._disarm()
        super().on_message_complete()

    def _header_allowed(self, size: int) -> bool:
        if self._refused:
            return False
        self._header_bytes += size
        if self._header_bytes > MAX_HEADER_BYTES:
            self._answer(431, f"the request line and headers exceed {MAX_HEADER_BYTES} bytes")
            return False
        return True

    def _arm(self, seconds: float, what: str) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expired, seconds, what)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self, seconds: float, what: str) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and self.cycle.response_started:
            self.transport.close()
            return
        self._answer(408, f"the request's {what} did not arrive within {seconds:.0f} s")

    def _answer(self, status: int, reason: str) -> None:
        """Answer with `status` and close, unless a response has started already."""
        self._disarm()
        self._refused = True
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True  # the application gets http.disconnect
        if self.transport.is_closing():
            return
        code = {408: "request_timeout", 413: "body_too_large", 431: "headers_too_large"}[status]
        body = b'{"code":"%s","reason":"%s"}' % (code.encode(), reason.encode())
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s"
            % (status, _REASONS[status], len(body), body)
        )
        self.transport.close()


def configure(settings: Settings) -> None:
    """Apply the settings' HTTP timeouts to every connection this process serves."""
    GuardedProtocol.header_timeout = settings.http_header_timeout_seconds
    GuardedProtocol.body_timeout = settings.http_body_timeout_seconds


def raise_descriptor_limit() -> int:
    """Raise this process's open-file limit to its hard limit (Debian's default soft limit
    of 1,024 would run out long before MAX_CONNECTIONS); return the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return int(soft)


def server_options() -> dict[str, Any]:
    """uvicorn.run's keyword arguments for the limits above."""
    return {
        "http": GuardedProtocol,
        "loop": "uvloop",
        "timeout_keep_alive": KEEP_ALIVE_SECONDS,
        "limit_concurrency": MAX_CONNECTIONS,
        "h11_max_incomplete_event_size": MAX_HEADER_BYTES,
    }
