"""A call whose engine fails closes its connection: the provider stops streaming into it.

When a call ends without its transport's doing (``engine_error``), nothing takes the audio that
keeps coming. Each connection-based transport closes its side, so the provider stops sending
(Twilio goes on to the next TwiML verb, Asterisk's application returns): websockets with 1011
and the reason, AudioSocket by closing the TCP connection. Each client below is written from
the vendor's documented messages and keeps streaming at real-time pace until the server closes.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import struct
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aiohttp
import pytest

from tests.conftest import free_tcp_port, free_udp_range
from tests.hooks import until
from voxphone.app import App
from voxphone.audio.codecs import Pcm
from voxphone.call import Call
from voxphone.config import Config
from voxphone.engines.base import TranscriptChunk
from voxphone.errors import EngineError

pytestmark = [pytest.mark.integration, pytest.mark.each_loop]

CLOSED = (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED)


class FailingStream:
    """An engine stream that fails once its first frame has arrived, as a worker that died."""

    def __init__(self) -> None:
        self.fed = asyncio.Event()

    async def send(self, frame: Pcm) -> None:
        self.fed.set()

    async def close(self) -> None: ...

    async def abort(self) -> None: ...

    async def chunks(self) -> AsyncIterator[TranscriptChunk]:
        await self.fed.wait()
        raise EngineError("the engine's worker died")
        yield  # an async generator, as every engine's

    def stats(self) -> dict[str, int]:
        return {}


class FailingEngine:
    name = "failing"

    async def start(self) -> None: ...

    async def open_stream(self, call_id: str) -> FailingStream:
        return FailingStream()

    async def stop(self) -> None: ...


@pytest.fixture
async def app() -> AsyncIterator[App]:
    config = Config.model_validate(
        {
            "http": {"port": free_tcp_port()},
            "rtp": {"ports": "{}-{}".format(*free_udp_range(2))},
            "asterisk": {"audiosocket_port": free_tcp_port()},
            "outbox": {"path": os.environ["VOXPHONE_OUTBOX__PATH"]},  # the test's own folder
        }
    )
    a = App(config, engine=FailingEngine())
    await a.start()
    try:
        yield a
    finally:
        await a.stop()


@dataclass
class Client:
    """A provider's side of a stream: where it connects, its opening messages and its 20 ms
    media messages (TEXT or BINARY), each from the vendor's documents."""

    path: str
    opening: list[str]
    media: Callable[[int], str | bytes]
    protocols: tuple[str, ...] = ()


def json_media(vendor: str, i: int) -> str:
    """Twilio's or Telnyx's ``media`` message number ``i``: 20 ms of µ-law silence."""
    seq, sid = (
        ("sequenceNumber", "streamSid") if vendor == "twilio" else ("sequence_number", "stream_id")
    )
    return json.dumps({"event": "media", seq: str(i + 2), sid: "s1",
                       "media": {"track": "inbound", "chunk": str(i + 1), "timestamp": str(i * 20),
                                 "payload": base64.b64encode(b"\xff" * 160).decode()}})  # fmt: skip


CLIENTS = {
    "twilio": Client(
        "twilio",
        [
            json.dumps(
                {
                    "event": "start",
                    "sequenceNumber": "1",
                    "streamSid": "s1",
                    "start": {
                        "streamSid": "s1",
                        "callSid": "CA-fails",
                        "tracks": ["inbound"],
                        "mediaFormat": {
                            "encoding": "audio/x-mulaw",
                            "sampleRate": 8000,
                            "channels": 1,
                        },
                    },
                }
            )
        ],  # fmt: skip
        lambda i: json_media("twilio", i),
    ),
    "telnyx": Client(
        "telnyx",
        [
            json.dumps({"event": "connected", "version": "1.0.0"}),
            json.dumps(
                {
                    "event": "start",
                    "sequence_number": "1",
                    "stream_id": "s1",
                    "start": {
                        "call_control_id": "v3:fails",
                        "media_format": {"encoding": "PCMU", "sample_rate": 8000, "channels": 1},
                    },
                }
            ),
        ],  # fmt: skip
        lambda i: json_media("telnyx", i),
    ),
    "vonage": Client(
        "vonage",
        [
            json.dumps(
                {
                    "event": "websocket:connected",
                    "content-type": "audio/l16;rate=16000",
                    "uuid": "vonage-fails",
                }
            )
        ],  # fmt: skip
        lambda i: bytes(640),
    ),
    "jambonz": Client(
        "stream",
        [json.dumps({"callSid": "jb-fails", "sampleRate": 8000, "mixType": "mono"})],
        lambda i: bytes(320),
        ("audio.jambonz.org",),
    ),
    "mod_audio_fork": Client(
        "stream?rate=8k",
        [json.dumps({"uuid": "fs-fails"})],
        lambda i: bytes(320),
        ("audio.drachtio.org",),
    ),
    "chan_websocket": Client(
        "asterisk",
        ["MEDIA_START connection_id:c0ffee channel:PJSIP/100-0001 format:ulaw"],
        lambda i: b"\xff" * 160,
    ),
}


async def opened(app: App) -> Call:
    await until(lambda: bool(app.registry.calls), timeout_s=10)
    (call,) = app.registry.calls.values()
    return call


@pytest.mark.parametrize("vendor", list(CLIENTS))
async def test_a_websocket_stream_is_closed_1011_when_its_calls_engine_fails(
    app: App, vendor: str
) -> None:
    """Closed with 1011 and the reason, and no goodbye first (jambonz's ``disconnect``,
    Asterisk's ``HANGUP``): the stream is over, what happens to the phone call is the
    provider's to decide."""
    client = CLIENTS[vendor]
    url = f"http://127.0.0.1:{app.config.http.port}/v1/media/{client.path}"
    said: list[str] = []
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(url, protocols=client.protocols) as ws,
    ):
        for text in client.opening:
            await ws.send_str(text)

        async def stream() -> None:  # the provider's real-time audio, until the socket closes
            for i in range(500):
                m = client.media(i)
                await (ws.send_str(m) if isinstance(m, str) else ws.send_bytes(m))
                await asyncio.sleep(0.02)

        sending = asyncio.create_task(stream())
        try:
            call = await opened(app)
            async with asyncio.timeout(10):
                while (msg := await ws.receive()).type not in CLOSED:
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        said.append(msg.data)  # what the call said on its way out (a clear)
        finally:
            sending.cancel()
            await asyncio.gather(sending, return_exceptions=True)
    assert msg.type == aiohttp.WSMsgType.CLOSE
    assert ws.close_code == 1011 and msg.extra == "call ended: engine_error"
    assert not [m for m in said if "disconnect" in m or "HANGUP" in m], said
    await call.wait()
    assert call.end_reason == "engine_error"


def audiosocket_frame(kind: int, payload: bytes) -> bytes:
    return struct.pack("!BH", kind, len(payload)) + payload


async def test_an_audiosocket_connection_is_closed_when_its_calls_engine_fails(app: App) -> None:
    port = app.config.asterisk.audiosocket_port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def stream() -> None:  # Asterisk's real-time 20 ms slin frames
        writer.write(audiosocket_frame(0x01, uuid.uuid4().bytes))
        for _ in range(500):
            writer.write(audiosocket_frame(0x10, bytes(320)))
            await writer.drain()
            await asyncio.sleep(0.02)

    sending = asyncio.create_task(stream())
    try:
        call = await opened(app)
        async with asyncio.timeout(10):
            assert await reader.read() == b""  # closed by voxphone, with no hang-up frame
    finally:
        sending.cancel()
        await asyncio.gather(sending, return_exceptions=True)
        writer.close()
    await call.wait()
    assert call.end_reason == "engine_error"
