"""A WHIP client on aiortc that plays an audio file as a browser call (``voxphone call --webrtc``).

It sends the file in real time (aiortc's ``MediaPlayer`` paces it), opens the ``events`` data
channel and collects what voxphone sends back on it, then hangs up with WHIP ``DELETE`` once the
file has played. Tests use it for fast WebRTC coverage without a browser.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import av
from aiortc import (
    RTCConfiguration,
    RTCDataChannel,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc.contrib.media import MediaPlayer
from yarl import URL

from voxphone.audio.files import check_file
from voxphone.errors import DecodeError, TransportError


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

    def on_message(self, message: str | bytes) -> None:
        event = json.loads(message)
        self.events.append(event)
        if event.get("type") == "call.ended":
            self.ended.set()

    async def hangup(self, http: aiohttp.ClientSession) -> None:
        async with http.delete(self.session_url, headers=self.headers) as resp:
            if resp.status not in (200, 404):
                raise TransportError(f"WHIP DELETE: HTTP {resp.status}: {await resp.text()}")

    async def close(self) -> None:
        await self.pc.close()
        if self.player.audio is not None:
            self.player.audio.stop()


async def whip_call(
    http: aiohttp.ClientSession,
    url: str,
    audio: Path,
    codec: str | None = None,
    token: str | None = None,
) -> WhipCall:
    """Offer a call to the WHIP endpoint ``url`` that plays ``audio`` (``codec``: e.g. ``PCMU``).

    ``DecodeError``: the file is no audio; ``TransportError``: the endpoint is unreachable or
    refuses the offer. Either way nothing is left open."""
    player = _player(audio)
    assert player.audio is not None
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        return await _offer(http, url, pc, player, codec, token)
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
        raise DecodeError(f"{audio}: cannot read audio: {exc}") from exc
    if player.audio is None:
        if player.video is not None:
            player.video.stop()
        raise DecodeError(f"{audio}: no audio stream")
    return player


async def _offer(
    http: aiohttp.ClientSession, url: str, pc: RTCPeerConnection, player: MediaPlayer,
    codec: str | None, token: str | None,
) -> WhipCall:  # fmt: skip
    assert player.audio is not None
    transceiver = pc.addTransceiver(player.audio, direction="sendonly")
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
            f"cannot reach the WHIP endpoint {url}: {exc}; is voxphone serve running there?"
        ) from exc
    call = WhipCall(pc, player, channel, location, call_id, headers)
    channel.on("message", call.on_message)
    player.audio.on("ended", call.played.set)
    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
    return call


async def talk(
    http: aiohttp.ClientSession, url: str, audio: Path, codec: str | None = None,
    token: str | None = None, end_timeout_s: float = 30.0,
) -> WhipCall:  # fmt: skip
    """Place a call that plays ``audio``, hang up when it has played, wait for ``call.ended``."""
    call = await whip_call(http, url, audio, codec, token)
    try:
        await call.played.wait()
        await asyncio.sleep(0.5)  # the last packets are still on the wire
        await call.hangup(http)
        await asyncio.wait_for(call.ended.wait(), end_timeout_s)
    finally:
        await call.close()
    return call


async def play(
    url: str, audio: Path, codec: str | None = None, token: str | None = None
) -> list[dict[str, Any]]:
    """``talk`` on its own HTTP session; the events the call got back (``voxphone whip``)."""
    async with aiohttp.ClientSession() as http:
        try:
            return (await talk(http, url, audio, codec, token)).events
        except TimeoutError:
            raise TransportError(f"the call to {url} never ended (no call.ended)") from None
