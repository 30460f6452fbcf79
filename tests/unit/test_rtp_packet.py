"""RTP parsing (RFC 3550 §5.1) on hand-built and malformed packets; numbering what we send."""

from __future__ import annotations

import itertools
import random
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from voxphone.errors import TransportError
from voxphone.transports.dtmf import TelephoneEvent, parse_telephone_event, telephone_event
from voxphone.transports.rtp_packet import RtpPacket, RtpSender, is_rtcp, parse_rtp


def header(
    *,
    v: int = 2,
    p: bool = False,
    x: bool = False,
    cc: int = 0,
    m: bool = False,
    pt: int = 0,
    seq: int = 1,
    ts: int = 160,
    ssrc: int = 0x11223344,
) -> bytes:
    first = (v << 6) | (0x20 if p else 0) | (0x10 if x else 0) | cc
    return struct.pack("!BBHII", first, (0x80 if m else 0) | pt, seq, ts, ssrc)


def test_minimal_packet_fields() -> None:
    pkt = parse_rtp(header(pt=8, seq=65535, ts=0xFFFFFFFF, m=True) + b"\xd5" * 160)
    assert (pkt.payload_type, pkt.sequence, pkt.timestamp, pkt.ssrc) == (
        8,
        65535,
        0xFFFFFFFF,
        0x11223344,
    )
    assert pkt.marker is True
    assert pkt.payload == b"\xd5" * 160


def test_padding_is_removed() -> None:
    """The last byte counts padding bytes, itself included (§5.1, P bit)."""
    pkt = parse_rtp(header(p=True) + b"abcd" + b"\0\0\x03")
    assert pkt.payload == b"abcd"


def test_csrcs_and_extension_are_skipped() -> None:
    data = header(cc=2, x=True) + struct.pack("!II", 7, 9)
    data += struct.pack("!HH", 0xBEDE, 1) + b"\x10\xaa\0\0" + b"payload"
    pkt = parse_rtp(data)
    assert pkt.csrcs == (7, 9)
    assert pkt.extension == (0xBEDE, b"\x10\xaa\0\0")
    assert pkt.payload == b"payload"


def test_serialize_round_trips() -> None:
    pkt = RtpPacket(0, 42, 1234, 99, b"xyz", marker=True, csrcs=(5,), extension=(1, b"abcd"))
    assert parse_rtp(pkt.serialize()) == pkt


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x80\x00\x00", "too short: 3 bytes"),
        (header(v=1) + b"x", "version is 1, expected 2"),
        (header(p=True) + b"ab\x00", "padding length 0 invalid"),
        (header(p=True) + b"ab\x09", "padding length 9 invalid"),
        (header(cc=3) + b"\0" * 8, "CSRC count 3 overruns"),
        (header(x=True) + b"\0\x01", "extension header overruns"),
        (header(x=True) + struct.pack("!HH", 1, 4) + b"\0" * 8, "extension of 4 words overruns"),
    ],
)
def test_malformed_packets_say_what_is_wrong(data: bytes, message: str) -> None:
    with pytest.raises(TransportError, match=message):
        parse_rtp(data)


def test_rtcp_is_told_apart_from_rtp() -> None:
    sender_report = bytes([0x80, 200, 0, 6]) + bytes(24)
    assert is_rtcp(sender_report)
    assert not is_rtcp(header(pt=0) + b"x")
    assert not is_rtcp(header(pt=8, m=True) + b"x")


@given(st.binary(max_size=64))
def test_any_bytes_parse_or_raise_transport_error(data: bytes) -> None:
    """Fuzz: garbage never escapes as anything but a precise TransportError."""
    try:
        pkt = parse_rtp(data)
    except TransportError as exc:
        assert str(exc)
    else:
        assert len(pkt.payload) <= len(data) - 12


def test_a_sender_numbers_talkspurts_as_rfc_3550_says() -> None:
    """Own random SSRC, sequence and timestamp; +frame per packet in a talkspurt; the marker
    and a timestamp moved on by the silence at the start of the next one."""
    sender = RtpSender(0, 8000, 160, random.Random(7))
    first = [sender.audio(b"x", 10.0 + i * 0.02, i == 0) for i in range(3)]
    assert [p.marker for p in first] == [True, False, False]
    assert [(p.timestamp - first[0].timestamp) & 0xFFFFFFFF for p in first] == [0, 160, 320]
    later = sender.audio(b"x", 10.04 + 1.0, True)  # sent one second after the third
    assert later.marker and (later.timestamp - first[2].timestamp) & 0xFFFFFFFF == 8000
    seqs = [p.sequence for p in [*first, later]]
    assert all((b - a) & 0xFFFF == 1 for a, b in itertools.pairwise(seqs))
    assert len({p.ssrc for p in [*first, later]}) == 1
    other = RtpSender(0, 8000, 160, random.Random(8))
    assert (other.ssrc, other.sequence) != (sender.ssrc, first[0].sequence)


def test_a_sender_report_pairs_wall_time_with_that_instants_timestamp() -> None:
    """RFC 3550 §6.4.1: the SR's RTP timestamp is the wall-clock instant's, not the next
    packet's: 5 ms after a packet at 8 kHz it is that packet's timestamp + 40."""
    sender = RtpSender(0, 8000, 160, random.Random(3))
    pkt = sender.audio(b"x", 20.0, True)
    assert (sender.timestamp_at(20.005) - pkt.timestamp) & 0xFFFFFFFF == 40
    assert (sender.timestamp_at(21.0) - pkt.timestamp) & 0xFFFFFFFF == 8000  # in silence


def test_audio_after_an_event_never_reuses_its_timestamps() -> None:
    """RFC 4733 §2.5.1.3: the event takes the stream's time; audio resumes after its end."""
    sender = RtpSender(0, 8000, 160, random.Random(1))
    ts = sender.now_timestamp(5.0)
    start = sender.event(101, ts, telephone_event("5", 160, end=False), marker=True)
    assert start.marker and start.payload_type == 101
    assert parse_telephone_event(start.payload) == TelephoneEvent(5, False, 10, 160)
    assert parse_telephone_event(telephone_event("#", 800, end=True)).end
    sender.end_event(ts, 800, 5.1)
    after = sender.audio(b"x", 5.1, True)
    assert (after.timestamp - ts) & 0xFFFFFFFF >= 800
