"""A WebRTC session's endings driven by connection states, without a peer connection."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from tests.hooks import until
from voxphone.audio.codecs import PCMU
from voxphone.call import Call
from voxphone.clock import FakeClock
from voxphone.config import WebRtcConfig
from voxphone.testing import capture_events
from voxphone.transports.webrtc import Session


def session(**settings: Any) -> tuple[Session, SimpleNamespace]:
    call = Call("c", PCMU, capture_events(), FakeClock(), transport="webrtc")
    pc = SimpleNamespace(connectionState="connected")
    return Session("c", pc, call, WebRtcConfig(**settings), FakeClock()), pc  # type: ignore[arg-type]


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
