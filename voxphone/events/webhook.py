"""Webhook delivery, signed per the Standard Webhooks spec.

First cut: one in-order POST per event from a bounded queue. A failed POST is logged and counted,
never retried, and a full queue drops the event loudly; audio never waits on delivery. The durable
outbox with retries replaces the queue later without changing ``publish``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
from dataclasses import dataclass

import aiohttp
import structlog

from voxphone.clock import Clock
from voxphone.errors import ConfigError
from voxphone.events.model import Event

log = structlog.get_logger(__name__)

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


def signed_headers(key: bytes | None, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """Standard Webhooks request headers for one delivery attempt."""
    headers = {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
    }
    if key is not None:
        headers["webhook-signature"] = sign(key, msg_id, timestamp, body)
    return headers


@dataclass
class WebhookStats:
    delivered: int = 0
    failed: int = 0
    dropped: int = 0


class WebhookSink:
    """POSTs events to one URL in publish order (so in ``seq`` order per call)."""

    def __init__(
        self,
        url: str,
        secret: str | None,
        clock: Clock,
        timeout_s: float = 10.0,
        queue_size: int = 10_000,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.url = url
        self._own_session = session is None
        self._key = decode_secret(secret) if secret else None
        self._clock = clock
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._queue: asyncio.Queue[Event] = asyncio.Queue(queue_size)
        self._session = session
        self._worker: asyncio.Task[None] | None = None
        self.stats = WebhookStats()

    async def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        self._worker = asyncio.create_task(self._run(), name="webhook-sink")

    def publish(self, event: Event) -> None:
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self.stats.dropped += 1
            log.error(
                "webhook_queue_full", event_id=event.id, call_id=event.call_id, type=event.type
            )

    async def close(self, timeout_s: float = 5.0) -> None:
        """Deliver what is queued, up to a deadline, then stop."""
        if self._worker is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._queue.join(), timeout_s)
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        if self._session is not None and self._own_session:
            await self._session.close()

    async def _run(self) -> None:
        while True:
            event = await self._queue.get()
            try:
                await self._deliver(event)
            finally:
                self._queue.task_done()

    async def _deliver(self, event: Event) -> None:
        assert self._session is not None
        body = event.to_json()
        headers = signed_headers(self._key, event.id, int(self._clock.now().timestamp()), body)
        try:
            post = self._session.post(self.url, data=body, headers=headers, timeout=self._timeout)
            async with post as resp:
                ok = 200 <= resp.status < 300
                status: int | str = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            ok, status = False, f"{type(exc).__name__}: {exc}"
        if ok:
            self.stats.delivered += 1
            return
        self.stats.failed += 1
        log.warning(
            "webhook_failed",
            url=self.url,
            status=status,
            event_id=event.id,
            call_id=event.call_id,
            type=event.type,
        )


class WebhookRouter:
    """The event sink for webhooks: each call's events go to its own URL when one was given at
    ``POST /v1/calls`` (``webhook_url``), else to the configured one."""

    def __init__(self, default: WebhookSink | None, secret: str | None, clock: Clock) -> None:
        self.default = default
        self._secret = secret
        self._clock = clock
        self._per_call: dict[str, WebhookSink] = {}
        self._http: aiohttp.ClientSession | None = None
        self._closing: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._http = aiohttp.ClientSession()
        if self.default is not None:
            await self.default.start()

    async def route(self, call_id: str, url: str) -> None:
        """Send ``call_id``'s events to ``url`` instead (before the call starts)."""
        sink = WebhookSink(url, self._secret, self._clock, session=self._http)
        await sink.start()
        self._per_call[call_id] = sink

    async def unroute(self, call_id: str) -> None:
        sink = self._per_call.pop(call_id, None)
        if sink is not None:
            await sink.close()

    def publish(self, event: Event) -> None:
        sink = self._per_call.get(event.call_id, self.default)
        if sink is not None:
            sink.publish(event)
        if event.type == "call.ended" and event.call_id in self._per_call:
            task = asyncio.create_task(self._per_call.pop(event.call_id).close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        for sink in list(self._per_call.values()):
            await sink.close()
        if self._closing:
            await asyncio.wait(self._closing)
        if self.default is not None:
            await self.default.close()
        if self._http is not None:
            await self._http.close()
