"""pocketsphinx: the CPU engine that needs no GPU and no download (its model ships in the wheel).

pocketsphinx holds the GIL while it decodes (measured: a decoding thread stalls the event loop by
30 ms at the median, 800 ms at worst), so recognition runs in worker *processes*. Each stream is
pinned to one worker, which owns its stateful decoder; the parent talks to a worker through a pipe
from one I/O thread, so the event loop never blocks and never decodes.

Workers ignore SIGINT: Ctrl-C in a terminal signals the whole process group, and the parent must
be the one to decide (drain: the workers finish the open segments, then the parent stops them).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import multiprocessing.connection
import signal
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog

from voxphone.audio.codecs import Pcm
from voxphone.engines.base import ChunkQueue, TranscriptChunk
from voxphone.errors import EngineError

log = structlog.get_logger(__name__)

SAMPLE_RATE = 16000
FRAME_MS = 80


@dataclass(frozen=True)
class SphinxSettings:
    """Recognizer knobs, sent to the worker processes."""

    #: Seconds of non-speech that close a segment (pocketsphinx Endpointer window).
    pause_s: float = 0.5
    #: Standard deviation of white noise added before decoding, in int16 units (-60 dBFS at 30).
    #: The shipped 16 kHz model hears 8 kHz telephone audio (nothing above 4 kHz) badly: its upper
    #: mel filters see log(0). A faint noise floor fixes that (flite speech via G.711 goes from
    #: nonsense to near-verbatim); on wideband audio it is inaudible to the model.
    noise_floor: float = 30.0
    #: Speech without a pause is cut into segments of about this many seconds, at the first word
    #: boundary past it (the decoder's best path ends after a finished word), or at twice it.
    max_segment_s: float = 30.0


#: What the best path of a partial hypothesis ends in between words.
_BETWEEN_WORDS = ("</s>", "<sil>", "[NOISE]")


class Recognizer:
    """Synchronous streaming recognition of one stream: 80 ms frames in, chunks out.

    ``decoder`` (a ``pocketsphinx.Decoder`` with no utterance open) may be passed to skip the
    model load (about 0.8 s); by default each recognizer loads its own.
    """

    def __init__(self, settings: SphinxSettings, decoder: Any = None) -> None:
        from pocketsphinx import Decoder, Endpointer

        self._ep = Endpointer(window=settings.pause_s, sample_rate=SAMPLE_RATE)
        self._decoder = decoder or Decoder(samprate=SAMPLE_RATE, loglevel="FATAL")
        self._noise = settings.noise_floor
        self._max_ms = round(settings.max_segment_s * 1000)
        self._rng = np.random.default_rng(0)
        self._pending = np.zeros(0, np.int16)
        self._step = self._ep.frame_bytes // 2
        self._sent = 0  # words of the open segment sent as deltas
        self._start_ms = 0
        self._region = -1.0  # the endpointer's speech region the decoder is in (its start, s)
        self._at_ms = 0  # the end of the speech fed to the decoder (ms on the stream's clock)
        self._in_utt = False

    def process(self, frame: Pcm) -> list[TranscriptChunk]:
        pcm = np.concatenate([self._pending, frame])
        chunks: list[TranscriptChunk] = []
        n = pcm.size - pcm.size % self._step
        for pos in range(0, n, self._step):
            chunks += self._feed(self._ep.process(pcm[pos : pos + self._step].tobytes()))
        self._pending = pcm[n:]
        if self._ep.in_speech:
            chunks += self._partial()
        return chunks

    def finish(self) -> list[TranscriptChunk]:
        """End of audio: close any open segment."""
        tail = np.zeros(self._step, np.int16)
        tail[: self._pending.size] = self._pending[: self._step]
        chunks = self._feed(self._ep.end_stream(tail.tobytes()), force_end=True)
        self._pending = np.zeros(0, np.int16)
        if self._in_utt:
            chunks.append(self._end_segment())
        return chunks

    def _feed(self, speech: bytes | None, force_end: bool = False) -> list[TranscriptChunk]:
        # ``end_stream`` returns b"" (not None) when the endpointer is in speech but its window
        # starts with non-speech; pocketsphinx raises IndexError on an empty buffer.
        if not speech:
            return []
        if not self._in_utt:
            self._start_utt()
        self._decoder.process_raw(self._noisy(speech), False, False)
        self._at_ms += len(speech) * 1000 // (2 * SAMPLE_RATE)
        if force_end:
            return []
        if not self._ep.in_speech:
            return [self._end_segment()]
        return [self._end_segment(self._at_ms)] if self._too_long() else []

    def _start_utt(self) -> None:
        if self._ep.speech_start != self._region:  # a new speech region, not a cut inside one
            self._region = self._ep.speech_start
            self._at_ms = int(self._region * 1000)
        self._decoder.start_utt()
        self._in_utt = True
        self._start_ms = self._at_ms
        self._sent = 0

    def _too_long(self) -> bool:
        """Past ``max_segment_s`` and between two words (or at twice the limit, regardless)."""
        length = self._at_ms - self._start_ms
        if length < self._max_ms:
            return False
        best = list(self._decoder.seg() or ())
        return length >= 2 * self._max_ms or not best or best[-1].word in _BETWEEN_WORDS

    def _noisy(self, speech: bytes) -> bytes:
        pcm = np.frombuffer(speech, np.int16).astype(np.float32)
        pcm += self._rng.normal(0.0, self._noise, pcm.size).astype(np.float32)
        return np.clip(pcm, -32768, 32767).astype(np.int16).tobytes()

    def _partial(self) -> list[TranscriptChunk]:
        hyp = self._decoder.hyp() if self._in_utt else None
        delta, self._sent = stable_delta(self._sent, hyp.hypstr if hyp is not None else "")
        return [TranscriptChunk(delta=delta)] if delta else []

    def _end_segment(self, end_ms: int | None = None) -> TranscriptChunk:
        """Close the utterance: at ``end_ms`` (a cut) or where the endpointer says speech ended."""
        self._decoder.end_utt()
        self._in_utt = False
        hyp = self._decoder.hyp()
        if end_ms is None:
            end_ms = int(self._ep.speech_end * 1000) if self._ep.speech_end else self._start_ms
        return TranscriptChunk(
            segment_end=True,
            text=hyp.hypstr if hyp is not None else "",
            start_ms=self._start_ms,
            end_ms=max(end_ms, self._start_ms),
        )


def stable_delta(sent: int, hypothesis: str) -> tuple[str, int]:
    """The next delta of a segment whose ``sent`` first words have gone out: ``(text, sent)``.

    The hypothesis' last word is still moving; the others are stable. Deltas are append-only:
    the stable words past the ``sent`` first are new even when the recogniser has meanwhile
    revised some it sent (the final carries the revision), so live text keeps flowing instead of
    stopping until the final. ``text`` starts with a space unless it starts the segment.
    """
    words = hypothesis.split()[:-1]
    if len(words) <= sent:
        return "", sent
    return (" " if sent else "") + " ".join(words[sent:]), len(words)


def _worker_main(conn: multiprocessing.connection.Connection, settings: SphinxSettings) -> None:
    """A worker process: serve (op, stream id, argument) requests until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a SIGINT pending since birth is discarded
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    recognizers: dict[str, Recognizer] = {}
    while True:
        try:
            op, sid, arg = conn.recv()
        except (EOFError, OSError):
            return
        try:
            conn.send(("ok", _serve(recognizers, settings, op, sid, arg)))
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises EngineError
            recognizers.pop(sid, None)
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


def _serve(
    recognizers: dict[str, Recognizer], settings: SphinxSettings, op: str, sid: str, arg: Any
) -> list[TranscriptChunk] | None:
    if op == "open":
        recognizers[sid] = Recognizer(settings)
        return None
    if op == "frames":
        rec = recognizers[sid]
        return [c for frame in arg for c in rec.process(np.frombuffer(frame, np.int16))]
    if op == "finish":
        return recognizers.pop(sid).finish()
    if op == "drop":
        recognizers.pop(sid, None)
        return None
    raise ValueError(f"unknown op {op!r}")


class _Worker:
    """Parent-side handle of one worker process; requests are serialised by a one-thread pool."""

    def __init__(self, settings: SphinxSettings) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.process = ctx.Process(
            target=_worker_main, args=(child, settings), name="voxphone-sphinx", daemon=True
        )
        # Born with SIGINT blocked (the mask survives fork and exec) until it ignores SIGINT.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            self.process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        child.close()
        self._io = ThreadPoolExecutor(1, thread_name_prefix="sphinx-io")
        self.streams = 0

    async def request(self, op: str, sid: str, arg: Any = None) -> Any:
        loop = asyncio.get_running_loop()
        status, result = await loop.run_in_executor(self._io, self._roundtrip, (op, sid, arg))
        if status != "ok":
            raise EngineError(f"sphinx worker: {op} failed: {result}")
        return result

    def _roundtrip(self, msg: tuple[str, str, Any]) -> tuple[str, Any]:
        try:
            self._conn.send(msg)
            result: tuple[str, Any] = self._conn.recv()
        except (EOFError, OSError) as exc:
            return "error", f"worker process exited ({exc or 'pipe closed'})"
        return result

    def stop(self) -> None:
        self._conn.close()
        self.process.join(timeout=2)
        if self.process.is_alive():
            self.process.kill()
        self._io.shutdown(wait=False)


class SphinxEngine:
    """pocketsphinx in ``workers`` processes; streams are spread over them by load."""

    name = "sphinx"

    def __init__(self, workers: int = 1, settings: SphinxSettings | None = None) -> None:
        self._settings = settings or SphinxSettings()
        self._n_workers = max(1, workers)
        self._workers: list[_Worker] = []

    async def start(self) -> None:
        self._workers = [_Worker(self._settings) for _ in range(self._n_workers)]
        # A throwaway stream proves the model loads before we report ready.
        await asyncio.gather(*(self._probe(w) for w in self._workers))
        log.info("engine_started", engine=self.name, workers=self._n_workers)

    async def _probe(self, worker: _Worker) -> None:
        sid = f"probe-{uuid.uuid4().hex}"
        await worker.request("open", sid)
        await worker.request("drop", sid)

    async def open_stream(self, call_id: str) -> SphinxStream:
        if not self._workers:
            raise EngineError("sphinx engine is not started")
        self._replace_dead_workers()
        worker = min(self._workers, key=lambda w: w.streams)
        stream = SphinxStream(worker, f"{call_id}-{uuid.uuid4().hex[:8]}")
        await stream.open()
        return stream

    def _replace_dead_workers(self) -> None:
        """A dead worker (OOM kill, crash) failed its own streams; later calls get a new one."""
        for i, worker in enumerate(self._workers):
            if not worker.process.is_alive():
                log.warning("sphinx_worker_replaced", exitcode=worker.process.exitcode)
                worker.stop()
                self._workers[i] = _Worker(self._settings)

    async def stop(self) -> None:
        for worker in self._workers:
            worker.stop()
        self._workers = []


_END = object()


class SphinxStream:
    """One stream on a worker: frames are batched per round trip, chunks come back in order.

    ``send`` waits once ``max_queued_frames`` (2 s) are queued, so a lagging worker backs up into
    the call's own queue, where frames are dropped and counted, not into a second hidden one.
    """

    def __init__(self, worker: _Worker, sid: str, max_queued_frames: int = 25) -> None:
        self._worker = worker
        self._sid = sid
        self._frames: asyncio.Queue[object] = asyncio.Queue(max_queued_frames)
        self._waiting = 0  # ``send``s waiting for room
        self._out = ChunkQueue()
        self._task: asyncio.Task[None] | None = None

    async def open(self) -> None:
        await self._worker.request("open", self._sid)
        self._worker.streams += 1
        self._task = asyncio.create_task(self._pump(), name=f"sphinx-{self._sid}")

    async def send(self, frame: Pcm) -> None:
        self._waiting += 1
        try:
            await self._frames.put(frame.tobytes())
        finally:
            self._waiting -= 1

    def send_nowait(self, frame: Pcm) -> bool:
        """``SendsNow``: False when ``send`` would wait (``max_queued_frames`` already wait for
        the worker) or is waiting: ``put_nowait`` would take the room a waiting ``put`` was
        woken for, ahead of its frame."""
        if self._waiting:
            return False
        try:
            self._frames.put_nowait(frame.tobytes())
        except asyncio.QueueFull:
            return False
        return True

    async def close(self) -> None:
        await self._frames.put(_END)

    async def abort(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            with contextlib.suppress(EngineError):
                await self._worker.request("drop", self._sid)

    def stats(self) -> dict[str, int]:
        return {}

    def chunks(self) -> AsyncIterator[TranscriptChunk]:
        return aiter(self._out)

    async def _pump(self) -> None:
        try:
            await self._pump_frames()
        except EngineError as exc:
            self._out.fail(exc)
        finally:
            self._worker.streams -= 1
            self._out.close()

    async def _pump_frames(self) -> None:
        while True:
            batch = [await self._frames.get()]
            while not self._frames.empty():
                batch.append(self._frames.get_nowait())
            ended = batch[-1] is _END
            frames = [f for f in batch if f is not _END]
            if frames:
                for chunk in await self._worker.request("frames", self._sid, frames):
                    self._out.put(chunk)
            if ended:
                for chunk in await self._worker.request("finish", self._sid):
                    self._out.put(chunk)
                return
