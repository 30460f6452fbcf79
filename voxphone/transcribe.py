"""``voxphone transcribe``: a file through the same Call pipeline a live call uses."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from voxphone.audio.codecs import L16_16K, PCMU, Codec, Pcm
from voxphone.audio.files import read_audio
from voxphone.call import Call
from voxphone.clock import SystemClock
from voxphone.engines.base import Engine
from voxphone.events.model import Event
from voxphone.testing import rtp_packets

PTIME_MS = 20
#: Audio read ahead of the engine (2 s), so Ctrl-C stops soon after the words being heard.
QUEUED_FRAMES = 25


class _Printer:
    """Prints each closed segment (or every event as JSON) as it arrives."""

    def __init__(self, json_lines: bool) -> None:
        self.json_lines = json_lines
        self.ended: Event | None = None

    def publish(self, event: Event) -> None:
        if event.type == "call.ended":
            self.ended = event
        if self.json_lines:
            print(event.to_json().decode(), flush=True)
        elif event.type == "transcript.final":
            d = event.data
            _clear_progress()
            print(f"[{_mmss(d['start_ms'])} → {_mmss(d['end_ms'])}] {d['text']}", flush=True)


async def transcribe_file(
    new_engine: Callable[[], Engine],
    path: Path,
    *,
    telephony: bool,
    json_lines: bool,
    progress: bool,
) -> Event | None:
    """Transcribe ``path``; returns the call's ``call.ended`` (``None`` if the engine failed).
    ``new_engine`` builds the configured engine, not yet started, once the file is read.

    SIGINT (Ctrl-C) ends the call as a shutdown drains one: no more audio, the engine finishes
    the open segment, and the transcript so far is printed (``reason`` is ``shutdown``).
    """
    codec: Codec = PCMU if telephony else L16_16K
    pcm = read_audio(path, codec.sample_rate)
    engine = new_engine()
    await engine.start()
    printer = _Printer(json_lines)
    call = Call(
        "file", codec, printer, SystemClock(), transport="file", metadata={"file": str(path)},
        max_queued_frames=QUEUED_FRAMES,
    )  # fmt: skip
    bar = (
        asyncio.create_task(_progress(call, pcm.size * 16000 // codec.sample_rate))
        if progress
        else None
    )
    loop = asyncio.get_running_loop()
    try:
        call.start(engine)
        loop.add_signal_handler(signal.SIGINT, call.end, "shutdown")
        await _feed(call, pcm, telephony)
        call.end("end_of_file")
        await call.wait()
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        if bar is not None:
            bar.cancel()
            _clear_progress()
        await engine.stop()
    ended = printer.ended
    if ended is None or ended.data["reason"] == "engine_error":
        return None
    if not json_lines and not ended.data["transcript"]:
        print("(no speech recognised)", file=sys.stderr)
    return ended


async def _feed(call: Call, pcm: Pcm, telephony: bool) -> None:
    """The file as packets (``telephony``) or 1 s pieces of PCM, until it or the call ends."""
    if telephony:
        for pkt in rtp_packets(pcm, call.codec, ptime_ms=PTIME_MS, seed=0):
            if call.end_reason is not None:
                return
            await call.feed_packet(pkt.timestamp, pkt.payload)
        return
    for pos in range(0, pcm.size, call.codec.sample_rate):
        if call.end_reason is not None:
            return
        await call.feed_pcm(pcm[pos : pos + call.codec.sample_rate])


async def _progress(call: Call, total_samples: int) -> None:
    with contextlib.suppress(asyncio.CancelledError):
        while True:
            done = min(1.0, call.frames_sent * 1280 / max(1, total_samples))
            filled = int(done * 30)
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {done:4.0%}")
            sys.stderr.flush()
            await asyncio.sleep(0.1)


def _clear_progress() -> None:
    if sys.stderr.isatty():
        sys.stderr.write("\r\033[K")


def _mmss(ms: int) -> str:
    return f"{ms // 60000:02d}:{ms % 60000 / 1000:04.1f}"
