"""Asterisk AudioSocket framing and chan_websocket control messages, without sockets."""

from __future__ import annotations

import struct
import uuid
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from voxphone.errors import TransportError
from voxphone.transports.asterisk import (
    EARLY_FRAMES,
    AudioSocketParser,
    ChanWebsocketSession,
    Frame,
    call_id_from_uuid,
    parse_control,
)


def frame(kind: int, payload: bytes) -> bytes:
    return struct.pack("!BH", kind, len(payload)) + payload


def test_frames_split_anywhere_are_reassembled() -> None:
    u = uuid.uuid4()
    stream = (
        frame(0x01, u.bytes) + frame(0x10, b"\x01\x00" * 160) + frame(0x03, b"5") + frame(0x00, b"")
    )
    parser = AudioSocketParser()
    frames = [f for i in range(0, len(stream), 7) for f in parser.feed(stream[i : i + 7])]
    assert [f.kind for f in frames] == [0x01, 0x10, 0x03, 0x00]
    assert frames[1] == Frame(0x10, b"\x01\x00" * 160)
    assert call_id_from_uuid(frames[0].payload) == str(u)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (struct.pack("!BH", 0x10, 20000), "frame of 20000 bytes exceeds 16384"),
    ],
)
def test_bad_frames_are_precise_errors(data: bytes, message: str) -> None:
    with pytest.raises(TransportError, match=message):
        AudioSocketParser().feed(data)


def test_frames_of_undocumented_types_are_framed_for_the_session_to_count() -> None:
    """A type the docs do not list is skipped by its length, not a reason to drop the call."""
    frames = AudioSocketParser().feed(frame(0x42, b"xy") + frame(0x10, b"\0\0"))
    assert [(f.kind, f.payload) for f in frames] == [(0x42, b"xy"), (0x10, b"\0\0")]


def test_uuid_frame_must_be_16_bytes() -> None:
    with pytest.raises(TransportError, match="UUID frame has 3 bytes, needs 16"):
        call_id_from_uuid(b"abc")


@given(st.lists(st.binary(max_size=40), max_size=20))
def test_any_byte_stream_frames_or_fails_precisely(chunks: list[bytes]) -> None:
    parser = AudioSocketParser()
    try:
        for chunk in chunks:
            for f in parser.feed(chunk):
                assert len(f.payload) <= 16384
    except TransportError as exc:
        assert str(exc).startswith("AudioSocket: ")


def test_plain_and_json_control_messages() -> None:
    plain = parse_control(
        "MEDIA_START connection_id:a1 channel:PJSIP/100-01 format:ulaw optimal_frame_size:160"
    )
    assert plain == {
        "event": "MEDIA_START", "connection_id": "a1", "channel": "PJSIP/100-01",
        "format": "ulaw", "optimal_frame_size": "160",
    }  # fmt: skip
    js = parse_control(
        '{"event": "MEDIA_START", "format": "slin16", "ptime": 20, "channel_id": "c"}'
    )
    assert (js["event"], js["format"], js["ptime"], js["channel_id"]) == (
        "MEDIA_START",
        "slin16",
        "20",
        "c",
    )
    assert parse_control("DTMF_END digit:7") == {"event": "DTMF_END", "digit": "7"}
    assert parse_control("MEDIA_BUFFERING_COMPLETED prompt-3") == {
        "event": "MEDIA_BUFFERING_COMPLETED",
        "args": "prompt-3",
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty control message"),
        ("{bad json", "invalid JSON control message"),
        ('{"format": "ulaw"}', "has no 'event'"),
    ],
)
def test_bad_control_messages(text: str, message: str) -> None:
    with pytest.raises(TransportError, match=message):
        parse_control(text)


class FakeCall:
    def __init__(self, fields: dict[str, Any]) -> None:
        self.fields, self.audio, self.digits = fields, b"", []  # type: ignore[var-annotated]
        self.dropped: dict[str, int] = {}
        self.late: dict[str, Any] = {}

    def push_payload(self, data: bytes) -> None:
        self.audio += data

    def dtmf(self, digit: str, duration_ms: int) -> None:
        self.digits.append(digit)

    def count_dropped(self, reason: str, n: int = 1, **detail: Any) -> None:
        if n:
            self.dropped[reason] = self.dropped.get(reason, 0) + n

    def merge_metadata(self, metadata: dict[str, Any]) -> None:
        self.late.update(metadata)


class FakeRegistry:
    def __init__(self) -> None:
        self.calls: list[FakeCall] = []

    def open(self, codec: Any, *, transport: str, metadata: Any, call_id: Any) -> FakeCall:
        self.calls.append(FakeCall({"codec": codec.name, "call_id": call_id, **metadata}))
        return self.calls[-1]


START = "MEDIA_START connection_id:c1 channel:PJSIP/1-01 format:ulaw optimal_frame_size:160"


def test_media_before_media_start_is_held_and_played_first() -> None:
    """Asterisk's first 1.2 s came before MEDIA_START and were lost: now they lead the call."""
    registry = FakeRegistry()
    ws = ChanWebsocketSession(registry, {})  # type: ignore[arg-type]
    early = [bytes([i]) * 160 for i in range(60)]
    for f in early:
        ws.audio(f)
    ws.control("DTMF_END digit:2")  # a key before MEDIA_START is kept too
    assert registry.calls == []
    assert ws.control(START)
    ws.audio(b"\xff" * 160)
    (call,) = registry.calls
    assert call.fields["codec"] == "PCMU" and call.fields["call_id"] == "c1"
    assert call.audio == b"".join(early) + b"\xff" * 160 and call.dropped == {}
    assert call.digits == ["2"]


def test_early_media_over_the_bound_is_counted() -> None:
    registry = FakeRegistry()
    ws = ChanWebsocketSession(registry, {})  # type: ignore[arg-type]
    for i in range(EARLY_FRAMES + 7):
        ws.audio(i.to_bytes(2, "big") * 80)
    ws.control(START)
    (call,) = registry.calls
    assert call.dropped == {"early_audio_over_limit": 7}
    assert len(call.audio) == EARLY_FRAMES * 160 and call.audio[:2] == (7).to_bytes(2, "big")


def test_a_call_opens_from_the_url_and_media_start_is_merged() -> None:
    """``Dial(WebSocket/conn/c(ulaw)v(format=ulaw,channel_id=17.2))`` puts the codec in the URL."""
    registry = FakeRegistry()
    ws = ChanWebsocketSession(registry, {"format": "ulaw", "channel_id": "17.2"})  # type: ignore[arg-type]
    assert ws.open_from_url()
    ws.audio(b"\x01" * 160)
    ws.control(START)
    (call,) = registry.calls
    assert call.fields["call_id"] == "17.2" and call.audio == b"\x01" * 160
    assert call.late["channel"] == "PJSIP/1-01"


def test_every_documented_notification_is_known_and_others_are_counted() -> None:
    registry = FakeRegistry()
    ws = ChanWebsocketSession(registry, {})  # type: ignore[arg-type]
    ws.control(START)
    for text in ("MEDIA_XOFF", "MEDIA_XON", "QUEUE_DRAINED", "MEDIA_BUFFERING_COMPLETED prompt-3", '{"event": "MEDIA_MARK_PROCESSED", "correlation_id": "m1"}',
                 "STATUS queue_length:43 xon_level:800 xoff_level:900 queue_full:false",
                 "DTMF_END digit:4", "SURPRISE x:1"):  # fmt: skip
        assert ws.control(text)
    (call,) = registry.calls
    assert call.digits == ["4"] and call.dropped == {"unknown_message": 1}
