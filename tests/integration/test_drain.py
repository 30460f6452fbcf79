"""Shutdown as a load balancer sees it: ``/ready`` says 503 for as long as live calls drain."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.conftest import free_tcp_port, free_udp_range
from voxphone.app import App
from voxphone.audio.codecs import PCMU, Pcm
from voxphone.config import Config
from voxphone.engines.base import TranscriptChunk

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


async def test_ready_is_503_while_live_calls_drain() -> None:
    config = Config.model_validate({
        "http": {"port": free_tcp_port()},
        "rtp": {"ports": "{}-{}".format(*free_udp_range(2))},
        "asterisk": {"audiosocket_port": 0},
        "webrtc": {"enabled": False},
        "outbox": {"path": os.environ["VOXPHONE_OUTBOX__PATH"]},  # the test's own folder
    })  # fmt: skip
    engine = HeldEngine()
    app = App(config, engine=engine)
    await app.start()
    port = config.http.port
    async with aiohttp.ClientSession() as http:
        assert (await ready(http, port))[0] == 200
        call = app.registry.open(PCMU, transport="test")
        assert call is not None
        stopping = asyncio.create_task(app.stop(drain_timeout_s=30))
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
