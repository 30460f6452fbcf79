"""Load generator: N concurrent callers against voxphone's server, end to end, as RTP or as
Twilio Media Streams.

The server is voxphone's ``App`` (what ``voxphone serve`` runs: UDP ports, the event loop, the
call registry, the outbox, the HTTP server), started in this process with a null engine, so
what is measured is the transport and audio path — RTP parsing (or the websocket and its JSON),
jitter buffer, decode, timeline, resampling, framing and the call's frame queue — not
recognition. A separate process plays N callers: real speech (flite, or ``--speech``), 20 ms
packets at real-time pace, the callers' start times spread over ``--ramp`` seconds, with
optional loss and jitter.

- ``--transport rtp`` (the default): one UDP socket per caller, PCMU, PCMA or Opus
  (``--codec``) to ``--ports`` server ports.
- ``--transport twilio``: one websocket per caller to ``/v1/media/twilio``, as Twilio Media
  Streams sends (``connected``, ``start``, then a ``media`` message of base64 µ-law every 20 ms
  with its ``sequenceNumber``, ``chunk`` and ``timestamp``; ``stop`` at the end). A websocket
  runs over TCP, which loses nothing: ``--loss`` leaves messages out (a gap in the stream, as a
  provider's own loss would be), and ``--jitter-ms`` delays them, each waiting for the one before
  it as TCP makes it. Load processes of ``TWILIO_CALLS_PER_PROCESS`` callers each.

``--server pipecat`` (Twilio streams only) plays the same callers to Pipecat's Twilio server
instead (``pipecat_server.py``: FastAPI and uvicorn, its websocket transport and
``TwilioFrameSerializer``, a pipeline with a sink after the transport), in the same process and
event loop, measured the same way: the peer's calls per core on the same input.

Reported (and written to ``benchmarks/results/load-<machine>-<N>.json``):

- ``calls_per_core``: N divided by the server's CPU time per wall second (user + system,
  ``getrusage``), over the window when every call is up: how many such calls one core carries.
- ``packet_latency_ms``: for one packet per call per second sent in that window, from the
  caller's ``sendto`` (or websocket send) to the return of the server's handler (kernel,
  event-loop queueing and handling; both processes read the same ``CLOCK_MONOTONIC``).
  p50/p99/max. ``packet_latency_ms_whole_run``: the same for every sampled packet, also while
  the calls start and end — all of them within ``--ramp`` seconds, a hundred or more a second,
  far more at once than a server with that many calls up sees (calls of a few minutes each
  come and go a few a second), so the steady state is what the window measures.
- ``loop_lag_ms``: how late a 10 ms sleep wakes on the server's loop.
- ``steal_pct``: of the window's CPU time, the share the hypervisor gave to other guests
  (``/proc/stat``), on the server's CPUs (``server_cpus_pct``, when pinned) and the whole host
  (``host_pct``). On a shared virtual machine, steal makes the loop late in bursts of seconds
  that no profile of the server explains: a run with steal measured its neighbours too.
- ``frames``: frames handed to the engine, frames dropped from full call queues, and the
  frames expected from the audio sent.
- ``sender_late_ms``: how far behind schedule the load process sent in the window (p99): if it
  is large, the load process, not the server, could not keep up and the figures undercount
  (``sender_late_ms_whole_run``: over the whole run).
- ``packets``: ``socket_drops``, the datagrams the kernel dropped from the server's full
  receive buffers (``RtpServer.totals``, from ``/proc/net/udp``), and how many of the sampled
  packets were never handled (a packet lost is not in ``packet_latency_ms``), and
  ``receive_buffer``: each port's ``SO_RCVBUF`` asked, granted, and the sysctl that caps it.
- ``keeping_up``: both of those p99s under 20 ms and no socket drop; if not,
  ``calls_per_core`` is no capacity.

    python benchmarks/load.py --calls 200 --seconds 30 [--loss 0.05 --jitter-ms 20] [--profile]
    python benchmarks/load.py --calls 200 --transport twilio
    /tmp/pc/bin/python benchmarks/load.py --calls 200 --transport twilio --server pipecat
    python benchmarks/load.py --plot   # benchmarks/results/load-<machine>.png from the JSON files
    python benchmarks/load.py --plot-runs benchmarks/results/port-reader   # an A/B's runs
    python benchmarks/load.py --calls 500 --stop-at call   # the same without the call's audio

``--stop-at call`` (the transport only) and, for RTP, ``--stop-at port`` (sockets and the event
loop only) cut the server's work short; the difference in CPU per packet between runs is what a
layer costs, measured under the same load instead of profiled.

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
import base64
import cProfile
import heapq
import importlib.util
import io
import json
import os
import platform
import pstats
import random
import resource
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import av
import numpy as np

from voxphone.app import App
from voxphone.audio.codecs import PCMA, PCMU, Encoder
from voxphone.audio.files import read_audio
from voxphone.call import Call
from voxphone.config import Config
from voxphone.event_loop import LOOPS, run
from voxphone.heap import collector_off_the_clock
from voxphone.testing import free_tcp_port
from voxphone.transports.mediastream import JsonStreamSession
from voxphone.transports.rtp import RECEIVE_BUFFER_FULL, RtpPort
from voxphone.transports.sdp import OPUS_MAX_PLAYBACK_RATE

sys.path.insert(0, str(Path(__file__).parent))
from machine import cpu_list, cpu_model, machine_name, pin, steal_jiffies, steal_pct  # noqa: E402
from pipecat_server import PATH as PIPECAT_PATH  # noqa: E402
from pipecat_server import PipecatServer, instrument  # noqa: E402
from webrtc_calls import NullEngine, libwebrtc_opus, loop_lag  # noqa: E402

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
CODECS = {"pcmu": (0, 160), "pcma": (8, 160), "opus": (111, 960)}
#: How the callers reach the server (``--transport``): RTP, or Twilio Media Streams (µ-law).
TRANSPORTS = ("rtp", "twilio")
#: Whose server the callers call (``--server``): voxphone's ``App``, or Pipecat's Twilio server.
SERVERS = ("voxphone", "pipecat")
#: What ``--server pipecat`` imports (not voxphone dependencies): module → its package on PyPI.
PIPECAT_NEEDS = {"pipecat": "pipecat-ai", "fastapi": "fastapi", "uvicorn": "uvicorn"}
#: Twilio callers per load process: aiohttp's websocket client costs ≈ 20 µs a message, so one
#: process would fall behind before the server does.
TWILIO_CALLS_PER_PROCESS = 200
#: Seconds the Twilio load processes have to start, load the speech and connect their callers
#: before their one shared schedule begins (a late one shows in ``sender_late_ms``).
TWILIO_START_S = 5.0


def speech_payloads(
    codec: str = "pcmu",
    speech: Path | None = None,
    opus_bitrate: int | None = None,
    opus_answered: bool = False,
) -> list[bytes]:
    """Speech as 20 ms payloads (looped by the callers): PCMU, PCMA, or mono Opus (libopus,
    48 kHz).
    Opus is coded with libopus's defaults through FFmpeg (64 kbit/s VBR, ``audio`` mode: about
    94 kbit/s on this speech, as heavy as aiortc's 96 kbit/s ``voip`` stream) unless
    ``opus_bitrate`` is given, which codes at that rate in ``voip`` mode (libwebrtc, Chrome's
    WebRTC, sends mono Opus at 32 kbit/s). With ``opus_answered``, as a peer that honours
    voxphone's SDP answer codes it (``sdp.OPUS_MAX_PLAYBACK_RATE``, RFC 7587 §6.1):
    its bandwidth capped to match and libwebrtc's default rate for it (``libwebrtc_opus``:
    wideband at 20 kbit/s), ``opus_bitrate`` if given. ``speech``: any audio file PyAV reads;
    else flite says ``TEXT`` (a machine without flite, such as the GPU host, is given a file)."""
    wav = speech
    if wav is None:
        wav = Path(tempfile.mkdtemp()) / "speech.wav"
        subprocess.run(["flite", "-voice", "rms", "-t", TEXT, "-o", str(wav)], check=True)
    if codec != "opus":
        pcm = read_audio(wav, 8000)
        enc = Encoder(PCMU if codec == "pcmu" else PCMA)
        return [enc.encode(pcm[i : i + 160]) for i in range(0, pcm.size - 159, 160)]
    pcm = read_audio(wav, 48000)
    ctx = av.CodecContext.create("libopus", "w")
    assert isinstance(ctx, av.AudioCodecContext)
    ctx.sample_rate, ctx.layout, ctx.format = 48000, "mono", "s16"
    if opus_answered:
        default_rate, cutoff = libwebrtc_opus(OPUS_MAX_PLAYBACK_RATE)
        ctx.bit_rate = opus_bitrate or default_rate
        ctx.options = {"application": "voip", "cutoff": str(cutoff)}
    elif opus_bitrate:
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


def start_offsets(args: argparse.Namespace) -> list[float]:
    """Each caller's start (s after ``t0``). ``--starts random`` (the default): drawn uniformly
    over ``--ramp`` from ``--seed``, the same in every load process, as independent callers
    start; so their 20 ms packets fall due at independent moments (phases). ``--starts grid``:
    ``i / calls`` of the ramp, which puts the callers on a few phases: 1,000 calls over 3 s
    start 3 ms apart, so their packets fall due 50 at once every millisecond (and 200 calls,
    15 ms apart, 50 at once every 5 ms) — bursts that independent callers do not make, but a
    gateway that sends every call's packets on one shared 20 ms tick makes larger still."""
    if args.starts == "grid":
        return [args.ramp * i / args.calls for i in range(args.calls)]
    draw = random.Random(f"starts-{args.seed}")
    return [draw.uniform(0, args.ramp) for _ in range(args.calls)]


def paced(
    args: argparse.Namespace, callers: range, rng: random.Random, t0: float | None = None
) -> Iterator[float | tuple[int, int, float]]:
    """The ``callers``' packets in the order they fall due, at real-time pace: yields how long
    to wait (s) until the next is due, or (caller, packet number, how late it is in ms) when
    one is due. Caller ``i`` starts at ``t0`` (``CLOCK_MONOTONIC``; default: in 0.5 s) plus
    ``start_offsets(args)[i]``; each packet is due 20 ms after the last one's nominal
    time plus up to ``--jitter-ms`` (drawn from ``rng`` once the packet before is handed out),
    and not before the packet before it: a caller's packets never overtake one another, and a
    packet held behind a delayed one is not counted late (only the sender's own lag is)."""
    n_packets = round(args.seconds / PACKET_S)
    t0 = time.monotonic() + 0.5 if t0 is None else t0
    offsets = start_offsets(args)
    starts = {i: t0 + offsets[i] for i in callers}
    heap = [(starts[i], i, 0) for i in callers]
    heapq.heapify(heap)
    while heap:
        due, i, k = heap[0]
        now = time.monotonic()
        if due > now:
            yield min(due - now, 0.002)
            continue
        heapq.heappop(heap)
        yield i, k, (now - due) * 1000
        if k + 1 < n_packets:
            nominal = starts[i] + (k + 1) * PACKET_S
            jittered = nominal + rng.uniform(0, args.jitter_ms / 1000)
            heapq.heappush(heap, (max(jittered, due), i, k + 1))


def send(args: argparse.Namespace) -> None:
    """Play ``args.calls`` RTP callers at real-time pace; write send times of sampled packets.
    With ``--call-seconds`` each caller hangs up after that long and calls again from a new
    socket (a new source address and SSRC: a new call), so calls start and end all along."""
    # (not the server's pinning, which it inherited)
    pin(args.load_cpus or f"0-{(os.cpu_count() or 1) - 1}")
    payloads = speech_payloads(args.codec, args.speech, args.opus_bitrate, args.opus_answered)
    pt, ticks = CODECS[args.codec]
    rng = random.Random(args.seed)
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(args.calls)]
    for s in socks:
        s.bind((HOST, 0))
    dests = [(HOST, args.base_port + i % args.ports) for i in range(args.calls)]
    per_call = int(args.call_seconds / PACKET_S) if args.call_seconds else 0
    ssrcs = [1000 + i for i in range(args.calls)]
    sampled: list[tuple[int, int, float]] = []
    late: list[float] = []
    for event in paced(args, range(args.calls), rng):
        if isinstance(event, float):
            time.sleep(event)
            continue
        i, k, late_ms = event
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
                late.append(late_ms)
    Path(args.sent).write_text(json.dumps({"sampled": sampled, "late_ms": late}))


def call_sid(i: int) -> str:
    """Twilio's ``callSid`` of caller ``i``: the call's id on the server, so ``Probe`` can tell
    the callers apart."""
    return f"CA{i:032x}"


def stream_sid(i: int) -> str:
    """Twilio's ``streamSid`` of caller ``i``."""
    return f"MZ{i:032x}"


def twilio_text(event: str, i: int, body: dict[str, Any], sequence: int) -> str:
    """One Twilio Media Streams message (the shapes of Twilio's "WebSocket Messages" page)."""
    return json.dumps(
        {"event": event, "sequenceNumber": str(sequence), "streamSid": stream_sid(i), event: body}
    )


async def send_twilio(
    args: argparse.Namespace, callers: range, rng: random.Random, t0: float | None
) -> dict[str, Any]:
    """Play ``callers`` as Twilio Media Streams at real-time pace from ``t0`` (``paced``), one
    websocket each; return the send times of sampled messages (keyed by the call's ``callSid``
    and the message's place in its stream, which TCP keeps)."""
    payloads = [base64.b64encode(p).decode() for p in speech_payloads("pcmu", args.speech)]
    path = "/v1/media/twilio" if args.server == "voxphone" else PIPECAT_PATH
    url = f"http://{HOST}:{args.http_port}{path}"
    fmt = {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}
    sampled: list[tuple[str, int, float]] = []
    late: list[float] = []
    # Without ``limit=0`` aiohttp holds the 101st websocket back until one of 100 closes.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        sockets = {i: await http.ws_connect(url, autoping=False) for i in callers}
        sent = dict.fromkeys(callers, 2)  # text messages sent on each: ``connected``, ``start``
        for i, ws in sockets.items():
            await ws.send_str(json.dumps({"event": "connected", "protocol": "Call"}))
            start = {"accountSid": "AC0", "streamSid": stream_sid(i), "callSid": call_sid(i),
                     "tracks": ["inbound"], "customParameters": {}, "mediaFormat": fmt}  # fmt: skip
            await ws.send_str(twilio_text("start", i, start, 1))
        for event in paced(args, callers, rng, t0):
            if isinstance(event, float):
                await asyncio.sleep(event)
                continue
            i, k, late_ms = event
            if k >= 2 and rng.random() < args.loss:  # (as the RTP callers lose packets)
                continue
            media = {"track": "inbound", "chunk": str(k + 1), "timestamp": str(k * 20),
                     "payload": payloads[k % len(payloads)]}  # fmt: skip
            await sockets[i].send_str(twilio_text("media", i, media, k + 2))
            n = sent[i] = sent[i] + 1
            if n % SAMPLE_EVERY == 0:
                sampled.append((call_sid(i), n, time.monotonic()))
                late.append(late_ms)
        for i, ws in sockets.items():
            await ws.send_str(twilio_text("stop", i, {"callSid": call_sid(i)}, sent[i] + 1))
            await ws.close()
    return {"sampled": sampled, "late_ms": late}


# -- the server ---------------------------------------------------------------------------------


class Probe:
    """Stamps when sampled packets were handled: wraps ``RtpPort.handle`` (keyed by
    the caller's port and the RTP sequence number) or, for Twilio, ``JsonStreamSession``'s
    ``take_media`` and ``handle`` (keyed by the ``callSid`` and the message's place in its
    stream; for Pipecat, its serializer's ``deserialize``: ``pipecat_server.instrument``)."""

    def __init__(self, transport: str, server: str = "voxphone", calls_open: bool = True) -> None:
        self.handled: dict[tuple[int | str, int], float] = {}
        self.calls_open = calls_open  # (``--stop-at port`` opens none)
        self.calls: list[Any] = []  # voxphone's ``Call``s (or ``pipecat_server.PeerCall``s)
        self.fed: dict[Any, int] = {}  # Twilio: text messages fed per stream
        handled, fed = self.handled, self.fed
        if server == "pipecat":
            instrument(handled, fed, SAMPLE_EVERY)
            return
        if transport == "twilio":
            # A message is handled by ``take_media`` (media, as aiohttp reads it) or, where that
            # declines, by ``handle`` (``feed``'s general path): each is counted once.
            take, handle = JsonStreamSession.take_media, JsonStreamSession.handle

            def count(session: JsonStreamSession) -> None:
                n = fed[session] = fed.get(session, 0) + 1
                if n % SAMPLE_EVERY == 0 and session.call is not None:
                    handled[(session.call.call_id, n)] = time.monotonic()

            def taken(session: JsonStreamSession, text: str) -> bool:
                if not take(session, text):
                    return False
                count(session)
                return True

            def handled_in_full(session: JsonStreamSession, message: Any) -> None:
                handle(session, message)
                count(session)

            JsonStreamSession.take_media = taken  # type: ignore[method-assign]
            JsonStreamSession.handle = handled_in_full  # type: ignore[method-assign]
            return
        original = RtpPort.handle

        def stamped(port: RtpPort, data: bytes, addr: tuple[str, int]) -> None:
            original(port, data, addr)
            seq = (data[2] << 8) | data[3]
            if seq % SAMPLE_EVERY == 0:
                handled[(addr[1], seq)] = time.monotonic()

        RtpPort.handle = stamped  # type: ignore[method-assign]

    def streaming(self, calls: int) -> bool:
        """Whether ``calls`` callers have sent audio: an RTP call opens at its first packet, a
        Twilio one at ``start``, before its media (``connected`` and ``start`` are two)."""
        if self.fed:
            return sum(n > 2 for n in self.fed.values()) >= calls
        if not self.calls_open:  # ``--stop-at port``: each caller's first packet is sampled
            return len({caller for caller, _ in self.handled}) >= calls
        return len(self.calls) >= calls


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
    if args.server == "pipecat":
        return await serve_pipecat(args)
    stop_at(args.stop_at)
    probe = Probe(args.transport, calls_open=args.stop_at != "port")
    app = App(config(args), engine=NullEngine())
    open_call = app.registry.open

    def keep(*a: Any, **kw: Any) -> Call | None:
        call = open_call(*a, **kw)
        if call is not None:
            probe.calls.append(call)
        return call

    app.registry.open = keep  # type: ignore[method-assign]
    await app.start()
    try:
        async with collector_off_the_clock():  # as voxphone serve does
            measured, sent = await play(args, probe, app.config.http.port)
    finally:
        await app.stop()
    drops = app.rtp.totals().get(RECEIVE_BUFFER_FULL, 0)
    out = report(args, probe, sent, socket_drops=drops, **measured)
    out["packets"]["receive_buffer"] = {
        "asked_bytes": app.rtp.receive_buffer_bytes,
        "granted_bytes": app.rtp.receive_buffer_granted,
        "rmem_max": rmem_max(),
    }
    return out


async def serve_pipecat(args: argparse.Namespace) -> dict[str, Any]:
    """``serve`` for Pipecat's Twilio server (``pipecat_server.py``) in place of voxphone's."""
    probe = Probe(args.transport, "pipecat")
    server = PipecatServer(free_tcp_port(), probe.fed)
    probe.calls = server.calls
    await server.start()
    try:
        measured, sent = await play(args, probe, server.port)
    finally:
        await server.stop()
    out = report(args, probe, sent, socket_drops=0, **measured)
    out["engine"] = "none: a sink after Pipecat's transport (its frames counted)"
    out["server_software"] = server.software
    return out


async def play(
    args: argparse.Namespace, probe: Probe, http_port: int
) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """Start the load processes against the server on ``http_port``, ``measure`` while they
    play, and gather what they sent (``report``'s ``sent``)."""
    logs = Path(tempfile.mkdtemp())
    procs, t0 = 1, []
    if args.transport == "twilio":  # several processes, one schedule
        procs = -(-args.calls // TWILIO_CALLS_PER_PROCESS)
        t0 = ["--t0", str(time.monotonic() + TWILIO_START_S)]
    senders = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--send",
            str(logs / f"sent-{k}.json"),
            "--share",
            f"{k}/{procs}",
            "--http-port",
            str(http_port),
            *t0,
            *sys.argv[1:],
        )
        for k in range(procs)
    ]
    try:
        measured = await measure(args, probe, senders)
    finally:
        for sender in senders:
            if sender.returncode is None:
                sender.kill()
    sent: dict[str, list[Any]] = {"sampled": [], "late_ms": []}
    for k in range(procs):
        for key, values in json.loads((logs / f"sent-{k}.json").read_text()).items():
            sent[key] += values
    return measured, sent


async def measure(
    args: argparse.Namespace, probe: Probe, senders: list[asyncio.subprocess.Process]
) -> dict[str, Any]:
    """While ``senders`` play the calls: the server's CPU over the window when every call is
    up (and a profile, if asked) and the loop's lag, then the wait for the calls to end; as
    ``report``'s keyword arguments. Raises ``SystemExit`` when a load process fails or does
    not finish."""
    lag: list[tuple[float, float]] = []
    stop = asyncio.Event()
    lag_task = asyncio.create_task(loop_lag(lag, stop))
    try:
        deadline = time.monotonic() + 60 + args.ramp
        while not probe.streaming(args.calls) and time.monotonic() < deadline:  # noqa: ASYNC110
            if any(sender.returncode not in (None, 0) for sender in senders):
                break  # (said below)
            await asyncio.sleep(0.1)
        await asyncio.sleep(2.0)  # every call up and steady
        window = max(1.0, args.seconds - args.ramp - 4.0)
        profiler = cProfile.Profile() if args.profile else None
        if profiler is not None:
            profiler.enable()
        server_cpus = cpu_list(args.server_cpus) if args.server_cpus else None
        steal0 = steal_jiffies(server_cpus), steal_jiffies()
        (user0, sys0), wall0, t_start = cpu_s(), time.perf_counter(), time.perf_counter()
        sent_from = time.monotonic()  # (the load processes' clock)
        await asyncio.sleep(window)
        (user1, sys1), wall = cpu_s(), time.perf_counter() - wall0
        steal1 = steal_jiffies(server_cpus), steal_jiffies()
        if profiler is not None:
            profiler.disable()
        up = sum(c.end_reason is None for c in probe.calls)
        for k, sender in enumerate(senders):
            try:  # (each has ``--ramp`` and its last packets left to send)
                code = await asyncio.wait_for(sender.wait(), args.ramp + 30)
            except TimeoutError:
                raise SystemExit(f"load.py: load process {k} did not finish its calls") from None
            if code:
                raise SystemExit(f"load.py: load process {k} failed (exit {code}): see above")
        await asyncio.sleep(2.5)  # inactivity ends the calls; their last frames reach the engine
    finally:
        stop.set()
        await lag_task
    return {
        "cpu": (user1 - user0, sys1 - sys0), "wall": wall, "up": up, "lag": lag,
        "t_start": t_start, "sent_in": (sent_from, sent_from + wall), "profiler": profiler,
        "steal": {"server_cpus_pct": steal_pct(steal0[0], steal1[0]) if server_cpus else None,
                  "host_pct": steal_pct(steal0[1], steal1[1])},
    }  # fmt: skip


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
    *,
    cpu: tuple[float, float],
    wall: float,
    up: int,
    lag: list[tuple[float, float]],
    t_start: float,
    sent_in: tuple[float, float],
    profiler: cProfile.Profile | None,
    socket_drops: int,
    steal: dict[str, float | None],
) -> dict[str, Any]:
    # (when sent, ms until handled or None, ms the sender was late) per sampled packet
    samples = [
        (t, (probe.handled[(caller, n)] - t) * 1000 if (caller, n) in probe.handled else None, ms)
        for (caller, n, t), ms in zip(sent["sampled"], sent["late_ms"], strict=True)
    ]
    steady = [sample for sample in samples if sent_in[0] <= sample[0] < sent_in[1]]
    latency = [ms for _, ms, _ in samples if ms is not None]
    frames_sent = sum(c.frames_sent for c in probe.calls)
    dropped = sum(c.stats.dropped_frames for c in probe.calls)
    out: dict[str, Any] = {
        "calls": args.calls,
        "calls_up_during_window": up,
        "server": args.server,
        "transport": args.transport,
        "codec": codec_label(args),
        "seconds": args.seconds,
        "loss": args.loss,
        "jitter_ms": args.jitter_ms,
        "starts": f"{args.starts} over {args.ramp} s",
        "server_ports": args.ports if args.transport == "rtp" else None,
        "engine": "null (transport + audio path only)",
        "stop_at": args.stop_at,
        "window_s": round(wall, 2),
        "server_cpus": args.server_cpus or "any",
        "load_cpus": args.load_cpus or "any",
        "server_cpu_cores": round(sum(cpu) / wall, 3),
        "server_cpu_user_system_s": [round(cpu[0], 2), round(cpu[1], 2)],
        "calls_per_core": round(args.calls / (sum(cpu) / wall)) if sum(cpu) else None,
        "packet_latency_ms": percentiles([ms for _, ms, _ in steady if ms is not None]),
        "packet_latency_ms_whole_run": percentiles(latency),
        "loop_lag_ms": percentiles([ms for t, ms in lag if t >= t_start and t < t_start + wall]),
        "steal_pct": steal,
        "sender_late_ms": percentiles([late for *_, late in steady]),
        "sender_late_ms_whole_run": percentiles([late for *_, late in samples]),
        "frames": {
            "to_engine": frames_sent,
            "dropped": dropped,
            # (a lost packet is silence on the call's timeline: it makes frames all the same)
            "expected_approx": args.calls * int(args.seconds * 1000 / 80),
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
        spread = r.get("transport", "rtp") != "rtp" or r["server_ports"] < r["calls"]
        whole = r.get("stop_at", "engine") == "engine" and spread
        whole = whole and r.get("server", "voxphone") == "voxphone"  # (not Pipecat's)
        if whole and not r["loss"] and not r["jitter_ms"] and "profile_top" not in r:
            by_codec.setdefault(r["codec"], []).append(r)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 6))
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
    a.set_xlabel("concurrent calls")
    a.set_ylabel("server CPU (cores)")
    a.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
    a.grid(alpha=0.3)
    b.axhline(1.0, color="gray", linestyle=":", label="goal: p99 1 ms")
    b.set_xlabel("concurrent calls")
    b.set_ylabel("p99 (ms): sendto→handled, and how late the sender was")
    b.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
    b.grid(alpha=0.3)
    fig.suptitle(
        f"voxphone load (RTP, Twilio streams), null engine — {machine} ({cpu}), server on CPU "
        f"{pinned} (load average before the runs: {min(loads):.1f}–{max(loads):.1f})",
        fontsize=10,
    )
    fig.tight_layout()
    out = Path(f"benchmarks/results/load-{machine}.png")
    fig.savefig(out, dpi=100)
    return out


def plot_runs(folder: Path) -> Path:
    """Runs side by side (an A/B): server CPU per packet and p99 from send to handled for
    each JSON in ``folder``, grouped by name less the machine and the run number
    (``load-<machine>-…-before-3.json`` is run 3 of ``…-before``), one point per run; written
    to ``folder/runs-<machine>.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[dict[str, Any]]] = {}
    for f in sorted(folder.glob("load-*.json")):
        run = json.loads(f.read_text())
        label = f.stem.removeprefix(f"load-{run['machine']}-").rsplit("-", 1)[0]
        groups.setdefault(label, []).append(run)
    if not groups:
        raise SystemExit(f"load.py: no load-*.json in {folder}")
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 5))
    for x, runs in enumerate(groups.values()):
        us = [r["server_cpu_cores"] * 1e6 / (r["calls"] * 50) for r in runs]
        p99 = [r["packet_latency_ms"]["p99"] or float("nan") for r in runs]
        colour = plt.get_cmap("tab20")(x % 20)  # the default cycle repeats after ten groups
        a.plot([x] * len(us), us, "o", alpha=0.7, color=colour)
        b.semilogy([x] * len(p99), p99, "o", alpha=0.7, color=colour)
    for ax in (a, b):
        ax.set_xticks(range(len(groups)), list(groups), rotation=20, fontsize=7, ha="right")
        ax.grid(alpha=0.3)
    a.set_ylabel("server CPU per packet (µs)")
    b.set_ylabel("p99 from send to handled, steady state (ms)")
    b.axhline(1.0, color="gray", linestyle=":")
    first = next(iter(groups.values()))[0]
    fig.suptitle(
        f"{folder.name}: {first['machine']} ({first.get('cpu', '?')}), Python "
        f"{first.get('python', '?')}, server on CPU {first['server_cpus']}",
        fontsize=10,
    )
    fig.tight_layout()
    out = folder / f"runs-{first['machine']}.png"
    fig.savefig(out, dpi=100)
    return out


def codec_label(args: argparse.Namespace) -> str:
    """What the callers sent, e.g. ``PCMU 20 ms``, ``Opus mono 20 ms, 32 kbit/s voip`` or
    ``Twilio µ-law 20 ms``."""
    if args.transport == "twilio":
        return "Twilio µ-law 20 ms"
    if args.codec != "opus":
        return f"{args.codec.upper()} 20 ms"
    if args.opus_answered:
        bit_rate, cutoff = libwebrtc_opus(OPUS_MAX_PLAYBACK_RATE)
        rate = args.opus_bitrate or bit_rate
        return f"Opus mono 20 ms, {rate // 1000} kbit/s voip, {cutoff // 1000} kHz band (answered)"
    rate = f", {args.opus_bitrate // 1000} kbit/s voip" if args.opus_bitrate else ""
    return f"Opus mono 20 ms{rate}"


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=100)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--transport", choices=TRANSPORTS, default="rtp", help="RTP, or Twilio's")
    p.add_argument("--server", choices=SERVERS, default="voxphone", help="Pipecat: Twilio only")
    p.add_argument("--codec", choices=sorted(CODECS), default="pcmu", help="RTP's")
    p.add_argument("--ramp", type=float, default=3.0, help="spread call starts over (s)")
    p.add_argument(
        "--starts", choices=("random", "grid"), default="random", help="call starts in the ramp"
    )
    p.add_argument("--loss", type=float, default=0.0, help="packet loss probability")
    p.add_argument("--jitter-ms", type=float, default=0.0, help="uniform send delay, 0..ms")
    p.add_argument("--ports", type=int, default=4, help="server UDP ports the calls spread over")
    p.add_argument("--base-port", type=int, default=39800, help="first server UDP port")
    p.add_argument("--call-seconds", type=float, default=0, help="redial after (s); 0: never")
    p.add_argument("--server-cpus", default=None, help="pin the server, e.g. 0 or 0-1")
    p.add_argument("--load-cpus", default=None, help="pin the load process, e.g. 1-3")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--opus-bitrate", type=int, default=None, help="bit/s, voip mode (Opus)")
    p.add_argument(
        "--opus-answered", action="store_true", help="Opus as voxphone's SDP answer asks for"
    )
    p.add_argument("--speech", type=Path, default=None, help="audio file to play; default: flite")
    p.add_argument("--profile", action="store_true", help="cProfile the server's window")
    p.add_argument("--stop-at", choices=STOPS, default="engine", help="cut the path short there")
    p.add_argument(
        "--loop",
        choices=LOOPS,
        default="uvloop",
        help="the server's event loop (serve's default: uvloop)",
    )
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--plot", action="store_true", help="plot this machine's results and exit")
    p.add_argument("--machine", default=None, help="with --plot: another machine's results")
    p.add_argument("--plot-runs", type=Path, default=None, help="plot a folder's runs and exit")
    p.add_argument("--send", dest="sent", default=None, help=argparse.SUPPRESS)
    p.add_argument("--share", default="0/1", help=argparse.SUPPRESS)  # a load process's callers
    p.add_argument("--http-port", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--t0", type=float, default=None, help=argparse.SUPPRESS)  # (CLOCK_MONOTONIC)
    args = p.parse_args(argv)
    if args.opus_answered and args.codec != "opus":
        p.error("--opus-answered codes Opus: add --codec opus")
    if args.transport == "twilio":
        for wrong, why in (
            (args.codec != "pcmu", "Twilio streams carry µ-law only: leave --codec out"),
            (args.stop_at == "port", "--stop-at port cuts RTP's UDP path: use call"),
            (bool(args.call_seconds), "--call-seconds redials RTP callers only"),
            (
                args.server == "pipecat" and args.stop_at != "engine",
                "--stop-at cuts voxphone's path: leave it out with --server pipecat",
            ),
        ):
            if wrong:
                p.error(f"--transport twilio: {why}")
    elif args.server == "pipecat":
        p.error("--server pipecat serves Twilio streams: add --transport twilio")
    if args.server == "pipecat" and not all(map(importlib.util.find_spec, PIPECAT_NEEDS)):
        p.error(
            f"--server pipecat runs Pipecat's server, which this Python lacks: "
            f"pip install {' '.join(PIPECAT_NEEDS.values())} "
            "(in a venv of its own; see pipecat_server.py)"
        )
    return args


def main() -> None:
    args = parse(sys.argv[1:])
    machine = machine_name()
    if args.sent is not None:
        if args.transport == "rtp":
            send(args)
            return
        pin(args.load_cpus or f"0-{(os.cpu_count() or 1) - 1}")  # (not the server's)
        k, procs = map(int, args.share.split("/"))
        rng = random.Random(f"{args.seed}/{k}")  # (each process's own losses and jitter)
        sent = asyncio.run(send_twilio(args, range(k, args.calls, procs), rng, args.t0))
        Path(args.sent).write_text(json.dumps(sent))
        return
    if args.plot:
        print(plot(args.machine or machine))
        return
    if args.plot_runs is not None:
        print(plot_runs(args.plot_runs))
        return
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    pin(args.server_cpus)
    load_before = os.getloadavg()
    result = run(args.loop, serve(args))
    result = {"machine": machine, "cpu": cpu_model(), "python": platform.python_version(),
              "loadavg_before": load_before, **result}  # fmt: skip
    result["server_loop"] = args.loop
    result["loadavg_after"] = os.getloadavg()
    print(json.dumps({k: v for k, v in result.items() if k != "profile_top"}, indent=2))
    for line in result.get("profile_top", []):
        print(line)
    rate = f"{args.opus_bitrate // 1000}k" if args.opus_bitrate else ""
    rate += "-answered" if args.opus_answered else ""
    kind = "" if args.codec == "pcmu" else f"{args.codec}{rate}-"
    kind = "twilio-" if args.transport == "twilio" else kind
    kind = "pipecat-twilio-" if args.server == "pipecat" else kind
    stop = "" if args.stop_at == "engine" else f"-stop-at-{args.stop_at}"
    out = args.out or Path(f"benchmarks/results/load-{machine}-{kind}{args.calls}{stop}.json")
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
