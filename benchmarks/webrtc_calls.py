"""Many browser calls on one event loop: server CPU per call and the loop's lag.

Starts voxphone's App in this process with a null engine (so only the WebRTC side is measured:
ICE, DTLS/SRTP, aiortc's jitter buffer and Opus decoder, voxphone's downmix, timeline, resampler
and framing), then a second process places N concurrent WHIP calls with aiortc, each playing 20 s
of a tone. Prints the server's CPU time per call and the event loop's scheduling lag.

    python benchmarks/webrtc_calls.py [N]
"""

from __future__ import annotations

import asyncio
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from voxphone.app import App, freeze_startup_heap
from voxphone.audio.codecs import Pcm
from voxphone.config import Config
from voxphone.engines.base import ChunkQueue
from voxphone.testing import free_tcp_port
from voxphone.whip_client import play

SECONDS = 20


class NullStream:
    def __init__(self) -> None:
        self.out = ChunkQueue()

    async def send(self, frame: Pcm) -> None:
        pass

    async def close(self) -> None:
        self.out.close()

    async def abort(self) -> None:
        self.out.close()

    def chunks(self):  # type: ignore[no-untyped-def]
        return self.out.__aiter__()

    def stats(self) -> dict[str, int]:
        return {}


class NullEngine:
    name = "null"

    async def start(self) -> None:
        pass

    async def open_stream(self, call_id: str) -> NullStream:
        return NullStream()

    async def stop(self) -> None:
        pass


async def loop_lag(samples: list[tuple[float, float]], stop: asyncio.Event) -> None:
    """(when, how late) a 10 ms sleep woke up, in seconds and milliseconds."""
    while not stop.is_set():
        t0 = time.perf_counter()
        await asyncio.sleep(0.01)
        samples.append((t0, (time.perf_counter() - t0 - 0.01) * 1000))


def summary(lags: list[float]) -> str:
    return (
        f"p50 {statistics.median(lags):.2f} ms, p99 {np.percentile(lags, 99):.2f} ms, "
        f"max {max(lags):.2f} ms"
    )


def tone() -> Path:
    wav = Path(tempfile.mkdtemp()) / "tone.wav"
    subprocess.run(
        ["ffmpeg", "-loglevel", "error", "-f", "lavfi", "-i", f"sine=440:d={SECONDS}", str(wav)],
        check=True,
    )
    return wav


async def server(n: int, wav: Path) -> None:
    port = free_tcp_port()
    cfg = Config.model_validate(
        {
            "http": {"port": port},
            "rtp": {"ports": "39900-39901"},
            "asterisk": {"audiosocket_port": 0},
            "calls": {"max_concurrent": n + 1},
            "webrtc": {"interfaces": ["127.0.0.1"]},
        }
    )
    app = App(cfg, engine=NullEngine())
    await app.start()
    freeze_startup_heap()  # as voxphone serve does
    lag: list[tuple[float, float]] = []
    stop = asyncio.Event()
    probe = asyncio.create_task(loop_lag(lag, stop))
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    clients = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--clients", str(n), str(wav), str(port)
    )
    await clients.wait()
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    stop.set()
    await probe
    await app.stop()
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    print(f"{n} concurrent WebRTC calls x {SECONDS} s of Opus, server side (null engine)")
    print(f"server CPU: {cpu / n / SECONDS * 100:.2f}% of a core per call")
    setup = [ms for t, ms in lag if t - start < 5]
    steady = [ms for t, ms in lag if 5 <= t - start < SECONDS]
    print(f"event loop lag, first 5 s (call set-up): {summary(setup)}")
    print(f"event loop lag, after (calls streaming): {summary(steady)}")


async def clients(n: int, wav: Path, port: int) -> None:
    url = f"http://127.0.0.1:{port}/v1/whip"
    results = await asyncio.gather(*(play(url, wav, "opus") for _ in range(n)))
    ok = sum(r.events[-1]["type"] == "call.ended" for r in results)
    audio = [r.events[-1]["data"]["audio_ms"] for r in results]
    print(f"calls ended cleanly: {ok}/{n}; audio per call: min {min(audio)} ms")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--clients"]:
        asyncio.run(clients(int(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])))
    else:
        asyncio.run(server(int(sys.argv[1]) if len(sys.argv) > 1 else 10, tone()))
