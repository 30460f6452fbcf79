"""Asterisk AudioSocket framing and chan_websocket control messages, without sockets."""

from __future__ import annotations

import struct
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from voxphone.errors import TransportError
from voxphone.transports.asterisk import (
    AudioSocketParser,
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
        (frame(0x42, b""), "unknown frame type 0x42"),
        (struct.pack("!BH", 0x10, 20000), "frame of 20000 bytes exceeds 16384"),
    ],
)
def test_bad_frames_are_precise_errors(data: bytes, message: str) -> None:
    with pytest.raises(TransportError, match=message):
        AudioSocketParser().feed(data)


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


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty control message"),
        ("MEDIA_START format", "expected key:value, got 'format'"),
        ("{bad json", "invalid JSON control message"),
        ('{"format": "ulaw"}', "has no 'event'"),
    ],
)
def test_bad_control_messages(text: str, message: str) -> None:
    with pytest.raises(TransportError, match=message):
        parse_control(text)
