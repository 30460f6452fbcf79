"""What reading RTP's UDP ports costs, apart from what is done with a datagram: the server's CPU
per datagram for the socket reads and the event loop alone, with callers whose 20 ms packets fall
due at independent moments (as independent calls' do), so most wake-ups find one datagram.

Each run binds ``--ports`` UDP ports on 127.0.0.1, read by a handler that only counts; a separate
process plays ``--calls`` callers (a packet every 20 ms each, phases drawn at random; caller
``i`` sends to port ``i % ports``). Compared, in alternating runs:

- ``reader``: ``portreader`` is voxphone's ``rtp.PortReader`` (after a wake-up's first datagram
  it asks the kernel, ``FIONREAD``, whether another waits); ``raise`` is the drain before it,
  which ended every batch with a read that raised ``BlockingIOError``; ``transport`` is the
  loop's own datagram transport (``create_datagram_endpoint(sock=…)``: on uvloop's loop libuv
  reads in C, up to 32 datagrams a wake-up; asyncio's reads one per loop iteration).
- ``loop``: asyncio's own, or uvloop's (libuv, in C) where uvloop is installed.

Writes ``benchmarks/results/udp_loop-<machine>-<ports>ports.json`` (each run: µs of server CPU
per datagram, from ``getrusage`` over the window) and a PNG beside it.

    python benchmarks/udp_loop.py --ports 400 --calls 400 --reps 5
    python benchmarks/udp_loop.py --ports 4 --calls 400 --reps 5 --loops asyncio uvloop
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import json
import multiprocessing
import os
import platform
import random
import resource
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from voxphone.event_loop import LOOPS, run
from voxphone.transports.rtp import PortReader

sys.path.insert(0, str(Path(__file__).parent))
from machine import cpu_model, machine_name, pin  # noqa: E402

HOST = "127.0.0.1"
PACKET_S = 0.02
WARMUP_S, WINDOW_S = 1.5, 3.0


class CountingPort(asyncio.DatagramProtocol):
    """What ``PortReader`` needs of an ``RtpPort`` (or a transport of its protocol): it counts
    datagrams, nothing more."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.datagrams = 0

    def handle(self, data: bytes, addr: Any) -> None:
        self.datagrams += 1

    datagram_received = handle


def raising_drain(sock: socket.socket, port: CountingPort) -> None:
    """The drain before ``PortReader``: read until a read raises ``BlockingIOError``."""
    recvfrom, deliver = sock.recvfrom, port.handle
    for _ in range(256):
        try:
            data, addr = recvfrom(2048)
        except (BlockingIOError, InterruptedError):
            return
        deliver(data, addr)


def play(base: int, ports: int, calls: int, seconds: float, cpus: str | None) -> None:
    """The callers, each at its own random phase, at real-time pace (a load process)."""
    pin(cpus)
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(calls)]
    packet, rng, t0 = bytes(172), random.Random(1), time.monotonic() + 0.2
    due = [(t0 + rng.uniform(0, PACKET_S), i) for i in range(calls)]
    heapq.heapify(due)
    end = t0 + seconds
    while True:
        at, i = due[0]
        now = time.monotonic()
        if now > end:
            return
        if at > now:
            time.sleep(min(at - now, 0.002))
            continue
        heapq.heapreplace(due, (at + PACKET_S, i))
        socks[i].sendto(packet, (HOST, base + i % ports))


async def serve(reader: str, base: int, ports: int) -> tuple[float, float]:
    """Read the ports for the window; returns (datagrams a second, CPU µs per datagram)."""
    loop = asyncio.get_running_loop()
    counted, socks, transports = [], [], []
    for k in range(ports):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.bind((HOST, base + k))
        sock.setblocking(False)
        port = CountingPort(base + k)
        if reader == "portreader":
            loop.add_reader(sock.fileno(), PortReader(sock, port).drain)  # type: ignore[arg-type]
        elif reader == "transport":
            transport, _ = await loop.create_datagram_endpoint(lambda p=port: p, sock=sock)  # type: ignore[misc]
            transports.append(transport)
        else:
            loop.add_reader(sock.fileno(), raising_drain, sock, port)
        counted.append(port)
        socks.append(sock)
    await asyncio.sleep(WARMUP_S)
    n0, r0 = sum(p.datagrams for p in counted), resource.getrusage(resource.RUSAGE_SELF)
    await asyncio.sleep(WINDOW_S)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    n = sum(p.datagrams for p in counted) - n0
    if reader == "transport":
        for transport in transports:
            transport.close()  # and its socket, at the loop's next pass
        await asyncio.sleep(0)  # that pass: the next run binds the same ports
    else:
        for sock in socks:
            loop.remove_reader(sock.fileno())
            sock.close()
    cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    return n / WINDOW_S, cpu / max(n, 1) * 1e6


def one_run(args: argparse.Namespace, reader: str, loop: str) -> dict[str, Any]:
    seconds = WARMUP_S + WINDOW_S + 1.0
    sender = multiprocessing.Process(
        target=play, args=(args.base_port, args.ports, args.calls, seconds, args.load_cpus)
    )
    sender.start()
    try:
        rate, us = run(loop, serve(reader, args.base_port, args.ports))
    finally:
        sender.join()
    return {"reader": reader, "loop": loop, "datagrams_per_s": round(rate), "us_per_datagram":
            round(us, 2)}  # fmt: skip


def plot(result: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[float]] = {}
    for r in result["runs"]:
        groups.setdefault(f"{r['reader']}, {r['loop']}", []).append(r["us_per_datagram"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for x, values in enumerate(groups.values()):
        ax.plot([x] * len(values), values, "o", alpha=0.7)
    ax.set_xticks(range(len(groups)), list(groups), fontsize=8)
    ax.set_ylabel("server CPU per datagram (µs): socket and loop only")
    ax.grid(alpha=0.3)
    ax.set_title(
        f"{result['ports']} ports, {result['calls']} callers at independent phases — "
        f"{result['machine']} ({result['cpu']}), Python {result['python']}",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ports", type=int, default=400)
    p.add_argument("--calls", type=int, default=400)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument(
        "--readers", nargs="+", choices=("raise", "portreader", "transport"),
        default=["raise", "portreader"],
    )  # fmt: skip
    p.add_argument("--loops", nargs="+", choices=LOOPS, default=list(LOOPS))
    p.add_argument("--base-port", type=int, default=42000)
    p.add_argument("--server-cpus", default="0")
    p.add_argument("--load-cpus", default="1")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    pin(args.server_cpus)
    load_before = os.getloadavg()
    runs = []
    for _ in range(args.reps):  # alternating, so a slow minute of the machine hits each alike
        for loop in args.loops:
            for reader in args.readers:
                runs.append(one_run(args, reader, loop))
                print(json.dumps(runs[-1]), flush=True)
    medians = {
        f"{reader}/{loop}": statistics.median(
            r["us_per_datagram"] for r in runs if (r["reader"], r["loop"]) == (reader, loop)
        )
        for loop in args.loops
        for reader in args.readers
    }
    machine = machine_name()
    result = {
        "machine": machine, "cpu": cpu_model(), "python": platform.python_version(),
        "loadavg_before": load_before, "ports": args.ports, "calls": args.calls,
        "us_per_datagram_median": medians, "runs": runs,
    }  # fmt: skip
    out = args.out or Path(f"benchmarks/results/udp_loop-{machine}-{args.ports}ports.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(medians))
    try:
        plot(result, out.with_suffix(".png"))
    except ImportError:
        print("(no matplotlib: no plot)")


if __name__ == "__main__":
    main()
