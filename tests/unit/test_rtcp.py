"""RTCP parsing (RFC 3550 §6) and what the RTP server does with a BYE."""

from __future__ import annotations

import socket
import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import free_udp_range
from tests.hooks import until
from tests.unit.test_rtp_port import Calls
from voxphone.audio.codecs import PCMU
from voxphone.clock import SystemClock
from voxphone.errors import TransportError
from voxphone.testing import rtp_packets
from voxphone.transports import rtcp
from voxphone.transports.rtcp import Bye, Other, SenderReport, bye, parse_rtcp
from voxphone.transports.rtp import RtpServer, rtcp_source_ok


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
            await until(lambda: len(calls.calls) == 1 and calls.calls[0].stats.packets >= 8)
            s.sendto(sender_report(packets[0].ssrc, 10), ("127.0.0.1", hi))
            for p in packets[8:]:  # the last packets race the BYE, as they may on a network
                s.sendto(p.serialize(), ("127.0.0.1", lo))
            s.sendto(bye(packets[0].ssrc), ("127.0.0.1", hi))
            await until(lambda: calls.calls[0].end_reason is not None)
            s.sendto(packets[-1].serialize(), ("127.0.0.1", lo))  # a straggler after the BYE
            # it never starts a second call: its packets are counted after the end
            await until(lambda: calls.calls[0].stats.dropped.get("after_end", 0) >= 1)
    finally:
        await server.stop()
    assert len(calls.calls) == 1, [c.metadata for c in calls.calls]
    (call,) = calls.calls
    assert call.end_reason == "bye"
    assert call.transport_stats["sender_reports"] == 1
    assert call.stats.packets >= 8


async def test_a_strangers_bye_with_the_callers_ssrc_is_dropped_and_counted() -> None:
    """Another address sends the caller's SSRC in a BYE and a sender report to the call's RTCP
    port (and, rtcp-mux style, to its RTP port): the call goes on; the caller's own BYE ends it."""
    lo, hi = free_udp_range(2)
    calls = Calls()
    server = RtpServer("127.0.0.1", (lo, hi), calls, SystemClock(), inactivity_timeout_s=30)
    await server.start()
    packets = list(rtp_packets((np.ones(1600) * 3000).astype(np.int16), PCMU, seed=4))
    ssrc = packets[0].ssrc
    try:
        with (
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as caller,
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger,
        ):
            for p in packets[:5]:
                caller.sendto(p.serialize(), ("127.0.0.1", lo))
            await until(lambda: len(calls.calls) == 1 and calls.calls[0].stats.packets == 5)
            (call,) = calls.calls
            stranger.sendto(sender_report(ssrc, 5) + bye(ssrc), ("127.0.0.1", hi))
            stranger.sendto(bye(ssrc), ("127.0.0.1", lo))
            await until(lambda: call.stats.dropped.get("foreign_rtcp") == 2)
            for p in packets[5:]:
                caller.sendto(p.serialize(), ("127.0.0.1", lo))
            await until(lambda: call.stats.packets == len(packets))
            assert call.end_reason is None
            caller.sendto(bye(ssrc), ("127.0.0.1", hi))
            await until(lambda: call.end_reason is not None)
    finally:
        await server.stop()
    assert call.end_reason == "bye"
    assert call.stats.dropped == {"foreign_rtcp": 2}
    assert "sender_reports" not in call.transport_stats


@pytest.mark.parametrize(
    ("rtcp", "ok"),
    [
        (("192.0.2.1", 5004), True),  # rtcp-mux, or one socket for both
        (("192.0.2.1", 5005), True),  # RFC 3550 §11: RTP port + 1
        (("192.0.2.1", 5006), False),
        (("192.0.2.1", 5003), False),
        (("192.0.2.9", 5005), False),
    ],
)
def test_rtcp_may_come_from_the_rtp_source_or_its_next_port(
    rtcp: tuple[str, int], ok: bool
) -> None:
    assert rtcp_source_ok(("192.0.2.1", 5004), rtcp) is ok


def test_our_sender_report_parses_back_with_its_cname() -> None:
    """RFC 3550 §6.4.1 SR (no report blocks) + §6.5 SDES CNAME, then a BYE: one compound."""
    data = rtcp.sender_report(0xCAFE, 1_700_000_000.25, 123456, 50, 8000, "voxphone-0000cafe")
    data += bye(0xCAFE, "hangup")
    sr, sdes, gone = parse_rtcp(data)
    assert sr == SenderReport(0xCAFE, 123456, 50, 8000)
    assert sdes == Other(rtcp.SDES) and gone == Bye((0xCAFE,), "hangup")
    ntp_seconds, fraction = struct.unpack_from("!II", data, 8)
    assert ntp_seconds == 1_700_000_000 + rtcp.NTP_UNIX_OFFSET and fraction == 2**30
    assert b"voxphone-0000cafe" in data and len(data) % 4 == 0
