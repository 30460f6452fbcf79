"""Webhooks: Standard Webhooks signing, and the HTTP transport that deliverers retry through.

Success is a 2xx and nothing else; ``410 Gone`` disables the endpoint; every other answer, a
timeout or a refused connection is retried (``Retry-After`` honoured). Redirects are never
followed: a 3xx is a failed attempt whose error names the ``Location``, so signed requests go
to the configured URL and nowhere else (a followed 301 turns the POST into a GET elsewhere,
and its 200 would mark the event delivered). ``webhook-id`` is the event id, so it stays the
same across retries and replays: receivers dedupe on it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
from collections.abc import Callable, Sequence
from datetime import datetime
from urllib.parse import urlsplit

import aiohttp

from voxphone.clock import Clock
from voxphone.errors import ConfigError
from voxphone.events.delivery import Gone, Result, Retry, Sent, parse_retry_after
from voxphone.events.outbox import Stored
from voxphone.events.ssrf import GuardedResolver, HostPolicy, RefusedUrl

SECRET_PREFIX = "whsec_"


def decode_secret(secret: str) -> bytes:
    """Key bytes of a ``whsec_<base64>`` secret (prefix optional, as in the reference code)."""
    raw = secret.removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ConfigError(f"webhook secret is not base64 after {SECRET_PREFIX!r}: {exc}") from exc
    if not key:
        raise ConfigError("webhook secret is empty")
    return key


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``v1,<base64 HMAC-SHA256>`` signature of ``{id}.{timestamp}.{body}``."""
    content = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, content, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signed_headers(
    keys: Sequence[bytes], msg_id: str, timestamp: int, body: bytes
) -> dict[str, str]:
    """Standard Webhooks request headers for one delivery attempt: one ``v1,`` signature per
    key, space-separated, so receivers on the old or the new key both verify during a rotation."""
    headers = {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
    }
    if keys:
        headers["webhook-signature"] = " ".join(sign(k, msg_id, timestamp, body) for k in keys)
    return headers


def classify(
    status: int, retry_after: str | None, now: datetime, location: str | None = None
) -> Result:
    """What one HTTP answer means for the delivery (a 3xx: a failure naming its ``location``)."""
    if 200 <= status < 300:
        return Sent()
    if status == 410:
        return Gone("HTTP 410 Gone")
    error = f"HTTP {status}"
    if 300 <= status < 400:
        error += f" to {location} (not followed)" if location else " (not followed)"
    return Retry(error, parse_retry_after(retry_after, now))


class HttpTransport:
    """POSTs one event per request; ``url_for(call_id)`` picks the URL (per-call routing)."""

    def __init__(
        self,
        url_for: Callable[[str], str | None],
        secrets: Sequence[str],
        clock: Clock,
        timeout_s: float,
        guard: HostPolicy | None = None,
    ) -> None:
        """``guard``: URLs that come from the API (per-call) are checked against it at every
        connection (a refused one is given up on), configured ones are not."""
        self._guard = guard
        self._url_for = url_for
        self._keys = [decode_secret(s) for s in secrets]
        self._clock = clock
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._http: aiohttp.ClientSession | None = None  # made on the loop, on first use

    async def send(self, stored: Stored) -> Result:
        url = self._url_for(stored.event.call_id)
        if url is None:
            return Gone(f"no webhook URL for call {stored.event.call_id}")
        now = self._clock.now()
        headers = signed_headers(self._keys, stored.event.id, int(now.timestamp()), stored.body)
        if self._guard is not None and (refused := self._refused(url)) is not None:
            return Gone(refused)
        try:
            async with self._session.post(
                url, data=stored.body, headers=headers, allow_redirects=False
            ) as resp:
                await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            return Retry(f"{type(exc).__name__}: {exc}".rstrip(": "))
        h = resp.headers
        return classify(resp.status, h.get("retry-after"), now, h.get("location"))

    @property
    def _session(self) -> aiohttp.ClientSession:
        """Made on the loop, on first use; a guard resolves through ``GuardedResolver``."""
        if self._http is None:
            resolver = GuardedResolver(self._guard) if self._guard is not None else None
            # limit=0: the deliverers bound their own concurrency
            connector = aiohttp.TCPConnector(limit=0, resolver=resolver)
            self._http = aiohttp.ClientSession(
                timeout=self._timeout, connector=connector, auto_decompress=False
            )
        return self._http

    def _refused(self, url: str) -> str | None:
        """Why a literal-address URL is refused (aiohttp resolves no literal), or None."""
        assert self._guard is not None
        host = urlsplit(url).hostname or ""
        try:
            ipaddress.ip_address(host)
            self._guard.check_address(host, host)
        except ValueError:
            return None  # a name: the resolver checks what it resolves to
        except RefusedUrl as exc:
            return str(exc)
        return None

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
