"""Guarding the URLs voxphone is told to call: a per-call ``webhook_url`` comes from whoever can
reach the calls API, and a server-side request to it must not reach voxphone's own network.

Only ``http``/``https``; an address that is not globally routable (loopback, link-local such as
the cloud metadata service at 169.254.169.254, private, unspecified, multicast, reserved) is
refused unless ``webhook.allowed_hosts`` names the host or a network holding the address. The
check runs twice: when the call is created (``check_url``: a 400 names the address) and at every
connection (``GuardedResolver``), because a name's DNS answer can change in between (rebinding).
Operator-configured endpoints (``[webhook]``, ``[[webhooks]]``) are trusted and not guarded.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
from collections.abc import Sequence
from urllib.parse import urlsplit

from aiohttp import ThreadedResolver
from aiohttp.abc import AbstractResolver, ResolveResult

from voxphone.errors import DeliveryError

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class RefusedUrl(DeliveryError):
    """A URL voxphone will not call; the message says why and which key allows it."""


class HostPolicy:
    """Which hosts and addresses server-side requests may reach.

    ``allowed``: host names (``hooks.internal``), addresses (``10.0.0.7``) or networks
    (``10.0.0.0/8``) that are reachable even though not public.
    """

    def __init__(self, allowed: Sequence[str] = ()) -> None:
        self._names = {a.lower().rstrip(".") for a in allowed if _network(a) is None}
        self._nets = [n for a in allowed if (n := _network(a)) is not None]

    def check_address(self, host: str, address: str) -> None:
        """Raise ``RefusedUrl`` unless ``address`` (what ``host`` resolved to) may be reached."""
        if host.lower().rstrip(".") in self._names:
            return
        ip = _unmapped(ipaddress.ip_address(address.split("%")[0]))
        if (kind := _not_public(ip)) is None or any(ip in net for net in self._nets):
            return
        what = f"{ip} is" if host.strip("[]") == str(ip) else f"{host} is {ip},"
        raise RefusedUrl(
            f"{what} a {kind} address: refused for a server-side request; "
            "allow it in webhook.allowed_hosts"
        )

    async def check_url(self, url: str) -> None:
        """The whole check for a URL given through the API: scheme, host, every address."""
        try:
            parts = urlsplit(url)
            port = parts.port or 0  # ``http://a:99999/`` raises here
        except ValueError as exc:  # ``http://[::1``
            raise RefusedUrl(f"{url!r} is not a valid URL: {exc}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise RefusedUrl(f"{url!r}: only http:// and https:// URLs with a host")
        host = parts.hostname
        for address in await _addresses(host, port):
            self.check_address(host, address)


async def _addresses(host: str, port: int) -> list[str]:
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise RefusedUrl(f"{host}: cannot resolve: {exc.strerror or exc}") from None
    return [str(info[4][0]) for info in infos]


class GuardedResolver(AbstractResolver):
    """aiohttp's resolver with the policy applied to every answer (connect-time check)."""

    def __init__(self, policy: HostPolicy, inner: AbstractResolver | None = None) -> None:
        self._policy = policy
        self._inner = inner or ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """The answers the policy allows; ``OSError`` (a failed connection) if none."""
        answers = await self._inner.resolve(host, port, family)
        allowed, why = [], ""
        for answer in answers:
            try:
                self._policy.check_address(host, answer["host"])
                allowed.append(answer)
            except RefusedUrl as exc:
                why = str(exc)
        if not allowed:
            # (errno, strerror): aiohttp puts the strerror in its connection error's message
            raise OSError(errno.EACCES, why or f"{host}: no address")
        return allowed

    async def close(self) -> None:
        await self._inner.close()


def _network(text: str) -> IpNetwork | None:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None


def _unmapped(ip: IpAddress) -> IpAddress:
    """``::ffff:127.0.0.1`` is 127.0.0.1."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _not_public(ip: IpAddress) -> str | None:
    """What kind of non-public address ``ip`` is, or None for a global unicast address."""
    for kind in ("unspecified", "loopback", "link_local", "multicast", "reserved", "private"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    return None if ip.is_global else "non-global"
