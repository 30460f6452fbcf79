"""Load generator: N concurrent G.711 RTP callers against voxphone's server, end to end.

The server is voxphone's ``App`` (what ``voxphone serve`` runs: UDP ports, the event loop, the
call registry, the outbox, the HTTP server), started in this process with a null engine, so
what is measured is the transport and audio path — RTP parsing, jitter buffer, decode,
timeline, resampling, framing and the call's frame queue — not recognition. A separate process
plays N callers from one UDP socket each: real speech (flite), PCMU, 20 ms packets at real-time
pace, the callers' start times spread over ``--ramp`` seconds, with optional loss and jitter.

Reported (and written to ``benchmarks/results/load-<machine>-<N>.json``):

- ``calls_per_core``: N divided by the server's CPU time per wall second (user + system,
  ``getrusage``), over the window when every call is up: how many such calls one core carries.
- ``packet_latency_ms``: for one packet per call per second, from the caller's ``sendto`` to
  the return of the server's handler (kernel, event-loop queueing and handling; both processes
  read the same ``CLOCK_MONOTONIC``). p50/p99/max.
- ``loop_lag_ms``: how late a 10 ms sleep wakes on the server's loop.
- ``frames``: frames handed to the engine, frames dropped from full call queues, and the
  frames expected from the audio sent.
- ``sender_late_ms``: how far behind schedule the load process sent (p99): if it is large, the
  load process, not the server, could not keep up and the figures undercount.
- ``packets``: ``socket_drops``, the datagrams the kernel dropped from the server's full
  receive buffers (``RtpServer.totals``, from ``/proc/net/udp``), and how many of the sampled
  packets were never handled (a packet lost is not in ``packet_latency_ms``), and
  ``receive_buffer``: each port's ``SO_RCVBUF`` asked, granted, and the sysctl that caps it.
- ``keeping_up``: both of those p99s under 20 ms and no socket drop; if not,
  ``calls_per_core`` is no capacity.

    python benchmarks/load.py --calls 200 --seconds 30 [--loss 0.05 --jitter-ms 20] [--profile]
    python benchmarks/load.py --plot   # benchmarks/results/load-<machine>.png from the JSON files
    python benchmarks/load.py --calls 500 --stop-at call   # the same without the call's audio

``--stop-at call`` (the transport only) and ``--stop-at port`` (sockets and the event loop only)
cut the server's work short; the difference in CPU per packet between runs is what a layer
costs, measured under the same load instead of profiled.

Measuring needs only voxphone's own dependencies; ``--plot`` (a separate step) needs
matplotlib. On a shared machine the CPU figures move with the neighbours' load: the JSON
records ``os.getloadavg()`` before and after. On a quiet many-core machine, pin the two sides
apart so they never share a core (``calls_per_core`` comes from the server's own CPU time
either way):

    python benchmarks/load.py --calls 1000 --server-cpus 0 --load-cpus 1-3
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import heapq
import io
import json
import os
import pstats
import random
import resource
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import av
import numpy as np

from voxphone.app import App
from voxphone.audio.codecs import PCMU, Encoder
from voxphone.audio.files import read_audio
from voxphone.call import Call
from voxphone.config import Config
from voxphone.heap import collector_off_the_clock
from voxphone.testing import free_tcp_port
from voxphone.transports.rtp import RECEIVE_BUFFER_FULL, RtpPort

sys.path.insert(0, str(Path(__file__).parent))
from machine import cpu_model, machine_name, pin  # noqa: E402
from webrtc_calls import NullEngine, loop_lag  # noqa: E402

HOST = "127.0.0.1"
PACKET_S = 0.02
SAMPLE_EVERY = 50  # packets: one latency sample per call per second
TEXT = (
    "Hello, I am calling about my order. It was supposed to arrive on Tuesday and it has not "
    "come yet. Could you tell me where it is and when I can expect it? Thank you very much."
)


# -- the load process ---------------------------------------------------------------------------


#: What the callers can send: (RTP payload type, clock ticks per 20 ms packet). Opus uses the
#: dynamic type voxphone assumes without signalling (111, WebRTC's habit; 48 kHz clock).
CODECS = {"pcmu": (0, 160), "opus": (111, 960)}


def speech_payloads(
    codec: str = "pcmu", speech: Path | None = None, opus_bitrate: int | None = None
) -> list[bytes]:
    """Speech as 20 ms payloads (looped by the callers): PCMU, or mono Opus (libopus, 48 kHz).
    Opus is coded with libopus's defaults through FFmpeg (64 kbit/s VBR, ``audio`` mode: about
    94 kbit/s on this speech, as heavy as aiortc's 96 kbit/s ``voip`` stream) unless
    ``opus_bitrate`` is given, which codes at that rate in ``voip`` mode (libwebrtc, Chrome's
    WebRTC, sends mono Opus at 32 kbit/s). ``speech``: any audio file PyAV reads; else flite
    says ``TEXT`` (a machine without flite, such as the GPU host, is given a file)."""
    wav = speech
    if wav is None:
        wav = Path(tempfile.mkdtemp()) / "speech.wav"
        subprocess.run(["flite", "-voice", "rms", "-t", TEXT, "-o", str(wav)], check=True)
    if codec == "pcmu":
        pcm = read_audio(wav, 8000)
        enc = Encoder(PCMU)
        return [enc.encode(pcm[i : i + 160]) for i in range(0, pcm.size - 159, 160)]
    pcm = read_audio(wav, 48000)
    ctx = av.CodecContext.create("libopus", "w")
    assert isinstance(ctx, av.AudioCodecContext)
    ctx.sample_rate, ctx.layout, ctx.format = 48000, "mono", "s16"
    if opus_bitrate:
        ctx.bit_rate, ctx.options = opus_bitrate, {"application": "voip"}
    out = []
    for n, i in enumerate(range(0, pcm.size - 959, 960)):
        frame = av.AudioFrame.from_ndarray(pcm[i : i + 960].reshape(1, -1), "s16", "mono")
        frame.sample_rate, frame.pts = 48000, n * 960
        out += [bytes(p) for p in ctx.encode(frame)]
    return out


def rtp(seq: int, ts: int, ssrc: int, payload: bytes, pt: int = 0) -> bytes:
    """RFC 3550 header (version 2, PT 0 = PCMU unless told) + payload."""
    return struct.pack("!BBHII", 0x80, pt, seq & 0xFFFF, ts & 0xFFFFFFFF, ssrc) + payload


def send(args: argparse.Namespace) -> None:
    """Play ``args.calls`` callers at real-time pace; write send times of sampled packets.
    With ``--call-seconds`` each caller hangs up after that long and calls again from a new
    socket (a new source address and SSRC: a new call), so calls start and end all along."""
    # (not the server's pinning, which it inherited)
    pin(args.load_cpus or f"0-{(os.cpu_count() or 1) - 1}")
    payloads = speech_payloads(args.codec, args.speech, args.opus_bitrate)
    pt, ticks = CODECS[args.codec]
    rng = random.Random(args.seed)
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(args.calls)]
    for s in socks:
        s.bind((HOST, 0))
    dests = [(HOST, args.base_port + i % args.ports) for i in range(args.calls)]
    per_call = int(args.call_seconds / PACKET_S) if args.call_seconds else 0
    ssrcs = [1000 + i for i in range(args.calls)]
    n_packets = int(args.seconds / PACKET_S)
    t0 = time.monotonic() + 0.5
    starts = [t0 + args.ramp * i / args.calls for i in range(args.calls)]
    heap = [(starts[i], i, 0) for i in range(args.calls)]
    heapq.heapify(heap)
    sampled: list[tuple[int, int, float]] = []
    late: list[float] = []
    while heap:
        due, i, k = heap[0]
        now = time.monotonic()
        if due > now:
            time.sleep(min(due - now, 0.002))
            continue
        heapq.heappop(heap)
        if per_call and k and k % per_call == 0:  # hang up; call again from a new address
            socks[i].close()
            socks[i] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            socks[i].bind((HOST, 0))
            ssrcs[i] += args.calls
        kc = k % per_call if per_call else k
        if kc >= 2 and rng.random() < args.loss:  # (the first two pass probation)
            pass
        else:
            payload = payloads[k % len(payloads)]
            socks[i].sendto(rtp(k, k * ticks, ssrcs[i], payload, pt), dests[i])
            if k % SAMPLE_EVERY == 0:
                sampled.append((socks[i].getsockname()[1], k, time.monotonic()))
                late.append((now - due) * 1000)
        if k + 1 < n_packets:
            nominal = starts[i] + (k + 1) * PACKET_S
            heapq.heappush(heap, (nominal + rng.uniform(0, args.jitter_ms / 1000), i, k + 1))
    Path(args.sent).write_text(json.dumps({"sampled": sampled, "late_ms": late}))


# -- the server ---------------------------------------------------------------------------------


class Probe:
    """Wraps ``RtpPort.datagram_received`` to stamp when sampled packets were handled."""

    def __init__(self) -> None:
        self.handled: dict[tuple[int, int], float] = {}
        self.calls: list[Call] = []
        original = RtpPort.datagram_received
        handled = self.handled

        def stamped(port: RtpPort, data: bytes, addr: tuple[str | object, int]) -> None:
            original(port, data, addr)
            seq = (data[2] << 8) | data[3]
            if seq % SAMPLE_EVERY == 0:
                handled[(int(addr[1]), seq)] = time.monotonic()

        RtpPort.datagram_received = stamped  # type: ignore[method-assign,assignment]


def config(args: argparse.Namespace) -> Config:
    return Config.model_validate(
        {
            "http": {"port": free_tcp_port()},
            "rtp": {
                "ports": f"{args.base_port}-{args.base_port + args.ports - 1}",
                "inactivity_timeout_s": 1.0,
            },
            "asterisk": {"audiosocket_port": 0},
            "calls": {"max_concurrent": args.calls + 10},
            "webrtc": {"enabled": False},
            "outbox": {"path": str(Path(tempfile.mkdtemp()) / "outbox.db")},
        }
    )


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    a = np.asarray(values)
    return {
        "p50": round(float(np.percentile(a, 50)), 3),
        "p99": round(float(np.percentile(a, 99)), 3),
        "max": round(float(a.max()), 3),
        "n": len(values),
    }


def cpu_s() -> tuple[float, float]:
    """This process's (user, system) CPU seconds, all threads."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


#: ``--stop-at``: where the server's work is cut short, to see what each layer costs (the
#: difference in CPU per packet between two runs): ``port`` reads each datagram and drops it
#: (sockets and the event loop only), ``call`` stops at ``Call.push_packet`` (RTP parsing,
#: latching, sequence checks, the jitter buffer: no call audio), ``engine`` is the whole path.
STOPS = ("engine", "call", "port")


def stop_at(where: str) -> None:
    if where == "call":
        Call.push_packet = lambda *_a, **_kw: None  # type: ignore[method-assign]
    elif where == "port":
        RtpPort.handle = lambda *_a, **_kw: None  # type: ignore[method-assign]


async def serve(args: argparse.Namespace) -> dict[str, Any]:
    stop_at(args.stop_at)
    probe = Probe()
    app = App(config(args), engine=NullEngine())
    open_call = app.registry.open

    def keep(*a: Any, **kw: Any) -> Call | None:
        call = open_call(*a, **kw)
        if call is not None:
            probe.calls.append(call)
        return call

    app.registry.open = keep  # type: ignore[method-assign]
    await app.start()
    async with collector_off_the_clock():  # as voxphone serve does
        lag: list[tuple[float, float]] = []
        stop = asyncio.Event()
        lag_task = asyncio.create_task(loop_lag(lag, stop))
        sent = Path(tempfile.mkdtemp()) / "sent.json"
        cmd = [sys.executable, __file__, "--send", str(sent), *sys.argv[1:]]
        sender = await asyncio.create_subprocess_exec(*cmd)
        await asyncio.sleep(0.5 + args.ramp + 2.0)  # every call up and steady
        window = max(1.0, args.seconds - args.ramp - 4.0)
        profiler = cProfile.Profile() if args.profile else None
        if profiler is not None:
            profiler.enable()
        (user0, sys0), wall0, t_start = cpu_s(), time.perf_counter(), time.perf_counter()
        await asyncio.sleep(window)
        (user1, sys1), wall = cpu_s(), time.perf_counter() - wall0
        cpu = (user1 - user0, sys1 - sys0)
        if profiler is not None:
            profiler.disable()
        up = sum(c.end_reason is None for c in probe.calls)
        await sender.wait()
        await asyncio.sleep(2.5)  # inactivity ends the calls; their last frames reach the engine
        stop.set()
        await lag_task
    await app.stop()
    drops = app.rtp.totals().get(RECEIVE_BUFFER_FULL, 0)
    sent_log = json.loads(sent.read_text())
    out = report(args, probe, sent_log, cpu, wall, up, lag, t_start, profiler, drops)
    out["packets"]["receive_buffer"] = {
        "asked_bytes": app.rtp.receive_buffer_bytes,
        "granted_bytes": app.rtp.receive_buffer_granted,
        "rmem_max": rmem_max(),
    }
    return out


def rmem_max() -> int | None:
    """The sysctl ``net.core.rmem_max``: the most receive buffer a socket is granted (Linux)."""
    try:
        return int(Path("/proc/sys/net/core/rmem_max").read_text())
    except OSError:
        return None


def keeping_up(result: dict[str, Any]) -> bool:
    """Whether the run measured a server keeping pace: the load process sent on time, the
    server handled packets within 20 ms at p99 and the kernel dropped none of them. Otherwise
    ``calls_per_core`` is not a capacity."""
    lat, late = result["packet_latency_ms"], result["sender_late_ms"]
    drops = result["packets"]["socket_drops"]
    return bool(lat and late and lat["p99"] < 20 and late["p99"] < 20 and drops == 0)


def report(
    args: argparse.Namespace,
    probe: Probe,
    sent: dict[str, Any],
    cpu: tuple[float, float],
    wall: float,
    up: int,
    lag: list[tuple[float, float]],
    t_start: float,
    profiler: cProfile.Profile | None,
    socket_drops: int,
) -> dict[str, Any]:
    latency = [
        (probe.handled[(port, seq)] - t) * 1000
        for port, seq, t in sent["sampled"]
        if (port, seq) in probe.handled
    ]
    frames_sent = sum(c.frames_sent for c in probe.calls)
    dropped = sum(c.stats.dropped_frames for c in probe.calls)
    out: dict[str, Any] = {
        "calls": args.calls,
        "calls_up_during_window": up,
        "codec": codec_label(args),
        "seconds": args.seconds,
        "loss": args.loss,
        "jitter_ms": args.jitter_ms,
        "server_ports": args.ports,
        "engine": "null (transport + audio path only)",
        "stop_at": args.stop_at,
        "window_s": round(wall, 2),
        "server_cpus": args.server_cpus or "any",
        "load_cpus": args.load_cpus or "any",
        "server_cpu_cores": round(sum(cpu) / wall, 3),
        "server_cpu_user_system_s": [round(cpu[0], 2), round(cpu[1], 2)],
        "calls_per_core": round(args.calls / (sum(cpu) / wall)) if sum(cpu) else None,
        "packet_latency_ms": percentiles(latency),
        "loop_lag_ms": percentiles([ms for t, ms in lag if t >= t_start and t < t_start + wall]),
        "sender_late_ms": percentiles(sent["late_ms"]),
        "frames": {
            "to_engine": frames_sent,
            "dropped": dropped,
            "expected_approx": args.calls * int(args.seconds * 1000 / 80 * (1 - args.loss)),
        },
        "packets": {
            "socket_drops": socket_drops,
            "sampled": len(sent["sampled"]),
            "sampled_not_handled": len(sent["sampled"]) - len(latency),
        },
        "calls_seen": len(probe.calls),
    }
    out["keeping_up"] = keeping_up(out)
    if profiler is not None:
        buf = io.StringIO()
        pstats.Stats(profiler, stream=buf).sort_stats("tottime").print_stats(25)
        out["profile_top"] = buf.getvalue().splitlines()[:60]
    return out


def plot(machine: str) -> Path:
    """Server CPU and p99 packet latency against calls, per codec, from ``machine``'s runs of
    the whole path, calls spread over the default ports, without loss, jitter or profiling."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_codec: dict[str, list[dict[str, Any]]] = {}
    for f in Path("benchmarks/results").glob(f"load-{machine}-*.json"):
        r = json.loads(f.read_text())
        whole = r.get("stop_at", "engine") == "engine" and r["server_ports"] < r["calls"]
        if whole and not r["loss"] and not r["jitter_ms"] and "profile_top" not in r:
            by_codec.setdefault(r["codec"], []).append(r)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.5))
    loads: list[float] = []
    any_run = next(iter(by_codec.values()))[0]
    cpu, pinned = any_run.get("cpu", "?"), any_run["server_cpus"]
    for codec, runs in sorted(by_codec.items()):
        runs.sort(key=lambda r: r["calls"])
        calls = [r["calls"] for r in runs]
        a.plot(calls, [r["server_cpu_cores"] for r in runs], "o-", label=codec)
        for r in runs:
            a.annotate(f"{r['calls_per_core']}/core", (r["calls"], r["server_cpu_cores"]),
                       fontsize=7, textcoords="offset points", xytext=(3, -10))  # fmt: skip
        b.semilogy(
            calls, [r["packet_latency_ms"]["p99"] for r in runs], "o-", label=f"{codec} handled"
        )
        b.semilogy(
            calls, [r["sender_late_ms"]["p99"] for r in runs], "x--", label=f"{codec} sender late"
        )
        loads += [r["loadavg_before"][0] for r in runs]
    a.set_xlabel("concurrent RTP calls")
    a.set_ylabel("server CPU (cores)")
    a.legend()
    a.grid(alpha=0.3)
    b.axhline(1.0, color="gray", linestyle=":", label="goal: p99 1 ms")
    b.set_xlabel("concurrent RTP calls")
    b.set_ylabel("p99 (ms): sendto→handled, and how late the sender was")
    b.legend(fontsize=8)
    b.grid(alpha=0.3)
    fig.suptitle(
        f"voxphone RTP load, null engine — {machine} ({cpu}), server on CPU {pinned} "
        f"(load average before the runs: {min(loads):.1f}–{max(loads):.1f})",
        fontsize=10,
    )
    fig.tight_layout()
    out = Path(f"benchmarks/results/load-{machine}.png")
    fig.savefig(out, dpi=100)
    return out


def codec_label(args: argparse.Namespace) -> str:
    """What the callers sent, e.g. ``PCMU 20 ms`` or ``Opus mono 20 ms, 32 kbit/s voip``."""
    if args.codec == "pcmu":
        return "PCMU 20 ms"
    rate = f", {args.opus_bitrate // 1000} kbit/s voip" if args.opus_bitrate else ""
    return f"Opus mono 20 ms{rate}"


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=100)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--codec", choices=sorted(CODECS), default="pcmu")
    p.add_argument("--ramp", type=float, default=3.0, help="spread call starts over (s)")
    p.add_argument("--loss", type=float, default=0.0, help="packet loss probability")
    p.add_argument("--jitter-ms", type=float, default=0.0, help="uniform send delay, 0..ms")
    p.add_argument("--ports", type=int, default=4, help="server UDP ports the calls spread over")
    p.add_argument("--base-port", type=int, default=39800, help="first server UDP port")
    p.add_argument("--call-seconds", type=float, default=0, help="redial after (s); 0: never")
    p.add_argument("--server-cpus", default=None, help="pin the server, e.g. 0 or 0-1")
    p.add_argument("--load-cpus", default=None, help="pin the load process, e.g. 1-3")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--opus-bitrate", type=int, default=None, help="bit/s, voip mode (Opus)")
    p.add_argument("--speech", type=Path, default=None, help="audio file to play; default: flite")
    p.add_argument("--profile", action="store_true", help="cProfile the server's window")
    p.add_argument("--stop-at", choices=STOPS, default="engine", help="cut the path short there")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--plot", action="store_true", help="plot this machine's results and exit")
    p.add_argument("--machine", default=None, help="with --plot: another machine's results")
    p.add_argument("--send", dest="sent", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main() -> None:
    args = parse(sys.argv[1:])
    machine = machine_name()
    if args.sent is not None:
        send(args)
        return
    if args.plot:
        print(plot(args.machine or machine))
        return
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    pin(args.server_cpus)
    load_before = os.getloadavg()
    result = asyncio.run(serve(args))
    result = {"machine": machine, "cpu": cpu_model(), "loadavg_before": load_before, **result}
    result["loadavg_after"] = os.getloadavg()
    print(json.dumps({k: v for k, v in result.items() if k != "profile_top"}, indent=2))
    for line in result.get("profile_top", []):
        print(line)
    rate = f"{args.opus_bitrate // 1000}k" if args.opus_bitrate else ""
    kind = "" if args.codec == "pcmu" else f"{args.codec}{rate}-"
    stop = "" if args.stop_at == "engine" else f"-stop-at-{args.stop_at}"
    out = args.out or Path(f"benchmarks/results/load-{machine}-{kind}{args.calls}{stop}.json")
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
