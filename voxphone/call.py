"""A call: codec packets in from a transport, 80 ms frames to an engine stream, events out.

A ``Call`` owns its pipeline and two tasks: the *feeder* moves frames from a bounded queue into the
engine stream (the only place that may wait on the engine), and the *reader* turns engine output
into events. While the feeder waits on an empty queue, a frame goes straight to a stream that can
take it without waiting (``SendsNow``), in the transport's own call. Transports push packets
synchronously and never wait: if the engine falls behind by more than the queue holds, the oldest
frames are dropped and counted rather than stalling the socket. A failure inside one call ends
that call with ``call.ended{reason}``, nothing else: every ``call.started`` gets exactly one
``call.ended``, and what the engine streamed of a segment it never closed (it failed, or missed
the flush deadline) is published as that segment's final.
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from array import array
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import structlog

from voxphone.audio.codecs import Codec, Pcm
from voxphone.audio.pipeline import AudioPipeline
from voxphone.audio.vad import SpeechOnset
from voxphone.clock import Clock
from voxphone.engines.base import Engine, EngineStream, SendsNow, TranscriptChunk
from voxphone.errors import DecodeError, EngineError, PlaybackError
from voxphone.events import model as ev
from voxphone.events.model import EventSequencer, EventSink
from voxphone.playback import (
    BargeIn,
    MediaEndpoint,
    OutboundStream,
    Playback,
    Playout,
    PlayoutTicker,
)

log = structlog.get_logger(__name__)

FRAME_MS = 80
FRAME_S = FRAME_MS / 1000
#: Frames whose arrival times are kept for latency (4 minutes: longer than any segment).
ARRIVALS_KEPT = 3000
#: Ended calls whose ids the registry remembers (about 1 MB).
ENDED_KEPT = 10_000
#: ``call.ended`` reasons that are voxphone's own failure, not the caller's or the bot's doing:
#: the engine failed for good (``_engine_failed``), or a bug (``_failed``).
FAILURE_REASONS = frozenset({"engine_error", "internal_error"})


@dataclass
class CallStats:
    packets: int = 0
    decode_errors: int = 0
    late_packets: int = 0
    gap_ms: int = 0
    dropped_frames: int = 0
    #: What a transport received and could not use, by reason (``early_audio_over_limit``,
    #: ``unknown_message``...): counted, never dropped silently.
    dropped: dict[str, int] = field(default_factory=dict)


class Call:
    """One call's pipeline and lifecycle. Create with ``CallRegistry.open``."""

    def __init__(
        self,
        call_id: str,
        codec: Codec,
        sink: EventSink,
        clock: Clock,
        *,
        transport: str,
        metadata: dict[str, Any] | None = None,
        max_gap_s: float = 5.0,
        max_queued_frames: int = 250,
        end_timeout_s: float = 10.0,
        max_duration_s: float | None = None,
        channel: int | None = None,
        ticker: PlayoutTicker | None = None,
        endpoint: MediaEndpoint | None = None,
        barge_in: BargeIn | None = None,
    ) -> None:
        self._max_duration_s = max_duration_s
        #: Which channel of a stereo stream this call transcribes (stamped on every event).
        self.channel = channel
        self.call_id = call_id
        self.codec = codec
        self.transport = transport
        self.metadata = metadata or {}
        self.pipeline = AudioPipeline(codec, max_gap_s=max_gap_s)
        self.stats = CallStats()
        #: Transport-specific counters (jitter buffer, RTCP...), reported in ``call.ended``.
        self.transport_stats: dict[str, int] = {}
        self.end_reason: str | None = None
        self._hangup: Callable[[str], None] | None = None  # a transport's (``hangup``)
        self._on_finish: list[Callable[[], None]] = []  # transports' last words (``on_finish``)
        #: Metadata that arrived after ``call.started`` (reported in ``call.ended``).
        self.late_metadata: dict[str, Any] = {}
        self._clock = clock
        #: Publishes the call's events: bound to the sink and sequencer, not to the call, so
        #: the playout that holds it does not hold the call (``_release``).
        self._publish = functools.partial(_publish, sink, EventSequencer(call_id, clock), channel)
        #: Bounded by ``_enqueue`` (drops) and ``_room_or_end`` (waits) at ``max_queued_frames``;
        #: the end of the audio (the pipeline's last frames, then ``None``) goes in without
        #: costing a frame.
        #: A deque and the feeder's one waiting future rather than an ``asyncio.Queue``, whose
        #: general machinery (``full``, its getters and putters, task accounting) costs
        #: microseconds on every frame of every call and buys nothing for one reader.
        self._frames: deque[Pcm | None] = deque()
        self._more: asyncio.Future[None] | None = None  # the feeder's, while nothing is queued
        #: The stream's ``send_nowait`` (``SendsNow``), while the feeder may be bypassed: a
        #: frame that arrives while nothing is queued goes to the engine at once.
        self._send_now: Callable[[Pcm], bool] | None = None
        self._send_failed: Exception | None = None  # raised by the feeder, as ``send``'s would be
        self._max_frames = max_queued_frames
        self._room = asyncio.Event()  # set when the feeder takes a frame (for ``feed_*``)
        #: When each queued frame arrived (monotonic s), in step with ``_frames``; then, for
        #: frames sent, ``(frames sent so far, arrival)``: the arrival of the audio ending at
        #: any ``end_ms`` the engine reports, for ``transcript.final.latency_ms``.
        self._queued_at: deque[float] = deque()
        #: When the audio of frame n arrived (monotonic s), at ``n % ARRIVALS_KEPT``: a ring of
        #: plain doubles, 24 KiB a call, where a deque of (n, time) tuples grew to ≈350 KiB.
        self._sent_at = array("d", bytes(8 * ARRIVALS_KEPT))
        self._end_timeout_s = end_timeout_s
        self._started_at = clock.monotonic()
        self._segments: list[str] = []
        self._segment_id = 0
        #: The open segment as streamed: its deltas, and the audio sent when the first and the
        #: last arrived (ms on the call clock), for a final the engine never sends.
        self._open: list[str] = []
        self._open_ms = (0, 0)
        self._stream: EngineStream | None = None
        self._task: asyncio.Task[None] | None = None
        self._flush_expired = False
        self._timers: list[asyncio.TimerHandle] = []
        self.frames_sent = 0
        self._log = log.bind(call_id=call_id)
        #: Talk back: the shared 20 ms clock, and the outbound queue once a transport has
        #: attached its endpoint (``attach_endpoint``); None for a call that can only listen.
        self._ticker = ticker
        self.playout: Playout | None = None
        self._barge_in = barge_in
        self._onset: SpeechOnset | None = None
        if endpoint is not None:
            self.attach_endpoint(endpoint)

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, engine: Engine, on_done: Callable[[Call], None] | None = None) -> None:
        """Announce the call and start its tasks; audio may be pushed right away."""
        self._publish(
            ev.CALL_STARTED,
            {"transport": self.transport, "codec": self.codec.name, **self.metadata},
        )
        self._log.info("call_started", transport=self.transport, codec=self.codec.name)
        self._task = asyncio.create_task(self._run(engine), name=f"call-{self.call_id}")
        if self._max_duration_s is not None:
            loop = asyncio.get_running_loop()
            # Through the transport (``hangup``), so it stops the media as well as the call.
            self._timers.append(
                loop.call_later(self._max_duration_s, lambda: self.hangup("max_duration"))
            )
        if on_done is not None:
            self._task.add_done_callback(lambda _task: on_done(self))

    def end(self, reason: str) -> None:
        """Hang up: flush the audio path and let the engine finish. Idempotent.

        The engine gets ``end_timeout_s`` plus the queued audio's duration (it must keep up with
        real time) to say its last words; then the call ends without them (``_flush_deadline``).
        """
        if self.end_reason is not None:
            return
        self.end_reason = reason
        self._stop_playout()
        for frame in self.pipeline.flush():
            self._queue(frame)
        timeout_s = self._end_timeout_s + len(self._frames) * FRAME_S
        self._frames.append(None)
        self._wake_feeder()
        self._room.set()  # a file's feeder stops waiting
        if self._task is not None:
            loop = asyncio.get_running_loop()
            self._timers.append(loop.call_later(timeout_s, self._flush_deadline, timeout_s))

    async def wait(self) -> None:
        """Until ``call.ended`` has been published."""
        if self._task is not None:
            await asyncio.wait([self._task])

    async def abort(self, reason: str) -> None:
        """End now without waiting for the engine's last words (shutdown deadline passed)."""
        self.end_reason = self.end_reason or reason
        self._give_up("engine did not finish the transcript before the shutdown deadline")
        await self.wait()

    @property
    def hangup(self) -> Callable[[str], None]:
        """Hang up from outside (API ``DELETE``, shutdown, ``max_duration``): ``end``, unless
        a transport that holds media (a jitter buffer) has set its own, which plays that out
        first and then calls ``end``."""
        return self._hangup or self.end

    @hangup.setter
    def hangup(self, hook: Callable[[str], None]) -> None:
        self._hangup = hook

    def on_finish(self, hook: Callable[[], None]) -> None:
        """``hook()`` runs once, just before ``call.ended`` is built, however the call ended:
        the transport's last word. A call can end without its transport's doing (the engine
        failed, a bug): a transport that holds media and counters (a jitter buffer) reports
        them here and stops handing the ended call packets, which it counts instead, so none
        is dropped unseen and ``call.ended.transport`` is never empty for want of a hang-up.
        A hook that raises is logged and the call still ends."""
        self._on_finish.append(hook)

    @property
    def done(self) -> bool:
        return self._task is not None and self._task.done()

    # -- audio out (talk back) ---------------------------------------------------------------

    def attach_endpoint(self, endpoint: MediaEndpoint) -> None:
        """The transport's way back to the caller (``voxphone.playback``): bot audio, DTMF and
        hang-ups go through it from now on; ``hangup`` becomes ``endpoint.hangup``."""
        if self._ticker is None:
            self._ticker = PlayoutTicker()
        self.playout = Playout(endpoint, self._publish, self._ticker)
        self.hangup = endpoint.hangup
        if self._barge_in is not None:
            self.pipeline.tap = self._listen
        if self.end_reason is not None:
            self.playout.stop("hangup")

    def _out(self) -> Playout:
        if self.end_reason is not None:
            raise PlaybackError("the call has ended")
        if self.playout is None:
            raise PlaybackError(f"transport {self.transport} cannot play audio into the call")
        return self.playout

    def play(self, pcm: Pcm, sample_rate: int) -> Playback:
        """Queue a clip (mono int16 PCM at ``sample_rate`` Hz) after whatever is queued; it is
        resampled to the endpoint's rate. Returns its ``Playback`` (``.id``). Raises
        ``PlaybackError`` when the call has ended or its transport cannot talk back."""
        return self._out().play(pcm, sample_rate)

    def open_audio_stream(self, sample_rate: int) -> OutboundStream:
        """A stream of bot audio at ``sample_rate`` Hz (streaming TTS), played as it arrives."""
        return self._out().open_stream(sample_rate)

    def mark(self, name: str) -> None:
        """``playback.mark{name}`` once everything queued now has been sent."""
        self._out().mark(name)

    def clear(self, reason: str = "api") -> list[str]:
        """Stop the bot: drop all queued audio (``playback.cleared{reason}`` for each playback);
        the next 20 ms tick is silent. Returns the ids cleared."""
        return self._out().clear(reason)

    async def send_dtmf(self, digits: str, duration_ms: int = 100) -> None:
        """Send key presses to the caller, one after another (``PlaybackError`` when the
        transport cannot, a key is invalid, or the call has ended)."""
        await self._out().send_dtmf(digits, duration_ms)

    def start_dtmf(self, digits: str, duration_ms: int = 100) -> None:
        """``send_dtmf`` in the background, checked at once (``PlaybackError``)."""
        self._out().start_dtmf(digits, duration_ms)

    @property
    def playing(self) -> bool:
        """Whether bot audio is going out right now (a talkspurt is under way)."""
        return self.playout is not None and self.playout.playing

    def _listen(self, pcm: Pcm, rate: int) -> None:
        """Barge-in: the caller's audio while the bot talks; at a speech onset, clear."""
        if not self.playing:
            self._onset = None  # the next talkspurt counts afresh (and idle calls cost nothing)
            return
        if self._onset is None or self._onset.in_rate != rate:
            assert self._barge_in is not None
            self._onset = SpeechOnset(rate, self._barge_in.vad_mode, self._barge_in.onset_ms)
        if self._onset.feed(pcm) and self.playout is not None:
            self._log.info("barge_in")
            self.playout.clear("barge_in")

    def _stop_playout(self) -> None:
        if self.playout is not None:
            self.playout.stop("hangup")

    # -- audio in --------------------------------------------------------------------------

    def push_packet(self, timestamp: int, payload: bytes, codec: Codec | None = None) -> None:
        """One codec payload with its media timestamp; never blocks, never raises. ``codec``:
        the payload's format when the sender may switch formats mid-stream (RTP payload types);
        the decoder changes at this packet and the call's clock goes on."""
        if self.end_reason is not None:
            return
        pipeline = self.pipeline
        if codec is not None and codec is not pipeline.codec:
            try:
                switched = pipeline.switch(codec)
            except DecodeError as exc:  # no decoder for it here: counted like its payloads
                self._undecodable(exc)
                return
            for frame in switched:
                self._enqueue(frame)
        # ``_decode`` written out: this runs for every 20 ms packet of every call, and three
        # packets in four only add a payload to the pipeline's pending list.
        self.stats.packets += 1
        timeline = pipeline.timeline.stats
        late = timeline.late
        try:
            frames = pipeline.push_packet(timestamp, payload)
        except DecodeError as exc:
            self._undecodable(exc)
            return
        if timeline.late != late:
            self.count_dropped("late", timeline.late - late)
        for frame in frames:
            self._enqueue(frame)

    def fill_silence(self, timestamp: int) -> None:
        """Silence up to ``timestamp`` (comfort noise, RFC 3389: the sender's pause is media)."""
        if self.end_reason is not None:
            return
        late = self.pipeline.timeline.stats.late
        for frame in self.pipeline.push_timed_pcm(timestamp, np.zeros(0, np.int16)):
            self._enqueue(frame)
        self.count_dropped("late", self.pipeline.timeline.stats.late - late)

    def push_pcm(self, timestamp: int, pcm: Pcm) -> None:
        """Decoded mono PCM at ``pipeline.rate`` with its media timestamp; never blocks."""
        if self.end_reason is not None:
            return
        self.stats.packets += 1
        for frame in self.pipeline.push_timed_pcm(timestamp, pcm):
            self._enqueue(frame)

    def discontinuity(self) -> None:
        """The media stream restarted (new SSRC): its timestamps start afresh."""
        self.pipeline.timeline.reset()

    def dtmf(self, digit: str, duration_ms: int, timestamp: int | None = None) -> None:
        """A key press (RFC 4733, AudioSocket, a media-stream ``dtmf`` message). ``at_ms`` is
        when it was pressed on the call clock: from its media ``timestamp`` when the transport
        has one (RFC 4733 stamps an event with its start), else the audio received so far."""
        if self.end_reason is None:
            at_ms = (
                self.pipeline.framer.position_ms
                if timestamp is None
                else self.pipeline.timeline.ms_at(timestamp)
            )
            self._publish(ev.DTMF, {"digit": digit, "duration_ms": duration_ms, "at_ms": at_ms})

    def count_dropped(self, reason: str, n: int = 1, **detail: Any) -> None:
        """``n`` things the transport could not use, by ``reason``; logged once per reason
        (with ``detail``, e.g. the unknown message's name)."""
        if n <= 0:
            return
        if reason not in self.stats.dropped:
            self._log.warning("transport_dropped", reason=reason, count=n, **detail)
        self.stats.dropped[reason] = self.stats.dropped.get(reason, 0) + n

    def merge_metadata(self, metadata: dict[str, Any]) -> None:
        """Metadata learnt after ``call.started`` (a late metadata frame): kept on the call and
        reported in ``call.ended.metadata``."""
        self.metadata.update(metadata)
        self.late_metadata.update(metadata)

    def push_payload(self, payload: bytes) -> None:
        """A payload from a stream with no timestamps: it follows the previous one directly."""
        if self.end_reason is not None:
            return
        self.stats.packets += 1
        try:
            frames = self.pipeline.push_contiguous(payload)
        except DecodeError as exc:
            self.stats.decode_errors += 1
            self._log.debug("decode_error", error=str(exc))
            return
        for frame in frames:
            self._enqueue(frame)

    async def feed_packet(self, timestamp: int, payload: bytes) -> None:
        """Like ``push_packet`` but waits for room instead of dropping (files, not live media).
        A packet after the call has ended is ignored, as ``push_packet`` ignores it."""
        if await self._room_or_end():
            for frame in self._decode(timestamp, payload):
                self._queue(frame)

    async def feed_pcm(self, pcm: Pcm) -> None:
        """Decoded, gap-free PCM at ``pipeline.rate``, waiting for room (files, not live media).
        Audio after the call has ended (``end``, say on Ctrl-C, or ``max_duration``) is ignored:
        not decoded, not counted in ``call.ended.audio_ms``. So the wait comes before each
        80 ms piece goes into the pipeline: audio decoded and then thrown away at the end
        would be counted as heard."""
        step = self.pipeline.rate * FRAME_MS // 1000
        for pos in range(0, pcm.size, step):
            if not await self._room_or_end():
                return
            for frame in self.pipeline.push_pcm(pcm[pos : pos + step]):
                self._queue(frame)

    async def _room_or_end(self) -> bool:
        """Wait while the queue is full; False once the call has ended. A piece's frames are
        queued without a second wait, so the queue may pass its bound by a frame or two."""
        while len(self._frames) >= self._max_frames and self.end_reason is None:
            self._room.clear()
            await self._room.wait()
        return self.end_reason is None

    def _decode(self, timestamp: int, payload: bytes) -> list[Pcm]:
        """Decode and place one payload; one the codec rejects is counted ``undecodable``, one
        wholly behind the play-out point ``late`` (both in ``stats.dropped``)."""
        self.stats.packets += 1
        timeline = self.pipeline.timeline.stats
        late = timeline.late
        try:
            frames = self.pipeline.push_packet(timestamp, payload)
        except DecodeError as exc:
            self._undecodable(exc)
            return []
        if timeline.late != late:
            self.count_dropped("late", timeline.late - late)
        return frames

    def _undecodable(self, exc: DecodeError) -> None:
        self.stats.decode_errors += 1
        self.count_dropped("undecodable", error=str(exc))

    def _enqueue(self, frame: Pcm) -> None:
        """Queue a live frame, dropping the oldest when full; or, while the feeder waits on an
        empty queue, hand it to a ``SendsNow`` stream at once. Once per 80 ms frame of every
        call, so ``_queue`` is written out and the bound read from ``_queued_at`` (in step
        with ``_frames`` until the end marker, which comes after the last frame)."""
        queued_at = self._queued_at
        if len(queued_at) >= self._max_frames:
            self._frames.popleft()
            queued_at.popleft()
            self.stats.dropped_frames += 1
            if self.stats.dropped_frames % 50 == 1:
                self._log.warning(
                    "engine_lagging_frames_dropped", dropped=self.stats.dropped_frames
                )
        elif self._more is not None and self._send_now is not None and self._send_directly(frame):
            return
        self._frames.append(frame)
        queued_at.append(self._clock.monotonic())
        if self._more is not None:
            self._wake_feeder()

    def _send_directly(self, frame: Pcm) -> bool:
        """Hand ``frame`` to the engine now, the feeder parked on an empty queue (so in
        order): what the feeder would do, without waking it (``SendsNow``). False: queue it."""
        assert self._send_now is not None
        try:
            if not self._send_now(frame):
                return False
        except Exception as exc:  # the call fails as it would had the feeder's ``send`` raised
            self._send_now, self._send_failed = None, exc
            self._wake_feeder()
            return True
        self.frames_sent += 1
        self._sent_at[self.frames_sent % ARRIVALS_KEPT] = self._clock.monotonic()
        return True

    def _queue(self, frame: Pcm) -> None:
        self._frames.append(frame)
        self._queued_at.append(self._clock.monotonic())
        self._wake_feeder()

    def _wake_feeder(self) -> None:
        more, self._more = self._more, None
        if more is not None and not more.done():
            more.set_result(None)

    # -- tasks -----------------------------------------------------------------------------

    async def _run(self, engine: Engine) -> None:
        """The call's task boundary: whatever happens inside, ``call.ended`` is published once."""
        try:
            await self._transcribe(engine)
        except asyncio.CancelledError:
            await self._abort_stream()
            self._finish()
            if not self._flush_expired:
                raise
            return
        except Exception as exc:  # the one place every failure of a call ends up
            self._failed(exc)
        self._finish()

    async def _transcribe(self, engine: Engine) -> None:
        """Feed the stream and read its output until it ends; a failure of either stops both."""
        self._stream = stream = await engine.open_stream(self.call_id)
        async with asyncio.TaskGroup() as tasks:
            feeder = tasks.create_task(self._feed(stream))
            if isinstance(stream, SendsNow):
                self._send_now = stream.send_nowait
            async for chunk in stream.chunks():
                self._on_chunk(chunk)
            feeder.cancel()  # the engine has said all it will

    async def _feed(self, stream: EngineStream) -> None:
        try:
            await self._feed_frames(stream)
        finally:  # done, or cancelled (the engine failed): no frame may bypass it any more
            self._more = self._send_now = None

    async def _feed_frames(self, stream: EngineStream) -> None:
        frames = self._frames
        while True:
            while not frames:
                self._more = asyncio.get_running_loop().create_future()
                await self._more
                if self._send_failed is not None:
                    raise self._send_failed
            if (frame := frames.popleft()) is None:
                break
            self._room.set()
            arrived = self._queued_at.popleft()
            await stream.send(frame)
            self.frames_sent += 1
            self._sent_at[self.frames_sent % ARRIVALS_KEPT] = arrived
        await stream.close()

    async def _abort_stream(self) -> None:
        if self._stream is not None:
            try:
                await self._stream.abort()
            except Exception:  # the call ends anyway; its stream's resources may leak
                self._log.exception("engine_abort_failed")

    def _flush_deadline(self, timeout_s: float) -> None:
        self._give_up(f"engine did not finish the transcript within {timeout_s:g} s of the hang-up")

    def _give_up(self, why: str) -> None:
        """Stop waiting for the engine: say so, and end the call with what it streamed."""
        if self._task is not None and not self._task.done() and not self._flush_expired:
            self._log.warning("engine_flush_timeout", why=why)
            message = f"{why}; the open segment is final as streamed"
            self._publish(ev.ENGINE_ERROR, {"message": message, "recovered": False})
            self._flush_expired = True
            self._task.cancel()

    def _failed(self, exc: Exception) -> None:
        """An engine failure (expected: ``EngineError``) or a bug (anything else)."""
        while isinstance(exc, ExceptionGroup):  # from the feeder/reader task group
            exc = exc.exceptions[0]
        if isinstance(exc, EngineError):
            self._engine_failed(exc)
            return
        self._log.error("call_failed", exc_info=exc)
        self.end_reason = "internal_error"

    def _on_chunk(self, chunk: TranscriptChunk) -> None:
        if chunk.error:
            self._log.warning("engine_recovered", error=chunk.error)
            self._publish(ev.ENGINE_ERROR, {"message": chunk.error, "recovered": True})
        if chunk.delta:
            at_ms = self.frames_sent * FRAME_MS
            self._open_ms = (self._open_ms[0] if self._open else at_ms, at_ms)
            self._open.append(chunk.delta)
            self._publish(
                ev.TRANSCRIPT_DELTA, {"text": chunk.delta, "segment_id": self._segment_id}
            )
        if chunk.segment_end:
            self._open = []
            text = chunk.text.strip()
            if text:
                self._segments.append(text)
                self._publish(
                    ev.TRANSCRIPT_FINAL,
                    {
                        "text": text,
                        "segment_id": self._segment_id,
                        "start_ms": chunk.start_ms,
                        "end_ms": chunk.end_ms,
                        **self._latency(chunk.end_ms),
                    },
                )
            self._segment_id += 1

    def _latency(self, end_ms: int | None) -> dict[str, int]:
        """``{"latency_ms": …}``: from the arrival of the audio at ``end_ms`` (the end of the
        segment's speech, on the engine's clock) to now; empty when that is not known (no
        ``end_ms``, or its frame no longer remembered). An ``end_ms`` past the last frame (the
        engine rounds up to its own step) counts from the last frame: no later audio exists."""
        if end_ms is None:
            return {}
        frame = min(-(-end_ms // FRAME_MS), self.frames_sent)  # the frame holding end_ms, from 1
        if frame < 1 or frame <= self.frames_sent - ARRIVALS_KEPT:
            return {}
        arrived = self._sent_at[frame % ARRIVALS_KEPT]
        return {"latency_ms": round((self._clock.monotonic() - arrived) * 1000)}

    def _engine_failed(self, exc: EngineError) -> None:
        self._log.error("engine_error", error=str(exc))
        self._publish(ev.ENGINE_ERROR, {"message": str(exc), "recovered": False})
        # Even after a hang-up: the transcript is incomplete, which is what consumers must know.
        self.end_reason = "engine_error"

    def _finish(self) -> None:
        self.end_reason = self.end_reason or "ended"  # no more audio, even for a waiting file
        self._stop_playout()
        self._room.set()
        for timer in self._timers:  # a pending timer would keep the finished call alive
            timer.cancel()
        hooks, self._on_finish = self._on_finish, []  # (they hold the transport, which holds us)
        for hook in hooks:
            try:
                hook()
            except Exception:
                self._log.exception("transport_finish_failed")
        if self._open:  # the engine will never close it: its deltas are all we have
            start_ms, end_ms = self._open_ms
            text = "".join(self._open)
            self._on_chunk(
                TranscriptChunk(segment_end=True, text=text, start_ms=start_ms, end_ms=end_ms)
            )
        s = self.pipeline.timeline.stats
        self.stats.late_packets = s.late
        self.stats.gap_ms = round(s.gap_ms)
        duration_ms = int((self._clock.monotonic() - self._started_at) * 1000)
        self._publish(
            ev.CALL_ENDED,
            {
                "reason": self.end_reason,
                "duration_ms": duration_ms,
                "audio_ms": self.pipeline.framer.position_ms,
                "transcript": " ".join(self._segments),
                "stats": asdict(self.stats),
                "engine": self._stream.stats() if self._stream is not None else {},
                "transport": self.transport_stats,
                **({"metadata": self.late_metadata} if self.late_metadata else {}),
            },
        )
        self._log.info(
            "call_ended", reason=self.end_reason, duration_ms=duration_ms, **asdict(self.stats)
        )
        self._release()

    def _release(self) -> None:
        """Let go of what points back at this ended call — the transport's hang-up hook (a
        bound method of a session that holds the call), the barge-in tap, the stopped playout
        (its endpoint holds the call) — so that once the registry and the transport forget
        it, reference counting frees it at once. Left in reference cycles, ended calls wait
        for the cyclic collector's oldest generation, which runs ever more seldom as the heap
        grows, holding each one's audio state."""
        self._hangup = None
        self.pipeline.tap = None
        self.playout = None


def _publish(
    sink: EventSink, events: EventSequencer, channel: int | None, type_: str, data: dict[str, Any]
) -> None:
    """One of a call's events, numbered, to the sink; stamped with the ``channel`` of a
    two-speaker stream."""
    if channel is not None:
        data = {**data, "channel": channel}
    sink.publish(events.next(type_, data))


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:20]}"


class CallRegistry:
    """The process's live calls, with an admission limit."""

    def __init__(
        self,
        engine: Engine,
        sink: EventSink,
        clock: Clock,
        max_concurrent: int,
        max_gap_s: float,
        max_duration_s: float | None = None,
        barge_in: BargeIn | None = None,
    ) -> None:
        self._max_duration_s = max_duration_s
        #: Barge-in settings every call gets (None: off).
        self.barge_in = barge_in
        self.engine = engine
        self._sink = sink
        self.clock = clock
        self.max_concurrent = max_concurrent
        self._max_gap_s = max_gap_s
        self.calls: dict[str, Call] = {}
        #: Ids of the calls that ended most recently (``ENDED_KEPT``), so the API can tell an
        #: ended call (410) from one that never was (404).
        self.ended: dict[str, None] = {}
        #: The one 20 ms clock every call's outbound audio is paced by.
        self.ticker = PlayoutTicker()
        #: Calls refused, by ``(transport, reason)``; reason is ``draining``, ``limit`` or
        #: ``duplicate_id`` (for ``/metrics``).
        self.refused: dict[tuple[str, str], int] = {}
        self.accepting = True
        self._idle = asyncio.Event()
        self._idle.set()

    def open(
        self,
        codec: Codec,
        *,
        transport: str,
        metadata: dict[str, Any] | None = None,
        call_id: str | None = None,
        channel: int | None = None,
        endpoint: MediaEndpoint | None = None,
    ) -> Call | None:
        """Admit and start a call, or return ``None`` (counted) when draining or at the limit."""
        if (why := self.why_refused(call_id)) is not None:
            self.refuse(transport, why, call_id=call_id)
            return None
        call = Call(
            call_id or new_call_id(),
            codec,
            self._sink,
            self.clock,
            transport=transport,
            metadata=metadata,
            max_gap_s=self._max_gap_s,
            max_duration_s=self._max_duration_s,
            channel=channel,
            ticker=self.ticker,
            endpoint=endpoint,
            barge_in=self.barge_in,
        )
        self.calls[call.call_id] = call
        self._idle.clear()
        call.start(self.engine, on_done=self._forget)
        return call

    def why_refused(self, call_id: str | None = None) -> str | None:
        """Why a new call would be refused now (``draining``, ``limit``...), or None."""
        if not self.accepting:
            return "draining"
        if len(self.calls) >= self.max_concurrent:
            return "limit"
        return "duplicate_id" if call_id in self.calls else None

    def refuse(self, transport: str, reason: str, **detail: Any) -> None:
        """Count a call refused at ``transport`` (an ingress that refuses before ``open``
        calls this itself); logged on the first of each kind and every 100th after."""
        key = (transport, reason)
        n = self.refused[key] = self.refused.get(key, 0) + 1
        if n % 100 == 1:
            log.warning("call_refused", transport=transport, reason=reason, count=n, **detail)

    def _forget(self, call: Call) -> None:
        self.calls.pop(call.call_id, None)
        self.ended[call.call_id] = None
        if len(self.ended) > ENDED_KEPT:
            del self.ended[next(iter(self.ended))]
        if not self.calls:
            self._idle.set()

    async def wait_idle(self, timeout_s: float, urgent: asyncio.Event | None = None) -> bool:
        """Until every live call has ended on its own, ``timeout_s`` passes, or ``urgent`` is
        set; True when no call is left."""
        waits = [asyncio.ensure_future(self._idle.wait())]
        if urgent is not None:
            waits.append(asyncio.ensure_future(urgent.wait()))
        try:
            await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        return not self.calls

    async def drain(self, timeout_s: float, urgent: asyncio.Event | None = None) -> None:
        """Refuse new calls, hang up the live ones (``shutdown``), give the engine
        ``timeout_s`` to finish their transcripts (none once ``urgent`` is set), then abort."""
        self.accepting = False
        calls = list(self.calls.values())
        for call in calls:
            call.hangup("shutdown")
        if calls and not (urgent is not None and urgent.is_set()):
            await self.wait_idle(timeout_s, urgent)
        for call in calls:
            if not call.done:
                await call.abort("shutdown")
