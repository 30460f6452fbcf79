"""Twilio Media Streams messages, as Twilio documents them (numbers arrive as strings)."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from voxphone.errors import TransportError
from voxphone.transports.mediastream import (
    TwilioDtmf,
    TwilioMedia,
    TwilioOther,
    TwilioStart,
    TwilioStop,
    parse_twilio,
)

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
    ) == TwilioOther("connected")
    assert parse_twilio(json.dumps(START)) == TwilioStart(
        "CA123", START["streamSid"], "AC123", ("inbound",), {"tenant": "acme"}
    )
    media = {"event": "media", "sequenceNumber": "3", "streamSid": "MZ1",
             "media": {"track": "inbound", "chunk": "2", "timestamp": "40", "payload": base64.b64encode(b"\xff" * 160).decode()}}  # fmt: skip
    assert parse_twilio(json.dumps(media)) == TwilioMedia(3, 40, "inbound", b"\xff" * 160)
    dtmf = {
        "event": "dtmf",
        "streamSid": "MZ1",
        "sequenceNumber": "5",
        "dtmf": {"track": "inbound_track", "digit": "1"},
    }
    assert parse_twilio(json.dumps(dtmf)) == TwilioDtmf("1")
    assert (
        parse_twilio('{"event": "stop", "sequenceNumber": "9", "stop": {"callSid": "CA123"}}')
        == TwilioStop()
    )
    assert parse_twilio('{"event": "mark", "mark": {"name": "x"}}') == TwilioOther("mark")


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


@given(st.text(max_size=200))
def test_any_text_parses_or_fails_precisely(text: str) -> None:
    try:
        parse_twilio(text)
    except TransportError as exc:
        assert str(exc).startswith("twilio: ")
