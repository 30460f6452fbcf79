"""WebRTC calls from aiortc clients (voxphone.whip_client) into an in-process App with sphinx.

Real peer connections over loopback: ICE, DTLS, SRTP, SCTP, Opus and PCMU, the data channel,
signed webhooks to a real receiver. The browser itself is tested in tests/e2e.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import aioice.ice
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection
from aiortc.mediastreams import AudioStreamTrack

from tests.conftest import Speech, free_tcp_port, free_udp_range, overlap, whip
from tests.hooks import until
from tests.integration.test_serve import SECRET, WebhookReceiver, calls_of
from voxphone import whip_client
from voxphone.app import App
from voxphone.config import Config
from voxphone.errors import TransportError
from voxphone.whip_client import WhipCall, whip_call

pytestmark = [pytest.mark.integration, pytest.mark.each_loop]


def config(receiver: WebhookReceiver | None = None, **webrtc: Any) -> Config:
    return Config.model_validate(
        {
            "http": {"port": free_tcp_port()},
            "rtp": {"ports": "{}-{}".format(*free_udp_range(2))},
            "asterisk": {"audiosocket_port": 0},
            "engine": {"kind": "sphinx", "sphinx": {"workers": 2}},
            "webhook": {"url": str(receiver.server.make_url("/hooks")), "secret": SECRET}
            if receiver
            else {},
            "webrtc": {"interfaces": ["127.0.0.1"], **webrtc},
            "outbox": {"path": os.environ["VOXPHONE_OUTBOX__PATH"]},  # the test's own folder
        }
    )


async def running(cfg: Config) -> AsyncIterator[App]:
    app = App(cfg)
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


@pytest.fixture
async def app(receiver: WebhookReceiver) -> AsyncIterator[App]:
    async for a in running(config(receiver)):
        yield a


def whip_url(app: App) -> str:
    return f"http://127.0.0.1:{app.config.http.port}/v1/whip"


async def talk(http: aiohttp.ClientSession, app: App, wav: Path, codec: str) -> WhipCall:
    """Place a call that plays ``wav``, hang up when it has played, wait for call.ended."""
    return await asyncio.wait_for(whip_client.talk(http, whip_url(app), wav, codec), 60)


async def test_the_whip_command_prints_the_calls_events(
    app: App, speech: dict[str, Speech]
) -> None:
    events = await whip(whip_url(app), speech["phone"].path, "--codec", "g722")
    assert events[0]["data"]["codec"] == "G722"
    assert events[-1]["type"] == "call.ended"
    assert overlap(speech["phone"].text, events[-1]["data"]["transcript"]) >= 0.7


async def test_the_whip_command_stops_when_the_server_ends_the_call(
    receiver: WebhookReceiver, speech: dict[str, Speech]
) -> None:
    """A call the server ends first (``max_duration`` here; a shutdown does the same) is
    neither held for the rest of ``--hold`` nor hung up again: the server may be gone."""
    cfg = config(receiver)
    cfg = cfg.model_copy(update={"calls": cfg.calls.model_copy(update={"max_duration_s": 2.0})})
    async for app in running(cfg):
        t0 = asyncio.get_running_loop().time()
        events = await whip(whip_url(app), speech["phone"].path, "--hold", "60")
        assert asyncio.get_running_loop().time() - t0 < 30
    assert events[-1]["type"] == "call.ended", events
    assert events[-1]["data"]["reason"] == "max_duration"


async def test_a_hang_up_after_the_server_went_away_is_one_clear_error(
    app: App, speech: dict[str, Speech]
) -> None:
    """The server died without ending the call (no ``call.ended`` on the data channel): the
    hang-up says so in one line, not aiohttp's traceback."""
    async with aiohttp.ClientSession() as http:
        call = await whip_call(http, whip_url(app), speech["phone"].path)
        try:
            dead = f"http://127.0.0.1:{free_tcp_port()}/v1/whip/gone"
            why = f"^cannot hang up at {re.escape(dead)}: Connection refused; the server went away"
            with pytest.raises(TransportError, match=why):
                await dataclasses.replace(call, session_url=dead).hangup(http)
            await call.hangup(http)
            await asyncio.wait_for(call.ended.wait(), 15)
        finally:
            await call.close()


def udp_sockets() -> int:
    """This process's UDP sockets: what a leaked peer connection leaves behind (ICE sockets).

    Counted by inode, from /proc, so the webhook client's TCP connections don't disturb it."""
    mine = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:["):
                mine.add(target[8:-1])
    udp = set()
    for table in ("/proc/self/net/udp", "/proc/self/net/udp6"):
        with contextlib.suppress(OSError), open(table) as f:
            udp |= {line.split()[9] for line in list(f)[1:]}
    return len(mine & udp)


async def test_opus_and_pcmu_calls_at_once_reach_the_browser_and_the_webhook(
    app: App, receiver: WebhookReceiver, speech: dict[str, Speech]
) -> None:
    async with aiohttp.ClientSession() as http:
        opus, pcmu = await asyncio.gather(
            talk(http, app, speech["order"].path, "opus"),
            talk(http, app, speech["phone"].path, "PCMU"),
        )
    await receiver.wait_ended(2, 10)
    hooks = calls_of(receiver)
    for call, sentence, codec in ((opus, "order", "opus"), (pcmu, "phone", "PCMU")):
        events = call.events
        started, ended = events[0], events[-1]
        assert started["type"] == "call.started" and ended["type"] == "call.ended"
        assert started["data"]["codec"] == codec and started["data"]["transport"] == "webrtc"
        durable = [e["seq"] for e in events if "delta_seq" not in e]  # a delta repeats the seq
        assert durable == list(range(len(durable)))  # nothing lost on the way
        assert ended["data"]["reason"] == "hangup"
        assert ended["data"]["stats"]["gap_ms"] == 0
        assert overlap(speech[sentence].text, ended["data"]["transcript"]) >= 0.7, ended["data"]
        # The data channel and the signed webhook carry the same events.
        assert [e["id"] for e in hooks[call.call_id]] == [e["id"] for e in events]
    assert not app.webrtc.sessions and not app.registry.calls  # type: ignore[union-attr]


async def test_a_browser_that_goes_silent_is_hung_up_for_no_media(
    receiver: WebhookReceiver, speech: dict[str, Speech]
) -> None:
    """A closed tab that said nothing: the file ends, no DELETE, no close."""
    async for app in running(config(receiver, media_timeout_s=1.5)):
        async with aiohttp.ClientSession() as http:
            call = await whip_call(http, whip_url(app), speech["order"].path)
            await asyncio.wait_for(call.played.wait(), 30)
            await asyncio.wait_for(call.ended.wait(), 10)
            await call.close()
        assert call.events[-1]["data"]["reason"] == "no_media"
        assert "order" in call.events[-1]["data"]["transcript"]
        await until(lambda a=app: not a.webrtc.sessions, timeout_s=5)  # type: ignore[union-attr]


async def test_closing_the_peer_connection_ends_the_call(
    app: App, receiver: WebhookReceiver, speech: dict[str, Speech]
) -> None:
    """The browser's ``pc.close()`` mid-sentence: ``hangup``, and every packet it sent counts."""
    async with aiohttp.ClientSession() as http:
        call = await whip_call(http, whip_url(app), speech["order"].path, "PCMU")
        await until(in_call(app, call.call_id, 50), timeout_s=15)
        sent = await rtp_count(call.pc, "outbound-rtp", "packetsSent")
        await call.close()  # DTLS close_notify, as a browser's pc.close() sends
    await receiver.wait_ended(1, 15)
    ended = calls_of(receiver)[call.call_id][-1]
    assert ended["data"]["reason"] == "hangup"
    # Every packet sent before the stats were read arrived before the close (one socket, in
    # order) and is transcribed; a few more may have left between the two.
    assert sent <= ended["data"]["stats"]["packets"] <= sent + 5, sent


async def test_ice_uses_the_configured_ports_and_announces_the_public_ip(
    receiver: WebhookReceiver, speech: dict[str, Speech]
) -> None:
    lo, hi = free_udp_range(3)
    cfg = config(receiver, ports=f"{lo}-{hi}", public_ip="203.0.113.7")
    async for app in running(cfg):
        async with aiohttp.ClientSession() as http:
            call = await talk(http, app, speech["order"].path, "opus")
        answer = call.pc.remoteDescription.sdp
        hosts = [line.split() for line in answer.splitlines() if line.startswith("a=candidate:")]
        assert {(c[4], int(c[5])) for c in hosts} <= {
            (ip, p) for ip in ("127.0.0.1", "203.0.113.7") for p in range(lo, hi + 1)
        }
        assert {c[4] for c in hosts} == {"127.0.0.1", "203.0.113.7"}
        # What voxphone hears of Opus: no more than the model's 16 kHz (RFC 7587 §6.1).
        (opus,) = re.findall(r"^a=rtpmap:(\d+) opus/48000", answer, re.MULTILINE)
        assert f"a=fmtp:{opus} maxplaybackrate=16000" in answer.splitlines()
        assert "order" in call.events[-1]["data"]["transcript"]


async def test_trickle_patch_delete_and_their_errors(app: App, speech: dict[str, Speech]) -> None:
    async with aiohttp.ClientSession() as http:
        call = await whip_call(http, whip_url(app), speech["order"].path)
        url, frag = call.session_url, "application/trickle-ice-sdpfrag"
        ufrag = next(
            line
            for line in call.pc.localDescription.sdp.splitlines()
            if line.startswith("a=ice-ufrag")
        )
        ok = f"{ufrag}\r\na=mid:0\r\na=candidate:9 1 udp 2122260223 127.0.0.1 9 typ host\r\n"
        cases = [
            ("PATCH", url, frag, ok, 204),
            ("PATCH", url, frag, "a=candidate:1 1 udp\r\n", 400),
            ("PATCH", url, frag, "a=ice-ufrag:other\r\na=ice-pwd:restartrestartrestart\r\n", 422),
            ("PATCH", url, "application/sdp", ok, 415),
            ("PATCH", url + "x", frag, ok, 404),
            ("DELETE", url + "x", None, None, 404),
            ("DELETE", url, None, None, 200),
        ]
        for method, target, ctype, body, status in cases:
            headers = {"Content-Type": ctype} if ctype else {}
            async with http.request(method, target, data=body, headers=headers) as r:
                assert r.status == status, (method, body, await r.text())
        await asyncio.wait_for(call.ended.wait(), 15)
        await call.close()
    assert call.events[-1]["data"]["reason"] == "hangup"


async def test_hostile_offers_get_precise_4xx_and_leave_no_peer_connection(
    app: App, speech: dict[str, Speech]
) -> None:
    chrome = (Path(__file__).parent.parent / "data" / "chrome_offer.sdp").read_text()
    cases = [
        ("application/sdp", "v=0\r\n" + "a=x\r\n" * 20000, 413, ""),
        ("application/sdp", "hello", 400, "must start with 'v=0'"),
        ("application/sdp", chrome.replace("m=audio 9", "m=video 9"), 422, "no audio"),
        (
            "application/sdp",
            chrome.replace(" 111 63 9 0 8 13", " 63 13"),
            422,
            "no common audio codec",
        ),
        (
            "application/sdp",
            chrome.replace("a=fingerprint", "a=x-fingerprint"),
            400,
            "no a=fingerprint",
        ),
        ("application/sdp", chrome.replace("a=ice-ufrag", "a=x-ice-ufrag"), 400, "no a=ice-ufrag"),
        (
            "application/sdp",
            chrome.replace("a=setup:actpass", "a=setup:bogus"),
            400,
            "offer rejected",
        ),
        ("text/plain", chrome, 415, "application/sdp"),
        ("application/sdp", b"\xff\xfe", 400, "UTF-8"),
    ]
    async with aiohttp.ClientSession() as http:
        await http.get(f"http://127.0.0.1:{app.config.http.port}/health")  # warm the pool
        before = udp_sockets()
        for ctype, body, status, message in cases:
            headers = {"Content-Type": ctype}
            async with http.post(whip_url(app), data=body, headers=headers) as r:
                assert r.status == status, (body[:60], await r.text())
                assert message in await r.text()
        json_url = f"http://127.0.0.1:{app.config.http.port}/v1/webrtc/offer"
        for body in ('{"type": "answer", "sdp": "v=0"}', "{", '{"type": "offer"}'):
            async with http.post(json_url, data=body) as r:
                assert r.status == 400, await r.text()
        await until(lambda: udp_sockets() == before, timeout_s=5)  # nothing half-made is left
    assert not app.webrtc.sessions and not app.registry.calls  # type: ignore[union-attr]


async def test_json_offer_and_the_call_limit(
    receiver: WebhookReceiver, speech: dict[str, Speech]
) -> None:
    cfg = config(receiver).model_copy(
        update={"calls": Config().calls.model_copy(update={"max_concurrent": 1})}
    )
    async for app in running(cfg):
        async with aiohttp.ClientSession() as http:
            first = await whip_call(http, whip_url(app), speech["order"].path)
            with pytest.raises(Exception, match="HTTP 503"):
                await whip_call(http, whip_url(app), speech["order"].path)
            await first.hangup(http)
            await asyncio.wait_for(first.ended.wait(), 15)
            await first.close()
            await until(lambda a=app: not a.registry.calls, timeout_s=5)
            offer = await offer_sdp()
            json_url = f"http://127.0.0.1:{app.config.http.port}/v1/webrtc/offer"
            body = {"type": "offer", "sdp": offer, "metadata": {"user": "ada"}}
            async with http.post(json_url, json=body) as r:
                assert r.status == 201, await r.text()
                reply = await r.json()
            assert reply["type"] == "answer" and "a=candidate:" in reply["sdp"]
            async with http.delete(
                f"http://127.0.0.1:{app.config.http.port}/v1/calls/{reply['call_id']}"
            ) as r:
                assert r.status == 204
        await receiver.wait_ended(2, 15)
        started = calls_of(receiver)[reply["call_id"]][0]
        assert started["data"]["user"] == "ada"


async def offer_sdp() -> str:
    """A fresh offer from an aiortc peer that sends audio (its connection is thrown away)."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver(AudioStreamTrack(), direction="sendonly")
    await pc.setLocalDescription(await pc.createOffer())
    sdp: str = pc.localDescription.sdp
    await pc.close()
    return sdp


async def test_a_full_port_range_refuses_with_503_and_leaks_nothing(
    receiver: WebhookReceiver, speech: dict[str, Speech]
) -> None:
    lo, _ = free_udp_range(1)
    async for app in running(config(receiver, ports=f"{lo}-{lo}")):
        async with aiohttp.ClientSession() as http:
            first = await whip_call(http, whip_url(app), speech["order"].path)
            before = udp_sockets()
            with pytest.raises(TransportError, match="HTTP 503.*no free WebRTC UDP port"):
                await whip_call(http, whip_url(app), speech["order"].path)
            await until(lambda b=before: udp_sockets() == b, timeout_s=5)
            assert len(app.webrtc.sessions) == 1  # type: ignore[union-attr]
            await first.hangup(http)
            await asyncio.wait_for(first.ended.wait(), 15)
            await first.close()


async def test_cors_lets_a_configured_origin_use_whip_with_a_token(
    receiver: WebhookReceiver, speech: dict[str, Speech]
) -> None:
    cfg = config(receiver, cors_origins=["https://app.example"])
    cfg = cfg.model_copy(update={"http": cfg.http.model_copy(update={"token": "t0k"})})
    origin = {"Origin": "https://app.example"}
    async for app in running(cfg):
        async with aiohttp.ClientSession() as http:
            preflight = {**origin, "Access-Control-Request-Method": "POST",
                         "Access-Control-Request-Headers": "content-type,authorization"}  # fmt: skip
            async with http.options(whip_url(app), headers=preflight) as r:
                assert r.status == 200, await r.text()
                assert r.headers["Access-Control-Allow-Origin"] == "https://app.example"
            async with http.options(
                whip_url(app), headers={**preflight, "Origin": "https://evil.example"}
            ) as r:
                assert "Access-Control-Allow-Origin" not in r.headers
            body, headers = await offer_sdp(), {**origin, "Content-Type": "application/sdp"}
            async with http.post(whip_url(app), data=body, headers=headers) as r:
                assert r.status == 401  # CORS is no way around the token
            headers["Authorization"] = "Bearer t0k"
            async with http.post(whip_url(app), data=body, headers=headers) as r:
                assert r.status == 201, await r.text()
                assert "Location" in r.headers["Access-Control-Expose-Headers"]
                location = r.headers["Location"]
            base = f"http://127.0.0.1:{app.config.http.port}"
            async with http.delete(base + location, headers=headers) as r:
                assert r.status == 200


async def rtp_count(pc: RTCPeerConnection, kind: str, field: str) -> int:
    """``packetsSent`` of outbound-rtp or ``packetsReceived`` of inbound-rtp (aiortc stats)."""
    report = await pc.getStats()
    return sum(getattr(s, field) for s in report.values() if s.type == kind)


@pytest.mark.parametrize("hang_up", ["whip", "calls_api"])
async def test_every_packet_before_the_hangup_is_transcribed(
    app: App, speech: dict[str, Speech], hang_up: str
) -> None:
    """Every packet the browser sent reaches the call before a hang-up (WHIP DELETE, or DELETE
    /v1/calls/{id}) ends it: aiortc hands each to voxphone's jitter buffer, which plays out
    what it holds before the stream ends, so nothing sent is lost."""
    async with aiohttp.ClientSession() as http:
        call = await whip_call(http, whip_url(app), speech["order"].path, "PCMU")
        await asyncio.wait_for(call.played.wait(), 30)
        sent = await rtp_count(call.pc, "outbound-rtp", "packetsSent")
        session = app.webrtc.sessions[call.call_id]  # type: ignore[union-attr]
        # Media skips aioice's STUN parse: each of the call's sockets hands it on first.
        connection = session.pc.getTransceivers()[0].receiver.transport.transport._connection
        assert connection._protocols
        assert all("datagram_received" in vars(p) for p in connection._protocols)
        async with asyncio.timeout(10):  # every packet has reached voxphone's aiortc
            while await rtp_count(session.pc, "inbound-rtp", "packetsReceived") < sent:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        base = f"http://127.0.0.1:{app.config.http.port}"
        target = call.session_url if hang_up == "whip" else f"{base}/v1/calls/{call.call_id}"
        async with http.delete(target) as r:
            assert r.status in (200, 204), await r.text()
        await asyncio.wait_for(call.ended.wait(), 15)
        await call.close()
    ended = call.events[-1]["data"]
    assert ended["reason"] == "hangup"
    assert ended["stats"]["packets"] == sent > 100
    assert session._audio is not None and session._audio.from_ice == sent  # not via aiortc


def in_call(app: App, call_id: str, packets: int) -> Callable[[], bool]:
    """Whether the live call has had ``packets`` packets (for ``until``)."""
    return lambda: (c := app.registry.calls.get(call_id)) is not None and c.stats.packets >= packets


async def test_a_hangup_message_on_the_data_channel_ends_the_call(
    app: App, speech: dict[str, Speech]
) -> None:
    async with aiohttp.ClientSession() as http:
        call = await whip_call(http, whip_url(app), speech["order"].path)
        await until(in_call(app, call.call_id, 25), timeout_s=15)
        call.channel.send(json.dumps({"type": "hangup"}))
        await asyncio.wait_for(call.ended.wait(), 15)
        assert not call.played.is_set()  # the browser hung up before its audio ran out
        await call.close()
    ended = call.events[-1]["data"]
    assert ended["reason"] == "hangup" and ended["audio_ms"] >= 500


def vanish(pc: RTCPeerConnection) -> None:
    """Close a client's ICE sockets without a word, as a laptop whose Wi-Fi drops does."""
    for transceiver in pc.getTransceivers():
        ice = transceiver.sender.transport.transport
        for protocol in ice._connection._protocols:
            protocol.transport.close()


async def test_a_browser_that_vanishes_ends_with_ice_failed(
    app: App, receiver: WebhookReceiver, speech: dict[str, Speech], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No DTLS close, no DELETE: ICE consent freshness (RFC 7675, made fast here) fails, and the
    call ends ``ice_failed`` with what was said until then."""
    monkeypatch.setattr(aioice.ice, "CONSENT_INTERVAL", 0.2)
    monkeypatch.setattr(aioice.ice, "CONSENT_FAILURES", 2)
    async with aiohttp.ClientSession() as http:
        call = await whip_call(http, whip_url(app), speech["order"].path)
        await until(in_call(app, call.call_id, 50), timeout_s=15)
        vanish(call.pc)
        await receiver.wait_ended(1, 15)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(call.close(), 5)
    ended = calls_of(receiver)[call.call_id][-1]["data"]
    assert ended["reason"] == "ice_failed" and ended["audio_ms"] >= 1000
    await until(lambda: not app.webrtc.sessions, timeout_s=10)  # type: ignore[union-attr]
