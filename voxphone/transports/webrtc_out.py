"""Talk back to a browser: an aiortc outbound audio track, and the call's ``MediaEndpoint``.

aiortc's RTP sender pulls frames from a track (``await track.recv()``) and sends each as soon
as it has it, so the track sets the pace, as aiortc's own ``AudioStreamTrack`` does: ``recv``
returns one 20 ms frame per 20 ms on a fixed grid (no drift), the next one the call queued or
silence when none is queued, so the browser's jitter buffer sees one continuous stream. Frames
are at the negotiated codec's rate (48 kHz for Opus, 8 kHz for PCMU/PCMA, 16 kHz for G.722):
aiortc's encoders then have nothing to resample. The call's clock and the track's are both
20 ms; what the call queues ahead of the track is bounded (``MAX_QUEUED_FRAMES``, the oldest
dropped and counted ``outbound_backlog``), and ``clear`` empties it.

DTMF goes the way the browser's keys come in: a message on the ``events`` data channel,
``{"type": "bot.dtmf", "digit": "5", "duration_ms": 100}`` (the demo page plays the tone).
aiortc has no RTCDTMFSender, so there are no RFC 4733 events on the browser's audio.
"""

from __future__ import annotations

import asyncio
import fractions
import json
from collections import deque
from collections.abc import Callable

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from voxphone.audio.codecs import Pcm

FRAME_MS = 20
#: Frames the call may queue ahead of the track: 200 ms (the two clocks are both 20 ms; this
#: only fills when the event loop stalls).
MAX_QUEUED_FRAMES = 10


class BotAudioTrack(MediaStreamTrack):
    """An outbound audio track fed 20 ms mono int16 frames at ``sample_rate``."""

    kind = "audio"

    def __init__(self, sample_rate: int) -> None:
        super().__init__()
        self.sample_rate = sample_rate
        self.samples = sample_rate * FRAME_MS // 1000
        self._queue: deque[Pcm] = deque()
        self._silence = np.zeros(self.samples, np.int16)
        self._time_base = fractions.Fraction(1, sample_rate)
        self._pts = 0
        self._start: float | None = None
        #: Told how many frames were dropped because the call queued too far ahead.
        self.on_drop: Callable[[int], None] = lambda n: None
        self.frames_sent = 0
        self.silent_frames = 0

    def push(self, pcm: Pcm) -> None:
        """Queue one frame (``samples`` int16 samples) for the next ``recv``."""
        if len(self._queue) >= MAX_QUEUED_FRAMES:
            self._queue.popleft()
            self.on_drop(1)
        self._queue.append(pcm)

    def clear(self) -> int:
        """Drop the frames not yet sent; returns how many."""
        n = len(self._queue)
        self._queue.clear()
        return n

    async def recv(self) -> av.AudioFrame:
        """The next frame, 20 ms after the previous one (aiortc's sender calls this)."""
        if self.readyState != "live":
            raise MediaStreamError
        loop = asyncio.get_running_loop()
        if self._start is None:
            self._start = loop.time()
        else:
            self._pts += self.samples
            wait = self._start + self._pts / self.sample_rate - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
        if self._queue:
            pcm = self._queue.popleft()
            self.frames_sent += 1
        else:
            pcm = self._silence
            self.silent_frames += 1
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(pcm, np.int16).reshape(1, -1), format="s16", layout="mono"
        )
        frame.sample_rate = self.sample_rate
        frame.pts = self._pts
        frame.time_base = self._time_base
        return frame


def dtmf_message(digit: str, duration_ms: int) -> str:
    """The data-channel message that carries one key to the browser."""
    return json.dumps({"type": "bot.dtmf", "digit": digit, "duration_ms": duration_ms})


class WebRtcEndpoint:
    """A browser call's way back: the outbound track, the events data channel for DTMF, and
    the session's hang-up (which plays out the inbound tail, then closes the connection)."""

    can_send_dtmf = True

    def __init__(
        self,
        track: BotAudioTrack,
        send_text: Callable[[str], None],
        hangup: Callable[[str], None],
    ) -> None:
        self._track = track
        self._send_text = send_text
        self._hangup = hangup

    @property
    def sample_rate(self) -> int:
        return self._track.sample_rate

    def send(self, pcm: Pcm, first: bool) -> None:
        self._track.push(pcm)

    def mark(self, name: str) -> None:
        """No message for it on this transport: ``playback.mark`` says it all."""

    def clear(self) -> None:
        self._track.clear()

    async def send_dtmf(self, digit: str, duration_ms: int) -> None:
        """Tell the browser (data channel), then take as long as the key lasts."""
        self._send_text(dtmf_message(digit, duration_ms))
        await asyncio.sleep(duration_ms / 1000)

    def hangup(self, reason: str) -> None:
        self._hangup(reason)
