"""Talk back: a call's outbound audio, paced on one shared 20 ms clock, played into its transport.

How a transport implements the endpoint
---------------------------------------
A transport that can carry audio back to the caller gives its ``Call`` a ``MediaEndpoint``
right after ``CallRegistry.open`` (``call.attach_endpoint(endpoint)``, or ``endpoint=`` to
``open``). The endpoint is the call's only way back to its media:

- ``sample_rate`` (int, Hz): the rate of the PCM ``send`` receives. The call resamples every
  source (a WAV at 22.05 kHz, a 16 kHz TTS stream) to it, so choose the rate the transport's
  encoder wants: 8000 for PCMU/PCMA/Twilio/Telnyx, 16000 for G.722 or SLIN16, 48000 for Opus
  and WebRTC. Fixed for the endpoint's life.
- ``can_send_dtmf`` (bool): whether ``send_dtmf`` works (RFC 4733 events on RTP, a ``dtmf``
  message where the vendor has one). When False the API answers 409 and never calls it.
- ``send(pcm, first)``: one 20 ms frame, ``sample_rate // 50`` samples of mono int16 PCM
  (numpy, native byte order), called every 20 ms (by the shared ticker) while audio is queued.
  ``first`` is True on the first frame of a talkspurt — after silence, a ``clear``, or at the
  start — so RTP sets the marker bit and moves its timestamp on by the time that passed
  (RFC 3550 §5.1); transports without that notion ignore it. Between talkspurts ``send`` is
  not called at all: send nothing (RTP) or the transport's own idea of silence. ``send`` runs
  on the event loop and must neither block nor raise: a transport whose writes are coroutines
  (a websocket) puts the frame in its own bounded queue and writes it from its own task,
  counting what it has to drop (``call.count_dropped("outbound_backlog")``).
- ``clear()``: the call dropped its queued audio (API ``clear``, barge-in, hang-up). Drop what
  the transport or the far end still buffers (Twilio/Telnyx ``clear`` message); RTP has
  nothing buffered and does nothing. Must not block or raise.
- ``async send_dtmf(digit, duration_ms)``: send one key (``0-9 * # A-D``) lasting
  ``duration_ms``; return when it has been sent in full. The call sends one digit at a time
  with a pause between digits, so an endpoint never sees two at once.
- ``mark(name)``: a bot's mark (``call.mark``) has been reached: the frames before it have
  been sent. Pass it on where the provider has a message for it (Twilio/Telnyx ``mark``,
  Vonage ``notify``: echoed once the provider has played the audio before it); elsewhere do
  nothing. ``playback.mark`` is published at the same moment. Must not block or raise.
- ``hangup(reason)``: end the call at the transport — stop its media (close the socket, send
  BYE/``stop``, free the port) and then call ``call.end(reason)`` (after playing out inbound
  audio it still holds, if it wants). ``DELETE /v1/calls/{id}``, shutdown and
  ``max_duration`` arrive here; ``attach_endpoint`` makes ``call.hangup`` this method.

``send`` is called from the ticker and, for a talkspurt's first frame, from inside
``call.play`` / ``OutboundStream.write`` (so the first frame leaves at once). Once the call has
ended nothing is sent. The reference implementation is ``RtpEndpoint``
(``voxphone/transports/rtp_out.py``); ``voxphone.testing.MemoryEndpoint`` records what it is
given, for tests. Bot audio reaches a call through ``call.play(pcm, rate)``,
``call.open_audio_stream(rate)``, ``call.mark``, ``call.clear`` and ``call.send_dtmf`` (the
HTTP API in ``voxphone/http/talkback.py`` is one user).

Events (same ordered, signed stream as transcripts; ``voxphone.events.model``):
``playback.started {playback_id}`` when a playback's first frame is sent, ``playback.mark
{playback_id, name}`` when the frame holding a mark is sent, ``playback.finished {playback_id,
played_ms}`` when its last frame is sent, ``playback.cleared {playback_id, reason,
played_ms}`` for every playback dropped before its end (``reason``: ``api``, ``barge_in``,
``hangup``).

Timing: one ``PlayoutTicker`` per registry ticks every 20 ms for all calls with queued audio,
so idle calls cost nothing and 1000 talking calls cost one timer. A call that goes from silence
to audio sends its first frame at once, not at the next tick (≤ 20 ms saved on first-packet
latency); later frames follow the shared tick, so the second frame may leave less than 20 ms
after the first — within any receiver's jitter buffer.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import numpy as np
import structlog

from voxphone.audio.codecs import Pcm
from voxphone.audio.resample import Resampler
from voxphone.errors import PlaybackError
from voxphone.events import model as ev
from voxphone.transports.dtmf import DTMF_KEYS

log = structlog.get_logger(__name__)

FRAME_MS: Final = 20
FRAME_S: Final = FRAME_MS / 1000
#: Ticks an open stream may run dry inside a talkspurt (TTS a little late) before the talkspurt
#: ends: 40 ms, about what a receiver's jitter buffer absorbs without a gap being heard.
UNDERRUN_GRACE_TICKS: Final = 2
#: Pause between DTMF digits sent in a row (ITU-T Q.24 receivers accept pauses from 40 ms).
DTMF_GAP_MS: Final = 60
#: A tick this late (the event loop was blocked) is not caught up frame by frame: the clock
#: restarts from now and the lateness is counted (``PlayoutTicker.late_ticks``).
MAX_LATE_S: Final = 0.1


@dataclass(frozen=True)
class BargeIn:
    """Barge-in (``[playback] barge_in``): clear the bot's audio when the caller starts
    speaking over it. ``vad_mode``: WebRTC VAD aggressiveness 0-3; ``onset_ms``: speech this
    long (20 ms steps) is an onset (``voxphone.audio.vad``)."""

    vad_mode: int = 3
    onset_ms: int = 60


class MediaEndpoint(Protocol):
    """A transport's way back to the caller; see the module docstring for the exact contract."""

    @property
    def sample_rate(self) -> int: ...

    @property
    def can_send_dtmf(self) -> bool: ...

    def send(self, pcm: Pcm, first: bool) -> None: ...

    def clear(self) -> None: ...

    async def send_dtmf(self, digit: str, duration_ms: int) -> None: ...

    def mark(self, name: str) -> None: ...

    def hangup(self, reason: str) -> None: ...


Publish = Callable[[str, dict[str, Any]], None]


@dataclass
class Playback:
    """One thing played: a decoded file, or one talkspurt of a stream. Samples at the
    endpoint's rate; ``marks`` are ``(sample offset, name)`` in order."""

    id: str
    chunks: deque[Pcm] = field(default_factory=deque)
    queued: int = 0  # samples ever queued
    sent: int = 0  # samples sent
    marks: deque[tuple[int, str]] = field(default_factory=deque)
    #: A stream may still add audio; a file playback is closed from the start.
    open: bool = False
    started: bool = False
    done: bool = False

    def append(self, pcm: Pcm) -> None:
        if pcm.size:
            self.chunks.append(pcm)
            self.queued += pcm.size

    @property
    def buffered(self) -> int:
        return self.queued - self.sent

    def take(self, n: int) -> Pcm:
        """Up to ``n`` queued samples."""
        parts: list[Pcm] = []
        need = n
        while need and self.chunks:
            head = self.chunks[0]
            if head.size <= need:
                parts.append(self.chunks.popleft())
                need -= head.size
            else:
                parts.append(head[:need])
                self.chunks[0] = head[need:]
                need = 0
        self.sent += n - need
        if not parts:
            return np.zeros(0, np.int16)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


def new_playback_id() -> str:
    return f"pb_{uuid.uuid4().hex[:20]}"


def _as_pcm(pcm: Pcm) -> Pcm:
    if pcm.dtype != np.int16 or pcm.ndim != 1:
        raise PlaybackError(f"audio must be 1-D int16 PCM, got {pcm.ndim}-D {pcm.dtype}")
    return pcm


class Playout:
    """One call's outbound queue: playbacks in order, paced by a ``PlayoutTicker``.

    Everything runs on the event loop; nothing blocks. ``tick`` sends one 20 ms frame, taking
    from the next playback when one ends mid-frame (back-to-back plays are gapless) and padding
    the last frame of a talkspurt with silence.
    """

    def __init__(self, endpoint: MediaEndpoint, publish: Publish, ticker: PlayoutTicker) -> None:
        self.endpoint = endpoint
        self.rate = endpoint.sample_rate
        self.frame = self.rate * FRAME_MS // 1000
        self._publish = publish
        self._ticker = ticker
        self.queue: deque[Playback] = deque()
        self.active = False  # in the ticker (a talkspurt is under way)
        self.stopped = False
        self._dry_ticks = 0
        self._first = False  # the next frame sent starts a talkspurt (RTP marker, RFC 3550 §5.1)
        self._dtmf_lock = asyncio.Lock()
        self._dtmf_tasks: set[asyncio.Task[None]] = set()
        #: Frames sent, talkspurts begun, ticks an open stream had nothing ready.
        self.stats: dict[str, int] = {"frames_out": 0, "talkspurts": 0, "underruns": 0}

    # -- queueing ----------------------------------------------------------------------------

    def play(self, pcm: Pcm, sample_rate: int) -> Playback:
        """Queue a whole clip (mono int16 at ``sample_rate``) after what is queued; returns its
        playback (``id`` for the API). Raises ``PlaybackError`` once the call has ended."""
        self._check_live()
        out = _resample_all(_as_pcm(pcm), sample_rate, self.rate)
        playback = Playback(new_playback_id())
        playback.append(out)
        self.queue.append(playback)
        self._wake()
        return playback

    def open_stream(self, sample_rate: int) -> OutboundStream:
        """A stream of PCM chunks at ``sample_rate`` (streaming TTS), played as they arrive."""
        self._check_live()
        return OutboundStream(self, sample_rate)

    @property
    def pending_marks(self) -> int:
        """Marks queued behind audio not yet sent."""
        return sum(len(p.marks) for p in self.queue)

    def mark(self, name: str, playback: Playback | None = None) -> None:
        """A mark at the end of what is queued now (of ``playback``, when given and still
        queued): ``playback.mark`` is sent when the audio before it has been sent; at once
        when nothing is queued (as Twilio echoes a mark on an empty buffer)."""
        target = playback if playback is not None and not playback.done else None
        if target is None and self.queue:
            target = self.queue[-1]
        if target is None:
            self.endpoint.mark(name)
            self._publish(ev.PLAYBACK_MARK, {"playback_id": None, "name": name})
            return
        target.marks.append((target.queued, name))

    def clear(self, reason: str) -> list[str]:
        """Drop everything queued: each playback gets ``playback.cleared{reason}`` (then
        ``playback.mark`` for each of its marks not yet reached), the endpoint ``clear()``,
        and the next tick sends nothing. Returns the cleared ids."""
        cleared = []
        while self.queue:
            playback = self.queue.popleft()
            playback.done = True
            cleared.append(playback.id)
            self._publish(
                ev.PLAYBACK_CLEARED,
                {
                    "playback_id": playback.id,
                    "reason": reason,
                    "played_ms": playback.sent * 1000 // self.rate,
                },
            )
            # Its pending marks are answered, as Twilio answers them on ``clear``: a bot that
            # waits for a mark learns the audio before it is gone, instead of waiting for ever.
            while playback.marks:
                _, name = playback.marks.popleft()
                self._publish(ev.PLAYBACK_MARK, {"playback_id": playback.id, "name": name})
        self._go_idle()
        if not self.stopped:
            self.endpoint.clear()
        return cleared

    def stop(self, reason: str) -> None:
        """The call is ending: clear (``reason``) and accept nothing more. Idempotent."""
        if self.stopped:
            return
        self.clear(reason)
        self.stopped = True
        for task in self._dtmf_tasks:
            task.cancel()

    @property
    def playing(self) -> bool:
        """Whether a talkspurt is under way (for barge-in)."""
        return self.active

    @property
    def queued_s(self) -> float:
        """Seconds of audio queued and not yet sent."""
        return sum(p.buffered for p in self.queue) / self.rate

    def _check_dtmf(self, digits: str) -> None:
        bad = [d for d in digits if d.upper() not in DTMF_KEYS]
        if not digits or bad:
            raise PlaybackError(
                f"digits {digits!r}: use 0-9, *, # and A-D (RFC 4733 §3.2), at least one"
            )
        if not self.endpoint.can_send_dtmf:
            raise PlaybackError("this call's transport cannot send DTMF")
        self._check_live()

    def start_dtmf(self, digits: str, duration_ms: int) -> asyncio.Task[None]:
        """``send_dtmf`` in the background (checked now: ``PlaybackError`` at once); the task
        is cancelled when the call ends. For the API, which answers before the keys are out."""
        self._check_dtmf(digits)
        task = asyncio.create_task(self.send_dtmf(digits, duration_ms))
        self._dtmf_tasks.add(task)
        task.add_done_callback(self._dtmf_done)
        return task

    def _dtmf_done(self, task: asyncio.Task[None]) -> None:
        self._dtmf_tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("dtmf_send_failed", exc_info=exc)

    async def send_dtmf(self, digits: str, duration_ms: int) -> None:
        """Send ``digits`` one after another through the endpoint, ``DTMF_GAP_MS`` apart;
        concurrent requests are sent in turn, never interleaved. ``PlaybackError`` when the
        endpoint cannot send DTMF, a digit is not a DTMF key, or the call has ended."""
        self._check_dtmf(digits)
        async with self._dtmf_lock:
            for i, digit in enumerate(digits.upper()):
                if self.stopped:
                    return
                if i:
                    await asyncio.sleep(DTMF_GAP_MS / 1000)
                await self.endpoint.send_dtmf(digit, duration_ms)

    # -- the clock ---------------------------------------------------------------------------

    def _check_live(self) -> None:
        if self.stopped:
            raise PlaybackError("the call has ended")

    def _wake(self) -> None:
        """Audio was queued: a call that was silent sends its first frame now (or, if a
        stream has less than a frame yet, on a tick soon after: that frame is still the
        talkspurt's first)."""
        if not self.active and not self.stopped:
            self.active = True
            self._dry_ticks = 0
            self._first = True
            self.stats["talkspurts"] += 1
            try:
                self._send_frame()
            except Exception:  # a broken endpoint must not leave the call unable to play
                self.active = False
                raise
            if self.active:
                self._ticker.add(self)

    def tick(self) -> bool:
        """One 20 ms tick: send a frame if one is ready. Returns whether to stay on the ticker."""
        if not self.active:
            return False
        self._send_frame()
        return self.active

    def _send_frame(self) -> None:
        parts: list[Pcm] = []
        need = self.frame
        events: list[tuple[str, dict[str, Any]]] = []
        while need and self.queue:
            playback = self.queue[0]
            short = playback.open and playback.buffered < need
            if short and not parts and self._dry_ticks < UNDERRUN_GRACE_TICKS:
                # A stream behind real time: wait a tick or two for the rest of the frame.
                self._dry_ticks += 1
                self.stats["underruns"] += 1
                return
            joined = bool(parts)
            chunk = playback.take(need)
            if chunk.size:
                if not playback.started:
                    playback.started = True
                    events.append((ev.PLAYBACK_STARTED, {"playback_id": playback.id}))
                parts.append(chunk)
                need -= chunk.size
            while playback.marks and playback.marks[0][0] <= playback.sent:
                _, name = playback.marks.popleft()
                events.append((ev.PLAYBACK_MARK, {"playback_id": playback.id, "name": name}))
            if playback.buffered or (playback.open and (not short or joined)):
                break  # the frame is full, or a stream joined mid-frame goes on next tick
            # Its end: a closed playback's last sample, or a stream dry past the grace.
            self.queue.popleft()
            playback.done = True
            if playback.started:
                played = playback.sent * 1000 // self.rate
                events.append(
                    (ev.PLAYBACK_FINISHED, {"playback_id": playback.id, "played_ms": played})
                )
        if parts:
            self._dry_ticks = 0
            frame = parts[0] if len(parts) == 1 else np.concatenate(parts)
            if frame.size < self.frame:  # a talkspurt's last frame
                frame = np.concatenate([frame, np.zeros(self.frame - frame.size, np.int16)])
            first, self._first = self._first, False
            self.endpoint.send(frame, first)
            self.stats["frames_out"] += 1
        for type_, data in events:
            if type_ == ev.PLAYBACK_MARK:  # after the frame holding it, as the provider hears it
                self.endpoint.mark(data["name"])
            self._publish(type_, data)
        if not parts or not self.queue:  # nothing left: the talkspurt is over
            self._go_idle()

    def _go_idle(self) -> None:
        if self.active:
            self.active = False
            self._ticker.discard(self)


class OutboundStream:
    """Bot audio that arrives in pieces (a websocket from a TTS): each ``write`` is resampled
    with one filter state, so joins are seamless, and appended to the stream's current
    playback; a playback is one talkspurt — it finishes when the stream runs dry (longer than
    ``UNDERRUN_GRACE_TICKS``) and the next ``write`` starts another."""

    def __init__(self, playout: Playout, sample_rate: int) -> None:
        self._playout = playout
        self.sample_rate = sample_rate
        self._resampler = Resampler(sample_rate, playout.rate)
        self.playback: Playback | None = None

    def write(self, pcm: Pcm) -> Playback:
        """Queue ``pcm`` (mono int16 at ``sample_rate``); ``PlaybackError`` once the call has
        ended."""
        self._playout._check_live()
        if self.playback is not None and self.playback.done and self.playback.buffered:
            self._resampler.reset()  # cleared mid-stream: no filter history across the cut
        out = self._resampler.process(_as_pcm(pcm))
        playback = self.playback
        if playback is None or playback.done:
            playback = self.playback = Playback(new_playback_id(), open=True)
            self._playout.queue.append(playback)
        playback.append(out)
        self._playout._wake()
        return playback

    def mark(self, name: str) -> None:
        """A mark after everything written so far."""
        self._playout.mark(name, self.playback)

    def close(self) -> None:
        """No more audio: the current playback finishes when what is queued has been sent."""
        if self.playback is not None and not self.playback.done:
            self.playback.open = False
            self.playback.append(self._resampler.flush())
            self._playout._wake()


def _resample_all(pcm: Pcm, in_rate: int, out_rate: int) -> Pcm:
    if in_rate == out_rate:
        return pcm
    resampler = Resampler(in_rate, out_rate)
    return np.concatenate([resampler.process(pcm), resampler.flush()])


class PlayoutTicker:
    """One 20 ms clock for the outbound audio of every call in a process (a registry owns one).

    Only calls with audio queued are on it; it runs while any is. Ticks are scheduled on an
    absolute grid (``loop.call_at``), so they do not drift; a tick more than ``MAX_LATE_S``
    late restarts the grid and is counted in ``late_ticks``. ``autostart=False`` leaves the
    ticking to the caller (``tick()``), for tests.
    """

    def __init__(self, *, autostart: bool = True) -> None:
        self.autostart = autostart
        self.playouts: set[Playout] = set()
        self.ticks = 0
        self.late_ticks = 0
        self._handle: asyncio.TimerHandle | None = None
        self._next = 0.0

    def add(self, playout: Playout) -> None:
        self.playouts.add(playout)
        if self.autostart and self._handle is None:
            loop = asyncio.get_running_loop()
            self._next = loop.time() + FRAME_S
            self._handle = loop.call_at(self._next, self._on_timer)

    def discard(self, playout: Playout) -> None:
        self.playouts.discard(playout)

    def tick(self) -> None:
        """Send one frame for every call with audio queued."""
        self.ticks += 1
        for playout in list(self.playouts):
            try:
                keep = playout.tick()
            except Exception:  # one call's endpoint must not silence the others
                log.exception("playout_tick_failed")
                keep = False
                playout.active = False
            if not keep:
                self.playouts.discard(playout)

    def _on_timer(self) -> None:
        self._handle = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        if now - self._next > MAX_LATE_S:
            self.late_ticks += 1
            self._next = now
        self.tick()
        if self.playouts:
            self._next += FRAME_S
            self._handle = loop.call_at(self._next, self._on_timer)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
