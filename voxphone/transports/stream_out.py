"""What voxphone sends back on the media-stream websockets, sans I/O: one builder per dialect.

Each builder turns the call's outbound audio (int16 mono PCM, 20 ms at the stream's rate) and
its controls (a playback mark, clear, hang-up) into the messages that vendor documents. The
endpoints in ``stream_endpoint`` only queue what these return onto the socket.

- Twilio (https://www.twilio.com/docs/voice/media-streams/websocket-messages, "Send
  WebSocket messages to Twilio", bidirectional ``<Connect><Stream>`` only): ``media``
  ``{"event", "streamSid", "media": {"payload"}}`` (base64 µ-law 8 kHz, no header), ``mark``
  ``{"event", "streamSid", "mark": {"name"}}`` (Twilio echoes it when the audio before it has
  played, or at once when ``clear`` discards it), ``clear {"event", "streamSid"}``.
- Telnyx (https://developers.telnyx.com/api-reference/websockets/stream-call-media-over-websocket,
  "Client Media Frame", "Mark Frame", "Clear Frame"; ``stream_bidirectional_mode: rtp``):
  the same three in snake_case without a stream id; ``media.payload`` is a base64 RTP payload
  in the stream's codec (``stream_bidirectional_codec`` must match ``stream_codec``).
- Vonage (https://developer.vonage.com/voice/voice-api/concepts/websockets): BINARY 16-bit
  linear PCM (little-endian) in 20 ms messages — 320 bytes at 8 kHz, 640 at 16 kHz — TEXT
  ``{"action": "clear"}`` (answered ``websocket:cleared``) and ``{"action": "notify",
  "payload": {...}}`` (echoed as ``websocket:notify`` once the audio before it has played).
- jambonz ``listen`` with ``bidirectionalAudio.streaming`` (https://docs.jambonz.org/verbs/verbs/listen;
  jambonz ``listen.md``, "Bidirectional audio"): BINARY L16 at ``bidirectionalAudio.sampleRate``,
  TEXT ``{"type": "killAudio"}`` stops playout, ``{"type": "disconnect"}`` ends the listen.
- FreeSWITCH mod_audio_stream (v1.0.3+, "raw binary stream") takes BINARY L16 back; other
  generic senders get the same. mod_audio_fork only plays whole ``playAudio`` files: it does
  not stream, so nothing but binary frames is sent and it ignores them.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np

from voxphone.audio.codecs import PCMU, Codec, Encoder, Pcm
from voxphone.errors import TransportError


def _text(message: dict[str, Any]) -> str:
    return json.dumps(message, separators=(",", ":"))


class JsonStreamOut:
    """Twilio's and Telnyx's outbound messages (TEXT frames), for one stream.

    ``codec`` is what the stream carries: always µ-law for Twilio; Telnyx's ``media_format``
    (every codec voxphone takes in, PyAV encodes back). ``TransportError`` for Twilio with
    anything but µ-law."""

    def __init__(self, vendor: str, codec: Codec, stream_id: str) -> None:
        if vendor == "twilio" and codec != PCMU:
            raise TransportError(f"twilio: outbound audio is µ-law 8 kHz, not {codec.name}")
        self.vendor = vendor
        self.codec = codec
        self._sid = {"streamSid": stream_id} if vendor == "twilio" else {}
        self._encoder = Encoder(codec)

    def media(self, pcm: Pcm) -> str:
        """One ``media`` message: ``pcm`` at ``codec.sample_rate``, encoded and base64'd."""
        payload = base64.b64encode(self._encoder.encode(pcm)).decode()
        return _text({"event": "media", **self._sid, "media": {"payload": payload}})

    def mark(self, name: str) -> str:
        return _text({"event": "mark", **self._sid, "mark": {"name": name}})

    def clear(self) -> str:
        return _text({"event": "clear", **self._sid})


def slin_frame(pcm: Pcm) -> bytes:
    """int16 mono PCM as signed 16-bit little-endian bytes (Vonage, jambonz, FreeSWITCH)."""
    return np.asarray(pcm, "<i2").tobytes()


class RawStreamOut:
    """The raw-L16 streams' outbound messages: BINARY audio and the dialect's TEXT controls.

    ``dialect`` is ``vonage``, ``jambonz`` (the sender asked for ``audio.jambonz.org``) or
    ``stream`` (FreeSWITCH and the rest: audio only). A control the dialect has no message
    for returns None: the caller still does what it can (hang-up closes the socket)."""

    def __init__(self, dialect: str) -> None:
        self.dialect = dialect

    def audio(self, pcm: Pcm) -> bytes:
        return slin_frame(pcm)

    def clear(self) -> str | None:
        if self.dialect == "vonage":
            return _text({"action": "clear"})
        if self.dialect == "jambonz":
            return _text({"type": "killAudio"})
        return None

    def mark(self, name: str) -> str | None:
        """Vonage's ``notify``: echoed as ``websocket:notify`` with this payload when played."""
        if self.dialect == "vonage":
            return _text({"action": "notify", "payload": {"mark": name}})
        return None

    def hangup(self) -> str | None:
        """jambonz ends ``listen`` on ``disconnect``; the others end when the socket closes."""
        return _text({"type": "disconnect"}) if self.dialect == "jambonz" else None
