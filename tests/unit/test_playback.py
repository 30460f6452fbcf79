"""Talk back: a call's outbound queue on the 20 ms clock, its events, clear, DTMF and hang-up,
through the in-memory endpoint (the contract a transport implements)."""

from __future__ import annotations

import asyncio
import gc
import weakref

import numpy as np
import pytest

from tests.conftest import Speech
from tests.hooks import until
from tests.unit.test_call import ScriptedEngine, ScriptedStream
from voxphone.audio.codecs import L16_16K
from voxphone.audio.files import read_audio
from voxphone.call import Call, CallRegistry
from voxphone.clock import SystemClock
from voxphone.errors import PlaybackError
from voxphone.playback import FRAME_MS, BargeIn, PlayoutTicker
from voxphone.testing import CapturedEvents, MemoryEndpoint, capture_events

RATE = 8000
FRAME = RATE * FRAME_MS // 1000


class EndingStream(ScriptedStream):
    """An engine stream that says its last words as soon as the audio ends."""

    async def close(self) -> None:
        self.closed = True
        self.out.close()


class EndingEngine(ScriptedEngine):
    """A fresh ``EndingStream`` per call."""

    def __init__(self) -> None:
        super().__init__(EndingStream())

    async def open_stream(self, call_id: str) -> ScriptedStream:
        return EndingStream()


def tone(ms: int, rate: int = RATE, value: int = 1000) -> np.ndarray:
    return np.full(rate * ms // 1000, value, np.int16)


def talking(
    endpoint: MemoryEndpoint | None = None, barge_in: BargeIn | None = None
) -> tuple[Call, MemoryEndpoint, PlayoutTicker, CapturedEvents]:
    """A started call with an in-memory endpoint on a ticker the test turns by hand."""
    sink = capture_events()
    ticker = PlayoutTicker(autostart=False)
    ep = endpoint or MemoryEndpoint(sample_rate=RATE)
    call = Call(
        "c", L16_16K, sink, SystemClock(), transport="test", ticker=ticker, barge_in=barge_in
    )
    call.start(EndingEngine())
    ep.on_hangup = call.end
    call.attach_endpoint(ep)
    return call, ep, ticker, sink


def playback_events(sink: CapturedEvents) -> list[tuple[str, dict[str, object]]]:
    return [(e.type, e.data) for e in sink.events if e.type.startswith("playback.")]


async def test_a_clip_goes_out_one_frame_per_tick_and_finishes() -> None:
    call, ep, ticker, sink = talking()
    playback = call.play(tone(100), RATE)
    assert len(ep.frames) == 1 and ep.frames[0][2]  # the first frame at once, a talkspurt start
    for _ in range(10):
        ticker.tick()
    assert len(ep.frames) == 5  # 100 ms = 5 frames, then nothing
    assert all(pcm.size == FRAME for _, pcm, _ in ep.frames)
    assert [first for _, _, first in ep.frames] == [True, False, False, False, False]
    assert not ticker.playouts  # idle calls cost the ticker nothing
    assert playback_events(sink) == [
        ("playback.started", {"playback_id": playback.id}),
        ("playback.finished", {"playback_id": playback.id, "played_ms": 100}),
    ]


async def test_a_second_play_queues_after_the_first_without_a_gap() -> None:
    call, ep, ticker, sink = talking()
    first = call.play(tone(30, value=1), RATE)
    second = call.play(tone(30, value=2), RATE)
    for _ in range(5):
        ticker.tick()
    audio = ep.audio()
    assert audio[:240].tolist() == [1] * 240 and audio[240:480].tolist() == [2] * 240
    assert [t for _, _, t in ep.frames].count(True) == 1  # one talkspurt
    assert [(t, d["playback_id"]) for t, d in playback_events(sink)] == [
        ("playback.started", first.id),
        ("playback.finished", first.id),
        ("playback.started", second.id),
        ("playback.finished", second.id),
    ]


async def test_audio_is_resampled_to_the_endpoints_rate() -> None:
    call, ep, ticker, _ = talking()
    t = np.arange(16000) / 16000
    call.play((np.sin(2 * np.pi * 440 * t) * 8000).astype(np.int16), 16000)  # 1 s at 16 kHz
    for _ in range(60):
        ticker.tick()
    audio = ep.audio()
    assert len(ep.frames) == 50 and audio.size == RATE
    spectrum = np.abs(np.fft.rfft(audio))
    assert abs(np.argmax(spectrum) * RATE / audio.size - 440) < 2


async def test_a_mark_fires_when_the_audio_before_it_has_been_sent() -> None:
    call, ep, ticker, sink = talking()
    stream = call.open_audio_stream(RATE)
    stream.write(tone(40))
    stream.mark("first")
    stream.write(tone(40))
    assert [t for t, _ in playback_events(sink)] == ["playback.started"]
    assert ep.marks == []
    ticker.tick()  # the second frame: the end of the first 40 ms
    assert playback_events(sink)[-1][0] == "playback.mark"
    assert playback_events(sink)[-1][1]["name"] == "first"
    # The transport got it right after that frame (Twilio's ``mark`` follows its media).
    assert ep.marks == ["first"] and len(ep.frames) == 2


async def test_marks_waiting_for_their_audio_are_counted() -> None:
    """What the audio socket bounds (``MAX_PENDING_MARKS``): marks kept until their frame."""
    call, _, _, _ = talking()
    stream = call.open_audio_stream(RATE)
    stream.write(tone(100))
    for name in ("a", "b"):
        stream.mark(name)
    assert call.playout is not None and call.playout.pending_marks == 2


async def test_a_mark_on_an_idle_call_fires_at_once() -> None:
    call, ep, _, sink = talking()
    call.mark("nothing-queued")
    assert ep.marks == ["nothing-queued"]
    assert playback_events(sink) == [
        ("playback.mark", {"playback_id": None, "name": "nothing-queued"})
    ]


@pytest.mark.parametrize("reason", ["api", "barge_in", "hangup"])
async def test_a_clear_answers_the_marks_it_drops(reason: str) -> None:
    """A bot waiting for a mark behind cleared audio is told (as Twilio answers marks on
    ``clear``): the mark follows its playback's ``playback.cleared``."""
    call, _, ticker, sink = talking()
    stream = call.open_audio_stream(RATE)
    stream.write(tone(1000))
    stream.mark("said-it")
    stream.write(tone(1000))
    stream.mark("said-more")
    ticker.tick()
    call.clear(reason)
    events = playback_events(sink)
    assert [t for t, _ in events] == [
        "playback.started", "playback.cleared", "playback.mark", "playback.mark"
    ]  # fmt: skip
    playback_id = events[0][1]["playback_id"]
    assert [d for _, d in events[2:]] == [
        {"playback_id": playback_id, "name": "said-it"},
        {"playback_id": playback_id, "name": "said-more"},
    ]
    for _ in range(3):
        ticker.tick()
    assert len(playback_events(sink)) == 4  # each mark once


async def test_clear_silences_the_next_tick_and_says_why() -> None:
    call, ep, ticker, sink = talking()
    playing = call.play(tone(1000), RATE)
    queued = call.play(tone(1000), RATE)
    ticker.tick()
    assert call.clear() == [playing.id, queued.id]
    sent = len(ep.frames)
    ticker.tick()
    assert len(ep.frames) == sent and ep.clears == 1 and not call.playing
    cleared = [d for t, d in playback_events(sink) if t == "playback.cleared"]
    assert cleared == [
        {"playback_id": playing.id, "reason": "api", "played_ms": 40},
        {"playback_id": queued.id, "reason": "api", "played_ms": 0},
    ]
    call.play(tone(20), RATE)  # the next talkspurt starts afresh
    assert ep.frames[-1][2]


async def test_a_talkspurt_that_starts_short_of_a_frame_is_still_marked_first() -> None:
    """A TTS whose first pieces are under 20 ms: the frame they make, sent on a tick, is the
    talkspurt's first (RTP sets its marker and moves its timestamp past the silence)."""
    call, ep, ticker, _ = talking()
    stream = call.open_audio_stream(RATE)
    stream.write(tone(10))  # half a frame: nothing can be sent yet
    stream.write(tone(10))
    assert ep.frames == []
    ticker.tick()
    assert [(pcm.size, first) for _, pcm, first in ep.frames] == [(FRAME, True)]


async def test_a_stream_late_by_a_tick_keeps_its_talkspurt() -> None:
    call, ep, ticker, sink = talking()
    stream = call.open_audio_stream(RATE)
    stream.write(tone(20))
    ticker.tick()  # nothing ready: an underrun within the grace
    stream.write(tone(20))
    ticker.tick()
    assert [first for _, _, first in ep.frames] == [True, False]
    assert call.playout is not None and call.playout.stats["underruns"] == 1
    for _ in range(3):
        ticker.tick()  # dry past the grace: the talkspurt and its playback end
    assert [t for t, _ in playback_events(sink)] == ["playback.started", "playback.finished"]
    stream.write(tone(20))  # a new talkspurt, a new playback
    assert ep.frames[-1][2]
    assert [t for t, _ in playback_events(sink)][-1] == "playback.started"


async def test_hangup_goes_through_the_endpoint_and_stops_the_audio() -> None:
    call, ep, ticker, sink = talking()
    playback = call.play(tone(1000), RATE)
    call.hangup("hangup")
    assert ep.hangups == ["hangup"]
    await asyncio.wait_for(call.wait(), 5)
    sent = len(ep.frames)
    ticker.tick()
    assert len(ep.frames) == sent
    kinds = [e.type for e in sink.events]
    assert kinds[-2:] == ["playback.cleared", "call.ended"]  # in the one ordered stream
    assert sink.events[-2].data == {"playback_id": playback.id, "reason": "hangup", "played_ms": 20}
    assert [e.seq for e in sink.events] == list(range(len(sink.events)))
    with pytest.raises(PlaybackError, match="ended"):
        call.play(tone(20), RATE)


async def test_dtmf_digits_go_out_one_at_a_time() -> None:
    call, ep, _, _ = talking()
    await call.send_dtmf("1#", 40)
    assert ep.digits == [("1", 40), ("#", 40)]
    with pytest.raises(PlaybackError, match="0-9"):
        await call.send_dtmf("1x", 40)


async def test_dtmf_on_a_transport_without_it_is_refused() -> None:
    call, _, _, _ = talking(MemoryEndpoint(sample_rate=RATE, can_send_dtmf=False))
    with pytest.raises(PlaybackError, match="cannot send DTMF"):
        await call.send_dtmf("1", 40)


async def test_a_call_without_an_endpoint_cannot_play() -> None:
    sink = capture_events()
    call = Call("c", L16_16K, sink, SystemClock(), transport="file")
    with pytest.raises(PlaybackError, match="cannot play"):
        call.play(tone(20), RATE)


async def test_the_registry_paces_every_call_on_one_clock() -> None:
    registry = CallRegistry(EndingEngine(), capture_events(), SystemClock(), 10, 5.0)
    endpoints = [MemoryEndpoint(sample_rate=RATE) for _ in range(3)]
    calls = []
    for ep in endpoints:
        call = registry.open(L16_16K, transport="test", endpoint=ep)
        assert call is not None
        call.play(tone(200), RATE)
        calls.append(call)
    await until(lambda: all(len(ep.frames) == 10 for ep in endpoints), 10)
    for ep in endpoints:
        times = [t for t, _, _ in ep.frames]
        # After the immediate first frame, the shared grid: absolute, so a late tick is
        # caught up by the next and the mean gap stays 20 ms even on a busy machine.
        assert abs((times[-1] - times[1]) / 8 - 0.020) < 0.004
    assert registry.ticker.ticks >= 9 and not registry.ticker.playouts
    for call in calls:
        call.end("hangup")
        await call.wait()


def interrupt(call: Call, ticker: PlayoutTicker, caller: np.ndarray) -> int | None:
    """The caller's 16 kHz audio pushed 20 ms at a time, one tick each, while the bot talks;
    the sample at which the bot was cleared (None: never)."""
    for pos in range(0, caller.size, 320):
        call.push_pcm(pos, caller[pos : pos + 320])
        ticker.tick()
        if not call.playing:
            return pos + 320
    return None


@pytest.mark.parametrize("onset_ms", [20, 60, 160])
async def test_barge_in_clears_within_200_ms_of_speech_onset(
    speech: dict[str, Speech], onset_ms: int
) -> None:
    """Two flite voices: the bot says one sentence, the caller another half a second in."""
    call, ep, ticker, sink = talking(barge_in=BargeIn(onset_ms=onset_ms))
    bot = read_audio(speech["callback"].path, RATE)  # slt
    words = read_audio(speech["order"].path, 16000)  # rms
    caller = np.concatenate([np.zeros(8000, np.int16), words])
    onset = 8000 + int(np.argmax(np.abs(words) > 100))  # the first sample over -50 dBFS
    playback = call.play(bot, RATE)
    cleared_at = interrupt(call, ticker, caller)
    assert cleared_at is not None and cleared_at > onset
    assert (cleared_at - onset) / 16 <= 200, f"{(cleared_at - onset) / 16} ms after onset"
    assert playback_events(sink)[-1] == (
        "playback.cleared",
        {"playback_id": playback.id, "reason": "barge_in", "played_ms": cleared_at // 16},
    )


async def test_noise_and_silence_do_not_barge_in() -> None:
    call, _, ticker, sink = talking(barge_in=BargeIn())
    call.play(tone(3000), RATE)
    noise = np.random.default_rng(3).normal(0, 300, 16000 * 2).astype(np.int16)  # -40 dBFS
    assert interrupt(call, ticker, np.concatenate([np.zeros(8000, np.int16), noise])) is None
    assert "playback.cleared" not in [t for t, _ in playback_events(sink)]


async def test_barge_in_is_off_unless_configured(speech: dict[str, Speech]) -> None:
    call, _, ticker, _ = talking()
    call.play(tone(5000), RATE)  # longer than the caller's sentence
    assert interrupt(call, ticker, read_audio(speech["order"].path, 16000)) is None


class BrokenEndpoint(MemoryEndpoint):
    """Breaks the contract: ``send`` raises."""

    def send(self, pcm: np.ndarray, first: bool) -> None:
        if not first:
            raise RuntimeError("socket gone")
        super().send(pcm, first)


async def test_one_broken_endpoint_does_not_silence_the_others() -> None:
    sink = capture_events()
    ticker = PlayoutTicker(autostart=False)
    good, bad = MemoryEndpoint(sample_rate=RATE), BrokenEndpoint(sample_rate=RATE)
    for i, ep in enumerate((bad, good)):
        call = Call(f"c{i}", L16_16K, sink, SystemClock(), transport="test", ticker=ticker)
        call.attach_endpoint(ep)
        call.play(tone(100), RATE)
    for _ in range(6):
        ticker.tick()
    assert len(good.frames) == 5 and len(bad.frames) == 1


async def test_an_ended_call_is_freed_by_reference_counting() -> None:
    """An ended call lets go of its endpoint, the transport's hang-up hook and the barge-in tap
    (``Call._release``), each of which points back at it: a server that has made thousands of
    calls frees each as it ends, not at the cyclic collector's next full pass."""
    gc.collect()
    gc.disable()
    try:
        call, ep, ticker, _ = talking(barge_in=BargeIn())
        call.play(tone(200), RATE)
        ticker.tick()
        call.hangup("hangup")  # through the endpoint (a transport's hook), as the API does
        await call.wait()
        ended = weakref.ref(call)
        del call, ep
        assert ended() is None
    finally:
        gc.enable()
