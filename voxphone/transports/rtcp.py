"""RTCP (RFC 3550 §6), sans I/O: the parts a receiver acts on — sender reports and BYE — and
the ones voxphone sends for its own (talk-back) stream.

A compound packet is a run of RTCP packets, each with a 4-byte header whose length counts 32-bit
words minus one. Receiver reports, SDES and APP are recognised and skipped.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from voxphone.errors import TransportError

SR, RR, SDES, BYE, APP = 200, 201, 202, 203, 204
#: Seconds from the NTP epoch (1900) to the Unix epoch (1970), RFC 868.
NTP_UNIX_OFFSET = 2_208_988_800


@dataclass(frozen=True)
class SenderReport:
    ssrc: int
    rtp_timestamp: int
    packet_count: int
    octet_count: int


@dataclass(frozen=True)
class Bye:
    ssrcs: tuple[int, ...]
    reason: str = ""


@dataclass(frozen=True)
class Other:
    packet_type: int


RtcpPacket = SenderReport | Bye | Other


def bye(ssrc: int, reason: str = "") -> bytes:
    """A BYE packet, as a sender hanging up sends it."""
    text = reason.encode()[:255]
    tail = bytes([len(text)]) + text if text else b""
    tail += b"\0" * (-len(tail) % 4)
    body = struct.pack("!I", ssrc) + tail
    # The length field counts 32-bit words minus one, the header being one of them.
    return struct.pack("!BBH", 0x81, BYE, len(body) // 4) + body


def sender_report(
    ssrc: int, unix_time: float, rtp_timestamp: int, packets: int, octets: int, cname: str
) -> bytes:
    """A compound SR + SDES(CNAME) (RFC 3550 §6.4.1, §6.5; §6.1: every compound packet starts
    with a report and carries a CNAME), with no report blocks: ``unix_time`` and
    ``rtp_timestamp`` are the same instant, so a receiver can place the stream in wall time."""
    ntp = unix_time + NTP_UNIX_OFFSET
    seconds = int(ntp)
    fraction = int((ntp - seconds) * 2**32) & 0xFFFFFFFF
    body = struct.pack(
        "!IIIIII", ssrc, seconds & 0xFFFFFFFF, fraction, rtp_timestamp & 0xFFFFFFFF,
        packets & 0xFFFFFFFF, octets & 0xFFFFFFFF,
    )  # fmt: skip
    report = struct.pack("!BBH", 0x80, SR, len(body) // 4) + body
    return report + _cname(ssrc, cname)


def _cname(ssrc: int, cname: str) -> bytes:
    text = cname.encode()[:255]
    item = bytes([1, len(text)]) + text + b"\0"  # CNAME, then the list's end
    item += b"\0" * (-len(item) % 4)
    body = struct.pack("!I", ssrc) + item
    return struct.pack("!BBH", 0x81, SDES, len(body) // 4) + body


def parse_rtcp(data: bytes) -> list[RtcpPacket]:
    """Parse a compound RTCP packet; raise ``TransportError`` saying what is malformed."""
    out: list[RtcpPacket] = []
    pos = 0
    while pos < len(data):
        if len(data) - pos < 4:
            raise TransportError(f"RTCP: {len(data) - pos} trailing bytes, a header needs 4")
        first, pt, words = struct.unpack_from("!BBH", data, pos)
        if first >> 6 != 2:
            raise TransportError(f"RTCP version is {first >> 6}, expected 2")
        end = pos + 4 * (words + 1)
        if end > len(data):
            raise TransportError(
                f"RTCP packet type {pt} length {end - pos} overruns {len(data)} bytes"
            )
        body = data[pos + 4 : end]
        if first & 0x20:  # padding: only legal on the last packet of the compound
            if end != len(data) or not body or body[-1] > len(body):
                raise TransportError("RTCP padding is invalid")
            body = body[: len(body) - body[-1]]
        out.append(_one(pt, first & 0x1F, body))
        pos = end
    if not out:
        raise TransportError("RTCP: empty packet")
    return out


def _one(pt: int, count: int, body: bytes) -> RtcpPacket:
    if pt == SR:
        if len(body) < 24:
            raise TransportError(f"RTCP sender report body is {len(body)} bytes, needs 24")
        ssrc, _ntp_hi, _ntp_lo, rtp_ts, packets, octets = struct.unpack_from("!IIIIII", body)
        return SenderReport(ssrc, rtp_ts, packets, octets)
    if pt == BYE:
        if len(body) < 4 * count:
            raise TransportError(f"RTCP BYE lists {count} SSRCs in {len(body)} bytes")
        ssrcs = struct.unpack_from(f"!{count}I", body)
        rest = body[4 * count :]
        reason = rest[1 : 1 + rest[0]].decode("utf-8", "replace") if rest else ""
        return Bye(ssrcs, reason)
    return Other(pt)
