"""Twilio Media Streams messages, as Twilio documents them (numbers arrive as strings)."""

from __future__ import annotations

import base64
import functools
import json
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.unit.test_call import end_by_engine_failure
from voxphone.audio.codecs import PCMU, Codec
from voxphone.call import Call
from voxphone.clock import FakeClock
from voxphone.errors import TransportError
from voxphone.http.api import REGISTRY
from voxphone.testing import capture_events
from voxphone.transports.mediastream import (
    JSON_STREAMS,
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


class RecordingCall(Call):
    """A real call that also keeps what the stream handed it (``push_packet``'s arguments) and
    the events it published."""

    def __init__(self, call_id: str, codec: Codec, transport: str) -> None:
        self.events = capture_events()
        super().__init__(call_id, codec, self.events, FakeClock(), transport=transport)
        self.packets: list[tuple[int, bytes]] = []

    def push_packet(self, timestamp: int, payload: bytes, codec: Codec | None = None) -> None:
        self.packets.append((timestamp, payload))
        super().push_packet(timestamp, payload, codec)


def recording_session(vendor: str) -> tuple[JsonStreamSession, list[RecordingCall]]:
    calls: list[RecordingCall] = []

    def open_call(codec: Codec, *, transport: str, metadata: Any, call_id: str) -> Call:
        calls.append(RecordingCall(call_id, codec, transport))
        return calls[-1]

    registry = SimpleNamespace(open=open_call)
    return JsonStreamSession(SimpleNamespace(app={REGISTRY: registry}), vendor), calls  # type: ignore[arg-type]


def media_text(vendor: str, seq: Any, ts_ms: Any, track: Any = "inbound") -> str:
    """A media message as the vendor sends it (numbers as strings unless given otherwise), 20 ms
    of µ-law whose bytes tell the frames apart."""
    payload = base64.b64encode(bytes([seq if isinstance(seq, int) else 7]) * 160).decode()
    body = {"chunk": "1", "timestamp": ts_ms, "payload": payload}
    if track is not None:
        body["track"] = track
    key = "sequence_number" if vendor == "telnyx" else "sequenceNumber"
    return json.dumps({"event": "media", key: seq, "media": body})


TELNYX_L16 = {
    **TELNYX_START,
    "start": {**TELNYX_START["start"], "media_format": {"encoding": "L16", "sample_rate": 16000}},
}


#: The starts a stream's feed is tried with: the clocks of 8 and 16 kHz.
STARTS = [("twilio", START), ("telnyx", TELNYX_START), ("telnyx", TELNYX_L16)]


def mixed_messages(vendor: str, start: dict[str, Any]) -> list[str]:
    """Early media and an unknown event before ``start``, then media in order, duplicated,
    reordered, with a gap, on another track, without a track, with numbers as numbers, among
    ``dtmf``, ``mark`` and unknown events, then ``stop``."""
    m = functools.partial(media_text, vendor)
    return [
        '{"event": "connected", "protocol": "Call", "version": "1.0.0"}',
        m("2", "0"),
        '{"event": "surprise"}',
        json.dumps(start),
        *(m(str(s), str(20 * (s - 2))) for s in (3, 4, 4, 6, 5, 7, 10, 11, 12, 13, 14, 15, 16)),
        m("17", "300", "outbound"),
        m("17", "300", "inbound_track"),
        m("18", "320", None),
        m(19, 340),
        m("3", "20"),  # a copy of one played long ago
        '{"event": "dtmf", "dtmf": {"track": "inbound_track", "digit": "5"}}',
        '{"event": "mark", "mark": {"name": "x"}}',
        '{"event": "surprise"}',
        m("20", "360"),
        '{"event": "stop", "stop": {}}',
    ]


def outcome(session: JsonStreamSession, calls: list[RecordingCall]) -> dict[str, Any]:
    """Everything a stream hands on: what each call was given and counted, and its events."""
    session.finish()
    return {
        "reason": session.reason,
        "other_tracks": session.other_tracks,
        "calls": [
            (c.packets, c.stats, c.transport_stats, c.end_reason, c.pipeline.framer.frames_out,
             [(e.type, e.data) for e in c.events.events])
            for c in calls
        ],
    }  # fmt: skip


@pytest.mark.parametrize(("vendor", "start"), STARTS)
def test_feed_is_handle_of_parse(vendor: str, start: dict[str, Any]) -> None:
    """``feed`` (the websocket handler's entry, with its fast path for in-order media) leaves
    the call exactly as ``handle(parse(text))`` does: the same packets, counters and events."""
    fast, fast_calls = recording_session(vendor)
    general, general_calls = recording_session(vendor)
    for text in mixed_messages(vendor, start):
        fast.feed(text)
        general.handle(JSON_STREAMS[vendor].parse(text))
    got, want = outcome(fast, fast_calls), outcome(general, general_calls)
    assert got == want
    ((packets, stats, transport_stats, _, _, events),) = got["calls"]
    assert [(kind, data["digit"]) for kind, data in events] == [("dtmf", "5")]
    assert len(packets) == 17 and got["other_tracks"] == 1
    assert stats.dropped == {"unknown_message": 2}
    assert transport_stats["duplicates"] == 2 and transport_stats["reordered"] >= 1


@given(
    st.lists(
        st.tuples(st.integers(0, 12), st.sampled_from(["inbound", "inbound", "outbound"])),
        max_size=40,
    ),
    st.sampled_from(STARTS),
)
def test_feed_is_handle_of_parse_for_any_arrival_order(
    arrivals: list[tuple[int, str]], stream: tuple[str, dict[str, Any]]
) -> None:
    """Media in any order, with copies, gaps and other tracks, after ``start`` (8 and 16 kHz
    clocks): the same calls."""
    vendor, start = stream
    fast, fast_calls = recording_session(vendor)
    general, general_calls = recording_session(vendor)
    texts = [json.dumps(start)] + [media_text(vendor, str(s), str(20 * s), t) for s, t in arrivals]
    for text in texts:
        fast.feed(text)
        general.handle(JSON_STREAMS[vendor].parse(text))
    assert outcome(fast, fast_calls) == outcome(general, general_calls)


def fed_as_parsed(vendor: str, texts: list[str]) -> None:
    """Each text through ``feed`` on one session, through ``handle(parse())`` on another, once
    play-out is under way: the same error (or none) each time, and the same calls at the end."""
    fast, fast_calls = recording_session(vendor)
    general, general_calls = recording_session(vendor)
    start = json.dumps(TELNYX_START if vendor == "telnyx" else START)
    playing = [media_text(vendor, str(n), str(20 * n)) for n in range(1, 9)]
    for text in [start, *playing, *texts]:
        errors = []
        for take in (fast.feed, lambda t: general.handle(JSON_STREAMS[vendor].parse(t))):
            try:
                take(text)
            except TransportError as exc:
                errors.append(str(exc))
            else:
                errors.append("")
        assert errors[0] == errors[1], text
    assert outcome(fast, fast_calls) == outcome(general, general_calls)


@pytest.mark.parametrize("vendor", ["twilio", "telnyx"])
@pytest.mark.parametrize(
    "text",
    [
        "{oops", "[1, 2]", '"media"', "null", '{"SEQ": "1"}',
        '{"event": "media", "SEQ": "1"}',
        '{"event": "media", "SEQ": "1", "media": []}',
        '{"SEQ": "1", "media": {"timestamp": "0", "payload": "AA=="}}',
        '{"event": "media", "SEQ": "x", "media": {"timestamp": "0", "payload": "AA=="}}',
        '{"event": "media", "SEQ": "1", "media": {"timestamp": "0", "payload": "!!"}}',
        '{"event": "media", "SEQ": "1", "media": {"timestamp": "0", "payload": ""}}',
        '{"event": "media", "SEQ": "1", "media": {"timestamp": "0", "payload": 5}}',
        '{"event": "media", "SEQ": "1", "media": {"timestamp": "0", "payload": "0000="}}',
        '{"event": "media", "SEQ": "1", "media": {"timestamp": "x", "payload": "AA==", "track": "outbound"}}',
        '{"event": "media", "SEQ": "1", "media": {"timestamp": "0", "payload": "AA==", "track": "outbound"}, "x": "é"}',
        '{"event": "media", "SEQ": "1", "media": {"timestamp": "0", "payload": "AA=="}, "x": 1e400}',
        '{"event": "media", "SEQ": "1", "media": {"timestamp": "0", "payload": "AA==", "chunk": 1e400}}',
        # beyond 64 bits: orjson reads a float (2**70), int() of it leaves no low bits
        '{"event": "media", "SEQ": 1180591620717411303429, "media": {"timestamp": "0", "payload": "AA=="}}',
        '{"event": "media", "SEQ": "9", "media": {"timestamp": 1180591620717411303604, "payload": "AA=="}}',
        # msgspec's lax integers, in the fast path and the other alike; one beyond 64 bits
        '{"event": "media", "SEQ": "1e1", "media": {"timestamp": "2.0e2", "payload": "AA=="}}',
        '{"event": "media", "SEQ": 11, "media": {"timestamp": 220, "payload": "AA=="}}',
        '{"event": "media", "SEQ": "9223372036854775819", "media": {"timestamp": "0", "payload": "AA=="}}',
        '{"event": "dtmf", "SEQ": "1", "media": {"timestamp": "0", "payload": "AA=="}, "event": "media"}',
        '{"event": "media", "SEQ": "1", "media": {"timestamp": "0", "payload": "AA=="}, "event": "dtmf"}',
        '{"event": "media", "SEQ": "1", "media": {"timestamp": "0", "payload": "é"}}',
        '{"event": "media", "SEQ": "1", "media": {"timestamp": "0", "payload": "AA=="}, "x": "\\ud800"}',
        '{"event": "media", "SEQ": "1", "media": {"timestamp": "0", "payload": "AA==", "x": 1e400}}',
        '{"event": "media", "SEQ": "1\ud800", "media": {"timestamp": "0", "payload": "AA=="}}',
        '{"event": "media", "SEQ": "1", "media": {"timestamp": "0", "payload": "AA=="}}' + " " * 3,
        '{"event": "media", "SEQ": "1", "media": {"timestamp": "0", "payload": "AA=="}} x',
        '{"event": "dtmf", "dtmf": {}}',
    ],
)  # fmt: skip
def test_feed_fails_as_parse_does(vendor: str, text: str) -> None:
    """A malformed message is the same one-line error through ``feed`` as through ``parse``,
    and a message that only the general parse accepts (a field more; a number the fast
    path's msgspec does not read, such as ``" 7"``) is taken as it takes it. ``SEQ`` is the
    vendor's sequence number key."""
    key = "sequence_number" if vendor == "telnyx" else "sequenceNumber"
    fed_as_parsed(vendor, [text.replace("SEQ", key)])
    session, _ = recording_session(vendor)  # before ``start`` as well
    try:
        JSON_STREAMS[vendor].parse(text.replace("SEQ", key))
    except TransportError as exc:
        with pytest.raises(TransportError) as got:
            session.feed(text.replace("SEQ", key))
        assert str(got.value) == str(exc)


ODD_NUMBERS = st.sampled_from(
    [10**30, 2.5, True, None, "x", " 7", "1_0", "2.0", "-3", 70000, "1e3", "4.5", 2.0, "+7",
     str(2**63), -(2**63), 2**63, 2**64]
)  # fmt: skip


@given(
    st.lists(
        st.fixed_dictionaries(
            {
                "sequence": st.integers(0, 12).map(str) | ODD_NUMBERS,
                "timestamp": st.integers(0, 300).map(str) | ODD_NUMBERS,
                "payload": st.sampled_from(["AA==", "/w==", "", "!!", "0000=", "Zh==", 5]),
                "track": st.sampled_from(["inbound", "inbound_track", "outbound", None, 5]),
                "extra": st.sampled_from(["", ', "chunk": "3"', ', "chunk": 3', ', "x": 1']),
            }
        ),
        max_size=30,
    ),
    st.sampled_from(["twilio", "telnyx"]),
)
def test_feed_is_handle_of_parse_for_any_media_message(
    messages: list[dict[str, Any]], vendor: str
) -> None:
    """Media messages with any values where numbers, base64 and tracks go, documented fields
    and others: ``feed`` errs, plays and counts as ``handle(parse())`` does."""
    key = "sequence_number" if vendor == "telnyx" else "sequenceNumber"
    texts = []
    for m in messages:
        media = {"timestamp": m["timestamp"], "payload": m["payload"], "track": m["track"]}
        text = json.dumps({"event": "media", key: m["sequence"], "media": media})
        texts.append(text[:-2] + m["extra"] + "}}")  # the extra field inside ``media``
    fed_as_parsed(vendor, texts)


async def test_a_call_whose_engine_fails_still_reports_the_streams_counters() -> None:
    """The call ends without the stream (its engine failed): ``call.ended.transport`` has the
    jitter buffer's counters all the same, and the frames it held for reordering are counted."""
    session, calls = recording_session("telnyx")
    session.feed(json.dumps(TELNYX_START))
    for seq in (1, 2, 4):  # 3 is missing: 4 is held
        session.feed(media_text("telnyx", str(seq), str(20 * seq)))
    (call,) = calls
    await end_by_engine_failure(call)
    ended = call.events.of_type("call.ended")[-1].data
    assert ended["reason"] == "engine_error"
    assert ended["transport"]["other_tracks"] == 0 and "lost" in ended["transport"]
    held = ended["stats"]["dropped"]["after_end"]  # (at a stream's start, Telnyx's too)
    assert held >= 1 and held + ended["stats"]["packets"] == 3
