"""NATS JetStream: the fleet sink, one shared durable stream for many voxphone processes.

Each event is published to ``<subject_prefix>.<type>`` with ``Nats-Msg-Id`` = the event id, so
JetStream drops the duplicates that retries make (within the stream's duplicate window), and
``Voxphone-Call-Id`` / ``Voxphone-Seq`` (and, on deltas, ``Voxphone-Delta-Seq``) headers for
consumers that filter without parsing. An
event counts as delivered only once JetStream acknowledged it; until then the outbox keeps it
pending (the durable cursor), so a NATS outage or our own restart loses nothing.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import nats
import nats.errors
import structlog
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig
from nats.js.errors import NotFoundError

from voxphone.events.delivery import Result, Retry, Sent
from voxphone.events.outbox import Stored

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class NatsSettings:
    """Where events are published: the ``[nats]`` table without its delivery policy.

    ``url``: one or more ``nats://`` or ``tls://`` servers, comma-separated. Events go to
    ``<subject_prefix>.<type>`` and are stored by the JetStream stream ``stream``, which is
    created (file storage, the prefix's subjects) when missing if ``create_stream``.
    ``ack_timeout_s`` bounds making the connection (the stream's check included) and each
    publish acknowledgement (seconds).
    """

    url: str
    stream: str
    subject_prefix: str
    create_stream: bool
    ack_timeout_s: float


class NatsTransport:
    """Publishes to JetStream over one connection, made (and the stream created) on first use.

    Delivery sends for many calls at once (``ordered`` mode: a lane per call), so the first
    events of a busy start all find no connection: one of them makes it while the others wait
    for it (``_connecting``). Each connecting on its own left all but one client unclosed, each
    reconnecting every 0.5 s for ever (``max_reconnect_attempts=-1``) once its server went away,
    which also kept the event loop from closing.

    Making the connection is bounded by ``ack_timeout_s``: with reconnection unlimited, nats-py
    retries a first connect for as long as the server is down, so a start while NATS is down
    held every call's events (and ``close``) on it without a retry counted; now the send is
    retried with the destination's backoff, as a publish that times out is. A transport that
    was closed stays closed: a send after it is retried, not given a new connection."""

    def __init__(self, settings: NatsSettings) -> None:
        self._settings = settings
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._connecting = asyncio.Lock()
        self._closed = False
        self._log = _ConnectionLog()

    def subject(self, type_: str) -> str:
        return f"{self._settings.subject_prefix}.{type_}"

    async def send(self, stored: Stored) -> Result:
        ev = stored.event
        headers = {
            "Nats-Msg-Id": ev.id,
            "Voxphone-Call-Id": ev.call_id,
            "Voxphone-Seq": str(ev.seq),
        }
        if ev.delta_seq is not None:
            headers["Voxphone-Delta-Seq"] = str(ev.delta_seq)
        try:
            js = await self._jetstream()
            await js.publish(
                self.subject(ev.type), stored.body, timeout=self._settings.ack_timeout_s,
                stream=self._settings.stream, headers=headers,
            )  # fmt: skip
        except (nats.errors.Error, TimeoutError, OSError) as exc:
            return Retry(f"{type(exc).__name__}: {exc}".rstrip(": ") or type(exc).__name__)
        return Sent()

    async def _jetstream(self) -> JetStreamContext:
        js = self._js
        if js is None:
            async with self._connecting:
                if self._closed:
                    raise nats.errors.ConnectionClosedError
                if self._js is None:  # (not made while this one waited)
                    self._nc, self._js = await self._connect()
                js = self._js
        return js

    async def _connect(self) -> tuple[Client, JetStreamContext]:
        """A connected client and its JetStream context, within ``ack_timeout_s``; raises
        ``TimeoutError`` (or nats-py's errors) with the client closed. nats-py retries failed
        attempts within the connect, so a connection not made in time names this connect's
        last error (a refused connection, an untrusted certificate): that is what
        ``endpoint_failing`` and the delivery's ``last_error`` then say, not a bare
        ``TimeoutError``. A timeout once connected (the stream's check) is raised as it is."""
        nc, timeout_s = Client(), self._settings.ack_timeout_s
        # (seconds as floats, which nats-py takes though it annotates the two as int)
        waits: dict[str, Any] = {"reconnect_time_wait": 0.5, "connect_timeout": timeout_s}
        connected = False
        self._log.attempting()
        try:
            async with asyncio.timeout(timeout_s):
                await nc.connect(
                    servers=[u.strip() for u in self._settings.url.split(",")],
                    max_reconnect_attempts=-1, allow_reconnect=True,
                    error_cb=self._log.error, disconnected_cb=self._log.disconnected,
                    reconnected_cb=self._log.reconnected, **waits,
                )  # fmt: skip
                connected = True
                self._log.connected()
                js = nc.jetstream(timeout=timeout_s)
                if self._settings.create_stream:
                    await self._ensure_stream(js)
        except BaseException as exc:
            self._log.closing()
            await nc.close()
            if isinstance(exc, TimeoutError) and not connected:
                raise TimeoutError(self._log.not_connected(timeout_s)) from None
            raise
        return nc, js

    async def _ensure_stream(self, js: JetStreamContext) -> None:
        name = self._settings.stream
        try:
            await js.stream_info(name)
        except NotFoundError:
            subjects = [f"{self._settings.subject_prefix}.>"]
            await js.add_stream(
                StreamConfig(name=name, subjects=subjects, storage=StorageType.FILE)
            )
            log.info("nats_stream_created", stream=name, subjects=subjects)

    async def close(self) -> None:
        """Close the connection. A connection being made is waited for (at most
        ``ack_timeout_s``), so none is left open behind the close."""
        self._closed = True
        async with self._connecting:
            if self._nc is not None:
                self._log.closing()
                await self._nc.close()
            self._nc = self._js = None


class _ConnectionLog:
    """nats-py's connection callbacks as log lines an operator can read. nats-py calls
    ``error_cb`` at every failed attempt, every 0.5 s while the server is away: only the first
    of an outage is logged (``nats_error``), and ``nats_reconnected`` says how many failed in
    all once the connection is back. Neither a client that never connected nor our own close
    logs ``nats_disconnected``. Errors while connected (a permission refused, a slow consumer)
    are each logged."""

    def __init__(self) -> None:
        self._up = False
        self._closing = False  # we close the client: what it reports now is no outage
        self._failed = 0  # attempts failed since the connection was last up
        self._last_error: str | None = None  # this connect's last (``type: message``)

    def attempting(self) -> None:
        """``_connect`` starts with a new client: its errors are its own."""
        self._closing, self._last_error = False, None

    def not_connected(self, timeout_s: float) -> str:
        """Why a connect did not finish within ``timeout_s``."""
        why = f"no connection within {timeout_s:g} s"
        return why if self._last_error is None else f"{why}; the last error: {self._last_error}"

    def connected(self, again: bool = False) -> None:
        """The connection is up: ``again`` after a disconnect (nats-py's ``reconnected_cb``),
        or made by ``_connect``, after failed attempts if the server was away."""
        if again or self._failed:
            log.info("nats_reconnected", failed_attempts=self._failed)
        self._up, self._failed = True, 0

    def closing(self) -> None:
        """We close the client: its end is no outage, its errors on the way no failed attempt."""
        self._up, self._closing = False, True

    async def error(self, exc: Exception) -> None:
        error = f"{type(exc).__name__}: {exc}"
        if self._closing:
            log.debug("nats_error_while_closing", error=error)
            return
        if not self._up:
            self._failed += 1
            self._last_error = error
            if self._failed > 1:
                return
        log.warning(
            "nats_error", error=error,
            retrying=None if self._up else "every 0.5 s; nats_reconnected says when it is back",
        )  # fmt: skip

    async def disconnected(self) -> None:
        if self._up:
            self._up = False
            log.warning("nats_disconnected")

    async def reconnected(self) -> None:
        self.connected(again=True)
