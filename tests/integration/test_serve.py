"""End to end: `voxphone serve` as a process, real RTP in (ffmpeg and `voxphone call`), signed
webhooks out to a real HTTP server, while junk floods the same port."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from standardwebhooks import Webhook

from tests.conftest import Speech, free_tcp_port, free_udp_range, overlap, require

pytestmark = pytest.mark.integration

SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()


class WebhookReceiver:
    """A real HTTP server that verifies every delivery with the reference Standard Webhooks code."""

    def __init__(self) -> None:
        self.events: list[dict] = []  # type: ignore[type-arg]
        self.bad_signatures = 0
        self.changed = asyncio.Event()
        app = web.Application()
        app.router.add_post("/hooks", self.handle)
        self.server = TestServer(app, host="127.0.0.1")

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            event = Webhook(SECRET).verify(body, dict(request.headers))
        except Exception:
            self.bad_signatures += 1
            return web.Response(status=400)
        assert request.headers["webhook-id"] == event["id"]
        self.events.append(event)
        self.changed.set()
        return web.Response(status=204)

    async def wait_ended(self, n: int, timeout_s: float) -> None:
        async with asyncio.timeout(timeout_s):
            while sum(e["type"] == "call.ended" for e in self.events) < n:
                self.changed.clear()
                await self.changed.wait()


@pytest.fixture
async def receiver() -> AsyncIterator[WebhookReceiver]:
    rx = WebhookReceiver()
    await rx.server.start_server()
    yield rx
    await rx.server.close()


async def wait_ready(port: int, proc: asyncio.subprocess.Process, timeout_s: float = 60) -> None:
    async with aiohttp.ClientSession() as http, asyncio.timeout(timeout_s):
        while proc.returncode is None:
            try:
                async with http.get(f"http://127.0.0.1:{port}/ready") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.2)
    raise AssertionError(f"voxphone serve exited with {proc.returncode} before becoming ready")


async def flood(port: int, seconds: float) -> int:
    """Random datagrams at the call's port from another socket, ~500 a second."""
    sent = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while loop.time() < end:
            for _ in range(10):
                s.sendto(os.urandom(sent % 400), ("127.0.0.1", port))
                sent += 1
            await asyncio.sleep(0.02)
    return sent


async def test_rtp_calls_reach_the_webhook_signed_with_the_right_words(
    receiver: WebhookReceiver, speech: dict[str, Speech], tmp_path: Path
) -> None:
    ffmpeg = require("ffmpeg")
    http_port = free_tcp_port()
    lo, hi = free_udp_range(4)
    webhook = str(receiver.server.make_url("/hooks"))
    env = {**os.environ, "VOXPHONE_RTP__INACTIVITY_TIMEOUT_S": "1.5"}
    log = (tmp_path / "serve.log").open("wb")
    serve = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "voxphone",
        "serve",
        "--http-port",
        str(http_port),
        "--rtp-ports",
        f"{lo}-{hi}",
        "--webhook",
        webhook,
        "--webhook-secret",
        SECRET,
        "--log-format",
        "json",
        env=env,
        stdout=log,
        stderr=log,
    )
    try:
        await wait_ready(http_port, serve)
        # The README's ffmpeg line, and the README's test caller, at the same time.
        ff = await asyncio.create_subprocess_exec(
            ffmpeg,
            "-loglevel",
            "error",
            "-re",
            "-i",
            str(speech["order"].path),
            "-ar",
            "8000",
            "-ac",
            "1",
            "-acodec",
            "pcm_mulaw",
            "-f",
            "rtp",
            f"rtp://127.0.0.1:{lo}",
            stdout=asyncio.subprocess.DEVNULL,
        )
        caller = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "voxphone",
            "call",
            str(speech["phone"].path),
            "--to",
            f"127.0.0.1:{lo + 2}",
            "--codec",
            "pcma",
            stdout=asyncio.subprocess.PIPE,
        )
        junk = await flood(lo, 3.0)
        assert await ff.wait() == 0
        out, _ = await caller.communicate()
        assert caller.returncode == 0 and json.loads(out)["packets_sent"] > 100
        await receiver.wait_ended(2, timeout_s=60)
    finally:
        serve.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(serve.wait(), 30)
        log.close()
    assert code == 0, (tmp_path / "serve.log").read_text()[-3000:]
    assert junk > 1000
    assert receiver.bad_signatures == 0

    by_call: dict[str, list[dict]] = {}  # type: ignore[type-arg]
    for e in receiver.events:
        by_call.setdefault(e["call_id"], []).append(e)
    assert len(by_call) == 2, "junk must not create calls"
    for events in by_call.values():
        assert [e["seq"] for e in events] == list(range(len(events))), "gap-free, in order"
        assert events[0]["type"] == "call.started"
        assert events[-1]["type"] == "call.ended"
        assert events[-1]["data"]["reason"] == "inactivity"
        assert any(e["type"] == "transcript.final" for e in events)
    calls = {events[0]["data"]["codec"]: events for events in by_call.values()}
    assert set(calls) == {"PCMU", "PCMA"}
    assert calls["PCMU"][0]["data"]["local_port"] == lo
    for codec, key in (("PCMU", "order"), ("PCMA", "phone")):
        ended = calls[codec][-1]["data"]
        heard = ended["transcript"]
        assert overlap(speech[key].text, heard) >= 0.5, (codec, heard)
        assert ended["stats"]["decode_errors"] == 0
        finals = " ".join(
            e["data"]["text"] for e in calls[codec] if e["type"] == "transcript.final"
        )
        assert finals == heard
