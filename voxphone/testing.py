"""Helpers for testing voxphone and systems built on it: make RTP, send it, capture events."""

from __future__ import annotations

import asyncio
import random
import socket
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from voxphone.audio.codecs import Codec, Encoder, Pcm
from voxphone.clock import FakeClock
from voxphone.events.model import Event
from voxphone.transports.dtmf import DTMF_KEYS
from voxphone.transports.rtp_packet import RtpPacket

__all__ = [
    "CapturedEvents",
    "FakeClock",
    "MemoryEndpoint",
    "capture_events",
    "dtmf_packets",
    "free_tcp_port",
    "free_udp_range",
    "impair",
    "rtp_packets",
    "send_rtp",
    "send_schedule",
]

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


def dtmf_packets(
    digits: str,
    after: RtpPacket,
    *,
    payload_type: int = 101,
    duration_ms: int = 100,
    gap_ms: int = 100,
    ptime_ms: int = 20,
    clock_rate: int = 8000,
) -> list[RtpPacket | None]:
    """RFC 4733 key presses continuing the stream that ended with ``after``: per digit, updates
    every ``ptime_ms`` with a growing duration, the end packet three times, then ``gap_ms`` of
    nothing (``None`` = a tick without a packet, for ``send_rtp``)."""
    out: list[RtpPacket | None] = []
    seq, ts = after.sequence, after.timestamp
    tick = clock_rate * ptime_ms // 1000
    for digit in digits:
        key = DTMF_KEYS.index(digit.upper())
        ts = (ts + tick) & 0xFFFFFFFF
        steps = max(1, duration_ms // ptime_ms)
        for i in range(steps + 3):
            end = i >= steps
            duration = tick * min(i + 1, steps)
            seq = (seq + 1) & 0xFFFF
            body = struct.pack("!BBH", key, (0x80 if end else 0) | 10, duration)
            out.append(RtpPacket(payload_type, seq, ts, after.ssrc, body, marker=i == 0))
        out += [None] * (gap_ms // ptime_ms)
        ts = (ts + tick * (steps + gap_ms // ptime_ms)) & 0xFFFFFFFF
    return out


async def send_rtp(
    packets: Iterable[RtpPacket | None],
    target: tuple[str, int],
    *,
    ptime_ms: int = 20,
    loss: float = 0.0,
    pace: bool = True,
    seed: int | None = None,
    sock: socket.socket | None = None,
) -> int:
    """Send packets over UDP at real-time pace (each on its own schedule, no drift); returns the
    number sent. ``None`` is a tick with no packet. ``loss`` drops that fraction at random, as a
    lossy network would. ``sock``: send from this socket and leave it open (so the caller's RTCP
    can come from the same, latched, source); by default a fresh one."""
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    sent = 0
    own = sock is None
    sock = sock or socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        start = loop.time()
        for i, pkt in enumerate(packets):
            if pace:
                await asyncio.sleep(max(0.0, start + i * ptime_ms / 1000 - loop.time()))
            if pkt is None or rng.random() < loss:
                continue
            sock.sendto(pkt.serialize(), target)
            sent += 1
    finally:
        if own:
            sock.close()
    return sent


def impair(
    packets: Iterable[RtpPacket],
    *,
    loss: float = 0.0,
    duplicate: float = 0.0,
    jitter_ms: float = 0.0,
    ptime_ms: int = 20,
    seed: int | None = None,
) -> list[tuple[float, RtpPacket]]:
    """A bad network, reproducibly: each packet gets a send time ``i * ptime`` plus up to
    ``jitter_ms`` of random delay (so neighbours swap places), some are lost, some doubled.
    Returns ``(seconds from start, packet)`` sorted by time, for ``send_schedule``."""
    rng = random.Random(seed)
    out: list[tuple[float, RtpPacket]] = []
    for i, pkt in enumerate(packets):
        if rng.random() < loss:
            continue
        for _ in range(2 if rng.random() < duplicate else 1):
            out.append(((i * ptime_ms + rng.uniform(0, jitter_ms)) / 1000, pkt))
    return sorted(out, key=lambda item: item[0])


async def send_schedule(schedule: list[tuple[float, RtpPacket]], target: tuple[str, int]) -> int:
    """Send each packet at its time (seconds from now); returns the number sent."""
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        start = loop.time()
        for at, pkt in schedule:
            await asyncio.sleep(max(0.0, start + at - loop.time()))
            sock.sendto(pkt.serialize(), target)
    return len(schedule)


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


@dataclass
class MemoryEndpoint:
    """A ``MediaEndpoint`` (``voxphone.playback``) that keeps what it is sent: frames with the
    loop time and talkspurt flag, clears, DTMF digits, marks and hang-ups. ``on_hangup`` (e.g. the
    call's ``end``) is what a real transport does after stopping its media."""

    sample_rate: int = 8000
    can_send_dtmf: bool = True
    frames: list[tuple[float, Pcm, bool]] = field(default_factory=list)
    clears: int = 0
    digits: list[tuple[str, int]] = field(default_factory=list)
    hangups: list[str] = field(default_factory=list)
    marks: list[str] = field(default_factory=list)
    on_hangup: Callable[[str], None] | None = None

    def send(self, pcm: Pcm, first: bool) -> None:
        self.frames.append((asyncio.get_running_loop().time(), pcm.copy(), first))

    def clear(self) -> None:
        self.clears += 1

    async def send_dtmf(self, digit: str, duration_ms: int) -> None:
        self.digits.append((digit, duration_ms))
        await asyncio.sleep(duration_ms / 1000)

    def mark(self, name: str) -> None:
        self.marks.append(name)

    def hangup(self, reason: str) -> None:
        self.hangups.append(reason)
        if self.on_hangup is not None:
            self.on_hangup(reason)

    def audio(self) -> Pcm:
        """Everything sent, joined."""
        if not self.frames:
            return np.zeros(0, np.int16)
        return np.concatenate([pcm for _, pcm, _ in self.frames])


def free_tcp_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS's choice): for a server a test or benchmark
    starts, never a fixed port another process may hold."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def free_udp_range(n: int) -> tuple[int, int]:
    """``(first, last)`` of ``n`` consecutive UDP ports free on 127.0.0.1 now (an RTP port
    range), tried at random bases from 20000; ``RuntimeError`` after 50 tries."""
    for _ in range(50):
        base = random.randrange(20000, 30000)
        socks = []
        try:
            for port in range(base, base + n):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base, base + n - 1
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free UDP port range")
