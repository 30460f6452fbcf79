"""Browser calls: one aiortc peer connection per call, its audio into the call pipeline.

The offer is checked first (``webrtc_sdp.plan_offer``) so a bad one costs no peer connection.
The answer names exactly one audio codec, chosen from the offer, so the call's pipeline knows
its rate before the first packet; other m= lines are answered inactive. aiortc does ICE, DTLS,
SRTP keying and RTCP; the call's audio packets are taken from the ICE connection and go to the
call as payloads (``webrtc_in``), which the call decodes and places on its clock by their RTP
timestamps, as for an RTP call, so loss becomes silence.
Events go back to the browser over the data channel it opened. When the
offer's audio is ``sendrecv`` the answer is too, with the bot's outbound track (``webrtc_out``):
that is the call's ``MediaEndpoint``; a ``sendonly`` (WHIP) offer makes a listen-only call.

A call ends when the browser hangs up (WHIP ``DELETE``, a ``hangup`` message, closing the peer
connection), when ICE fails or stays disconnected, or when audio stops arriving (a closed tab
that said nothing). Each ending first plays out what the jitter buffer still holds.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Any

import structlog
from aiortc import (
    RTCConfiguration,
    RTCDataChannel,
    RTCIceServer,
    RTCPeerConnection,
    RTCRtpReceiver,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.sdp import candidate_from_sdp

from voxphone.audio import opus
from voxphone.call import Call, CallRegistry, new_call_id
from voxphone.clock import Clock
from voxphone.errors import TransportError
from voxphone.events.model import Event
from voxphone.transports.dtmf import DTMF_KEYS
from voxphone.transports.ice import HostBinder, Unavailable
from voxphone.transports.webrtc_in import (
    EncodedAudio,
    missing_internals,
    receive_encoded,
    receive_srtp,
    stop_decoder,
)
from voxphone.transports.webrtc_out import BotAudioTrack, WebRtcEndpoint
from voxphone.transports.webrtc_sdp import (
    OfferPlan,
    TrickleCandidate,
    announce_public_ip,
    answer_dtls_passive,
    answer_opus_fmtp,
    plan_offer,
)

log = structlog.get_logger(__name__)

#: Events held for a data channel that has not opened yet (call.started comes first).
_MAX_PENDING_EVENTS = 1000


@dataclass(frozen=True)
class WebRtcSettings:
    """The ``[webrtc]`` table as the transport uses it (the app builds it from the config).

    ``ice_servers``: STUN/TURN servers for the server's own candidates. ``interfaces``: local
    addresses for host candidates (empty = every interface but loopback), ``ports`` their UDP
    range (None = ephemeral), ``public_ip`` a 1:1 NAT's address announced as an extra host
    candidate. A call ends after ICE stays disconnected ``disconnect_timeout_s`` or no audio
    packet comes for ``media_timeout_s`` (seconds). ``cors_origins``: web origins that may call
    WHIP (``"*"`` = any).
    """

    ice_servers: tuple[RTCIceServer, ...]
    interfaces: tuple[str, ...]
    public_ip: str | None
    ports: tuple[int, int] | None
    disconnect_timeout_s: float
    media_timeout_s: float
    cors_origins: tuple[str, ...]


@dataclass
class Session:
    """One browser call: its peer connection, call, data channel and watchdogs."""

    session_id: str
    pc: RTCPeerConnection
    call: Call
    settings: WebRtcSettings
    clock: Clock
    channel: RTCDataChannel | None = None
    pending: list[str] = field(default_factory=list)
    last_audio: float = 0.0
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _receiver: RTCRtpReceiver | None = None
    _audio: EncodedAudio | None = None
    #: The bot's voice to the browser (``webrtc_out``), when the browser's offer receives audio.
    track: BotAudioTrack | None = None
    _ending: str | None = None  # why the call is ending, once its last audio is on the way
    _disconnected: asyncio.TimerHandle | None = None
    _closing: asyncio.Future[None] | None = None
    _lifetime: asyncio.Task[None] | None = None  # held: the loop keeps only weak references

    def start(self, on_done: Callable[[Session], None]) -> None:
        self.last_audio = self.clock.monotonic()
        # The answer has one receiving audio transceiver (recvonly, or sendrecv when the bot
        # can talk back); its track exists from negotiation on.
        receiving = [
            t
            for t in self.pc.getTransceivers()
            if t.kind == "audio" and t.direction in ("recvonly", "sendrecv")
        ]
        self._receiver = receiving[0].receiver
        self._audio = EncodedAudio(self.call, self._heard)
        receive_encoded(self._receiver, self._audio)
        receive_srtp(self._receiver, self._audio)
        self._spawn(self._until_ended(self._receiver.track))
        self.call.hangup = self.hangup  # DELETE /v1/calls/{id} and shutdown play out the tail too
        if self.track is not None:
            self.track.on_drop = lambda n: self.call.count_dropped("outbound_backlog", n)
            self.call.attach_endpoint(WebRtcEndpoint(self.track, self.send_text, self.hangup))
        self.pc.on("datachannel", self._on_datachannel)
        self.pc.on("connectionstatechange", self._on_state)
        self._spawn(self._watch_media())
        self._lifetime = asyncio.create_task(self._close_when_done(on_done))

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # -- media ------------------------------------------------------------------------------

    def _heard(self) -> None:
        self.last_audio = self.clock.monotonic()

    async def _until_ended(self, track: MediaStreamTrack) -> None:
        """The track ends when aiortc stops the receiver's decoder, after the call's last packet
        (``receive_encoded``); it carries no frames, the packets went to the call."""
        while True:
            try:
                await track.recv()
            except MediaStreamError:
                break
        self.call.end(self._ending or self._lost())

    def _lost(self) -> str:
        """Why the track ended unasked: DTLS closed, because the browser closed the connection
        (``hangup``) or because ICE consent expired (RFC 7675: ``ice_failed``). aiortc then closes
        the peer connection itself, so only the ICE transport still says ``failed``."""
        assert self._receiver is not None
        failed = self._receiver.transport.transport.state == "failed"
        return "ice_failed" if failed or self.pc.connectionState == "failed" else "hangup"

    def hangup(self, reason: str) -> None:
        """End the call once the audio aiortc still holds has been transcribed."""
        if self._ending is not None or self.call.end_reason is not None:
            return
        self._ending = reason
        if self._receiver is None or not stop_decoder(self._receiver):
            self.call.end(reason)

    async def _watch_media(self) -> None:
        timeout = self.settings.media_timeout_s
        while self.call.end_reason is None:
            idle = self.clock.monotonic() - self.last_audio
            if idle >= timeout:
                log.info("webrtc_no_media", call_id=self.call.call_id, idle_s=round(idle, 1))
                self.hangup("no_media")
                return
            await asyncio.sleep(min(1.0, timeout - idle))

    # -- connection state -------------------------------------------------------------------

    async def _on_state(self) -> None:
        """``failed`` ends the call; ``disconnected`` (aiortc 1.16 never reports it, browsers'
        stacks do) ends it if it lasts. ``closed`` is left to ``_until_ended``: the track ends
        after the call's last packet, and ``_lost`` says why."""
        state = self.pc.connectionState
        log.debug("webrtc_state", call_id=self.call.call_id, state=state)
        if self._disconnected is not None:
            self._disconnected.cancel()
            self._disconnected = None
        if state == "failed":
            self.hangup("ice_failed")
        elif state == "disconnected":
            loop = asyncio.get_running_loop()
            self._disconnected = loop.call_later(
                self.settings.disconnect_timeout_s, self.hangup, "ice_disconnected"
            )

    # -- data channel -----------------------------------------------------------------------

    def _on_datachannel(self, channel: RTCDataChannel) -> None:
        if self.channel is not None:
            return  # one events channel per call; others are ignored
        self.channel = channel
        channel.on("open", self._flush)
        channel.on("message", self._on_message)
        if channel.readyState == "open":
            self._flush()

    def _flush(self) -> None:
        if self.channel is not None and self.channel.readyState == "open":
            for text in self.pending:
                self.channel.send(text)
            self.pending.clear()

    def _on_message(self, message: str | bytes) -> None:
        """The browser's requests: ``{"type": "hangup"}`` or ``{"type": "dtmf", "digit": "5"}``."""
        try:
            request = json.loads(message)
            kind, digit = request["type"], str(request.get("digit", ""))
            duration_ms = int(request.get("duration_ms", 100))
        except (ValueError, TypeError, KeyError, AttributeError):
            log.info("webrtc_bad_message", call_id=self.call.call_id, message=str(message)[:80])
            return
        if kind == "hangup":
            self.hangup("hangup")
        elif kind == "dtmf" and len(digit) == 1 and digit in DTMF_KEYS:
            self.call.dtmf(digit, duration_ms)

    def send(self, event: Event) -> None:
        """Push one event to the browser (held until the data channel opens)."""
        self.send_text(event.to_json().decode())

    def send_text(self, text: str) -> None:
        """Push one message to the browser (held until the data channel opens)."""
        self.pending.append(text)
        if len(self.pending) > _MAX_PENDING_EVENTS:
            del self.pending[0]
        self._flush()

    # -- teardown ---------------------------------------------------------------------------

    async def _close_when_done(self, on_done: Callable[[Session], None]) -> None:
        try:
            await self.call.wait()
            await self._drain_channel()
        finally:
            await self.close()
            on_done(self)

    async def _drain_channel(self, limit_s: float = 1.0) -> None:
        """Give ``call.ended`` a moment to leave before the connection closes under it."""
        deadline = self.clock.monotonic() + limit_s
        channel = self.channel
        while (
            channel is not None
            and channel.readyState == "open"
            and (channel.bufferedAmount > 0 or self.pending)
        ):
            if self.clock.monotonic() > deadline:
                break
            await asyncio.sleep(0.02)

    async def close(self, limit_s: float = 5.0) -> None:
        """Stop the media tasks and close the peer connection, once, however often called.

        aiortc's ``close`` must not be cancelled half-way (a second call would then wait
        forever), so it runs in its own task, shielded from the callers' cancellation.
        """
        if self._closing is None:
            if self._audio is not None:
                self._audio.detach()
            if self._disconnected is not None:
                self._disconnected.cancel()
            for task in list(self.tasks):
                task.cancel()
            if self.track is not None:
                self.track.stop()
            self._closing = asyncio.ensure_future(self.pc.close())
        try:
            await asyncio.wait_for(asyncio.shield(self._closing), limit_s)
        except TimeoutError:
            log.warning("webrtc_close_slow", call_id=self.call.call_id, limit_s=limit_s)

    async def add_candidates(self, candidates: list[TrickleCandidate]) -> None:
        """Trickled remote candidates (WHIP ``PATCH``)."""
        for c in candidates:
            try:
                candidate = candidate_from_sdp(c.candidate)
            except (ValueError, IndexError) as exc:
                raise TransportError(f"candidate {c.candidate[:60]!r}: {exc}") from exc
            candidate.sdpMid = c.mid or self._first_mid()
            await self.pc.addIceCandidate(candidate)

    def _first_mid(self) -> str | None:
        transceivers = self.pc.getTransceivers()
        return transceivers[0].mid if transceivers else None


class WebRtcGateway:
    """The process's WebRTC calls: answers offers, routes events to data channels, hangs up."""

    def __init__(self, registry: CallRegistry, settings: WebRtcSettings, clock: Clock) -> None:
        self.registry = registry
        self.settings = settings
        self.clock = clock
        self.sessions: dict[str, Session] = {}
        self._early: dict[str, list[str]] = {}
        self._binder = HostBinder(settings.interfaces, settings.ports)
        self._opus = opus.available()
        if not self._opus:
            why = "libopus not found next to PyAV or on the system; reinstall PyAV's wheel"
            log.warning("webrtc_without_opus", why=why, codecs="PCMU, PCMA or G.722")
        self._ice_servers = list(settings.ice_servers)

    async def start(self) -> None:
        """Check, before any call, that the aiortc and aioice installed have what voxphone's
        receive path reaches into (``webrtc_in.missing_internals``); ``TransportError`` in one
        line if not."""
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        try:
            missing = missing_internals(pc.addTransceiver("audio", direction="recvonly").receiver)
        finally:
            await pc.close()
        if missing:
            versions = f"aiortc {version('aiortc')}, aioice {version('aioice')}"
            raise TransportError(
                f"WebRTC: {versions} lack what voxphone receives browser audio through "
                f"({', '.join(missing)}); install the releases voxphone pins "
                "(pip install 'aiortc<1.17' 'aioice<0.14') or set webrtc.enabled = false"
            )

    async def answer(self, offer_sdp: str, metadata: dict[str, Any]) -> tuple[Session, str]:
        """Answer a browser's offer and start its call.

        ``TransportError`` means the offer itself is unusable (4xx), ``Unavailable`` that voxphone
        cannot take a call now (503). Either way no peer connection is left behind.
        """
        plan = plan_offer(offer_sdp, opus=self._opus)
        if not self.registry.accepting or len(self.registry.calls) >= self.registry.max_concurrent:
            raise Unavailable("not accepting calls: at the concurrent call limit, or draining")
        # An empty list, not None: aiortc's default is Google's STUN server.
        pc = RTCPeerConnection(RTCConfiguration(iceServers=self._ice_servers))
        track = BotAudioTrack(plan.codec.sample_rate) if plan.receives else None
        try:
            answer_sdp = await self._negotiate(pc, plan, offer_sdp, track)
        except BaseException:
            await pc.close()
            raise
        call_id = new_call_id()
        early: list[str] = []  # call.started is published inside open(), before the session
        self._early[call_id] = early
        try:
            call = self.registry.open(
                plan.codec, transport="webrtc", metadata=metadata, call_id=call_id
            )
        finally:
            del self._early[call_id]
        if call is None:
            await pc.close()
            raise Unavailable("not accepting calls: at the concurrent call limit, or draining")
        session = Session(call_id, pc, call, self.settings, self.clock, pending=early, track=track)
        self.sessions[call_id] = session
        try:
            session.start(self._forget)
        except BaseException:  # a bug in the set-up: the call ends, its connection closes
            self.sessions.pop(call_id, None)
            call.end("internal_error")
            await pc.close()
            raise
        log.info("webrtc_answered", call_id=call_id, codec=plan.codec.name)
        return session, answer_sdp

    async def _negotiate(
        self, pc: RTCPeerConnection, plan: OfferPlan, offer_sdp: str, track: BotAudioTrack | None
    ) -> str:
        """The answer: the first audio m= line receives (and sends ``track``, the bot's voice,
        when there is one: ``sendrecv``), the other media lines are inactive."""
        audio_seen = False
        for kind in plan.kinds:
            if kind == "application":
                continue
            if kind == "audio" and not audio_seen:
                audio_seen = True
                transceiver = (
                    pc.addTransceiver("audio", direction="recvonly")
                    if track is None
                    else pc.addTransceiver(track, direction="sendrecv")
                )
                capabilities = RTCRtpReceiver.getCapabilities("audio")
                assert capabilities is not None
                transceiver.setCodecPreferences(
                    [c for c in capabilities.codecs if c.mimeType.lower() == plan.mime_type]
                )
            elif kind in ("audio", "video"):
                pc.addTransceiver(kind, direction="inactive")
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
        except (ValueError, LookupError) as exc:
            raise TransportError(f"offer rejected by the WebRTC stack: {exc}") from exc
        self._binder.apply(pc)
        answer = await pc.createAnswer()
        passive = answer_dtls_passive(offer_sdp, answer.sdp)  # DTLS server: see its docstring
        await pc.setLocalDescription(RTCSessionDescription(sdp=passive, type="answer"))
        sdp = answer_opus_fmtp(pc.localDescription.sdp)  # what voxphone hears: see there
        if self.settings.public_ip:
            sdp = announce_public_ip(sdp, self.settings.public_ip)
        return sdp

    def _forget(self, session: Session) -> None:
        self.sessions.pop(session.session_id, None)

    def publish(self, event: Event) -> None:
        """EventSink: a WebRTC call's events also go to its browser."""
        session = self.sessions.get(event.call_id)
        if session is not None:
            session.send(event)
        elif event.call_id in self._early:
            self._early[event.call_id].append(event.to_json().decode())

    async def close_all(self) -> None:
        """Shutdown: close every peer connection (calls have been drained already)."""
        sessions = list(self.sessions.values())
        for session in sessions:
            session.call.end("shutdown")
        await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)
        self.sessions.clear()
