"""A WebRTC session's endings driven by connection states, without a peer connection."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from aiortc.jitterbuffer import JitterBuffer
from aiortc.rtp import RtpPacket

from tests.hooks import until
from voxphone.app import webrtc_settings
from voxphone.audio.codecs import PCMU
from voxphone.call import Call
from voxphone.clock import FakeClock
from voxphone.config import load_config
from voxphone.testing import capture_events
from voxphone.transports.webrtc import Session, _held_packets


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


def test_the_packets_aiortc_holds_back_are_found_in_order() -> None:
    """aiortc's audio jitter buffer (``prefetch=4``) releases a packet only once four more are
    there; ``_held_packets`` reads those four, wrapping around its ring, for the hang-up."""
    jitter = JitterBuffer(capacity=16, prefetch=4)
    released = []
    for seq in range(65530, 65530 + 30):  # across the sequence wrap and round the ring
        packet = RtpPacket(payload_type=0, sequence_number=seq & 0xFFFF, timestamp=160 * seq)
        packet._data = b"x"  # type: ignore[attr-defined]  # what the receiver depayloads
        frame = jitter.add(packet)[1]
        released += [frame.timestamp // 160] if frame else []
    held = [p.timestamp // 160 for p in _held_packets(jitter)]
    assert released + held == list(range(65530, 65530 + 30))
    assert len(held) == 4


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
