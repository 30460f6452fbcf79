"""A WebRTC session's endings driven by connection states, without a peer connection."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import numpy as np
from aiortc import RTCRtpCodecParameters, RTCRtpReceiver
from aiortc.rtp import RtpPacket

from tests.hooks import until
from voxphone.app import webrtc_settings
from voxphone.audio.codecs import PCMU
from voxphone.call import Call
from voxphone.clock import FakeClock
from voxphone.config import load_config
from voxphone.testing import capture_events
from voxphone.transports.webrtc import Session
from voxphone.transports.webrtc_in import EncodedAudio, receive_encoded, stop_decoder


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


def pcmu_packet(seq: int, ssrc: int = 7) -> RtpPacket:
    """aiortc's packet of 20 ms of PCMU, depayloaded as its receiver leaves it (``_data``)."""
    packet = RtpPacket(payload_type=0, sequence_number=seq & 0xFFFF, timestamp=160 * seq, ssrc=ssrc)
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


async def test_aiortc_hands_its_receivers_packets_to_the_call() -> None:
    """aiortc's own receive path (``_handle_rtp_packet``: statistics, depayloading) ends in
    ``EncodedAudio``, and stopping the decoder plays out the held packets first: should aiortc
    move either, this fails."""
    receiver = RTCRtpReceiver("audio", SimpleNamespace(state="new"))  # type: ignore[arg-type]
    codec = RTCRtpCodecParameters(mimeType="audio/PCMU", clockRate=8000, payloadType=0)
    receiver._RTCRtpReceiver__codecs[0] = codec  # type: ignore[attr-defined]  # as receive() sets
    call = pcmu_call()
    receive_encoded(receiver, EncodedAudio(call, lambda: None))
    for seq in [0, 1, 2, 4]:  # 4 waits for 3
        await receiver._handle_rtp_packet(pcmu_packet(seq), arrival_time_ms=0)
    assert call.stats.packets == 3
    assert not stop_decoder(receiver)  # no decoder thread here: receive() starts it
    receiver._RTCRtpReceiver__decoder_thread = SimpleNamespace(join=lambda: None)  # type: ignore[attr-defined]
    assert stop_decoder(receiver)
    assert call.stats.packets == 4 and call.pipeline.timeline.stats.gap_samples == 160


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
