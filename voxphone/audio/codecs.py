"""Payload decoders: codec bytes in, int16 mono PCM out, one PyAV decoder per call.

PyAV (FFmpeg) does the codec work; this module only chooses and configures a decoder and turns
its frames into numpy. A decoder is stateful (G.722 and Opus carry history) so each call owns one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import av
import numpy as np
import numpy.typing as npt

from voxphone.audio.opus import RATES as OPUS_RATES
from voxphone.audio.opus import OpusDecoder
from voxphone.errors import DecodeError

Pcm = npt.NDArray[np.int16]


@dataclass(frozen=True)
class Codec:
    """A payload format: its name, audio sample rate and RTP clock rate.

    ``clock_rate`` differs from ``sample_rate`` only for G.722 (RFC 3551 §4.5.2 keeps 8000).
    ``channels`` is what the decoder emits (Opus is signalled as 2 even for mono, RFC 7587);
    voxphone always downmixes to mono.
    """

    name: str
    sample_rate: int
    clock_rate: int
    ffmpeg_name: str
    channels: int = 1


PCMU = Codec("PCMU", 8000, 8000, "pcm_mulaw")
PCMA = Codec("PCMA", 8000, 8000, "pcm_alaw")
G722 = Codec("G722", 16000, 8000, "g722")
L16_8K = Codec("L16/8000", 8000, 8000, "pcm_s16be")
L16_16K = Codec("L16/16000", 16000, 16000, "pcm_s16be")
OPUS = Codec("opus", 48000, 48000, "opus", channels=2)

#: RFC 3551 static payload types we accept without signalling.
STATIC_PAYLOAD_TYPES: dict[int, Codec] = {0: PCMU, 8: PCMA, 9: G722}

#: Dynamic payload types assumed when nothing says otherwise: Asterisk's fixed map for
#: externalMedia (opus 107, slin16 118) and the WebRTC habit of 111 for Opus.
DEFAULT_DYNAMIC_PAYLOAD_TYPES: dict[int, str] = {107: "opus", 111: "opus", 118: "L16/16000"}

#: Signed linear in host (little-endian) byte order: Asterisk's AudioSocket and chan_websocket.
SLIN = {
    rate: Codec(f"SLIN/{rate}", rate, rate, "pcm_s16le")
    for rate in (8000, 12000, 16000, 24000, 32000, 44100, 48000, 96000, 192000)
}

CODECS: dict[str, Codec] = {
    c.name.lower(): c for c in (PCMU, PCMA, G722, L16_8K, L16_16K, OPUS, *SLIN.values())
}


def codec_by_name(name: str) -> Codec:
    """Look a codec up by its name (case-insensitive), e.g. ``pcmu`` or ``L16/16000``."""
    try:
        return CODECS[name.lower()]
    except KeyError:
        known = ", ".join(sorted(c.name for c in CODECS.values()))
        raise DecodeError(f"unknown codec {name!r}; known: {known}") from None


def _context(codec: Codec, mode: Literal["r", "w"], layout: str) -> av.AudioCodecContext:
    ctx = av.CodecContext.create(codec.ffmpeg_name, mode)
    assert isinstance(ctx, av.AudioCodecContext)
    ctx.sample_rate = codec.sample_rate
    ctx.layout = layout
    return ctx


#: Codecs whose every byte is one sample on its own (G.711), decoded by table lookup.
_BYTE_CODECS = ("pcm_mulaw", "pcm_alaw")
_tables: dict[str, Pcm] = {}


def byte_table(codec: Codec) -> Pcm:
    """The 256 samples FFmpeg decodes G.711's 256 byte values to, built once per codec: a
    numpy lookup then decodes a 20 ms packet in about 1 µs instead of PyAV's 6 µs (its
    per-packet frame and array set-up), with FFmpeg still the definition of the codec."""
    if codec.ffmpeg_name not in _tables:
        ctx = _context(codec, "r", "mono")
        frames = ctx.decode(av.Packet(bytes(range(256))))
        _tables[codec.ffmpeg_name] = _frames_to_mono_int16(frames)
    return _tables[codec.ffmpeg_name]


class Decoder:
    """Decodes one call's payloads of one codec into int16 mono PCM at ``sample_rate``.

    ``rate``: the rate to decode to, ``codec.sample_rate`` unless told; only Opus decodes to
    others (``voxphone.audio.opus.RATES``). Raises ``DecodeError`` for a rate it cannot.

    Opus goes to libopus itself (``voxphone.audio.opus``: int16 out at any of its rates), whose
    decoder is made at the first payload: a call without Opus never loads it, and a libopus
    that cannot be loaded is one payload's ``DecodeError``, counted on the call, not a failure
    to open it."""

    def __init__(self, codec: Codec, rate: int | None = None) -> None:
        self.codec = codec
        self.sample_rate = rate or codec.sample_rate
        self._is_opus = codec.ffmpeg_name == "opus"
        if self._is_opus and self.sample_rate not in OPUS_RATES:
            raise DecodeError(f"libopus decodes to {OPUS_RATES} Hz, not {self.sample_rate}")
        if self.sample_rate != codec.sample_rate and not self._is_opus:
            raise DecodeError(
                f"{codec.name} decodes to {codec.sample_rate} Hz only, not {self.sample_rate}"
            )
        self._table = byte_table(codec) if codec.ffmpeg_name in _BYTE_CODECS else None
        self._opus: OpusDecoder | None = None
        # Every decoder is asked for mono.
        self._ctx = None if self._is_opus else _context(codec, "r", "mono")

    @property
    def stateless(self) -> bool:
        """Whether decoding payloads joined equals joining their decodes (G.711: one byte, one
        sample, no history), so a caller may decode several packets' payloads in one call."""
        return self._table is not None

    def decode(self, payload: bytes, out: Pcm | None = None) -> Pcm:
        """Decode one payload; an empty payload gives an empty array. ``out``: where to write
        the samples (exactly as many as they will be), for a stateless decoder only."""
        if not payload:
            return np.zeros(0, np.int16)
        if self._table is not None:
            # ``take`` rather than ``table[indices]``: the same lookup, a quarter cheaper; into
            # ``out`` with ``clip`` (no index can be out of range), which spares ``take`` the
            # scratch copy it makes to keep ``out`` intact should an index be bad.
            pcm: Pcm = self._table.take(np.frombuffer(payload, np.uint8), out=out, mode="clip")
            return pcm
        assert out is None, "only a stateless decoder writes into a given array"
        if self._is_opus:
            if self._opus is None:
                self._opus = OpusDecoder(self.sample_rate)
            return self._opus.decode(payload)
        assert self._ctx is not None
        try:
            frames = self._ctx.decode(av.Packet(payload))
        except (av.FFmpegError, ValueError) as exc:
            raise DecodeError(
                f"{self.codec.name}: cannot decode {len(payload)}-byte payload: {exc}"
            ) from exc
        return _frames_to_mono_int16(frames)


def _frames_to_mono_int16(frames: list[av.AudioFrame]) -> Pcm:
    """Flatten the decoder's mono int16 frames (FFmpeg's G.711, G.722 and PCM decoders all
    emit s16) into one array."""
    parts = [_plane(frame) for frame in frames]
    if not parts:
        return np.zeros(0, np.int16)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _plane(frame: av.AudioFrame) -> Pcm:
    if frame.format.name not in ("s16", "s16p"):
        raise DecodeError(f"decoder produced {frame.format.name} samples, not s16")
    return frame.to_ndarray().reshape(-1).astype(np.int16, copy=False)


_encode_tables: dict[str, npt.NDArray[np.uint8]] = {}


def encode_table(codec: Codec) -> npt.NDArray[np.uint8]:
    """The byte FFmpeg encodes each of the 65536 int16 values to (G.711), indexed by the
    sample's bits as uint16, built once per codec: a 20 ms packet then encodes in about 1 µs
    instead of PyAV's 12 µs (talk back encodes one per call every 20 ms)."""
    if codec.ffmpeg_name not in _encode_tables:
        ctx = _context(codec, "w", "mono")
        ctx.format = "s16"
        every = np.arange(65536, dtype=np.uint16).view(np.int16)
        frame = av.AudioFrame.from_ndarray(every.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = codec.sample_rate
        data = b"".join(bytes(p) for p in [*ctx.encode(frame), *ctx.encode(None)])
        _encode_tables[codec.ffmpeg_name] = np.frombuffer(data, np.uint8).copy()
    return _encode_tables[codec.ffmpeg_name]


class Encoder:
    """Encodes int16 mono PCM at ``codec.sample_rate`` into payloads (talk back, test callers,
    ``call``); G.711 by table lookup (``encode_table``), the rest through PyAV."""

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self._table = encode_table(codec) if codec.ffmpeg_name in _BYTE_CODECS else None
        self._ctx = _context(codec, "w", "mono")
        self._ctx.format = "s16"

    def encode(self, pcm: Pcm) -> bytes:
        if self._table is not None:
            return self._table[np.ascontiguousarray(pcm, np.int16).view(np.uint16)].tobytes()
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = self.codec.sample_rate
        return b"".join(bytes(p) for p in self._ctx.encode(frame))
