"""`voxphone serve --event-loop uvloop` end to end: an RTP call from ffmpeg, a Twilio media stream
and a WebRTC call (`voxphone whip`, aiortc) at once, all on uvloop's loop, drained by SIGTERM
while they are live; and the one line where uvloop is asked for and not installed."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import Speech, overlap, whip
from tests.integration.test_serve import WebhookReceiver, calls_of, ffmpeg_rtp, running_serve
from tests.integration.test_twilio import media_messages

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


async def until_started(receiver: WebhookReceiver, n: int, timeout_s: float = 30) -> None:
    async with asyncio.timeout(timeout_s):
        while sum(e["type"] == "call.started" for e in receiver.events) < n:
            receiver.changed.clear()
            await receiver.changed.wait()


async def test_rtp_twilio_and_webrtc_calls_on_uvloop_drained_by_sigterm(
    receiver: WebhookReceiver, speech: dict[str, Speech], tmp_path: Path
) -> None:
    """SIGTERM while all three calls are up: they go on to their own ends (not ``shutdown``),
    every event is delivered, and the process exits 0: the drain, on uvloop's signal handling."""
    pytest.importorskip("uvloop")
    async with running_serve(
        tmp_path,
        receiver,
        "--event-loop",
        "uvloop",
        VOXPHONE_RTP__INACTIVITY_TIMEOUT_S="1.0",
        VOXPHONE_CALLS__DRAIN_S="30",  # the tests' default is 0: no drain
    ) as srv:
        assert srv.process is not None
        whip_url = f"http://127.0.0.1:{srv.http_port}/v1/whip"
        calls = asyncio.gather(
            ffmpeg_rtp(speech["order"].path, srv.rtp_ports[0], "-ar", "8000", "-acodec", "pcm_mulaw"),
            twilio_call(srv.http_port, speech["phone"].path),
            whip(whip_url, speech["order"].path),
        )  # fmt: skip
        await until_started(receiver, 3)
        srv.process.send_signal(signal.SIGTERM)
        _, _, whip_events = await calls
        assert await asyncio.wait_for(srv.process.wait(), 60) == 0
    log = [json.loads(line) for line in (tmp_path / "serve.log").read_text().splitlines()]
    (ready,) = [e for e in log if e["event"] == "voxphone_ready"]
    assert ready["event_loop"] == "uvloop"
    (draining,) = [e for e in log if e["event"] == "voxphone_draining"]
    assert draining["active_calls"] == 3

    ended = {
        events[0]["data"]["transport"]: events[-1]["data"]
        for events in calls_of(receiver).values()
        if events[-1]["type"] == "call.ended"
    }
    assert set(ended) == {"rtp", "twilio", "webrtc"}, ended.keys()
    assert ended["rtp"]["reason"] == "inactivity" and ended["twilio"]["reason"] == "stop"
    assert ended["webrtc"]["reason"] != "shutdown"
    for transport, key in (("rtp", "order"), ("twilio", "phone"), ("webrtc", "order")):
        heard = ended[transport]["transcript"]
        assert overlap(speech[key].text, heard) >= 0.5, (transport, heard)
        assert ended[transport]["stats"]["decode_errors"] == 0, transport
    assert whip_events[-1]["type"] == "call.ended"
    assert whip_events[-1]["data"]["transcript"] == ended["webrtc"]["transcript"]
    assert receiver.bad_signatures == 0


def test_serve_and_check_config_refuse_a_uvloop_that_is_not_there_in_one_line(
    tmp_path: Path,
) -> None:
    """As where uvloop was never installed: its import fails (a stand-in earlier on the path)."""
    hidden = tmp_path / "hidden" / "uvloop"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('No module named uvloop')\n")
    path = [str(hidden.parent), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    f = tmp_path / "voxphone.toml"
    f.write_text('[process]\nevent_loop = "uvloop"\n')
    for args in (["serve", "--event-loop", "uvloop"], ["check-config", str(f)]):
        r = subprocess.run(
            [sys.executable, "-m", "voxphone", *args],
            capture_output=True, text=True, env=env, timeout=60,
        )  # fmt: skip
        assert r.returncode == 2, r.stderr
        assert r.stderr.splitlines() == [
            'voxphone: error: process.event_loop = "uvloop" needs the uvloop package, which is '
            "not installed: pip install uvloop (voxphone's uvloop extra), or choose asyncio"
        ], r.stderr
