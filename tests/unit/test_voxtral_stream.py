"""``DirectVoxtralStream.send_nowait``: a frame goes to the session at once only when ``send``
would not have had to wait, with the same bookkeeping; otherwise nothing happens and ``send``
does the waiting work (a rollover, a watchdog restart, a session being replaced). A remote
engine's stream takes frames by ``send`` only. The real engine's sessions are in
``test_vllm_local``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np

from voxphone.audio.codecs import Pcm
from voxphone.engines.base import SendsNow
from voxphone.engines.voxtral import (
    DirectVoxtralStream,
    SessionFailed,
    Step,
    VoxtralSettings,
    VoxtralStream,
)


class Session:
    """A Voxtral session in memory that takes frames by ``send`` only, as the remote client's:
    frames in, no steps until it is finished."""

    def __init__(self) -> None:
        self.frames: list[int] = []
        self.finished = asyncio.Event()

    async def send(self, frame: Pcm) -> None:
        self.frames.append(int(frame[0]))

    async def finish(self) -> None:
        self.finished.set()

    async def abort(self) -> None:
        self.finished.set()

    async def steps(self) -> AsyncIterator[Step]:
        await self.finished.wait()
        return
        yield


class DirectSession(Session):
    """One that also takes a frame at once, as the in-process engines' do; ``broken``: as a
    worker that is gone (``SessionFailed``)."""

    broken = False

    def send_nowait(self, frame: Pcm) -> bool:
        if self.broken:
            raise SessionFailed("engine worker 0 is not running")
        self.frames.append(int(frame[0]))
        return True


def frame(value: int, level: int = 1000) -> Pcm:
    pcm = np.full(1280, level, np.int16)
    pcm[0] = value
    return pcm


async def direct(**settings: float) -> tuple[DirectVoxtralStream, list[DirectSession]]:
    sessions: list[DirectSession] = []

    async def open_session() -> DirectSession:
        sessions.append(DirectSession())
        return sessions[-1]

    stream = DirectVoxtralStream(open_session, VoxtralSettings(**settings), "c")
    await stream.start()
    return stream, sessions


def bookkeeping(stream: VoxtralStream) -> tuple[object, ...]:
    live = stream._live
    assert live is not None
    return (
        live.frames, list(live.pending_speech), len(stream._replay), stream._sent_ms,
        stream._quiet_ms, stream.stats(),
    )  # fmt: skip


async def test_frames_go_straight_to_a_session_that_takes_them_at_once() -> None:
    stream, sessions = await direct()
    assert isinstance(stream, SendsNow)
    levels = [0, 1000, 0, 0, 1000]  # silence and speech: the pause and watchdog counts
    assert all(stream.send_nowait(frame(i, level)) for i, level in enumerate(levels))
    assert sessions[0].frames == [0, 1, 2, 3, 4]
    by_send, _ = await direct()
    for i, level in enumerate(levels):
        await by_send.send(frame(i, level))
    assert bookkeeping(stream) == bookkeeping(by_send)  # counted exactly as ``send`` counts
    await stream.abort()
    await by_send.abort()


async def test_a_remote_engines_stream_takes_frames_by_send_only() -> None:
    async def open_session() -> Session:
        return Session()

    assert not isinstance(VoxtralStream(open_session, VoxtralSettings(), "c"), SendsNow)


async def test_a_due_rollover_is_left_to_send() -> None:
    stream, sessions = await direct(max_session_s=0.4)  # 5 frames a session
    sent = [stream.send_nowait(frame(i)) for i in range(7)]
    assert sent == [True] * 5 + [False] * 2  # the sixth would need a new session
    await stream.send(frame(5))  # as the call's feeder does: it rolls over and sends
    assert stream.send_nowait(frame(6))
    assert stream.stats()["rollovers"] == 1
    assert sessions[0].frames == [0, 1, 2, 3, 4] and sessions[1].frames == [5, 6]
    await stream.abort()


async def test_a_due_watchdog_restart_is_left_to_send() -> None:
    stream, sessions = await direct(watchdog_s=0.4)  # speech without text for 5 frames
    assert stream._live is not None
    stream._live.speech_ms_since_text = 400  # what the reader counts as steps come back empty
    assert not stream.send_nowait(frame(0))
    await stream.send(frame(0))  # restarts the session and replays, then sends
    assert stream.stats()["watchdog_restarts"] == 1 and sessions[1].frames[-1:] == [0]
    await stream.abort()


async def test_nothing_is_sent_at_once_while_the_lock_is_held_or_after_close() -> None:
    stream, sessions = await direct()
    async with stream._lock:  # another ``send``, or the reader replacing a failed session
        assert not stream.send_nowait(frame(1))
    assert sessions[0].frames == []
    assert stream.send_nowait(frame(2)) and sessions[0].frames == [2]
    await stream.close()
    assert not stream.send_nowait(frame(3))


async def test_a_session_that_fails_a_frame_leaves_it_to_the_replacement() -> None:
    stream, sessions = await direct()
    sessions[0].broken = True
    assert stream.send_nowait(frame(1))  # taken, as ``send`` takes it: the reader recovers
    assert stream._replay and int(stream._replay[-1][0]) == 1  # kept for the replay
    await stream.abort()
