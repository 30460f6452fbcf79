"""Reading audio files of any format PyAV (FFmpeg) understands."""

from __future__ import annotations

import io
import wave
from pathlib import Path
from typing import BinaryIO

import av
import numpy as np

from voxphone.audio.codecs import Pcm
from voxphone.errors import DecodeError


def check_file(path: Path) -> None:
    """``DecodeError`` for a missing or empty file, said plainly: FFmpeg calls an empty file
    ``[Errno 1094995529] Invalid data found when processing input``."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DecodeError(f"{path}: {exc.strerror or exc}") from None
    if size == 0:
        raise DecodeError(f"{path}: empty file")


def ffmpeg_says(exc: av.FFmpegError | OSError) -> str:
    """FFmpeg's (or the OS's) own words, without the errno and the path it repeats:
    ``Invalid data found when processing input`` rather than ``[Errno 1094995529] Invalid
    data found when processing input: 'x.txt'``."""
    return exc.strerror or str(exc)


def read_audio(path: Path, rate: int) -> Pcm:
    """The whole file as int16 mono PCM at ``rate`` (downmixed and resampled by FFmpeg);
    ``DecodeError`` if it is missing, empty, not audio, or holds no samples."""
    check_file(path)
    return _decode(str(path), rate, str(path))


class TooLong(DecodeError):
    """The audio decodes to more than the caller allows (a few kB of Opus can be hours)."""


def decode_audio(data: bytes, rate: int, max_s: float | None = None) -> Pcm:
    """An audio file held in memory (an upload, a download) as int16 mono PCM at ``rate``;
    ``DecodeError`` if it is empty, not audio FFmpeg knows, or holds no samples, ``TooLong``
    (decoding stops there) past ``max_s`` seconds. CPU-bound (about 1 ms per second of audio):
    run it off the event loop for large files."""
    if not data:
        raise DecodeError("the audio is empty")
    limit = None if max_s is None else int(max_s * rate)
    return _decode(io.BytesIO(data), rate, "the audio", limit)


def _decode(source: str | BinaryIO, rate: int, path: str, limit: int | None = None) -> Pcm:
    try:
        with av.open(source, mode="r") as container:
            if not container.streams.audio:
                raise DecodeError(f"{path}: no audio stream")
            resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
            parts: list[np.ndarray] = []
            samples = 0
            for frame in container.decode(audio=0):
                for out in resampler.resample(frame):
                    parts.append(out.to_ndarray().reshape(-1))
                    samples += parts[-1].size
                if limit is not None and samples > limit:
                    raise TooLong(f"{path} is longer than {limit / rate:g} s")
            parts += [out.to_ndarray().reshape(-1) for out in resampler.resample(None)]
    except (av.FFmpegError, OSError) as exc:
        raise DecodeError(f"{path}: cannot read audio: {ffmpeg_says(exc)}") from exc
    pcm: Pcm = np.concatenate(parts).astype(np.int16) if parts else np.zeros(0, np.int16)
    if not pcm.size:
        raise DecodeError(f"{path}: no audio samples in the file")
    return pcm


def write_wav(path: Path, pcm: Pcm, rate: int) -> float:
    """``pcm`` (mono int16) as a 16-bit mono WAV file at ``rate`` Hz; returns its seconds."""
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(pcm.astype("<i2").tobytes())
    return pcm.size / rate
