"""What callers said stays out of INFO logs; the call's lifecycle stays in them."""

from __future__ import annotations

from structlog.testing import capture_logs

from tests.unit.test_call import ScriptedStream, frame, started
from voxphone.app import EventLog
from voxphone.clock import FakeClock
from voxphone.config import Config
from voxphone.engines.base import TranscriptChunk
from voxphone.events.model import EventSequencer


def test_transcripts_are_logged_at_debug_only() -> None:
    seq = EventSequencer("c", FakeClock())
    with capture_logs() as logs:
        for type_, data in [("transcript.final", {"text": "my card number is"}),
                            ("call.ended", {"reason": "bye", "transcript": "my card number is"})]:  # fmt: skip
            EventLog().publish(seq.next(type_, data))
    assert logs and {entry["log_level"] for entry in logs} == {"debug"}


async def test_call_lifecycle_is_logged_at_info_without_words() -> None:
    stream = ScriptedStream()
    with capture_logs() as logs:
        call, _ = started(stream)
        call.push_pcm(0, frame(1))
        stream.out.put(TranscriptChunk(segment_end=True, text="secret words"))
        stream.out.close()
        call.end("hangup")
        await call.wait()
    info = [e for e in logs if e["log_level"] == "info"]
    assert [e["event"] for e in info] == ["call_started", "call_ended"]
    assert "secret words" not in repr(info)


def test_audiosocket_is_off_unless_configured() -> None:
    assert Config().asterisk.audiosocket_port == 0
