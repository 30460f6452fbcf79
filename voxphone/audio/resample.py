"""Streaming resampler: one soxr stream per call, so filter history spans chunk joins."""

from __future__ import annotations

import numpy as np
import soxr

from voxphone.audio.codecs import Pcm

MODEL_RATE = 16000


class Resampler:
    """Fixed-ratio int16 mono resampler with state.

    ``process`` may return fewer samples than the ratio implies (soxr buffers a filter's worth);
    ``flush`` returns the remainder at the end of a continuous stream. Equal rates pass through.
    """

    def __init__(self, in_rate: int, out_rate: int = MODEL_RATE, quality: str = "HQ") -> None:
        self.in_rate = in_rate
        self.out_rate = out_rate
        self._quality = quality
        self._stream = self._new_stream()

    def _new_stream(self) -> soxr.ResampleStream | None:
        if self.in_rate == self.out_rate:
            return None
        return soxr.ResampleStream(
            self.in_rate, self.out_rate, 1, dtype="int16", quality=self._quality
        )

    def process(self, pcm: Pcm) -> Pcm:
        if self._stream is None or pcm.size == 0:
            return pcm
        out: Pcm = self._stream.resample_chunk(pcm)
        return out

    def flush(self) -> Pcm:
        """End of stream: drain the filter. The resampler is ready for a new stream afterwards."""
        if self._stream is None:
            return np.zeros(0, np.int16)
        out: Pcm = self._stream.resample_chunk(np.zeros(0, np.int16), last=True)
        self._stream = self._new_stream()
        return out

    def reset(self) -> None:
        """Drop filter history, for a media discontinuity (new source, codec change)."""
        self._stream = self._new_stream()
