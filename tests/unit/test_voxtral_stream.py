"""``VoxtralStream.send_nowait``: a frame goes to the session at once only when ``send`` would
not have had to wait; otherwise nothing happens and ``send`` does the waiting work (a rollover,
a session being replaced). The real engine's sessions are in ``test_vllm_local``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np

from voxphone.audio.codecs import Pcm
from voxphone.engines.voxtral import Step, VoxtralSettings, VoxtralStream


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


class InProcessSession(Session):
    """One that also takes a frame at once (``SendsNow``), as the in-process engines' do."""

    def send_nowait(self, frame: Pcm) -> bool:
        self.frames.append(int(frame[0]))
        return True


def frame(value: int) -> Pcm:
    return np.full(1280, value, np.int16)


async def stream_of(sends_now: bool, **settings: float) -> tuple[VoxtralStream, list[Session]]:
    sessions: list[Session] = []

    async def open_session() -> Session:
        sessions.append(InProcessSession() if sends_now else Session())
        return sessions[-1]

    stream = VoxtralStream(open_session, VoxtralSettings(**settings), "c")  # type: ignore[arg-type]
    await stream.start()
    return stream, sessions


async def test_frames_go_straight_to_a_session_that_takes_them_at_once() -> None:
    stream, sessions = await stream_of(sends_now=True)
    assert all(stream.send_nowait(frame(i)) for i in range(5))
    assert sessions[0].frames == [0, 1, 2, 3, 4]
    assert stream._live is not None and stream._live.frames == 5  # counted as ``send`` counts
    await stream.abort()


async def test_a_remote_session_is_sent_to_by_send_only() -> None:
    stream, sessions = await stream_of(sends_now=False)
    assert not stream.send_nowait(frame(1))
    assert sessions[0].frames == [] and stream._live is not None and stream._live.frames == 0
    await stream.abort()


async def test_a_due_rollover_is_left_to_send() -> None:
    stream, sessions = await stream_of(sends_now=True, max_session_s=0.4)  # 5 frames a session
    sent = [stream.send_nowait(frame(i)) for i in range(7)]
    assert sent == [True] * 5 + [False] * 2  # the sixth would need a new session
    await stream.send(frame(5))  # as the call's feeder does: it rolls over and sends
    assert stream.send_nowait(frame(6))
    assert stream.stats()["rollovers"] == 1
    assert sessions[0].frames == [0, 1, 2, 3, 4] and sessions[1].frames == [5, 6]
    await stream.abort()


async def test_nothing_is_sent_at_once_while_the_lock_is_held() -> None:
    stream, sessions = await stream_of(sends_now=True)
    async with stream._lock:  # another ``send``, or the reader replacing a failed session
        assert not stream.send_nowait(frame(1))
    assert sessions[0].frames == []
    assert stream.send_nowait(frame(2)) and sessions[0].frames == [2]
    await stream.abort()
