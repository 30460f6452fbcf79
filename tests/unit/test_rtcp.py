"""RTCP parsing (RFC 3550 §6) and what the RTP server does with a BYE."""

from __future__ import annotations

import asyncio
import socket
import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import free_udp_range
from tests.unit.test_rtp_port import Calls
from voxphone.audio.codecs import PCMU
from voxphone.clock import SystemClock
from voxphone.errors import TransportError
from voxphone.testing import rtp_packets
from voxphone.transports.rtcp import Bye, Other, SenderReport, bye, parse_rtcp
from voxphone.transports.rtp import RtpServer


def sender_report(ssrc: int, packets: int) -> bytes:
    body = struct.pack("!IIIIII", ssrc, 1, 2, 160 * packets, packets, 160 * packets)
    return struct.pack("!BBH", 0x80, 200, len(body) // 4) + body


def sdes(ssrc: int) -> bytes:
    item = bytes([1, 4]) + b"host" + b"\0\0"  # CNAME, then the end marker and padding
    body = struct.pack("!I", ssrc) + item
    return struct.pack("!BBH", 0x81, 202, len(body) // 4) + body


def test_compound_sender_report_sdes_bye() -> None:
    packets = parse_rtcp(sender_report(7, 50) + sdes(7) + bye(7, "hangup"))
    assert packets == [SenderReport(7, 8000, 50, 8000), Other(202), Bye((7,), "hangup")]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x80\xc8", "2 trailing bytes"),
        (b"\x40\xc8\x00\x00", "version is 1"),
        (b"\x80\xc8\x00\x09" + bytes(8), "length 40 overruns 12 bytes"),
        (b"\x80\xc8\x00\x01" + bytes(4), "sender report body is 4 bytes"),
        (b"\x82\xcb\x00\x01" + bytes(4), "BYE lists 2 SSRCs in 4 bytes"),
        (b"", "empty"),
    ],
)
def test_malformed_rtcp_is_a_precise_error(data: bytes, message: str) -> None:
    with pytest.raises(TransportError, match=message):
        parse_rtcp(data)


@given(st.binary(max_size=80))
def test_any_bytes_parse_or_raise_transport_error(data: bytes) -> None:
    try:
        parse_rtcp(data)
    except TransportError as exc:
        assert str(exc).startswith("RTCP")


async def test_bye_on_the_rtcp_port_ends_the_call() -> None:
    lo, hi = free_udp_range(2)
    calls = Calls()
    server = RtpServer("127.0.0.1", (lo, hi), calls, SystemClock(), inactivity_timeout_s=30)
    await server.start()
    try:
        pcm = (np.sin(np.arange(1600) / 3) * 5000).astype(np.int16)
        packets = list(rtp_packets(pcm, PCMU, seed=4))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for p in packets[:8]:
                s.sendto(p.serialize(), ("127.0.0.1", lo))
            await asyncio.sleep(0.1)
            s.sendto(sender_report(packets[0].ssrc, 10), ("127.0.0.1", hi))
            for p in packets[8:]:  # the last packets race the BYE, as they may on a network
                s.sendto(p.serialize(), ("127.0.0.1", lo))
            s.sendto(bye(packets[0].ssrc), ("127.0.0.1", hi))
            await asyncio.sleep(0.2)
            s.sendto(packets[-1].serialize(), ("127.0.0.1", lo))  # a straggler after the BYE
            await asyncio.sleep(0.1)
    finally:
        await server.stop()
    assert len(calls.calls) == 1, [c.metadata for c in calls.calls]
    (call,) = calls.calls
    assert call.end_reason == "bye"
    assert call.transport_stats["sender_reports"] == 1
    assert call.stats.packets >= 8
    assert server.totals().after_bye >= 1  # stragglers never start a second call
