"""One websocket's outbound messages, written in order from their own task.

A ``MediaEndpoint``'s ``send`` and ``clear`` run on the 20 ms clock and must not wait, but an
aiohttp websocket write is a coroutine (it waits when TCP pushes back). ``WebSocketSender``
queues what the endpoint hands it and writes it from one task. Audio is bounded: beyond
``MAX_QUEUED_AUDIO`` messages (a second of 20 ms frames: the peer or the network is not keeping
up) the oldest is dropped and counted through ``on_drop``; control messages (``clear``, a mark,
a hang-up command) are never dropped. ``drop_audio`` discards audio not yet written, which is
what ``clear`` needs before it tells the far end to drop what *it* holds. ``WebSocketEndpoint``
is what the websocket ``MediaEndpoint``s (``stream_endpoint``, ``asterisk_endpoint``) share.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable

import structlog
from aiohttp import web

from voxphone.call import FAILURE_REASONS, Call
from voxphone.errors import PlaybackError

log = structlog.get_logger(__name__)

#: Audio messages queued before the oldest is dropped: 1 s of 20 ms frames.
MAX_QUEUED_AUDIO = 50
#: How long ``close`` waits for queued messages to be written before closing anyway.
CLOSE_DRAIN_S = 1.0

Message = str | bytes


class WebSocketSender:
    """Writes queued messages to ``ws``; ``on_drop(n)`` is told of audio dropped unsent."""

    def __init__(
        self,
        ws: web.WebSocketResponse,
        on_drop: Callable[[int], None],
        max_audio: int = MAX_QUEUED_AUDIO,
    ) -> None:
        self._ws = ws
        self._on_drop = on_drop
        self._max_audio = max_audio
        self._queue: deque[tuple[bool, Message]] = deque()  # (is audio, message)
        self._audio = 0
        self._ready = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self.sent = 0
        self.closed = False
        self._task = asyncio.create_task(self._run(), name="ws-sender")

    def audio(self, message: Message) -> None:
        """Queue one audio message; the oldest queued audio goes (counted) when full."""
        if self.closed:
            return
        if self._audio >= self._max_audio:
            self._drop_oldest_audio()
        self._put(True, message)

    def control(self, message: Message) -> None:
        """Queue a control message; never dropped."""
        if not self.closed:
            self._put(False, message)

    def drop_audio(self) -> int:
        """Discard the audio not yet written (``clear``); returns how many messages went. Not
        counted as dropped: the call asked for it."""
        n = self._audio
        if n:
            self._queue = deque(item for item in self._queue if not item[0])
            self._audio = 0
        return n

    def _put(self, is_audio: bool, message: Message) -> None:
        self._queue.append((is_audio, message))
        self._audio += is_audio
        self._idle.clear()
        self._ready.set()

    def _drop_oldest_audio(self) -> None:
        for i, (is_audio, _) in enumerate(self._queue):
            if is_audio:
                del self._queue[i]
                self._audio -= 1
                self._on_drop(1)
                return

    async def _run(self) -> None:
        while True:
            while not self._queue:
                self._idle.set()
                self._ready.clear()
                await self._ready.wait()
            is_audio, message = self._queue.popleft()
            self._audio -= is_audio
            try:
                if isinstance(message, bytes):
                    await self._ws.send_bytes(message)
                else:
                    await self._ws.send_str(message)
            except ConnectionError:  # the peer went away: the receive loop ends the call
                self._on_drop(int(is_audio))
                self._stop_writing()
                return
            self.sent += 1

    def _stop_writing(self) -> None:
        self.closed = True
        dropped = self._audio
        self._queue.clear()
        self._audio = 0
        self._on_drop(dropped)
        self._idle.set()

    async def close(self, code: int = 1000, message: bytes = b"") -> None:
        """Write what is queued (for up to ``CLOSE_DRAIN_S``), then close the websocket."""
        self.closed = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), CLOSE_DRAIN_S)
        self.stop()
        await self._ws.close(code=code, message=message)

    def stop(self) -> None:
        """Stop writing (the socket is gone); what is still queued is dropped, counted."""
        self._task.cancel()
        if self._queue:
            self._stop_writing()
        self.closed = True


def sender_for(call: Call, ws: web.WebSocketResponse) -> WebSocketSender:
    """A sender on ``ws`` that counts audio it must drop on ``call`` (``outbound_backlog``)."""
    return WebSocketSender(ws, lambda n: call.count_dropped("outbound_backlog", n))


class WebSocketEndpoint:
    """What every websocket ``MediaEndpoint`` shares (media streams, chan_websocket): writes
    through a ``WebSocketSender``, no DTMF, and a hang-up that ends the call, sends the
    dialect's last word (``_goodbye``) and closes the socket (1000) once what is queued is out.
    A call that ends by itself (its engine failed) closes the socket too: ``_finished``.
    Subclasses give ``send`` and ``clear``."""

    can_send_dtmf = False

    def __init__(
        self, call: Call, sender: WebSocketSender, end: Callable[[str], None], rate: int
    ) -> None:
        self._call = call
        self._sender = sender
        self._end = end
        self._rate = rate
        self._closing: asyncio.Task[None] | None = None  # held: the loop keeps weak references
        call.on_finish(self._finished)

    @property
    def sample_rate(self) -> int:
        return self._rate

    async def send_dtmf(self, digit: str, duration_ms: int) -> None:
        raise PlaybackError(f"{self._call.transport} streams cannot send DTMF to the caller")

    def mark(self, name: str) -> None:
        """No message for it in this dialect: ``playback.mark`` says it all."""

    def _goodbye(self) -> str | None:
        """A last control message before the close (jambonz ``disconnect``, Asterisk
        ``HANGUP``); None for dialects that end with the close alone."""
        return None

    def hangup(self, reason: str) -> None:
        """End the call with ``reason``, then say goodbye and close the socket."""
        self._end(reason)  # its playout clears first (the dialect's clear goes out first)
        if self._sender.closed:
            return
        goodbye = self._goodbye()
        if goodbye is not None:
            self._sender.control(goodbye)
        self._closing = asyncio.create_task(self._sender.close())

    def _finished(self) -> None:
        """The call ended and neither side hung up (its engine failed, a bug): close the socket,
        1011 (RFC 6455 §7.4.1, an unexpected condition) for voxphone's own failure, else 1000,
        with the reason, and no goodbye: the stream is over, the phone call is the provider's.
        Without it the provider streams on into a call that takes nothing more (Twilio moves to
        the next TwiML verb once the socket closes). After a hang-up or the provider's close:
        nothing."""
        if self._closing is not None or self._sender.closed:
            return
        reason = self._call.end_reason or "ended"
        code = 1011 if reason in FAILURE_REASONS else 1000
        message = f"call ended: {reason}".encode()[:123]
        self._closing = asyncio.create_task(self._sender.close(code, message))
