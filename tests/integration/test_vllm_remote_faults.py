"""The remote Voxtral engine against a protocol-faithful fake server that misbehaves on demand."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np
import pytest

from tests.fake_realtime import Behaviour, FakeRealtimeServer
from voxphone.audio.codecs import L16_16K
from voxphone.call import Call
from voxphone.clock import SystemClock
from voxphone.engines.vllm_remote import VllmRemoteEngine
from voxphone.engines.voxtral import VoxtralSettings
from voxphone.errors import EngineError
from voxphone.testing import CapturedEvents, capture_events

pytestmark = [pytest.mark.integration, pytest.mark.each_loop]

FAST = VoxtralSettings(pause_s=0.4, max_session_s=600, max_model_len=4096, watchdog_s=1.0)


def tone(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * 16000)) / 16000
    return (np.sin(2 * np.pi * 300 * t) * 8000).astype(np.int16)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * 16000), np.int16)


@pytest.fixture
async def server() -> AsyncIterator[FakeRealtimeServer]:
    srv = FakeRealtimeServer()
    await srv.start()
    yield srv
    await srv.stop()


async def run_call(
    engine: VllmRemoteEngine, audio: np.ndarray, realtime: bool = False, end_timeout_s: float = 10
) -> CapturedEvents:
    sink = capture_events()
    call = Call("c", L16_16K, sink, SystemClock(), transport="test", end_timeout_s=end_timeout_s)
    call.start(engine)
    for pos in range(0, audio.size, 1280):
        await call.feed_pcm(audio[pos : pos + 1280])
        if realtime:
            await asyncio.sleep(0.08)
        else:
            await asyncio.sleep(0)
    call.end("hangup")
    await asyncio.wait_for(call.wait(), 30)
    return sink


async def started(
    *servers: FakeRealtimeServer, settings: VoxtralSettings = FAST
) -> VllmRemoteEngine:
    engine = VllmRemoteEngine([s.url for s in servers], "tinyvox", settings, connect_timeout_s=2)
    await engine.start()
    return engine


async def test_a_call_streams_audio_and_segments_on_pauses(server: FakeRealtimeServer) -> None:
    engine = await started(server)
    try:
        audio = np.concatenate([silence(0.8), tone(0.4), silence(1.0), tone(0.4), silence(0.5)])
        sink = await run_call(engine, audio)
    finally:
        await engine.stop()
    conn = server.connections[0]
    assert conn.model == "tinyvox" and conn.started and conn.final
    assert conn.appends == -(-audio.size // 1280)
    assert np.array_equal(np.concatenate(conn.audio)[: audio.size], audio)
    finals = sink.of_type("transcript.final")
    assert len(finals) == 2
    assert all(f.data["text"].startswith("w") for f in finals)
    assert finals[0].data["end_ms"] < finals[1].data["start_ms"]
    assert not sink.of_type("engine.error")
    ended = sink.events[-1].data
    assert ended["reason"] == "hangup" and ended["engine"]["sessions"] == 1


async def test_blank_rut_triggers_the_watchdog_and_replays_the_audio(
    server: FakeRealtimeServer,
) -> None:
    server.behaviours = [Behaviour(blank=True)]
    engine = await started(server)
    try:
        sink = await run_call(engine, np.concatenate([tone(2.0), silence(0.6)]))
    finally:
        await engine.stop()
    errors = sink.of_type("engine.error")
    assert errors and "no transcript for 1 s of speech" in errors[0].data["message"]
    assert errors[0].data["recovered"] is True
    assert len(server.connections) >= 2
    # The new session heard the speech the stuck one ignored, from its start.
    replayed = np.concatenate(server.connections[1].audio)
    assert np.array_equal(replayed[:16000], tone(2.0)[:16000])
    assert sink.of_type("transcript.final")
    assert sink.events[-1].data["engine"]["watchdog_restarts"] >= 1


@pytest.mark.parametrize(
    "behaviour", [Behaviour(drop_after_steps=5), Behaviour(error_after_steps=5)]
)
async def test_a_broken_session_is_replaced_and_the_call_goes_on(
    server: FakeRealtimeServer, behaviour: Behaviour
) -> None:
    server.behaviours = [behaviour]
    engine = await started(server)
    try:
        sink = await run_call(
            engine,
            np.concatenate([tone(1.0), silence(0.6), tone(0.5), silence(0.6)]),
            realtime=True,
        )
    finally:
        await engine.stop()
    errors = sink.of_type("engine.error")
    assert len(errors) == 1 and "reconnecting" in errors[0].data["message"]
    assert len(server.connections) == 2
    assert sink.events[-1].data["reason"] == "hangup"
    assert sink.of_type("transcript.final")


async def test_invalid_audio_error_keeps_the_session(server: FakeRealtimeServer) -> None:
    server.behaviours = [Behaviour(error_after_steps=3, error_code="invalid_audio")]
    engine = await started(server)
    try:
        sink = await run_call(engine, np.concatenate([tone(0.5), silence(0.6)]))
    finally:
        await engine.stop()
    assert len(server.connections) == 1
    assert not sink.of_type("engine.error")


async def test_unknown_model_fails_at_startup_and_mid_call(server: FakeRealtimeServer) -> None:
    with pytest.raises(EngineError, match="model 'other' is not served"):
        await VllmRemoteEngine([server.url], "other", FAST).start()
    engine = await started(server)
    server.model = "renamed"  # the server was redeployed under another name
    try:
        sink = await run_call(engine, tone(0.5))
    finally:
        await engine.stop()
    assert sink.events[-1].data["reason"] == "engine_error"
    assert "model_not_found" in sink.of_type("engine.error")[-1].data["message"]


async def test_unreachable_servers_fail_startup_with_each_reason() -> None:
    engine = VllmRemoteEngine(["ws://127.0.0.1:9/v1/realtime"], "tinyvox", FAST, 1)
    with pytest.raises(
        EngineError, match=r"no vLLM realtime server is usable:\n  http://127.0.0.1:9/v1/models"
    ):
        await engine.start()


async def test_server_restart_mid_call(server: FakeRealtimeServer) -> None:
    engine = await started(server)
    sink = capture_events()
    call = Call("c", L16_16K, sink, SystemClock(), transport="test")
    call.start(engine)
    try:
        audio = np.concatenate([tone(1.0), silence(1.0)] * 3)
        for i, pos in enumerate(range(0, audio.size, 1280)):
            if i == 30:
                await server.stop()
                await asyncio.sleep(0.3)
                await server.start()  # same port
            await call.feed_pcm(audio[pos : pos + 1280])
            await asyncio.sleep(0.02)
        call.end("hangup")
        await asyncio.wait_for(call.wait(), 30)
    finally:
        await engine.stop()
    assert sink.events[-1].data["reason"] == "hangup"
    assert any("reconnecting" in e.data["message"] for e in sink.of_type("engine.error"))
    assert len(sink.of_type("transcript.final")) >= 2


async def test_slow_server_shows_as_lag(server: FakeRealtimeServer) -> None:
    server.behaviours = [Behaviour(step_delay_s=0.1)]
    engine = await started(server)
    try:
        sink = await run_call(engine, np.concatenate([tone(0.5), silence(0.5)]))
    finally:
        await engine.stop()
    assert sink.events[-1].data["engine"]["max_lag_ms"] >= 400


async def test_sessions_spread_over_servers() -> None:
    a, b = FakeRealtimeServer(), FakeRealtimeServer()
    await a.start()
    await b.start()
    engine = await started(a, b)
    try:
        audio = np.concatenate([tone(0.3), silence(0.5)])
        await asyncio.gather(*(run_call(engine, audio, realtime=True) for _ in range(4)))
    finally:
        await engine.stop()
        await a.stop()
        await b.stop()
    assert (len(a.connections), len(b.connections)) == (2, 2)
    assert [s.active for s in engine.servers] == [0, 0]


async def test_one_process_holds_more_sessions_than_aiohttps_default_pool(
    server: FakeRealtimeServer,
) -> None:
    """aiohttp pools 100 connections by default; the 101st call's websocket must not wait for
    another call to end (one voxphone process feeds several servers, benchmarks/remote_fanout)."""
    engine = await started(server)
    try:
        streams = await asyncio.wait_for(
            asyncio.gather(*(engine.open_stream(f"c{i}") for i in range(120))), 10
        )
        assert sum(s.active for s in engine.servers) == 120
        for stream in streams:
            await stream.abort()
    finally:
        await engine.stop()
    assert len(server.connections) == 120


async def test_rollover_cuts_in_a_pause_and_loses_no_words(server: FakeRealtimeServer) -> None:
    settings = VoxtralSettings(pause_s=0.4, max_session_s=3.0, max_model_len=4096, watchdog_s=30)
    engine = await started(server, settings=settings)
    try:
        bursts = 5
        audio = np.concatenate([np.concatenate([tone(0.4), silence(1.2)]) for _ in range(bursts)])
        sink = await run_call(engine, np.concatenate([audio, silence(0.6)]))
    finally:
        await engine.stop()
    ended = sink.events[-1].data
    assert ended["engine"]["rollovers"] >= 1
    assert len(server.connections) == ended["engine"]["sessions"] >= 2
    finals = sink.of_type("transcript.final")
    assert len(finals) == bursts
    assert [f.data["start_ms"] // 1600 for f in finals] == list(range(bursts))
    assert not sink.of_type("engine.error")


async def test_a_server_that_never_finishes_keeps_the_streamed_words(
    server: FakeRealtimeServer,
) -> None:
    server.behaviours = [Behaviour(hang_at_end=True)]
    engine = await started(server)
    loop = asyncio.get_running_loop()
    try:
        start = loop.time()
        sink = await run_call(engine, tone(1.5), end_timeout_s=1.0)  # hang up mid-sentence
        elapsed = loop.time() - start
    finally:
        await engine.stop()
    deltas = "".join(d.data["text"] for d in sink.of_type("transcript.delta"))
    assert deltas.startswith("w1 w2")
    finals = sink.of_type("transcript.final")
    assert [f.data["text"] for f in finals] == [deltas]
    error = sink.of_type("engine.error")[-1].data
    assert error["recovered"] is False and "did not finish" in error["message"]
    ended = sink.events[-1].data
    assert ended["reason"] == "hangup" and ended["transcript"] == deltas
    assert elapsed < 5  # the deadline, not the session's idle timeout
