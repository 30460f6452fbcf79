"""Talk back through every transport, heard by each transport's own kind of client.

An in-process App (sphinx engine) takes a call from a client written from the vendor's docs:
Twilio, Telnyx, Vonage and jambonz websockets, Asterisk chan_websocket (plain and JSON control)
and AudioSocket, and an aiortc browser stand-in. A bot plays a flite WAV into the call through
the control API (``POST /v1/calls/{id}/play``); the client decodes what comes back as the
vendor would and pocketsphinx must hear the words. Then ``POST …/clear`` mid-sentence (the
vendor's clear message, and no audio after it), DTMF (the browser gets it on its data channel;
the others have no way to send it: 409) and ``DELETE /v1/calls/{id}`` (the vendor's hang-up,
the socket closed, the call ended ``hangup``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import struct
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack, MediaStreamError, MediaStreamTrack

from tests.conftest import Speech, free_tcp_port, free_udp_range, hear, overlap, whip
from tests.hooks import until
from voxphone.app import App
from voxphone.audio.codecs import PCMA, PCMU, Decoder, Pcm
from voxphone.audio.files import read_audio
from voxphone.call import Call
from voxphone.config import Config
from voxphone.transports.asterisk import AudioSocketParser
from voxphone.whip_client import to_mono

pytestmark = [pytest.mark.integration, pytest.mark.each_loop]

SAID = "order"  # flite's rms voice: "Hello, I would like to check the status of my order."


def config() -> Config:
    return Config.model_validate(
        {
            "http": {"port": free_tcp_port()},
            "rtp": {"ports": "{}-{}".format(*free_udp_range(2))},
            "asterisk": {"audiosocket_port": free_tcp_port()},
            "engine": {"kind": "sphinx", "sphinx": {"workers": 1}},
            "webrtc": {"interfaces": ["127.0.0.1"]},
            "outbox": {"path": os.environ["VOXPHONE_OUTBOX__PATH"]},  # the test's own folder
        }
    )


@pytest.fixture
async def app() -> AsyncIterator[App]:
    a = App(config())
    await a.start()
    try:
        yield a
    finally:
        await a.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def opened(app: App, call_id: str) -> Call:
    await until(lambda: call_id in app.registry.calls, timeout_s=15)
    call = app.registry.calls[call_id]
    assert call.playout is not None, "the transport attached no endpoint"
    return call


@dataclass
class Bot:
    """The voice-agent backend: voxphone's control API for one call."""

    http: aiohttp.ClientSession
    base: str

    async def play(self, speech: Speech) -> None:
        body, headers = speech.path.read_bytes(), {"Content-Type": "audio/wav"}
        async with self.http.post(f"{self.base}/play", data=body, headers=headers) as resp:
            assert resp.status == 202, await resp.text()

    async def clear(self) -> None:
        async with self.http.post(f"{self.base}/clear") as resp:
            assert resp.status == 200, await resp.text()
            assert len((await resp.json())["cleared"]) == 1

    async def dtmf(self, digits: str) -> int:
        async with self.http.post(f"{self.base}/dtmf", json={"digits": digits}) as resp:
            return resp.status

    async def hang_up(self) -> None:
        async with self.http.delete(self.base) as resp:
            assert resp.status == 204, await resp.text()


def bot(http: aiohttp.ClientSession, app: App, call_id: str) -> Bot:
    return Bot(http, f"http://127.0.0.1:{app.config.http.port}/v1/calls/{call_id}")


async def play_all(bot: Bot, call: Call, speech: Speech) -> None:
    """Play the sentence into the call and wait until its last frame has been sent."""
    await bot.play(speech)
    await until(lambda: not call.playing, timeout_s=30)


@dataclass
class Heard:
    """What a client received: audio frames and control messages, in arrival order."""

    log: list[tuple[float, str, Any]] = field(default_factory=list)  # (time, kind, value)
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, kind: str, value: Any) -> None:
        self.log.append((asyncio.get_running_loop().time(), kind, value))

    @property
    def frames(self) -> list[Pcm]:
        return [v for _, k, v in self.log if k == "audio"]

    @property
    def texts(self) -> list[str]:
        return [v for _, k, v in self.log if k == "text"]

    def audio(self, start: int = 0) -> Pcm:
        return np.concatenate(self.frames[start:])


# -- the websocket dialects --------------------------------------------------------------


@dataclass(frozen=True)
class Dialect:
    name: str
    path: str
    call_id: str
    rate: int
    opening: list[str]
    #: One inbound 20 ms frame of silence (the i-th), as the vendor sends it.
    silence: Callable[[int], str | bytes]
    #: What one outbound message means: ("audio", pcm) or ("text", its text).
    decode: Callable[[aiohttp.WSMessage], tuple[str, Any]]
    clear: str | None  # the message ``clear`` sends, if the vendor has one
    goodbye: list[str]  # messages before the socket closes on a hang-up
    protocols: tuple[str, ...] = ()


def _json_media(codec_decoder: Decoder) -> Callable[[aiohttp.WSMessage], tuple[str, Any]]:
    def decode(msg: aiohttp.WSMessage) -> tuple[str, Any]:
        assert msg.type == aiohttp.WSMsgType.TEXT, "Twilio/Telnyx take TEXT frames only"
        body = json.loads(msg.data)
        if body["event"] == "media":
            return "audio", codec_decoder.decode(base64.b64decode(body["media"]["payload"]))
        return "text", msg.data

    return decode


def _binary(decode_bytes: Callable[[bytes], Pcm]) -> Callable[[aiohttp.WSMessage], tuple[str, Any]]:
    def decode(msg: aiohttp.WSMessage) -> tuple[str, Any]:
        if msg.type == aiohttp.WSMsgType.BINARY:
            return "audio", decode_bytes(msg.data)
        return "text", msg.data

    return decode


def _slin(data: bytes) -> Pcm:
    return np.frombuffer(data, "<i2").copy()


def _twilio_media(i: int) -> str:
    return json.dumps({
        "event": "media", "sequenceNumber": str(i + 2), "streamSid": "MZtalk",
        "media": {"track": "inbound", "chunk": str(i + 1), "timestamp": str(i * 20),
                  "payload": base64.b64encode(b"\xff" * 160).decode()},
    })  # fmt: skip


def _telnyx_media(i: int) -> str:
    return json.dumps({
        "event": "media", "sequence_number": str(i + 2), "stream_id": "s1",
        "media": {"track": "inbound", "chunk": str(i + 1), "timestamp": str(i * 20),
                  "payload": base64.b64encode(b"\xd5" * 160).decode()},
    })  # fmt: skip


DIALECTS = [
    Dialect(
        "twilio", "/v1/media/twilio", "CAtalk", 8000,
        [json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}),
         json.dumps({"event": "start", "sequenceNumber": "1", "streamSid": "MZtalk",
                     "start": {"streamSid": "MZtalk", "callSid": "CAtalk", "accountSid": "AC1",
                               "tracks": ["inbound"],
                               "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}})],
        _twilio_media, _json_media(Decoder(PCMU)),
        clear='{"event":"clear","streamSid":"MZtalk"}', goodbye=[],
    ),
    Dialect(
        "telnyx", "/v1/media/telnyx", "v2:talk", 8000,
        [json.dumps({"event": "connected", "version": "1.0.0"}),
         json.dumps({"event": "start", "sequence_number": "1", "stream_id": "s1",
                     "start": {"call_control_id": "v2:talk", "from": "+1312", "to": "+1313",
                               "media_format": {"encoding": "PCMA", "sample_rate": 8000, "channels": 1}}})],
        _telnyx_media, _json_media(Decoder(PCMA)),
        clear='{"event":"clear"}', goodbye=[],
    ),
    Dialect(
        "vonage", "/v1/media/vonage", "vonage-talk", 16000,
        [json.dumps({"event": "websocket:connected", "content-type": "audio/l16;rate=16000",
                     "uuid": "vonage-talk"})],
        lambda i: bytes(640), _binary(_slin),
        clear='{"action":"clear"}', goodbye=[],
    ),
    Dialect(
        "jambonz", "/v1/media/stream", "jz-talk", 8000,
        [json.dumps({"callSid": "jz-talk", "sampleRate": 8000, "mixType": "mono",
                     "from": "+1312", "to": "+1313"})],
        lambda i: bytes(320), _binary(_slin),
        clear='{"type":"killAudio"}', goodbye=['{"type":"disconnect"}'],
        protocols=("audio.jambonz.org",),
    ),
    Dialect(
        "freeswitch-mod_audio_stream", "/v1/media/stream?rate=16k&uuid=fs-talk", "fs-talk", 16000,
        [json.dumps({"call_id": "fs-talk", "from": "1000"})],
        lambda i: bytes(640), _binary(_slin),
        clear=None, goodbye=[],
    ),
    Dialect(
        "asterisk-plain-ulaw", "/v1/media/asterisk", "c0ffee", 8000,
        ["MEDIA_START connection_id:c0ffee channel:PJSIP/100-0001 format:ulaw optimal_frame_size:160"],
        lambda i: b"\xff" * 160, _binary(Decoder(PCMU).decode),
        clear="FLUSH_MEDIA", goodbye=["HANGUP"], protocols=("media",),
    ),
    Dialect(
        "asterisk-json-slin16", "/v1/media/asterisk", "1732770000.42", 16000,
        [json.dumps({"event": "MEDIA_START", "connection_id": "c0ffee", "channel": "PJSIP/100-0001",
                     "channel_id": "1732770000.42", "format": "slin16", "optimal_frame_size": 640,
                     "ptime": 20})],
        lambda i: bytes(640), _binary(_slin),
        clear='{"command":"FLUSH_MEDIA"}', goodbye=['{"command":"HANGUP"}'], protocols=("media",),
    ),
]  # fmt: skip


async def _feed(ws: aiohttp.ClientWebSocketResponse, silence: Callable[[int], str | bytes]) -> None:
    """The caller's side: 20 ms frames of silence, as the vendor paces them."""
    i = 0
    with contextlib.suppress(ConnectionError, RuntimeError):
        while not ws.closed:
            frame = silence(i)
            await (ws.send_bytes(frame) if isinstance(frame, bytes) else ws.send_str(frame))
            i += 1
            await asyncio.sleep(0.02)


async def _read(ws: aiohttp.ClientWebSocketResponse, dialect: Dialect, heard: Heard) -> None:
    async for msg in ws:
        heard.add(*dialect.decode(msg))
    heard.closed.set()


@pytest.mark.parametrize("dialect", DIALECTS, ids=[d.name for d in DIALECTS])
async def test_websocket_transports_play_clear_and_hang_up(
    app: App,
    http: aiohttp.ClientSession,
    speech: dict[str, Speech],
    decoder: object,
    dialect: Dialect,
) -> None:
    said = speech[SAID]
    url = f"http://127.0.0.1:{app.config.http.port}{dialect.path}"
    heard = Heard()
    async with http.ws_connect(url, protocols=dialect.protocols) as ws:
        for text in dialect.opening:
            await ws.send_str(text)
        feeder = asyncio.create_task(_feed(ws, dialect.silence))
        reader = asyncio.create_task(_read(ws, dialect, heard))
        call = await opened(app, dialect.call_id)
        assert call.playout is not None and call.playout.rate == dialect.rate
        agent = bot(http, app, dialect.call_id)

        # 1. The whole sentence comes back, every frame sent, at the stream's rate.
        await play_all(agent, call, said)
        await until(lambda: len(heard.frames) == call.playout.stats["frames_out"], timeout_s=5)
        frame = dialect.rate // 50
        assert {f.size for f in heard.frames} == {frame}  # 20 ms each (Vonage requires it)
        assert overlap(said.text, hear(heard.audio(), decoder, dialect.rate)) >= 0.6

        # 2. Cleared mid-sentence: the vendor's clear, and no audio after it.
        before = len(heard.frames)
        await agent.play(said)
        await until(lambda: len(heard.frames) >= before + 25, timeout_s=10)
        await agent.clear()
        at_clear = len(heard.frames)
        if dialect.clear is not None:
            await until(lambda: dialect.clear in heard.texts, timeout_s=5)
        await asyncio.sleep(0.2)
        kinds = [(k, v) for _, k, v in heard.log]
        if dialect.clear is not None:
            after_clear = kinds[kinds.index(("text", dialect.clear)) + 1 :]
            assert not [k for k, _ in after_clear if k == "audio"], "audio after the clear"
        else:  # no message to wait for: at most the frame already on the wire
            assert len(heard.frames) <= at_clear + 1
        assert len(heard.frames) < before + 100  # the 3.2 s sentence did not play out

        # 3. No DTMF on these streams (the vendors send digits by REST or NCCO).
        assert await agent.dtmf("5") == 409

        # 4. voxphone hangs up: the vendor's goodbye, then the socket closes normally.
        await agent.hang_up()
        await asyncio.wait_for(heard.closed.wait(), 10)
        await asyncio.wait_for(call.wait(), 15)
        assert call.end_reason == "hangup"
        assert ws.close_code == 1000
        texts = heard.texts
        assert texts[len(texts) - len(dialect.goodbye) :] == dialect.goodbye
        feeder.cancel()
        await reader
    assert call.stats.dropped.get("outbound_backlog", 0) == 0


# -- AudioSocket --------------------------------------------------------------------------


def audiosocket_frame(kind: int, payload: bytes) -> bytes:
    return struct.pack("!BH", kind, len(payload)) + payload


async def test_audiosocket_plays_back_slin_frames_and_hangs_up_with_type_0(
    app: App, http: aiohttp.ClientSession, speech: dict[str, Speech], decoder: object
) -> None:
    """``AudioSocket(uuid,host:port)``: 20 ms type-0x10 frames back; a hang-up is ``00 00 00``
    and then the end of the stream."""
    said = speech[SAID]
    call_uuid = uuid.uuid4()
    assert app.audiosocket is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", app.audiosocket.port)
    writer.write(audiosocket_frame(0x01, call_uuid.bytes))
    heard = Heard()

    async def feed() -> None:
        with contextlib.suppress(ConnectionError):
            while not writer.is_closing():
                writer.write(audiosocket_frame(0x10, bytes(320)))
                await writer.drain()
                await asyncio.sleep(0.02)

    async def read() -> None:
        parser = AudioSocketParser()
        while data := await reader.read(65536):
            for f in parser.feed(data):
                if f.kind == 0x10:
                    heard.add("audio", _slin(f.payload))
                else:
                    heard.add("frame", f)
                if f.kind == 0x00:  # Asterisk hangs the channel up and closes the socket
                    writer.close()
        heard.closed.set()

    feeder, reading = asyncio.create_task(feed()), asyncio.create_task(read())
    call = await opened(app, str(call_uuid))
    agent = bot(http, app, str(call_uuid))
    await play_all(agent, call, said)
    await until(lambda: len(heard.frames) == call.playout.stats["frames_out"], timeout_s=5)  # type: ignore[union-attr]
    assert {f.size for f in heard.frames} == {160}
    assert overlap(said.text, hear(heard.audio(), decoder, 8000)) >= 0.6

    before = len(heard.frames)
    await agent.play(said)
    await until(lambda: len(heard.frames) >= before + 25, timeout_s=10)
    await agent.clear()
    at_clear = len(heard.frames)
    await asyncio.sleep(0.2)
    assert len(heard.frames) <= at_clear + 1  # at most the frame already on the wire
    assert await agent.dtmf("5") == 409  # Asterisk reads only audio and hang-up frames back

    await agent.hang_up()
    await asyncio.wait_for(heard.closed.wait(), 10)
    await asyncio.wait_for(call.wait(), 15)
    assert call.end_reason == "hangup"
    hangups = [v for _, k, v in heard.log if k == "frame"]
    assert [(f.kind, f.payload) for f in hangups] == [(0x00, b"")]
    feeder.cancel()
    writer.close()
    await reading


# -- WebRTC -------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", ["opus", "PCMU"])
async def test_a_browser_hears_the_bot_on_its_sendrecv_track(
    app: App, http: aiohttp.ClientSession, speech: dict[str, Speech], decoder: object, codec: str
) -> None:
    """An aiortc peer that offers sendrecv (as the demo page does) hears the bot on the track
    the answer sends; ``clear`` turns it to silence; voxphone's hang-up ends the track."""
    said = speech[SAID]
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    transceiver = pc.addTransceiver(AudioStreamTrack(), direction="sendrecv")  # a silent mic
    caps = RTCRtpSender.getCapabilities("audio")
    assert caps is not None
    transceiver.setCodecPreferences([c for c in caps.codecs if c.mimeType == f"audio/{codec}"])
    channel = pc.createDataChannel("events")
    messages: list[dict[str, Any]] = []
    channel.on("message", lambda m: messages.append(json.loads(m)))
    heard = Heard()
    rate: list[int] = []

    async def listen(track: MediaStreamTrack) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                rate[:] = [frame.sample_rate]
                heard.add("audio", to_mono(frame))  # type: ignore[arg-type]
        heard.closed.set()

    tasks: list[asyncio.Task[None]] = []
    pc.on("track", lambda track: tasks.append(asyncio.create_task(listen(track))))
    await pc.setLocalDescription(await pc.createOffer())
    url = f"http://127.0.0.1:{app.config.http.port}/v1/whip"
    try:
        headers = {"Content-Type": "application/sdp"}
        async with http.post(url, data=pc.localDescription.sdp, headers=headers) as resp:
            assert resp.status == 201, await resp.text()
            answer, call_id = await resp.text(), resp.headers["X-Call-Id"]
        assert "a=sendrecv" in answer
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        call = await opened(app, call_id)
        await until(lambda: len(heard.frames) > 10, timeout_s=15)  # silence flows first
        agent = bot(http, app, call_id)

        start = len(heard.frames)
        await play_all(agent, call, said)
        await asyncio.sleep(0.5)  # the jitter buffers on both sides
        assert overlap(said.text, hear(heard.audio(start), decoder, rate[0])) >= 0.6

        await agent.play(said)
        await asyncio.sleep(1.0)
        await agent.clear()
        await asyncio.sleep(0.3)  # what was in flight, and the receiver's jitter buffer
        quiet = len(heard.frames)
        await asyncio.sleep(0.5)
        tail = heard.audio(quiet)
        assert tail.size and np.abs(tail.astype(np.int32)).max() < 200, "audio after clear"

        # DTMF the way the browser's keys come in: on the data channel.
        assert await agent.dtmf("5#") == 202
        await until(lambda: len([m for m in messages if m.get("type") == "bot.dtmf"]) == 2)
        keys = [m for m in messages if m.get("type") == "bot.dtmf"]
        assert [(k["digit"], k["duration_ms"]) for k in keys] == [("5", 100), ("#", 100)]

        await agent.hang_up()
        await asyncio.wait_for(call.wait(), 15)
        assert call.end_reason == "hangup"
        await until(lambda: pc.connectionState in ("closed", "failed"), timeout_s=15)
    finally:
        await pc.close()
        for task in tasks:
            task.cancel()


async def test_the_whip_command_records_what_the_bot_says(
    app: App,
    http: aiohttp.ClientSession,
    speech: dict[str, Speech],
    decoder: object,
    tmp_path: Path,
) -> None:
    """``voxphone whip FILE --record OUT --hold 4``: it offers sendrecv, and the WAV it writes
    holds what the bot played while the call was up; the keys the bot sent are reported."""
    out = tmp_path / "bot.wav"
    url = f"http://127.0.0.1:{app.config.http.port}/v1/whip"
    command = asyncio.create_task(
        whip(url, speech["phone"].path, "--record", str(out), "--hold", "4")
    )
    await until(lambda: len(app.registry.calls) == 1, timeout_s=30)
    (call_id,) = app.registry.calls
    agent = bot(http, app, call_id)
    await agent.play(speech[SAID])
    assert await agent.dtmf("7") == 202
    lines = await command
    assert lines[-2]["type"] == "call.ended" and lines[-1]["recorded"]["dtmf"] == "7"
    assert lines[-1]["recorded"]["seconds"] >= 6  # the file and the hold
    heard = read_audio(out, 16000)
    assert overlap(speech[SAID].text, hear(heard, decoder, 16000)) >= 0.6


async def test_a_clip_still_uploading_when_the_call_ends_is_refused_with_410(
    app: App, http: aiohttp.ClientSession, speech: dict[str, Speech]
) -> None:
    """The caller hangs up while the bot's clip is still on its way in: the call ends (and
    lets go of its playout) in the middle of the request, which is then refused in one line
    (410), not failed."""
    twilio = DIALECTS[0]
    wav = speech[SAID].path.read_bytes()
    body_half_sent, finish_body = asyncio.Event(), asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield wav[: len(wav) // 2]
        body_half_sent.set()
        await finish_body.wait()
        yield wav[len(wav) // 2 :]

    url = f"http://127.0.0.1:{app.config.http.port}{twilio.path}"
    async with http.ws_connect(url) as ws:
        for text in twilio.opening:
            await ws.send_str(text)
        call = await opened(app, twilio.call_id)
        agent = bot(http, app, twilio.call_id)
        headers = {"Content-Type": "audio/wav"}
        post = asyncio.create_task(http.post(f"{agent.base}/play", data=body(), headers=headers))
        await body_half_sent.wait()
        await ws.send_str(
            json.dumps({"event": "stop", "sequenceNumber": "2", "streamSid": "MZtalk"})
        )
        await call.wait()  # call.ended is out
        finish_body.set()
        async with await post as resp:
            assert resp.status == 410, await resp.text()
            assert (await resp.json())["error"].endswith("the call has ended")
