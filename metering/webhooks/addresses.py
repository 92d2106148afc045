"""Where webhooks may be sent (contract section 9): only `https`, and never to a private,
loopback, link-local or otherwise non-public address, unless the operator allows it
(`METERING_WEBHOOK_ALLOW_PRIVATE=true`, which also allows `http`). A URL is checked when
the endpoint is created, and every address its host resolves to is checked again before
each delivery, whose connection then goes to the address that was checked (a DNS answer
that changes between check and connect cannot redirect it)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from metering.errors import MeteringError


class UnsafeWebhookUrl(MeteringError):
    """A webhook URL that is not allowed: `reason` says which rule it breaks. Use a public
    https URL (or, for tests on one machine, set METERING_WEBHOOK_ALLOW_PRIVATE=true)."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"{url}: {reason}")
        self.url = url
        self.reason = reason


@dataclass(frozen=True)
class Target:
    """A checked URL: its host (for the Host header and TLS) and the address to connect to."""

    url: str
    scheme: str
    host: str
    port: int
    address: str


def check_url(url: str, *, allow_private: bool) -> tuple[str, str, int]:
    """(scheme, host, port) of an acceptable URL; raises UnsafeWebhookUrl otherwise. An IP
    literal host is checked here; a name is checked when it is resolved (`resolve`)."""
    if len(url) > 2048:
        raise UnsafeWebhookUrl(url[:60] + "...", "longer than 2,048 characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise UnsafeWebhookUrl(url, f"not a URL ({error})") from None
    schemes = {"https", "http"} if allow_private else {"https"}
    if parts.scheme not in schemes:
        raise UnsafeWebhookUrl(url, "only https URLs are allowed")
    if not parts.hostname:
        raise UnsafeWebhookUrl(url, "no host")
    if parts.username or parts.password:
        raise UnsafeWebhookUrl(url, "credentials in the URL are not allowed")
    host = parts.hostname
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None and not allow_private and not _public(literal):
        raise UnsafeWebhookUrl(url, f"{host} is not a public address")
    if not allow_private and host.rstrip(".").lower() in {"localhost", "localhost.localdomain"}:
        raise UnsafeWebhookUrl(url, "localhost is not a public address")
    return parts.scheme, host, port or (443 if parts.scheme == "https" else 80)


def _public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return _public(address.ipv4_mapped)
    return address.is_global and not address.is_multicast


async def resolve(url: str, *, allow_private: bool) -> Target:
    """Check `url` and resolve its host; every address it resolves to must be public (one
    private answer refuses the URL). Raises UnsafeWebhookUrl, or OSError when the name does
    not resolve."""
    scheme, host, port = check_url(url, allow_private=allow_private)
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    addresses = [str(info[4][0]) for info in infos]
    if not addresses:
        raise OSError(f"{host} resolves to no address")
    if not allow_private:
        for found in addresses:
            if not _public(ipaddress.ip_address(found)):
                raise UnsafeWebhookUrl(url, f"{host} resolves to {found}, not a public address")
    return Target(url, scheme, host, port, addresses[0])
