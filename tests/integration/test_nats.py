"""The JetStream fleet sink against a real `nats-server -js`, restarted (kill -9) mid-call."""

from __future__ import annotations

import asyncio
import signal
import socket
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import nats
import pytest
from structlog.testing import capture_logs

from tests.conftest import free_tcp_port, require
from tests.hooks import until
from voxphone.app import event_settings
from voxphone.clock import SystemClock
from voxphone.config import load_config
from voxphone.events.delivery import Retry, Sent
from voxphone.events.model import EventSequencer
from voxphone.events.nats import NatsSettings, NatsTransport
from voxphone.events.outbox import Stored
from voxphone.events.service import EventService

pytestmark = [pytest.mark.integration, pytest.mark.each_loop]


class NatsServer:
    """``tls``: the server's certificate and key files; clients must then use TLS
    (``tls://``), which nats-server requires once it has a certificate. ``jetstream=False``:
    a core NATS server, which answers no JetStream request."""

    def __init__(
        self, store: Path, tls: tuple[Path, Path] | None = None, jetstream: bool = True
    ) -> None:
        self.port = free_tcp_port()
        self.monitor_port = free_tcp_port()  # nats-server's HTTP monitoring (``/connz``)
        self.store = store
        self.tls = tls
        self.jetstream = jetstream
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"{'tls' if self.tls else 'nats'}://127.0.0.1:{self.port}"

    async def start(self) -> None:
        tls: list[str] = []
        if self.tls:
            tls = ["--tls", "--tlscert", str(self.tls[0]), "--tlskey", str(self.tls[1])]
        self.proc = await asyncio.create_subprocess_exec(
            require("nats-server"), *(["-js"] if self.jetstream else []),
            "-a", "127.0.0.1", "-p", str(self.port),
            "-m", str(self.monitor_port), "-sd", str(self.store), *tls,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        await until(self._listening, timeout_s=15)

    def _listening(self) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    async def connections(self) -> int:
        """Client connections the server holds now (its monitoring endpoint, ``/connz``)."""
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{self.monitor_port}/connz") as resp,
        ):
            return int((await resp.json())["num_connections"])

    async def until_no_connections(self, timeout_s: float = 10) -> None:
        """Until the server holds no client connection: it sees a close a moment later."""
        async with asyncio.timeout(timeout_s):
            while await self.connections():  # noqa: ASYNC110 (another process's state)
                await asyncio.sleep(0.05)

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()


@asynccontextmanager
async def nats_server(
    tmp_path: Path, tls: tuple[Path, Path] | None = None
) -> AsyncIterator[NatsServer]:
    server = NatsServer(tmp_path / "jetstream", tls)
    await server.start()
    try:
        yield server
    finally:
        if server.proc is not None and server.proc.returncode is None:
            server.proc.terminate()
            await server.proc.wait()


async def test_events_reach_jetstream_once_across_a_server_restart(tmp_path: Path) -> None:
    async with nats_server(tmp_path) as server:
        config = load_config(
            overrides={"outbox.path": str(tmp_path / "events.db"), "nats.url": server.url,
                       "nats.retry_base_s": 0.05, "nats.retry_max_s": 0.5,
                       "nats.ack_timeout_s": 1.0},
            environ={},
        )  # fmt: skip
        svc = EventService(event_settings(config), SystemClock())
        await svc.start()
        calls = [EventSequencer(f"call_{i}", SystemClock()) for i in range(3)]
        sent = []
        for n in range(120):
            if n == 40:
                await server.kill()
            if n == 80:
                await server.start()
            for seq in calls:
                event = seq.next("transcript.delta" if n % 4 else "transcript.final", {"n": n})
                sent.append(event)
                svc.publish(event)
            await asyncio.sleep(0.03)  # the outage: 1.2 s, past the 1 s ack timeout
        nats_sink = svc.deliverers["nats"]
        await until(lambda: nats_sink.pending == 0, timeout_s=60)
        await svc.stop()
        stored = await read_stream(server.url, "VOXPHONE")
    assert nats_sink.stats.retries > 0, "the outage was felt"
    ids = [m.headers["Nats-Msg-Id"] for m in stored]  # type: ignore[index]
    assert len(ids) == len(set(ids)), "no duplicates in the stream"
    assert sorted(ids) == sorted(e.id for e in sent), "nothing lost"
    (first,) = [m for m in stored if m.headers["Nats-Msg-Id"] == sent[0].id]  # type: ignore[index]
    assert first.subject == f"voxphone.events.{sent[0].type}"
    assert first.headers["Voxphone-Call-Id"] == sent[0].call_id  # type: ignore[index]
    for seq in calls:  # ordered mode: the stream holds each call in the order it was published
        headers = [m.headers or {} for m in stored]
        mine = [
            (int(h["Voxphone-Seq"]), int(h.get("Voxphone-Delta-Seq", -1)))
            for h in headers
            if h["Voxphone-Call-Id"] == seq.call_id
        ]
        published = [(e.seq, -1 if e.delta_seq is None else e.delta_seq) for e in sent
                     if e.call_id == seq.call_id]  # fmt: skip
        assert mine == published and len(mine) == 120


async def read_stream(
    url: str, stream: str, tls: ssl.SSLContext | None = None
) -> list[nats.js.api.RawStreamMsg]:
    """Every message in ``stream``, in order (``tls``: the context that trusts the server)."""
    nc = await nats.connect(url, tls=tls)
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        return [await js.get_msg(stream, n) for n in range(1, info.state.last_seq + 1)]
    finally:
        await nc.close()


async def test_a_busy_start_opens_one_connection(tmp_path: Path) -> None:
    """The first events of many calls, sent at once (a lane per call), find no connection yet:
    one connection is made and shared, and closing the transport leaves none. (Each used to
    connect on its own; the clients it did not keep were never closed and, once the server went,
    reconnected for ever, which also kept the event loop from closing.)"""
    async with nats_server(tmp_path) as server:
        settings = NatsSettings(url=server.url, stream="VOXPHONE", subject_prefix="voxphone.events",
                                create_stream=True, ack_timeout_s=5.0)  # fmt: skip
        transport = NatsTransport(settings)
        calls = [EventSequencer(f"call_{i}", SystemClock()) for i in range(8)]
        events = [seq.next("call.started", {}) for seq in calls]
        results = await asyncio.gather(
            *(transport.send(Stored(n, e, e.to_json(), 0.0)) for n, e in enumerate(events, 1))
        )
        assert all(isinstance(r, Sent) for r in results)
        assert await server.connections() == 1
        with capture_logs() as logs:
            await transport.close()
        assert logs == [], "our own close is no outage: no nats_disconnected"
        await server.until_no_connections()
        stored = await read_stream(server.url, "VOXPHONE")
    assert sorted(m.headers["Nats-Msg-Id"] for m in stored) == sorted(e.id for e in events)  # type: ignore[index]


async def test_a_start_while_nats_is_down_is_retried(tmp_path: Path) -> None:
    """A first send while the server is down gives up within ``ack_timeout_s`` and is retried
    (nats-py's own first connect, with reconnection unlimited, would try for as long as the
    server is down); the next send after the server is up connects; a closed transport opens
    nothing again; and nothing of the client is left running."""
    server = NatsServer(tmp_path / "jetstream")  # not started yet
    settings = NatsSettings(url=server.url, stream="VOXPHONE", subject_prefix="voxphone.events",
                            create_stream=True, ack_timeout_s=1.0)  # fmt: skip
    transport = NatsTransport(settings)
    event = EventSequencer("call_0", SystemClock()).next("call.started", {})
    stored = Stored(1, event, event.to_json(), 0.0)
    t0 = time.monotonic()
    with capture_logs() as logs:
        down = await transport.send(stored)
        # the delivery's last_error names why, not a bare TimeoutError
        assert isinstance(down, Retry)
        why = "TimeoutError: no connection within 1 s; the last error: ConnectionRefusedError"
        assert down.error.startswith(why), down
        assert time.monotonic() - t0 < 3
        assert isinstance(await transport.send(stored), Retry)  # still down: nothing more said
    # nats-py failed an attempt every 0.5 s; one line says so, and no disconnect is claimed
    assert [e["event"] for e in logs] == ["nats_error"], logs
    await server.start()
    try:
        with capture_logs() as logs:
            assert isinstance(await transport.send(stored), Sent)
        ((back,),) = [[e for e in logs if e["event"] == "nats_reconnected"]]
        assert back["failed_attempts"] >= 2
        assert await server.connections() == 1
        with capture_logs() as logs:
            await transport.close()
        assert logs == [], "our own close is no outage: no nats_disconnected"
        closed = await transport.send(stored)
        assert isinstance(closed, Retry) and "closed" in closed.error.lower()
        await server.until_no_connections()
    finally:
        assert server.proc is not None
        server.proc.terminate()
        await server.proc.wait()
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []


async def test_a_server_without_jetstream_is_named_and_the_client_closed_quietly(
    tmp_path: Path,
) -> None:
    """Connected, but the stream's check finds no JetStream: the delivery's error says that,
    not "no connection", and closing the client is not logged as an outage."""
    server = NatsServer(tmp_path / "jetstream", jetstream=False)
    await server.start()
    settings = NatsSettings(url=server.url, stream="VOXPHONE", subject_prefix="voxphone.events",
                            create_stream=True, ack_timeout_s=1.0)  # fmt: skip
    transport = NatsTransport(settings)
    event = EventSequencer("call_0", SystemClock()).next("call.started", {})
    try:
        with capture_logs() as logs:
            down = await transport.send(Stored(1, event, event.to_json(), 0.0))
        assert isinstance(down, Retry), down
        assert "no connection" not in down.error and down.error != "TimeoutError", down
        assert not [e for e in logs if e["log_level"] in ("warning", "error")], logs
        await server.until_no_connections(5)  # the client was closed, not left retrying
        assert down.error.startswith("ServiceUnavailableError"), down  # (what nats-py says)
    finally:
        await transport.close()
        await server.kill()
