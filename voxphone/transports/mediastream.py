"""Media-stream websockets from CPaaS trunks, sans-I/O parsing plus thin aiohttp handlers.

Twilio Media Streams (``<Connect><Stream>`` / ``<Start><Stream>``): JSON text frames —
``connected``, ``start`` (call ids, ``customParameters``, ``mediaFormat``), ``media`` (base64
µ-law 8 kHz, ~20 ms, numbers as strings), ``dtmf``, ``mark``, ``stop``. Each media frame is
placed on the call's clock by its ``timestamp`` (ms since the stream began) through the same
jitter buffer and timeline as RTP, keyed by ``sequenceNumber``, so duplicates, gaps and
reordering are handled exactly as on a network.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

import structlog
from aiohttp import WSMsgType, web

from voxphone.audio.codecs import PCMU
from voxphone.call import Call
from voxphone.errors import TransportError
from voxphone.http.api import REGISTRY
from voxphone.transports.jitter import JitterBuffer
from voxphone.transports.rtp import RtpPacket

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class TwilioStart:
    call_sid: str
    stream_sid: str
    account_sid: str
    tracks: tuple[str, ...]
    custom_parameters: dict[str, Any]


@dataclass(frozen=True)
class TwilioMedia:
    sequence: int
    timestamp_ms: int
    track: str
    payload: bytes


@dataclass(frozen=True)
class TwilioDtmf:
    digit: str


@dataclass(frozen=True)
class TwilioStop:
    pass


@dataclass(frozen=True)
class TwilioOther:
    event: str


TwilioMessage = TwilioStart | TwilioMedia | TwilioDtmf | TwilioStop | TwilioOther


def parse_twilio(text: str) -> TwilioMessage:
    """One Twilio Media Streams message; ``TransportError`` names what is malformed."""
    try:
        msg = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TransportError(f"twilio: invalid JSON: {exc}") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("event"), str):
        raise TransportError("twilio: message has no 'event'")
    event = msg["event"]
    if event == "media":
        media = _object(msg, "media")
        try:
            payload = base64.b64decode(_field(media, "payload", "media"), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise TransportError(f"twilio: media.payload is not base64: {exc}") from None
        return TwilioMedia(
            _number(msg, "sequenceNumber", ""),
            _number(media, "timestamp", "media."),
            str(media.get("track", "inbound")),
            payload,
        )
    if event == "start":
        start = _object(msg, "start")
        fmt = start.get("mediaFormat") or {}
        if isinstance(fmt, dict) and fmt.get("encoding", "audio/x-mulaw") != "audio/x-mulaw":
            raise TransportError(
                f"twilio: unsupported mediaFormat.encoding {fmt.get('encoding')!r}"
            )
        params = start.get("customParameters") or {}
        return TwilioStart(
            _field(start, "callSid", "start"),
            _field(start, "streamSid", "start"),
            str(start.get("accountSid", "")),
            tuple(start.get("tracks") or ("inbound",)),
            params if isinstance(params, dict) else {},
        )
    if event == "dtmf":
        return TwilioDtmf(_field(_object(msg, "dtmf"), "digit", "dtmf")[:1])
    if event == "stop":
        return TwilioStop()
    return TwilioOther(event)


def _object(msg: dict[str, Any], key: str) -> dict[str, Any]:
    value = msg.get(key)
    if not isinstance(value, dict):
        raise TransportError(f"twilio: {msg['event']} message has no '{key}' object")
    return value


def _field(obj: dict[str, Any], key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value:
        raise TransportError(f"twilio: {where}.{key} must be a non-empty string")
    return value


def _number(obj: dict[str, Any], key: str, where: str) -> int:
    """Twilio sends numbers as strings; accept either."""
    value = obj.get(key)
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TransportError(f"twilio: {where}{key} must be a number, got {value!r}") from None


class TwilioSession:
    """One stream's state: opens the call at ``start``, plays media in order, ends at ``stop``."""

    def __init__(self, request: web.Request) -> None:
        self._registry = request.app[REGISTRY]
        self.call: Call | None = None
        self.reason: str | None = None
        self._buffer = JitterBuffer(8000, 60)
        self.dropped_tracks = 0

    def handle(self, message: TwilioMessage) -> None:
        if isinstance(message, TwilioStart):
            self._start(message)
        elif self.call is None:
            if not isinstance(message, TwilioOther):
                raise TransportError("twilio: media before 'start'")
        elif isinstance(message, TwilioMedia):
            self._media(message)
        elif isinstance(message, TwilioDtmf):
            self.call.dtmf(message.digit, 0)
        elif isinstance(message, TwilioStop):
            self.reason = "stop"

    def _start(self, s: TwilioStart) -> None:
        if self.call is not None:
            raise TransportError("twilio: a second 'start' on one stream")
        meta = {
            "call_sid": s.call_sid, "stream_sid": s.stream_sid, "account_sid": s.account_sid,
            "tracks": list(s.tracks), "custom_parameters": s.custom_parameters,
        }  # fmt: skip
        self.call = self._registry.open(PCMU, transport="twilio", metadata=meta, call_id=s.call_sid)
        if self.call is None:
            self.reason = "rejected"

    def _media(self, m: TwilioMedia) -> None:
        assert self.call is not None
        if m.track not in ("inbound", "inbound_track"):
            self.dropped_tracks += 1  # the caller is transcribed, not what the bot says back
            return
        pkt = RtpPacket(0, m.sequence & 0xFFFF, (m.timestamp_ms * 8) & 0xFFFFFFFF, 0, m.payload)
        for ready in self._buffer.push(pkt):
            self.call.push_packet(ready.timestamp, ready.payload)

    def finish(self) -> None:
        if self.call is None:
            return
        for ready in self._buffer.flush():
            self.call.push_packet(ready.timestamp, ready.payload)
        self.call.transport_stats.update({k: v for k, v in vars(self._buffer.stats).items()})
        self.call.end(self.reason or "disconnected")


async def twilio(request: web.Request) -> web.WebSocketResponse:
    """``/v1/media/twilio``: point ``<Connect><Stream url="wss://…/v1/media/twilio">`` here."""
    ws = web.WebSocketResponse(max_msg_size=1 << 20)
    await ws.prepare(request)
    session = TwilioSession(request)
    try:
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                raise TransportError(f"twilio: expected text frames, got {msg.type.name}")
            session.handle(parse_twilio(msg.data))
            if session.reason is not None:
                break
    except TransportError as exc:
        log.warning("twilio_stream_rejected", error=str(exc))
        session.reason = session.reason or "protocol_error"
        await ws.close(code=1007, message=str(exc)[:120].encode())
    finally:
        session.finish()
    return ws
