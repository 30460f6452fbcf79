"""Talk back to Asterisk: the ``MediaEndpoint`` of an AudioSocket call and of a chan_websocket
call. The bytes they send are built in ``asterisk_out`` (see there for the sources).

AudioSocket has no buffer on Asterisk's side worth clearing: the app owns the timing and voxphone
sends each 20 ms frame as its clock ticks, so ``clear`` has nothing to drop (the call's queue is
already empty). chan_websocket re-times what it is sent, so ``clear`` sends ``FLUSH_MEDIA`` for
whatever Asterisk still queues. Neither protocol takes DTMF from the app.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import web

from voxphone.audio.codecs import Encoder, Pcm
from voxphone.call import Call
from voxphone.errors import PlaybackError
from voxphone.transports.asterisk_out import (
    audiosocket_audio,
    audiosocket_hangup,
    ws_command,
)
from voxphone.transports.ws_sender import WebSocketEndpoint, WebSocketSender, sender_for

#: Audio AudioSocket may have waiting in the TCP send buffer before frames are dropped, in
#: seconds (Asterisk, or the network to it, is not reading).
MAX_AUDIOSOCKET_BACKLOG_S = 1.0
#: How long voxphone waits, after ending its side of an AudioSocket connection (a hang-up
#: frame, or the call's own end), for Asterisk to close it.
LINGER_S = 1.0


class AudioSocketEndpoint:
    """20 ms slin frames of the call's own type (``0x10`` for 8 kHz) back on the TCP stream;
    hang-up sends ``0x00`` and half-closes it. A call that ends by itself (its engine failed)
    closes the connection: ``_finished``."""

    can_send_dtmf = False

    def __init__(
        self, call: Call, writer: asyncio.StreamWriter, end: Callable[[str], None]
    ) -> None:
        self._call = call
        self._writer = writer
        self._end = end
        self._rate = call.codec.sample_rate
        self._max_backlog = int(2 * self._rate * MAX_AUDIOSOCKET_BACKLOG_S)  # slin: 2 bytes
        self._hung_up = False
        call.on_finish(self._finished)

    @property
    def sample_rate(self) -> int:
        return self._rate

    def send(self, pcm: Pcm, first: bool) -> None:
        if self._writer.is_closing():
            return
        if self._writer.transport.get_write_buffer_size() > self._max_backlog:
            self._call.count_dropped("outbound_backlog")
            return
        self._writer.write(audiosocket_audio(pcm, self._rate))

    def mark(self, name: str) -> None:
        """No message for it on this transport: ``playback.mark`` says it all."""

    def clear(self) -> None:
        """Nothing is buffered past the TCP socket: the call's queue was the only one."""

    async def send_dtmf(self, digit: str, duration_ms: int) -> None:
        raise PlaybackError("AudioSocket cannot send DTMF to the caller")

    def hangup(self, reason: str) -> None:
        """End the call with ``reason`` and send the hang-up frame (then our end of the
        stream); Asterisk hangs the channel up and closes the connection."""
        self._hung_up = True
        self._end(reason)
        if not self._writer.is_closing():
            self._writer.write(audiosocket_hangup())
            if self._writer.can_write_eof():
                self._writer.write_eof()

    def _finished(self) -> None:
        """The call ended and neither side hung up (its engine failed, a bug): end our side of
        the stream (a FIN, no hang-up frame), so Asterisk's ``AudioSocket()`` application
        returns and closes the connection, and stops sending audio no call takes; closed here
        after ``LINGER_S`` if it has not. Not closed at once: Asterisk's frames keep arriving
        every 20 ms, and closing a socket with unread data sends a TCP reset instead. After
        voxphone's hang-up nothing: that path waits for Asterisk's close itself."""
        if self._hung_up or self._writer.is_closing():
            return
        if self._writer.can_write_eof():
            self._writer.write_eof()
        asyncio.get_running_loop().call_later(LINGER_S, self._writer.close)


class ChanWebsocketEndpoint(WebSocketEndpoint):
    """Media in the channel's format as BINARY frames; ``FLUSH_MEDIA`` on clear; ``HANGUP``
    then close on hang-up. Commands use the channel's control format (plain or JSON), which is
    known once ``MEDIA_START`` has come (``json_style`` is asked each time)."""

    def __init__(
        self,
        call: Call,
        sender: WebSocketSender,
        end: Callable[[str], None],
        json_style: Callable[[], bool],
    ) -> None:
        super().__init__(call, sender, end, call.codec.sample_rate)
        self._json = json_style
        codec = call.codec
        self._encoder = None if codec.ffmpeg_name == "pcm_s16le" else Encoder(codec)
        #: Opus runs in passthrough mode: Asterisk neither buffers nor flushes.
        self._passthrough = codec.ffmpeg_name == "opus"

    def send(self, pcm: Pcm, first: bool) -> None:
        if self._encoder is None:
            self._sender.audio(pcm.astype("<i2", copy=False).tobytes())
        else:
            self._sender.audio(self._encoder.encode(pcm))

    def clear(self) -> None:
        self._sender.drop_audio()
        if not self._passthrough:
            self._sender.control(ws_command("FLUSH_MEDIA", self._json()))

    def _goodbye(self) -> str:
        """``HANGUP`` hangs the channel up (Asterisk then closes the socket too)."""
        return ws_command("HANGUP", self._json())


def attach_chan_websocket(
    call: Call,
    ws: web.WebSocketResponse,
    end: Callable[[str], None],
    json_style: Callable[[], bool],
) -> WebSocketSender:
    """Give a chan_websocket call its way back on ``ws``; returns the sender to stop."""
    sender = sender_for(call, ws)
    call.attach_endpoint(ChanWebsocketEndpoint(call, sender, end, json_style))
    return sender
