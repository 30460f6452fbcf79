"""The RTP packet format (RFC 3550 §5.1), sans I/O: parse a datagram, build one, number a stream.

Pure functions on bytes, shared by the RTP server, the media-stream jitter buffer, the test
helpers (``voxphone.testing``) and ``voxphone call``; ``RtpSender`` numbers what voxphone sends.
Nothing here knows about sockets or calls.
"""

from __future__ import annotations

import random
import struct
from typing import NamedTuple

from voxphone.errors import TransportError

#: A UDP peer: (host, port).
Address = tuple[str, int]

_HEADER = struct.Struct("!BBHII")


class RtpPacket(NamedTuple):
    """A parsed RTP packet. ``payload`` excludes CSRCs, the header extension and padding.

    A named tuple rather than a frozen dataclass: as immutable, with the same fields and
    constructor, and built in half the time (a frozen dataclass sets each field through
    ``object.__setattr__``), which counts when every packet off ``RtpSource.receive_plain``'s
    fast path, and every one voxphone sends, is one."""

    payload_type: int
    sequence: int
    timestamp: int
    ssrc: int
    payload: bytes
    marker: bool = False
    csrcs: tuple[int, ...] = ()
    extension: tuple[int, bytes] | None = None

    def serialize(self) -> bytes:
        """Wire form (no padding), for senders and tests."""
        first = 0x80 | (0x10 if self.extension else 0) | len(self.csrcs)
        out = _HEADER.pack(
            first,
            (0x80 if self.marker else 0) | self.payload_type,
            self.sequence,
            self.timestamp,
            self.ssrc,
        )
        out += b"".join(struct.pack("!I", c) for c in self.csrcs)
        if self.extension:
            profile, body = self.extension
            out += struct.pack("!HH", profile, len(body) // 4) + body
        return out + self.payload


def is_rtcp(data: bytes) -> bool:
    """RFC 5761 §4: an RTP/RTCP demultiplexer looks at the second byte (RTCP types 192–223)."""
    return len(data) >= 2 and 192 <= data[1] <= 223


def parse_rtp(data: bytes) -> RtpPacket:
    """Parse one RTP packet; raise ``TransportError`` saying exactly what is wrong."""
    if len(data) < 12:
        raise TransportError(f"RTP packet too short: {len(data)} bytes, header needs 12")
    first, second, seq, ts, ssrc = _HEADER.unpack_from(data)
    if first >> 6 != 2:
        raise TransportError(f"RTP version is {first >> 6}, expected 2")
    end = len(data)
    if first & 0x20:
        pad = data[-1]
        if pad == 0 or pad > end - 12:
            raise TransportError(f"RTP padding length {pad} invalid for a {end}-byte packet")
        end -= pad
    pos = 12 + 4 * (first & 0x0F)
    if pos > end:
        raise TransportError(f"RTP CSRC count {first & 0x0F} overruns a {len(data)}-byte packet")
    csrcs = struct.unpack_from(f"!{first & 0x0F}I", data, 12) if first & 0x0F else ()
    extension = None
    if first & 0x10:
        if pos + 4 > end:
            raise TransportError("RTP header extension header overruns the packet")
        profile, words = struct.unpack_from("!HH", data, pos)
        if pos + 4 + 4 * words > end:
            raise TransportError(f"RTP header extension of {words} words overruns the packet")
        extension = (profile, data[pos + 4 : pos + 4 + 4 * words])
        pos += 4 + 4 * words
    return RtpPacket(
        payload_type=second & 0x7F,
        sequence=seq,
        timestamp=ts,
        ssrc=ssrc,
        payload=data[pos:end],
        marker=bool(second & 0x80),
        csrcs=csrcs,
        extension=extension,
    )


class RtpSender:
    """Sequence numbers, timestamps and marker bits for one outgoing stream (RFC 3550 §5.1).

    The SSRC and the first sequence number and timestamp are random (RFC 3550 §5.1, §8), from
    ``rng`` (a ``random.SystemRandom`` by default). Audio goes out in talkspurts: within one,
    timestamps step by ``frame`` clock units per packet; the first packet of a talkspurt has
    the marker bit (RFC 3551 §4.1) and a timestamp moved on by the wall time since the last
    packet (``now``, seconds), as if the silence had been sent. RFC 4733 events take the
    timestamp of their start, shared by all packets of the event (``event``).
    """

    def __init__(
        self,
        payload_type: int,
        clock_rate: int,
        frame: int,
        rng: random.Random | None = None,
    ) -> None:
        rng = rng or random.SystemRandom()
        self.payload_type = payload_type
        self.clock_rate = clock_rate
        self.frame = frame
        self.ssrc = rng.getrandbits(32)
        self.sequence = rng.getrandbits(16)
        self._next_ts = rng.getrandbits(32)  # the timestamp of the next audio packet
        self._next_at: float | None = None  # when that packet would go out, in a talkspurt
        self.packets = 0
        self.octets = 0

    def now_timestamp(self, now: float) -> int:
        """The stream's timestamp at ``now``: the next one in a talkspurt, else moved on by the
        silence since the last packet (never backwards)."""
        if self._next_at is None or now <= self._next_at:
            return self._next_ts
        ahead = round((now - self._next_at) * self.clock_rate)
        return (self._next_ts + ahead) & 0xFFFFFFFF

    def timestamp_at(self, now: float) -> int:
        """The media timestamp of the instant ``now`` (for an RTCP sender report, which pairs
        the two, RFC 3550 §6.4.1): inside a talkspurt, the next packet's less the time until
        it is due."""
        if self._next_at is not None and now < self._next_at:
            behind = round((self._next_at - now) * self.clock_rate)
            return (self._next_ts - behind) & 0xFFFFFFFF
        return self.now_timestamp(now)

    def audio(self, payload: bytes, now: float, first: bool) -> RtpPacket:
        """The next audio packet: ``first`` starts a talkspurt (marker bit, timestamp at
        ``now``)."""
        if first:
            self._next_ts = self.now_timestamp(now)
        pkt = self._packet(self.payload_type, self._next_ts, payload, first)
        self._next_ts = (self._next_ts + self.frame) & 0xFFFFFFFF
        self._next_at = now + self.frame / self.clock_rate
        return pkt

    def event(self, payload_type: int, timestamp: int, payload: bytes, marker: bool) -> RtpPacket:
        """One RFC 4733 telephone-event packet of the event that started at ``timestamp``;
        audio after the event goes on from the event's end (``end_event``)."""
        return self._packet(payload_type, timestamp, payload, marker)

    def end_event(self, timestamp: int, duration: int, now: float) -> None:
        """The event starting at ``timestamp`` lasted ``duration`` clock units: the next audio
        timestamp is past its end (RFC 4733 §2.5.1.3: it must not be reused)."""
        end = (timestamp + duration) & 0xFFFFFFFF
        if (end - self._next_ts) & 0xFFFFFFFF < 0x80000000:
            self._next_ts = end
        self._next_at = now

    def _packet(self, pt: int, timestamp: int, payload: bytes, marker: bool) -> RtpPacket:
        pkt = RtpPacket(pt, self.sequence, timestamp, self.ssrc, payload, marker=marker)
        self.sequence = (self.sequence + 1) & 0xFFFF
        self.packets += 1
        self.octets += len(payload)
        return pkt
