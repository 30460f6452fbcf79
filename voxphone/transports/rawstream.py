"""Raw L16 media-stream websockets: Vonage, FreeSWITCH mod_audio_fork / mod_audio_stream and
jambonz ``listen``. TEXT frames carry metadata and control, BINARY frames carry interleaved
signed 16-bit little-endian PCM (1 channel, or 2 for ``stereo``: caller, callee).

What each sender documents (the README's provider table lists every message and parameter):

- Vonage (https://developer.vonage.com/voice/voice-api/concepts/websockets): a first TEXT
  ``{"event": "websocket:connected", "content-type": "audio/l16;rate=16000", ...headers}``,
  then audio; TEXT ``websocket:dtmf`` (``digit``, ``duration`` ms), ``websocket:cleared`` and
  ``websocket:notify`` (answers to what the app sent).
- mod_audio_fork (drachtio-freeswitch-modules ``modules/mod_audio_fork/README.md``): subprotocol
  ``audio.drachtio.org`` (``audiostream.drachtio.org`` in old builds); ``start <url> <mix>
  <8k|16k> <metadata>`` sends the metadata as the first TEXT frame, ``send_text`` and ``stop
  <metadata>`` send arbitrary TEXT frames later; the rate is not sent (``?rate=`` in the URL).
- mod_audio_stream (amigniter/mod_audio_stream ``README.md``): the same, except that the
  metadata is optional ("sent the first before audio streaming starts" only when given).
- jambonz ``listen`` (https://docs.jambonz.org/verbs/verbs/listen; feature-server
  ``lib/tasks/listen.js``): subprotocol ``audio.jambonz.org``; the first TEXT frame is the call's
  attributes plus ``sampleRate`` (8000 default, up to 64000), ``mixType`` and ``metadata``;
  ``passDtmf`` sends ``{"event": "dtmf", "dtmf": "5", "duration": <samples at 8 kHz>}``;
  ``playDone`` answers an app's ``playAudio``.

Audio that comes before the metadata frame (mod_audio_stream without metadata, or a sender
racing its own first frame) is held, up to ``EARLY_AUDIO_MS``; then the call opens from what the
URL says (``?rate=``, ``?mix=``, ``?call_id=``) and the held audio plays first: nothing is lost.
Metadata that arrives after the call opened is merged into it (``call.ended.metadata``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from voxphone.audio.codecs import SLIN, Codec
from voxphone.call import Call
from voxphone.errors import TransportError

#: First-frame (or URL query) keys that name the call, in the order tried.
CALL_ID_KEYS = ("callSid", "call_sid", "call_id", "callId", "uuid", "conversation_uuid")
#: Subprotocols the senders ask for: mod_audio_fork (new and old name), jambonz listen.
SUBPROTOCOLS = ("audio.drachtio.org", "audiostream.drachtio.org", "audio.jambonz.org")
#: Sample rates accepted: jambonz documents up to 64000; Asterisk-style rates up to 192000.
MIN_RATE, MAX_RATE = 8000, 192_000
#: Audio held while waiting for the metadata frame before opening the call from the URL.
EARLY_AUDIO_MS = 1000
#: TEXT events that carry nothing to transcribe: answers to what an app sends back.
KNOWN_EVENTS = frozenset({"websocket:connected", "websocket:cleared", "websocket:notify"})
KNOWN_TYPES = frozenset({"playDone"})


@dataclass(frozen=True)
class RawStreamStart:
    """What the metadata frame (and the URL query) say about a raw L16 stream."""

    call_id: str | None
    rate: int
    channels: int
    metadata: dict[str, Any]


def parse_raw_start(text: str, query: dict[str, str], vendor: str) -> RawStreamStart:
    """The metadata frame (``""`` when there is none) with the URL query as the fallback.

    Rate: jambonz ``sampleRate``, Vonage ``content-type`` ``rate=``, else ``?rate=`` (``16000``
    or ``16k``), else 8000. Channels: ``channels``, else 2 for ``mixType``/``?mix=`` ``stereo``.
    ``TransportError`` names a rate outside 8000-192000 Hz or a channel count other than 1-2."""
    meta = _metadata(text)
    rate = _rate(_rate_text(meta, query))
    if not MIN_RATE <= rate <= MAX_RATE:
        raise TransportError(f"{vendor}: sample rate {rate} Hz is not supported")
    mix = str(meta.get("mixType") or query.get("mix") or "mono")
    channels = meta.get("channels") or (2 if mix == "stereo" else 1)
    if channels not in (1, 2):
        raise TransportError(
            f"{vendor}: {channels} channels; 1 (mono/mixed) or 2 (stereo) expected"
        )
    return RawStreamStart(call_id_of(meta) or call_id_of(query), rate, channels, meta)


def _metadata(text: str) -> dict[str, Any]:
    """A JSON object as is; other text (mod_audio_fork metadata is arbitrary) under ``metadata``."""
    try:
        meta = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError:
        return {"metadata": text}
    return meta if isinstance(meta, dict) else {"metadata": meta}


def _rate_text(meta: dict[str, Any], query: dict[str, str]) -> str:
    content_type = str(meta.get("content-type", ""))
    if "rate=" in content_type:
        return content_type.split("rate=", 1)[1].split(";")[0]
    return str(meta.get("sampleRate") or meta.get("sample_rate") or query.get("rate") or "")


def _rate(text: str) -> int:
    """``16000``, ``16k`` or nothing (8 kHz)."""
    digits = text.removesuffix("k")
    if not digits.isdecimal():
        return 8000
    return int(digits) * (1000 if text.endswith("k") else 1)


def call_id_of(fields: dict[str, Any]) -> str | None:
    return next((str(fields[k]) for k in CALL_ID_KEYS if fields.get(k)), None)


def slin(rate: int) -> Codec:
    """Signed linear at ``rate`` (the resampler takes any rate to the model's 16 kHz)."""
    return SLIN.get(rate) or Codec(f"SLIN/{rate}", rate, rate, "pcm_s16le")


# -- later TEXT frames ---------------------------------------------------------------------


@dataclass(frozen=True)
class Dtmf:
    digit: str
    duration_ms: int


@dataclass(frozen=True)
class Known:
    """A documented message with nothing to transcribe (``websocket:cleared``, ``playDone``)."""

    name: str


@dataclass(frozen=True)
class Metadata:
    """A metadata frame: the first one, a late one, or ``send_text``/``stop <metadata>``."""

    fields: dict[str, Any]


@dataclass(frozen=True)
class Unknown:
    name: str


Control = Dtmf | Known | Metadata | Unknown


def parse_control(text: str, vendor: str) -> Control:
    """A TEXT frame after the first. Vonage's are all documented events (anything else is
    ``Unknown``); FreeSWITCH's and jambonz's may be arbitrary metadata (``send_text``)."""
    meta = _metadata(text)
    event, kind = meta.get("event"), meta.get("type")
    if event == "websocket:dtmf" and meta.get("digit"):
        return Dtmf(str(meta["digit"])[:1], _int(meta.get("duration")))
    if event == "dtmf" and meta.get("dtmf"):  # jambonz passDtmf: duration in 8 kHz samples
        return Dtmf(str(meta["dtmf"])[:1], _int(meta.get("duration")) // 8)
    if event in KNOWN_EVENTS or kind in KNOWN_TYPES:
        return Known(str(event or kind))
    if vendor == "vonage":
        return Unknown(str(event or kind or text[:40]))
    return Metadata(meta)


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


# -- the session ---------------------------------------------------------------------------

#: Opens the call(s) of a stream; ``None`` when refused (at the limit, draining).
Opener = Callable[[RawStreamStart], list[tuple[Call, int]] | None]


@dataclass
class RawStreamSession:
    """One stream's state, fed frame by frame; the websocket handler stays a thin loop.

    ``text``/``audio`` return ``False`` once the stream should close (its call was refused)."""

    vendor: str
    query: dict[str, str]
    opener: Opener
    calls: list[tuple[Call, int]] = field(default_factory=list)  # (call, channel it hears)
    opened: bool = False
    refused: bool = False
    _texts: int = 0
    _channels: int = 1
    _rest: bytes = b""
    _held: list[bytes] = field(default_factory=list)

    def text(self, data: str) -> bool:
        self._texts += 1
        if not self.opened:
            return self._open(parse_raw_start(data, self.query, self.vendor))
        # The metadata frame came after the call opened from the URL: it is metadata, whatever
        # it says (Vonage's is a websocket:connected event).
        late = self._texts == 1
        control = Metadata(_metadata(data)) if late else parse_control(data, self.vendor)
        for call, _ in self.calls:
            _apply(call, control)
        return True

    def take_audio(self, data: bytes) -> bool:
        """Audio once the stream's calls are open: played, True; before, False and nothing
        changed. Never raises: the websocket's reader calls it as it parses a frame
        (``DirectWebSocketResponse.take``)."""
        if not self.calls:
            return False
        self._play(data)
        return True

    def audio(self, data: bytes) -> bool:
        if self.opened:
            self._play(data)
            return True
        self._held.append(data)
        start = parse_raw_start("", self.query, self.vendor)
        limit = start.rate * 2 * start.channels * EARLY_AUDIO_MS // 1000
        if sum(map(len, self._held)) < limit:
            return True
        return self._open(start)  # no metadata in time: open from the URL, merge it later

    def end(self, reason: str) -> None:
        """The socket closed: a stream that only ever sent audio still becomes a call."""
        if not self.opened and self._held and not self.refused:
            self._open(parse_raw_start("", self.query, self.vendor))
        for call, _ in self.calls:
            call.end(reason)

    def _open(self, start: RawStreamStart) -> bool:
        self.opened, self._channels = True, start.channels
        calls = self.opener(start)
        if calls is None:
            self.refused = True
            return False
        self.calls = calls
        held, self._held = self._held, []
        for data in held:
            self._play(data)
        return True

    def _play(self, data: bytes) -> None:
        """Interleaved s16le; a sample split across frames is kept for the next one."""
        data = self._rest + data
        whole = len(data) - len(data) % (2 * self._channels)
        self._rest = data[whole:]
        pcm = np.frombuffer(data[:whole], "<i2")
        for call, channel in self.calls:
            call.push_payload(pcm[channel :: self._channels].tobytes())


def _apply(call: Call, control: Control) -> None:
    if isinstance(control, Dtmf):
        call.dtmf(control.digit, control.duration_ms)
    elif isinstance(control, Metadata):
        call.merge_metadata(control.fields)
    elif isinstance(control, Unknown):
        call.count_dropped("unknown_message", message=control.name)
