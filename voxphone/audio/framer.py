"""The model's clock: media timestamps in, exact 80 ms frames of 16 kHz PCM out.

``Timeline`` decides where each packet's samples belong on the call's sample clock, driven by the
media timestamp rather than arrival time: a gap becomes silence, a late or duplicate packet is
dropped, and a jump too large to be loss (a sender reset) re-anchors the clock instead of
stalling it. ``Framer`` cuts the resampled stream into the 1280-sample frames the engines eat
(Voxtral: one token per 80 ms frame).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from voxphone.audio.codecs import Pcm

FRAME_MS = 80
FRAME_SAMPLES = 1280  # 80 ms at 16 kHz
_TS_MOD = 1 << 32


def ts_delta(a: int, b: int) -> int:
    """Signed difference ``a - b`` of two 32-bit RTP timestamps, correct across wrap-around."""
    d = (a - b) % _TS_MOD
    return d - _TS_MOD if d >= _TS_MOD // 2 else d


@dataclass
class TimelineStats:
    late: int = 0  # wholly before the play-out point: duplicates and reordered stragglers
    gap_samples: int = 0  # silence inserted for loss or gaps
    gap_ms: float = 0.0  # the same in ms of media (exact across codec changes)
    discontinuities: int = 0  # timestamp jumps treated as a new origin


@dataclass(frozen=True)
class Placement:
    """What to do with one packet: insert ``silence`` samples, then its samples from ``skip`` on."""

    silence: int
    skip: int


#: The placement of a packet that follows the last one exactly: one shared object, since most
#: packets are placed so and ``place`` runs for each of them.
CONTIGUOUS = Placement(0, 0)


class Timeline:
    """Places packets on a continuous sample clock from their media timestamps.

    ``clock_rate`` is the timestamp unit (RTP clock), ``sample_rate`` the decoded audio's rate; they
    differ for G.722. ``max_gap_s`` bounds the silence one gap may insert; a larger forward jump,
    or a backward jump beyond ``max_late_s``, is a discontinuity: the clock re-anchors there.
    """

    def __init__(
        self, clock_rate: int, sample_rate: int, max_gap_s: float = 5.0, max_late_s: float = 1.0
    ) -> None:
        self._max_gap_s, self._max_late_s = max_gap_s, max_late_s
        self._next_ts: int | None = None
        #: Media time placed so far is ``_elapsed_ms_before`` (ms, up to the last clock-rate
        #: change) plus ``_elapsed`` units of the current RTP clock: an integer add per packet
        #: rather than float ms, and exact; ``elapsed_ms`` is computed when asked.
        self._elapsed_ms_before = 0.0
        self._elapsed = 0
        self.stats = TimelineStats()
        self._clock_rate = clock_rate
        #: The last packet size placed and its duration in clock units, so that a packet of the
        #: same size (nearly all of them) skips the division and rounding.
        self._last_n = -1
        self._last_duration = 0
        self.retime(clock_rate, sample_rate)

    def retime(self, clock_rate: int, sample_rate: int) -> None:
        """A new payload format from the same source (RFC 3550 §5.1: the clock is the format's).
        The same RTP clock rate continues the timeline (G.722 → PCMA, both 8000 Hz clocks,
        RFC 3551 §4.5.2); another one makes timestamps incomparable, so the next packet
        re-anchors."""
        if clock_rate != self._clock_rate:
            self.reset()
        self._elapsed_ms_before = self.elapsed_ms
        self._elapsed = 0
        self._clock_rate = clock_rate
        self._last_n = -1
        self._ratio = sample_rate / clock_rate
        self._max_gap = int(self._max_gap_s * clock_rate)
        self._max_late = int(self._max_late_s * clock_rate)

    @property
    def elapsed_ms(self) -> float:
        """Media time placed so far (ms on the call clock), across re-anchors and codec changes."""
        return self._elapsed_ms_before + self._elapsed * 1000 / self._clock_rate

    def ms_at(self, timestamp: int) -> int:
        """Where an RTP ``timestamp`` falls on the call clock (ms of media since the call began):
        the end of what is placed, plus the timestamp's distance from there. For events that
        carry no audio (an RFC 4733 key press is stamped with its start, §2.3.1)."""
        if self._next_ts is None:
            return round(self.elapsed_ms)
        return max(
            0, round(self.elapsed_ms + ts_delta(timestamp, self._next_ts) * 1000 / self._clock_rate)
        )

    def place(self, timestamp: int, n_samples: int) -> Placement | None:
        """Place a packet of ``n_samples`` decoded samples; ``None`` means drop it as late.

        A packet that starts exactly where the last one ended and is the same size (an in-order
        stream: nearly every packet) takes a short path — one comparison, two integer adds —
        since this runs for every 20 ms packet of every call; the rest is decided in full."""
        if timestamp == self._next_ts and n_samples == self._last_n:
            duration = self._last_duration
            self._next_ts = (timestamp + duration) % _TS_MOD
            self._elapsed += duration
            return CONTIGUOUS
        return self._place(timestamp, n_samples)

    def _place(self, timestamp: int, n_samples: int) -> Placement | None:
        duration = round(n_samples / self._ratio)
        self._last_n, self._last_duration = n_samples, duration
        if self._next_ts is None:
            return self._anchor(timestamp, duration)
        d = ts_delta(timestamp, self._next_ts)
        if d > self._max_gap or d < -self._max_late:
            self.stats.discontinuities += 1
            return self._anchor(timestamp, duration)
        if d < 0 and d + duration <= 0:  # (an empty packet at the play-out point is not late)
            self.stats.late += 1
            return None
        self._next_ts = (timestamp + duration) % _TS_MOD
        self._elapsed += d + duration
        if d == 0:
            return CONTIGUOUS
        if d > 0:
            silence = round(d * self._ratio)
            self.stats.gap_samples += silence
            self.stats.gap_ms += d * 1000 / self._clock_rate
            return Placement(silence, 0)
        return Placement(0, min(n_samples, round(-d * self._ratio)))

    def _anchor(self, timestamp: int, duration: int) -> Placement:
        self._next_ts = (timestamp + duration) % _TS_MOD
        self._elapsed += duration
        return CONTIGUOUS

    def reset(self) -> None:
        """Forget the origin: the next packet starts a new continuous stretch."""
        self._next_ts = None


class Framer:
    """Cuts a stream of int16 samples into exact ``FRAME_SAMPLES`` frames."""

    frame_samples = FRAME_SAMPLES

    def __init__(self) -> None:
        self._buf = np.zeros(FRAME_SAMPLES, np.int16)
        self._fill = 0
        self.frames_out = 0

    def push(self, pcm: Pcm, owned: bool = False) -> list[Pcm]:
        """Add samples; return every frame completed by them (each an array no one else
        writes to). ``owned``: ``pcm`` is a new array nothing else refers to (a resampler's
        output), so whole frames at its start may be handed out as views of it instead of
        copies — a steady 8 → 16 kHz stream resamples exactly one frame per batch, and that
        array then goes out as it is."""
        step = self.frame_samples
        if owned and self._fill == 0 and pcm.size >= step:
            if pcm.size == step:
                self.frames_out += 1
                return [pcm]
            whole = pcm.size - pcm.size % step
            out = [pcm[i : i + step] for i in range(0, whole, step)]
            self.frames_out += len(out)
            return out + self.push(pcm[whole:])
        frames: list[Pcm] = []
        pos = 0
        while pos < pcm.size:
            take = min(self.frame_samples - self._fill, pcm.size - pos)
            self._buf[self._fill : self._fill + take] = pcm[pos : pos + take]
            self._fill += take
            pos += take
            if self._fill == self.frame_samples:
                frames.append(self._buf.copy())
                self._fill = 0
        self.frames_out += len(frames)
        return frames

    def flush(self) -> Pcm | None:
        """Pad the partial frame with silence and return it, or ``None`` if there is none."""
        if self._fill == 0:
            return None
        self._buf[self._fill :] = 0
        self._fill = 0
        self.frames_out += 1
        return self._buf.copy()

    @property
    def missing(self) -> int:
        """Samples still needed to complete the current frame (1..``FRAME_SAMPLES``)."""
        return self.frame_samples - self._fill

    @property
    def position_ms(self) -> int:
        """Audio time emitted so far, on the call's clock."""
        return self.frames_out * FRAME_MS
