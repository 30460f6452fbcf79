"""configs/asterisk/ari_controller.py against a fake ARI written from Asterisk's ARI docs, with
a real `voxphone serve` and ffmpeg playing the externalMedia channel's RTP."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import Speech, overlap
from tests.integration.test_serve import WebhookReceiver, calls_of, ffmpeg_rtp, running_serve

ROOT = Path(__file__).parents[2]


def load_controller() -> Any:
    spec = importlib.util.spec_from_file_location(
        "ari_controller", ROOT / "configs/asterisk/ari_controller.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


class FakeAri:
    """The ARI endpoints the controller uses, recording each request."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.ws: web.WebSocketResponse | None = None
        self.connected = asyncio.Event()
        self.media = asyncio.Event()
        self.external_host = ""
        app = web.Application()
        app.router.add_get("/ari/events", self.events)
        app.router.add_route("*", "/ari/{tail:.*}", self.rest)
        self.server = TestServer(app, host="127.0.0.1")

    async def events(self, request: web.Request) -> web.WebSocketResponse:
        assert request.query["app"] == "voxphone"
        assert request.headers["Authorization"].startswith("Basic ")
        self.ws = web.WebSocketResponse()
        await self.ws.prepare(request)
        self.connected.set()
        async for _ in self.ws:
            pass
        return self.ws

    async def rest(self, request: web.Request) -> web.Response:
        path, q = request.path, dict(request.query)
        self.requests.append((request.method, path, q))
        if path == "/ari/bridges" and request.method == "POST":
            return web.json_response({"id": "bridge-1"})
        if path == "/ari/channels/externalMedia":
            self.external_host = q["external_host"]
            self.media.set()
            return web.json_response({"id": "media-1", "name": f"UnicastRTP/{q['external_host']}"})
        return web.Response(status=204)

    async def push(self, event: dict[str, Any]) -> None:
        assert self.ws is not None
        await self.ws.send_str(json.dumps(event))


async def test_controller_bridges_a_caller_to_voxphone(
    receiver: WebhookReceiver, speech: dict[str, Speech], tmp_path: Path
) -> None:
    ctl = load_controller()
    ari = FakeAri()
    await ari.server.start_server()
    caller = {"id": "1732770000.7", "name": "PJSIP/100-00000007", "caller": {"number": "100"},
              "dialplan": {"exten": "5000"}}  # fmt: skip
    try:
        async with (
            running_serve(tmp_path, receiver) as srv,
            aiohttp.ClientSession(auth=aiohttp.BasicAuth("voxphone", "secret")) as http,
        ):
            ari_url = str(ari.server.make_url("")).rstrip("/")
            controller = ctl.Controller(
                http, ari_url, "voxphone", f"http://127.0.0.1:{srv.http_port}", "ulaw"
            )
            task = asyncio.create_task(controller.run())
            await asyncio.wait_for(ari.connected.wait(), 10)
            await ari.push({"type": "StasisStart", "channel": caller})
            await asyncio.wait_for(ari.media.wait(), 10)
            await ari.push({"type": "StasisStart", "channel": {"id": "media-1"}})  # ignored
            host, port = ari.external_host.split(":")
            await ffmpeg_rtp(speech["order"].path, int(port), "-ar", "8000", "-acodec", "pcm_mulaw")
            await ari.push({"type": "StasisEnd", "channel": caller})
            await receiver.wait_ended(1, timeout_s=60)
            task.cancel()
    finally:
        await ari.server.close()
    calls = [(m, p) for m, p, _ in ari.requests]
    assert calls == [
        ("POST", "/ari/channels/1732770000.7/answer"),
        ("POST", "/ari/bridges"),
        ("POST", "/ari/channels/externalMedia"),
        ("POST", "/ari/bridges/bridge-1/addChannel"),
        ("DELETE", "/ari/channels/media-1"),
        ("DELETE", "/ari/bridges/bridge-1"),
    ]
    assert ari.requests[2][2]["format"] == "ulaw"
    assert ari.requests[3][2]["channel"] == "1732770000.7,media-1"
    (events,) = calls_of(receiver).values()
    assert (events[0]["data"]["from"], events[0]["data"]["to"]) == ("100", "5000")
    assert events[-1]["data"]["reason"] == "hangup"
    assert overlap(speech["order"].text, events[-1]["data"]["transcript"]) >= 0.5
