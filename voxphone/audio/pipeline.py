"""One call's audio path: payload → PCM → call clock → 16 kHz → 80 ms frames."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from voxphone.audio.codecs import Codec, Decoder, Pcm
from voxphone.audio.framer import Framer, Timeline
from voxphone.audio.resample import MODEL_RATE, Resampler

#: Output samples of slack when deciding a batch would complete a frame: ``releasable`` can be a
#: sample off for rates other than 8 kHz, and feeding one packet early costs only a call.
_EARLY = 2


class AudioPipeline:
    """Synchronous per-call DSP chain; every method returns the 80 ms frames it completed.

    Decoded PCM is resampled once per 80 ms frame rather than once per 20 ms packet: input waits
    in ``_pending`` until the resampler could release the rest of the current frame, so a frame
    leaves on the very packet it would have left on unbatched (no added latency) and the
    resampler's fixed cost per call is paid a quarter as often.
    """

    def __init__(self, codec: Codec, max_gap_s: float = 5.0) -> None:
        self.codec = codec
        self.decoder = Decoder(codec)
        self.timeline = Timeline(codec.clock_rate, codec.sample_rate, max_gap_s=max_gap_s)
        self.resampler = Resampler(codec.sample_rate, MODEL_RATE)
        self.framer = Framer()
        self._pending: list[Pcm] = []
        self._pending_samples = 0
        #: Sees every piece of decoded, placed PCM (at ``codec.sample_rate``) as it arrives,
        #: before the 80 ms framing: for a listener that must not wait a frame (barge-in).
        self.tap: Callable[[Pcm, int], None] | None = None

    def switch(self, codec: Codec) -> list[Pcm]:
        """Decode what follows as ``codec`` (an RTP payload type change mid-stream, RFC 3550
        §5.1): the resampler's tail is played out, a decoder and resampler for the new format
        take over, and the timeline goes on (``Timeline.retime``). Returns the frames completed."""
        if codec == self.codec:
            return []
        frames = self._drain()
        frames += self.framer.push(self.resampler.flush())
        self.codec = codec
        self.decoder = Decoder(codec)
        self.timeline.retime(codec.clock_rate, codec.sample_rate)
        self.resampler = Resampler(codec.sample_rate, MODEL_RATE)
        return frames

    def push_packet(self, timestamp: int, payload: bytes) -> list[Pcm]:
        """A timestamped payload; raises ``DecodeError`` for one the codec rejects."""
        return self.push_timed_pcm(timestamp, self.decoder.decode(payload))

    def push_timed_pcm(self, timestamp: int, pcm: Pcm) -> list[Pcm]:
        """Decoded PCM stamped with its media timestamp (WebRTC: aiortc has decoded it)."""
        placement = self.timeline.place(timestamp, pcm.size)
        if placement is None:
            return []
        if placement.silence:
            pcm = np.concatenate([np.zeros(placement.silence, np.int16), pcm])
        elif placement.skip:
            pcm = pcm[placement.skip :]
        return self.push_pcm(pcm)

    def push_contiguous(self, payload: bytes) -> list[Pcm]:
        """A payload from a transport without timestamps (a paced TCP or websocket stream)."""
        return self.push_pcm(self.decoder.decode(payload))

    def push_pcm(self, pcm: Pcm) -> list[Pcm]:
        """Already decoded, gap-free PCM at the codec's sample rate."""
        if pcm.size == 0:
            return []
        if self.tap is not None:
            self.tap(pcm, self.codec.sample_rate)
        self._pending.append(pcm)
        self._pending_samples += pcm.size
        if self.resampler.releasable(self._pending_samples) < self.framer.missing - _EARLY:
            return []
        return self._drain()

    def _drain(self) -> list[Pcm]:
        """Resample and frame everything pending."""
        if not self._pending:
            return []
        pcm = self._pending[0] if len(self._pending) == 1 else np.concatenate(self._pending)
        self._pending, self._pending_samples = [], 0
        return self.framer.push(self.resampler.process(pcm))

    def flush(self) -> list[Pcm]:
        """End of the call's audio: drain the resampler and pad the last frame."""
        frames = self._drain()
        frames += self.framer.push(self.resampler.flush())
        last = self.framer.flush()
        return frames + ([last] if last is not None else [])
