"""Many browser calls on one event loop: server CPU per call and the loop's lag.

Starts voxphone's App in this process with a null engine (so only the WebRTC side is measured:
ICE, DTLS/SRTP and aiortc's RTP receive path, then voxphone's jitter buffer, Opus decode,
timeline and framing), then client processes (``CALLS_PER_CLIENT_PROCESS`` calls each) place N
concurrent WHIP calls with aiortc, each playing ``--seconds`` (40) of a tone, or of ``--speech``
FILE looped. The clients send aiortc's Opus (stereo, ≈ 118 kbit/s on it), or with ``--browser``
what a browser sends for voxphone's answer (``as_a_browser``: mono, voip, at most wideband at
20 kbit/s for its ``maxplaybackrate``), at ``--opus-bitrate`` if given. Once every call
streams, over ``WINDOW`` seconds, it reports the server's CPU per call
(``streaming_core_per_call_pct``, and ``calls_per_core`` from it) and whether the calls kept
real time (``keeping_up``: 50 packets a second each, and the loop's lag under 20 ms at p99, as
``load.py`` asks of RTP; if not, the CPU figure is no capacity); also the CPU over the whole
run, set-up and teardown included, and the loop's lag. Writes
``benchmarks/results/webrtc_calls-<machine>-<N>[-opus32k|-browser][-speech].json``. Pin the
two sides apart on a machine with cores to spare; ``--plot`` (matplotlib) draws a machine's
runs:

    python benchmarks/webrtc_calls.py 20 --server-cpus 0 --client-cpus 1
    python benchmarks/webrtc_calls.py 250 --server-cpus 0 --client-cpus 2-15 --browser \
        --speech speech.wav
    python benchmarks/webrtc_calls.py --plot [--machine 16core-x86_64] [--results DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import av
import numpy as np
import structlog

from voxphone.app import App
from voxphone.audio.codecs import Pcm
from voxphone.audio.files import read_audio, write_wav
from voxphone.config import Config
from voxphone.engines.base import ChunkQueue
from voxphone.event_loop import LOOPS, run
from voxphone.heap import collector_off_the_clock
from voxphone.testing import free_tcp_port
from voxphone.whip_client import play

sys.path.insert(0, str(Path(__file__).parent))
from machine import cpu_model, machine_name, pin  # noqa: E402

#: How long each call plays (s); ``--seconds`` for more, when many calls take long to set up.
SECONDS = 40
#: aiortc's clients in one process (one event loop) keep real time up to about 20 calls (20 on
#: a 2.1 GHz Xeon; 50 in one process fell behind).
CALLS_PER_CLIENT_PROCESS = 15
#: The streaming window (s): it opens once every call is up and has streamed a second (set-up,
#: ICE and DTLS, takes longer the more calls start at once), and must close before the first
#: call ends.
WINDOW = 10.0
#: Where runs are written, and plotted from unless told (``--results``).
RESULTS = Path("benchmarks/results")


class NullStream:
    def __init__(self) -> None:
        self.out = ChunkQueue()

    async def send(self, frame: Pcm) -> None:
        pass

    def send_nowait(self, frame: Pcm) -> bool:
        """Takes every frame at once, as the in-process engines do (``SendsNow``)."""
        return True

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


def played_audio(seconds: float, speech: Path | None = None) -> Path:
    """``seconds`` at 48 kHz of ``speech`` looped, or of a 440 Hz tone (an eighth of full
    scale, as FFmpeg's ``sine``). What is played decides how Opus codes it: a browser's
    encoder codes speech as SILK or SILK and CELT (hybrid), a steady tone as CELT."""
    wav = Path(tempfile.mkdtemp()) / "played.wav"
    n = int(seconds * 48000)
    if speech is not None:
        write_wav(wav, np.resize(read_audio(speech, 48000), n), 48000)
        return wav
    t = np.arange(n) / 48000
    write_wav(wav, (np.sin(2 * np.pi * 440 * t) * 4096).astype(np.int16), 48000)
    return wav


async def server(
    n: int, seconds: float, client_args: list[str], speech: Path | None = None
) -> dict[str, Any]:
    port = free_tcp_port()
    cfg = Config.model_validate(
        {
            "http": {"port": port},
            "rtp": {"ports": "39900-39901"},
            "asterisk": {"audiosocket_port": 0},
            "calls": {"max_concurrent": n + 1},
            "webrtc": {"interfaces": ["127.0.0.1"]},
            "outbox": {"path": str(Path(tempfile.mkdtemp()) / "outbox.db")},
        }
    )
    app = App(cfg, engine=NullEngine())
    await app.start()
    async with collector_off_the_clock():  # as voxphone serve does
        lag: list[tuple[float, float]] = []
        stop = asyncio.Event()
        probe = asyncio.create_task(loop_lag(lag, stop))
        wav = played_audio(seconds, speech)
        cpu0, start = cpu_s(), time.perf_counter()
        procs = -(-n // CALLS_PER_CLIENT_PROCESS)
        shares = [len(range(k, n, procs)) for k in range(procs)]
        clients = [
            await asyncio.create_subprocess_exec(
                sys.executable, __file__, "--clients", str(share), str(wav), str(port), *client_args
            )
            for share in shares
        ]
        deadline = start + seconds - WINDOW - 2
        while not streaming(app, n) and time.perf_counter() < deadline:  # noqa: ASYNC110 (polled)
            await asyncio.sleep(0.2)
        t0 = time.perf_counter() - start
        steady0, wall0, packets0 = cpu_s(), time.perf_counter(), packets(app)
        await asyncio.sleep(WINDOW)
        wall = time.perf_counter() - wall0
        steady_cpu = (cpu_s() - steady0) / wall
        rate = (packets(app) - packets0) / wall / n  # per call: 50 a second if the clients keep up
        up = len(app.registry.calls)
        for process in clients:
            await process.wait()
        cpu = cpu_s() - cpu0
        stop.set()
        await probe
    await app.stop()
    setup = [ms for t, ms in lag if t - start < t0]
    steady = [ms for t, ms in lag if t0 <= t - start < t0 + WINDOW]
    lag_p99 = float(np.percentile(steady, 99))
    return {
        "machine": machine_name(),
        "cpu": cpu_model(),
        "calls": n,
        "calls_up_while_streaming": up,
        "seconds_per_call": seconds,
        "setup_s": round(t0, 1),
        "packets_per_call_per_s_streaming": round(rate, 1),
        # Below 50 packets a second the calls fell behind real time (the clients or the
        # server), and a loop lagging 20 ms at p99 is full: either way the CPU is no capacity.
        "keeping_up": rate >= 49 and lag_p99 < 20,
        "streaming_core_per_call_pct": round(steady_cpu / n * 100, 3),
        "calls_per_core": round(n / steady_cpu),
        "whole_run_core_per_call_pct": round(cpu / n / seconds * 100, 3),
        "loop_lag_ms_setup": percentiles(setup),
        "loop_lag_ms_streaming": percentiles(steady),
    }


def streaming(app: App, n: int) -> bool:
    """Whether all ``n`` calls are up and each has had a second of packets."""
    calls = list(app.registry.calls.values())
    return len(calls) == n and all(call.stats.packets >= 50 for call in calls)


def packets(app: App) -> int:
    """Packets the live calls have taken so far."""
    return sum(call.stats.packets for call in app.registry.calls.values())


def cpu_s() -> float:
    """This process's CPU seconds (user + system, all threads, aiortc's included)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def percentiles(lags: list[float]) -> dict[str, float]:
    return {
        "p50": round(statistics.median(lags), 2),
        "p99": round(float(np.percentile(lags, 99)), 2),
        "max": round(max(lags), 2),
    }


def libwebrtc_opus(max_playback_rate: int) -> tuple[int, int]:
    """What libwebrtc's Opus encoder does with an answer's ``maxplaybackrate`` (Hz): its
    default bit rate (``audio_encoder_opus.cc``: ``kOpusBitrateNbBps`` up to 8 kHz,
    ``WbBps`` up to 16 kHz, ``FbBps`` above; mono) and, as FFmpeg's libopus ``cutoff`` (Hz),
    the bandwidth it caps the encoder at (``opus_interface.cc``,
    ``WebRtcOpus_SetMaxPlaybackRate``: ``OPUS_SET_MAX_BANDWIDTH``, narrow- to fullband)."""
    r = max_playback_rate
    bit_rate = 12000 if r <= 8000 else 20000 if r <= 16000 else 32000
    tiers = ((8000, 4000), (12000, 6000), (16000, 8000), (24000, 12000))
    return bit_rate, next((cutoff for top, cutoff in tiers if r <= top), 20000)


def as_a_browser(bit_rate: int | None, follow_answer: bool) -> None:
    """Make aiortc's Opus encoder (stereo at 96 kbit/s, whatever the answer says) send what a
    browser (libwebrtc) sends: mono, in voip mode, at ``bit_rate`` or libwebrtc's default; with
    ``follow_answer``, for the answer it got — its bandwidth capped by the answer's
    ``maxplaybackrate`` (RFC 7587 §6.1) and its default rate for that (``libwebrtc_opus``), as
    Chromium does for voxphone's answer (``tests/e2e/test_browser.py``); without, fullband, as
    the runs before voxphone's answer said it (``--opus-bitrate`` alone). Benchmark clients
    only: it patches aiortc's peer connection (to read each answer) and ``OpusEncoder`` (made
    once the answer is in)."""
    from aiortc import RTCPeerConnection
    from aiortc.codecs import opus

    answered = {"maxplaybackrate": 48000}  # RFC 7587's default; one server per process
    set_remote, init = RTCPeerConnection.setRemoteDescription, opus.OpusEncoder.__init__

    async def read_answer(self: Any, description: Any) -> None:
        if description.type == "answer" and follow_answer:
            rate = re.search(r"^a=fmtp:\d+ .*maxplaybackrate=(\d+)", description.sdp, re.M)
            answered["maxplaybackrate"] = int(rate.group(1)) if rate else 48000
        await set_remote(self, description)

    def browser(self: Any) -> None:
        init(self)
        default_rate, cutoff = libwebrtc_opus(answered["maxplaybackrate"])
        self.codec.bit_rate, self.codec.layout = bit_rate or default_rate, "mono"
        self.codec.options = {"application": "voip", "cutoff": str(cutoff)}
        self.resampler = av.AudioResampler(format="s16", layout="mono", rate=48000, frame_size=960)

    RTCPeerConnection.setRemoteDescription = read_answer  # type: ignore[method-assign]
    opus.OpusEncoder.__init__ = browser  # type: ignore[method-assign]


async def clients(n: int, wav: Path, port: int) -> None:
    url = f"http://127.0.0.1:{port}/v1/whip"
    results = await asyncio.gather(*(play(url, wav, "opus") for _ in range(n)))
    ok = sum(r.events[-1]["type"] == "call.ended" for r in results)
    audio = [r.events[-1]["data"]["audio_ms"] for r in results]
    print(f"calls ended cleanly: {ok}/{n}; audio per call: min {min(audio)} ms")


def plot(machine: str, folder: Path = RESULTS) -> Path:
    """Server CPU and the loop's p99 lag against calls, from ``machine``'s runs in ``folder``:
    the files named ``-before`` (or ``-before-N``: the code before a change — in
    ``benchmarks/results`` itself, before browser calls' packets were decoded as RTP's) and the
    rest. A run whose calls fell behind real time is drawn hollow: its CPU is no capacity.
    Writes ``folder/webrtc_calls-<machine>.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs: dict[str, list[dict[str, Any]]] = {"before": [], "now": []}
    for f in folder.glob(f"webrtc_calls-{machine}-*.json"):
        r = json.loads(f.read_text())
        kind = "before" if re.search(r"-before(-\d+)?$", f.stem) else "now"
        rate = r.get("client_opus_bitrate")
        label = f"{kind}, {rate // 1000} kbit/s mono" if rate else kind
        label += ", as a browser" if r.get("client_browser") else ""
        label += ", speech" if r.get("client_plays", "tone") != "tone" else ""
        label += ", uvloop" if r.get("server_loop") == "uvloop" else ""
        runs.setdefault(label, []).append(r)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.5))
    colors = ("tab:gray", "tab:blue", "tab:green", "tab:orange", "tab:red", "tab:purple")
    groups = [(label, rs) for label, rs in runs.items() if rs]
    for (label, rs), color in zip(groups, colors, strict=False):
        rs.sort(key=lambda r: r["calls"])
        calls = [r["calls"] for r in rs]
        cores = [r["streaming_core_per_call_pct"] * r["calls"] / 100 for r in rs]
        a.plot(calls, cores, "-", color=color, label=label)
        for r, c in zip(rs, cores, strict=True):
            a.plot(r["calls"], c, "o", color=color, fillstyle="full" if r["keeping_up"] else "none")
            if r["keeping_up"]:
                a.annotate(f"{r['calls_per_core']}/core", (r["calls"], c), fontsize=7,
                           textcoords="offset points", xytext=(4, -10))  # fmt: skip
        b.semilogy(calls, [r["loop_lag_ms_streaming"]["p99"] for r in rs], "o-", color=color,
                   label=label)  # fmt: skip
    a.set_xlabel("concurrent browser (WHIP, aiortc) calls")
    a.set_ylabel("server CPU while they stream (cores)")
    a.legend()
    a.grid(alpha=0.3)
    b.set_xlabel("concurrent browser (WHIP, aiortc) calls")
    b.set_ylabel("event loop lag p99 (ms)")
    b.legend()
    b.grid(alpha=0.3)
    cpu = next(r["cpu"] for rs in runs.values() for r in rs)
    fig.suptitle(
        f"voxphone WebRTC calls, null engine, server on one core — {machine} ({cpu})\n"
        "hollow: not keeping up (behind real time, or the loop p99 ≥ 20 ms)",
        fontsize=10,
    )
    fig.tight_layout()
    out = folder / f"webrtc_calls-{machine}.png"
    fig.savefig(out, dpi=110)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("calls", type=int, nargs="?", default=10)
    p.add_argument("--server-cpus", default=None, help="pin the server, e.g. 0")
    p.add_argument("--client-cpus", default=None, help="pin the WHIP clients, e.g. 1")
    p.add_argument("--plot", action="store_true", help="plot this machine's results and exit")
    p.add_argument("--machine", default=None, help="with --plot: another machine's results")
    p.add_argument("--results", type=Path, default=RESULTS, help="with --plot: runs from there")
    p.add_argument("--seconds", type=float, default=SECONDS, help="each call plays (s)")
    p.add_argument("--browser", action="store_true", help="clients send what a browser does")
    p.add_argument("--speech", type=Path, default=None, help="a speech file to loop, not a tone")
    p.add_argument("--opus-bitrate", type=int, default=None, help="clients: mono Opus at (bit/s)")
    p.add_argument(
        "--loop",
        choices=LOOPS,
        default="uvloop",
        help="the server's event loop (serve's default: uvloop)",
    )
    p.add_argument("--clients", nargs=3, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.plot:
        print(plot(args.machine or machine_name(), args.results))
        return
    if args.clients is not None:
        pin(args.client_cpus or f"0-{(os.cpu_count() or 1) - 1}")  # not the server's pinning
        n, wav, port = args.clients
        if args.browser or args.opus_bitrate:
            as_a_browser(args.opus_bitrate, follow_answer=args.browser)
        asyncio.run(clients(int(n), Path(wav), int(port)))
        return
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    pin(args.server_cpus)
    client_args = ["--client-cpus", args.client_cpus] if args.client_cpus else []
    if args.opus_bitrate:
        client_args += ["--opus-bitrate", str(args.opus_bitrate)]
    if args.browser:
        client_args += ["--browser"]
    result = run(args.loop, server(args.calls, args.seconds, client_args, args.speech))
    result["server_loop"] = args.loop
    result["client_opus_bitrate"] = args.opus_bitrate
    result["client_browser"] = args.browser  # libwebrtc's reply to the answer (``as_a_browser``)
    result["client_plays"] = args.speech.name if args.speech else "tone"
    print(json.dumps(result, indent=2))
    rate = f"-opus{args.opus_bitrate // 1000}k" if args.opus_bitrate else ""
    rate = rate or ("-browser" if args.browser else "")
    rate += "-speech" if args.speech else ""
    out = RESULTS / f"webrtc_calls-{result['machine']}-{args.calls}{rate}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
