"""POST /v1/calls (JSON and SDP offer/answer) and DELETE, against a running `voxphone serve`."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from tests.conftest import Speech, overlap, voxphone_call
from tests.integration.test_serve import (
    WebhookReceiver,
    calls_of,
    ffmpeg_rtp,
    running_serve,
)
from voxphone.audio.codecs import PCMU
from voxphone.audio.files import read_audio
from voxphone.testing import rtp_packets, send_rtp

pytestmark = pytest.mark.integration


async def post(port: int, body: str | bytes, content_type: str) -> tuple[int, str, dict[str, str]]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"http://127.0.0.1:{port}/v1/calls", data=body, headers={"Content-Type": content_type}
        ) as r,
    ):
        return r.status, await r.text(), dict(r.headers)


async def until_audio(http_port: int, call_id: str, timeout_s: float = 15) -> None:
    """Until the live call has received some audio (GET /v1/calls)."""
    async with aiohttp.ClientSession() as http, asyncio.timeout(timeout_s):
        while True:
            async with http.get(f"http://127.0.0.1:{http_port}/v1/calls") as r:
                calls = {c["call_id"]: c for c in (await r.json())["calls"]}
            if calls.get(call_id, {}).get("audio_ms", 0) > 0:
                return
            await asyncio.sleep(0.05)


async def stranger(port: int, seconds: float) -> None:
    """Valid RTP (a loud tone) from another source, aimed at an allocated port."""
    pcm = (np.sin(np.arange(int(8000 * seconds)) / 2) * 20000).astype(np.int16)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for p in rtp_packets(pcm, PCMU, seed=11):
            s.sendto(p.serialize(), ("127.0.0.1", port))
            await asyncio.sleep(0.02)


async def test_json_call_latches_to_its_caller_and_drops_strangers(
    receiver: WebhookReceiver, speech: dict[str, Speech], tmp_path: Path
) -> None:
    async with running_serve(tmp_path, receiver) as srv:
        status, text, headers = await post(
            srv.http_port,
            '{"codec": "PCMU", "metadata": {"from": "+15550100"}}',
            "application/json",
        )
        assert status == 201, text
        reply = json.loads(text)
        assert headers["Location"] == f"/v1/calls/{reply['call_id']}"
        assert reply["rtp_host"] == "127.0.0.1" and reply["rtp_port"] % 2 == 0
        caller = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "voxphone", "call", str(speech["order"].path),
            "--to", f"127.0.0.1:{reply['rtp_port']}", stdout=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        await until_audio(srv.http_port, reply["call_id"])  # the caller has latched the port
        await stranger(reply["rtp_port"], 1.5)
        assert await caller.wait() == 0
        await receiver.wait_ended(1, timeout_s=60)
    (events,) = calls_of(receiver).values()
    assert events[0]["call_id"] == reply["call_id"]
    assert events[0]["data"]["from"] == "+15550100"
    assert events[-1]["data"]["reason"] == "bye"
    assert overlap(speech["order"].text, events[-1]["data"]["transcript"]) >= 0.5


async def test_sdp_offer_answer_then_delete(
    receiver: WebhookReceiver, speech: dict[str, Speech], tmp_path: Path
) -> None:
    offer = (
        "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=gw\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
        "m=audio 5004 RTP/AVP 118 0 101 102\r\na=rtpmap:118 L16/16000\r\n"
        "a=rtpmap:101 telephone-event/8000\r\na=rtpmap:102 telephone-event/16000\r\n"
        "a=ptime:20\r\n"
    )
    async with running_serve(tmp_path, receiver) as srv:
        status, sdp, headers = await post(srv.http_port, offer, "application/sdp")
        assert status == 201, sdp
        assert headers["Content-Type"].startswith("application/sdp")
        media = next(line for line in sdp.splitlines() if line.startswith("m=audio"))
        # L16/16000 alone on its 16 kHz clock (PCMU's is 8 kHz); events on that clock (RFC 4733)
        assert media.split()[3:] == ["118", "102"]
        await ffmpeg_rtp(
            speech["order"].path, int(media.split()[1]), "-ar", "16000", "-acodec", "pcm_s16be",
            "-payload_type", "118",
        )  # fmt: skip
        async with aiohttp.ClientSession() as http:
            async with http.delete(f"http://127.0.0.1:{srv.http_port}{headers['Location']}") as r:
                assert r.status == 204
            async with http.delete(f"http://127.0.0.1:{srv.http_port}/v1/calls/call_nope") as r:
                assert r.status == 404 and "no live call 'call_nope'" in await r.text()
        await receiver.wait_ended(1, timeout_s=60)
    (events,) = calls_of(receiver).values()
    assert events[0]["data"]["codec"] == "L16/16000"
    assert events[-1]["data"]["reason"] == "hangup"
    assert overlap(speech["order"].text, events[-1]["data"]["transcript"]) >= 0.5


async def test_refusals_are_precise_and_allocate_nothing(
    receiver: WebhookReceiver, tmp_path: Path
) -> None:
    cases = [
        ("{nope", "application/json", 400, "body is not JSON"),
        ('{"codec": "speex"}', "application/json", 422, "unknown codec 'speex'"),
        ('{"codec": "opus"}', "application/json", 400, "payload_type: opus has no static"),
        ('{"codec": "PCMU", "colour": 1}', "application/json", 400, "colour: Extra inputs"),
        ("[]", "application/json", 400, "body: expected a JSON object"),
        ('{"remote_ip": "999.0.0.1"}', "application/json", 400, "remote_ip: '999.0.0.1' is not"),
        ('{"remote_ip": "gw.example"}', "application/json", 400, "is not an IPv4 or IPv6 address"),
        ("v=0", "text/plain", 415, "send application/json or application/sdp"),
        ("hello", "application/sdp", 400, "SDP must start with 'v=0'"),
        ("v=0\r\nm=video 5 RTP/AVP 96\r\n", "application/sdp", 422, "no audio stream"),
    ]
    async with running_serve(
        tmp_path, receiver, n_ports=2, VOXPHONE_RTP__NO_MEDIA_TIMEOUT_S="1.0"
    ) as srv:
        for body, ctype, want, message in cases:
            status, text, _ = await post(srv.http_port, body, ctype)
            assert (status, message in text) == (want, True), (body, text)
        # Two ports: two calls fit, the third is refused; unused ones end for lack of media.
        ok = [await post(srv.http_port, "{}", "application/json") for _ in range(2)]
        assert [s for s, _, _ in ok] == [201, 201]
        status, text, _ = await post(srv.http_port, "{}", "application/json")
        assert status == 503 and "no free RTP port" in text
        await receiver.wait_ended(2, timeout_s=10)
        async with asyncio.timeout(5):  # until the sweeper frees a port
            while (reply := await post(srv.http_port, "{}", "application/json"))[0] == 503:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        assert reply[0] == 201, reply
    reasons = [e["data"]["reason"] for e in receiver.events if e["type"] == "call.ended"]
    assert reasons[:2] == ["no_media", "no_media"]


async def test_a_call_can_have_its_own_webhook(
    receiver: WebhookReceiver, speech: dict[str, Speech], tmp_path: Path
) -> None:
    own = WebhookReceiver()
    await own.server.start_server()
    try:
        # The receiver is on loopback: a per-call URL may reach it only when allowed.
        allowed = {"VOXPHONE_WEBHOOK__ALLOWED_HOSTS": '["127.0.0.1"]'}
        async with running_serve(tmp_path, receiver, **allowed) as srv:
            body = {"codec": "PCMA", "webhook_url": str(own.server.make_url("/hooks"))}
            status, text, _ = await post(srv.http_port, json.dumps(body), "application/json")
            assert status == 201, text
            reply = json.loads(text)
            await voxphone_call(speech["phone"].path, reply["rtp_port"], "--codec", "pcma")
            await own.wait_ended(1, timeout_s=60)
            status, text, _ = await post(
                srv.http_port, '{"webhook_url": "ftp://x"}', "application/json"
            )
            assert status == 400 and "webhook_url: " in text and "only http:// and https://" in text
            for url in ("http://10.0.0.5/x", "http://169.254.169.254/latest/meta-data/"):
                body = {"codec": "PCMA", "webhook_url": url}
                status, text, _ = await post(srv.http_port, json.dumps(body), "application/json")
                assert status == 400 and "webhook.allowed_hosts" in text, text
    finally:
        await own.server.close()
    assert receiver.events == []  # the configured webhook saw none of that call
    assert own.bad_signatures == 0
    events = own.events
    durable = [e for e in events if e["type"] != "transcript.delta"]
    assert [e["seq"] for e in durable] == list(range(len(durable)))
    assert events[0]["call_id"] == reply["call_id"] and events[-1]["type"] == "call.ended"
    assert overlap(speech["phone"].text, events[-1]["data"]["transcript"]) >= 0.5


async def test_an_sdp_call_survives_pauses_and_stays_ended_after_delete(
    receiver: WebhookReceiver, speech: dict[str, Speech], tmp_path: Path
) -> None:
    """Silence suppression leaves the wire quiet for longer than the first-packet inactivity
    timeout: the signalled call goes on. After ``DELETE`` the gateway, not yet told, keeps
    sending: its packets are counted ``after_end`` and open no phantom call."""
    offer = (
        "v=0\r\no=- 1 1 IN IP4 192.0.2.5\r\ns=gw\r\nc=IN IP4 192.0.2.5\r\nt=0 0\r\n"
        "m=audio 17000 RTP/AVP 0\r\n"
    )  # behind NAT: media will come from 127.0.0.1, not the address in the offer
    pcm = read_audio(speech["order"].path, 8000)
    packets = list(rtp_packets(pcm, PCMU, seed=21))
    third = len(packets) // 3
    async with running_serve(tmp_path, receiver, VOXPHONE_RTP__INACTIVITY_TIMEOUT_S="0.5") as srv:
        status, sdp, headers = await post(srv.http_port, offer, "application/sdp")
        assert status == 201, sdp
        port = int(next(x for x in sdp.splitlines() if x.startswith("m=audio")).split()[1])
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as gateway:
            await send_rtp(packets[:third], ("127.0.0.1", port), sock=gateway)
            await asyncio.sleep(1.5)  # a pause three times the inactivity timeout
            await send_rtp(packets[third : 2 * third], ("127.0.0.1", port), sock=gateway)
            async with aiohttp.ClientSession() as http:
                url = f"http://127.0.0.1:{srv.http_port}{headers['Location']}"
                async with http.delete(url) as r:
                    assert r.status == 204
            await send_rtp(packets[2 * third :], ("127.0.0.1", port), sock=gateway)
        await receiver.wait_ended(1, timeout_s=60)
        await asyncio.sleep(0.5)  # time for a phantom call to show itself, were there one
    by_call = calls_of(receiver)
    assert len(by_call) == 1, list(by_call)
    (events,) = by_call.values()
    assert sum(e["type"] == "call.started" for e in events) == 1
    ended = events[-1]["data"]
    assert ended["reason"] == "hangup"
    assert ended["audio_ms"] >= 2 * third * 20 - 200  # both stretches, one call


async def test_a_per_call_webhook_to_a_private_address_is_refused_by_default(
    receiver: WebhookReceiver, tmp_path: Path
) -> None:
    """Server-side request forgery: loopback, link-local and private targets get a 400 naming
    the address and the key that allows it; no call is made."""
    async with running_serve(tmp_path, receiver) as srv:
        for url, kind in (
            ("http://127.0.0.1:9000/hooks", "loopback"),
            ("http://169.254.169.254/latest/meta-data/", "link-local"),
            ("http://10.0.0.5/hooks", "private"),
        ):
            body = json.dumps({"codec": "PCMU", "webhook_url": url})
            status, text, _ = await post(srv.http_port, body, "application/json")
            assert status == 400, text
            error = json.loads(text)["error"]
            assert error.startswith("webhook_url: ") and kind in error and "allowed_hosts" in error
    assert receiver.events == []
