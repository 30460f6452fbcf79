"""The event pipeline as the app sees it: publish → outbox → deliverers and the live stream.

Destinations, by name (the outbox keeps delivery state under it):
``default`` (the ``[webhook]`` shorthand), ``call`` (per-call ``webhook_url`` given at
``POST /v1/calls``; such a call's events go there instead of ``default``), each ``[[webhooks]]``
endpoint, and ``nats``.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from voxphone.clock import Clock
from voxphone.events.delivery import Deliverer, DeliveryPolicy, Transport
from voxphone.events.model import Event
from voxphone.events.outbox import Outbox, Stored, compact
from voxphone.events.ssrf import HostPolicy
from voxphone.events.stream import LiveFeed
from voxphone.events.webhook import HttpTransport

if TYPE_CHECKING:  # the NATS client is an optional dependency, imported only when used
    from voxphone.events.nats import NatsSettings

log = structlog.get_logger(__name__)

DEFAULT, CALL, NATS = "default", "call", "nats"


@dataclass(frozen=True)
class Endpoint:
    """One ``[[webhooks]]`` endpoint: where, signed with which ``whsec_`` keys (all of them
    during a rotation; none = unsigned), the request timeout (seconds), how it is delivered."""

    name: str
    url: str
    secrets: tuple[str, ...]
    timeout_s: float
    policy: DeliveryPolicy


@dataclass(frozen=True)
class EventSettings:
    """What the event pipeline needs; the app builds it from the config (``[outbox]``,
    ``[webhook]``, ``[[webhooks]]``, ``[nats]``), where each value is documented.

    The outbox: its SQLite file, ``synchronous`` (``FULL`` or ``NORMAL``), the lock wait
    (ms), the in-memory backlog cap (events) and how long delivered events are kept (hours).
    ``webhook_url`` is the ``default`` shorthand destination; it and per-call URLs are signed
    with ``webhook_secrets`` and time out after ``webhook_timeout_s``; per-call URLs may reach
    non-public addresses only in ``allowed_hosts``. ``nats`` unset = no NATS sink.
    """

    outbox_path: Path
    outbox_synchronous: str
    outbox_busy_timeout_ms: int
    outbox_max_backlog: int
    outbox_retention_h: float
    webhook_url: str | None
    webhook_secrets: tuple[str, ...]
    webhook_timeout_s: float
    allowed_hosts: tuple[str, ...]
    endpoints: tuple[Endpoint, ...]
    nats: NatsSettings | None
    nats_policy: DeliveryPolicy


@dataclass(frozen=True)
class _Dest:
    name: str
    policy: DeliveryPolicy
    transport: Transport
    disable_on_gone: bool = True


class EventService:
    """Owns the outbox, one deliverer per destination, and the live feed."""

    def __init__(self, settings: EventSettings, clock: Clock) -> None:
        self.settings = settings
        self.clock = clock
        s = settings
        self.outbox = Outbox(
            s.outbox_path, clock, self._select, s.outbox_synchronous, s.outbox_busy_timeout_ms,
            s.outbox_max_backlog,
        )  # fmt: skip
        self.deliverers: dict[str, Deliverer] = {}
        self.live = LiveFeed()
        self.outbox.listeners += [self._schedule, self.live]
        self._compactor: asyncio.Task[None] | None = None
        #: What per-call ``webhook_url``s may reach (checked at ``POST /v1/calls`` and at
        #: every connection).
        self.url_policy = HostPolicy(settings.allowed_hosts)

    def _destinations(self) -> list[_Dest]:
        s, clock = self.settings, self.clock
        secrets = s.webhook_secrets
        per_call = HttpTransport(
            self.outbox.routes.get, secrets, clock, s.webhook_timeout_s, guard=self.url_policy
        )
        dests = [_Dest(CALL, DeliveryPolicy(), per_call, disable_on_gone=False)]
        if s.webhook_url:
            shorthand = HttpTransport(_fixed(s.webhook_url), secrets, clock, s.webhook_timeout_s)
            dests.append(_Dest(DEFAULT, DeliveryPolicy(), shorthand))
        for ep in s.endpoints:
            http = HttpTransport(_fixed(ep.url), ep.secrets, clock, ep.timeout_s)
            dests.append(_Dest(ep.name, ep.policy, http))
        if s.nats is not None:
            from voxphone.events.nats import NatsTransport

            dests.append(_Dest(NATS, s.nats_policy, NatsTransport(s.nats)))
        return dests

    def _select(self, event: Event, routed: bool) -> list[str]:
        """Runs in the outbox's writer thread: reads only immutable policy."""
        skip = DEFAULT if routed else CALL
        return [n for n, d in self.deliverers.items() if n != skip and d.wants(event)]

    def _schedule(self, batch: list[tuple[Stored, list[str]]]) -> None:
        for stored, targets in batch:
            for name in targets:
                self.deliverers[name].add(stored)

    def publish(self, event: Event) -> None:
        self.outbox.publish(event)

    def route(self, call_id: str, url: str) -> None:
        self.outbox.route(call_id, url)

    def unroute(self, call_id: str) -> None:
        self.outbox.routes.pop(call_id, None)

    @property
    def problem(self) -> str | None:
        """Why the pipeline is unhealthy (readiness), or None."""
        return self.outbox.error

    async def start(self) -> None:
        """Open the outbox and resume every delivery a previous run left pending."""
        await asyncio.to_thread(self.outbox.open)
        for d in self._destinations():
            self.deliverers[d.name] = Deliverer(
                d.name, d.policy, d.transport, self.outbox, self.clock,
                disable_on_gone=d.disable_on_gone,
            )  # fmt: skip
        await self._resume()
        self.outbox.start()
        self._compactor = asyncio.create_task(self._compact_hourly(), name="outbox-compact")

    async def _resume(self) -> None:
        disabled = await self.outbox.aread("SELECT name, disabled FROM endpoints")
        for name, reason in disabled:
            if name in self.deliverers:
                self.deliverers[name].disable(reason, persist=False)
        backlog = dict(await self.outbox.aread(_PENDING))
        for name, count in backlog.items():
            if name in self.deliverers:
                self.deliverers[name].resume(count)
        if backlog:
            log.info("outbox_resumed", pending=backlog)

    async def compact(self) -> int:
        before = self.clock.now().timestamp() - self.settings.outbox_retention_h * 3600
        gone = await self.outbox.call(lambda db: compact(db, before))
        assert isinstance(gone, int)
        return gone

    async def _compact_hourly(self) -> None:
        while True:
            try:
                log.info("outbox_compacted", events=await self.compact())
            except Exception as exc:
                log.error("outbox_compaction_failed", error=repr(exc))
            await asyncio.sleep(3600)

    async def stop(self, drain_timeout_s: float = 5.0) -> None:
        """Commit what was published, give deliveries ``drain_timeout_s``, close; anything
        undelivered stays in the outbox for the next start, and ``outbox_left_pending`` says
        how much, by endpoint (the next start's ``outbox_resumed`` says it again)."""
        if self._compactor is None:  # start() failed or never ran: only release the outbox
            await self.outbox.close()
            return
        self._compactor.cancel()
        with contextlib.suppress(Exception):  # committing is local: it gets at least 5 s
            await asyncio.wait_for(self.outbox.flush(), max(drain_timeout_s, 5.0))
        await asyncio.gather(*(d.close(drain_timeout_s) for d in self.deliverers.values()))
        try:  # in the writer, after the outcomes the deliveries queued (``outbox.record``)
            left = await asyncio.wait_for(self.outbox.call(_pending), 5.0)
        except (sqlite3.Error, TimeoutError) as exc:  # a report only: close all the same
            log.warning("outbox_pending_unknown", error=repr(exc))
        else:
            if left:
                log.info("outbox_left_pending", pending=left)
        await self.outbox.close()


_PENDING = "SELECT endpoint, count(*) FROM deliveries WHERE status = 'pending' GROUP BY endpoint"


def _pending(db: sqlite3.Connection) -> dict[str, int]:
    """Deliveries still pending, by endpoint."""
    return dict(db.execute(_PENDING).fetchall())


def _fixed(url: str) -> Callable[[str], str | None]:
    return lambda _call_id: url
