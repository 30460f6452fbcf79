"""A programmable webhook receiver (a real aiohttp server on 127.0.0.1) for delivery tests.

It can be down (its port closed), answer scripted statuses and headers, or be slow; what it
accepts it verifies with the reference Standard Webhooks library, as a real receiver would.
"""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from standardwebhooks import Webhook

from tests.conftest import free_tcp_port


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


@dataclass
class Attempt:
    webhook_id: str
    at: float
    status: int


@dataclass
class Hook:
    secret: str | None = None
    status: int = 204
    #: Answers used (in order) before ``status``: a status and extra response headers.
    script: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    delay_s: float = 0.0
    #: Per-request delays used (in order) before ``delay_s``.
    delays: list[float] = field(default_factory=list)
    port: int = field(default_factory=free_tcp_port)
    accepted: list[dict[str, Any]] = field(default_factory=list)
    attempts: list[Attempt] = field(default_factory=list)
    bad_signatures: int = 0
    #: Requests being handled now, and the most at once.
    in_flight: int = 0
    most_in_flight: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hooks", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        """Down: the port refuses connections until ``start`` again."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        delay = self.delays.pop(0) if self.delays else self.delay_s
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if delay:
                await asyncio.sleep(delay)
        finally:
            self.in_flight -= 1
        status, headers = self.script.pop(0) if self.script else (self.status, {})
        loop = asyncio.get_running_loop()
        self.attempts.append(Attempt(request.headers["webhook-id"], loop.time(), status))
        if 200 <= status < 300:
            try:
                self.accepted.append(self._verify(body, dict(request.headers)))
            except Exception:
                self.bad_signatures += 1
                status = 400
        self.changed.set()
        return web.Response(status=status, headers=headers)

    def _verify(self, body: bytes, headers: dict[str, str]) -> dict[str, Any]:
        if self.secret is None:
            import json

            event: dict[str, Any] = json.loads(body)
        else:
            event = Webhook(self.secret).verify(body, headers)
        assert headers["webhook-id"] == event["id"]
        return event

    def unique(self) -> list[dict[str, Any]]:
        """Accepted events deduplicated on ``webhook-id``, first arrival kept (as receivers do)."""
        seen: dict[str, dict[str, Any]] = {}
        for e in self.accepted:
            seen.setdefault(e["id"], e)
        return list(seen.values())

    async def until(self, done: Callable[[], bool], timeout_s: float = 30) -> None:
        async with asyncio.timeout(timeout_s):
            while not done():
                self.changed.clear()
                await self.changed.wait()


async def until(done: Callable[[], bool], timeout_s: float = 30) -> None:
    """Until ``done()``: a poll, for conditions that other threads and processes change."""
    async with asyncio.timeout(timeout_s):
        while not done():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


def by_call(events: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    calls: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        calls.setdefault(e["call_id"], []).append(e)
    return calls


def metric(scraped: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus text page; ``KeyError`` when it is missing, so
    an assertion on it fails instead of passing on an absent metric."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(scraped):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    raise KeyError(f"no sample {name}{labels} in /metrics")
