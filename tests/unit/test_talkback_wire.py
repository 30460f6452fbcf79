"""What voxphone sends back to each transport, byte for byte as the vendors document it, and
the bounded websocket sender behind the websocket endpoints."""

from __future__ import annotations

import asyncio
import base64
import json
import struct

import numpy as np
import pytest

from voxphone.audio.codecs import G722, PCMA, PCMU, Decoder
from voxphone.errors import TransportError
from voxphone.transports.asterisk import AUDIO_TYPES
from voxphone.transports.asterisk_out import (
    AUDIO_TYPE_OF_RATE,
    audiosocket_audio,
    audiosocket_hangup,
    ws_command,
)
from voxphone.transports.stream_out import (
    JsonStreamOut,
    RawStreamOut,
    slin_frame,
)
from voxphone.transports.ws_sender import WebSocketSender


def tone(rate: int, ms: int = 20, hz: float = 440.0) -> np.ndarray:
    t = np.arange(rate * ms // 1000) / rate
    return (8000 * np.sin(2 * np.pi * hz * t)).astype(np.int16)


def test_twilio_media_mark_and_clear_carry_the_stream_sid() -> None:
    """Twilio's "Send a media message": base64 µ-law 8 kHz, no header; ``mark`` and ``clear``
    name the stream too."""
    out = JsonStreamOut("twilio", PCMU, "MZ123")
    media = json.loads(out.media(tone(8000)))
    assert set(media) == {"event", "streamSid", "media"} and media["streamSid"] == "MZ123"
    payload = base64.b64decode(media["media"]["payload"])
    assert len(payload) == 160  # one byte a sample
    back = Decoder(PCMU).decode(payload)
    assert np.abs(back.astype(int) - tone(8000)).max() < 300  # µ-law's step at this level
    assert json.loads(out.mark("greeting")) == {
        "event": "mark", "streamSid": "MZ123", "mark": {"name": "greeting"},
    }  # fmt: skip
    assert json.loads(out.clear()) == {"event": "clear", "streamSid": "MZ123"}


@pytest.mark.parametrize(("codec", "size"), [(PCMA, 160), (G722, 160)])
def test_telnyx_media_is_the_streams_codec_without_a_stream_id(codec, size) -> None:  # type: ignore[no-untyped-def]
    """Telnyx's "Client Media Frame": a base64 RTP payload in the stream's codec."""
    out = JsonStreamOut("telnyx", codec, "ignored")
    media = json.loads(out.media(tone(codec.sample_rate)))
    assert set(media) == {"event", "media"}
    assert len(base64.b64decode(media["media"]["payload"])) == size
    assert json.loads(out.clear()) == {"event": "clear"}
    assert json.loads(out.mark("m1")) == {"event": "mark", "mark": {"name": "m1"}}


def test_twilio_is_mulaw_only() -> None:
    with pytest.raises(TransportError, match="µ-law"):
        JsonStreamOut("twilio", PCMA, "MZ1")


def test_raw_streams_send_little_endian_20ms_frames_and_their_dialects_controls() -> None:
    """Vonage: 640 bytes per 20 ms at 16 kHz; ``clear``/``notify`` actions. jambonz: killAudio,
    disconnect. Others: audio only."""
    pcm = tone(16000)
    frame = RawStreamOut("vonage").audio(pcm)
    assert len(frame) == 640 and np.array_equal(np.frombuffer(frame, "<i2"), pcm)
    assert slin_frame(pcm) == frame
    vonage, jambonz, other = RawStreamOut("vonage"), RawStreamOut("jambonz"), RawStreamOut("stream")
    assert json.loads(vonage.clear() or "") == {"action": "clear"}
    assert json.loads(vonage.mark("x") or "") == {"action": "notify", "payload": {"mark": "x"}}
    assert vonage.hangup() is None
    assert json.loads(jambonz.clear() or "") == {"type": "killAudio"}
    assert json.loads(jambonz.hangup() or "") == {"type": "disconnect"}
    assert jambonz.mark("x") is None
    assert (other.clear(), other.mark("x"), other.hangup()) == (None, None, None)


@pytest.mark.parametrize("rate", sorted(AUDIO_TYPE_OF_RATE))
def test_audiosocket_audio_frames_use_the_type_of_the_calls_rate(rate: int) -> None:
    pcm = tone(rate)
    frame = audiosocket_audio(pcm, rate)
    kind, length = struct.unpack_from("!BH", frame)
    assert AUDIO_TYPES[kind] == rate and length == 2 * pcm.size == len(frame) - 3
    assert np.array_equal(np.frombuffer(frame[3:], "<i2"), pcm)


def test_audiosocket_hangup_is_an_empty_type_0() -> None:
    assert audiosocket_hangup() == b"\x00\x00\x00"


def test_chan_websocket_commands_in_both_control_formats() -> None:
    """``handle_command``: plain words (``MARK_MEDIA <id>``) or JSON with ``correlation_id``."""
    assert ws_command("FLUSH_MEDIA", json_style=False) == "FLUSH_MEDIA"
    assert ws_command("MARK_MEDIA", False, "m1") == "MARK_MEDIA m1"
    assert json.loads(ws_command("HANGUP", json_style=True)) == {"command": "HANGUP"}
    assert json.loads(ws_command("MARK_MEDIA", True, "m1")) == {
        "command": "MARK_MEDIA", "correlation_id": "m1",
    }  # fmt: skip


class SlowSocket:
    """A websocket whose writes wait until ``release`` is set, recording what was written."""

    def __init__(self) -> None:
        self.written: list[str | bytes] = []
        self.release = asyncio.Event()
        self.closed_with: int | None = None

    async def send_str(self, data: str) -> None:
        await self.release.wait()
        self.written.append(data)

    async def send_bytes(self, data: bytes) -> None:
        await self.release.wait()
        self.written.append(data)

    async def close(self, code: int = 1000, message: bytes = b"") -> None:
        self.closed_with = code


async def test_the_sender_bounds_audio_never_drops_controls_and_drains_before_closing() -> None:
    ws = SlowSocket()
    dropped: list[int] = []
    sender = WebSocketSender(ws, dropped.append, max_audio=3)  # type: ignore[arg-type]
    for i in range(5):
        sender.audio(bytes([i]))
    sender.control("clear")
    assert sum(dropped) >= 1  # the socket is stuck: the oldest audio went, counted
    ws.release.set()
    await asyncio.sleep(0.01)
    audio = [w for w in ws.written if isinstance(w, bytes)]
    assert audio[-1] == b"\x04" and len(audio) + sum(dropped) == 5
    assert ws.written[-1] == "clear"
    ws.release.clear()
    sender.audio(b"a")
    sender.audio(b"b")
    assert sender.drop_audio() >= 1  # clear: unsent audio goes, not counted as a loss
    sender.control("bye")
    ws.release.set()
    await sender.close()
    assert ws.written[-1] == "bye" and ws.closed_with == 1000
    sender.audio(b"late")  # after the close: ignored
    assert ws.written[-1] == "bye"


async def test_a_socket_gone_stops_the_sender_and_counts_what_was_queued() -> None:
    class Gone(SlowSocket):
        async def send_bytes(self, data: bytes) -> None:
            raise ConnectionResetError("Cannot write to closing transport")

    dropped: list[int] = []
    sender = WebSocketSender(Gone(), dropped.append)  # type: ignore[arg-type]
    for _ in range(3):
        sender.audio(b"x")
    await asyncio.sleep(0.01)
    assert sender.closed and sum(dropped) == 3  # the one being written, then two queued
    sender.stop()
