"""The /v1/realtime protocol codec, and the Voxtral segmenter, without sockets."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from voxphone.engines import realtime_protocol as rp
from voxphone.engines.voxtral import Segmenter, VoxtralSettings
from voxphone.errors import EngineError


def test_client_messages_match_vllm_protocol() -> None:
    assert json.loads(rp.session_update("m")) == {"type": "session.update", "model": "m"}
    assert json.loads(rp.commit()) == {"type": "input_audio_buffer.commit", "final": False}
    assert json.loads(rp.commit(final=True))["final"] is True
    pcm = np.array([1, -2, 256], np.int16)
    msg = json.loads(rp.append(pcm))
    assert msg["type"] == "input_audio_buffer.append"
    assert base64.b64decode(msg["audio"]) == b"\x01\x00\xfe\xff\x00\x01"  # PCM16 little-endian


@pytest.mark.parametrize(
    ("raw", "event"),
    [
        ('{"type":"session.created","id":"sess-1","created":1}', rp.SessionCreated("sess-1")),
        ('{"type":"transcription.delta","delta":""}', rp.Delta("")),
        ('{"type":"transcription.delta","delta":" hi"}', rp.Delta(" hi")),
        (
            '{"type":"transcription.done","text":"hi","usage":{"prompt_tokens":39,"completion_tokens":5}}',
            rp.Done("hi", 39, 5),
        ),
        ('{"type":"transcription.done","text":"hi","usage":null}', rp.Done("hi", None, None)),
        (
            '{"type":"error","error":"bad","code":"invalid_audio"}',
            rp.ServerError("bad", "invalid_audio"),
        ),
        ('{"type":"session.updated"}', rp.Unknown("session.updated")),
    ],
)
def test_server_events_decode(raw: str, event: rp.ServerEvent) -> None:
    assert rp.parse(raw) == event


@pytest.mark.parametrize(
    ("code", "action"),
    [
        ("invalid_audio", rp.ErrorAction.CONTINUE),
        ("processing_error", rp.ErrorAction.RECONNECT),
        ("model_not_found", rp.ErrorAction.FATAL),
        ("model_not_validated", rp.ErrorAction.FATAL),
        (None, rp.ErrorAction.RECONNECT),
        ("something_new", rp.ErrorAction.RECONNECT),
    ],
)
def test_every_error_code_has_an_action(code: str | None, action: rp.ErrorAction) -> None:
    assert rp.ServerError("x", code).action is action


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("{nope", "invalid JSON"),
        ("[1]", "has no 'type'"),
        ('{"type":"transcription.delta"}', "'delta' must be a string"),
        ('{"type":"transcription.done","text":5}', "'text' must be a string"),
    ],
)
def test_malformed_server_events_are_precise_errors(raw: str, message: str) -> None:
    with pytest.raises(EngineError, match=message):
        rp.parse(raw)


@given(st.one_of(st.text(max_size=80), st.binary(max_size=80)))
def test_parse_never_fails_otherwise(raw: str | bytes) -> None:
    try:
        event = rp.parse(raw)
    except EngineError as exc:
        assert str(exc).startswith("realtime ")
    else:
        assert isinstance(
            event, rp.SessionCreated | rp.Delta | rp.Done | rp.ServerError | rp.Unknown
        )


def test_segmenter_closes_on_pause_with_times() -> None:
    seg = Segmenter(pause_steps=3)
    seg.new_session(offset_ms=1000)
    out = []
    for i, text in enumerate(["", " Hello", " there", "", "", "", "", " again", ""]):
        out += seg.step(i, text)
    out += seg.close()
    assert [c.delta for c in out if c.delta] == ["Hello", " there", "again"]
    finals = [c for c in out if c.segment_end]
    assert [(c.text, c.start_ms, c.end_ms) for c in finals] == [
        ("Hello there", 1080, 1240),
        ("again", 1560, 1640),
    ]


def test_segmenter_cuts_speech_without_pauses_at_the_next_word_past_max_segment() -> None:
    seg = Segmenter(pause_steps=3, max_segment_ms=200)
    out = []
    for i, text in enumerate([" One", " two", " th", "ree", " four", " five", "s", " six", ""]):
        out += seg.step(i, text)
    out += seg.close()
    finals = [(c.text, c.start_ms, c.end_ms) for c in out if c.segment_end]
    # 200 ms are reached inside "three": the cut waits for the next word.
    assert finals == [("One two three", 0, 320), ("four fives", 320, 560), ("six", 560, 640)]
    assert "".join(c.delta for c in out) == "One two three" + "four fives" + "six"


def test_hard_step_limit_respects_max_model_len_and_seconds() -> None:
    assert VoxtralSettings(max_session_s=600, max_model_len=45_000).hard_steps == 7500
    assert VoxtralSettings(max_session_s=600, max_model_len=1024).hard_steps == 1024 - 39 - 17 - 8
