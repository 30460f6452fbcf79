"""A Call's promises with a scripted engine: one ``call.ended`` whatever fails, nothing streamed
is lost, frames dropped under engine lag are counted."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np
import pytest
from structlog.testing import capture_logs

from tests.hooks import until
from voxphone import call as call_module
from voxphone.audio.codecs import L16_16K, OPUS, PCMU, Codec, Pcm
from voxphone.call import Call
from voxphone.clock import FakeClock, SystemClock
from voxphone.engines.base import ChunkQueue, TranscriptChunk
from voxphone.errors import DecodeError, EngineError
from voxphone.testing import CapturedEvents, capture_events


class ScriptedStream:
    """An engine stream whose output the test writes; ``send`` waits while ``gate`` is clear."""

    def __init__(self, fail_send: BaseException | None = None) -> None:
        self.out = ChunkQueue()
        self.bug: BaseException | None = None  # raised by ``chunks`` once its output is read
        self.received: list[Pcm] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.closed = self.aborted = False
        self._fail_send = fail_send

    async def send(self, frame: Pcm) -> None:
        if self._fail_send is not None:
            raise self._fail_send
        await self.gate.wait()
        self.received.append(frame)

    async def close(self) -> None:
        self.closed = True

    async def abort(self) -> None:
        self.aborted = True

    async def chunks(self) -> AsyncIterator[TranscriptChunk]:
        async for chunk in self.out:
            yield chunk
        if self.bug is not None:
            raise self.bug

    def stats(self) -> dict[str, int]:
        return {}


class ScriptedEngine:
    name = "scripted"

    def __init__(self, stream: ScriptedStream) -> None:
        self.stream = stream

    async def start(self) -> None: ...

    async def open_stream(self, call_id: str) -> ScriptedStream:
        return self.stream

    async def stop(self) -> None: ...


def frame(value: int) -> Pcm:
    return np.full(1280, value, np.int16)


def started(stream: ScriptedStream, **kwargs: float) -> tuple[Call, CapturedEvents]:
    sink = capture_events()
    call = Call("c", L16_16K, sink, SystemClock(), transport="test", **kwargs)  # type: ignore[arg-type]
    call.start(ScriptedEngine(stream))
    return call, sink


async def end_by_engine_failure(call: Call) -> None:
    """Start ``call`` on an engine whose stream fails at once; return once ``call.ended`` is
    out (the call ends without its transport's doing)."""
    stream = ScriptedStream()
    call.start(ScriptedEngine(stream))
    stream.out.fail(EngineError("worker died"))
    await call.wait()


def types(sink: CapturedEvents) -> list[str]:
    return [e.type for e in sink.events]


class Boom(RuntimeError):
    pass


async def test_an_unexpected_error_in_the_engine_output_ends_the_call_once() -> None:
    stream = ScriptedStream()
    call, sink = started(stream)
    stream.out.put(TranscriptChunk(delta="hello"))
    stream.out.put(TranscriptChunk(delta=" world"))
    stream.bug = Boom("bug")
    with capture_logs() as logs:
        stream.out.close()
        await asyncio.wait_for(call.wait(), 5)
    assert types(sink).count("call.ended") == 1
    ended = sink.events[-1].data
    assert ended["reason"] == "internal_error"
    assert ended["transcript"] == "hello world"  # the streamed words became a final
    assert sink.of_type("transcript.final")[0].data["text"] == "hello world"
    failed = [e for e in logs if e["event"] == "call_failed"]
    assert len(failed) == 1 and isinstance(failed[0]["exc_info"], Boom)


async def test_an_unexpected_error_while_sending_audio_ends_the_call_once() -> None:
    stream = ScriptedStream(fail_send=Boom("bug in send"))
    call, sink = started(stream)
    call.push_pcm(0, frame(1))  # the call is live: no hang-up will come to unblock it
    await asyncio.wait_for(call.wait(), 5)
    assert types(sink) == ["call.started", "call.ended"]
    assert sink.events[-1].data["reason"] == "internal_error"


async def test_an_engine_error_keeps_what_was_streamed() -> None:
    stream = ScriptedStream()
    call, sink = started(stream)
    stream.out.put(TranscriptChunk(delta="my order"))
    stream.out.fail(EngineError("worker died"))
    await asyncio.wait_for(call.wait(), 5)
    assert types(sink) == [
        "call.started", "transcript.delta", "engine.error", "transcript.final", "call.ended"
    ]  # fmt: skip
    assert sink.events[-1].data["reason"] == "engine_error"
    assert sink.events[-1].data["transcript"] == "my order"


async def test_the_flush_deadline_ends_the_call_with_what_was_streamed() -> None:
    stream = ScriptedStream()  # an engine that never finishes its last segment
    call, sink = started(stream, end_timeout_s=0.2)
    call.push_pcm(0, frame(1))
    await until(lambda: stream.received)
    stream.out.put(TranscriptChunk(delta="status of"))
    stream.out.put(TranscriptChunk(delta=" my"))
    await until(lambda: len(sink.of_type("transcript.delta")) == 2)
    call.end("hangup")
    await asyncio.wait_for(call.wait(), 5)
    assert stream.closed and stream.aborted
    assert types(sink)[-3:] == ["engine.error", "transcript.final", "call.ended"]
    error = sink.of_type("engine.error")[0].data
    assert error["recovered"] is False and "did not finish" in error["message"]
    final = sink.of_type("transcript.final")[0].data
    assert final["text"] == "status of my" and final["segment_id"] == 0
    ended = sink.events[-1].data
    assert ended["reason"] == "hangup" and ended["transcript"] == "status of my"


async def test_frames_are_dropped_oldest_first_and_counted_when_the_engine_lags() -> None:
    stream = ScriptedStream()
    stream.gate.clear()  # the engine stops taking audio
    call, sink = started(stream, max_queued_frames=10)
    call.push_pcm(0, frame(0))
    await until(lambda: not call._frames)  # the feeder holds frame 0, waiting on the engine
    for i in range(1, 26):  # 25 more frames arrive, at the transport's pace, never blocking
        call.push_pcm(i * 1280, frame(i))
    stream.gate.set()
    call.end("hangup")
    stream.out.close()
    await asyncio.wait_for(call.wait(), 5)
    got = [int(f[0]) for f in stream.received]
    assert got == [0, *range(16, 26)]  # the newest 10 survive the lag; 1..15 were dropped
    assert sink.events[-1].data["stats"]["dropped_frames"] == 15


async def test_a_drain_that_times_out_keeps_what_was_streamed() -> None:
    stream = ScriptedStream()  # an engine that never finishes
    call, sink = started(stream)
    stream.out.put(TranscriptChunk(delta="call me back"))
    await until(lambda: sink.of_type("transcript.delta"))
    call.end("shutdown")
    await asyncio.wait_for(
        call.abort("shutdown"), 5
    )  # what CallRegistry.drain does at its deadline
    assert types(sink)[-3:] == ["engine.error", "transcript.final", "call.ended"]
    assert "shutdown deadline" in sink.of_type("engine.error")[0].data["message"]
    ended = sink.events[-1].data
    assert ended["reason"] == "shutdown" and ended["transcript"] == "call me back"


@pytest.mark.parametrize("failed", [True, False], ids=["engine-error", "engine-ended"])
async def test_a_file_waiting_for_room_stops_when_the_engine_stops(failed: bool) -> None:
    stream = ScriptedStream()
    stream.gate.clear()  # the engine takes one frame and stalls
    call, sink = started(stream, max_queued_frames=5)
    feeding = asyncio.create_task(call.feed_pcm(np.zeros(30 * 1280, np.int16)))
    await until(lambda: len(call._frames) == 5)  # the file waits for room
    if failed:
        stream.out.fail(EngineError("worker died"))
    else:
        stream.out.close()  # the engine ends the stream on its own
    await asyncio.wait_for(call.wait(), 5)
    await asyncio.wait_for(feeding, 5)  # and does not wait forever
    assert sink.events[-1].data["reason"] == ("engine_error" if failed else "ended")


async def test_audio_fed_after_the_end_is_neither_decoded_nor_counted() -> None:
    """A file's feeder that goes on after the hang-up (``max_duration``, Ctrl-C) while the
    engine says its last words: ``call.ended.audio_ms`` and ``packets`` are the audio the call
    took, not what was offered after it (a 0.5 s call once reported 960 ms)."""
    stream = ScriptedStream()
    stream.out.close()  # the engine has nothing to say
    stream.gate.clear()  # and is slow to take the last frames, so the call ends late
    call, sink = started(stream)
    await call.feed_pcm(np.zeros(4 * 1280, np.int16))
    await call.feed_packet(0, np.zeros(1280, np.int16).tobytes())
    call.end("max_duration")
    await call.feed_pcm(np.zeros(10 * 1280, np.int16))
    await call.feed_packet(1280, np.zeros(1280, np.int16).tobytes())
    stream.gate.set()
    await asyncio.wait_for(call.wait(), 5)
    ended = sink.events[-1].data
    assert ended["audio_ms"] == 5 * 80 and ended["stats"]["packets"] == 1


async def test_a_file_ended_while_it_waits_for_room_counts_only_what_the_engine_got() -> None:
    """The feeder waits for room before it decodes, so audio it never queues (the call ended
    during the wait) is not in ``audio_ms`` (it once counted all 30 frames offered)."""
    stream = ScriptedStream()
    stream.gate.clear()  # the engine takes one frame and stalls
    call, sink = started(stream, max_queued_frames=5)
    feeding = asyncio.create_task(call.feed_pcm(np.zeros(30 * 1280, np.int16)))
    await until(lambda: len(call._frames) >= 5)  # the file waits for room
    call.end("hangup")
    await asyncio.wait_for(feeding, 5)
    stream.gate.set()
    await until(lambda: stream.closed)  # every queued frame sent, then the stream closed
    stream.out.close()
    await asyncio.wait_for(call.wait(), 5)
    ended = sink.events[-1].data
    assert 5 <= len(stream.received) < 30
    assert ended["audio_ms"] == len(stream.received) * 80


async def test_max_duration_hangs_up_through_the_transport() -> None:
    """``max_duration`` goes through ``call.hangup``, so the transport stops the media too (an
    RTP port refuses the rest of the stream instead of opening a new call with it)."""
    sink = capture_events()
    call = Call("c", L16_16K, sink, SystemClock(), transport="test", max_duration_s=0.01)
    hung_up: list[str] = []

    def hangup(reason: str) -> None:  # as a transport's: stop the media, then end the call
        hung_up.append(reason)
        call.end(reason)

    call.hangup = hangup
    call.start(ScriptedEngine(ScriptedStream()))
    await until(lambda: call.end_reason is not None)
    assert hung_up == ["max_duration"]
    await call.wait()


async def test_a_final_says_how_long_after_its_last_audio_arrived_it_came() -> None:
    """``latency_ms``: from the arrival of the frame holding ``end_ms`` to the final; absent
    when the engine gives no end."""
    clock = FakeClock()
    stream = ScriptedStream()
    sink = capture_events()
    call = Call("c", L16_16K, sink, clock, transport="test")
    call.start(ScriptedEngine(stream))
    for i in range(3):  # frames 1..3 arrive at t, t + 0.1, t + 0.2
        call.push_pcm(i * 1280, frame(1))
        clock.advance(0.1)
    await until(lambda: len(stream.received) == 3)
    clock.advance(0.4)  # now = frame 2's arrival + 0.6 s
    stream.out.put(TranscriptChunk(segment_end=True, text="hi", start_ms=0, end_ms=150))
    stream.out.put(TranscriptChunk(segment_end=True, text="there"))  # no end_ms
    # Past the last frame (Voxtral's steps round up): timed from the last frame, t + 0.2.
    stream.out.put(TranscriptChunk(segment_end=True, text="you", start_ms=200, end_ms=250))
    await until(lambda: len(sink.of_type("transcript.final")) == 3)
    first, second, third = sink.of_type("transcript.final")
    assert first.data["latency_ms"] == 600
    assert "latency_ms" not in second.data
    assert third.data["latency_ms"] == 500
    stream.out.close()
    call.end("hangup")
    await asyncio.wait_for(call.wait(), 5)


async def test_latency_is_timed_only_from_the_frames_still_remembered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Arrival times are kept for the last ``ARRIVALS_KEPT`` frames (a ring, so a long call's
    memory stays fixed): a final ending in an older frame has no ``latency_ms``."""
    monkeypatch.setattr(call_module, "ARRIVALS_KEPT", 4)
    clock = FakeClock()
    stream = ScriptedStream()
    sink = capture_events()
    call = Call("c", L16_16K, sink, clock, transport="test")
    call.start(ScriptedEngine(stream))
    for i in range(6):  # frames 1..6 arrive at t, t + 0.1, ... t + 0.5
        call.push_pcm(i * 1280, frame(1))
        clock.advance(0.1)
    await until(lambda: len(stream.received) == 6)
    stream.out.put(TranscriptChunk(segment_end=True, text="old", start_ms=0, end_ms=160))
    stream.out.put(TranscriptChunk(segment_end=True, text="kept", start_ms=0, end_ms=240))
    await until(lambda: len(sink.of_type("transcript.final")) == 2)
    old, kept = sink.of_type("transcript.final")
    assert "latency_ms" not in old.data  # frame 2: overwritten by frame 6
    assert kept.data["latency_ms"] == 400  # frame 3 arrived at t + 0.2; now is t + 0.6
    stream.out.close()
    call.end("hangup")
    await asyncio.wait_for(call.wait(), 5)


def test_a_format_switch_with_no_decoder_here_is_counted_not_raised(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``push_packet`` never raises: a payload format the pipeline cannot switch to (its decoder
    cannot be made here) is counted ``undecodable`` like a payload it cannot decode."""
    call = Call("c", PCMU, capture_events(), FakeClock(), transport="rtp")

    def refuse(codec: Codec) -> list[Pcm]:
        raise DecodeError(f"no decoder for {codec.name}")

    monkeypatch.setattr(call.pipeline, "switch", refuse)
    call.push_packet(0, bytes(160), OPUS)
    assert call.stats.dropped == {"undecodable": 1} and call.stats.decode_errors == 1


async def test_a_transports_last_word_comes_before_call_ended_however_the_call_ends() -> None:
    """``on_finish`` hooks run once, in order, before ``call.ended`` is built: an engine that
    fails ends the call without its transport, whose counters still reach the event. A hook
    that raises is logged; the call ends all the same."""
    stream = ScriptedStream()
    call, sink = started(stream)
    ran: list[str] = []

    def report() -> None:
        ran.append("report")
        call.transport_stats["lost"] = 3

    def broken() -> None:
        ran.append("broken")
        raise Boom("bug in a transport")

    call.on_finish(broken)
    call.on_finish(report)
    with capture_logs() as logs:
        stream.out.fail(EngineError("worker died"))
        await asyncio.wait_for(call.wait(), 5)
    assert ran == ["broken", "report"]
    ended = sink.events[-1].data
    assert (ended["reason"], ended["transport"]) == ("engine_error", {"lost": 3})
    assert [e["event"] for e in logs].count("transport_finish_failed") == 1
    assert call._on_finish == []  # let go of: they hold the transport, which holds the call


class NowStream(ScriptedStream):
    """A stream that can take a frame at once (``SendsNow``) while ``take_now`` is set; says
    which way each frame came."""

    def __init__(self, fail_now: BaseException | None = None) -> None:
        super().__init__()
        self.take_now = True
        self.ways: list[str] = []
        self._fail_now = fail_now

    async def send(self, frame: Pcm) -> None:
        await super().send(frame)
        self.ways.append("send")

    def send_nowait(self, frame: Pcm) -> bool:
        if self._fail_now is not None:
            raise self._fail_now
        if not self.take_now:
            return False
        self.received.append(frame)
        self.ways.append("now")
        return True


async def test_frames_go_straight_to_a_stream_that_takes_them_at_once_and_stay_in_order() -> None:
    stream = NowStream()
    call, sink = started(stream)
    await until(lambda: call._more is not None)  # the feeder waits on an empty queue
    for i in range(3):
        call.push_pcm(i * 1280, frame(i))
    assert len(stream.received) == 3  # handed over in the transport's call, no task woken
    stream.take_now = False  # the engine would have to wait: the feeder sends these
    call.push_pcm(3 * 1280, frame(3))
    call.push_pcm(4 * 1280, frame(4))
    stream.take_now = True
    call.push_pcm(5 * 1280, frame(5))  # queued behind 3 and 4, not sent past them
    await until(lambda: len(stream.received) == 6)
    call.push_pcm(6 * 1280, frame(6))  # the queue is empty again: at once
    assert [int(f[0]) for f in stream.received] == list(range(7))
    assert stream.ways == ["now"] * 3 + ["send"] * 3 + ["now"]
    call.end("hangup")
    stream.out.close()
    await asyncio.wait_for(call.wait(), 5)
    assert stream.closed and call.frames_sent == 7
    assert sink.events[-1].data["stats"]["dropped_frames"] == 0


async def test_an_unexpected_error_while_handing_a_frame_over_ends_the_call_once() -> None:
    stream = NowStream(fail_now=Boom("bug in send_nowait"))
    call, sink = started(stream)
    await until(lambda: call._more is not None)
    with capture_logs() as logs:
        call.push_pcm(0, frame(1))  # raised here, it must not reach the transport
        await asyncio.wait_for(call.wait(), 5)
    assert types(sink) == ["call.started", "call.ended"]
    assert sink.events[-1].data["reason"] == "internal_error"
    assert [type(e["exc_info"]) for e in logs if e["event"] == "call_failed"] == [Boom]


async def test_no_frame_overtakes_one_the_feeder_is_sending() -> None:
    stream = NowStream()
    call, _ = started(stream)
    await until(lambda: call._more is not None)
    stream.take_now, stream.gate = False, asyncio.Event()  # the engine would make it wait
    call.push_pcm(0, frame(0))
    await until(lambda: call._more is None and not call._frames)  # the feeder is in ``send``
    stream.take_now = True
    call.push_pcm(1280, frame(1))  # queued behind frame 0, though the stream would take it now
    stream.gate.set()
    await until(lambda: len(stream.received) == 2)
    assert [int(f[0]) for f in stream.received] == [0, 1]
    call.end("hangup")
    stream.out.close()
    await asyncio.wait_for(call.wait(), 5)


async def test_no_frame_goes_to_a_stream_whose_engine_has_failed() -> None:
    stream = NowStream()
    call, sink = started(stream)
    await until(lambda: call._more is not None)
    stream.out.fail(EngineError("worker died"))
    await asyncio.sleep(0)  # the reader raises; the feeder is cancelled
    await asyncio.sleep(0)
    assert call.end_reason is None  # not yet ended: packets still arrive in this window
    call.push_pcm(0, frame(7))
    await asyncio.wait_for(call.wait(), 5)
    assert sink.events[-1].data["reason"] == "engine_error"
    assert stream.received == []
