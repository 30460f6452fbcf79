"""How many real-time calls ONE voxphone process drives through ``vllm-remote``, and at what cost.

Issue 12 asks that one voxphone process feeding several ``vllm serve`` machines must not become the
bottleneck. This measures voxphone's side alone: the servers are ``--servers`` copies of the
protocol-faithful fake ``/v1/realtime`` server (``tests/fake_realtime.py``), each in its own process
so that its CPU is not counted as voxphone's. Like Voxtral, the fake answers one
``transcription.delta`` per 80 ms of audio: the first once 9000 samples are in (on frame 7, the
8th), then one per frame, each sent as soon as the append that completes it is read.

The client is voxphone's real code: one ``VllmRemoteEngine`` with every server's URL (each session
goes to the server with the fewest live sessions, round-robin among equals). ``--paths`` (both by
default, one after the other):

* ``call``: a ``voxphone.call.Call`` per call (``Call.feed_pcm`` → audio pipeline
  → frame queue → ``VoxtralStream`` → ``RemoteSession`` → websocket; steps → segments →
  ``transcript.*`` events into a sink that counts them): everything after the transport;
* ``session``: ``benchmarks/gpu_capacity.py``'s ``Call`` on raw ``RemoteSession`` s (the
  engine wire protocol alone, as ``gpu_capacity.py --path remote`` drives it).

Every call sends one 80 ms frame of 16 kHz audio every 80 ms on its own phase (start times spread
over ``--ramp-s``), for ``--seconds``: 2 s of noise (the fake writes a word per loud frame), then
1 s of silence (a pause: ``transcript.final``), repeated. Per level, over the steady state (every
call started and sending):

* **voxphone CPU**: this process's CPU time / wall time (%), and µs of CPU per call-second, hence
  calls per core; the server processes' CPU % beside it;
* **event-loop lag**: how late a 10 ms ``asyncio.sleep`` ticker wakes up (p50/p99/max);
* **step lag** (``gpu_capacity.py``'s definition): the time step ``j`` came back − the time frame
  ``j + 7`` was handed to voxphone. The fake emits step ``j`` as soon as it reads frame ``j + 7``,
  so this is voxphone's send path + loopback + the fake's work + voxphone's receive path: what a
  zero-time engine would show;
* failures: calls that reconnected or ended with an error, steps missing;
* garbage collections in the window and their pauses (wall time: a preempted collection looks
  long); ``--profile-at N`` adds a py-spy summary of this process at level ``N``.

This machine is shared (2 cores, other agents): the figures are upper bounds on voxphone's cost,
and the lags include CPU contention with the fake servers and the neighbours; ``os.getloadavg()``
is recorded before and after each level. Results go to
``benchmarks/results/remote_fanout-<machine>.json``; ``--plot`` draws them beside it.

    PYTHONPATH=$PWD python benchmarks/remote_fanout.py --levels 64,128,256,512 --servers 4
    PYTHONPATH=$PWD python benchmarks/remote_fanout.py --plot
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import multiprocessing as mp
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from gpu_capacity import FIRST_STEP_FRAMES, FRAME_S, KEEPS_UP_MS, LAG_DEFINITION, pct, summarise
from gpu_capacity import Call as TimedCall
from machine import machine_name

from voxphone.audio.codecs import L16_16K, Pcm
from voxphone.call import Call
from voxphone.clock import SystemClock
from voxphone.engines.vllm_remote import RemoteSession, VllmRemoteEngine
from voxphone.engines.voxtral import VoxtralSettings, VoxtralStream
from voxphone.events.model import Event

MODEL = "voxtral"
FRAME = 1280  # samples in 80 ms at 16 kHz
RESULTS = Path("benchmarks/results")


# -- the servers, each in its own process ----------------------------------------------------


def _serve(ports: Any, stop: Any) -> None:
    """One fake ``/v1/realtime`` server until ``stop`` is set (the entry of a server process)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests/
    from tests.fake_realtime import FakeRealtimeServer

    async def main() -> None:
        server = FakeRealtimeServer(model=MODEL)
        await server.start()
        ports.put(server.port)
        await asyncio.to_thread(stop.wait)
        await server.stop()

    asyncio.run(main())


class Servers:
    """``n`` server processes (fresh per level: the fake keeps every connection's audio)."""

    def __init__(self, n: int) -> None:
        ctx = mp.get_context("spawn")
        self._stop = ctx.Event()
        ports = ctx.Queue()
        self.procs = [ctx.Process(target=_serve, args=(ports, self._stop)) for _ in range(n)]
        for p in self.procs:
            p.start()
        self.urls = [f"ws://127.0.0.1:{ports.get(timeout=60)}/v1/realtime" for _ in range(n)]
        self._ps = [psutil.Process(p.pid) for p in self.procs]
        self._cpu0 = self.cpu_s()

    def cpu_s(self) -> list[float]:
        return [sum(p.cpu_times()[:2]) for p in self._ps]

    def close(self) -> None:
        self._stop.set()
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.kill()


# -- voxphone's side -------------------------------------------------------------------------


class TimedSession:
    """A ``RemoteSession`` that notes when each step came back (into ``times``)."""

    def __init__(self, session: RemoteSession, times: list[float]) -> None:
        self._session = session
        self._times = times

    async def send(self, frame: Pcm) -> None:
        await self._session.send(frame)

    async def finish(self) -> None:
        await self._session.finish()

    async def abort(self) -> None:
        await self._session.abort()

    async def steps(self) -> Any:
        loop = asyncio.get_running_loop()
        async for step in self._session.steps():
            self._times.append(loop.time())
            yield step


class TimedEngine(VllmRemoteEngine):
    """``VllmRemoteEngine`` whose ``open_stream`` (the same two lines) times each call's steps."""

    def __init__(self, urls: list[str]) -> None:
        super().__init__(urls, MODEL, VoxtralSettings(), connect_timeout_s=30)
        self.step_times: dict[str, list[float]] = {}

    async def open_stream(self, call_id: str) -> VoxtralStream:
        times = self.step_times[call_id]

        async def open_session() -> TimedSession:
            return TimedSession(await self._open_session(), times)

        stream = VoxtralStream(open_session, self._settings, call_id)
        await stream.start()
        return stream


class CountingSink:
    """The events of every call, counted by type (``call.ended`` kept whole)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.ended: list[Event] = []

    def publish(self, event: Event) -> None:
        self.counts[event.type] += 1
        if event.type == "call.ended":
            self.ended.append(event)


class Feed:
    """``gpu_capacity.Call``'s session interface onto a ``voxphone.call.Call``: it starts the
    call with its first frame, feeds frames with ``feed_pcm`` and hangs up after the last."""

    def __init__(self, call: Call, engine: TimedEngine) -> None:
        self.call = call
        self._engine = engine
        self._started = False

    async def send(self, frame: Pcm) -> None:
        if not self._started:
            self._started = True
            self.call.start(self._engine)
        await self.call.feed_pcm(frame)

    async def finish(self) -> None:
        self.call.end("hangup")

    async def abort(self) -> None:
        await self.call.abort("benchmark")


def audio(rng: np.random.Generator) -> list[Pcm]:
    """3 s of frames: 2 s of noise (a word per frame from the fake), 1 s of silence."""
    loud = [rng.normal(0, 3000, FRAME).astype(np.int16) for _ in range(25)]
    return loud + [np.zeros(FRAME, np.int16)] * 12


class LoopLag:
    """How late a ``period_s`` ticker wakes up, in ms, from ``since`` on."""

    def __init__(self, period_s: float = 0.01) -> None:
        self.period_s = period_s
        self.lags: list[tuple[float, float]] = []

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            await asyncio.sleep(self.period_s)
            now = loop.time()
            self.lags.append((now, (now - t - self.period_s) * 1000))

    def between(self, a: float, b: float) -> list[float]:
        return [lag for t, lag in self.lags if a <= t <= b]


class GcPauses:
    """Every garbage collection's generation and pause (``gc.callbacks``), with its end time."""

    def __init__(self) -> None:
        self.pauses: list[tuple[float, int, float]] = []
        self._t = 0.0

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._note)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._note)

    def _note(self, phase: str, info: dict[str, int]) -> None:
        now = time.monotonic()
        if phase == "start":
            self._t = now
        else:
            self.pauses.append((now, info["generation"], (now - self._t) * 1000))

    def between(self, a: float, b: float) -> dict[str, Any]:
        """Collections per generation and the longest pause (ms) in the window (monotonic s)."""
        inside = [(g, ms) for t, g, ms in self.pauses if a <= t <= b]
        return {
            "collections": dict(Counter(g for g, _ in inside)),
            "pause_ms_total": round(sum(ms for _, ms in inside), 1),
            "pause_ms_max": round(max((ms for _, ms in inside), default=0.0), 1),
        }


async def py_spy(seconds: float, out: Path) -> dict[str, Any]:
    """``py-spy record`` of this process (raw collapsed stacks), summarised."""
    spy = shutil.which("py-spy")
    if spy is None:
        return {"error": "py-spy not found"}
    cmd = [spy, "record", "--pid", str(os.getpid()), "--duration", str(int(seconds)),
           "--rate", "200", "--nonblocking", "--format", "raw", "--output", str(out)]  # fmt: skip
    p = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    _, err = await p.communicate()
    return summarise(out, err.decode()[-300:])


async def run_level(n: int, path: str, a: argparse.Namespace, machine: str) -> dict[str, Any]:
    """``n`` calls through ``path`` (``call``/``session``) to fresh servers, measured as above."""
    with GcPauses() as gc_pauses:
        return {"path": path, **await _run_level(n, path, a, machine, gc_pauses)}


async def _run_level(
    n: int, path: str, a: argparse.Namespace, machine: str, gc_pauses: GcPauses
) -> dict[str, Any]:
    servers = Servers(a.servers)
    engine = TimedEngine(servers.urls)
    await engine.start()
    loop = asyncio.get_running_loop()
    rng = np.random.default_rng(n)
    clip = audio(rng)
    frames = round(a.seconds / FRAME_S)
    # ``session``: connected beforehand, as gpu_capacity.py does; ``call``: on the first frame.
    opened = [await engine._open_session() for _ in range(n)] if path == "session" else []
    t0 = loop.time() + 1.0
    sink = CountingSink()
    calls: list[TimedCall] = []
    for i in range(n):
        start = t0 + random.uniform(0, a.ramp_s)
        if opened:
            calls.append(TimedCall(opened[i], frames, start))
            continue
        call_id = f"c{i}"
        call = Call(call_id, L16_16K, sink, SystemClock(), transport="bench", end_timeout_s=30)
        calls.append(timed := TimedCall(Feed(call, engine), frames, start))  # type: ignore[arg-type]
        engine.step_times[call_id] = timed.steps
    steady = (t0 + a.ramp_s + 1.0, t0 + a.seconds)
    ticker = LoopLag()
    tick_task = asyncio.create_task(ticker.run())
    load_before = os.getloadavg()
    receivers = [asyncio.create_task(c.receive()) for c in calls] if path == "session" else []

    async def measure() -> dict[str, Any]:
        await asyncio.sleep(max(0.0, steady[0] - loop.time()))
        cpu0, srv0, w0 = time.process_time(), servers.cpu_s(), loop.time()
        spied = None
        if n == a.profile_at:
            spied = asyncio.create_task(
                py_spy(
                    a.profile_s,
                    Path(tempfile.gettempdir()) / f"remote_fanout-{machine}-{path}-{n}.spy.txt",
                )
            )
        await asyncio.sleep(max(0.0, steady[1] - loop.time()))
        w1 = loop.time()
        wall = w1 - w0
        cpu = time.process_time() - cpu0
        srv = [(b - a_) / wall * 100 for a_, b in zip(srv0, servers.cpu_s(), strict=True)]
        return {"wall_s": wall, "cpu_s": cpu, "window": (w0, w1),
                "servers_cpu_percent": [round(x) for x in srv],
                "profile": await spied if spied else None}  # fmt: skip

    measured = asyncio.create_task(measure())
    await asyncio.gather(*(c.send(clip) for c in calls))
    m = await measured
    if path == "session":
        done, late = await asyncio.wait(receivers, timeout=60)
        failed = sum(1 for t in done if t.exception() is not None) + len(late)
        for t in late:
            t.cancel()
        for c in calls:
            with contextlib.suppress(Exception):
                await c.session.abort()
        reconnects = 0
    else:
        feeds = [c.session for c in calls]
        waits = [f.call.wait() for f in feeds]  # type: ignore[attr-defined]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*waits), 60)
        reconnects = sum(e.data.get("engine", {}).get("reconnects", 0) for e in sink.ended)
        failed = n - sum(1 for e in sink.ended if e.data["reason"] == "hangup")
    tick_task.cancel()
    await engine.stop()
    servers.close()
    lags = [lag for c in calls for lag in c.lags_ms(steady[0])[0]]
    answered = sum(min(len(c.steps), frames - FIRST_STEP_FRAMES) for c in calls)
    expected = n * (frames - FIRST_STEP_FRAMES)
    ticks = ticker.between(*steady)
    # Call-seconds of audio actually sent in the window (a starved process sends late, in bursts).
    w0, w1 = m["window"]
    call_s = sum(w0 <= t <= w1 for c in calls for t in c.sent) * FRAME_S
    us_per_call_s = m["cpu_s"] / call_s * 1e6
    p99 = pct(lags, 99)
    return {
        "calls": n,
        "cpu_percent": round(100 * m["cpu_s"] / m["wall_s"], 1),
        "cpu_us_per_call_second": round(us_per_call_s),
        "calls_per_core": round(1e6 / us_per_call_s),
        "servers_cpu_percent": m["servers_cpu_percent"],
        "loop_lag_ms": {"p50": pct(ticks, 50), "p99": pct(ticks, 99), "max": pct(ticks, 100)},
        "step_lag_ms": {"p50": pct(lags, 50), "p99": p99, "max": pct(lags, 100)},
        "gc_in_window": gc_pauses.between(w0, w1),
        "steps_answered": answered,
        "steps_expected": expected,
        "failed_calls": failed,
        "reconnects": reconnects,
        "events": dict(sink.counts),
        "keeps_up": bool(p99 is not None and p99 <= KEEPS_UP_MS and answered == expected),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "steady_s": round(m["wall_s"], 1),
        "call_seconds_in_window": round(call_s),
        **({"profile": m["profile"]} if m["profile"] else {}),
    }  # fmt: skip


async def main(a: argparse.Namespace) -> None:
    machine = machine_name()
    out = Path(a.out or RESULTS / f"remote_fanout-{machine}.json")
    report: dict[str, Any] = {
        "benchmark": "remote_fanout", "servers": a.servers,
        "machine": {"name": machine, "cpu": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "python": platform.python_version()},
        "seconds_per_call": a.seconds, "ramp_s": a.ramp_s, "step_lag": LAG_DEFINITION,
        "note": "shared machine: CPU figures are upper bounds; lags include contention with the "
                "fake servers and other processes (see loadavg)",
        "levels": [],
    }  # fmt: skip
    for path in a.paths:
        for n in a.levels:
            level = await run_level(n, path, a, machine)
            report["levels"].append(level)
            print(json.dumps({k: v for k, v in level.items() if k != "profile"}), flush=True)
            out.write_text(json.dumps(report, indent=1))  # noqa: ASYNC240 (between levels)
    print(out)


def plot(a: argparse.Namespace) -> None:
    """CPU per call and lags against calls, from this machine's JSON, as a PNG beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    machine = machine_name()
    src = Path(a.out or RESULTS / f"remote_fanout-{machine}.json")
    r = json.loads(src.read_text())
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = {"call": "voxphone Call pipeline", "session": "RemoteSession alone"}
    for path in dict.fromkeys(lv["path"] for lv in r["levels"]):
        lv = [x for x in r["levels"] if x["path"] == path]
        xs = [x["calls"] for x in lv]
        cpu = [x["cpu_percent"] for x in lv]
        ax1.plot(xs, cpu, marker="o", label=f"voxphone process: {names[path]}")
        for x, y, per in zip(xs, cpu, lv, strict=True):
            ax1.annotate(f"{per['cpu_us_per_call_second']} µs", (x, y), fontsize=7,
                         textcoords="offset points", xytext=(4, -10))  # fmt: skip
        if path == "call":
            ax1.plot(xs, [sum(x["servers_cpu_percent"]) for x in lv], marker="s", linestyle="--",
                     color="grey", label=f"{r['servers']} fake servers (Call runs)")  # fmt: skip
        ax2.plot(xs, [x["step_lag_ms"]["p99"] for x in lv], marker="o",
                 label=f"step lag p99: {names[path]}")  # fmt: skip
        ax2.plot(xs, [x["loop_lag_ms"]["p99"] for x in lv], marker="^", linestyle=":",
                 label=f"event-loop lag p99: {names[path]}")  # fmt: skip
    ax1.axhline(100, color="black", linestyle=":", label="one core")
    ax1.set(xlabel="concurrent real-time calls", ylabel="CPU % (annotated: µs per call-second)")
    ax2.axhline(KEEPS_UP_MS, color="grey", linestyle="--", label="200 ms")
    ax2.set(xlabel="concurrent real-time calls", ylabel="ms", yscale="log")
    xs = sorted({x["calls"] for x in r["levels"]})
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.minorticks_off()
        ax.legend(fontsize=7, loc="upper left")
    loads = sorted(x["loadavg_before"][0] for x in r["levels"])
    fig.suptitle(
        f"one voxphone process, vllm-remote → {r['servers']} fake /v1/realtime servers, {machine}, "
        f"shared (1-min load avg {loads[0]}–{loads[-1]}): upper bounds"
    )
    out = src.with_suffix(".png")
    fig.savefig(out, dpi=110, bbox_inches="tight")
    print(out)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--paths", type=lambda s: s.split(","), default=["call", "session"])
    p.add_argument("--servers", type=int, default=4)
    p.add_argument("--levels", type=lambda s: [int(x) for x in s.split(",")], default=[64, 128])
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--ramp-s", type=float, default=3.0)
    p.add_argument("--profile-at", type=int, default=0, help="py-spy this process at this level")
    p.add_argument("--profile-s", type=float, default=6.0)
    p.add_argument("--out", help="JSON (default benchmarks/results/remote_fanout-<machine>.json)")
    p.add_argument("--plot", action="store_true", help="only draw the PNG from the JSON")
    return p.parse_args()


if __name__ == "__main__":
    args = parse()
    if args.plot:
        plot(args)
    else:
        from voxphone.logging import configure

        configure("warning", "console")
        asyncio.run(main(args))
