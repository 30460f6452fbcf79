"""Events per second through the durable outbox to a local webhook receiver, with fsync on.

Synthetic calls publish events at an offered rate while the outbox commits them
(``synchronous=FULL``: every commit fsynced) and a ``[[webhooks]]`` endpoint POSTs each one,
signed, to a receiver in another process. Prints the delivered events/s (first publish to last
2xx) and the enqueue latency -- the time a call spends in ``publish`` -- at p50/p99/max.

    python benchmarks/outbox.py [--events 30000] [--rate 10000] [--mode parallel|ordered]
        [--receiver lean|aiohttp|none] [--sync FULL|NORMAL]

``--receiver none`` measures the outbox alone (publish → committed, no delivery).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import logging
import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path

import structlog
from aiohttp import web

from voxphone.app import event_settings
from voxphone.clock import SystemClock
from voxphone.config import load_config
from voxphone.events.model import EventSequencer
from voxphone.events.service import EventService

SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()


def aiohttp_receiver(port: int) -> None:
    """A receiver built on aiohttp's server, answering 204 at once."""

    async def hook(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hooks", hook)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


class _Lean(asyncio.Protocol):
    """Answers each complete request (head + Content-Length body) with a bare 204."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport, self.buf = transport, b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            head = self.buf[:end].lower()
            length = int(head.split(b"content-length: ")[1].split(b"\r\n")[0])
            if len(self.buf) < end + 4 + length:
                return
            self.buf = self.buf[end + 4 + length :]
            self.transport.write(b"HTTP/1.1 204 No Content\r\n\r\n")


def lean_receiver(port: int) -> None:
    """A receiver that costs next to no CPU, so the figure is voxphone's, not the receiver's."""

    async def serve() -> None:
        server = await asyncio.get_running_loop().create_server(_Lean, "127.0.0.1", port)
        await server.serve_forever()

    asyncio.run(serve())


async def offer(svc: EventService, n: int, rate: float, calls: int) -> list[float]:
    """Publish ``n`` events over ``calls`` calls at ``rate``/s; returns each publish's seconds."""
    seqs = [EventSequencer(f"call_{i}", SystemClock()) for i in range(calls)]
    # Made beforehand: the figure is the pipeline's, not the cost of making ids and timestamps.
    events = [seqs[j % calls].next("transcript.delta", {"text": "word ", "segment_id": 0})
              for j in range(n)]  # fmt: skip
    latencies: list[float] = []
    chunk = max(1, int(rate / 200))  # every 5 ms, like frames arriving
    start = time.perf_counter()
    for i in range(0, n, chunk):
        for event in events[i : i + chunk]:
            t0 = time.perf_counter()
            svc.publish(event)
            latencies.append(time.perf_counter() - t0)
        ahead = start + (i + chunk) / rate - time.perf_counter()
        await asyncio.sleep(max(0.0, ahead))
    return latencies


async def run(args: argparse.Namespace, port: int, db: Path) -> None:
    url = f"http://127.0.0.1:{port}/hooks"
    endpoint = {"name": "bench", "url": url, "secrets": [SECRET], "mode": args.mode,
                "concurrency": args.concurrency, "coalesce_deltas": False}  # fmt: skip
    endpoints = [] if args.receiver == "none" else [endpoint]
    config = load_config(
        overrides={"webhooks": endpoints, "outbox.path": str(db), "outbox.synchronous": args.sync},
        environ={},
    )
    svc = EventService(event_settings(config), SystemClock())
    await svc.start()
    t0 = time.perf_counter()
    latencies = await offer(svc, args.events, args.rate, args.calls)
    await svc.outbox.flush()
    if endpoints:
        await svc.deliverers["bench"].drained()
        stats = svc.deliverers["bench"].stats
        # Deltas still waiting past their horizon (10 s) expire, as they would in production.
        assert stats.delivered + stats.expired == args.events, stats
    took = time.perf_counter() - t0
    await svc.stop()
    report(args, latencies, took, svc.outbox.stats.committed)
    if endpoints:
        print(f"  delivered {stats.delivered}, deltas expired past their horizon {stats.expired}")


def report(args: argparse.Namespace, latencies: list[float], took: float, committed: int) -> None:
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99)]
    where = "committed only" if args.receiver == "none" else f"webhook ({args.mode}, " \
        f"concurrency {args.concurrency}, {args.receiver} receiver in another process)"  # fmt: skip
    print(f"outbox (synchronous={args.sync}) → {where}: {args.events} events from "
          f"{args.calls} calls offered at {args.rate:.0f}/s")  # fmt: skip
    print(f"  through: {args.events / took:,.0f} events/s ({took:.2f} s, {committed} committed)")
    print(f"  enqueue latency: p50 {statistics.median(latencies) * 1e6:.1f} µs, "
          f"p99 {p99 * 1e6:.1f} µs, max {latencies[-1] * 1e3:.2f} ms")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=30_000)
    parser.add_argument("--rate", type=float, default=10_000, help="offered events/s")
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--mode", choices=["parallel", "ordered"], default="parallel")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--receiver", choices=["lean", "aiohttp", "none"], default="lean")
    parser.add_argument("--sync", choices=["FULL", "NORMAL"], default="FULL")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    from tests.conftest import free_tcp_port

    port = free_tcp_port()
    target = aiohttp_receiver if args.receiver == "aiohttp" else lean_receiver
    rx = multiprocessing.Process(target=target, args=(port,), daemon=True)
    rx.start()
    time.sleep(1.0)  # the receiver binds
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(run(args, port, Path(tmp) / "events.db"))
    rx.terminate()


if __name__ == "__main__":
    main()
