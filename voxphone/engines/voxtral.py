"""What both Voxtral engines share: segments, session rollover, the watchdog, lag.

A *session* is one vLLM realtime request (in process) or one ``/v1/realtime`` connection (remote).
Voxtral emits exactly one token per 80 ms frame, so step ``i`` of a session maps to a place on the
audio clock: its text describes audio ending about ``(i + 1) * 80`` ms after the session began
(the first step needs the model's delay worth of audio in hand; every later step one more frame).

``VoxtralStream`` turns sessions into one endless ``EngineStream`` for a call:

* **Segments.** ``pause_s`` of steps without text (``[STREAMING_PAD]``) after some text closes a
  ``transcript.final``; the segment's text is exactly its deltas. Speech without pauses is cut
  into segments of about ``max_segment_s``, at the first word boundary (text that starts with a
  space: Voxtral's tokens carry the space before a word) past it.
* **Rollover.** A session cannot outlive ``max_model_len`` tokens (vLLM stops it there), and long
  ones grow host memory (vllm#50860). Past 90 % of the allowed length we cut at the next pause:
  the old session flushes (nothing is in flight in a pause), the new one starts with the next
  frame, so no word is lost or repeated. Cutting in a pause was chosen over overlapping audio and
  de-duplicating text: Voxtral's text is not time-stamped per word, so de-duplication would be a
  guess. If no pause comes before the hard limit, we cut anyway (a word may be split).
* **Watchdog.** If the caller has spoken for ``watchdog_s`` since the last text (a blank-token
  rut, vllm#47614, or a silently stalled session, vllm#35863), the session is replaced and the
  audio since the last closed segment is replayed into the new one.
* **Reconnect.** A session that fails (server gone, ``processing_error``) is replaced the same way;
  configuration errors (unknown model) end the call with ``engine.error``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Protocol, cast

import numpy as np
import structlog

from voxphone.audio.codecs import Pcm
from voxphone.engines.base import ChunkQueue, TranscriptChunk
from voxphone.errors import EngineError

log = structlog.get_logger(__name__)

FRAME_MS = 80
LEFT_PAD_TOKENS = 32  # tekken.json audio.streaming_n_left_pad_tokens


@dataclass(frozen=True)
class Step:
    """One engine step: the text sampled for one 80 ms frame (usually empty)."""

    text: str


class SessionFailed(EngineError):
    """A session broke. ``retry`` says whether a fresh session may succeed."""

    def __init__(self, message: str, retry: bool = True) -> None:
        super().__init__(message)
        self.retry = retry


class Session(Protocol):
    """One engine request (an in-process vLLM request, one on a worker, a ``/v1/realtime``
    connection)."""

    async def send(self, frame: Pcm) -> None: ...

    async def finish(self) -> None:
        """No more audio: the engine right-pads and flushes; ``steps`` then ends."""

    async def abort(self) -> None:
        """Free the engine's slot now."""

    def steps(self) -> AsyncIterator[Step]:
        """One item per engine step; raises ``SessionFailed``."""
        ...


class DirectSession(Session, Protocol):
    """A session that never waits for a frame (the in-process engine's queue, a worker's
    connection): ``send_nowait`` is ``send``, done now; it returns True and raises what
    ``send`` raises (``SessionFailed``)."""

    def send_nowait(self, frame: Pcm) -> bool: ...


SessionFactory = Callable[[], Awaitable[Session]]


@dataclass(frozen=True)
class VoxtralSettings:
    pause_s: float = 0.8
    #: A segment closes at the first word boundary past this many seconds, pause or not.
    max_segment_s: float = 30.0
    #: Longest session before rollover, in seconds (and never past ``max_model_len``).
    max_session_s: float = 600.0
    max_model_len: int = 45_000
    watchdog_s: float = 10.0
    #: Frame RMS (int16 units) above which the watchdog counts audio as speech.
    speech_rms: float = 300.0
    #: Audio kept for replay into a replacement session.
    replay_s: float = 30.0
    #: The model's ``transcription_delay_ms`` (tekken.json; per server, not per session).
    delay_ms: int = 480

    @property
    def first_step_frames(self) -> int:
        """Frames of real audio before the first step: the delay plus one (7 at 480 ms)."""
        return self.delay_ms // FRAME_MS + 1

    @property
    def hard_steps(self) -> int:
        """Frames one session may take: its prompt (BOS, left pad, delay) and right pad (delay
        + 11, vllm-voxtral.md §1.4) must fit in ``max_model_len`` with a small margin."""
        n_delay = self.delay_ms // FRAME_MS
        prompt, right_pad = 1 + LEFT_PAD_TOKENS + n_delay, n_delay + 11
        by_len = self.max_model_len - prompt - right_pad - 8
        return max(1, min(by_len, int(self.max_session_s * 1000 / FRAME_MS)))


class Segmenter:
    """Turns per-step text into deltas and pause-closed segments with times on the call clock."""

    def __init__(self, pause_steps: int, max_segment_ms: int = 30_000) -> None:
        self.pause_steps = max(1, pause_steps)
        self.max_segment_ms = max_segment_ms
        self._offset_ms = 0
        self._text: list[str] = []
        self._start_ms = 0
        self._last_text_ms = 0
        self._quiet = 0

    @property
    def open(self) -> bool:
        return bool(self._text)

    def new_session(self, offset_ms: int) -> None:
        """The next steps belong to a session whose audio starts at ``offset_ms``."""
        self._offset_ms = offset_ms

    def step(self, index: int, text: str) -> list[TranscriptChunk]:
        at_ms = self._offset_ms + (index + 1) * FRAME_MS
        if not text:
            self._quiet += 1
            return self.close() if self._quiet >= self.pause_steps else []
        long = self._last_text_ms - self._start_ms >= self.max_segment_ms
        closed = self.close() if self._text and long and text[:1].isspace() else []
        return closed + self._append(at_ms, text)

    def _append(self, at_ms: int, text: str) -> list[TranscriptChunk]:
        if not self._text:
            self._start_ms = max(self._offset_ms, at_ms - FRAME_MS)
            text = text.lstrip()
        self._quiet = 0
        self._last_text_ms = at_ms
        self._text.append(text)
        return [TranscriptChunk(delta=text)] if text else []

    def close(self) -> list[TranscriptChunk]:
        """Close the open segment, if any."""
        if not self._text:
            return []
        text = "".join(self._text).strip()
        self._text = []
        return [
            TranscriptChunk(
                segment_end=True, text=text, start_ms=self._start_ms, end_ms=self._last_text_ms
            )
        ]


@dataclass
class StreamStats:
    sessions: int = 0
    rollovers: int = 0
    watchdog_restarts: int = 0
    reconnects: int = 0
    max_lag_ms: int = 0


@dataclass
class _Live:
    """The session receiving audio now, and where its audio starts on the call clock."""

    session: Session
    offset_ms: int
    frames: int = 0
    steps: int = 0
    #: Speech the engine has *processed* (its steps came back) without writing anything.
    speech_ms_since_text: int = 0
    #: Whether each frame sent and not yet answered by a step held speech (step k answers frame k).
    pending_speech: deque[bool] = field(default_factory=deque)
    reason: str = ""
    stale: bool = field(default=False)


class VoxtralStream:
    """An ``EngineStream`` over a succession of sessions (see the module docstring)."""

    def __init__(self, open_session: SessionFactory, settings: VoxtralSettings, call_id: str):
        self._open = open_session
        self._s = settings
        self._seg = Segmenter(
            round(settings.pause_s * 1000 / FRAME_MS), round(settings.max_segment_s * 1000)
        )
        self._queue: asyncio.Queue[_Live | None] = asyncio.Queue()
        self._out = ChunkQueue()
        self._replay: deque[Pcm] = deque(maxlen=max(1, int(settings.replay_s * 1000 / FRAME_MS)))
        self._live: _Live | None = None
        self._sent_ms = 0
        self._quiet_ms = 0  # how long the caller has been quiet (rollover waits for a pause)
        self._lock = asyncio.Lock()  # the feeder and the reader both replace sessions
        self._reader: asyncio.Task[None] | None = None
        self.counters = StreamStats()
        self._log = log.bind(call_id=call_id)

    async def start(self) -> None:
        self._live = await self._new_live(0)
        self._reader = asyncio.create_task(self._read(), name="voxtral-reader")

    async def _new_live(self, offset_ms: int) -> _Live:
        live = _Live(await self._open(), offset_ms)
        self.counters.sessions += 1
        self._queue.put_nowait(live)
        return live

    # -- audio in ---------------------------------------------------------------------------

    async def send(self, frame: Pcm) -> None:
        async with self._lock:
            await self._send_locked(frame)

    def _rollover_due(self, live: _Live) -> bool:
        """Whether the session is long enough to cut: past 90 % of its length in a pause, or
        at the hard limit."""
        in_pause = self._quiet_ms >= self._s.pause_s * 1000 and not self._seg.open
        return live.frames >= self._s.hard_steps or (
            live.frames >= 0.9 * self._s.hard_steps and in_pause
        )

    async def _send_locked(self, frame: Pcm) -> None:
        live = self._live
        if live is None:
            raise EngineError("stream is closed")
        if self._rollover_due(live):
            self.counters.rollovers += 1
            await self._replace("rollover", replay=False)
        elif problem := self._stuck(live):
            self.counters.watchdog_restarts += 1
            self._out.put(TranscriptChunk(error=f"{problem}; engine session restarted"))
            await self._replace("watchdog", replay=True)
        await self._send(frame)

    async def _send(self, frame: Pcm) -> None:
        live = self._live
        assert live is not None
        self._count(live, frame)
        # A failed send shows on the step stream too; the reader replaces the session.
        with contextlib.suppress(SessionFailed):
            await live.session.send(frame)

    def _count(self, live: _Live, frame: Pcm) -> None:
        """A frame about to go to ``live``: kept for a replay, and counted for the pause
        detection, the watchdog and the lag."""
        self._replay.append(frame)
        speech = float(np.sqrt(np.mean(frame.astype(np.float32) ** 2))) >= self._s.speech_rms
        live.pending_speech.append(speech)
        self._quiet_ms = 0 if speech else self._quiet_ms + FRAME_MS
        live.frames += 1
        self._sent_ms += FRAME_MS
        self._note_lag(live)

    def _stuck(self, live: _Live) -> str | None:
        """The known ways a Voxtral session goes quiet while looking healthy."""
        limit_ms = self._s.watchdog_s * 1000
        if live.speech_ms_since_text >= limit_ms:  # blank-token rut (vllm#47614)
            return f"no transcript for {self._s.watchdog_s:g} s of speech"
        behind_ms = (live.frames - live.steps - self._s.first_step_frames) * FRAME_MS
        if behind_ms >= 3 * limit_ms:  # steps stopped coming (vllm#35863)
            return f"engine {behind_ms / 1000:g} s behind the audio"
        return None

    def _note_lag(self, live: _Live) -> None:
        """Audio sent minus audio the received text accounts for (the first step needs
        ``first_step_frames``; then one step per frame)."""
        lag = max(0, live.frames - live.steps - self._s.first_step_frames) * FRAME_MS
        self.counters.max_lag_ms = max(self.counters.max_lag_ms, lag)

    async def _replace(self, reason: str, replay: bool) -> None:
        """Start a new session for the audio to come; the old one flushes (or is aborted)."""
        old = self._live
        assert old is not None
        frames = list(self._replay) if replay else []
        self._replay.clear()
        self._log.info("voxtral_session_replaced", reason=reason, replay_frames=len(frames))
        self._live = await self._new_live(self._sent_ms - len(frames) * FRAME_MS)
        old.stale = True
        if replay:
            old.reason = reason
            await old.session.abort()
        else:
            await old.session.finish()
        self._sent_ms -= len(frames) * FRAME_MS
        for frame in frames:
            await self._send(frame)

    async def close(self) -> None:
        async with self._lock:
            if self._live is not None:
                live, self._live = self._live, None
                await live.session.finish()
                self._queue.put_nowait(None)

    async def abort(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if item is not None:
                await item.session.abort()
        if self._live is not None:
            await self._live.session.abort()
            self._live = None

    def stats(self) -> dict[str, int]:
        return asdict(self.counters)

    # -- text out ---------------------------------------------------------------------------

    def chunks(self) -> AsyncIterator[TranscriptChunk]:
        return aiter(self._out)

    async def _read(self) -> None:
        try:
            while (live := await self._queue.get()) is not None:
                await self._read_session(live)
            for chunk in self._seg.close():
                self._out.put(chunk)
        except EngineError as exc:
            self._out.fail(exc)
        finally:
            self._out.close()

    async def _read_session(self, live: _Live) -> None:
        self._seg.new_session(live.offset_ms)
        try:
            async for step in live.session.steps():
                for chunk in self._seg.step(live.steps, step.text):
                    self._out.put(chunk)
                live.steps += 1
                speech = live.pending_speech.popleft() if live.pending_speech else False
                if step.text:
                    live.speech_ms_since_text = 0
                elif speech:
                    live.speech_ms_since_text += FRAME_MS
        except SessionFailed as exc:
            if live.stale and live.reason:
                return  # we aborted it on purpose
            if not exc.retry:
                raise
            await self._recover(live, exc)

    async def _recover(self, live: _Live, exc: SessionFailed) -> None:
        self.counters.reconnects += 1
        self._out.put(TranscriptChunk(error=f"{exc}; reconnecting with a fresh session"))
        async with self._lock:
            if live.stale or self._live is not live:
                return  # audio has already moved on to a newer session
            await self._replace("reconnect", replay=True)


class DirectVoxtralStream(VoxtralStream):
    """A ``VoxtralStream`` over sessions that never wait for a frame (``DirectSession``: the
    in-process engine's and the worker pool's), so it is ``SendsNow``: the call hands it most
    frames in the packet's own callback instead of waking its feeder task. The remote engine's
    sessions may wait (a websocket), so its streams are plain ``VoxtralStream``s."""

    def __init__(
        self,
        open_session: Callable[[], Awaitable[DirectSession]],
        settings: VoxtralSettings,
        call_id: str,
    ) -> None:
        super().__init__(open_session, settings, call_id)

    def send_nowait(self, frame: Pcm) -> bool:
        """``send`` done now, when nothing in it has to wait: no session being replaced (the
        lock is free), no rollover or watchdog restart due. False: nothing was done.

        (A replacement of a failed session, ``_recover``, may be waiting for the lock just
        released: a frame sent meanwhile goes to the failed session and into ``_replay``, which
        the replacement replays, so it is neither lost nor reordered.)"""
        live = self._live
        if (
            live is None
            or self._lock.locked()
            or self._rollover_due(live)
            or self._stuck(live) is not None
        ):
            return False
        try:
            # ``DirectSession`` by the constructor's type; not checked per frame (an
            # ``isinstance`` against a protocol costs microseconds).
            if not cast(DirectSession, live.session).send_nowait(frame):
                return False
        except SessionFailed:  # as in ``_send``: the reader sees it and replaces the session
            pass
        self._count(live, frame)
        return True
