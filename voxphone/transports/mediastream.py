"""Media-stream websockets from CPaaS trunks, sans-I/O parsing plus thin aiohttp handlers.

Twilio Media Streams (``<Connect><Stream>`` / ``<Start><Stream>``): JSON text frames —
``connected``, ``start`` (call ids, ``customParameters``, ``mediaFormat``), ``media`` (base64
µ-law 8 kHz, ~20 ms, numbers as strings), ``dtmf``, ``mark``, ``stop``. Each media frame is
placed on the call's clock by its ``timestamp`` (ms since the stream began) through the same
jitter buffer and timeline as RTP, keyed by ``sequenceNumber``, so duplicates, gaps and
reordering are handled exactly as on a network. Telnyx is the same in snake_case. A media
message of the documented shape takes a fast path (``JsonStreamSession.feed``: msgspec's typed
decode straight to the jitter buffer); everything else is parsed by ``JsonStream``. The raw L16
streams (Vonage, FreeSWITCH, jambonz) are parsed in ``rawstream``; their handler is here.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, NamedTuple

import msgspec
import orjson
import structlog
from aiohttp import WSMessage, WSMsgType, web

from voxphone.audio.codecs import CODECS, G722, OPUS, PCMA, PCMU, Codec
from voxphone.call import Call, new_call_id
from voxphone.errors import TransportError
from voxphone.http.api import REGISTRY
from voxphone.transports.jitter import JitterBuffer
from voxphone.transports.rawstream import (
    SUBPROTOCOLS,
    Opener,
    RawStreamSession,
    RawStreamStart,
    slin,
)
from voxphone.transports.rtp_packet import RtpPacket
from voxphone.transports.stream_endpoint import attach_json, attach_raw
from voxphone.transports.ws_direct import DirectWebSocketResponse
from voxphone.transports.ws_sender import WebSocketSender

log = structlog.get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.WebSocketResponse]]


@dataclass(frozen=True)
class StreamStart:
    call_id: str
    codec: Codec
    metadata: dict[str, Any]


class StreamMedia(NamedTuple):
    """One media message (a tuple: built 50 times a second per call, cheaper than a frozen
    dataclass)."""

    sequence: int
    timestamp_ms: int
    track: str
    payload: bytes


@dataclass(frozen=True)
class StreamDtmf:
    digit: str


@dataclass(frozen=True)
class StreamStop:
    pass


@dataclass(frozen=True)
class StreamOther:
    """A message with nothing to transcribe: documented (``connected``, ``mark``, Telnyx's
    ``error``) or not (``known=False``: counted on the call as ``unknown_message``)."""

    event: str
    known: bool = True
    detail: str = ""


StreamMessage = StreamStart | StreamMedia | StreamDtmf | StreamStop | StreamOther

#: Telnyx ``media_format.encoding`` (and Twilio's MIME type) → codec; L16 picks its rate.
ENCODINGS = {"PCMU": PCMU, "audio/x-mulaw": PCMU, "PCMA": PCMA, "G722": G722, "OPUS": OPUS}


#: Every event each provider documents sending. Twilio:
#: https://www.twilio.com/docs/voice/media-streams/websocket-messages ("WebSocket messages from
#: Twilio"); Telnyx: https://developers.telnyx.com/api-reference/websockets/stream-call-media-over-websocket
#: ("Connection Flow": connected, start, media, dtmf, mark, error, stop).
DOCUMENTED_EVENTS = {
    "twilio": frozenset({"connected", "start", "media", "dtmf", "mark", "stop"}),
    "telnyx": frozenset({"connected", "start", "media", "dtmf", "mark", "error", "stop"}),
}


class JsonStream:
    """Twilio's and Telnyx's JSON messages, which differ in naming (camelCase, snake_case)."""

    def __init__(self, vendor: str) -> None:
        self.vendor = vendor
        self._snake = vendor == "telnyx"
        self._documented = DOCUMENTED_EVENTS[vendor]

    def parse(self, text: str) -> StreamMessage:
        """One message; ``TransportError`` names what is malformed. A media message is parsed by
        orjson and decoded by ``binascii``: about half the cost of ``json`` and
        ``base64.b64decode(validate=True)``. (A stream's own media takes ``feed``'s faster way.)"""
        try:
            msg = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise self._error(f"invalid JSON: {exc}") from None
        if not isinstance(msg, dict) or not isinstance(msg.get("event"), str):
            raise self._error("message has no 'event'")
        event = msg["event"]
        if event == "media":
            return self._fast_media(msg) or self._media(msg)
        if event == "start":
            start = self._object(msg, "start")
            return self._telnyx_start(msg, start) if self._snake else self._twilio_start(start)
        if event == "dtmf":
            return StreamDtmf(self._field(self._object(msg, "dtmf"), "digit", "dtmf")[:1])
        if event == "stop":
            return StreamStop()
        if event == "error" and event in self._documented:  # Telnyx: payload{code, title, detail}
            return StreamOther(event, detail=json.dumps(msg.get("payload"))[:200])
        return StreamOther(event, event in self._documented)

    def _fast_media(self, msg: dict[str, Any]) -> StreamMedia | None:
        """A well-formed media message with no checks beyond those Python does anyway; ``None``
        for anything else, which ``_media`` then parses to name what is wrong."""
        try:
            media = msg["media"]
            b64 = media["payload"]
            if not isinstance(b64, str) or not b64:
                return None
            payload = binascii.a2b_base64(b64, strict_mode=True)
            sequence = int(msg["sequence_number" if self._snake else "sequenceNumber"])
            timestamp = int(media["timestamp"])
            track = media.get("track", "inbound")
        except (KeyError, TypeError, ValueError, AttributeError, binascii.Error):
            return None
        return StreamMedia(
            sequence, timestamp, track if type(track) is str else str(track), payload
        )

    def _media(self, msg: dict[str, Any]) -> StreamMedia:
        media = self._object(msg, "media")
        try:
            # strict_mode refuses what ``b64decode(validate=True)`` refuses, without its regex.
            payload = binascii.a2b_base64(self._field(media, "payload", "media"), strict_mode=True)
        except (binascii.Error, ValueError) as exc:
            raise self._error(f"media.payload is not base64: {exc}") from None
        seq_key = "sequence_number" if self._snake else "sequenceNumber"
        return StreamMedia(
            self._number(msg, seq_key, ""),
            self._number(media, "timestamp", "media."),
            str(media.get("track", "inbound")),
            payload,
        )

    def _twilio_start(self, start: dict[str, Any]) -> StreamStart:
        fmt = start.get("mediaFormat") or {}
        encoding = fmt.get("encoding", "audio/x-mulaw") if isinstance(fmt, dict) else None
        if encoding != "audio/x-mulaw":
            raise self._error(f"unsupported mediaFormat.encoding {encoding!r}")
        params = start.get("customParameters")
        call_sid = self._field(start, "callSid", "start")
        meta = {
            "call_sid": call_sid,
            "stream_sid": self._field(start, "streamSid", "start"),
            "account_sid": str(start.get("accountSid", "")),
            "tracks": list(start.get("tracks") or ["inbound"]),
            "custom_parameters": params if isinstance(params, dict) else {},
        }
        return StreamStart(call_sid, PCMU, meta)

    def _telnyx_start(self, msg: dict[str, Any], start: dict[str, Any]) -> StreamStart:
        fmt = start.get("media_format") or {}
        if not isinstance(fmt, dict):
            raise self._error("start.media_format must be an object")
        encoding = str(fmt.get("encoding", "PCMU")).upper()
        rate = (
            self._number(fmt, "sample_rate", "start.media_format.")
            if "sample_rate" in fmt
            else 8000
        )
        codec = ENCODINGS.get(encoding) or (
            CODECS.get(f"l16/{rate}") if encoding == "L16" else None
        )
        if codec is None:
            raise self._error(f"unsupported media_format.encoding {encoding!r} at {rate} Hz")
        call_control_id = self._field(start, "call_control_id", "start")
        meta = {
            "call_control_id": call_control_id,
            "user_id": start.get("user_id"),
            "stream_id": str(msg.get("stream_id") or start.get("stream_id") or ""),
            "client_state": start.get("client_state"),
            "from": start.get("from"),
            "to": start.get("to"),
        }
        return StreamStart(call_control_id, codec, meta)

    def _error(self, message: str) -> TransportError:
        return TransportError(f"{self.vendor}: {message}")

    def _object(self, msg: dict[str, Any], key: str) -> dict[str, Any]:
        value = msg.get(key)
        if not isinstance(value, dict):
            raise self._error(f"{msg['event']} message has no '{key}' object")
        return value

    def _field(self, obj: dict[str, Any], key: str, where: str) -> str:
        value = obj.get(key)
        if not isinstance(value, str) or not value:
            raise self._error(f"{where}.{key} must be a non-empty string")
        return value

    def _number(self, obj: dict[str, Any], key: str, where: str) -> int:
        """Numbers arrive as strings (Twilio, Telnyx); accept either: what ``int()`` takes, or
        msgspec's lax reading of an integer (``strict=False``: ``"1e3"``, ``"2.0"``), which is
        how the media fast path (``MEDIA_DECODERS``) reads them, so whatever it takes is taken
        here too, as the same number."""
        value = obj.get(key)
        try:
            return int(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            pass
        try:
            return msgspec.convert(value, int, strict=False)
        except msgspec.ValidationError:
            raise self._error(f"{where}{key} must be a number, got {value!r}") from None


TWILIO, TELNYX = JsonStream("twilio"), JsonStream("telnyx")


def parse_twilio(text: str) -> StreamMessage:
    return TWILIO.parse(text)


def parse_telnyx(text: str) -> StreamMessage:
    return TELNYX.parse(text)


#: The JSON dialects by vendor name (a session's ``transport``).
JSON_STREAMS = {"twilio": TWILIO, "telnyx": TELNYX}


#: A number field of the media fast path: an integer, or a string holding one, read as
#: ``JsonStream._number`` reads it (msgspec's lax rules also take an integral float, ``2.0``,
#: and float syntax, ``"1e3"``); within 64 bits, which orjson (``JsonStream``'s parser) reads as
#: an integer too (beyond, a float), so what the fast path takes the other path takes, equal.
_Number = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]


class MediaBody(msgspec.Struct, forbid_unknown_fields=True):
    """A media message's ``media`` object, every documented field declared (Twilio and Telnyx
    alike): ``timestamp`` (ms), ``payload`` (base64: what msgspec decodes, binascii's
    ``strict_mode`` decodes to the same bytes), ``track``, ``chunk``. Numbers are strings, as
    both send them: msgspec reads them as ``JsonStream._number`` does (``strict=False``)."""

    timestamp: _Number
    payload: bytes
    track: str = "inbound"
    chunk: str = ""


class TwilioMedia(
    msgspec.Struct,
    forbid_unknown_fields=True,
    rename={"sequence": "sequenceNumber", "stream": "streamSid"},
):
    """Twilio's ``media`` message, exactly as documented
    (https://www.twilio.com/docs/voice/media-streams/websocket-messages#media-message)."""

    event: Literal["media"]
    sequence: _Number
    media: MediaBody
    stream: str = ""


class TelnyxMedia(
    msgspec.Struct,
    forbid_unknown_fields=True,
    rename={"sequence": "sequence_number", "stream": "stream_id"},
):
    """Telnyx's ``media`` message, exactly as documented
    (https://developers.telnyx.com/api-reference/websockets/stream-call-media-over-websocket)."""

    event: Literal["media"]
    sequence: _Number
    media: MediaBody
    stream: str = ""


#: Decoders of each dialect's media message as documented and nothing else: with a field more
#: or another event, a message is parsed by ``JsonStream`` instead, which accepts and refuses
#: what it always has (msgspec skips an unknown field's value without reading numbers orjson
#: refuses). Numbers are read by msgspec's lax rules (``strict=False``: a string holding an
#: integer is one), as ``JsonStream._number`` reads them, in C rather than by ``int()``.
MEDIA_DECODERS: dict[str, msgspec.json.Decoder[TwilioMedia] | msgspec.json.Decoder[TelnyxMedia]] = {
    "twilio": msgspec.json.Decoder(TwilioMedia, strict=False),
    "telnyx": msgspec.json.Decoder(TelnyxMedia, strict=False),
}


#: Media messages held when they overtake ``start`` (20 ms each: one second).
EARLY_MESSAGES = 50


class JsonStreamSession:
    """One stream: opens the call at ``start``, plays media in order, ends at ``stop``.

    Media is ordered by sequence number and placed on the call clock by its millisecond
    timestamp, through the RTP jitter buffer: Telnyx may deliver frames out of order, and any
    provider may repeat or skip one. The websocket handler calls ``feed`` with each text frame;
    ``handle`` takes a parsed message."""

    def __init__(self, request: web.Request, transport: str) -> None:
        """``transport``: ``twilio`` or ``telnyx`` (``JSON_STREAMS``), the dialect ``feed``
        parses."""
        self._registry = request.app[REGISTRY]
        self._transport = transport
        self._stream = JSON_STREAMS[transport]
        self._decode_media = MEDIA_DECODERS[transport].decode
        self._rate = 0  # the call's RTP ticks per millisecond, from ``start``
        self.call: Call | None = None
        self.reason: str | None = None
        # Clock in ms: wait up to 120 ms for a frame; hold the start so it can be reordered too.
        self._buffer = JitterBuffer(1000, 120, hold_start=True)
        self.other_tracks = 0
        self._unknown_before_start = 0
        self._early: deque[StreamMessage] = deque(maxlen=EARLY_MESSAGES)
        self._early_over = 0

    def feed(self, text: str) -> None:
        """One text frame: ``handle(parse(text))``, with ``take_media`` first. ``TransportError``
        names what is malformed."""
        if not self.take_media(text):
            self.handle(self._stream.parse(text))

    def take_media(self, text: str) -> bool:
        """The fast path for nearly every frame (50 a second per call): a media message of the
        shape the provider documents, once the call is open, goes straight from msgspec's typed
        decode to the jitter buffer and the call, and True is returned. Anything else returns
        False, having changed nothing, for ``feed``'s general path, which takes and refuses the
        same (``JsonStream``'s checks: where one fails — msgspec's ``DecodeError``, a str that
        is not UTF-8, a number that is not one — ``parse`` names the fault). Never raises: the
        websocket's reader calls it as it parses a frame (``DirectWebSocketResponse.take``)."""
        call = self.call
        if call is None or self.reason is not None:
            return False
        try:
            m = self._decode_media(text)
            media = m.media
            seq = m.sequence & 0xFFFF
            timestamp = media.timestamp & 0xFFFFFFFF
        except ValueError:
            return False
        if not media.payload:  # "" is base64 for nothing; ``parse`` refuses it
            return False
        self._play_media(seq, timestamp, media.track, media.payload, call)
        return True

    def handle(self, message: StreamMessage) -> None:
        if isinstance(message, StreamOther):
            self._other(message)
        elif isinstance(message, StreamStart):
            self._start(message)
        elif self.call is None:
            self._before_start(message)
        elif isinstance(message, StreamMedia):
            self._media(message)
        elif isinstance(message, StreamDtmf):
            self.call.dtmf(message.digit, 0)
        elif isinstance(message, StreamStop):
            self.reason = "stop"

    def _other(self, message: StreamOther) -> None:
        if message.detail:  # the provider reports an error (Telnyx): worth a line, not an end
            log.warning("media_stream_provider_error", vendor=self._transport, error=message.detail)
        if message.known:
            return
        if self.call is None:  # counted on the call once it opens, logged there
            self._unknown_before_start += 1
        else:
            self.call.count_dropped("unknown_message", message=message.event)

    def _before_start(self, message: StreamMessage) -> None:
        """Telnyx does not guarantee frame order: media (or a key) may overtake ``start``. It is
        held, up to ``EARLY_MESSAGES``; the oldest beyond that are counted, then dropped."""
        if isinstance(message, StreamStop):
            self.reason = "stop"
            return
        self._early_over += len(self._early) == EARLY_MESSAGES
        self._early.append(message)

    def _start(self, s: StreamStart) -> None:
        if self.call is not None:
            raise TransportError(f"{self._transport}: a second 'start' on one stream")
        self.call = self._registry.open(
            s.codec, transport=self._transport, metadata=s.metadata, call_id=s.call_id
        )
        if self.call is None:
            self.reason = "rejected"
            return
        self._rate = self.call.codec.clock_rate // 1000
        self.call.hangup = self.hang_up  # API DELETE, shutdown: play out the buffer first
        self.call.on_finish(self._report)  # it may end without us: its engine failed
        self.call.count_dropped("unknown_message", self._unknown_before_start)
        self.call.count_dropped("early_audio_over_limit", self._early_over)
        while self._early:
            self.handle(self._early.popleft())

    def hang_up(self, reason: str) -> None:
        """End the call (``reason``) after playing out what the jitter buffer holds."""
        self.reason = self.reason or reason
        self.finish()

    def _media(self, m: StreamMedia) -> None:
        assert self.call is not None
        seq, timestamp = m.sequence & 0xFFFF, m.timestamp_ms & 0xFFFFFFFF
        self._play_media(seq, timestamp, m.track, m.payload, self.call)

    def _play_media(self, seq: int, timestamp: int, track: str, payload: bytes, call: Call) -> None:
        """A media message's audio (16-bit ``seq``, 32-bit ``timestamp`` in ms) through the
        jitter buffer to ``call``; another track is counted, not played."""
        if track != "inbound" and track != "inbound_track":
            self.other_tracks += 1  # the caller is transcribed, not what the bot says back
        elif self._buffer.take_next(seq):  # in order, nothing waiting: straight on
            call.push_packet((timestamp * self._rate) & 0xFFFFFFFF, payload)
        else:
            self._play(self._buffer.push(RtpPacket(0, seq, timestamp, 0, payload)))

    def _play(self, packets: list[RtpPacket]) -> None:
        assert self.call is not None
        rate = self._rate
        for p in packets:
            self.call.push_packet((p.timestamp * rate) & 0xFFFFFFFF, p.payload)

    def finish(self) -> None:
        if self.call is None:
            if self._early:
                log.warning("media_stream_ended_before_start", held=len(self._early))
            return
        self._play(self._buffer.flush())
        self._report()
        self.call.end(self.reason or "disconnected")

    def _report(self) -> None:
        """The stream's counters into ``call.transport_stats``; what the jitter buffer still
        holds when the call ends without the stream (its engine failed) is counted
        ``after_end``, not played."""
        assert self.call is not None
        self.call.count_dropped("after_end", len(self._buffer.flush()))
        self.call.transport_stats.update(vars(self._buffer.stats), other_tracks=self.other_tracks)


#: (account auth token, public base URL) for X-Twilio-Signature checks; empty token: off.
TWILIO_AUTH = web.AppKey("twilio_auth", tuple[str, str])


def twilio_signature(auth_token: str, url: str) -> str:
    """Twilio's request signature: base64 HMAC-SHA1 of the full URL (a GET has no form params)."""
    digest = hmac.new(auth_token.encode(), url.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def _twilio_signed(request: web.Request) -> bool:
    auth_token, public_url = request.app.get(TWILIO_AUTH, ("", ""))
    if not auth_token:
        return True
    base = public_url.rstrip("/") or f"{request.scheme}://{request.host}"
    expected = twilio_signature(auth_token, base + request.path_qs)
    given = request.headers.get("X-Twilio-Signature", "")
    return hmac.compare_digest(expected.encode(), given.encode())


def json_stream_handler(parser: JsonStream) -> Handler:
    """A websocket endpoint for one JSON media-stream dialect."""

    async def handle(request: web.Request) -> web.WebSocketResponse:
        if parser is TWILIO and not _twilio_signed(request):
            raise web.HTTPForbidden(text="X-Twilio-Signature is missing or wrong\n")
        ws = DirectWebSocketResponse(max_msg_size=1 << 20)
        await ws.prepare(request)
        session = JsonStreamSession(request, parser.vendor)
        sender: WebSocketSender | None = None  # talk back, once the call has opened
        try:
            async for msg in ws:
                if msg.type is WSMsgType.ERROR:  # the websocket failed; aiohttp has closed it
                    _failed(parser.vendor, msg)
                    session.reason = session.reason or "protocol_error"
                    break
                if msg.type != WSMsgType.TEXT:
                    raise TransportError(
                        f"{parser.vendor}: expected text frames, got {msg.type.name}"
                    )
                session.feed(msg.data)
                if sender is None and session.call is not None:
                    sender = attach_json(session.call, ws, parser.vendor, session.hang_up)
                    # From here on media is played as aiohttp reads it, not from this loop.
                    ws.take(WSMsgType.TEXT, session.take_media)
                if session.reason is not None:
                    break
        except TransportError as exc:
            log.warning("media_stream_rejected", vendor=parser.vendor, error=str(exc))
            session.reason = session.reason or "protocol_error"
            await ws.close(code=1007, message=str(exc)[:120].encode())
        finally:
            ws.take(WSMsgType.TEXT, None)
            session.finish()
            if sender is not None:
                sender.stop()
        return ws

    return handle


twilio = json_stream_handler(TWILIO)
telnyx = json_stream_handler(TELNYX)


# -- raw L16 streams: Vonage, FreeSWITCH mod_audio_fork / mod_audio_stream, jambonz listen -------

#: Whether stereo L16 streams are transcribed as two speakers (``media_streams.stereo``).
STEREO_BOTH = web.AppKey("stereo_both", bool)


def _raw_opener(request: web.Request, vendor: str) -> Opener:
    """Opens a raw stream's call, or with ``media_streams.stereo = "both"`` one per channel."""

    def open_calls(start: RawStreamStart) -> list[tuple[Call, int]] | None:
        both = start.channels == 2 and request.app.get(STEREO_BOTH, False)
        call_id = start.call_id or new_call_id()
        sides = [(call_id, 0), (f"{call_id}:callee", 1)] if both else [(call_id, 0)]
        calls = []
        for cid, channel in sides:
            call = request.app[REGISTRY].open(
                slin(start.rate), transport=vendor, metadata=start.metadata,
                call_id=cid, channel=channel if both else None,
            )  # fmt: skip
            if call is None:
                return None
            calls.append((call, channel))
        return calls

    return open_calls


def raw_stream_handler(vendor: str) -> Handler:
    """A websocket endpoint for raw s16le streams (``rawstream``): TEXT metadata and control,
    BINARY audio. Stereo is caller/callee interleaved: the caller (channel 0) is transcribed,
    or both."""

    async def handle(request: web.Request) -> web.WebSocketResponse:
        ws = DirectWebSocketResponse(max_msg_size=1 << 20, protocols=SUBPROTOCOLS)
        await ws.prepare(request)
        stream = RawStreamSession(vendor, dict(request.query), _raw_opener(request, vendor))
        reason = "disconnected"
        sender: WebSocketSender | None = None  # talk back to the caller, once the call opened
        try:
            async for msg in ws:
                if msg.type is WSMsgType.ERROR:  # the websocket failed; aiohttp has closed it
                    _failed(vendor, msg)
                    reason = "protocol_error"
                    break
                if not _feed(stream, msg):
                    reason = "rejected"
                    break
                if sender is None and stream.calls:
                    sender = attach_raw(stream.calls[0][0], ws, vendor, stream.end)
                    ws.take(WSMsgType.BINARY, stream.take_audio)  # audio as aiohttp reads it
            else:
                if ws.close_code in (1000, 1001):
                    reason = "hangup"  # these streams end by closing the socket
        except TransportError as exc:
            log.warning("media_stream_rejected", vendor=vendor, error=str(exc))
            reason = "protocol_error"
            await ws.close(code=1007, message=str(exc)[:120].encode())
        finally:
            ws.take(WSMsgType.BINARY, None)
            stream.end(reason)
            if sender is not None:
                sender.stop()
        return ws

    return handle


def _failed(vendor: str, msg: WSMessage) -> None:
    """An ERROR message: aiohttp could not read the websocket (a frame too large or malformed,
    the peer gone) or a taker failed (logged with its traceback where it failed)."""
    log.warning(
        "media_stream_failed", vendor=vendor, error=f"{type(msg.data).__name__}: {msg.data}"
    )


def _feed(stream: RawStreamSession, msg: WSMessage) -> bool:
    if msg.type == WSMsgType.BINARY:
        return stream.audio(msg.data)
    if msg.type == WSMsgType.TEXT:
        return stream.text(msg.data)
    return True


vonage = raw_stream_handler("vonage")
generic_stream = raw_stream_handler("stream")
