"""Streaming resampler: one libswresample context per call, so filter history spans chunk joins.

FFmpeg's libswresample (which PyAV, already a dependency, ships) was chosen by
measurement (``benchmarks/resample.py``): it releases every output sample its filter can compute,
holding back only half its filter — 2 ms of input at 8 → 16 kHz, 1 ms at 48 → 16 kHz — where
python-soxr's stream releases output in blocks and held back 63 ms on average (115 ms at worst)
at 8 → 16 kHz, at every quality but the cubic QQ (whose SNR is 34 dB in band). Its fidelity on
speech against an ideal band-limited resample is as good below 3.4 kHz (83 dB, soxr HQ 78 dB)
and a little lower from 48 kHz below 6.8 kHz (67 dB, soxr HQ 76 dB). It is called directly
(``voxphone.audio.swr``) rather than through PyAV's ``AudioResampler``, whose filter graph and
per-call frames cost several times the resampling itself (``benchmarks/resample.py``: 18 against
3 µs per 20 ms packet at 8 → 16 kHz); the output is bit-exact with it.
"""

from __future__ import annotations

import math

import numpy as np

from voxphone.audio.codecs import Pcm
from voxphone.audio.swr import SwrContext

MODEL_RATE = 16000
#: libswresample's default filter is 32 taps at the lower of the two rates; half of it is the
#: lookahead the filter needs, so that many samples (at the lower rate) stay held back.
_HALF_FILTER = 16


class Resampler:
    """Fixed-ratio int16 mono resampler with state.

    The filter needs ``hold`` output samples' worth of lookahead (≤ 2 ms). Instead of holding
    that much of every packet back — which makes an 80 ms frame wait for the *next* 20 ms
    packet — a stream starts with ``lead`` samples of silence (``hold`` rounded up): the audio
    comes out delayed by ≤ 2 ms, and ``process`` returns at least ``ratio`` output samples per
    input sample, so a frame is complete on the packet that completes its input. ``flush``
    returns the remainder at the end of a continuous stream (all but its last ≤ 2 ms, which the
    lead stood in for). Equal rates pass through.
    """

    def __init__(self, in_rate: int, out_rate: int = MODEL_RATE) -> None:
        self.in_rate = in_rate
        self.out_rate = out_rate
        self.ratio = out_rate / in_rate
        #: Output samples held back once the stream is under way (the filter's lookahead).
        self.hold = 0.0 if in_rate == out_rate else _HALF_FILTER * max(1.0, self.ratio)
        #: Silence (output samples) a stream starts with, standing in for the held-back audio.
        self.lead = math.ceil(self.hold)
        #: ``hold`` in units of 1 / ``in_rate`` output samples (an integer), so ``releasable``
        #: is exact integer arithmetic at every ratio.
        self._hold_scaled = 0 if in_rate == out_rate else _HALF_FILTER * max(in_rate, out_rate)
        #: Whether ``process`` returns a new array the caller may keep (libswresample's output
        #: always is; a passthrough returns the caller's own array).
        self.fresh = in_rate != out_rate
        #: The stream's libswresample context: made at its first input (``_open``), so a
        #: resampler that is reset or flushed at a call's end holds none until it is used again.
        self._swr: SwrContext | None = None
        self._in = self._out = 0
        self._input_for: tuple[tuple[int, int, bool] | None, int] = (None, 0)  # last answer

    def _open(self) -> SwrContext:
        self._swr = SwrContext(self.in_rate, self.out_rate)
        return self._swr

    def releasable(self, more_in: int) -> int:
        """About how many output samples ``process`` would return for ``more_in`` more input
        samples (within a sample or so; exact for passthrough and for 8 → 16 kHz). Lets a
        caller feed whole batches without waiting a packet longer than it must."""
        lead = self.lead if self._in == 0 else 0
        scaled = (self._in + more_in) * self.out_rate - self._hold_scaled
        return scaled // self.in_rate + lead - self._out

    def input_for(self, target: int) -> int:
        """The least number of input samples (at least 1) after which ``process`` would
        return ``target`` output samples (``releasable(n) >= target``).

        ``releasable`` depends on the input and output counts only through the stream's phase
        (input taken times ``out_rate`` less output given times ``in_rate``) and whether it has
        started, and in a steady stream those repeat batch after batch (at 8 → 16 kHz, every
        80 ms batch leaves the same phase), so the last answer is kept for the same question
        and the search runs only when something changed."""
        key = (target, self._in * self.out_rate - self._out * self.in_rate, self._in == 0)
        if key == self._input_for[0]:
            return self._input_for[1]
        n = max(1, math.ceil(target / self.ratio) - 1)
        while n > 1 and self.releasable(n - 1) >= target:
            n -= 1
        while self.releasable(n) < target:
            n += 1
        self._input_for = (key, n)
        return n

    def process(self, pcm: Pcm) -> Pcm:
        if not self.fresh or pcm.size == 0:  # (equal rates pass through)
            return pcm
        return self._counted((self._swr or self._open()).convert(pcm), pcm.size)

    def input(self, n: int) -> Pcm:
        """Room for the next ``n`` input samples: a caller that makes its input (a G.711
        decoder, with ``out``) writes it there, then calls ``process_input``, which is
        ``process`` without copying the input in. Once per 80 ms frame of a G.711 call."""
        if not self.fresh:
            return np.empty(n, np.int16)
        return (self._swr or self._open()).input(n)

    def process_input(self, written: Pcm) -> Pcm:
        """``process(written)``, for ``written``: what ``input`` gave, filled."""
        if not self.fresh or written.size == 0:
            return written
        return self._counted((self._swr or self._open()).convert_input(written.size), written.size)

    def _counted(self, out: Pcm, n_in: int) -> Pcm:
        """``out``, made from ``n_in`` more input samples, counted, and after the lead of
        silence if it is the stream's first."""
        self._out += out.size
        if self._in == 0:
            out = np.concatenate([np.zeros(self.lead, np.int16), out])
        self._in += n_in
        return out

    def flush(self) -> Pcm:
        """End of stream: drain the filter, less the last ``lead`` samples, so a stream's output
        is exactly ``ratio`` times its input (the timeline's clock stays exact). The resampler is
        ready for a new stream afterwards."""
        if self._swr is None:  # (nothing was fed since the start or the last reset)
            return np.zeros(0, np.int16)
        out = self._swr.convert(None)
        out = out[: max(0, out.size - self.lead)] if self._in else out[:0]
        self.reset()
        return out

    def reset(self) -> None:
        """Drop filter history, for a media discontinuity (new source, codec change). The
        context is freed now and a new one made at the next input."""
        if self._swr is not None:
            self._swr.close()
        self._swr = None
        self._in = self._out = 0
