"""One call's audio path: payload → PCM → call clock → 16 kHz → 80 ms frames."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from voxphone.audio.codecs import Codec, Decoder, Pcm
from voxphone.audio.framer import CONTIGUOUS, Framer, Timeline
from voxphone.audio.resample import MODEL_RATE, Resampler

#: Output samples of slack when deciding a batch would complete a frame: ``releasable`` can be a
#: sample off for rates other than 8 kHz, and feeding one packet early costs only a call.
_EARLY = 2


def decode_rate(codec: Codec) -> int:
    """The rate voxphone decodes ``codec``'s payloads to (Hz): Opus straight to the model's
    16 kHz — libopus band-limits as it decodes (RFC 6716 §4), so there is nothing left to
    resample and a third of the samples to make — every other codec at its own rate."""
    return MODEL_RATE if codec.ffmpeg_name == "opus" else codec.sample_rate


class AudioPipeline:
    """Synchronous per-call DSP chain; every method returns the 80 ms frames it completed.

    The model eats 80 ms frames, and a frame cannot leave before the packet carrying its last
    audio, so the work is done once per frame, not once per 20 ms packet: a packet is placed on
    the timeline (gaps, overlaps and stragglers are decided per packet) and kept in
    ``_pending``; once ``_need`` input samples wait — as many as the resampler needs to release
    the rest of the current frame — they are decoded (G.711, whose decoder is stateless, in one
    table lookup for the whole batch), resampled and framed in one go. A frame therefore leaves
    on the very packet it would have left on unbatched (no added latency) while decode,
    resampler and numpy calls are paid a quarter as often. Stateful decoders (G.722, Opus) still
    decode each payload as it comes.
    """

    def __init__(self, codec: Codec, max_gap_s: float = 5.0) -> None:
        self.codec = codec
        #: The rate of the PCM in this pipeline (Hz): what payloads are decoded to
        #: (``decode_rate``), and what ``push_pcm`` takes.
        self.rate = decode_rate(codec)
        self.decoder = Decoder(codec, self.rate)
        self.timeline = Timeline(codec.clock_rate, self.rate, max_gap_s=max_gap_s)
        self.resampler = Resampler(self.rate, MODEL_RATE)
        self.framer = Framer()
        #: Placed audio not yet resampled: payloads still to decode (a stateless decoder's) or
        #: PCM (decoded, or silence for a gap), in order; ``_pending_samples`` counts both.
        self._pending: list[bytes | Pcm] = []
        self._pending_samples = 0
        self._tap: Callable[[Pcm, int], None] | None = None
        self._batch = False
        self._update_batch()
        self._all_payloads = True  # nothing but payloads pending: one decode call for all
        self._need = 0
        self._update_need()

    @property
    def tap(self) -> Callable[[Pcm, int], None] | None:
        """Sees every piece of decoded, placed PCM (at ``rate``) as it arrives,
        before the 80 ms framing: for a listener that must not wait a frame (barge-in).
        While set, G.711 is decoded per packet instead of per frame."""
        return self._tap

    @tap.setter
    def tap(self, tap: Callable[[Pcm, int], None] | None) -> None:
        self._tap = tap
        self._update_batch()

    def _update_batch(self) -> None:
        """Whether payloads are kept undecoded until a frame's worth waits: a stateless
        decoder and no tap (``push_packet`` checks this one flag per packet)."""
        self._batch = self.decoder.stateless and self._tap is None

    def switch(self, codec: Codec) -> list[Pcm]:
        """Decode what follows as ``codec`` (an RTP payload type change mid-stream, RFC 3550
        §5.1): the resampler's tail is played out, a decoder and resampler for the new format
        take over, and the timeline goes on (``Timeline.retime``). Returns the frames completed."""
        if codec is self.codec or codec == self.codec:
            return []
        rate = decode_rate(codec)
        decoder, resampler = Decoder(codec, rate), Resampler(rate, MODEL_RATE)
        frames = self._drain()
        frames += self.framer.push(self.resampler.flush())
        self.codec, self.rate, self.decoder, self.resampler = codec, rate, decoder, resampler
        self._update_batch()
        self.timeline.retime(codec.clock_rate, rate)
        self._update_need()
        return frames

    def push_packet(self, timestamp: int, payload: bytes) -> list[Pcm]:
        """A timestamped payload; raises ``DecodeError`` for one the codec rejects."""
        if not self._batch:
            return self.push_timed_pcm(timestamp, self.decoder.decode(payload))
        n = len(payload)  # one byte, one sample
        placement = self.timeline.place(timestamp, n)
        if placement is not CONTIGUOUS:
            if placement is None:
                return []
            if placement.silence:
                self._add(np.zeros(placement.silence, np.int16))
            elif placement.skip:
                payload = payload[placement.skip :]
                n = len(payload)
        if n:
            self._pending.append(payload)
            self._pending_samples += n
            if self._pending_samples >= self._need:
                return self._drain()
        return []

    def push_timed_pcm(self, timestamp: int, pcm: Pcm) -> list[Pcm]:
        """Decoded PCM at ``rate`` stamped with its media timestamp."""
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
        """Already decoded, gap-free PCM at ``rate``."""
        if pcm.size == 0:
            return []
        if self._tap is not None:
            self._tap(pcm, self.rate)
        self._add(pcm)
        if self._pending_samples < self._need:
            return []
        return self._drain()

    def _add(self, pcm: Pcm) -> None:
        self._pending.append(pcm)
        self._pending_samples += pcm.size
        self._all_payloads = False

    def _drain(self) -> list[Pcm]:
        """Decode, resample and frame everything pending."""
        pending = self._pending
        if not pending:
            return []
        resampler, n, all_payloads = self.resampler, self._pending_samples, self._all_payloads
        # Taken before decoding: a batch that fails is lost once, not retried at every packet.
        self._pending, self._pending_samples, self._all_payloads = [], 0, True
        if all_payloads:  # G.711's, in one lookup, written straight into the resampler
            joined = pending[0] if len(pending) == 1 else b"".join(pending)  # type: ignore[arg-type]
            out = resampler.process_input(self.decoder.decode(joined, resampler.input(n)))  # type: ignore[arg-type]
        else:
            parts = [self.decoder.decode(p) if isinstance(p, bytes) else p for p in pending]
            out = resampler.process(parts[0] if len(parts) == 1 else np.concatenate(parts))
        frames = self.framer.push(out, owned=resampler.fresh)
        self._update_need()
        return frames

    def _update_need(self) -> None:
        """The input samples after which the resampler could release the rest of the current
        frame (less ``_EARLY``)."""
        self._need = self.resampler.input_for(self.framer.missing - _EARLY)

    def flush(self) -> list[Pcm]:
        """End of the call's audio: drain the resampler and pad the last frame."""
        frames = self._drain()
        frames += self.framer.push(self.resampler.flush())
        last = self.framer.flush()
        self._update_need()
        return frames + ([last] if last is not None else [])
