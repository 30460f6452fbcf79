"""The sphinx engine in its worker processes, driven through a real Call."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np
import pytest

from tests.conftest import Speech, choppy, overlap
from voxphone.audio.codecs import L16_16K
from voxphone.audio.files import read_audio
from voxphone.call import Call
from voxphone.clock import SystemClock
from voxphone.engines.sphinx import SphinxEngine
from voxphone.testing import capture_events

pytestmark = pytest.mark.integration


@pytest.fixture
async def engine() -> AsyncIterator[SphinxEngine]:
    eng = SphinxEngine(workers=1)
    await eng.start()
    yield eng
    await eng.stop()


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * 16000), np.int16)


async def test_pauses_split_segments_with_times_on_the_call_clock(
    engine: SphinxEngine, speech: dict[str, Speech]
) -> None:
    a, b = speech["order"], speech["callback"]
    pa, pb = read_audio(a.path, 16000), read_audio(b.path, 16000)
    sink = capture_events()
    call = Call("c1", L16_16K, sink, SystemClock(), transport="test")
    call.start(engine)
    await call.feed_pcm(np.concatenate([silence(0.5), pa, silence(1.5), pb, silence(0.5)]))
    call.end("hangup")
    await asyncio.wait_for(call.wait(), 60)

    types = [e.type for e in sink.events]
    assert types[0] == "call.started" and types[-1] == "call.ended"
    durable = [e.seq for e in sink.events if e.type != "transcript.delta"]  # deltas: delta_seq
    assert durable == list(range(len(durable)))
    finals = sink.of_type("transcript.final")
    assert len(finals) == 2, [f.data for f in finals]
    assert overlap(a.text, finals[0].data["text"]) >= 0.6
    assert overlap(b.text, finals[1].data["text"]) >= 0.6
    first_end = 500 + pa.size // 16
    second_start = first_end + 1500
    assert 300 <= finals[0].data["start_ms"] < finals[0].data["end_ms"] <= first_end + 600
    assert first_end < finals[1].data["start_ms"] <= second_start + 300
    assert [f.data["segment_id"] for f in finals] == [0, 1]
    deltas = sink.of_type("transcript.delta")
    assert deltas and all(d.data["segment_id"] in (0, 1) for d in deltas)
    ended = sink.events[-1].data
    assert ended["reason"] == "hangup"
    assert ended["transcript"] == " ".join(f.data["text"] for f in finals)
    assert ended["audio_ms"] == -(-(pa.size + pb.size + 40000) // 1280) * 80


@pytest.mark.parametrize("samples", [15360 - 37, 15360, 20480 + 481, 159_414])
async def test_a_call_ends_cleanly_whatever_its_length(
    engine: SphinxEngine, speech: dict[str, Speech], samples: int
) -> None:
    """Lengths where the stream ends while the endpointer's window starts with a pause (the
    first three), and the issue's 159,414 samples (choppy speech repeated)."""
    pcm = np.resize(choppy(speech["order"]), samples)
    sink = capture_events()
    call = Call("c5", L16_16K, sink, SystemClock(), transport="test")
    call.start(engine)
    await call.feed_pcm(pcm)
    call.end("hangup")
    await asyncio.wait_for(call.wait(), 120)
    assert not sink.of_type("engine.error")
    ended = sink.events[-1].data
    assert ended["reason"] == "hangup" and ended["transcript"]


async def test_a_dead_worker_fails_only_its_call_and_is_replaced(
    engine: SphinxEngine, speech: dict[str, Speech]
) -> None:
    sink = capture_events()
    call = Call("c2", L16_16K, sink, SystemClock(), transport="test")
    call.start(engine)
    await call.feed_pcm(read_audio(speech["order"].path, 16000)[:16000])
    await asyncio.sleep(0.5)
    engine._workers[0].process.kill()  # what an OOM kill or a segfault in the decoder does
    await call.feed_pcm(silence(1.0))
    await asyncio.wait_for(call.wait(), 30)
    errors = sink.of_type("engine.error")
    assert len(errors) == 1 and "worker" in errors[0].data["message"]
    assert sink.events[-1].type == "call.ended"
    assert sink.events[-1].data["reason"] == "engine_error"

    # The engine replaces the dead worker: the next call is transcribed.
    sink2 = capture_events()
    call2 = Call("c3", L16_16K, sink2, SystemClock(), transport="test")
    call2.start(engine)
    await call2.feed_pcm(read_audio(speech["order"].path, 16000))
    call2.end("hangup")
    await asyncio.wait_for(call2.wait(), 60)
    assert overlap(speech["order"].text, sink2.events[-1].data["transcript"]) >= 0.6


async def test_a_call_is_hung_up_at_its_maximum_duration(engine: SphinxEngine) -> None:
    sink = capture_events()
    call = Call("c4", L16_16K, sink, SystemClock(), transport="test", max_duration_s=0.5)
    call.start(engine)
    for _ in range(20):  # 2 s of audio at real-time pace; the call is cut after 0.5 s
        await call.feed_pcm(silence(0.1))
        await asyncio.sleep(0.1)
    await asyncio.wait_for(call.wait(), 30)
    ended = sink.events[-1].data
    assert ended["reason"] == "max_duration"
    assert ended["audio_ms"] <= 800
