"""End to end: `voxphone serve` as a process, real RTP in (ffmpeg and `voxphone call`), signed
webhooks out to a real HTTP server, while junk floods the same port."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from standardwebhooks import Webhook

from tests.conftest import Speech, free_tcp_port, free_udp_range, overlap, require
from voxphone.audio.codecs import PCMU
from voxphone.audio.files import read_audio
from voxphone.testing import impair, rtp_packets, send_rtp, send_schedule

pytestmark = pytest.mark.integration

SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()


class WebhookReceiver:
    """A real HTTP server that verifies every delivery with the reference Standard Webhooks code."""

    def __init__(self) -> None:
        self.events: list[dict] = []  # type: ignore[type-arg]
        self.bad_signatures = 0
        self.changed = asyncio.Event()
        app = web.Application()
        app.router.add_post("/hooks", self.handle)
        self.server = TestServer(app, host="127.0.0.1")

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            event = Webhook(SECRET).verify(body, dict(request.headers))
        except Exception:
            self.bad_signatures += 1
            return web.Response(status=400)
        assert request.headers["webhook-id"] == event["id"]
        self.events.append(event)
        self.changed.set()
        return web.Response(status=204)

    async def wait_ended(self, n: int, timeout_s: float) -> None:
        await self.wait_for("call.ended", n, timeout_s)

    async def wait_for(self, event_type: str, n: int, timeout_s: float) -> None:
        """Until ``n`` events of ``event_type`` have been delivered."""
        async with asyncio.timeout(timeout_s):
            while sum(e["type"] == event_type for e in self.events) < n:
                self.changed.clear()
                await self.changed.wait()


async def wait_ready(port: int, proc: asyncio.subprocess.Process, timeout_s: float = 60) -> None:
    async with aiohttp.ClientSession() as http, asyncio.timeout(timeout_s):
        while proc.returncode is None:
            try:
                async with http.get(f"http://127.0.0.1:{port}/ready") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.2)
    raise AssertionError(f"voxphone serve exited with {proc.returncode} before becoming ready")


async def flood(port: int, seconds: float) -> int:
    """Random datagrams at the call's port from another socket, ~500 a second."""
    sent = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while loop.time() < end:
            for _ in range(10):
                s.sendto(os.urandom(sent % 400), ("127.0.0.1", port))
                sent += 1
            await asyncio.sleep(0.02)
    return sent


@dataclass
class Serve:
    http_port: int
    rtp_ports: tuple[int, int]
    audiosocket_port: int
    exit_code: int | None = None
    process: asyncio.subprocess.Process | None = None  # to signal it from a test


@asynccontextmanager
async def running_serve(
    tmp_path: Path,
    receiver: WebhookReceiver,
    *args: str,
    n_ports: int = 4,
    ready_timeout_s: float = 60,
    **env: str,
) -> AsyncIterator[Serve]:
    """`voxphone serve` as a process, webhooks to ``receiver``; stopped with SIGTERM after,
    unless it has exited (a test that signalled it waits for that)."""
    serve = Serve(free_tcp_port(), free_udp_range(n_ports), free_tcp_port())
    env.setdefault("VOXPHONE_ASTERISK__AUDIOSOCKET_PORT", str(serve.audiosocket_port))
    log = (tmp_path / "serve.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "voxphone", "serve", "--http-port", str(serve.http_port),
        "--rtp-ports", "{}-{}".format(*serve.rtp_ports),
        "--webhook", str(receiver.server.make_url("/hooks")), "--webhook-secret", SECRET,
        "--log-format", "json", *args,
        env={**os.environ, **env}, stdout=log, stderr=log,
    )  # fmt: skip
    serve.process = proc
    try:
        await wait_ready(serve.http_port, proc, ready_timeout_s)
        yield serve
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        serve.exit_code = await asyncio.wait_for(proc.wait(), 30)
        log.close()
    assert serve.exit_code == 0, (tmp_path / "serve.log").read_text()[-3000:]


async def ffmpeg_rtp(wav: Path, port: int, *codec_args: str) -> None:
    """ffmpeg sends ``wav`` as RTP at real-time pace (the README's line, codec varied)."""
    ff = await asyncio.create_subprocess_exec(
        require("ffmpeg"), "-loglevel", "error", "-re", "-i", str(wav), "-ac", "1", *codec_args,
        "-f", "rtp", f"rtp://127.0.0.1:{port}", stdout=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert await ff.wait() == 0


def calls_of(receiver: WebhookReceiver) -> dict[str, list[dict]]:  # type: ignore[type-arg]
    by_call: dict[str, list[dict]] = {}  # type: ignore[type-arg]
    for e in receiver.events:
        by_call.setdefault(e["call_id"], []).append(e)
    return by_call


async def test_rtp_calls_reach_the_webhook_signed_with_the_right_words(
    receiver: WebhookReceiver, speech: dict[str, Speech], tmp_path: Path
) -> None:
    async with running_serve(tmp_path, receiver, VOXPHONE_RTP__INACTIVITY_TIMEOUT_S="1.5") as srv:
        lo = srv.rtp_ports[0]
        # The README's ffmpeg line, and the README's test caller, at the same time.
        ff = ffmpeg_rtp(speech["order"].path, lo, "-ar", "8000", "-acodec", "pcm_mulaw")
        caller = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "voxphone", "call", str(speech["phone"].path),
            "--to", f"127.0.0.1:{lo + 2}", "--codec", "pcma", "--dtmf", "42#",
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, junk = await asyncio.gather(ff, flood(lo, 3.0))
        out, _ = await caller.communicate()
        assert caller.returncode == 0 and json.loads(out)["packets_sent"] > 100
        await receiver.wait_ended(2, timeout_s=60)
    assert junk > 1000
    assert receiver.bad_signatures == 0

    by_call = calls_of(receiver)
    assert len(by_call) == 2, "junk must not create calls"
    for events in by_call.values():
        durable = [e["seq"] for e in events if "delta_seq" not in e]  # a delta repeats the seq
        assert durable == list(range(len(durable))), "gap-free, in order"
        assert events[0]["type"] == "call.started"
        assert events[-1]["type"] == "call.ended"
        assert any(e["type"] == "transcript.final" for e in events)
    calls = {events[0]["data"]["codec"]: events for events in by_call.values()}
    # ffmpeg just stops sending; `voxphone call` hangs up with an RTCP BYE, as gateways do.
    assert calls["PCMU"][-1]["data"]["reason"] == "inactivity"
    assert calls["PCMA"][-1]["data"]["reason"] == "bye"
    assert set(calls) == {"PCMU", "PCMA"}
    assert calls["PCMU"][0]["data"]["local_port"] == srv.rtp_ports[0]
    for codec, key in (("PCMU", "order"), ("PCMA", "phone")):
        ended = calls[codec][-1]["data"]
        heard = ended["transcript"]
        assert overlap(speech[key].text, heard) >= 0.5, (codec, heard)
        assert ended["stats"]["decode_errors"] == 0
        finals = " ".join(
            e["data"]["text"] for e in calls[codec] if e["type"] == "transcript.final"
        )
        assert finals == heard
    keys = [e["data"] for e in calls["PCMA"] if e["type"] == "dtmf"]
    assert [k["digit"] for k in keys] == ["4", "2", "#"]
    ats = [k["at_ms"] for k in keys]  # when each was pressed: 220 ms apart on the wire
    assert [b - a for a, b in itertools.pairwise(ats)] == [220, 220], ats
    assert not [e for e in calls["PCMU"] if e["type"] == "dtmf"]


@pytest.mark.parametrize(
    ("codec_args", "payload_type"),
    [
        (("-ar", "16000", "-acodec", "g722"), 9),
        (("-ar", "48000", "-acodec", "libopus", "-payload_type", "107"), 107),
        (("-ar", "16000", "-acodec", "pcm_s16be", "-payload_type", "118"), 118),
        (("-ar", "8000", "-acodec", "pcm_s16be", "-payload_type", "119"), 119),
    ],
    ids=["G722", "opus", "L16-16k-slin16", "L16-8k"],
)
async def test_wideband_and_dynamic_codecs_from_ffmpeg(
    receiver: WebhookReceiver,
    speech: dict[str, Speech],
    tmp_path: Path,
    codec_args: tuple[str, ...],
    payload_type: int,
) -> None:
    """G.722 (16 kHz audio on an 8 kHz RTP clock), Opus and L16 in network byte order, with
    dynamic payload types from the defaults (107 opus, 118 slin16) or the config (119)."""
    async with running_serve(
        tmp_path, receiver, n_ports=2, VOXPHONE_RTP__INACTIVITY_TIMEOUT_S="1.0",
        VOXPHONE_RTP__PAYLOAD_TYPES='{"107": "opus", "118": "L16/16000", "119": "L16/8000"}',
    ) as srv:  # fmt: skip
        await ffmpeg_rtp(speech["order"].path, srv.rtp_ports[0], *codec_args)
        await receiver.wait_ended(1, timeout_s=60)
    (events,) = calls_of(receiver).values()
    ended = events[-1]["data"]
    assert overlap(speech["order"].text, ended["transcript"]) >= 0.5, ended["transcript"]
    assert ended["stats"]["decode_errors"] == 0


async def test_a_bad_network_still_makes_one_call_with_the_words(
    receiver: WebhookReceiver, speech: dict[str, Speech], tmp_path: Path
) -> None:
    """10 % loss, 30 ms jitter (so reordering), duplicates, a sequence wrap, and a new SSRC
    half-way (a transfer): one call, an exact audio clock, the words still recognised."""
    s = speech["order"]
    pcm = read_audio(s.path, 8000)
    half = pcm.size // 2 // 160 * 160
    first = list(rtp_packets(pcm[:half], PCMU, first_seq=65_500, seed=1))
    second = list(rtp_packets(pcm[half:], PCMU, ssrc=0x5EC0_0D, seed=2))
    schedule = impair(first + second, loss=0.1, duplicate=0.05, jitter_ms=30, seed=3)
    # The probation packets and the SSRC switch must arrive: keep the first of each stream.
    schedule = sorted(
        {*schedule, (0.0, first[0]), (len(first) * 0.02, second[0])}, key=lambda x: x[0]
    )
    async with running_serve(tmp_path, receiver, VOXPHONE_RTP__INACTIVITY_TIMEOUT_S="1.0") as srv:
        await send_schedule(schedule, ("127.0.0.1", srv.rtp_ports[0]))
        await receiver.wait_ended(1, timeout_s=60)
    (events,) = calls_of(receiver).values()
    ended = events[-1]["data"]
    assert sum(e["type"] == "call.started" for e in events) == 1
    t = ended["transport"]
    assert t["reordered"] > 0 and t["duplicates"] + t["late"] > 0 and t["lost"] > 0
    assert 2 <= t["jitter_ms"] <= 40  # RFC 3550 interarrival jitter of 0-30 ms send delays
    assert abs(ended["audio_ms"] - pcm.size / 8) <= 240  # the clock follows the timestamps
    # One loss pattern is one sample of a noisy score: this one gives 5 of 11 words with the
    # 2 ms lead of voxphone's resampler (6 without). Over 18 patterns the mean is higher than
    # soxr's was (benchmarks/resample_asr.py: 0.89 against 0.80).
    assert overlap(s.text, ended["transcript"]) >= 0.45, ended["transcript"]


@pytest.mark.parametrize("ctrl_c", [False, True], ids=["sigterm", "ctrl-c"])
async def test_a_signal_drains_live_calls_and_delivers_their_events(
    receiver: WebhookReceiver, speech: dict[str, Speech], tmp_path: Path, ctrl_c: bool
) -> None:
    """Shutdown mid-call, by SIGTERM to the process or by Ctrl-C in its terminal (SIGINT to the
    whole process group, sphinx workers included): the call ends with `shutdown`, its words so
    far are flushed through the engine, and every webhook is delivered before the process exits."""
    lo, hi = free_udp_range(2)
    http_port = free_tcp_port()
    log = (tmp_path / "serve.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "voxphone", "serve", "--http-port", str(http_port),
        "--rtp-ports", f"{lo}-{hi}", "--webhook", str(receiver.server.make_url("/hooks")),
        "--webhook-secret", SECRET, "--log-format", "json",
        env={**os.environ, "VOXPHONE_ASTERISK__AUDIOSOCKET_PORT": "0", "VOXPHONE_CALLS__DRAIN_S": "0",
             "VOXPHONE_ENGINE__SPHINX__WORKERS": "2"},
        stdout=log, stderr=log, start_new_session=True,  # its own process group, as a terminal's
    )  # fmt: skip
    await wait_ready(http_port, proc)
    pcm = read_audio(speech["order"].path, 8000)
    sender = asyncio.create_task(send_rtp(list(rtp_packets(pcm, PCMU, seed=5)), ("127.0.0.1", lo)))
    await until_delta(receiver, words=4)  # the caller is mid-sentence
    if ctrl_c:
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 30) == 0
    log.close()
    sender.cancel()
    (events,) = calls_of(receiver).values()
    assert events[-1]["type"] == "call.ended" and events[-1]["data"]["reason"] == "shutdown"
    durable = [e["seq"] for e in events if "delta_seq" not in e]  # a delta repeats the last seq
    assert durable == list(range(len(durable)))
    assert not [e for e in events if e["type"] == "engine.error"]
    finals = [e["data"]["text"] for e in events if e["type"] == "transcript.final"]
    assert finals and events[-1]["data"]["transcript"] == " ".join(finals)
    assert overlap(speech["order"].text, events[-1]["data"]["transcript"]) >= 0.3
    assert "Traceback" not in (tmp_path / "serve.log").read_text()


async def until_delta(receiver: WebhookReceiver, words: int, timeout_s: float = 30) -> None:
    """Until the deltas delivered hold ``words`` words."""

    def heard() -> int:
        deltas = [e["data"]["text"] for e in receiver.events if e["type"] == "transcript.delta"]
        return len(" ".join(deltas).split())

    async with asyncio.timeout(timeout_s):
        while heard() < words:
            receiver.changed.clear()
            await receiver.changed.wait()
