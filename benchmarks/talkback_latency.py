"""Talk-back latency: bot audio from the call's websocket to RTP on the caller's socket, and clear.

The server is voxphone's ``App`` (what ``voxphone serve`` runs) in this process with a null
engine; a separate process is the other side: it creates an RTP call through the API, latches it
from a UDP socket (symmetric RTP) and streams bot audio into ``/v1/calls/{id}/audio?rate=16000``
as a TTS would, then measures on its own socket what comes back. Both processes read the same
``CLOCK_MONOTONIC``. ``--busy N`` adds N other calls each playing a long clip, so the shared
20 ms ticker has N + 1 calls to serve.

Reported (``benchmarks/results/talkback_latency-<machine>[-busyN].json`` and a PNG):

- ``first_packet_ms.server``: from the websocket frame reaching the call (``OutboundStream.write``)
  to its first RTP packet leaving the port (``sendto``): the issue's target is ≤ 20 ms.
- ``first_packet_ms.client``: from the client's ``send_bytes`` to the packet arriving on the
  caller's socket (adds the websocket and UDP legs on loopback).
- ``clear_to_silence_ms.server``: from the ``clear`` message reaching the call to the last audio
  packet sent after it (0 when none was): the target is ≤ 40 ms.
- ``clear_to_silence_ms.client``: from the client sending ``clear`` to the last audio packet
  arriving after it.

    python benchmarks/talkback_latency.py --trials 50 [--busy 200]
    python benchmarks/talkback_latency.py --plot   # the PNG from this machine's JSON files

On a shared machine the figures move with the neighbours' load: the JSON records
``os.getloadavg()`` before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from voxphone.app import App
from voxphone.audio.files import read_audio
from voxphone.config import Config
from voxphone.playback import OutboundStream, Playout
from voxphone.testing import free_tcp_port, free_udp_range
from voxphone.transports.rtp_out import RtpEndpoint

sys.path.insert(0, str(Path(__file__).parent))
from load import percentiles  # noqa: E402
from machine import machine_name  # noqa: E402
from webrtc_calls import NullEngine  # noqa: E402

HOST = "127.0.0.1"
RATE = 16000
FRAME = RATE // 50
TARGET_FIRST_MS = 20
TARGET_CLEAR_MS = 40


# -- the client process -------------------------------------------------------------------------


def speech() -> np.ndarray:
    wav = Path(tempfile.mkdtemp()) / "bot.wav"
    text = "Thank you for calling. Your order left our warehouse this morning."
    subprocess.run(["flite", "-voice", "slt", "-t", text, "-o", str(wav)], check=True)
    return read_audio(wav, RATE)


def rtp(seq: int, ssrc: int) -> bytes:
    """A PCMU packet of silence (0xFF), RFC 3550 header."""
    return struct.pack("!BBHII", 0x80, 0, seq & 0xFFFF, seq * 160, ssrc) + b"\xff" * 160


async def open_call(http: aiohttp.ClientSession, base: str, ssrc: int) -> tuple[str, socket.socket]:
    """An RTP call through the API, latched from a fresh socket (two packets pass probation)."""
    async with http.post(f"{base}/v1/calls", json={"codec": "PCMU"}) as r:
        reply = await r.json()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((HOST, 0))
    sock.setblocking(False)
    for seq in range(3):
        sock.sendto(rtp(seq, ssrc), (HOST, reply["rtp_port"]))
        await asyncio.sleep(0.02)
    return reply["call_id"], sock


async def keep_alive(sock: socket.socket, port: int, ssrc: int) -> None:
    seq = 3
    while True:
        sock.sendto(rtp(seq, ssrc), (HOST, port))
        seq += 1
        await asyncio.sleep(0.02)


def drain(sock: socket.socket) -> None:
    while True:
        try:
            sock.recv(2048)
        except BlockingIOError:
            return


def long_clip() -> bytes:
    """A minute of speech for the busy calls to play."""
    wav = Path(tempfile.mkdtemp()) / "long.wav"
    subprocess.run(["flite", "-voice", "rms", "-t", "one two three " * 40, "-o", str(wav)],
                   check=True)  # fmt: skip
    return wav.read_bytes()


async def client(args: argparse.Namespace, pcm: np.ndarray, clip: bytes) -> dict[str, Any]:
    base = f"http://{HOST}:{args.http_port}"
    loop = asyncio.get_running_loop()
    out: dict[str, Any] = {"first_packet_ms": [], "clear_ms": []}
    async with aiohttp.ClientSession() as http:
        busy = []
        for i in range(args.busy):
            call_id, sock = await open_call(http, base, 5000 + i)
            busy.append(sock)
            async with http.post(f"{base}/v1/calls/{call_id}/play", data=clip,
                                 headers={"Content-Type": "audio/wav"}) as r:  # fmt: skip
                assert r.status == 202, await r.text()
        call_id, sock = await open_call(http, base, 1)
        async with http.get(f"{base}/v1/calls") as r:
            port = next(c for c in (await r.json())["calls"] if c["call_id"] == call_id)[
                "metadata"
            ]["local_port"]
        alive = asyncio.create_task(keep_alive(sock, port, 1))
        async with http.ws_connect(f"{base}/v1/calls/{call_id}/audio?rate={RATE}") as ws:
            events = asyncio.create_task(ws.receive())  # drained by the server's close
            for i in range(args.trials):
                await asyncio.sleep(0.2)  # the last talkspurt is over
                drain(sock)
                frame = pcm[(i * FRAME) % (pcm.size - FRAME) :][:FRAME]
                t0 = time.monotonic()
                await ws.send_bytes(frame.astype("<i2").tobytes())
                await loop.sock_recv(sock, 2048)
                out["first_packet_ms"].append((time.monotonic() - t0) * 1000)
            for _ in range(args.trials):
                await asyncio.sleep(0.2)
                await ws.send_bytes(pcm[: RATE * 2].astype("<i2").tobytes())
                await asyncio.sleep(0.3)  # well into the talkspurt
                drain(sock)
                t0 = time.monotonic()
                await ws.send_str('{"type": "clear"}')
                last = t0
                try:
                    async with asyncio.timeout(0.3):
                        while True:
                            await loop.sock_recv(sock, 2048)
                            last = time.monotonic()
                except TimeoutError:
                    pass
                out["clear_ms"].append((last - t0) * 1000)
            events.cancel()
        alive.cancel()
    for s in [sock, *busy]:
        s.close()
    return out


# -- the server ---------------------------------------------------------------------------------


class Probe:
    """Stamps, on the server: websocket frames reaching a talking call, packets leaving, clears."""

    def __init__(self) -> None:
        self.writes: list[float] = []  # a frame written to an idle call (a talkspurt's start)
        self.sent: list[float] = []
        self.clears: list[float] = []
        self.watch: set[int] = set()  # id() of the measured call's endpoint
        write, send, clear = OutboundStream.write, RtpEndpoint._send, Playout.clear
        probe = self

        def stamped_write(stream: OutboundStream, pcm: Any) -> Any:
            idle = not stream._playout.active
            if idle:
                probe.writes.append(time.monotonic())
                probe.watch.add(id(stream._playout.endpoint))
            return write(stream, pcm)

        def stamped_send(endpoint: RtpEndpoint, pkt: Any, target: Any) -> None:
            send(endpoint, pkt, target)
            if id(endpoint) in probe.watch:
                probe.sent.append(time.monotonic())

        def stamped_clear(playout: Playout, reason: str) -> list[str]:
            if id(playout.endpoint) in probe.watch and reason == "api":
                probe.clears.append(time.monotonic())
            return clear(playout, reason)

        OutboundStream.write = stamped_write  # type: ignore[method-assign]
        RtpEndpoint._send = stamped_send  # type: ignore[method-assign]
        Playout.clear = stamped_clear  # type: ignore[method-assign]

    def first_packet_ms(self, trials: int) -> list[float]:
        sent = np.asarray(self.sent)
        out = []
        for t in self.writes[:trials]:
            after = sent[sent >= t]
            if after.size:
                out.append(float(after[0] - t) * 1000)
        return out

    def clear_ms(self) -> list[float]:
        sent = np.asarray(self.sent)
        out = []
        for t in self.clears:
            after = sent[(sent >= t) & (sent < t + 0.3)]
            out.append(float(after[-1] - t) * 1000 if after.size else 0.0)
        return out


def config(args: argparse.Namespace, http_port: int, rtp_base: int) -> Config:
    return Config.model_validate(
        {
            "http": {"port": http_port},
            "rtp": {
                "ports": f"{rtp_base}-{rtp_base + 2 * (args.busy + 2)}",
                "no_media_timeout_s": 600,
            },  # fmt: skip
            "asterisk": {"audiosocket_port": 0},
            "calls": {"max_concurrent": args.busy + 10},
            "webrtc": {"enabled": False},
            "outbox": {"path": str(Path(tempfile.mkdtemp()) / "outbox.db")},
        }
    )


async def serve(args: argparse.Namespace) -> dict[str, Any]:
    probe = Probe()
    http_port = free_tcp_port()
    first_rtp, _ = free_udp_range(2 * (args.busy + 2) + 1)
    app = App(config(args, http_port, first_rtp), engine=NullEngine())
    await app.start()
    result_file = Path(tempfile.mkdtemp()) / "client.json"
    cmd = [sys.executable, __file__, "--client-out", str(result_file),
           "--http-port", str(http_port), *sys.argv[1:]]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(*cmd)
    assert await proc.wait() == 0
    await app.stop(flush_s=1.0)
    seen = json.loads(result_file.read_text())
    first = {
        "server": percentiles(probe.first_packet_ms(args.trials)),
        "client": percentiles(seen["first_packet_ms"]),
    }
    clear = {"server": percentiles(probe.clear_ms()), "client": percentiles(seen["clear_ms"])}
    return {
        "trials": args.trials,
        "busy_calls": args.busy,
        "stream_rate": RATE,
        "call_codec": "PCMU",
        "ticks_late": app.registry.ticker.late_ticks,
        "first_packet_ms": first,
        "clear_to_silence_ms": clear,
        "targets_ms": {"first_packet": TARGET_FIRST_MS, "clear_to_silence": TARGET_CLEAR_MS},
        "meets_targets": {
            "first_packet_p99": first["server"]["p99"] <= TARGET_FIRST_MS,
            "clear_p99": clear["server"]["p99"] <= TARGET_CLEAR_MS,
        },
        "raw": {
            "first_packet_server": probe.first_packet_ms(args.trials),
            "first_packet_client": seen["first_packet_ms"],
            "clear_server": probe.clear_ms(),
            "clear_client": seen["clear_ms"],
        },
    }


def plot(machine: str) -> Path:
    """Each run's distributions (server and client) against the targets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted(
        (json.loads(f.read_text()) for f in Path("benchmarks/results").glob(
            f"talkback_latency-{machine}*.json")),
        key=lambda r: r["busy_calls"],
    )  # fmt: skip
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, target, title in (
        (axes[0], "first_packet", TARGET_FIRST_MS, "websocket frame → first RTP packet"),
        (axes[1], "clear", TARGET_CLEAR_MS, "clear → last RTP packet"),
    ):
        for r in runs:
            for side, style in (("server", "-"), ("client", "--")):
                values = np.sort(r["raw"][f"{key}_{side}"])
                cdf = np.arange(1, values.size + 1) / max(1, values.size)
                ax.plot(values, cdf, style, label=f"{side}, {r['busy_calls']} other calls")
        ax.axvline(target, color="red", alpha=0.5, label=f"target {target} ms")
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of trials")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    loads = ", ".join(f"{r['loadavg_before'][0]:.1f}" for r in runs)
    fig.suptitle(f"voxphone talk-back latency, PCMU over RTP — {machine} (load avg: {loads})")
    fig.tight_layout()
    out = Path(f"benchmarks/results/talkback_latency-{machine}.png")
    fig.savefig(out, dpi=100)
    return out


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=50)
    p.add_argument("--busy", type=int, default=0, help="other calls playing meanwhile")
    p.add_argument("--plot", action="store_true", help="plot this machine's results and exit")
    p.add_argument("--client-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--http-port", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main() -> None:
    args = parse(sys.argv[1:])
    machine = machine_name()
    if args.client_out is not None:
        seen = asyncio.run(client(args, speech(), long_clip() if args.busy else b""))
        Path(args.client_out).write_text(json.dumps(seen))
        return
    if args.plot:
        print(plot(machine))
        return
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    load_before = os.getloadavg()
    result = asyncio.run(serve(args))
    result = {"machine": machine, "loadavg_before": load_before, **result}
    result["loadavg_after"] = os.getloadavg()
    print(json.dumps({k: v for k, v in result.items() if k != "raw"}, indent=2))
    suffix = f"-busy{args.busy}" if args.busy else ""
    out = Path(f"benchmarks/results/talkback_latency-{machine}{suffix}.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(plot(machine))


if __name__ == "__main__":
    main()
