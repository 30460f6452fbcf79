"""`voxphone serve` on each event loop end to end: every kind of ingress at once, drained by
SIGTERM while the calls are live, on uvloop's loop (``auto``, the default, where uvloop is
installed) and on asyncio's (``auto`` where it is not); and the one line where uvloop is asked
for and not installed."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import Speech, overlap, voxphone_call, whip
from tests.integration.test_asterisk import audiosocket_frame
from tests.integration.test_calls_api import post
from tests.integration.test_serve import WebhookReceiver, calls_of, ffmpeg_rtp, running_serve
from tests.integration.test_twilio import media_messages
from voxphone.audio.files import read_audio

pytestmark = pytest.mark.integration


async def twilio_call(http_port: int, wav: Path) -> None:
    """One Twilio Media Streams call at real-time pace, hung up with ``stop``."""
    sid = "MZ0e1"
    start = {"accountSid": "AC0", "streamSid": sid, "callSid": "CA0e1", "tracks": ["inbound"],
             "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}  # fmt: skip
    url = f"http://127.0.0.1:{http_port}/v1/media/twilio"
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        await ws.send_json({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        await ws.send_json({"event": "start", "sequenceNumber": "1", "streamSid": sid,
                            "start": start})  # fmt: skip
        for m in media_messages(wav, sid):
            await ws.send_json(m)
            await asyncio.sleep(0.02)
        await ws.send_json({"event": "stop", "streamSid": sid, "stop": {"callSid": "CA0e1"}})


async def audiosocket_call(port: int, wav: Path) -> None:
    """Asterisk's AudioSocket: the call's UUID, 20 ms slin frames in real time, hang-up."""
    pcm = read_audio(wav, 8000)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(audiosocket_frame(0x01, uuid.uuid4().bytes))
    for pos in range(0, pcm.size, 160):
        writer.write(audiosocket_frame(0x10, pcm[pos : pos + 160].astype("<i2").tobytes()))
        await writer.drain()
        await asyncio.sleep(0.02)
    writer.write(audiosocket_frame(0x00, b""))
    await writer.drain()
    await reader.read()  # until voxphone closes it
    writer.close()


async def api_call(http_port: int, wav: Path) -> None:
    """The calls API's way (a port of its own, POST /v1/calls), the caller `voxphone call`."""
    status, text, _ = await post(http_port, '{"codec": "PCMU"}', "application/json")
    assert status == 201, text
    await voxphone_call(wav, json.loads(text)["rtp_port"])


def without_uvloop(tmp_path: Path) -> dict[str, str]:
    """An environment as where uvloop was never installed: its import fails (a stand-in
    earlier on ``PYTHONPATH``)."""
    hidden = tmp_path / "hidden" / "uvloop"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('No module named uvloop')\n")
    path = [str(hidden.parent), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {"PYTHONPATH": os.pathsep.join(path)}


@pytest.mark.parametrize("uvloop", [True, False], ids=["uvloop", "asyncio-without-uvloop"])
async def test_every_ingress_on_each_loop_drained_by_sigterm(
    uvloop: bool, receiver: WebhookReceiver, speech: dict[str, Speech], tmp_path: Path
) -> None:
    """RTP from ffmpeg, a calls-API call, a Twilio media stream, AudioSocket and WebRTC
    (`voxphone whip`, aiortc), then SIGTERM while all five are up: they go on to their own ends
    (not ``shutdown``), every event is delivered, and the process exits 0. The loop is the
    default's (``auto``): uvloop's, or asyncio's where uvloop is not installed."""
    if uvloop:
        pytest.importorskip("uvloop")
    async with running_serve(
        tmp_path, receiver, n_ports=6,
        VOXPHONE_RTP__INACTIVITY_TIMEOUT_S="1.0",
        VOXPHONE_CALLS__DRAIN_S="30",  # the tests' default is 0: no drain
        **({} if uvloop else without_uvloop(tmp_path)),
    ) as srv:  # fmt: skip
        assert srv.process is not None
        whip_url = f"http://127.0.0.1:{srv.http_port}/v1/whip"
        calls = asyncio.gather(
            # to the range's last port: the calls API allocates from the first even one
            ffmpeg_rtp(speech["order"].path, srv.rtp_ports[1], "-ar", "8000", "-acodec", "pcm_mulaw"),
            twilio_call(srv.http_port, speech["phone"].path),
            whip(whip_url, speech["order"].path),
            audiosocket_call(srv.audiosocket_port, speech["phone"].path),
            api_call(srv.http_port, speech["phone"].path),
        )  # fmt: skip
        await receiver.wait_for("call.started", 5, timeout_s=30)
        srv.process.send_signal(signal.SIGTERM)
        _, _, whip_events, _, _ = await calls
        assert await asyncio.wait_for(srv.process.wait(), 60) == 0
    log = [json.loads(line) for line in (tmp_path / "serve.log").read_text().splitlines()]
    (ready,) = [e for e in log if e["event"] == "voxphone_ready"]
    assert ready["event_loop"] == ("uvloop" if uvloop else "asyncio")
    fell_back = [e for e in log if e["event"] == "event_loop_auto"]
    assert len(fell_back) == (0 if uvloop else 1), fell_back  # the fallback says why
    (draining,) = [e for e in log if e["event"] == "voxphone_draining"]
    assert draining["active_calls"] == 5

    def kind(started: dict) -> str:  # type: ignore[type-arg]
        api = "expected_remote_ip" in started["data"]  # POST /v1/calls said where from
        return started["data"]["transport"] + ("-api" if api else "")

    ended = {kind(e[0]): e[-1]["data"] for e in calls_of(receiver).values()}
    reasons = {transport: e["reason"] for transport, e in ended.items()}
    assert reasons == {"rtp": "inactivity", "rtp-api": "bye", "twilio": "stop",
                       "audiosocket": "hangup", "webrtc": "hangup"}, reasons  # fmt: skip
    spoken = {"rtp": "order", "rtp-api": "phone", "twilio": "phone", "audiosocket": "phone",
              "webrtc": "order"}  # fmt: skip
    for transport, key in spoken.items():
        # Every call's audio arrived whole. Five sphinx calls at once on CI's two cores may
        # run out the engine's flush time at the drain (engine_flush_timeout), so the words
        # are asked of one call only: recognition is not what this test is about.
        audio_ms = read_audio(speech[key].path, 8000).size / 8
        assert ended[transport]["audio_ms"] >= audio_ms - 100, (transport, ended[transport])
        assert ended[transport]["stats"]["decode_errors"] == 0, transport
        assert ended[transport]["transcript"], transport
    heard = ended["webrtc"]["transcript"]
    assert overlap(speech["order"].text, heard) >= 0.5, heard
    assert whip_events[-1]["type"] == "call.ended"
    assert whip_events[-1]["data"]["transcript"] == ended["webrtc"]["transcript"]
    assert receiver.bad_signatures == 0


def test_serve_and_check_config_refuse_a_uvloop_that_is_not_there_in_one_line(
    tmp_path: Path,
) -> None:
    env = {**os.environ, **without_uvloop(tmp_path)}
    f = tmp_path / "voxphone.toml"
    f.write_text('[process]\nevent_loop = "uvloop"\n')
    why = (
        'process.event_loop = "uvloop" needs the uvloop package, which is not installed: '
        "pip install uvloop, or choose asyncio"
    )
    variable = {"VOXPHONE_PROCESS__EVENT_LOOP": "uvloop"}
    for args, more, source in [
        (["serve", "--event-loop", "uvloop"], variable, "--event-loop"),  # the flag beats it
        (["serve"], variable, "VOXPHONE_PROCESS__EVENT_LOOP"),
        (["serve", "--config", str(f)], {}, str(f)),
        (["check-config", str(f)], {}, str(f)),
    ]:
        r = subprocess.run(
            [sys.executable, "-m", "voxphone", *args],
            capture_output=True, text=True, env={**env, **more}, timeout=60,
        )  # fmt: skip
        assert r.returncode == 2, r.stderr
        assert r.stderr.splitlines() == [f"voxphone: error: {source}: {why}"], r.stderr
        assert r.stdout == "", "check-config prints the config only when serve would start"
