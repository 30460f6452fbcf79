"""A WebRTC session's endings driven by connection states, without a peer connection."""

from __future__ import annotations

import asyncio
import weakref
from types import SimpleNamespace
from typing import Any

import aioice
import aioice.stun
import numpy as np
import pylibsrtp
import pytest
from aioice.ice import StunProtocol
from aiortc import (
    RTCDtlsTransport,
    RTCPeerConnection,
    RTCRtpCodecParameters,
    RTCRtpReceiver,
)
from aiortc.mediastreams import MediaStreamError
from aiortc.rtcrtpparameters import RTCRtpEncodingParameters, RTCRtpReceiveParameters
from aiortc.rtcrtpreceiver import RemoteStreamTrack
from aiortc.rtp import RtcpByePacket, RtpPacket

from tests.hooks import until
from tests.unit.test_call import Boom, ScriptedEngine, ScriptedStream, end_by_engine_failure
from voxphone.app import webrtc_settings
from voxphone.audio.codecs import PCMU
from voxphone.call import Call, CallRegistry
from voxphone.clock import FakeClock
from voxphone.config import load_config
from voxphone.errors import TransportError
from voxphone.testing import capture_events
from voxphone.transports.webrtc import Session, WebRtcGateway
from voxphone.transports.webrtc_in import (
    EncodedAudio,
    receive_encoded,
    receive_srtp,
    stop_decoder,
)


def session(**settings: Any) -> tuple[Session, SimpleNamespace]:
    """A session under the ``[webrtc]`` settings given (``disconnect_timeout_s=…``), the
    config's defaults for the rest."""
    call = Call("c", PCMU, capture_events(), FakeClock(), transport="webrtc")
    pc = SimpleNamespace(connectionState="connected")
    config = load_config(overrides={f"webrtc.{k}": v for k, v in settings.items()}, environ={})
    return Session("c", pc, call, webrtc_settings(config), FakeClock()), pc  # type: ignore[arg-type]


async def test_ice_disconnected_for_longer_than_the_timeout_ends_the_call() -> None:
    """A blip that recovers within ``disconnect_timeout_s`` is forgiven; a lasting one is not."""
    s, pc = session(disconnect_timeout_s=0.05)
    pc.connectionState = "disconnected"
    await s._on_state()
    pc.connectionState = "connected"
    await s._on_state()
    await asyncio.sleep(0.1)  # twice the timeout: the cancelled timer would have fired
    assert s.call.end_reason is None
    pc.connectionState = "disconnected"
    await s._on_state()
    await until(lambda: s.call.end_reason is not None, timeout_s=2)
    assert s.call.end_reason == "ice_disconnected"


async def test_a_failed_connection_ends_the_call_at_once() -> None:
    s, pc = session()
    pc.connectionState = "failed"
    await s._on_state()
    assert s.call.end_reason == "ice_failed"


def pcmu_packet(seq: int, ssrc: int = 7, marker: bool = False) -> RtpPacket:
    """aiortc's packet of 20 ms of PCMU, depayloaded as its receiver leaves it (``_data``)."""
    packet = RtpPacket(
        payload_type=0, marker=int(marker), sequence_number=seq & 0xFFFF, timestamp=160 * seq,
        ssrc=ssrc,
    )  # fmt: skip
    packet.payload = bytes([seq % 128]) * 160
    packet._data = packet.payload  # type: ignore[attr-defined]
    return packet


def pcmu_call() -> Call:
    return Call("c", PCMU, capture_events(), FakeClock(), transport="webrtc")


def test_packets_reach_the_call_in_order_at_once_and_through_the_jitter_buffer() -> None:
    """In order, a packet is played as it comes (a frame leaves with the fourth, no packet is
    held back as aiortc's buffer held four); a reordered one waits for the gap to fill, a lost
    one becomes silence, a copy is counted; the hang-up plays what is held, and the buffer's
    counters reach the call. Audio and clock are those of the same packets sent in order."""
    call, heard = pcmu_call(), []
    audio = EncodedAudio(call, lambda: heard.append(1))
    for seq in range(65530, 65534):  # across the sequence wrap
        assert audio.add(pcmu_packet(seq)) == (False, None)
    assert call.pipeline.framer.frames_out == 1 and len(heard) == 4
    order = [65535, 65534, 65537, 65538, 65538, 65541, 65542]  # 65536, 65539-40 lost
    for seq in order:
        audio.add(pcmu_packet(seq))
    audio.flush()
    assert call.stats.packets == 10 and call.pipeline.timeline.stats.gap_samples == 3 * 160
    assert call.transport_stats["reordered"] == 1 and call.transport_stats["duplicates"] == 1
    ref, sent = pcmu_call(), [*range(65530, 65536), 65537, 65538, 65541, 65542]
    for seq in sent:
        p = pcmu_packet(seq)
        ref.push_packet(p.timestamp, p.payload)
    assert [f.tolist() for f in call._frames] == [f.tolist() for f in ref._frames]


def test_a_new_ssrc_restarts_the_stream_on_the_same_call_clock() -> None:
    call = pcmu_call()
    audio = EncodedAudio(call, lambda: None)
    for seq in range(8):
        audio.add(pcmu_packet(seq))
    for seq in range(5000, 5008):  # another source: unrelated sequence and timestamps
        audio.add(pcmu_packet(seq, ssrc=8))
    assert call.transport_stats["restarts"] == 1
    assert call.pipeline.timeline.stats.discontinuities == 0 and call.stats.packets == 16
    assert call.pipeline.framer.frames_out == 4  # 320 ms, no gap for the timestamp jump
    assert not np.any(call._frames[-1] == 0)


class _DtlsTransport:
    """What an aiortc receiver asks of its DTLS transport before and after receiving, and
    what ``receive_srtp`` reads of it: its ICE transport's connection and its SRTP session."""

    state = "new"
    _stats_id = "transport"

    def __init__(self) -> None:
        self.transport = SimpleNamespace(_connection=_IceConnection())
        self._rx_srtp: pylibsrtp.Session | None = None

    def _register_rtp_receiver(self, receiver: Any, parameters: Any) -> None:
        pass

    def _unregister_rtp_receiver(self, receiver: Any) -> None:
        pass

    async def _send_rtp(self, data: bytes) -> None:
        pass


#: What a browser's PCMU offer negotiates: the audio, and RFC 4733 events.
PCMU_AND_EVENTS = [
    RTCRtpCodecParameters(mimeType="audio/PCMU", clockRate=8000, payloadType=0),
    RTCRtpCodecParameters(mimeType="audio/telephone-event", clockRate=8000, payloadType=101),
]
ENCODING = RTCRtpEncodingParameters(ssrc=7, payloadType=0)


async def receiving(call: Call, dtls: _DtlsTransport | None = None) -> RTCRtpReceiver:
    """A real aiortc receiver, started as a negotiated PCMU stream (and RFC 4733 events) is,
    its decoder thread running, with the call's ``EncodedAudio`` in place, on aiortc's path and
    on the ICE connection's (``receive_srtp``)."""
    dtls = dtls or _DtlsTransport()
    receiver = RTCRtpReceiver("audio", dtls)  # type: ignore[arg-type]
    receiver._track = RemoteStreamTrack(kind="audio")
    audio = EncodedAudio(call, lambda: None)
    receive_encoded(receiver, audio)
    receive_srtp(receiver, audio)  # before negotiation, as a session starts
    await receiver.receive(RTCRtpReceiveParameters(codecs=PCMU_AND_EVENTS, encodings=[ENCODING]))
    return receiver


async def track_ends(receiver: RTCRtpReceiver) -> None:
    with pytest.raises(MediaStreamError):
        while True:
            await receiver.track.recv()


@pytest.mark.parametrize("how", ["bye", "dtls_closed", "stop", "hangup"])
async def test_every_way_aiortc_stops_plays_the_held_packets_first(how: str) -> None:
    """aiortc's own receive path (``_handle_rtp_packet``: statistics, depayloading) ends in
    ``EncodedAudio``, and however the decoder stops — an RTCP BYE, DTLS closing under it,
    ``stop()``, voxphone's hang-up — what the jitter buffer holds reaches the call before the
    track ends; then the call is let go. Should aiortc move any of these, this fails."""
    call = pcmu_call()
    receiver = await receiving(call)
    for seq in [0, 1, 2, 4, 5]:  # 4 and 5 wait for 3
        await receiver._handle_rtp_packet(pcmu_packet(seq), arrival_time_ms=0)
    assert call.stats.packets == 3
    if how == "bye":
        await receiver._handle_rtcp_packet(RtcpByePacket(sources=[7]))
    elif how == "dtls_closed":
        receiver._handle_disconnect()
    elif how == "stop":
        await receiver.stop()
    else:
        assert stop_decoder(receiver)
        assert not stop_decoder(receiver)  # once
    assert call.stats.packets == 5 and call.pipeline.timeline.stats.gap_samples == 160
    assert set(call.transport_stats) >= {"reordered", "duplicates", "late", "lost"}
    await asyncio.wait_for(track_ends(receiver), 5)
    await receiver._handle_rtp_packet(pcmu_packet(6), arrival_time_ms=0)  # after the end
    assert call.stats.packets == 5
    ref = weakref.ref(call)
    del call
    assert ref() is None  # freed at once, though the receiver lives on


class _IceConnection:
    """aioice's ``Connection`` as far as ``receive_srtp`` touches it: where its protocols hand
    each datagram that is not STUN (``data_received``), queued for aiortc's DTLS transport."""

    def __init__(self) -> None:
        self.queued: list[bytes] = []
        self._protocols: list[StunProtocol] = []

    def data_received(self, data: bytes, component: int) -> None:
        self.queued.append(data)


def srtp_pair() -> tuple[Session, Session]:
    """A browser's SRTP sender and aiortc's receiving session (RFC 3711), as aiortc's DTLS
    transport keys them (``_rx_srtp``: any inbound SSRC, a 1,024-packet replay window)."""
    key = bytes(range(30))  # AES_CM_128_HMAC_SHA1_80: 16 bytes of key, 14 of salt
    tx = pylibsrtp.Policy(key=key, ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND)
    tx.allow_repeat_tx = True  # (the DTMF packet below reuses a sequence number)
    rx = pylibsrtp.Policy(key=key, ssrc_type=pylibsrtp.Policy.SSRC_ANY_INBOUND)
    rx.window_size = 1024
    return pylibsrtp.Session(tx), pylibsrtp.Session(rx)


async def test_audio_srtp_goes_from_the_ice_connection_to_the_call_the_rest_to_aiortc() -> None:
    """Until DTLS has keyed SRTP and the receiver knows its codecs, everything takes aiortc's
    path; then the call's audio (marker bit or not) is unprotected and played from the
    datagram's callback, aiortc's receiver statistics (its RTCP reports) kept, while RTCP, DTLS
    and a payload type that is not audio (RFC 4733) go on to aiortc. A replayed packet, a
    forged one and one too long for libsrtp are counted, not played, and raise nothing."""
    call = pcmu_call()
    dtls = _DtlsTransport()
    ice = dtls.transport._connection
    receiver = RTCRtpReceiver("audio", dtls)  # type: ignore[arg-type]
    receiver._track = RemoteStreamTrack(kind="audio")
    audio = EncodedAudio(call, lambda: None)
    receive_encoded(receiver, audio)
    receive_srtp(receiver, audio)  # as a session starts: before DTLS and negotiation are done
    browser, keyed = srtp_pair()
    srtp = [browser.protect(pcmu_packet(seq, marker=seq == 3).serialize()) for seq in range(7)]
    ice.data_received(srtp[0], 1)  # before the handshake
    dtls._rx_srtp = keyed
    ice.data_received(srtp[1], 1)  # keyed, but the receiver has no codecs yet
    assert ice.queued == srtp[:2]
    await receiver.receive(RTCRtpReceiveParameters(codecs=PCMU_AND_EVENTS, encodings=[ENCODING]))
    for packet in srtp[2:5]:
        ice.data_received(packet, 1)
    dtmf = RtpPacket(payload_type=101, sequence_number=5, timestamp=800, ssrc=7)
    rtcp, dtls_record = bytes([0x80, 200]) + bytes(26), bytes([22, 254, 253]) + bytes(10)
    others = [browser.protect(dtmf.serialize()), rtcp, dtls_record]
    for datagram in others:
        ice.data_received(datagram, 1)
    ice.data_received(srtp[4], 1)  # a copy: libsrtp's replay check refuses it
    forged = bytearray(srtp[6])
    forged[-1] ^= 1  # the authentication tag no longer matches
    ice.data_received(bytes(forged), 1)
    ice.data_received(srtp[5] + bytes(1500), 1)  # beyond libsrtp's buffer
    assert ice.queued == [*srtp[:2], *others]
    assert call.stats.packets == 3 and audio.from_ice == 5  # 2, 3 (marked) and 4 played
    assert call.stats.dropped == {"srtp_unprotect_failed": 2, "malformed": 1}
    stream = receiver._RTCRtpReceiver__remote_streams[7]
    assert stream.packets_received == 3 and stream.max_seq == 4
    assert stop_decoder(receiver)  # its decoder thread ends (else it would hold the process)


async def test_media_skips_aioices_stun_parse_and_the_rest_still_takes_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A socket's RTP and RTCP (RFC 7983: first byte 128–191) go from aioice's protocol
    straight to the call's path, without the STUN parse every datagram had; DTLS (and STUN)
    still go through it, and on to aiortc as before."""
    parsed: list[bytes] = []
    parse = aioice.stun.parse_message

    def counted(data: bytes, *args: Any, **kwargs: Any) -> Any:
        parsed.append(data)
        return parse(data, *args, **kwargs)

    monkeypatch.setattr(aioice.stun, "parse_message", counted)
    call, dtls = pcmu_call(), _DtlsTransport()
    ice = dtls.transport._connection
    protocol = StunProtocol(ice)  # type: ignore[arg-type]
    protocol.local_candidate = aioice.Candidate("1", 1, "udp", 1, "127.0.0.1", 9, "host")
    bare = StunProtocol(ice)  # type: ignore[arg-type]  # no candidate gathered on it
    ice._protocols += [protocol, bare]
    receiver = await receiving(call, dtls)
    assert "datagram_received" not in vars(bare)  # left to aioice
    browser, dtls._rx_srtp = srtp_pair()
    srtp = [browser.protect(pcmu_packet(seq).serialize()) for seq in range(3)]
    rtcp, dtls_record = bytes([0x81, 201]) + bytes(6), bytes([23, 254, 253]) + bytes(10)
    for datagram in [*srtp, rtcp, dtls_record]:
        protocol.datagram_received(datagram, ("127.0.0.1", 5000))
    assert parsed == [dtls_record]
    assert call.stats.packets == 3 and ice.queued == [rtcp, dtls_record]
    assert stop_decoder(receiver)


def test_a_packet_that_fails_is_counted_and_the_call_goes_on() -> None:
    """``add`` runs in aiortc's DTLS loop, which an exception would end with the call."""
    call, fail = pcmu_call(), [True]
    push = call.push_packet

    def flaky(timestamp: int, payload: bytes, codec: Any = None) -> None:
        if fail.pop() if fail else False:
            raise RuntimeError("a bug")
        push(timestamp, payload)

    call.push_packet = flaky  # type: ignore[method-assign]
    audio = EncodedAudio(call, lambda: None)
    assert [audio.add(pcmu_packet(seq)) for seq in range(3)] == [(False, None)] * 3
    assert call.stats.dropped == {"internal_error": 1} and call.stats.packets == 2


def test_the_webrtc_table_reaches_the_transport_as_aiortc_ice_servers() -> None:
    """The app's translation keeps every ``[webrtc]`` value the transport reads."""
    config = load_config(
        overrides={
            "webrtc.ice_servers": [
                {"urls": "stun:stun.example:3478"},
                {"urls": ["turn:turn.example"], "username": "u", "credential": "p"},
            ],
            "webrtc.ports": "50000-50010",
            "webrtc.interfaces": ["10.0.0.5"],
            "webrtc.public_ip": "203.0.113.7",
            "webrtc.cors_origins": ["https://app.example"],
        },
        environ={},
    )
    s = webrtc_settings(config)
    assert [(i.urls, i.username, i.credential) for i in s.ice_servers] == [
        (["stun:stun.example:3478"], None, None),
        (["turn:turn.example"], "u", "p"),
    ]
    assert (s.ports, s.interfaces, s.public_ip) == ((50000, 50010), ("10.0.0.5",), "203.0.113.7")
    assert s.cors_origins == ("https://app.example",)
    w = config.webrtc
    assert (s.disconnect_timeout_s, s.media_timeout_s) == (
        w.disconnect_timeout_s,
        w.media_timeout_s,
    )


async def test_a_call_whose_engine_fails_still_reports_the_streams_counters() -> None:
    """The call ends without the peer connection (its engine failed): ``call.ended.transport``
    has the jitter buffer's counters all the same, and the packet it held is counted."""
    events = capture_events()
    call = Call("c", PCMU, events, FakeClock(), transport="webrtc")
    audio = EncodedAudio(call, lambda: None)
    for seq in (0, 1, 2, 4):  # 3 is missing: 4 is held
        audio.add(pcmu_packet(seq))
    await end_by_engine_failure(call)
    ended = events.of_type("call.ended")[-1].data
    assert ended["reason"] == "engine_error" and "lost" in ended["transport"]
    assert ended["stats"]["dropped"] == {"after_end": 1} and ended["stats"]["packets"] == 3


def gateway() -> WebRtcGateway:
    settings = webrtc_settings(load_config(environ={}))
    return WebRtcGateway(SimpleNamespace(), settings, FakeClock())  # type: ignore[arg-type]


async def test_the_installed_aiortc_has_what_voxphone_reaches_into() -> None:
    await gateway().start()  # raises, naming what is missing, if a pinned release moved it


@pytest.mark.parametrize("moved", ["RTCDtlsTransport._rx_srtp", "RTCRtpReceiver.codecs"])
async def test_an_aiortc_whose_internals_moved_is_refused_at_start_up_in_one_line(
    monkeypatch: pytest.MonkeyPatch, moved: str
) -> None:
    owner, name = moved.split(".")
    cls: Any = {"RTCDtlsTransport": RTCDtlsTransport, "RTCRtpReceiver": RTCRtpReceiver}[owner]
    attr = f"_{owner}__{name}" if owner == "RTCRtpReceiver" else name
    init = cls.__init__

    def renamed(self: Any, *args: Any, **kwargs: Any) -> None:  # as a release renaming it would
        init(self, *args, **kwargs)
        setattr(self, attr + "_renamed", getattr(self, attr))
        delattr(self, attr)

    monkeypatch.setattr(cls, "__init__", renamed)
    with pytest.raises(TransportError) as refused:
        await gateway().start()
    message = str(refused.value)
    assert moved in message and "webrtc.enabled = false" in message and "\n" not in message


@pytest.mark.parametrize("moved", ["datagram_received", "local_candidate"])
async def test_an_aioice_whose_stun_protocol_moved_is_refused_at_start_up(
    monkeypatch: pytest.MonkeyPatch, moved: str
) -> None:
    """``_media_first`` replaces aioice's own ``StunProtocol.datagram_received`` (asyncio's
    base class has one too, so ``hasattr`` would not do) and reads ``local_candidate``."""
    if moved == "datagram_received":
        monkeypatch.delattr(StunProtocol, moved)
    else:
        kept = {k: v for k, v in StunProtocol.__annotations__.items() if k != moved}
        monkeypatch.setattr(StunProtocol, "__annotations__", kept)
    with pytest.raises(TransportError) as refused:
        await gateway().start()
    assert f"aioice.StunProtocol.{moved}" in str(refused.value)


async def test_a_call_whose_set_up_fails_ends_and_closes_its_peer_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Finishing(ScriptedStream):  # says its last words when the audio ends
        async def close(self) -> None:
            self.out.close()

    sink = capture_events()
    registry = CallRegistry(ScriptedEngine(Finishing()), sink, FakeClock(), 10, 5.0)
    settings = webrtc_settings(load_config(environ={}))
    webrtc = WebRtcGateway(registry, settings, FakeClock())
    opened: list[RTCPeerConnection] = []
    monkeypatch.setattr(
        "voxphone.transports.webrtc.RTCPeerConnection",
        lambda *a, **kw: opened.append(RTCPeerConnection(*a, **kw)) or opened[-1],
    )

    def broken(*_args: Any) -> None:
        raise Boom("a bug in the set-up")

    monkeypatch.setattr("voxphone.transports.webrtc.receive_srtp", broken)
    browser = RTCPeerConnection()
    browser.addTransceiver("audio", direction="sendonly")
    await browser.setLocalDescription(await browser.createOffer())
    with pytest.raises(Boom):
        await webrtc.answer(browser.localDescription.sdp, {})
    await until(lambda: not registry.calls)
    assert sink.of_type("call.ended")[0].data["reason"] == "internal_error"
    assert not webrtc.sessions
    assert [pc.connectionState for pc in opened] == ["closed"]
    await browser.close()
