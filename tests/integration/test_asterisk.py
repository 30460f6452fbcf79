"""Asterisk's AudioSocket and chan_websocket, spoken by clients written from Asterisk's docs,
against a running `voxphone serve`."""

from __future__ import annotations

import asyncio
import json
import struct
import uuid
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from tests.conftest import Speech, overlap
from tests.integration.test_serve import WebhookReceiver, calls_of, running_serve
from voxphone.audio.codecs import OPUS, PCMU, Encoder
from voxphone.audio.files import read_audio

pytestmark = pytest.mark.integration


def audiosocket_frame(kind: int, payload: bytes) -> bytes:
    return struct.pack("!BH", kind, len(payload)) + payload


async def test_audiosocket_call(
    receiver: WebhookReceiver, speech: dict[str, Speech], tmp_path: Path
) -> None:
    """Dialplan `AudioSocket(<uuid>,host:port)`: UUID, 20 ms slin frames, a DTMF digit, hang-up."""
    call_uuid = uuid.uuid4()
    pcm = read_audio(speech["order"].path, 8000)
    async with running_serve(tmp_path, receiver) as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.audiosocket_port)
        writer.write(audiosocket_frame(0x01, call_uuid.bytes))
        writer.write(audiosocket_frame(0x42, b"?"))  # a type the docs do not list: counted
        writer.write(audiosocket_frame(0x03, b"1"))  # a key before any audio: kept
        for pos in range(0, pcm.size, 160):  # Asterisk paces frames in real time
            writer.write(audiosocket_frame(0x10, pcm[pos : pos + 160].astype("<i2").tobytes()))
            await writer.drain()
            await asyncio.sleep(0.02)
        writer.write(audiosocket_frame(0x03, b"5"))
        writer.write(audiosocket_frame(0x10, bytes(320 * 50)[:320]) * 40)  # trailing silence
        writer.write(audiosocket_frame(0x00, b""))
        await writer.drain()
        await receiver.wait_ended(1, timeout_s=60)
        writer.close()
    (events,) = calls_of(receiver).values()
    assert events[0]["call_id"] == str(call_uuid)
    assert (
        events[0]["data"]["transport"] == "audiosocket"
        and events[0]["data"]["codec"] == "SLIN/8000"
    )
    assert [e["data"]["digit"] for e in events if e["type"] == "dtmf"] == ["1", "5"]
    assert events[-1]["data"]["reason"] == "hangup"
    assert events[-1]["data"]["stats"]["dropped"] == {"unknown_message": 1}
    assert overlap(speech["order"].text, events[-1]["data"]["transcript"]) >= 0.5


@pytest.mark.parametrize("style", ["plain", "json"])
async def test_chan_websocket_call(
    receiver: WebhookReceiver, speech: dict[str, Speech], tmp_path: Path, style: str
) -> None:
    """externalMedia over chan_websocket: MEDIA_START, binary media frames, DTMF_END, close."""
    if style == "plain":
        start = (
            "MEDIA_START connection_id:c0ffee channel:PJSIP/100-0001 format:ulaw "
            "optimal_frame_size:160"
        )
        frames = [
            Encoder(PCMU).encode(c) for c in chunks(read_audio(speech["phone"].path, 8000), 160)
        ]
        dtmf = "DTMF_END digit:7"
    else:
        start = (
            '{"event": "MEDIA_START", "connection_id": "c0ffee", "channel": "PJSIP/100-0001", '
            '"channel_id": "1732770000.42", "format": "slin16", "ptime": 20, '
            '"channel_variables": {"CALLERID(num)": "100"}}'
        )
        pcm = read_audio(speech["phone"].path, 16000)
        frames = [c.astype("<i2").tobytes() for c in chunks(pcm, 320)]
        dtmf = '{"event": "DTMF_END", "digit": "7"}'
    async with running_serve(tmp_path, receiver) as srv, aiohttp.ClientSession() as http:
        async with http.ws_connect(f"http://127.0.0.1:{srv.http_port}/v1/media/asterisk") as ws:
            await ws.send_str(start)
            for f in frames:
                await ws.send_bytes(f)
                await asyncio.sleep(0.02)
            await ws.send_str(dtmf)
            for _ in range(40):
                await ws.send_bytes(bytes(len(frames[0])) if style == "json" else b"\xff" * 160)
                await asyncio.sleep(0.005)
        await receiver.wait_ended(1, timeout_s=60)
    (events,) = calls_of(receiver).values()
    started = events[0]
    assert started["data"]["transport"] == "asterisk_websocket"
    assert started["data"]["channel"] == "PJSIP/100-0001"
    if style == "json":
        assert started["call_id"] == "1732770000.42" and started["data"]["codec"] == "SLIN/16000"
    assert [e["data"]["digit"] for e in events if e["type"] == "dtmf"] == ["7"]
    assert events[-1]["data"]["reason"] == "hangup"
    assert overlap(speech["phone"].text, events[-1]["data"]["transcript"]) >= 0.5


def chunks(pcm: np.ndarray, n: int) -> list[np.ndarray]:
    return [pcm[i : i + n] for i in range(0, pcm.size - n + 1, n)]


async def test_chan_websocket_unsupported_format_closes_with_the_reason(
    receiver: WebhookReceiver, tmp_path: Path
) -> None:
    async with running_serve(tmp_path, receiver) as srv, aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{srv.http_port}/v1/media/asterisk"
        async with http.ws_connect(url) as ws:
            await ws.send_str("MEDIA_START connection_id:x channel:y format:gsm")
            msg = await ws.receive()
        assert msg.type == aiohttp.WSMsgType.CLOSE
        assert ws.close_code == 1008
        assert "format 'gsm' is not supported" in (msg.extra or "")
    assert receiver.events == []


async def test_chan_websocket_media_before_media_start_is_kept(
    receiver: WebhookReceiver, speech: dict[str, Speech], tmp_path: Path
) -> None:
    """Asterisk sent 1.2 s of media before its MEDIA_START: those words used to be lost. They
    are held and lead the call; the whole file is heard."""
    pcm = read_audio(speech["order"].path, 8000)
    frames = [Encoder(PCMU).encode(c) for c in chunks(pcm, 160)]
    start = (
        "MEDIA_START connection_id:early1 channel:PJSIP/100-0002 format:ulaw optimal_frame_size:160"
    )
    async with running_serve(tmp_path, receiver) as srv, aiohttp.ClientSession() as http:
        async with http.ws_connect(f"http://127.0.0.1:{srv.http_port}/v1/media/asterisk") as ws:
            for i, f in enumerate(frames):
                if i == 60:
                    await ws.send_str(start)
                await ws.send_bytes(f)
                await asyncio.sleep(0.02)
            await ws.send_str("MEDIA_XON")  # documented, nothing to transcribe
        await receiver.wait_ended(1, timeout_s=60)
    (events,) = calls_of(receiver).values()
    ended = events[-1]["data"]
    assert events[0]["call_id"] == "early1" and ended["reason"] == "hangup"
    assert ended["audio_ms"] >= len(frames) * 20 - 80 and ended["stats"]["dropped"] == {}
    assert overlap(speech["order"].text, ended["transcript"]) >= 0.5
    assert "hello" in ended["transcript"].split()[:2]  # the first word was in the early audio


async def test_chan_websocket_opus_passthrough(
    receiver: WebhookReceiver, speech: dict[str, Speech], tmp_path: Path
) -> None:
    """``Dial(WebSocket/voxphone/c(opus)p)``: passthrough mode, one Opus packet per BINARY
    frame (WebSocket.md: opus "MUST" use passthrough); JSON control messages."""
    pcm = read_audio(speech["phone"].path, 48000)
    enc = Encoder(OPUS)
    packets = [enc.encode(c) for c in chunks(pcm, 960)]
    start = {"event": "MEDIA_START", "connection_id": "op1", "channel": "WebSocket/voxphone-01",
             "channel_id": "1732770000.77", "format": "opus", "optimal_frame_size": 0, "ptime": 20}  # fmt: skip
    async with running_serve(tmp_path, receiver) as srv, aiohttp.ClientSession() as http:
        async with http.ws_connect(f"http://127.0.0.1:{srv.http_port}/v1/media/asterisk") as ws:
            await ws.send_str(json.dumps(start))
            for p in filter(None, packets):
                await ws.send_bytes(p)
                await asyncio.sleep(0.02)
            await ws.send_str('{"event": "MEDIA_MARK_PROCESSED", "correlation_id": "x"}')
        await receiver.wait_ended(1, timeout_s=60)
    (events,) = calls_of(receiver).values()
    assert events[0]["call_id"] == "1732770000.77" and events[0]["data"]["codec"] == "opus"
    ended = events[-1]["data"]
    assert ended["stats"]["dropped"] == {} and ended["stats"]["decode_errors"] == 0
    assert overlap(speech["phone"].text, ended["transcript"]) >= 0.5


async def test_chan_websocket_plays_nothing_after_a_protocol_error(
    receiver: WebhookReceiver, tmp_path: Path
) -> None:
    """Media frames are played as aiohttp reads them; once a control message is refused, the
    frames Asterisk goes on sending while the socket closes reach the call no more."""
    frame = Encoder(PCMU).encode(np.zeros(160, np.int16))
    start = "MEDIA_START connection_id:bad1 channel:PJSIP/100-0003 format:ulaw"
    async with running_serve(tmp_path, receiver) as srv, aiohttp.ClientSession() as http:
        async with http.ws_connect(f"http://127.0.0.1:{srv.http_port}/v1/media/asterisk") as ws:
            await ws.send_str(start)
            for _ in range(10):
                await ws.send_bytes(frame)
            await ws.send_str("{bad json")
            await asyncio.sleep(0.3)  # refused by now, and voxphone's close frame sent
            for _ in range(100):  # sent before reading that close
                await ws.send_bytes(frame)
            msg = await ws.receive()
        assert msg.type == aiohttp.WSMsgType.CLOSE and ws.close_code == 1008
        await receiver.wait_ended(1, timeout_s=60)
    (events,) = calls_of(receiver).values()
    ended = events[-1]["data"]
    assert ended["reason"] == "protocol_error" and ended["stats"]["packets"] == 10, ended
