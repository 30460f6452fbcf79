"""The RTP packet format (RFC 3550 §5.1), sans I/O: parse a datagram, build one.

Pure functions on bytes, shared by the RTP server, the media-stream jitter buffer, the test
helpers (``voxphone.testing``) and ``voxphone call``. Nothing here knows about sockets or calls.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from voxphone.errors import TransportError

_HEADER = struct.Struct("!BBHII")


@dataclass(frozen=True)
class RtpPacket:
    """A parsed RTP packet. ``payload`` excludes CSRCs, the header extension and padding."""

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
    csrcs = struct.unpack_from(f"!{first & 0x0F}I", data, 12)
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
