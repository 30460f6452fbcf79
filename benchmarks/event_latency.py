"""Events latency: engine text → webhook request received, through the real outbox and deliverer.

voxphone's ``App`` (what ``voxphone serve`` runs) is started in this process with a fake engine
that keeps the engine contract (``voxphone.engines.base``: 80 ms frames in, ``TranscriptChunk``s
out): every ``--delta-every`` frames it emits a ``delta``, every ``--final-every`` frames a
segment end, and the text of each is the ``CLOCK_MONOTONIC`` time at which the engine emitted
it. ``--calls`` calls are opened through the call registry and fed 80 ms of audio every 80 ms,
so the frames, the chunks and the events flow exactly as in a live call: ``Call`` publishes
``transcript.delta``/``transcript.final`` events, the outbox commits them to SQLite
(``synchronous=FULL`` unless ``--sync NORMAL``: every commit fsynced) and the deliverer POSTs
each, signed, to one ``[[webhooks]]`` endpoint. The receiver is a real aiohttp server on
127.0.0.1 in another process; on each request it reads the body and subtracts the engine's
time from its own ``CLOCK_MONOTONIC`` (the same clock in both processes).

Reported (``benchmarks/results/event_latency-<machine>.json``): ``latency_ms`` per event type,
p50/p99/max, with ``event_latency_p99_ms`` for ``transcript.final`` (the goal: ≤ 20 ms), the
events per second offered, and ``os.getloadavg()`` before and after (a loaded machine's
figures are upper bounds).

    python benchmarks/event_latency.py [--calls 50 --seconds 30 --sync FULL|NORMAL]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from aiohttp import ClientSession, web

from voxphone.app import App
from voxphone.audio.codecs import PCMU, Pcm
from voxphone.call import Call
from voxphone.config import Config
from voxphone.engines.base import TranscriptChunk
from voxphone.testing import free_tcp_port, free_udp_range

sys.path.insert(0, str(Path(__file__).parent))
from machine import machine_name  # noqa: E402
from webrtc_calls import NullStream  # noqa: E402

SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()
FRAME_S = 0.08


# -- the receiver (another process) -------------------------------------------------------------


def receiver(port: int) -> None:
    """aiohttp on 127.0.0.1:``port``: POST /hooks records how old each event's text is;
    GET /results returns those ages (ms) by event type."""
    ages: dict[str, list[float]] = {}

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        now = time.monotonic()
        event = json.loads(body)
        text = str(event.get("data", {}).get("text", ""))
        if text.startswith("t="):
            ages.setdefault(event["type"], []).append((now - float(text[2:])) * 1000)
        return web.Response(status=204)

    async def results(request: web.Request) -> web.Response:
        return web.json_response(ages)

    app = web.Application()
    app.router.add_post("/hooks", hook)
    app.router.add_get("/results", results)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


# -- the engine ---------------------------------------------------------------------------------


class StampStream(NullStream):
    """An engine stream whose text is the time it was emitted (monotonic seconds)."""

    def __init__(self, delta_every: int, final_every: int) -> None:
        super().__init__()
        self._frames = 0
        self._delta_every, self._final_every = delta_every, final_every

    async def send(self, frame: Pcm) -> None:
        self._frames += 1
        n = self._frames
        if n % self._final_every == 0:
            end_ms = n * 80
            start_ms = end_ms - self._final_every * 80
            text = f"t={time.monotonic():.6f}"
            self.out.put(
                TranscriptChunk(segment_end=True, text=text, start_ms=start_ms, end_ms=end_ms)
            )
        elif n % self._delta_every == 0:
            self.out.put(TranscriptChunk(delta=f"t={time.monotonic():.6f}"))


class StampEngine:
    name = "stamp"

    def __init__(self, delta_every: int, final_every: int) -> None:
        self._every = (delta_every, final_every)

    async def start(self) -> None:
        pass

    async def open_stream(self, call_id: str) -> StampStream:
        return StampStream(*self._every)

    async def stop(self) -> None:
        pass


# -- the run ------------------------------------------------------------------------------------


def config(args: argparse.Namespace, hook_port: int, db: Path) -> Config:
    rtp = free_udp_range(1)[0]
    endpoint = {
        "name": "bench",
        "url": f"http://127.0.0.1:{hook_port}/hooks",
        "secrets": [SECRET],
        "coalesce_deltas": False,  # every delta is its own request: each one is timed
    }
    return Config.model_validate(
        {
            "http": {"port": free_tcp_port()},
            "rtp": {"ports": f"{rtp}-{rtp}"},
            "asterisk": {"audiosocket_port": 0},
            "calls": {"max_concurrent": args.calls + 10},
            "webrtc": {"enabled": False},
            "outbox": {"path": str(db), "synchronous": args.sync},
            "webhooks": [endpoint],
        }
    )


async def feed(call: Call, seconds: float) -> None:
    """80 ms of (quiet) 8 kHz audio every 80 ms, on schedule."""
    pcm = np.zeros(640, np.int16)
    start = time.monotonic()
    for k in range(int(seconds / FRAME_S)):
        call.push_pcm(k * 640, pcm)
        await asyncio.sleep(max(0.0, start + (k + 1) * FRAME_S - time.monotonic()))


async def run(args: argparse.Namespace, hook_port: int) -> dict[str, Any]:
    db = Path(tempfile.mkdtemp()) / "outbox.db"
    app = App(config(args, hook_port, db), engine=StampEngine(args.delta_every, args.final_every))
    await app.start()
    calls = [
        app.registry.open(PCMU, transport="bench", call_id=f"bench_{i}") for i in range(args.calls)
    ]
    feeders = []
    for call in calls:
        assert call is not None
        feeders.append(asyncio.create_task(feed(call, args.seconds)))
        await asyncio.sleep(FRAME_S / args.calls)  # calls' frames spread over the 80 ms
    await asyncio.gather(*feeders)
    for call in calls:
        assert call is not None
        call.end("hangup")
    await asyncio.sleep(1.0)
    await app.stop()
    url = f"http://127.0.0.1:{hook_port}/results"
    async with ClientSession() as http, http.get(url) as resp:
        ages: dict[str, list[float]] = await resp.json()
    per_type = {t: percentiles(v) for t, v in sorted(ages.items())}
    final = per_type.get("transcript.final", {})
    frames_per_s = 1 / FRAME_S
    return {
        "calls": args.calls,
        "seconds": args.seconds,
        "outbox_synchronous": args.sync,
        "events_per_s_offered": round(
            args.calls * frames_per_s * (1 / args.delta_every + 1 / args.final_every), 1
        ),
        "path": "engine chunk -> Call -> outbox (SQLite WAL commit) -> deliverer -> aiohttp "
        "receiver on 127.0.0.1 (signed POST), another process",
        "latency_ms": per_type,
        "event_latency_p99_ms": final.get("p99"),
        "goal_p99_ms": 20,
    }


def percentiles(values: list[float]) -> dict[str, float]:
    a = np.asarray(values)
    return {
        "p50": round(float(np.percentile(a, 50)), 2),
        "p99": round(float(np.percentile(a, 99)), 2),
        "max": round(float(a.max()), 2),
        "n": int(a.size),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--delta-every", type=int, default=3, help="frames between deltas")
    p.add_argument("--final-every", type=int, default=25, help="frames between finals (2 s)")
    p.add_argument("--sync", choices=["FULL", "NORMAL"], default="FULL")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    hook_port = free_tcp_port()
    proc = multiprocessing.get_context("spawn").Process(target=receiver, args=(hook_port,))
    proc.start()
    time.sleep(1.5)
    machine = machine_name()
    load_before = os.getloadavg()
    try:
        result = asyncio.run(run(args, hook_port))
    finally:
        proc.terminate()
        proc.join()
    result = {"machine": machine, "loadavg_before": load_before, **result}
    result["loadavg_after"] = os.getloadavg()
    print(json.dumps(result, indent=2))
    suffix = "" if args.sync == "FULL" else f"-{args.sync.lower()}"
    out = args.out or Path(f"benchmarks/results/event_latency-{machine}{suffix}.json")
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
