"""FFmpeg's libswresample called directly: the library PyAV ships, without PyAV's filter graph.

PyAV implements ``AudioResampler`` (in 18.x, as installed here) as an ``abuffer → aresample →
abuffersink`` filter graph
and builds an ``AudioFrame`` for every call; for the 80 ms chunks a call resamples that wrapper
costs about 15 µs, where ``swr_convert`` itself needs a few (``benchmarks/hot_path.py``). This
module binds the five functions it needs (``swr_alloc``, ``swr_init``, ``swr_convert``,
``swr_free``, ``av_opt_set*`` — FFmpeg's stable public API, ``libswresample/swresample.h``) with
ctypes, from the very libraries PyAV loaded, so the output is bit-exact with
``av.AudioResampler`` (same library, same default options: the aresample filter's defaults are
libswresample's). Where PyAV was built against system FFmpeg, the system's libraries are used.
"""

from __future__ import annotations

import ctypes
import functools
import weakref

import numpy as np

from voxphone.audio.codecs import Pcm
from voxphone.audio.native import find_library
from voxphone.errors import DecodeError

_S16 = 1  # AVSampleFormat AV_SAMPLE_FMT_S16 (libavutil/samplefmt.h)
_VP = ctypes.c_void_p


@functools.cache
def _libs() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    swr, avu = ctypes.CDLL(find_library("swresample")), ctypes.CDLL(find_library("avutil"))
    swr.swr_alloc.restype = _VP
    swr.swr_alloc.argtypes = []
    swr.swr_init.argtypes = [_VP]
    swr.swr_free.argtypes = [_VP]  # SwrContext **
    # swr_convert(SwrContext *, uint8_t **out, int out_count, const uint8_t **in, int in_count)
    # is called once per 80 ms with ctypes objects for the pointers (the context handle and
    # the plane arrays) and small ints for the counts, which is what ctypes passes without
    # ``argtypes`` (none are set) — and a third cheaper than converting each through them.
    swr.swr_convert.restype = ctypes.c_int
    swr.swr_get_out_samples.argtypes = [_VP, ctypes.c_int]
    avu.av_opt_set_int.argtypes = [_VP, ctypes.c_char_p, ctypes.c_int64, ctypes.c_int]
    avu.av_opt_set.argtypes = [_VP, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int]
    avu.av_opt_set_sample_fmt.argtypes = [_VP, ctypes.c_char_p, ctypes.c_int, ctypes.c_int]
    return swr, avu


def _free(swr: ctypes.CDLL, handle: ctypes.c_void_p) -> None:
    swr.swr_free(ctypes.byref(handle))


class SwrContext:
    """One libswresample context converting int16 mono ``in_rate`` → ``out_rate``, with
    filter history across calls. ``convert`` is ``swr_convert``: it returns every output
    sample the filter can compute from what it has been given; ``convert(None)`` drains."""

    def __init__(self, in_rate: int, out_rate: int) -> None:
        swr, avu = _libs()
        self._swr = swr
        self._handle = _VP(swr.swr_alloc())
        if not self._handle.value:
            raise MemoryError("swr_alloc failed")
        self._finalizer = weakref.finalize(self, _free, swr, self._handle)
        ctx = self._handle
        ok = (
            avu.av_opt_set_int(ctx, b"in_sample_rate", in_rate, 0) >= 0
            and avu.av_opt_set_int(ctx, b"out_sample_rate", out_rate, 0) >= 0
            and avu.av_opt_set(ctx, b"in_chlayout", b"mono", 0) >= 0
            and avu.av_opt_set(ctx, b"out_chlayout", b"mono", 0) >= 0
            and avu.av_opt_set_sample_fmt(ctx, b"in_sample_fmt", _S16, 0) >= 0
            and avu.av_opt_set_sample_fmt(ctx, b"out_sample_fmt", _S16, 0) >= 0
            and swr.swr_init(ctx) >= 0
        )
        if not ok:
            raise DecodeError(f"libswresample refused {in_rate} → {out_rate} Hz s16 mono")
        # swr_convert takes arrays of plane pointers: one plane each way (mono). The planes are
        # buffers this context owns and reuses, since asking numpy for an array's address costs
        # more than copying 80 ms of samples in and out.
        self._in_planes = (_VP * 1)()
        self._out_planes = (_VP * 1)()
        self._in_buf = self._out_buf = np.zeros(0, np.int16)
        self._out_size = 0  # self._out_buf.size, as a plain int for swr_convert
        self._fits = 0  # input samples the planes are sized for: grown on first use, so a
        # call's planes are the size of its batches (a few KiB; hundreds of calls share a cache)
        self._input: Pcm = self._in_buf  # the last ``input(n)`` view, kept: batches repeat n

    def _reserve(self, n_in: int) -> None:
        """Make the planes hold ``n_in`` input samples and whatever they may produce (with room
        for the filter's history: it holds back at most its length, 32 samples at the lower
        rate by default, which the margin covers at any ratio voxphone uses)."""
        n_out = self._swr.swr_get_out_samples(self._handle, n_in) + 256
        self._fits = max(self._fits, n_in)
        if n_in > self._in_buf.size:
            self._in_buf = np.zeros(n_in, np.int16)
            self._in_planes[0] = self._in_buf.ctypes.data
            self._input = self._in_buf[:0]  # (a view of the old plane)
        if n_out > self._out_buf.size:
            self._out_buf = np.zeros(n_out, np.int16)
            self._out_planes[0] = self._out_buf.ctypes.data
            self._out_size = n_out

    def input(self, n: int) -> Pcm:
        """The input plane's first ``n`` samples, for the caller to write the next input into
        (a G.711 decoder's ``out``) and then ``convert_input(n)``: decoded audio goes straight
        to libswresample instead of through a copy (``benchmarks/hot_path.py``)."""
        view = self._input
        if view.size != n:
            if n > self._fits:
                self._reserve(n)
            view = self._input = self._in_buf[:n]
        return view

    def convert_input(self, n: int) -> Pcm:
        """Resample the ``n`` samples written to ``input(n)``; a new array."""
        planes = self._in_planes
        return self._converted(
            self._swr.swr_convert(self._handle, self._out_planes, self._out_size, planes, n)
        )

    def convert(self, pcm: Pcm | None) -> Pcm:
        """Resample ``pcm`` (any integer samples, taken as int16), or drain the filter's tail
        with ``None``; a new array."""
        if pcm is None:
            self._reserve(0)
            return self._converted(
                self._swr.swr_convert(self._handle, self._out_planes, self._out_size, None, 0)
            )
        if pcm.size == 0:
            return np.zeros(0, np.int16)
        self.input(pcm.size)[:] = pcm  # (a copy that also makes it contiguous int16)
        return self.convert_input(pcm.size)

    def _converted(self, n: int) -> Pcm:
        """The ``n`` samples ``swr_convert`` wrote, as a new array; raises ``DecodeError`` for
        its error codes (``n < 0``)."""
        if n < 0:
            raise DecodeError(f"swr_convert failed ({n})")
        return self._out_buf[:n].copy()

    def close(self) -> None:
        self._finalizer()
