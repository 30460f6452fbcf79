"""Twilio Media Streams messages, as Twilio documents them (numbers arrive as strings)."""

from __future__ import annotations

import base64
import json
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from voxphone.audio.codecs import PCMU
from voxphone.call import Call
from voxphone.clock import FakeClock
from voxphone.errors import TransportError
from voxphone.http.api import REGISTRY
from voxphone.testing import capture_events
from voxphone.transports.mediastream import (
    JsonStreamSession,
    StreamDtmf,
    StreamMedia,
    StreamOther,
    StreamStart,
    StreamStop,
    parse_telnyx,
    parse_twilio,
)
from voxphone.transports.rawstream import parse_raw_start

START = {
    "event": "start", "sequenceNumber": "1", "streamSid": "MZ18ad3ab5a668481ce02b83e7395059f0",
    "start": {
        "accountSid": "AC123", "streamSid": "MZ18ad3ab5a668481ce02b83e7395059f0",
        "callSid": "CA123", "tracks": ["inbound"], "customParameters": {"tenant": "acme"},
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
    },
}  # fmt: skip


def test_documented_messages_parse() -> None:
    assert parse_twilio(
        '{"event": "connected", "protocol": "Call", "version": "1.0.0"}'
    ) == StreamOther("connected")
    start = parse_twilio(json.dumps(START))
    assert start == StreamStart(
        "CA123",
        PCMU,
        {
            "call_sid": "CA123",
            "stream_sid": START["streamSid"],
            "account_sid": "AC123",
            "tracks": ["inbound"],
            "custom_parameters": {"tenant": "acme"},
        },
    )
    media = {"event": "media", "sequenceNumber": "3", "streamSid": "MZ1",
             "media": {"track": "inbound", "chunk": "2", "timestamp": "40", "payload": base64.b64encode(b"\xff" * 160).decode()}}  # fmt: skip
    assert parse_twilio(json.dumps(media)) == StreamMedia(3, 40, "inbound", b"\xff" * 160)
    dtmf = {
        "event": "dtmf",
        "streamSid": "MZ1",
        "sequenceNumber": "5",
        "dtmf": {"track": "inbound_track", "digit": "1"},
    }
    assert parse_twilio(json.dumps(dtmf)) == StreamDtmf("1")
    assert (
        parse_twilio('{"event": "stop", "sequenceNumber": "9", "stop": {"callSid": "CA123"}}')
        == StreamStop()
    )
    assert parse_twilio('{"event": "mark", "mark": {"name": "x"}}') == StreamOther("mark")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{oops", "invalid JSON"),
        ('{"sequenceNumber": "1"}', "message has no 'event'"),
        ('{"event": "media", "sequenceNumber": "1"}', "media message has no 'media' object"),
        ('{"event": "media", "sequenceNumber": "x", "media": {"timestamp": "0", "payload": "AA=="}}', "sequenceNumber must be a number"),
        ('{"event": "media", "sequenceNumber": "1", "media": {"timestamp": "0", "payload": "!!"}}', "media.payload is not base64"),
        ('{"event": "start", "start": {"streamSid": "MZ"}}', "start.callSid must be a non-empty string"),
        ('{"event": "start", "start": {"callSid": "CA", "streamSid": "MZ", "mediaFormat": {"encoding": "audio/l16"}}}', "unsupported mediaFormat.encoding"),
    ],
)  # fmt: skip
def test_malformed_messages_are_precise_errors(text: str, message: str) -> None:
    with pytest.raises(TransportError, match=message):
        parse_twilio(text)


@given(
    st.text(max_size=200)
    | st.builds(
        json.dumps,
        st.dictionaries(
            st.sampled_from(["event", "media", "start", "sequenceNumber", "sequence_number"]),
            st.sampled_from(
                ["media", "start", "dtmf", "1", {}, {"payload": "AA==", "timestamp": "x"}]
            ),
        ),
    )
)
def test_any_text_parses_or_fails_precisely(text: str) -> None:
    for parse, vendor in ((parse_twilio, "twilio"), (parse_telnyx, "telnyx")):
        try:
            parse(text)
        except TransportError as exc:
            assert str(exc).startswith(f"{vendor}: ")


TELNYX_START = {
    "event": "start", "sequence_number": "1", "stream_id": "32de0dea-53cb-4b21-89a4-9283e6b2b4d3",
    "start": {"user_id": "3e6f995f", "call_control_id": "v2:T02llQxIyaRkhfRKxgAP8nY511EhFLizdvdUKJiSw8d6A9BborherQ",
              "client_state": "aGF2ZSBhIG5pY2UgZGF5ID1d", "from": "+13122010094", "to": "+13122123456",
              "media_format": {"encoding": "PCMA", "sample_rate": 8000, "channels": 1}},
}  # fmt: skip


def test_telnyx_messages_parse_with_their_codec() -> None:
    start = parse_telnyx(json.dumps(TELNYX_START))
    assert isinstance(start, StreamStart)
    assert start.call_id == TELNYX_START["start"]["call_control_id"]
    assert start.codec.name == "PCMA"
    assert (start.metadata["from"], start.metadata["to"]) == ("+13122010094", "+13122123456")
    l16 = {
        **TELNYX_START,
        "start": {
            **TELNYX_START["start"],
            "media_format": {"encoding": "L16", "sample_rate": 16000},
        },
    }
    assert parse_telnyx(json.dumps(l16)).codec.name == "L16/16000"  # type: ignore[union-attr]
    media = {
        "event": "media",
        "sequence_number": "4",
        "media": {"track": "inbound", "chunk": "2", "timestamp": "5", "payload": "AAAA"},
    }
    assert parse_telnyx(json.dumps(media)) == StreamMedia(4, 5, "inbound", b"\0\0\0")


def test_telnyx_unsupported_encoding_is_named() -> None:
    amr = {
        **TELNYX_START,
        "start": {
            **TELNYX_START["start"],
            "media_format": {"encoding": "AMR-WB", "sample_rate": 16000},
        },
    }
    with pytest.raises(
        TransportError, match="telnyx: unsupported media_format.encoding 'AMR-WB' at 16000 Hz"
    ):
        parse_telnyx(json.dumps(amr))


@pytest.mark.parametrize(
    ("text", "query", "want"),
    [
        ('{"event": "websocket:connected", "content-type": "audio/l16;rate=16000", "uuid": "aaa-111"}', {}, ("aaa-111", 16000, 1)),
        ('{"callSid": "js-1", "sampleRate": 8000, "mixType": "stereo"}', {}, ("js-1", 8000, 2)),
        ('{"call_id": "fs-uuid", "from": "100"}', {"rate": "16k", "mix": "mono"}, ("fs-uuid", 16000, 1)),
        ("caller=100", {"rate": "8000"}, (None, 8000, 1)),
        ("", {}, (None, 8000, 1)),
    ],
)  # fmt: skip
def test_raw_stream_metadata(
    text: str, query: dict[str, str], want: tuple[object, int, int]
) -> None:
    start = parse_raw_start(text, query, "stream")
    assert (start.call_id, start.rate, start.channels) == want


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"sampleRate": 4000}', "sample rate 4000 Hz is not supported"),
        ('{"sampleRate": 384000}', "sample rate 384000 Hz is not supported"),
        ('{"channels": 3}', "3 channels"),
        ('{"channels": "two"}', "two channels; 1 .* or 2"),
    ],
)
def test_raw_stream_bad_metadata(text: str, message: str) -> None:
    with pytest.raises(TransportError, match=message):
        parse_raw_start(text, {}, "stream")


@given(
    st.text(max_size=120), st.dictionaries(st.sampled_from(["rate", "mix"]), st.text(max_size=8))
)
def test_raw_stream_metadata_never_fails_otherwise(text: str, query: dict[str, str]) -> None:
    try:
        start = parse_raw_start(text, query, "stream")
    except TransportError as exc:
        assert str(exc).startswith("stream: ")
    else:
        assert start.channels in (1, 2)


def test_hanging_up_a_stream_plays_out_its_jitter_buffer() -> None:
    """DELETE /v1/calls/{id} or shutdown mid-stream: the frames held for reordering (Telnyx) are
    transcribed before the call ends, as at the stream's own ``stop``."""
    call = Call("c", PCMU, capture_events(), FakeClock(), transport="telnyx")
    registry = SimpleNamespace(open=lambda *a, **kw: call)
    stream = JsonStreamSession(SimpleNamespace(app={REGISTRY: registry}), "telnyx")  # type: ignore[arg-type]
    stream.handle(StreamStart("c", PCMU, {}))
    for seq in (0, 1, 3, 4):  # frame 2 is late: the start is still held to be reordered
        stream.handle(StreamMedia(seq, 20 * seq, "inbound", b"\xff" * 160))
    assert call.stats.packets == 0
    call.hangup("hangup")
    assert (call.end_reason, call.stats.packets) == ("hangup", 4)


def test_every_documented_event_is_known_and_others_are_not() -> None:
    """Twilio: connected, start, media, dtmf, mark, stop; Telnyx adds error (its payload is kept
    for the log). Anything else is counted on the call as ``unknown_message``."""
    assert parse_twilio('{"event": "mark", "mark": {"name": "x"}}') == StreamOther("mark")
    assert parse_twilio('{"event": "surprise"}') == StreamOther("surprise", known=False)
    assert parse_telnyx('{"event": "mark"}') == StreamOther("mark")
    error = parse_telnyx('{"event": "error", "payload": {"code": 100002, "title": "Unknown"}}')
    assert isinstance(error, StreamOther) and error.known and "100002" in error.detail
    assert parse_twilio('{"event": "error"}') == StreamOther("error", known=False)
