"""The engine interface, shaped by the Voxtral realtime contract.

Voxtral consumes one 80 ms frame of 16 kHz audio per decoding step and emits one token per step,
about half a second behind the audio; at the end of a stream it needs right padding to flush the
words still in flight. So a stream takes frames one at a time (``send`` may wait: that is the
engine's backpressure), produces text asynchronously (``chunks``), and ends in two ways: ``close``
(no more audio, flush, the chunk iterator ends once everything is out) or ``abort`` (hang up now).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from voxphone.audio.codecs import Pcm
from voxphone.errors import EngineError


@dataclass(frozen=True)
class TranscriptChunk:
    """Engine output for one stream.

    ``delta`` is text appended to the open segment (may be empty). When ``segment_end`` is set the
    open segment closes with this chunk: ``text`` is then its authoritative full text (an engine
    that revises its hypothesis, like pocketsphinx, may differ from the deltas' concatenation) and
    ``start_ms``/``end_ms`` place it on the stream's audio clock (80 ms per frame sent).
    ``error`` reports a problem the engine recovered from (the call goes on): it becomes an
    ``engine.error`` event.
    """

    delta: str = ""
    segment_end: bool = False
    text: str = ""
    start_ms: int = 0
    end_ms: int = 0
    error: str = ""


class EngineStream(Protocol):
    """One call's recognition stream."""

    async def send(self, frame: Pcm) -> None:
        """Feed one 80 ms frame (1280 int16 samples at 16 kHz)."""

    async def close(self) -> None:
        """No more audio: flush; ``chunks`` ends when the engine has said everything."""

    async def abort(self) -> None:
        """Stop now and free the engine's resources; ``chunks`` ends promptly."""

    def chunks(self) -> AsyncIterator[TranscriptChunk]:
        """The stream's output, in order; raises ``EngineError`` if the engine fails."""
        ...

    def stats(self) -> dict[str, int]:
        """Counters worth reporting in ``call.ended`` (sessions, restarts, lag...)."""
        ...


@runtime_checkable
class SendsNow(Protocol):
    """An ``EngineStream`` that can take a frame without waiting (Voxtral's sessions say the
    same with ``voxtral.DirectSession``).

    ``send_nowait(frame)`` does what ``send`` would and returns True when nothing in it has to
    wait (an in-process engine's queue, a worker's connection); else it does nothing and returns
    False, and the caller uses ``send``. It raises what ``send`` raises. Why: a call hands each
    80 ms frame to its engine from a task of its own, so that ``send`` may wait, and waking that
    task for every frame was about a tenth of the server's CPU (``benchmarks/load.py``, 600 G.711
    calls); most frames need no waiting. The call takes this path only while that task waits on
    an empty queue (not while it is inside ``send``), so frames stay in order."""

    def send_nowait(self, frame: Pcm) -> bool: ...


class Engine(Protocol):
    """A speech engine shared by all calls of a process."""

    name: str

    async def start(self) -> None:
        """Load models and check the environment; raise ``EngineError`` with the reason."""

    async def open_stream(self, call_id: str) -> EngineStream: ...

    async def stop(self) -> None: ...


class ChunkQueue:
    """An engine stream's output: chunks, then either the end or the error that ended it."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[TranscriptChunk | EngineError | None] = asyncio.Queue()

    def put(self, chunk: TranscriptChunk) -> None:
        self._queue.put_nowait(chunk)

    def fail(self, exc: EngineError) -> None:
        self._queue.put_nowait(exc)

    def close(self) -> None:
        self._queue.put_nowait(None)

    async def __aiter__(self) -> AsyncIterator[TranscriptChunk]:
        while (item := await self._queue.get()) is not None:
            if isinstance(item, EngineError):
                raise item
            yield item


@runtime_checkable
class Degradable(Protocol):
    """An engine that can lose what it runs on while serving (worker processes that die)."""

    @property
    def problem(self) -> str | None:
        """Why it cannot take calls now (``/ready`` answers 503 with it), or None."""
        ...
