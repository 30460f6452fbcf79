"""Talk back on the media-stream websockets: the ``MediaEndpoint`` of each dialect.

The wire formats are built in ``stream_out``; the writes go through a ``WebSocketSender`` (its
own task, bounded), so ``send`` and ``clear`` never wait on the socket (``voxphone.playback``).
None of these streams can carry DTMF to the caller (Twilio and Telnyx send digits by REST,
Vonage by NCCO), so ``can_send_dtmf`` is False and the API answers 409.

Hang-up (``DELETE /v1/calls/{id}``, shutdown, ``max_duration``) ends the call with the reason
given and closes the socket normally (1000): Twilio then moves on to the TwiML after
``<Connect>`` (none: the call ends), Telnyx stops the stream, Vonage ends the websocket leg;
jambonz is first told ``disconnect`` (ends the ``listen``).
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from voxphone.audio.codecs import Pcm
from voxphone.call import Call
from voxphone.transports.stream_out import JsonStreamOut, RawStreamOut
from voxphone.transports.ws_sender import WebSocketEndpoint, WebSocketSender, sender_for


class JsonStreamEndpoint(WebSocketEndpoint):
    """Twilio and Telnyx: ``media`` frames out, ``clear`` on clear, ``mark`` on request."""

    def __init__(
        self, call: Call, sender: WebSocketSender, end: Callable[[str], None], out: JsonStreamOut
    ) -> None:
        super().__init__(call, sender, end, out.codec.sample_rate)
        self._out = out

    def send(self, pcm: Pcm, first: bool) -> None:
        self._sender.audio(self._out.media(pcm))

    def clear(self) -> None:
        self._sender.drop_audio()
        self._sender.control(self._out.clear())

    def mark(self, name: str) -> None:
        """Ask the provider to echo ``name`` once the audio sent so far has played (its echo is
        acknowledged; ``playback.mark`` is published as this is sent)."""
        self._sender.control(self._out.mark(name))


class RawStreamEndpoint(WebSocketEndpoint):
    """Vonage, jambonz, FreeSWITCH and generic L16 streams: BINARY frames out."""

    def __init__(
        self,
        call: Call,
        sender: WebSocketSender,
        end: Callable[[str], None],
        out: RawStreamOut,
        rate: int,
    ) -> None:
        super().__init__(call, sender, end, rate)
        self._out = out

    def send(self, pcm: Pcm, first: bool) -> None:
        self._sender.audio(self._out.audio(pcm))

    def clear(self) -> None:
        self._sender.drop_audio()
        message = self._out.clear()
        if message is not None:
            self._sender.control(message)

    def mark(self, name: str) -> None:
        """Vonage only (``notify``); elsewhere there is no way to learn what has played."""
        message = self._out.mark(name)
        if message is not None:
            self._sender.control(message)

    def _goodbye(self) -> str | None:
        return self._out.hangup()


def raw_dialect(vendor: str, ws: web.WebSocketResponse) -> str:
    """``vonage``; ``jambonz`` when the sender asked for its subprotocol; else ``stream``."""
    if vendor == "vonage":
        return "vonage"
    return "jambonz" if ws.ws_protocol == "audio.jambonz.org" else "stream"


def attach_json(
    call: Call, ws: web.WebSocketResponse, vendor: str, end: Callable[[str], None]
) -> WebSocketSender:
    """Give a Twilio/Telnyx call its way back on ``ws``; ``end(reason)`` ends the stream's call
    (playing out what the jitter buffer holds). Returns the sender, to stop with the socket."""
    stream_id = str(call.metadata.get("stream_sid") or call.metadata.get("stream_id") or "")
    sender = sender_for(call, ws)
    out = JsonStreamOut(vendor, call.codec, stream_id)
    call.attach_endpoint(JsonStreamEndpoint(call, sender, end, out))
    return sender


def attach_raw(
    call: Call, ws: web.WebSocketResponse, vendor: str, end: Callable[[str], None]
) -> WebSocketSender:
    """Give a raw-L16 stream's caller-side call its way back on ``ws``; ``end(reason)`` ends
    every call of the stream. Returns the sender, to stop with the socket."""
    sender = sender_for(call, ws)
    out = RawStreamOut(raw_dialect(vendor, ws))
    call.attach_endpoint(RawStreamEndpoint(call, sender, end, out, call.codec.sample_rate))
    return sender
