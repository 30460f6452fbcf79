"""Shutdown as a load balancer sees it: ``/ready`` says 503 for as long as live calls drain."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, closing
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from tests.conftest import Speech, free_tcp_port, free_udp_range, overlap
from tests.integration.test_serve import SECRET, WebhookReceiver, calls_of, wait_ready
from voxphone.app import App
from voxphone.audio.codecs import PCMU, Pcm
from voxphone.audio.files import read_audio
from voxphone.config import Config
from voxphone.engines.base import TranscriptChunk
from voxphone.testing import rtp_packets, send_rtp

pytestmark = pytest.mark.integration


class HeldStream:
    """A stream that says its last words only when the test lets it."""

    def __init__(self, release: asyncio.Event) -> None:
        self._release = release

    async def send(self, frame: Pcm) -> None:
        pass

    async def close(self) -> None:
        pass

    async def abort(self) -> None:
        self._release.set()

    async def chunks(self) -> AsyncIterator[TranscriptChunk]:
        await self._release.wait()
        yield TranscriptChunk(segment_end=True, text="last words")

    def stats(self) -> dict[str, int]:
        return {}


class HeldEngine:
    name = "held"

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def start(self) -> None:
        pass

    async def open_stream(self, call_id: str) -> HeldStream:
        return HeldStream(self.release)

    async def stop(self) -> None:
        pass


async def ready(http: aiohttp.ClientSession, port: int) -> tuple[int, dict[str, object]]:
    async with http.get(f"http://127.0.0.1:{port}/ready") as r:
        return r.status, await r.json()


def config_(**sections: dict[str, object]) -> Config:
    return Config.model_validate({
        "http": {"port": free_tcp_port()},
        "rtp": {"ports": "{}-{}".format(*free_udp_range(2))},
        "asterisk": {"audiosocket_port": 0},
        "webrtc": {"enabled": False},
        "outbox": {"path": os.environ["VOXPHONE_OUTBOX__PATH"]},  # the test's own folder
        **sections,
    })  # fmt: skip


async def test_ready_is_503_while_live_calls_drain() -> None:
    config = config_()
    engine = HeldEngine()
    app = App(config, engine=engine)
    await app.start()
    port = config.http.port
    async with aiohttp.ClientSession() as http:
        assert (await ready(http, port))[0] == 200
        call = app.registry.open(PCMU, transport="test")
        assert call is not None
        stopping = asyncio.create_task(app.stop(flush_s=30))
        async with asyncio.timeout(5):
            while (answer := await ready(http, port))[0] == 200:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        assert answer == (503, {"status": "draining", "engine": "held", "active_calls": 1,
                                "max_calls": 50})  # fmt: skip
        assert not stopping.done()  # the call still drains, and /ready keeps saying so
        assert (await ready(http, port))[0] == 503
        engine.release.set()
        await asyncio.wait_for(stopping, 10)
    assert call.end_reason == "shutdown"


async def test_every_ingress_refuses_new_calls_cleanly_while_draining() -> None:
    """HTTP call starts get 503 + Retry-After, media websockets a 1013 close with the reason,
    a new RTP source no call; each refusal is counted by transport on /metrics."""
    cfg = config_(webrtc={"enabled": True})
    engine = HeldEngine()
    app = App(cfg, engine=engine)
    await app.start()
    live = app.registry.open(PCMU, transport="test")
    assert live is not None
    draining = asyncio.create_task(app.drain(30))
    base = f"http://127.0.0.1:{cfg.http.port}"
    try:
        async with aiohttp.ClientSession() as http:
            async with asyncio.timeout(5):
                while (await ready(http, cfg.http.port))[0] == 200:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            for path in ("/v1/calls", "/v1/whip"):
                async with http.post(base + path, json={"codec": "PCMU"}) as r:
                    assert r.status == 503, path
                    assert r.headers["Retry-After"] == "5"
                    assert "draining" in (await r.json())["error"]
            for path in ("/v1/media/twilio", "/v1/media/stream", "/v1/media/asterisk"):
                async with http.ws_connect(base + path) as ws:
                    msg = await ws.receive()
                    assert msg.type == aiohttp.WSMsgType.CLOSE, path
                    assert msg.data == 1013 and "draining" in msg.extra
            port = cfg.rtp.ports[0]
            packets = list(rtp_packets(np.zeros(8000, np.int16), PCMU, seed=1))[:10]
            await send_rtp(packets, ("127.0.0.1", port), pace=False)
            async with asyncio.timeout(5):
                while ("rtp", "draining") not in app.registry.refused:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            async with http.get(base + "/metrics") as r:
                text = await r.text()
        assert list(app.registry.calls) == [live.call_id], "no new call"
        assert not draining.done(), "the live call goes on"
        for transport in ("rtp", "webrtc", "twilio", "stream", "asterisk_websocket"):
            assert (
                f'voxphone_calls_refused_total{{reason="draining",transport="{transport}"}}' in text
            ), transport
    finally:
        engine.release.set()
        await app.stop(flush_s=10)
        await draining


@asynccontextmanager
async def serve_process(
    tmp_path: Path, receiver: WebhookReceiver, drain_s: float
) -> AsyncIterator[tuple[asyncio.subprocess.Process, int, int]]:
    """`voxphone serve` as a deploy runs it: (process, HTTP port, first RTP port)."""
    lo, hi = free_udp_range(6)
    http_port = free_tcp_port()
    log = (tmp_path / "serve.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "voxphone", "serve", "--http-port", str(http_port),
        "--rtp-ports", f"{lo}-{hi}", "--webhook", str(receiver.server.make_url("/hooks")),
        "--webhook-secret", SECRET, "--log-format", "json",
        env={**os.environ, "VOXPHONE_CALLS__DRAIN_S": str(drain_s),
             "VOXPHONE_RTP__INACTIVITY_TIMEOUT_S": "1", "VOXPHONE_ENGINE__SPHINX__WORKERS": "2"},
        stdout=log, stderr=log,
    )  # fmt: skip
    try:
        await wait_ready(http_port, proc)
        yield proc, http_port, lo
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        log.close()
    assert "Traceback" not in (tmp_path / "serve.log").read_text()


async def until_draining(port: int) -> float:
    """Poll ``/ready`` until it answers 503; returns when (loop time)."""
    async with aiohttp.ClientSession() as http, asyncio.timeout(5):
        while (await ready(http, port))[0] == 200:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    return asyncio.get_running_loop().time()


async def refused_everywhere(http_port: int, rtp_port: int) -> None:
    """While the process drains: the calls API and a media websocket refuse, a new RTP source
    makes no call; /metrics counts each."""
    base = f"http://127.0.0.1:{http_port}"
    silence = list(rtp_packets(np.zeros(1600, np.int16), PCMU, seed=9))
    await send_rtp(silence, ("127.0.0.1", rtp_port), pace=False)
    refused_rtp = 'voxphone_calls_refused_total{reason="draining",transport="rtp"}'
    async with aiohttp.ClientSession() as http:
        async with asyncio.timeout(5):  # the RTP source first, before the API adds to "rtp"
            while refused_rtp not in await (await http.get(f"{base}/metrics")).text():  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        async with http.post(f"{base}/v1/calls", json={"codec": "PCMU"}) as r:
            assert r.status == 503 and r.headers["Retry-After"] == "5"
        async with http.ws_connect(f"{base}/v1/media/stream") as ws:
            msg = await ws.receive()
            assert msg.data == 1013 and "draining" in msg.extra
        async with http.get(f"{base}/metrics") as r:
            text = await r.text()
    for transport in ("rtp", "stream"):
        line = f'voxphone_calls_refused_total{{reason="draining",transport="{transport}"}}'
        assert line in text, transport
    assert "voxphone_draining 1.0" in text
    assert 'voxphone_calls_started_total{transport="rtp"} 2.0' in text
    assert 'voxphone_rtp_datagrams_dropped_total{reason="call_refused"}' in text


async def test_sigterm_lets_live_calls_end_then_cuts_the_rest_at_drain_s(
    receiver: WebhookReceiver, speech: dict[str, Speech], tmp_path: Path
) -> None:
    """A deploy mid-call: /ready says 503 at once; the short call goes on to its natural end
    (`inactivity`, every word), the long one ends with `shutdown` when drain_s passes; every
    event is delivered before the process exits 0."""
    short = read_audio(speech["order"].path, 8000)
    long = np.tile(read_audio(speech["callback"].path, 8000), 8)  # ~25 s
    loop = asyncio.get_running_loop()
    async with serve_process(tmp_path, receiver, drain_s=6) as (proc, http_port, lo):
        senders = [
            asyncio.create_task(send_rtp(list(rtp_packets(pcm, PCMU, seed=i)), ("127.0.0.1", port)))
            for i, (pcm, port) in enumerate([(short, lo), (long, lo + 2)])
        ]
        await receiver.wait_for("call.started", 2, timeout_s=30)
        proc.send_signal(signal.SIGTERM)
        signalled = loop.time()
        assert await until_draining(http_port) - signalled < 1.0
        await refused_everywhere(http_port, lo + 4)
        assert await asyncio.wait_for(proc.wait(), 40) == 0
        took = loop.time() - signalled
        for sender in senders:
            sender.cancel()
    assert 5.5 <= took <= 25, took
    started = {e["data"]["local_port"]: e for e in receiver.events if e["type"] == "call.started"}
    by_call = calls_of(receiver)
    short_call, long_call = (by_call[started[port]["call_id"]] for port in (lo, lo + 2))
    assert len(by_call) == 2, "no call was accepted while draining"
    assert short_call[-1]["type"] == "call.ended" and long_call[-1]["type"] == "call.ended"
    assert short_call[-1]["data"]["reason"] == "inactivity"  # not cut short by the deploy
    assert overlap(speech["order"].text, short_call[-1]["data"]["transcript"]) >= 0.5
    assert long_call[-1]["data"]["reason"] == "shutdown"
    for events in (short_call, long_call):
        durable = [e["seq"] for e in events if "delta_seq" not in e]
        assert durable == list(range(len(durable))), "every event delivered"


async def test_a_second_sigterm_ends_at_once(
    receiver: WebhookReceiver, speech: dict[str, Speech], tmp_path: Path
) -> None:
    """The second signal does not wait for drain_s, the engine or the receiver: the process
    exits 0 within seconds, the cut call's `call.ended` committed to the outbox."""
    long = np.tile(read_audio(speech["callback"].path, 8000), 8)
    loop = asyncio.get_running_loop()
    async with serve_process(tmp_path, receiver, drain_s=60) as (proc, http_port, lo):
        sender = asyncio.create_task(send_rtp(list(rtp_packets(long, PCMU)), ("127.0.0.1", lo)))
        await receiver.wait_for("call.started", 1, timeout_s=30)
        proc.send_signal(signal.SIGTERM)
        await until_draining(http_port)
        proc.send_signal(signal.SIGTERM)
        second = loop.time()
        assert await asyncio.wait_for(proc.wait(), 15) == 0
        took = loop.time() - second
        sender.cancel()
    assert took < 5, took
    with closing(sqlite3.connect(os.environ["VOXPHONE_OUTBOX__PATH"])) as db:
        rows = db.execute("SELECT body FROM events WHERE type = 'call.ended'").fetchall()
    assert [json.loads(body)["data"]["reason"] for (body,) in rows] == ["shutdown"]
