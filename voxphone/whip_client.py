"""A WHIP client on aiortc that plays an audio file as a browser call (``voxphone whip``).

It sends the file in real time (aiortc's ``MediaPlayer`` paces it), opens the ``events`` data
channel and collects what voxphone sends back on it, then hangs up with WHIP ``DELETE`` once the
file has played. Tests use it for fast WebRTC coverage without a browser. With ``record`` it
offers ``sendrecv``, as a browser does, and keeps what the bot says on the answer's track
(``TrackRecorder``) and the keys it sends (``bot.dtmf`` on the data channel); ``hold_s`` stays
on the line that long after the file, sending silence, so a reply can be heard.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import av
import numpy as np
from aiortc import (
    RTCConfiguration,
    RTCDataChannel,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc.contrib.media import MediaPlayer
from aiortc.mediastreams import AudioStreamTrack, MediaStreamError, MediaStreamTrack
from yarl import URL

from voxphone.audio.codecs import Pcm
from voxphone.audio.files import check_file, ffmpeg_says, write_wav
from voxphone.errors import DecodeError, TransportError


def to_mono(frame: av.AudioFrame) -> Pcm:
    """An aiortc frame (s16, mono or stereo, planar or packed) as int16 mono: the mean of the
    channels, rounded down."""
    channels = frame.layout.nb_channels
    samples = frame.to_ndarray()
    if channels == 1:
        mono: Pcm = samples.reshape(-1).astype(np.int16, copy=False)
        return mono
    # Planar is (channels, n); packed (aiortc's Opus output) is (1, n * channels), interleaved.
    flat = samples.reshape(-1)
    parts = (
        list(samples) if frame.format.is_planar else [flat[k::channels] for k in range(channels)]
    )
    acc = parts[0].astype(np.int32)
    for part in parts[1:]:
        acc += part
    mixed: Pcm = (acc // channels).astype(np.int16)
    return mixed


@dataclass
class TrackRecorder:
    """What arrives on a received audio track, placed by each frame's timestamp (aiortc keeps the
    RTP timestamp as ``pts``), so a gap stays a gap; mono int16 at the track's rate."""

    rate: int = 0
    frames: int = 0
    _pieces: list[tuple[int, Pcm]] = field(default_factory=list)

    def add(self, frame: av.AudioFrame) -> None:
        assert frame.pts is not None and frame.time_base is not None
        self.rate = frame.sample_rate
        self.frames += 1
        self._pieces.append((round(frame.pts * frame.time_base * self.rate), to_mono(frame)))

    def pcm(self) -> Pcm:
        if not self._pieces:
            return np.zeros(0, np.int16)
        start = min(offset for offset, _ in self._pieces)
        end = max(offset + pcm.size for offset, pcm in self._pieces)
        out = np.zeros(end - start, np.int16)
        for offset, pcm in self._pieces:
            out[offset - start : offset - start + pcm.size] = pcm
        return out

    def write_wav(self, path: Path) -> float:
        """Write 16-bit mono WAV; returns its length in seconds."""
        return write_wav(path, self.pcm(), self.rate or 48000)


@dataclass
class WhipCall:
    """One call placed by ``whip_call``: its session URL, call id and the events received."""

    pc: RTCPeerConnection
    player: MediaPlayer
    channel: RTCDataChannel
    session_url: str
    call_id: str
    headers: dict[str, str]
    events: list[dict[str, Any]] = field(default_factory=list)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    played: asyncio.Event = field(default_factory=asyncio.Event)
    #: What the bot said (``record``), and the keys it sent.
    recorder: TrackRecorder | None = None
    digits: str = ""
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def on_message(self, message: str | bytes) -> None:
        event = json.loads(message)
        if event.get("type") == "bot.dtmf":  # not an event: a key the bot sent
            self.digits += str(event.get("digit", ""))
            return
        self.events.append(event)
        if event.get("type") == "call.ended":
            self.ended.set()

    def on_track(self, track: MediaStreamTrack) -> None:
        if self.recorder is not None and track.kind == "audio":
            task = asyncio.create_task(self._record(track, self.recorder))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    @staticmethod
    async def _record(track: MediaStreamTrack, recorder: TrackRecorder) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                assert isinstance(frame, av.AudioFrame)
                recorder.add(frame)

    async def hold(self, seconds: float) -> None:
        """Stay on the line ``seconds`` more, sending silence instead of the (ended) file."""
        if seconds > 0:
            sender = next(t.sender for t in self.pc.getTransceivers() if t.kind == "audio")
            sender.replaceTrack(AudioStreamTrack())
            await asyncio.sleep(seconds)

    async def hangup(self, http: aiohttp.ClientSession) -> None:
        """``DELETE`` the WHIP session. ``TransportError`` when the server refuses it or is
        gone (stopped or crashed without ending the call on the data channel)."""
        try:
            async with http.delete(self.session_url, headers=self.headers) as resp:
                if resp.status not in (200, 404):
                    raise TransportError(f"WHIP DELETE: HTTP {resp.status}: {await resp.text()}")
        except aiohttp.ClientError as exc:
            raise TransportError(
                f"cannot hang up at {self.session_url}: {_why(exc)}; the server went away "
                "during the call"
            ) from exc

    async def close(self) -> None:
        await self.pc.close()
        if self.player.audio is not None:
            self.player.audio.stop()
        for task in list(self.tasks):
            task.cancel()


async def whip_call(
    http: aiohttp.ClientSession,
    url: str,
    audio: Path,
    codec: str | None = None,
    token: str | None = None,
    record: bool = False,
) -> WhipCall:
    """Offer a call to the WHIP endpoint ``url`` that plays ``audio`` (``codec``: e.g. ``PCMU``);
    with ``record``, ``sendrecv``, keeping what comes back in ``call.recorder``.

    ``DecodeError``: the file is no audio; ``TransportError``: the endpoint is unreachable or
    refuses the offer. Either way nothing is left open."""
    player = _player(audio)
    assert player.audio is not None
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        return await _offer(http, url, pc, player, codec, token, record)
    except BaseException:
        await pc.close()
        player.audio.stop()  # closes the file
        raise


def _player(audio: Path) -> MediaPlayer:
    """An aiortc player of the file's audio, or ``DecodeError`` saying why there is none."""
    check_file(audio)
    try:
        player = MediaPlayer(str(audio))
    except (av.FFmpegError, OSError) as exc:
        raise DecodeError(f"{audio}: cannot read audio: {ffmpeg_says(exc)}") from exc
    if player.audio is None:
        if player.video is not None:
            player.video.stop()
        raise DecodeError(f"{audio}: no audio stream")
    return player


def _why(exc: aiohttp.ClientError) -> str:
    """The OS's words ("Connection refused"), not asyncio's "Connect call failed (…)"."""
    errno = exc.os_error.errno if isinstance(exc, aiohttp.ClientConnectorError) else None
    return os.strerror(errno) if errno else str(exc)


async def _offer(
    http: aiohttp.ClientSession, url: str, pc: RTCPeerConnection, player: MediaPlayer,
    codec: str | None, token: str | None, record: bool,
) -> WhipCall:  # fmt: skip
    assert player.audio is not None
    direction = "sendrecv" if record else "sendonly"
    transceiver = pc.addTransceiver(player.audio, direction=direction)
    if codec is not None:
        caps = RTCRtpSender.getCapabilities("audio")
        assert caps is not None
        wanted = [c for c in caps.codecs if c.mimeType.lower() == f"audio/{codec.lower()}"]
        if not wanted:
            raise TransportError(f"aiortc cannot send {codec}")
        transceiver.setCodecPreferences(wanted)
    channel = pc.createDataChannel("events")
    await pc.setLocalDescription(await pc.createOffer())  # aiortc gathers before returning
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body = pc.localDescription.sdp
    sdp_headers = {**headers, "Content-Type": "application/sdp"}
    try:
        async with http.post(url, data=body, headers=sdp_headers) as resp:
            answer = await resp.text()
            if resp.status != 201:
                raise TransportError(f"WHIP offer refused: HTTP {resp.status}: {answer}")
            location = str(resp.url.join(URL(resp.headers["Location"])))
            call_id = resp.headers.get("X-Call-Id", location.rsplit("/", 1)[-1])
    except aiohttp.ClientError as exc:
        raise TransportError(
            f"cannot reach the WHIP endpoint {url}: {_why(exc)}; is voxphone serve running there?"
        ) from exc
    call = WhipCall(pc, player, channel, location, call_id, headers)
    if record:
        call.recorder = TrackRecorder()
        pc.on("track", call.on_track)
    channel.on("message", call.on_message)
    player.audio.on("ended", call.played.set)
    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
    return call


async def talk(
    http: aiohttp.ClientSession, url: str, audio: Path, codec: str | None = None,
    token: str | None = None, end_timeout_s: float = 30.0, record: bool = False,
    hold_s: float = 0.0,
) -> WhipCall:  # fmt: skip
    """Place a call that plays ``audio`` (then ``hold_s`` of silence), hang up, wait for
    ``call.ended``; ``record`` keeps what the bot says (``call.recorder``). A call the server
    ends first (its shutdown, ``max_duration``, a hang-up through the API) is not hung up
    again: ``call.ended`` came on the data channel, and the server may already be gone."""
    call = await whip_call(http, url, audio, codec, token, record)
    talking = asyncio.ensure_future(_play_and_hold(call, hold_s))
    ended = asyncio.ensure_future(call.ended.wait())
    try:
        await asyncio.wait({talking, ended}, return_when=asyncio.FIRST_COMPLETED)
        if not call.ended.is_set():
            talking.result()  # (raises what playing raised)
            await call.hangup(http)
            await asyncio.wait_for(ended, end_timeout_s)
    finally:
        for task in (talking, ended):
            task.cancel()
        await call.close()
    return call


async def _play_and_hold(call: WhipCall, hold_s: float) -> None:
    await call.played.wait()
    await call.hold(hold_s)
    await asyncio.sleep(0.5)  # the last packets are still on the wire


async def play(
    url: str, audio: Path, codec: str | None = None, token: str | None = None,
    record: bool = False, hold_s: float = 0.0,
) -> WhipCall:  # fmt: skip
    """``talk`` on its own HTTP session (``voxphone whip``): its ``events``, and with
    ``record`` its ``recorder`` and ``digits``."""
    async with aiohttp.ClientSession() as http:
        try:
            return await talk(http, url, audio, codec, token, record=record, hold_s=hold_s)
        except TimeoutError:
            raise TransportError(f"the call to {url} never ended (no call.ended)") from None
