"""Opus payloads decoded by libopus itself, straight to int16 PCM.

Through PyAV, FFmpeg decodes Opus only at 48 kHz (its native decoder in 32-bit float, its
libopus wrapper in int16), so every 20 ms packet cost a PyAV packet and frame, four numpy
passes to reach int16 — under load on a 2-core box that conversion alone took ≈ 15 µs of a
packet's ≈ 90 (``benchmarks/load.py --codec opus``, py-spy) — and a 48 → 16 kHz resample.
libopus, the reference decoder (RFC 6716 §4), writes int16 at the rate asked for (the model's
16 kHz: it band-limits as it decodes) into a buffer the decoder owns. The library is the one
PyAV's wheel ships (``voxphone.audio.native``), bound with ctypes: ``opus_decoder_create``,
``opus_decode``, ``opus_decoder_destroy``, ``opus_strerror`` (``include/opus.h``, its stable
public API).
"""

from __future__ import annotations

import ctypes
import functools
import weakref

import numpy as np
import numpy.typing as npt

from voxphone.audio.native import find_library
from voxphone.errors import DecodeError

#: The longest Opus packet: 120 ms (RFC 6716 §3.2.5), in samples at 48 kHz.
MAX_PACKET_SAMPLES_48K = 5760
#: The rates libopus decodes to (``opus_decoder_create``).
RATES = (8000, 12000, 16000, 24000, 48000)


@functools.cache
def _lib() -> ctypes.CDLL:
    lib = ctypes.CDLL(find_library("opus"))
    lib.opus_decoder_create.restype = ctypes.c_void_p
    lib.opus_decoder_create.argtypes = [ctypes.c_int32, ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
    lib.opus_decoder_destroy.argtypes = [ctypes.c_void_p]
    lib.opus_strerror.restype = ctypes.c_char_p
    lib.opus_strerror.argtypes = [ctypes.c_int]
    # opus_decode(OpusDecoder *, const unsigned char *data, opus_int32 len, opus_int16 *pcm,
    # int frame_size, int decode_fec) runs for every packet: called with a ctypes handle and
    # pointer, bytes and small ints, which ctypes passes as they are without ``argtypes`` —
    # cheaper than converting each argument through them (as ``swr_convert``).
    lib.opus_decode.restype = ctypes.c_int
    return lib


def available() -> bool:
    """Whether libopus can be loaded here (PyAV's wheels ship it; a PyAV built against an
    FFmpeg without it does not): where it cannot, every Opus payload is a ``DecodeError``, so
    a side that may choose its codec (a WebRTC answer) chooses another."""
    try:
        _lib()
    except (DecodeError, OSError):
        return False
    return True


def _strerror(code: int) -> str:
    message: bytes | None = _lib().opus_strerror(code)
    return message.decode() if message else f"error {code}"


class OpusDecoder:
    """One stream's libopus decoder: payloads in, mono int16 PCM at ``rate`` Hz out.

    Mono is asked for whatever the stream signals: a stereo packet is downmixed inside the
    decoder (RFC 7587 §3.1 signals Opus as 2 channels always; RFC 6716 §4 lets a decoder emit
    fewer channels than were coded). ``rate`` is one of ``RATES`` (libopus refuses others:
    ``DecodeError``); the decoder band-limits to it, so a lower rate is not a resample
    afterwards but less work."""

    def __init__(self, rate: int = 48000) -> None:
        lib = _lib()
        error = ctypes.c_int()
        handle = lib.opus_decoder_create(rate, 1, ctypes.byref(error))
        if not handle:
            raise DecodeError(f"libopus refused a {rate} Hz decoder: {_strerror(error.value)}")
        self.rate = rate
        self._handle = ctypes.c_void_p(handle)
        weakref.finalize(self, lib.opus_decoder_destroy, self._handle)  # freed with the object
        self._capacity = MAX_PACKET_SAMPLES_48K * rate // 48000
        self._out = np.zeros(self._capacity, np.int16)
        self._out_ptr = ctypes.c_void_p(self._out.ctypes.data)
        self._decode = lib.opus_decode

    def decode(self, payload: bytes) -> npt.NDArray[np.int16]:
        """One packet's samples (a new array; 20 ms at 48 kHz is 960); nothing for an empty
        payload (which libopus would take for a lost packet and conceal). Raises
        ``DecodeError`` with libopus's reason for a payload it rejects. Not thread-safe: the
        output buffer is the decoder's (each call's decoder runs on the event loop)."""
        if not payload:
            return np.zeros(0, np.int16)
        n: int = self._decode(self._handle, payload, len(payload), self._out_ptr, self._capacity, 0)
        if n < 0:
            raise DecodeError(f"opus: cannot decode {len(payload)}-byte payload: {_strerror(n)}")
        return self._out[:n].copy()
