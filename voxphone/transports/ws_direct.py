"""A websocket whose data messages can be handled as aiohttp parses them, without a task wake-up.

aiohttp hands every websocket message to the handler through a queue: its frame reader puts the
message there from the connection's ``data_received``, resolves the handler's future, and the
loop's next iteration resumes the handler's task through ``async for`` and ``receive``, up the
whole chain of middleware coroutines. For a media stream that is 50 messages a second per call,
each a few µs of work, and the wake-up cost as much as the work: taking it away saved 24–30 %
of a Twilio call's server CPU (``benchmarks/load.py --transport twilio``, 500 calls on one
core) and an event-loop iteration of latency per message.

``DirectWebSocketResponse.take`` lets a handler take messages of one kind (TEXT or BINARY) in
that ``data_received``, as the frame reader completes them: a synchronous function that returns
True once it has handled the message, or False, having changed nothing, to leave it to
``receive`` as before (the pattern of ``RtpSource.receive_plain``). It takes a message only
while nothing is queued ahead of it and aiohttp has not paused reading, so messages keep their
order. Control frames, closing and errors always go through ``receive``, which answers pings
and ends the ``async for``. An exception from the function is logged with its traceback and
ends the websocket as a malformed frame does: ``receive`` gives the handler an ERROR message
carrying it.

This replaces aiohttp's queue, which aiohttp does not offer as a public interface, so it is done
only for the aiohttp releases it was written against (``DIRECT_READING``: 3.14, where
``WebSocketResponse._post_start`` and the frame reader's queue are as below); with any other
release nothing private of aiohttp's is imported, ``take`` returns False and every message goes
through ``receive`` as with a plain ``WebSocketResponse``. Closing stops taking: ``close``
waits for the peer's close frame, and what comes meanwhile must not reach a call that is ending.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiohttp
import structlog
from aiohttp import WSMsgType, web

log = structlog.get_logger(__name__)

#: The aiohttp releases (major, minor) whose ``WebSocketResponse._post_start`` this module's
#: copy follows.
SUPPORTED = ((3, 14),)
#: Whether the installed aiohttp is one of them: ``take`` works only then, and aiohttp's
#: private modules are imported only then.
DIRECT_READING = tuple(int(n) for n in aiohttp.__version__.split(".")[:2]) in SUPPORTED

if DIRECT_READING:
    from aiohttp._websocket.reader import WebSocketDataQueue, WebSocketReader
    from aiohttp.helpers import DEFAULT_CHUNK_SIZE

    class _TakingQueue(WebSocketDataQueue):
        """aiohttp's message queue, which offers each message of ``kind`` to ``taker`` first.

        A message is offered only while nothing waits in the queue and the connection's
        reading is not paused: aiohttp pauses it when the queue is full and then parses the
        frames it held back from inside the handler's ``read``, before the handler has dealt
        with the message that read returns, so those must be queued behind it too."""

        kind: WSMsgType = WSMsgType.TEXT
        taker: Callable[[Any], bool] | None = None

        # The signature is aiohttp's (``cpdef void feed_data(self, object data, unsigned int
        # size)`` in its compiled reader, which calls this override).
        def feed_data(self, data: Any, size: int) -> None:
            taker = self.taker
            if (
                taker is not None
                and data[0] is self.kind
                and not self._buffer
                and not self._protocol._reading_paused
            ):
                try:
                    if taker(data[1]):
                        return
                except Exception:
                    # A taker never raises; if one does, say where, and let aiohttp end this
                    # websocket as it ends one whose frame it cannot parse (``receive`` gives the
                    # handler an ERROR message with this exception).
                    log.exception(
                        "websocket_message_failed", taker=getattr(taker, "__qualname__", "")
                    )
                    raise
            super().feed_data(data, size)


class DirectWebSocketResponse(web.WebSocketResponse):
    """``web.WebSocketResponse`` with ``take`` (see the module's docstring)."""

    def take(self, kind: WSMsgType, taker: Callable[[Any], bool] | None) -> bool:
        """From now on, offer each ``kind`` message (TEXT: ``str``, BINARY: ``bytes``) to
        ``taker`` as it is parsed; ``None`` stops. Call after ``prepare``. Returns False, and
        changes nothing, where this aiohttp release does not allow it (``DIRECT_READING``)."""
        reader = self._reader
        if not DIRECT_READING or not isinstance(reader, _TakingQueue):
            return False
        reader.kind, reader.taker = kind, taker
        return True

    async def close(
        self, *, code: int = aiohttp.WSCloseCode.OK, message: bytes = b"", drain: bool = True
    ) -> bool:
        """``WebSocketResponse.close``, having stopped taking first: whoever closes (a handler
        refusing a frame, ``receive`` answering the peer's close, aiohttp after the handler
        returns), what is read while the close waits goes to ``receive``, which discards it."""
        if DIRECT_READING and isinstance(self._reader, _TakingQueue):
            self._reader.taker = None
        return await super().close(code=code, message=message, drain=drain)

    def _post_start(self, request: Any, protocol: str | None, writer: Any) -> None:
        """aiohttp 3.14's ``_post_start`` with ``_TakingQueue`` for its queue."""
        if not DIRECT_READING:
            super()._post_start(request, protocol, writer)
            return
        self._ws_protocol = protocol
        self._writer = writer
        self._reset_heartbeat()
        loop = self._loop
        assert loop is not None
        self._reader = _TakingQueue(request._protocol, DEFAULT_CHUNK_SIZE, loop=loop)
        # Held here, as aiohttp holds it: a reader stalled on a full queue is parked there by
        # weak reference.
        self._parser = WebSocketReader(
            self._reader,
            self._max_msg_size,
            compress=bool(self._compress),
            decode_text=self._decode_text,
        )
        cb = None if self._heartbeat is None else self._on_data_received
        request.protocol.set_parser(self._parser, data_received_cb=cb)
        request.protocol.keep_alive(False)  # no HTTP keep-alive after a websocket
