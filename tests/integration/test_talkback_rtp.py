"""Talk back over RTP, end to end: `voxphone serve` as a process, a caller on a real UDP socket
(symmetric RTP), bot audio through the HTTP API and its websocket; what comes back on the
caller's socket is decoded and recognised by pocketsphinx, and its DTMF parsed back."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import Speech, free_udp_range, hear, overlap, require
from tests.hooks import until
from tests.integration.test_serve import WebhookReceiver, calls_of, running_serve
from voxphone.audio.codecs import PCMU, Codec, Decoder, codec_by_name
from voxphone.audio.files import read_audio
from voxphone.audio.resample import Resampler
from voxphone.engines.sphinx import SAMPLE_RATE
from voxphone.testing import rtp_packets, send_rtp
from voxphone.transports.dtmf import DtmfReceiver
from voxphone.transports.rtcp import Bye, RtcpPacket, SenderReport, parse_rtcp
from voxphone.transports.rtp_packet import RtpPacket, parse_rtp

pytestmark = pytest.mark.integration


@dataclass
class Caller:
    """A phone on a UDP socket: sends silence to its call's port and keeps what comes back."""

    sock: socket.socket
    target: tuple[str, int]
    received: list[tuple[float, RtpPacket]] = field(default_factory=list)
    started: float = 0.0  # when its first packet was sent (loop time)
    rtcp: list[RtcpPacket] = field(default_factory=list)  # what came to its RTCP port

    def audio(self, codec: Codec, payload_type: int) -> np.ndarray:
        """The audio packets received, in sequence order, decoded and resampled to 16 kHz."""
        pkts = sorted(
            (p for _, p in self.received if p.payload_type == payload_type),
            key=lambda p: p.sequence,
        )
        dec, res = Decoder(codec), Resampler(codec.sample_rate, SAMPLE_RATE)
        pcm = np.concatenate([dec.decode(p.payload) for p in pkts])
        return np.concatenate([res.process(pcm), res.flush()])


@contextlib.asynccontextmanager
async def calling(
    rtp_port: int, seconds: float, says: np.ndarray | None = None
) -> AsyncIterator[Caller]:
    """A caller sending ``says`` (8 kHz PCMU), else silence, for ``seconds`` in all."""
    port = free_udp_range(2)[0]
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", port))
    sock.setblocking(False)
    rtcp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # RFC 3550 §11: RTP port + 1
    rtcp.bind(("127.0.0.1", port + 1))
    rtcp.setblocking(False)
    caller = Caller(sock, ("127.0.0.1", rtp_port))
    loop = asyncio.get_running_loop()

    async def receive() -> None:
        while True:
            data = await loop.sock_recv(sock, 2048)
            caller.received.append((loop.time(), parse_rtp(data)))

    async def receive_rtcp() -> None:
        while True:
            caller.rtcp += parse_rtcp(await loop.sock_recv(rtcp, 2048))

    audio = np.zeros(int(8000 * seconds), np.int16)
    if says is not None:
        audio[: says.size] = says[: audio.size]
    caller.started = loop.time()
    sending = asyncio.create_task(send_rtp(rtp_packets(audio, PCMU), caller.target, sock=sock))
    receiving = [asyncio.create_task(receive()), asyncio.create_task(receive_rtcp())]
    try:
        yield caller
    finally:
        sending.cancel()
        for task in receiving:
            task.cancel()
        await asyncio.gather(sending, *receiving, return_exceptions=True)
        sock.close()
        rtcp.close()


async def create_call(http: aiohttp.ClientSession, base: str, codec: str = "PCMU") -> dict:  # type: ignore[type-arg]
    async with http.post(f"{base}/v1/calls", json={"codec": codec, **_pt(codec)}) as r:
        assert r.status == 201, await r.text()
        return await r.json()  # type: ignore[no-any-return]


def _pt(codec: str) -> dict[str, int]:
    dynamic = {"opus": 107, "L16/16000": 118}
    return {"payload_type": dynamic[codec]} if codec in dynamic else {}


async def play(http: aiohttp.ClientSession, base: str, call_id: str, wav: bytes) -> Any:
    """``POST /v1/calls/{id}/play`` of a WAV file's bytes, accepted (202): its JSON answer."""
    async with http.post(
        f"{base}/v1/calls/{call_id}/play", data=wav, headers={"Content-Type": "audio/wav"}
    ) as r:
        assert r.status == 202, await r.text()
        return await r.json()


def types_of(receiver: WebhookReceiver, call_id: str) -> list[str]:
    return [e["type"] for e in calls_of(receiver).get(call_id, [])]


@pytest.mark.parametrize(
    ("codec", "payload_type"), [("PCMU", 0), ("G722", 9), ("opus", 107), ("L16/16000", 118)]
)
async def test_played_speech_comes_back_over_rtp_and_is_recognised(
    receiver: WebhookReceiver,
    speech: dict[str, Speech],
    tmp_path: Path,
    decoder: object,
    codec: str,
    payload_type: int,
) -> None:
    async with (
        running_serve(tmp_path, receiver, n_ports=2) as srv,
        aiohttp.ClientSession() as http,
    ):
        base = f"http://127.0.0.1:{srv.http_port}"
        call = await create_call(http, base, codec)
        call_id = call["call_id"]
        async with calling(call["rtp_port"], 12) as caller:
            await asyncio.sleep(0.3)  # latched
            played = await play(http, base, call_id, speech["callback"].path.read_bytes())
            await until(lambda: "playback.finished" in types_of(receiver, call_id))
            await asyncio.sleep(0.2)
            async with http.post(
                f"{base}/v1/calls/{call_id}/dtmf", json={"digits": "12#", "duration_ms": 100}
            ) as r:
                assert r.status == 202, await r.text()
            await asyncio.sleep(1.0)
            async with http.delete(f"{base}/v1/calls/{call_id}") as r:
                assert r.status == 204
            await receiver.wait_ended(1, timeout_s=30)
            ended_at = asyncio.get_running_loop().time()
            await asyncio.sleep(0.3)
        assert not [t for t, _ in caller.received if t > ended_at + 0.1], "media stopped"

    pkts = [p for _, p in caller.received]
    audio = [p for p in pkts if p.payload_type == payload_type]
    assert len({p.ssrc for p in pkts}) == 1, "one SSRC for audio and events"
    seqs = [p.sequence for p in pkts]
    assert all((b - a) & 0xFFFF == 1 for a, b in zip(seqs, seqs[1:], strict=False))
    assert audio[0].marker and not any(p.marker for p in audio[1:]), "one talkspurt"
    steps = {
        (b.timestamp - a.timestamp) & 0xFFFFFFFF for a, b in zip(audio, audio[1:], strict=False)
    }
    clock = codec_by_name(codec).clock_rate
    assert steps == {clock // 50}, "20 ms of the RTP clock per packet (G.722: 8 kHz)"
    assert abs(len(audio) * 20 - played["duration_ms"]) <= 20
    arrivals = [t for t, p in caller.received if p.payload_type == payload_type]
    # Paced in real time, not in a burst: never ahead of the 20 ms clock (the first frame goes
    # at once, so one frame early at most), and 20 ms apart as a rule. (On a loaded machine a
    # blocked loop can make it later, never earlier.)
    assert arrivals[-1] - arrivals[0] >= (len(audio) - 2) * 0.02 - 0.005
    assert abs(float(np.median(np.diff(arrivals))) - 0.02) < 0.003
    heard = hear(caller.audio(codec_by_name(codec), payload_type), decoder)
    assert overlap(speech["callback"].text, heard) >= 0.5, heard

    keys = DtmfReceiver(clock)
    digits = [
        d.key for p in pkts if p.payload_type == 101 for d in keys.feed(p.timestamp, p.payload)
    ]
    assert digits == ["1", "2", "#"]
    events = [p for p in pkts if p.payload_type == 101]
    assert sum(p.marker for p in events) == 3, "a marker on each event's first packet"

    (events_of_call,) = calls_of(receiver).values()
    types = [e["type"] for e in events_of_call]
    assert types.index("playback.started") < types.index("playback.finished")
    assert types[-1] == "call.ended"
    finished = next(e for e in events_of_call if e["type"] == "playback.finished")
    assert finished["data"]["playback_id"] == played["playback_id"]
    # RTCP from voxphone's port + 1: sender reports for its stream, a BYE when it hung up.
    ssrc = pkts[0].ssrc
    reports = [p for p in caller.rtcp if isinstance(p, SenderReport)]
    assert reports and all(r.ssrc == ssrc for r in reports)
    assert reports[-1].packet_count == len(pkts)
    assert caller.rtcp[-1] == Bye((ssrc,), "hangup")


async def test_streamed_audio_marks_and_events_on_the_audio_socket(
    receiver: WebhookReceiver, speech: dict[str, Speech], tmp_path: Path, decoder: object
) -> None:
    """The websocket: 16 kHz PCM in, as a TTS would stream it; marks and the call's events
    out on the same socket; the speech comes back over RTP at the call's 8 kHz."""
    pcm = read_audio(speech["phone"].path, 16000)
    async with (
        running_serve(tmp_path, receiver, n_ports=2) as srv,
        aiohttp.ClientSession() as http,
    ):
        base = f"http://127.0.0.1:{srv.http_port}"
        call = await create_call(http, base)
        call_id = call["call_id"]
        async with calling(call["rtp_port"], 12) as caller:
            await asyncio.sleep(0.3)
            async with http.ws_connect(f"{base}/v1/calls/{call_id}/audio?rate=16000") as ws:
                got: list[dict] = []  # type: ignore[type-arg]

                async def read() -> None:
                    async for msg in ws:
                        got.append(json.loads(msg.data))

                reader = asyncio.create_task(read())
                for pos in range(0, pcm.size, 320 * 5):  # 100 ms chunks, a little ahead of time
                    await ws.send_bytes(pcm[pos : pos + 320 * 5].astype("<i2").tobytes())
                    await asyncio.sleep(0.08)
                await ws.send_str(json.dumps({"type": "mark", "name": "said-number"}))
                await ws.send_str(json.dumps({"type": "bogus"}))

                def mark_seen() -> bool:
                    return any(g.get("event", {}).get("type") == "playback.mark" for g in got)

                await until(mark_seen)
                async with http.delete(f"{base}/v1/calls/{call_id}") as r:
                    assert r.status == 204
                await asyncio.wait_for(reader, 30)  # closed by the server after call.ended
    types = [g["event"]["type"] for g in got if "event" in g]
    assert types[0] == "playback.started" and types[-1] == "call.ended"
    mark = next(g["event"] for g in got if "event" in g and g["event"]["type"] == "playback.mark")
    assert mark["data"]["name"] == "said-number" and mark["call_id"] == call_id
    assert any("error" in g and "bogus" in g["error"] for g in got)
    heard = hear(caller.audio(PCMU, 0), decoder)
    assert overlap(speech["phone"].text, heard) >= 0.5, heard


def _opus_minutes(tmp_path: Path) -> bytes:
    """Two minutes of silence as 6 kbit/s Opus in Ogg: a small file that decodes long."""
    out = tmp_path / "long.ogg"
    subprocess.run(
        [require("ffmpeg"), "-loglevel", "error", "-f", "lavfi", "-i", "anullsrc=r=48000:cl=mono",
         "-t", "120", "-c:a", "libopus", "-b:a", "6k", str(out)],
        check=True,
    )  # fmt: skip
    return out.read_bytes()


async def test_the_api_refuses_precisely(
    receiver: WebhookReceiver, speech: dict[str, Speech], tmp_path: Path
) -> None:
    wav = speech["order"].path.read_bytes()
    files = web.Application()
    files.router.add_get("/hello.wav", lambda _r: web.Response(body=wav, content_type="audio/wav"))
    files.router.add_get("/junk.wav", lambda _r: web.Response(body=b"junk" * 100))
    async with (
        TestServer(files, host="127.0.0.1") as server,
        running_serve(
            tmp_path, receiver, n_ports=2,
            VOXPHONE_PLAYBACK__MAX_CLIP_BYTES=str(len(wav) + 10),
            VOXPHONE_PLAYBACK__MAX_CLIP_S="4",
            VOXPHONE_WEBHOOK__ALLOWED_HOSTS=json.dumps([f"127.0.0.1:{server.port}", "127.0.0.1"]),
        ) as srv,
        aiohttp.ClientSession() as http,
    ):  # fmt: skip
        base = f"http://127.0.0.1:{srv.http_port}"
        call = await create_call(http, base)
        call_id = call["call_id"]
        url = f"{base}/v1/calls/{call_id}"

        async def status(method: str, path: str, **kwargs: object) -> tuple[int, str]:
            async with http.request(method, path, **kwargs) as r:  # type: ignore[arg-type]
                body = await r.json()
                return r.status, body.get("error", "") if isinstance(body, dict) else ""

        wav_h = {"Content-Type": "audio/wav"}
        assert (await status("POST", f"{base}/v1/calls/call_nope/play", data=wav, headers=wav_h))[
            0
        ] == 404
        code, why = await status("POST", f"{url}/play", data=b"RIFF not really", headers=wav_h)
        assert code == 415 and "Invalid data found" in why and "Errno" not in why, why
        code, why = await status("POST", f"{url}/play", data=wav + bytes(100), headers=wav_h)
        assert code == 413 and "playback.max_clip_bytes" in why, why
        long_wav = speech["order"].path.read_bytes()  # 3.7 s of 16 kHz, under 4 s
        assert (await status("POST", f"{url}/play", data=long_wav, headers=wav_h))[0] == 202
        # What waits in a call is bounded by one longest clip: a second is refused till clear.
        code, why = await status("POST", f"{url}/play", data=long_wav, headers=wav_h)
        assert code == 409 and "already queued" in why and "max_clip_s (4 s)" in why, why
        assert (await status("POST", f"{url}/clear"))[0] == 200
        code, why = await status("POST", f"{url}/play", data=_opus_minutes(tmp_path), headers={})
        assert code == 413 and "longer than 4 s" in why and "max_clip_s" in why, why
        code, why = await status("POST", f"{url}/play", data=b"", headers=wav_h)
        assert code == 400 and "empty" in why, why
        code, why = await status(
            "POST", f"{url}/play", data=b"{", headers={"Content-Type": "application/json"}
        )
        assert code == 400 and "not JSON" in why, why
        for bad in ("file:///etc/passwd", "ftp://example.com/a.wav"):
            code, why = await status("POST", f"{url}/play", json={"url": bad})
            assert code == 400 and why.startswith("url: ") and "only http:// and https://" in why
        for bad in ("http://[::1", "http://example.com:99999/a.wav"):  # urlsplit raises
            code, why = await status("POST", f"{url}/play", json={"url": bad})
            assert code == 400 and "is not a valid URL" in why, why
        code, why = await status("POST", f"{url}/play", json={"url": "http://10.1.2.3/a.wav"})
        assert code == 400 and "private" in why, why
        code, why = await status(
            "POST", f"{url}/play", json={"url": str(server.make_url("/junk.wav"))}
        )
        assert code == 422 and "cannot be decoded" in why and "junk.wav" in why, why
        code, why = await status(
            "POST", f"{url}/play", json={"url": str(server.make_url("/missing.wav"))}
        )
        assert code == 422 and "404" in why, why
        code, _ = await status(
            "POST", f"{url}/play", json={"url": str(server.make_url("/hello.wav"))}
        )
        assert code == 202
        code, why = await status("POST", f"{url}/dtmf", json={"digits": "12x"})
        assert code == 400 and "digits: " in why and "0-9, *, #, A-D" in why, why
        async with http.post(f"{base}/v1/calls", json={"telephone_event": None}) as r:
            mute = (await r.json())["call_id"]  # no telephone-event negotiated
        code, why = await status("POST", f"{base}/v1/calls/{mute}/dtmf", json={"digits": "1"})
        assert code == 409 and "cannot send DTMF" in why, why
        code, why = await status("GET", f"{url}/audio?rate=7")
        assert code == 400 and "rate" in why, why
        async with http.ws_connect(f"{url}/audio?rate=8000") as ws:
            await ws.send_bytes(bytes(2 * 8000 * 61))  # a TTS far ahead of real time
            await ws.send_bytes(bytes(320))
            async with asyncio.timeout(10):
                reply = json.loads((await ws.receive()).data)
                while "error" not in reply:  # the call's events come first
                    reply = json.loads((await ws.receive()).data)
            assert "over 60 s of audio queued" in reply["error"], reply
            await ws.send_str("not json")  # answered and counted, like an unknown message
            async with asyncio.timeout(10):
                reply = json.loads((await ws.receive()).data)
                while "error" not in reply:
                    reply = json.loads((await ws.receive()).data)
            assert "not JSON" in reply["error"] and '"clear"' in reply["error"], reply
        code, body = await status("POST", f"{url}/clear")
        assert code == 200
        async with http.delete(url) as r:
            assert r.status == 204
        async with http.delete(f"{base}/v1/calls/{mute}") as r:
            assert r.status == 204
        await receiver.wait_ended(2, timeout_s=30)  # published: the registry has let them go
        code, why = await status("POST", f"{url}/clear")
        assert code == 410 and "has ended" in why, why
        code, why = await status("POST", f"{url}/play", data=wav, headers=wav_h)
        assert code == 410 and "ended" in why, why
        async with http.delete(url) as r:
            assert r.status == 410
    cleared = [e["data"] for e in calls_of(receiver)[call_id] if e["type"] == "playback.cleared"]
    # The clip under 4 s, the URL's and the socket's minute of audio, cleared by the API; the
    # frame over the limit counted.
    assert [c["reason"] for c in cleared] == ["api", "api", "api"]
    ended = calls_of(receiver)[call_id][-1]["data"]
    assert ended["stats"]["dropped"] == {"audio_over_limit": 1, "unknown_control_message": 1}


async def test_the_caller_barges_in_on_the_bot(
    receiver: WebhookReceiver, speech: dict[str, Speech], tmp_path: Path
) -> None:
    """Two flite voices over real RTP: the bot (slt) is cleared within 200 ms of the caller
    (rms) starting to speak, counted from the packet that carried the onset."""
    words = read_audio(speech["order"].path, 8000)
    says = np.concatenate([np.zeros(8000 * 3 // 2, np.int16), words])
    onset_s = (8000 * 3 // 2 + int(np.argmax(np.abs(words) > 100))) // 160 * 0.02  # -50 dBFS
    async with (
        running_serve(tmp_path, receiver, n_ports=2, VOXPHONE_PLAYBACK__BARGE_IN="true") as srv,
        aiohttp.ClientSession() as http,
    ):
        base = f"http://127.0.0.1:{srv.http_port}"
        call = await create_call(http, base)
        call_id = call["call_id"]
        async with calling(call["rtp_port"], 8, says) as caller:
            await asyncio.sleep(0.3)
            await play(http, base, call_id, speech["callback"].path.read_bytes())
            await until(lambda: "playback.cleared" in types_of(receiver, call_id), 20)
            async with http.delete(f"{base}/v1/calls/{call_id}") as r:
                assert r.status == 204
            await receiver.wait_ended(1, timeout_s=30)
    cleared = next(e for e in calls_of(receiver)[call_id] if e["type"] == "playback.cleared")
    assert cleared["data"]["reason"] == "barge_in"
    last_bot_packet = max(t for t, p in caller.received if p.payload_type == 0)
    late_ms = (last_bot_packet - (caller.started + onset_s)) * 1000
    assert 0 < late_ms <= 200, f"the bot went on {late_ms:.0f} ms after the caller spoke"


async def test_voxphone_call_records_what_the_bot_says(
    receiver: WebhookReceiver, speech: dict[str, Speech], tmp_path: Path, decoder: object
) -> None:
    """`voxphone call --record`: the CLI caller (first-packet mode, PCMA) writes the played
    speech to a WAV that pocketsphinx understands, and reports the digits it was sent."""
    out = tmp_path / "reply.wav"
    async with (
        running_serve(tmp_path, receiver, n_ports=2) as srv,
        aiohttp.ClientSession() as http,
    ):
        base = f"http://127.0.0.1:{srv.http_port}"
        caller = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "voxphone", "call", str(speech["order"].path),
            "--to", f"127.0.0.1:{srv.rtp_ports[0]}", "--codec", "pcma",
            "--record", str(out), "--hold", "5", stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        await until(lambda: bool(calls_of(receiver)), 20)  # call.started delivered
        (call_id,) = calls_of(receiver)
        await play(http, base, call_id, speech["callback"].path.read_bytes())
        await until(lambda: "playback.finished" in types_of(receiver, call_id), 20)
        async with http.post(f"{base}/v1/calls/{call_id}/dtmf", json={"digits": "7"}) as r:
            assert r.status == 202
        stdout, _ = await caller.communicate()
        assert caller.returncode == 0
    report = json.loads(stdout)["recorded"]
    assert report["file"] == str(out) and report["packets"] > 100 and report["dtmf"] == "7"
    heard = hear(read_audio(out, SAMPLE_RATE), decoder)
    assert overlap(speech["callback"].text, heard) >= 0.5, heard


async def test_ffmpeg_as_the_receiver_decodes_what_voxphone_sends(
    receiver: WebhookReceiver, speech: dict[str, Speech], tmp_path: Path, decoder: object
) -> None:
    """An independent RTP stack checks the packets: ffmpeg listens where an SDP offer says the
    caller is; before any media has latched a source, voxphone sends there (the offer's
    address), and ffmpeg's RTP demuxer and G.711 decoder give back the words."""
    port = free_udp_range(2)[0]  # ffmpeg binds RTP and RTCP (port + 1)
    (tmp_path / "recv.sdp").write_text(
        "v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=caller\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
        f"m=audio {port} RTP/AVP 8\r\na=rtpmap:8 PCMA/8000\r\n"
    )
    out = tmp_path / "heard.wav"
    ffmpeg = await asyncio.create_subprocess_exec(
        require("ffmpeg"), "-loglevel", "error", "-protocol_whitelist", "file,udp,rtp",
        "-i", str(tmp_path / "recv.sdp"), "-ar", "16000", "-y", str(out),
        stdin=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    offer = (
        "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
        f"m=audio {port} RTP/AVP 8 101\r\na=rtpmap:101 telephone-event/8000\r\na=sendrecv\r\n"
    )
    try:
        async with (
            running_serve(tmp_path, receiver, n_ports=2) as srv,
            aiohttp.ClientSession() as http,
        ):
            base = f"http://127.0.0.1:{srv.http_port}"
            async with http.post(
                f"{base}/v1/calls", data=offer, headers={"Content-Type": "application/sdp"}
            ) as r:
                assert r.status == 201, await r.text()
                assert "a=sendrecv" in (await r.text()).split("\r\n")
                call_id = r.headers["X-Call-Id"]
            await asyncio.sleep(0.5)  # ffmpeg is listening
            await play(http, base, call_id, speech["phone"].path.read_bytes())
            await until(lambda: "playback.finished" in types_of(receiver, call_id), 20)
            async with http.delete(f"{base}/v1/calls/{call_id}") as r:
                assert r.status == 204
            # voxphone's RTCP BYE (from its port + 1 to ffmpeg's) ends ffmpeg's input stream.
            assert await asyncio.wait_for(ffmpeg.wait(), 10) == 0
    finally:
        if ffmpeg.returncode is None:
            ffmpeg.kill()
            await ffmpeg.wait()
    heard = hear(read_audio(out, SAMPLE_RATE), decoder)
    assert overlap(speech["phone"].text, heard) >= 0.5, heard
