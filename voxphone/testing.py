"""Helpers for testing voxphone and systems built on it: make RTP, send it, capture events."""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field

from voxphone.audio.codecs import Codec, Encoder, Pcm
from voxphone.clock import FakeClock
from voxphone.events.model import Event
from voxphone.transports.rtp import RtpPacket

__all__ = ["CapturedEvents", "FakeClock", "capture_events", "rtp_packets", "send_rtp"]

PAYLOAD_TYPES = {"PCMU": 0, "PCMA": 8, "G722": 9}


def rtp_packets(
    pcm: Pcm,
    codec: Codec,
    *,
    ptime_ms: int = 20,
    ssrc: int | None = None,
    first_seq: int | None = None,
    first_ts: int | None = None,
    payload_type: int | None = None,
    seed: int | None = None,
) -> Iterator[RtpPacket]:
    """Packetise PCM at ``codec.sample_rate`` as RTP, one packet per ``ptime_ms``.

    Sequence numbers and timestamps start at random points (as real senders do) so wrap-around
    is exercised; fix them with ``first_seq``/``first_ts``.
    """
    rng = random.Random(seed)
    ssrc = rng.getrandbits(32) if ssrc is None else ssrc
    seq = rng.getrandbits(16) if first_seq is None else first_seq
    ts = rng.getrandbits(32) if first_ts is None else first_ts
    pt = PAYLOAD_TYPES[codec.name] if payload_type is None else payload_type
    step = codec.sample_rate * ptime_ms // 1000
    ts_step = codec.clock_rate * ptime_ms // 1000
    encoder = Encoder(codec)
    for i, pos in enumerate(range(0, pcm.size, step)):
        chunk = pcm[pos : pos + step]
        yield RtpPacket(
            pt, seq & 0xFFFF, ts & 0xFFFFFFFF, ssrc, encoder.encode(chunk), marker=i == 0
        )
        seq += 1
        ts += ts_step


async def send_rtp(
    packets: Iterator[RtpPacket] | list[RtpPacket],
    target: tuple[str, int],
    *,
    ptime_ms: int = 20,
    loss: float = 0.0,
    pace: bool = True,
    seed: int | None = None,
) -> int:
    """Send packets over UDP at real-time pace (each on its own schedule, no drift); returns the
    number sent. ``loss`` drops that fraction at random, as a lossy network would."""
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    sent = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        start = loop.time()
        for i, pkt in enumerate(packets):
            if pace:
                await asyncio.sleep(max(0.0, start + i * ptime_ms / 1000 - loop.time()))
            if rng.random() < loss:
                continue
            sock.sendto(pkt.serialize(), target)
            sent += 1
    return sent


@dataclass
class CapturedEvents:
    """An ``EventSink`` that keeps everything, with waiting helpers."""

    events: list[Event] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def publish(self, event: Event) -> None:
        self.events.append(event)
        self._changed.set()

    def of_type(self, type_: str, call_id: str | None = None) -> list[Event]:
        return [e for e in self.events if e.type == type_ and call_id in (None, e.call_id)]

    async def wait_for(self, type_: str, count: int = 1, timeout_s: float = 30.0) -> list[Event]:
        """Wait until ``count`` events of ``type_`` have arrived."""
        async with asyncio.timeout(timeout_s):
            while len(self.of_type(type_)) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.of_type(type_)


def capture_events() -> CapturedEvents:
    """A fresh capturing sink."""
    return CapturedEvents()
