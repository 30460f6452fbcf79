"""The in-process engine on real vLLM (its CPU build) with a tiny random-weight Voxtral model.

The text is meaningless (random weights); what is checked is Voxtral's protocol as vLLM runs it:
the 39-token first chunk, one step per 80 ms frame, the 17-step right-pad flush, slots freed on
abort, and rollover keeping a call going.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio

from voxphone.audio.codecs import L16_16K
from voxphone.call import Call
from voxphone.clock import SystemClock
from voxphone.engines import vllm_compat
from voxphone.engines.tiny_voxtral import write_tiny_voxtral
from voxphone.engines.vllm_local import LocalSession, VllmLocalEngine, check_model_dir
from voxphone.engines.voxtral import DirectVoxtralStream, Step, VoxtralSettings
from voxphone.errors import EngineError
from voxphone.testing import capture_events

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

SLOTS = 2
FRAME = 1280


def tiny_engine_args(model: Path) -> dict[str, object]:
    return {
        "model": str(model), "tokenizer_mode": "mistral", "config_format": "mistral",
        "load_format": "dummy", "max_model_len": 1024, "max_num_seqs": SLOTS,
        "enforce_eager": True, "dtype": "bfloat16", "limit_mm_per_prompt": {"audio": 1},
    }  # fmt: skip


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def engine(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[VllmLocalEngine]:
    if vllm_compat.installed_version() is None:
        pytest.fail("vLLM (CPU build) is not installed; run scripts/test, which installs it")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    model = write_tiny_voxtral(tmp_path_factory.mktemp("tinyvox"))
    eng = VllmLocalEngine(tiny_engine_args(model), VoxtralSettings(max_model_len=1024), "cpu")
    await eng.start()
    yield eng
    await eng.stop()


def frames(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(n)
    return [rng.normal(0, 3000, FRAME).astype(np.int16) for _ in range(n)]


class Steps(list[Step]):
    """Steps received so far, with a way to wait for more."""

    def __init__(self) -> None:
        super().__init__()
        self.arrived = asyncio.Event()

    async def wait(self, n: int, timeout_s: float = 20) -> None:
        async with asyncio.timeout(timeout_s):
            while len(self) < n:
                self.arrived.clear()
                await self.arrived.wait()


async def collect(session: LocalSession, into: Steps) -> None:
    async for step in session.steps():
        into.append(step)
        into.arrived.set()


async def test_first_step_after_prompt_then_one_per_frame_then_17_step_flush(
    engine: VllmLocalEngine,
) -> None:
    session = await engine._open_session()
    steps = Steps()
    reader = asyncio.create_task(collect(session, steps))
    audio = frames(25)
    for f in audio[:7]:  # 8960 samples: short of the 9000 the 39-token first chunk needs
        await session.send(f)
    await asyncio.sleep(1.0)
    assert steps == []
    await session.send(audio[7])
    await steps.wait(1)
    for i, f in enumerate(audio[8:], start=2):
        await session.send(f)
        await steps.wait(i)  # exactly one engine step per new 80 ms frame
    assert len(steps) == 25 - 7
    await session.finish()
    await asyncio.wait_for(reader, 30)
    # Right pad: 17 tokens of silence (21760 samples) flush what is in flight.
    assert len(steps) == 1 + (25 * FRAME + 21760 - 9000) // FRAME == 35
    assert any(s.text for s in steps)


async def test_abort_frees_the_slot(engine: VllmLocalEngine) -> None:
    async def start_session() -> tuple[LocalSession, Steps, asyncio.Task[None]]:
        s = await engine._open_session()
        got = Steps()
        task = asyncio.create_task(collect(s, got))
        for f in frames(10):
            await s.send(f)
        return s, got, task

    first = [await start_session() for _ in range(SLOTS)]
    for _, got, _ in first:
        await got.wait(1)
    for s, _, task in first:  # hang up mid-stream, as a caller does
        task.cancel()
        await s.abort()
    again = [await start_session() for _ in range(SLOTS)]
    for _, got, _ in again:
        await got.wait(1)  # would time out if the aborted requests still held the slots
    for s, _, task in again:
        await s.finish()
        await asyncio.wait_for(task, 30)


@pytest.mark.parametrize("at_once", [False, True], ids=["send", "send_nowait"])
async def test_rollover_keeps_a_long_call_going(engine: VllmLocalEngine, at_once: bool) -> None:
    """Fed by ``send``, or as a call feeds it: ``send_nowait`` first (the session takes a
    frame at once), ``send`` when that declines (a rollover is due)."""
    settings = VoxtralSettings(max_session_s=1.2, max_model_len=1024, watchdog_s=60)
    stream = DirectVoxtralStream(engine._open_session, settings, "long-call")
    await stream.start()
    out = []

    async def read() -> None:
        async for chunk in stream.chunks():
            out.append(chunk)

    reader = asyncio.create_task(read())
    declined = 0
    for f in frames(60):  # 4.8 s: four times the session limit
        if not (at_once and stream.send_nowait(f)):
            declined += at_once
            await stream.send(f)
        await asyncio.sleep(0.005)
    await stream.close()
    await asyncio.wait_for(reader, 60)
    stats = stream.stats()
    assert stats["rollovers"] >= 3 and stats["sessions"] == stats["rollovers"] + 1
    if at_once:  # each rollover was left to ``send``, and only those frames
        assert declined == stats["rollovers"]
    assert any(c.delta for c in out)
    assert not any(c.error for c in out)


async def test_a_call_through_the_engine(engine: VllmLocalEngine) -> None:
    sink = capture_events()
    call = Call("vllm-call", L16_16K, sink, SystemClock(), transport="test")
    call.start(engine)
    await call.feed_pcm(np.concatenate(frames(20)))
    call.end("hangup")
    await asyncio.wait_for(call.wait(), 60)
    types = [e.type for e in sink.events]
    assert types[0] == "call.started" and types[-1] == "call.ended"
    assert "transcript.delta" in types and "engine.error" not in types
    durable = [e.seq for e in sink.events if e.type != "transcript.delta"]  # deltas: delta_seq
    assert durable == list(range(len(durable)))
    assert all(e.data["text"] for e in sink.of_type("transcript.delta"))  # empty deltas dropped
    assert sink.events[-1].data["reason"] == "hangup"


async def test_startup_checks_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="lacks params.json, tekken.json"):
        check_model_dir(str(tmp_path))
    model = write_tiny_voxtral(tmp_path / "m")
    text = (
        (model / "tekken.json")
        .read_text()
        .replace('"transcription_delay_ms": 480', '"transcription_delay_ms": 500')
    )
    (model / "tekken.json").write_text(text)
    with pytest.raises(
        EngineError, match="transcription_delay_ms = 500; Voxtral needs a multiple of 80"
    ):
        check_model_dir(str(model))
    assert check_model_dir("mistralai/Voxtral-Mini-4B-Realtime-2602") is None


async def test_no_gpu_is_a_clear_error(tmp_path: Path) -> None:
    eng = VllmLocalEngine(tiny_engine_args(write_tiny_voxtral(tmp_path)), VoxtralSettings(), "cuda")
    with pytest.raises(EngineError, match="needs a CUDA GPU and NVML sees none"):
        await eng.start()
