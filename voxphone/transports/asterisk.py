"""Asterisk's two stream media paths: AudioSocket (TCP) and chan_websocket, sans I/O parsers
plus thin servers. (Asterisk's third path, externalMedia over RTP, is plain RTP: see rtp.py.)

AudioSocket frames are 1 type byte + 2-byte big-endian length + payload: the call's UUID first,
then signed-linear audio (type 0x10 = 8 kHz; 0x11-0x18 = 12-192 kHz, Asterisk 23+), DTMF digits,
hang-up and error frames. chan_websocket sends raw media in BINARY frames and control in TEXT
frames (``MEDIA_START``, ``DTMF_END``...), as plain ``KEY:value`` words or as JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any

import structlog
from aiohttp import WSMsgType, web

from voxphone.audio.codecs import G722, OPUS, PCMA, PCMU, SLIN, Codec
from voxphone.call import Call, CallRegistry
from voxphone.errors import TransportError, cannot_listen
from voxphone.http.api import REGISTRY
from voxphone.transports.asterisk_endpoint import (
    LINGER_S,
    AudioSocketEndpoint,
    attach_chan_websocket,
)
from voxphone.transports.ws_direct import DirectWebSocketResponse
from voxphone.transports.ws_sender import WebSocketSender

log = structlog.get_logger(__name__)

HANGUP, UUID, DTMF, ERROR = 0x00, 0x01, 0x03, 0xFF
#: AudioSocket audio frame types and their sample rates.
AUDIO_TYPES = {0x10: 8000, 0x11: 12000, 0x12: 16000, 0x13: 24000, 0x14: 32000,
               0x15: 44100, 0x16: 48000, 0x17: 96000, 0x18: 192000}  # fmt: skip
MAX_FRAME = 16_384  # 20 ms at 192 kHz is 7680 bytes


@dataclass(frozen=True)
class Frame:
    kind: int
    payload: bytes


class AudioSocketParser:
    """Bytes from the TCP stream in, whole frames out. A frame of a type the docs do not list
    is framed like any other (its length says where the next starts): the session counts it."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        frames = []
        while len(self._buf) >= 3:
            kind, length = self._buf[0], struct.unpack_from("!H", self._buf, 1)[0]
            if length > MAX_FRAME:
                raise TransportError(f"AudioSocket: frame of {length} bytes exceeds {MAX_FRAME}")
            if len(self._buf) < 3 + length:
                break
            frames.append(Frame(kind, bytes(self._buf[3 : 3 + length])))
            del self._buf[: 3 + length]
        return frames


def call_id_from_uuid(payload: bytes) -> str:
    if len(payload) != 16:
        raise TransportError(f"AudioSocket: UUID frame has {len(payload)} bytes, needs 16")
    return str(uuid.UUID(bytes=payload))


class AudioSocketServer:
    """``AudioSocket(uuid,host:port)`` in the dialplan connects here; the UUID is the call id."""

    def __init__(self, host: str, port: int, registry: CallRegistry) -> None:
        self.host, self.port = host, port
        self._registry = registry
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(self._serve, self.host, self.port)
        except OSError as exc:
            where = f"{self.host}:{self.port}"
            fix = (
                "choose another port (--audiosocket-port, asterisk.audiosocket_port) "
                "or stop what holds it"
            )
            raise cannot_listen("AudioSocket", where, exc, fix) from exc
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("audiosocket_listening", host=self.host, port=self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _AudioSocketCall(self._registry, writer.get_extra_info("peername"))
        talking = False  # the call has its way back (``AudioSocketEndpoint``)
        try:
            while conn.reason is None and (data := await reader.read(65536)):
                for frame in conn.parser.feed(data):
                    conn.handle(frame)
                    if not talking and conn.call is not None:
                        endpoint = AudioSocketEndpoint(conn.call, writer, conn.hang_up)
                        conn.call.attach_endpoint(endpoint)
                        talking = True
                    if conn.reason is not None:
                        break
        except TransportError as exc:
            log.warning("audiosocket_rejected", error=str(exc))
            conn.reason = "protocol_error"
        except ConnectionError:
            pass
        finally:
            if conn.call is not None:
                conn.call.end(conn.reason or "disconnected")
            if conn.hung_up:  # Asterisk closes once it reads the hang-up frame: let it go first
                await _until_closed(reader)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def _until_closed(reader: asyncio.StreamReader) -> None:
    """Read (and drop) until the peer closes, for up to ``LINGER_S``: closing a socket with
    unread data sends a TCP reset, which may destroy the hang-up frame before it is read."""
    with contextlib.suppress(TimeoutError, ConnectionError):
        async with asyncio.timeout(LINGER_S):
            while await reader.read(65536):
                pass


class _AudioSocketCall:
    """One connection: the UUID frame names the call; the first audio frame's type gives the
    sample rate and opens it."""

    def __init__(self, registry: CallRegistry, peer: tuple[str, int] | None) -> None:
        self.parser = AudioSocketParser()
        self.call: Call | None = None
        self.reason: str | None = None
        self.hung_up = False  # by voxphone (API, shutdown), not by Asterisk
        self._registry = registry
        self._remote = f"{peer[0]}:{peer[1]}" if peer else None
        self._call_id: str | None = None
        self._rate = 0
        self._unknown: dict[int, int] = {}  # frame type -> count, before the call opened
        self._early_digits: list[str] = []

    def handle(self, frame: Frame) -> None:
        if self._call_id is None:
            if frame.kind != UUID:
                raise TransportError(
                    f"AudioSocket: first frame is type 0x{frame.kind:02x}, not UUID"
                )
            self._call_id = call_id_from_uuid(frame.payload)
        elif frame.kind in AUDIO_TYPES:
            self._audio(AUDIO_TYPES[frame.kind], frame.payload)
        elif frame.kind == DTMF and frame.payload:
            self._dtmf(frame.payload[:1].decode("ascii", "replace"))
        elif frame.kind == HANGUP:
            self.reason = "hangup"
        elif frame.kind == ERROR:
            self._error(frame.payload)
        else:  # a repeated UUID, an empty DTMF, or a type the docs do not list
            self._unknown_kind(frame.kind)

    def hang_up(self, reason: str) -> None:
        """End the call from voxphone's side (the endpoint has sent the hang-up frame)."""
        self.hung_up = True
        self.reason = self.reason or reason
        if self.call is not None:
            self.call.end(reason)

    def _dtmf(self, digit: str) -> None:
        if self.call is not None:
            self.call.dtmf(digit, 0)
        else:  # a key before the first audio frame opened the call: it is played then
            self._early_digits.append(digit)

    def _error(self, payload: bytes) -> None:
        """0xff: the payload is Asterisk's error code (0x01 hang-up, 0x02 frame forwarding,
        0x04 memory); kept on the call as ``audiosocket_error_code``."""
        self.reason = "audiosocket_error"
        code = payload[0] if payload else 0
        log.warning("audiosocket_error", code=code, call_id=self._call_id)
        if self.call is not None:
            self.call.transport_stats["audiosocket_error_code"] = code

    def _unknown_kind(self, kind: int) -> None:
        if self.call is not None:
            self.call.count_dropped("unknown_message", message=f"0x{kind:02x}")
        else:
            self._unknown[kind] = self._unknown.get(kind, 0) + 1

    def _audio(self, rate: int, payload: bytes) -> None:
        if self.call is None:
            self._rate = rate
            meta = {"remote": self._remote}
            self.call = self._registry.open(
                SLIN[rate], transport="audiosocket", metadata=meta, call_id=self._call_id
            )
            if self.call is None:
                self.reason = "rejected"
                return
            self.call.count_dropped("unknown_message", sum(self._unknown.values()))
            for digit in self._early_digits:
                self.call.dtmf(digit, 0)
        elif rate != self._rate:
            raise TransportError(f"AudioSocket: audio changed from {self._rate} to {rate} Hz")
        self.call.push_payload(payload)


#: chan_websocket ``format`` names → codecs (Asterisk's slin is host order: little-endian).
#: ``opus`` runs in passthrough mode (WebSocket.md, ``p``): one Opus packet per BINARY frame.
WS_FORMATS: dict[str, Codec] = {
    "ulaw": PCMU, "alaw": PCMA, "g722": G722, "opus": OPUS, "slin": SLIN[8000],
    "slin12": SLIN[12000], "slin16": SLIN[16000], "slin24": SLIN[24000], "slin32": SLIN[32000],
    "slin44": SLIN[44100], "slin48": SLIN[48000], "slin96": SLIN[96000], "slin192": SLIN[192000],
}  # fmt: skip


def parse_control(text: str) -> dict[str, str]:
    """A chan_websocket TEXT frame: ``EVENT key:value ...`` or JSON ``{"event": ...}``.
    Returns the fields with the event name under ``"event"`` (bare words under ``"args"``)."""
    text = text.strip()
    if text.startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TransportError(f"chan_websocket: invalid JSON control message: {exc}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("event"), str):
            raise TransportError("chan_websocket: JSON control message has no 'event'")
        return {k: v if isinstance(v, str) else json.dumps(v) for k, v in obj.items()}
    if not text:
        raise TransportError("chan_websocket: empty control message")
    event, *words = text.split()
    fields = {"event": event}
    for word in words:
        key, sep, value = word.partition(":")
        if sep:
            fields[key] = value
        else:  # a bare argument: ``MEDIA_BUFFERING_COMPLETED <optional_id>``
            fields["args"] = f"{fields['args']} {word}" if "args" in fields else word
    return fields


#: chan_websocket notifications with nothing to transcribe (WebSocket.md, "Notifications"):
#: answers to commands an app sends and flow control for media it sends back.
WS_NOTIFICATIONS = frozenset({"MEDIA_XOFF", "MEDIA_XON", "STATUS", "MEDIA_BUFFERING_COMPLETED",
                              "MEDIA_MARK_PROCESSED", "QUEUE_DRAINED"})  # fmt: skip
#: BINARY frames held while waiting for ``MEDIA_START`` (Asterisk sends 20 ms frames: 5 s).
EARLY_FRAMES = 250
#: ``MEDIA_START`` fields kept as the call's metadata.
WS_METADATA = ("channel", "channel_id", "connection_id", "optimal_frame_size", "ptime")


class ChanWebsocketSession:
    """One chan_websocket connection, fed frame by frame (the handler stays a thin loop).

    The codec is known from ``MEDIA_START``, or earlier from the URL: the dial string's
    ``v(format=ulaw,channel_id=...)`` option (WebSocket.md, "Dialstring Syntax") adds URL
    parameters, and then the call opens when the socket does. Media that arrives before
    ``MEDIA_START`` otherwise is held (up to ``EARLY_FRAMES``; older frames beyond that are
    dropped and counted as ``early_audio_over_limit``) and played first once it comes, as are
    control messages (a ``DTMF_END``) that came before it; its fields are merged into a call
    opened from the URL. ``open_from_url`` and ``control`` return ``False`` when the call was
    refused (at the limit, draining)."""

    def __init__(self, registry: CallRegistry, query: dict[str, str]) -> None:
        self._registry = registry
        self.call: Call | None = None
        self._held: deque[bytes] = deque(maxlen=EARLY_FRAMES)
        self._early_controls: deque[str] = deque(maxlen=EARLY_FRAMES)
        self._over_controls = 0
        self._over = 0
        self._query = query
        #: Whether the channel speaks JSON control messages (its ``MEDIA_START`` was JSON):
        #: commands sent back must use the same format.
        self.json_control = False

    def open_from_url(self) -> bool:
        if "format" not in self._query:
            return True
        self.call = _start_ws_call(self._registry, self._query)
        return self.call is not None

    def audio(self, data: bytes) -> None:
        if self.take_audio(data):
            return
        self._over += len(self._held) == EARLY_FRAMES
        self._held.append(data)

    def take_audio(self, data: bytes) -> bool:
        """A media frame for the open call: played, True; before ``MEDIA_START``, False and
        nothing changed. Never raises: the websocket's reader calls it as it parses a frame
        (``DirectWebSocketResponse.take``)."""
        if self.call is None:
            return False
        self.call.push_payload(data)
        return True

    def is_json(self) -> bool:
        return self.json_control

    def control(self, text: str) -> bool:
        fields = parse_control(text)
        self.json_control = text.lstrip().startswith("{")
        event = fields["event"]
        if event == "MEDIA_START":
            return self._media_start(fields)
        if self.call is None:  # a key (or a notification) before MEDIA_START: played after it
            self._over_controls += len(self._early_controls) == EARLY_FRAMES
            self._early_controls.append(text)
            return True
        if event == "DTMF_END":
            self.call.dtmf(fields.get("digit", "?")[:1], int(fields.get("duration", 0) or 0))
        elif event not in WS_NOTIFICATIONS:
            self.call.count_dropped("unknown_message", message=event)
        return True

    def _media_start(self, fields: dict[str, str]) -> bool:
        if self.call is not None:
            self.call.merge_metadata(_ws_metadata(fields))
            return True
        self.call = _start_ws_call(self._registry, fields)
        if self.call is None:
            return False
        self.call.count_dropped("early_audio_over_limit", self._over)
        self.call.count_dropped("early_control_over_limit", self._over_controls)
        while self._held:
            self.call.push_payload(self._held.popleft())
        while self._early_controls:
            self.control(self._early_controls.popleft())
        return True

    def end(self, reason: str) -> None:
        if self.call is not None:
            self.call.end(reason)
        elif self._held or self._early_controls:
            log.warning(
                "chan_websocket_ended_before_media_start",
                frames=len(self._held), controls=len(self._early_controls),
            )  # fmt: skip


async def chan_websocket(request: web.Request) -> web.WebSocketResponse:
    """``/v1/media/asterisk``: Asterisk's chan_websocket connects here (externalMedia with
    ``transport=websocket``, or a ``WebSocket`` channel with ``connection_type=client``)."""
    ws = DirectWebSocketResponse(max_msg_size=65_536, protocols=("media",))
    await ws.prepare(request)
    session = ChanWebsocketSession(request.app[REGISTRY], dict(request.query))
    reason = "disconnected"
    sender: WebSocketSender | None = None  # talk back, once the call has opened

    def talk_back() -> None:
        nonlocal sender
        if sender is None and session.call is not None:
            sender = attach_chan_websocket(session.call, ws, session.end, session.is_json)
            ws.take(WSMsgType.BINARY, session.take_audio)  # media as aiohttp reads it

    try:
        if not session.open_from_url():
            reason = "rejected"
        else:
            talk_back()
            async for msg in ws:
                if msg.type == WSMsgType.BINARY:
                    session.audio(msg.data)
                elif msg.type == WSMsgType.TEXT:
                    if not session.control(msg.data):
                        reason = "rejected"
                        break
                    talk_back()
                elif msg.type == WSMsgType.ERROR:  # aiohttp could not read it, and closed it
                    error = f"{type(msg.data).__name__}: {msg.data}"
                    log.warning("chan_websocket_failed", error=error)
                    reason = "protocol_error"
                    break
            else:
                if ws.close_code in (1000, 1001):
                    reason = "hangup"  # Asterisk closes the socket when the channel hangs up
    except TransportError as exc:
        log.warning("chan_websocket_rejected", error=str(exc))
        reason = "protocol_error"
        await ws.close(code=1008, message=str(exc)[:120].encode())
    finally:
        ws.take(WSMsgType.BINARY, None)
        session.end(reason)
        if sender is not None:
            sender.stop()
    return ws


def _ws_metadata(fields: dict[str, str]) -> dict[str, Any]:
    meta: dict[str, Any] = {k: v for k, v in fields.items() if k in WS_METADATA}
    variables = fields.get("channel_variables")  # JSON MEDIA_START only
    if variables:
        with contextlib.suppress(json.JSONDecodeError):
            meta["channel_variables"] = json.loads(variables)
    return meta


def _start_ws_call(registry: CallRegistry, fields: dict[str, str]) -> Call | None:
    fmt = fields.get("format", "")
    codec = WS_FORMATS.get(fmt)
    if codec is None:
        raise TransportError(f"chan_websocket: MEDIA_START format {fmt!r} is not supported")
    call_id = fields.get("channel_id") or fields.get("connection_id")
    return registry.open(
        codec, transport="asterisk_websocket", metadata=_ws_metadata(fields), call_id=call_id
    )
