"""Raw L16 streams (Vonage, mod_audio_fork, mod_audio_stream, jambonz listen) fed frame by frame,
with calls that record what reached them: early audio, late metadata, every documented message."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from voxphone.transports.rawstream import (
    EARLY_AUDIO_MS,
    Dtmf,
    Known,
    Metadata,
    RawStreamSession,
    RawStreamStart,
    Unknown,
    parse_control,
    parse_raw_start,
)


class FakeCall:
    def __init__(self, start: RawStreamStart) -> None:
        self.start = start
        self.audio = b""
        self.digits: list[tuple[str, int]] = []
        self.late: dict[str, Any] = {}
        self.dropped: dict[str, int] = {}
        self.reason: str | None = None

    def push_payload(self, payload: bytes) -> None:
        self.audio += payload

    def dtmf(self, digit: str, duration_ms: int) -> None:
        self.digits.append((digit, duration_ms))

    def merge_metadata(self, metadata: dict[str, Any]) -> None:
        self.late.update(metadata)

    def count_dropped(self, reason: str, n: int = 1, **detail: Any) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + n

    def end(self, reason: str) -> None:
        self.reason = reason


def session(vendor: str = "stream", **query: str) -> tuple[RawStreamSession, list[FakeCall]]:
    calls: list[FakeCall] = []

    def opener(start: RawStreamStart) -> list[tuple[Any, int]]:
        calls.append(FakeCall(start))
        return [(calls[-1], 0)]

    return RawStreamSession(vendor, query, opener), calls


def frames(rate: int, ms: int, frame_ms: int = 20) -> list[bytes]:
    """``ms`` of a counting signal in ``frame_ms`` s16le frames (so order can be checked)."""
    pcm = (np.arange(rate * ms // 1000) % 30000).astype("<i2").tobytes()
    size = rate * 2 * frame_ms // 1000
    return [pcm[i : i + size] for i in range(0, len(pcm), size)]


def test_jambonz_documents_rates_up_to_64000() -> None:
    """Refused with 1007 before: only Asterisk's slin rates were known."""
    for rate in (8000, 16000, 24000, 32000, 48000, 64000):
        start = parse_raw_start(json.dumps({"callSid": "c", "sampleRate": rate}), {}, "stream")
        assert start.rate == rate


def test_audio_before_the_metadata_frame_is_held_and_played_first() -> None:
    """mod_audio_stream racing its own metadata: 300 ms of audio, then the metadata names the
    call and its rate; every sample reaches the call, in order."""
    stream, calls = session()
    audio = frames(16000, 600)
    for f in audio[:15]:
        assert stream.audio(f)
    assert calls == []
    assert stream.text(json.dumps({"uuid": "fs-1", "sampleRate": 16000}))
    for f in audio[15:]:
        stream.audio(f)
    (call,) = calls
    assert call.start.call_id == "fs-1" and call.start.rate == 16000
    assert call.audio == b"".join(audio)


def test_a_stream_without_metadata_opens_from_the_url_and_merges_late_metadata() -> None:
    """mod_audio_stream without metadata: after EARLY_AUDIO_MS of audio the call opens from
    ``?rate=16k&call_id=...``; a metadata frame that comes later is merged into the call."""
    stream, calls = session(rate="16k", call_id="fs-2")
    audio = frames(16000, EARLY_AUDIO_MS + 400)
    for f in audio:
        stream.audio(f)
    (call,) = calls
    assert (call.start.call_id, call.start.rate, call.start.metadata) == ("fs-2", 16000, {})
    assert call.audio == b"".join(audio)
    stream.text(json.dumps({"from": "+15550100"}))
    assert call.late == {"from": "+15550100"}


def test_a_short_stream_of_audio_alone_still_becomes_a_call() -> None:
    stream, calls = session(rate="8000")
    stream.audio(frames(8000, 100)[0])
    stream.end("hangup")
    (call,) = calls
    assert call.reason == "hangup" and len(call.audio) == 320


@pytest.mark.parametrize(
    ("vendor", "text", "control"),
    [
        ("vonage", '{"event": "websocket:dtmf", "digit": "9", "duration": 250}', Dtmf("9", 250)),
        ("stream", '{"event": "dtmf", "dtmf": "5", "duration": 1600}', Dtmf("5", 200)),
        ("vonage", '{"event": "websocket:cleared"}', Known("websocket:cleared")),
        ("vonage", '{"event": "websocket:notify", "payload": {}}', Known("websocket:notify")),
        ("stream", '{"type": "playDone", "data": {"id": "1"}}', Known("playDone")),
        ("stream", '{"agent": "7"}', Metadata({"agent": "7"})),
        ("stream", "hangup-cause=NORMAL", Metadata({"metadata": "hangup-cause=NORMAL"})),
        ("vonage", '{"event": "websocket:surprise"}', Unknown("websocket:surprise")),
    ],
)
def test_every_documented_text_frame_is_recognised(vendor: str, text: str, control: Any) -> None:
    """Vonage's events, jambonz's passDtmf (duration in 8 kHz samples) and playDone, and
    mod_audio_fork/stream's ``send_text``/``stop <metadata>`` (arbitrary text: metadata)."""
    assert parse_control(text, vendor) == control


def test_unknown_messages_are_counted_on_the_call() -> None:
    stream, calls = session("vonage")
    stream.text('{"event": "websocket:connected", "content-type": "audio/l16;rate=16000"}')
    stream.text('{"event": "websocket:surprise"}')
    stream.text('{"event": "websocket:dtmf", "digit": "1", "duration": 100}')
    (call,) = calls
    assert call.dropped == {"unknown_message": 1} and call.digits == [("1", 100)]
