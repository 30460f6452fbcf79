"""A Twilio Media Streams client written from Twilio's documented message shapes, streaming
synthesised speech at real-time pace into `voxphone serve`."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from tests.conftest import Speech, overlap
from tests.integration.test_serve import WebhookReceiver, calls_of, running_serve
from voxphone.audio.codecs import PCMU, Codec, Encoder
from voxphone.audio.files import read_audio

pytestmark = pytest.mark.integration


def media_messages(wav: Path, stream_sid: str) -> list[dict[str, Any]]:
    pcm = read_audio(wav, 8000)
    enc = Encoder(PCMU)
    out = []
    for i, pos in enumerate(range(0, pcm.size - 159, 160)):
        payload = base64.b64encode(enc.encode(pcm[pos : pos + 160])).decode()
        out.append({
            "event": "media", "sequenceNumber": str(i + 3), "streamSid": stream_sid,
            "media": {"track": "inbound", "chunk": str(i + 1), "timestamp": str(i * 20), "payload": payload},
        })  # fmt: skip
    return out


def telnyx_media(wav: Path, codec: Codec, stream_id: str) -> list[dict[str, Any]]:
    """Telnyx ``media`` messages of 20 ms each (sequence numbers after ``start``'s 1)."""
    pcm = read_audio(wav, 8000)
    enc = Encoder(codec)
    return [
        {"event": "media", "sequence_number": str(i + 2), "stream_id": stream_id,
         "media": {"track": "inbound", "chunk": str(i + 1), "timestamp": str(i * 20),
                   "payload": base64.b64encode(enc.encode(pcm[p : p + 160])).decode()}}
        for i, p in enumerate(range(0, pcm.size - 159, 160))
    ]  # fmt: skip


@pytest.mark.parametrize("ending", ["stop", "disconnect"])
async def test_twilio_stream(
    receiver: WebhookReceiver, speech: dict[str, Speech], tmp_path: Path, ending: str
) -> None:
    sid = "MZ18ad3ab5a668481ce02b83e7395059f0"
    start = {
        "event": "start", "sequenceNumber": "1", "streamSid": sid,
        "start": {"accountSid": "AC0", "streamSid": sid, "callSid": "CA5e2f", "tracks": ["inbound"],
                  "customParameters": {"tenant": "acme", "agent": "billing"},
                  "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}},
    }  # fmt: skip
    media = media_messages(speech["order"].path, sid)
    media[20], media[21] = media[21], media[20]  # reordered
    media.insert(40, media[39])  # duplicated
    del media[60]  # missing
    async with running_serve(tmp_path, receiver) as srv, aiohttp.ClientSession() as http:
        async with http.ws_connect(f"http://127.0.0.1:{srv.http_port}/v1/media/twilio") as ws:
            await ws.send_str(
                json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"})
            )
            await ws.send_str(json.dumps(start))
            await ws.send_str(json.dumps({"event": "surprise", "streamSid": sid}))  # undocumented
            for m in media:
                await ws.send_str(json.dumps(m))
                await asyncio.sleep(0.02)
            dtmf = {
                "event": "dtmf",
                "streamSid": sid,
                "sequenceNumber": "999",
                "dtmf": {"track": "inbound_track", "digit": "1"},
            }
            await ws.send_str(json.dumps(dtmf))
            if ending == "stop":
                await ws.send_str(
                    json.dumps(
                        {
                            "event": "stop",
                            "sequenceNumber": "1000",
                            "streamSid": sid,
                            "stop": {"accountSid": "AC0", "callSid": "CA5e2f"},
                        }
                    )
                )
        await receiver.wait_ended(1, timeout_s=60)
    (events,) = calls_of(receiver).values()
    started, ended = events[0], events[-1]
    assert started["call_id"] == "CA5e2f" and all(e["call_id"] == "CA5e2f" for e in events)
    assert started["data"]["custom_parameters"] == {"tenant": "acme", "agent": "billing"}
    assert started["data"]["stream_sid"] == sid
    assert [e["data"]["digit"] for e in events if e["type"] == "dtmf"] == ["1"]
    assert ended["data"]["reason"] == ("stop" if ending == "stop" else "disconnected")
    t = ended["data"]["transport"]
    assert t["reordered"] == 1 and t["duplicates"] + t["late"] == 1
    assert ended["data"]["stats"]["dropped"] == {"unknown_message": 1}
    assert overlap(speech["order"].text, ended["data"]["transcript"]) >= 0.5


async def test_bad_frame_closes_with_the_reason_and_keeps_the_call(
    receiver: WebhookReceiver, speech: dict[str, Speech], tmp_path: Path
) -> None:
    sid = "MZ1"
    start = {
        "event": "start",
        "sequenceNumber": "1",
        "streamSid": sid,
        "start": {"callSid": "CA9", "streamSid": sid},
    }
    async with running_serve(tmp_path, receiver) as srv, aiohttp.ClientSession() as http:
        async with http.ws_connect(f"http://127.0.0.1:{srv.http_port}/v1/media/twilio") as ws:
            await ws.send_str(json.dumps(start))
            for m in media_messages(speech["order"].path, sid)[:50]:
                await ws.send_str(json.dumps(m))
            await ws.send_str(
                '{"event": "media", "sequenceNumber": "2", "media": {"timestamp": "0", "payload": "%%%"}}'
            )
            msg = await ws.receive()
        assert msg.type == aiohttp.WSMsgType.CLOSE and ws.close_code == 1007
        assert "media.payload is not base64" in (msg.extra or "")
        await receiver.wait_ended(1, timeout_s=60)
    (events,) = calls_of(receiver).values()
    assert events[0]["type"] == "call.started" and events[-1]["data"]["reason"] == "protocol_error"
    assert events[-1]["data"]["audio_ms"] >= 900  # the audio before the bad frame was kept


async def test_telnyx_stream_reordered_in_flight(
    receiver: WebhookReceiver, speech: dict[str, Speech], tmp_path: Path
) -> None:
    """Telnyx does not guarantee frame order: frames shuffled within 60 ms windows still make
    the words, in order."""
    import random

    from voxphone.audio.codecs import PCMA

    frames = telnyx_media(speech["order"].path, PCMA, "s1")
    rng = random.Random(7)
    shuffled = []
    for i in range(0, len(frames), 3):
        window = frames[i : i + 3]
        rng.shuffle(window)
        shuffled += window
    start = {"event": "start", "sequence_number": "1", "stream_id": "s1",
             "start": {"call_control_id": "v2:abc", "client_state": "xyz", "from": "+1312", "to": "+1313",
                       "media_format": {"encoding": "PCMA", "sample_rate": 8000, "channels": 1}}}  # fmt: skip
    async with running_serve(tmp_path, receiver) as srv, aiohttp.ClientSession() as http:
        async with http.ws_connect(f"http://127.0.0.1:{srv.http_port}/v1/media/telnyx") as ws:
            await ws.send_str(json.dumps({"event": "connected", "version": "1.0.0"}))
            await ws.send_str(json.dumps(start))
            for m in shuffled:
                await ws.send_str(json.dumps(m))
                await asyncio.sleep(0.02)
            await ws.send_str(
                json.dumps({"event": "stop", "sequence_number": "9999", "stream_id": "s1"})
            )
        await receiver.wait_ended(1, timeout_s=60)
    (events,) = calls_of(receiver).values()
    assert events[0]["call_id"] == "v2:abc" and events[0]["data"]["codec"] == "PCMA"
    assert events[0]["data"]["client_state"] == "xyz"
    ended = events[-1]["data"]
    assert ended["reason"] == "stop" and ended["transport"]["reordered"] > 10
    assert ended["transport"]["late"] == 0 and ended["stats"]["late_packets"] == 0
    assert overlap(speech["order"].text, ended["transcript"]) >= 0.5


async def test_vonage_stream(
    receiver: WebhookReceiver, speech: dict[str, Speech], tmp_path: Path
) -> None:
    """Vonage NCCO `connect` to a websocket: a TEXT `websocket:connected` with the content type
    and your headers, BINARY 16 kHz s16le 20 ms frames, `websocket:dtmf`, then the socket closes."""
    pcm = read_audio(speech["order"].path, 16000)
    connected = {"event": "websocket:connected", "content-type": "audio/l16;rate=16000",
                 "uuid": "vonage-call-77", "caller": "447700900000"}  # fmt: skip
    async with running_serve(tmp_path, receiver) as srv, aiohttp.ClientSession() as http:
        async with http.ws_connect(f"http://127.0.0.1:{srv.http_port}/v1/media/vonage") as ws:
            await ws.send_str(json.dumps(connected))
            for pos in range(0, pcm.size - 319, 320):
                await ws.send_bytes(pcm[pos : pos + 320].astype("<i2").tobytes())
                await asyncio.sleep(0.02)
            await ws.send_str(
                json.dumps({"event": "websocket:dtmf", "digit": "9", "duration": 250})
            )
        await receiver.wait_ended(1, timeout_s=60)
    (events,) = calls_of(receiver).values()
    assert events[0]["call_id"] == "vonage-call-77" and events[0]["data"]["codec"] == "SLIN/16000"
    assert events[0]["data"]["caller"] == "447700900000"
    assert [
        (e["data"]["digit"], e["data"]["duration_ms"]) for e in events if e["type"] == "dtmf"
    ] == [("9", 250)]
    assert events[-1]["data"]["reason"] == "hangup"
    assert overlap(speech["order"].text, events[-1]["data"]["transcript"]) >= 0.5


async def test_stereo_stream_transcribes_the_caller_channel(
    receiver: WebhookReceiver, speech: dict[str, Speech], tmp_path: Path
) -> None:
    """jambonz `listen` / mod_audio_fork stereo: caller and callee interleaved; only the caller
    (left) is transcribed, the callee's loud tone on the right is not heard."""
    caller = read_audio(speech["order"].path, 8000)
    t = np.arange(caller.size) / 8000
    callee = (np.sin(2 * np.pi * 440 * t) * 12000).astype(np.int16)
    stereo = np.column_stack([caller, callee]).reshape(-1).astype("<i2").tobytes()
    meta = {"callSid": "jb-5", "sampleRate": 8000, "mixType": "stereo", "from": "+15550100"}
    async with running_serve(tmp_path, receiver) as srv, aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{srv.http_port}/v1/media/stream"
        async with http.ws_connect(url, protocols=("audio.jambonz.org",)) as ws:
            assert ws.protocol == "audio.jambonz.org"
            await ws.send_str(json.dumps(meta))
            for pos in range(
                0, len(stereo) - 638, 638
            ):  # odd-sized chunks: samples split across frames
                await ws.send_bytes(stereo[pos : pos + 638])
                await asyncio.sleep(0.02)
        await receiver.wait_ended(1, timeout_s=60)
    (events,) = calls_of(receiver).values()
    assert events[0]["call_id"] == "jb-5" and events[0]["data"]["transport"] == "stream"
    assert overlap(speech["order"].text, events[-1]["data"]["transcript"]) >= 0.5
    assert abs(events[-1]["data"]["audio_ms"] - caller.size / 8) <= 200  # one channel's worth


async def test_token_and_twilio_signature_are_enforced(
    receiver: WebhookReceiver, tmp_path: Path
) -> None:
    """`http.token` guards /v1/ (query or bearer); with Twilio's auth token configured, a stream
    without a valid X-Twilio-Signature is refused before the websocket opens."""
    from voxphone.transports.mediastream import twilio_signature

    async with running_serve(
        tmp_path, receiver, VOXPHONE_HTTP__TOKEN="s3cret", VOXPHONE_TWILIO__AUTH_TOKEN="tw-auth",
        VOXPHONE_HTTP__PUBLIC_URL="https://voxphone.example.com",
    ) as srv, aiohttp.ClientSession() as http:  # fmt: skip
        base = f"http://127.0.0.1:{srv.http_port}"
        async with http.get(f"{base}/v1/calls") as r:
            assert r.status == 401 and "missing or wrong token" in await r.text()
        async with http.get(f"{base}/v1/calls", headers={"Authorization": "Bearer s3cret"}) as r:
            assert r.status == 200
        async with http.get(f"{base}/health") as r:
            assert r.status == 200
        path = "/v1/media/twilio?token=s3cret"
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(base + path, headers={"X-Twilio-Signature": "forged"})
        assert refused.value.status == 403
        good = twilio_signature("tw-auth", "https://voxphone.example.com" + path)
        async with http.ws_connect(base + path, headers={"X-Twilio-Signature": good}) as ws:
            await ws.send_str(
                json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"})
            )
            await ws.close()


async def test_stereo_stream_as_two_speakers(
    receiver: WebhookReceiver, speech: dict[str, Speech], tmp_path: Path
) -> None:
    """`media_streams.stereo = "both"`: each channel is its own call, and every event says which."""
    left = read_audio(speech["order"].path, 8000)
    right = read_audio(speech["phone"].path, 8000)
    n = max(left.size, right.size)
    stereo = np.zeros((n, 2), np.int16)
    stereo[: left.size, 0], stereo[: right.size, 1] = left, right
    data = stereo.reshape(-1).astype("<i2").tobytes()
    async with (
        running_serve(tmp_path, receiver, VOXPHONE_MEDIA_STREAMS__STEREO="both") as srv,
        aiohttp.ClientSession() as http,
    ):
        url = f"http://127.0.0.1:{srv.http_port}/v1/media/stream?rate=8k&mix=stereo"
        async with http.ws_connect(url, protocols=("audio.drachtio.org",)) as ws:
            await ws.send_str(json.dumps({"call_id": "fs-9"}))
            for pos in range(0, len(data), 640):
                await ws.send_bytes(data[pos : pos + 640])
                await asyncio.sleep(0.02)
        await receiver.wait_ended(2, timeout_s=60)
    calls = calls_of(receiver)
    assert set(calls) == {"fs-9", "fs-9:callee"}
    for call_id, channel, key in (("fs-9", 0, "order"), ("fs-9:callee", 1, "phone")):
        events = calls[call_id]
        assert all(e["data"]["channel"] == channel for e in events)
        assert overlap(speech[key].text, events[-1]["data"]["transcript"]) >= 0.5


@pytest.mark.parametrize("metadata", ["late", "none"])
async def test_mod_audio_stream_audio_before_or_without_metadata(
    receiver: WebhookReceiver, speech: dict[str, Speech], tmp_path: Path, metadata: str
) -> None:
    """mod_audio_stream sends its metadata "first" only when given: audio that comes before it
    (or without it) used to close the stream with 1007. The call opens (from the metadata when
    it comes within EARLY_AUDIO_MS, else from the URL), nothing is lost, and metadata that
    comes after the call opened is merged into it."""
    pcm = read_audio(speech["order"].path, 16000)
    chunks = [pcm[p : p + 320].astype("<i2").tobytes() for p in range(0, pcm.size - 319, 320)]
    late_at = {"late": 15, "none": 100}[metadata]  # 300 ms: within the hold; 2 s: after it
    async with running_serve(tmp_path, receiver) as srv, aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{srv.http_port}/v1/media/stream?rate=16k&uuid=fs-url-1"
        async with http.ws_connect(url) as ws:
            for i, c in enumerate(chunks):
                if i == late_at:
                    await ws.send_str(json.dumps({"call_id": "fs-meta-1", "from": "+15550100"}))
                await ws.send_bytes(c)
                await asyncio.sleep(0.02)
        await receiver.wait_ended(1, timeout_s=60)
    (events,) = calls_of(receiver).values()
    started, ended = events[0], events[-1]["data"]
    if metadata == "late":
        assert started["call_id"] == "fs-meta-1" and started["data"]["from"] == "+15550100"
    else:
        assert started["call_id"] == "fs-url-1" and "from" not in started["data"]
        assert ended["metadata"] == {"call_id": "fs-meta-1", "from": "+15550100"}
    assert started["data"]["codec"] == "SLIN/16000" and ended["reason"] == "hangup"
    assert ended["audio_ms"] >= len(chunks) * 20 - 80
    assert overlap(speech["order"].text, ended["transcript"]) >= 0.5


async def test_jambonz_listen_at_64khz_with_pass_dtmf(
    receiver: WebhookReceiver, speech: dict[str, Speech], tmp_path: Path
) -> None:
    """jambonz documents sampleRate up to 64000 (refused with 1007 before) and, with passDtmf,
    key presses as TEXT {"event": "dtmf", "dtmf", "duration" (8 kHz samples)}."""
    pcm = read_audio(speech["order"].path, 64000)
    meta = {"callSid": "jb-64", "sampleRate": 64000, "mixType": "mono", "from": "+15550100",
            "direction": "inbound", "metadata": {"tenant": "acme"}}  # fmt: skip
    async with running_serve(tmp_path, receiver) as srv, aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{srv.http_port}/v1/media/stream"
        async with http.ws_connect(url, protocols=("audio.jambonz.org",)) as ws:
            await ws.send_str(json.dumps(meta))
            for pos in range(0, pcm.size - 1279, 1280):
                await ws.send_bytes(pcm[pos : pos + 1280].astype("<i2").tobytes())
                await asyncio.sleep(0.02)
            await ws.send_str(json.dumps({"event": "dtmf", "dtmf": "3", "duration": 1600}))
        await receiver.wait_ended(1, timeout_s=60)
    (events,) = calls_of(receiver).values()
    assert events[0]["call_id"] == "jb-64" and events[0]["data"]["codec"] == "SLIN/64000"
    dtmf = [(e["data"]["digit"], e["data"]["duration_ms"]) for e in events if e["type"] == "dtmf"]
    assert dtmf == [("3", 200)]
    assert overlap(speech["order"].text, events[-1]["data"]["transcript"]) >= 0.5


async def test_telnyx_media_that_overtakes_start_is_kept(
    receiver: WebhookReceiver, speech: dict[str, Speech], tmp_path: Path
) -> None:
    """Telnyx: "Media frame order is not guaranteed". The first 200 ms arrive before `start`
    (which used to close the stream with 1007 and make no call): held, then played in order."""
    media = telnyx_media(speech["order"].path, PCMU, "s2")
    start = {"event": "start", "sequence_number": "1", "stream_id": "s2",
             "start": {"call_control_id": "v2:early", "media_format": {"encoding": "PCMU", "sample_rate": 8000, "channels": 1}}}  # fmt: skip
    async with running_serve(tmp_path, receiver) as srv, aiohttp.ClientSession() as http:
        async with http.ws_connect(f"http://127.0.0.1:{srv.http_port}/v1/media/telnyx") as ws:
            await ws.send_str(json.dumps({"event": "connected", "version": "1.0.0"}))
            for i, m in enumerate(media):
                if i == 10:
                    await ws.send_str(json.dumps(start))
                await ws.send_str(json.dumps(m))
                await asyncio.sleep(0.02)
            await ws.send_str(json.dumps({"event": "stop", "sequence_number": "999"}))
        await receiver.wait_ended(1, timeout_s=60)
    (events,) = calls_of(receiver).values()
    ended = events[-1]["data"]
    assert events[0]["call_id"] == "v2:early" and ended["reason"] == "stop"
    assert ended["audio_ms"] >= len(media) * 20 - 80 and ended["stats"]["dropped"] == {}
    assert overlap(speech["order"].text, ended["transcript"]) >= 0.5
