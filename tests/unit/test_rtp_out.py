"""The RTP endpoint's DTMF out, against RFC 4733's 16-bit duration field."""

from __future__ import annotations

from voxphone.audio.codecs import OPUS
from voxphone.call import Call
from voxphone.clock import SystemClock
from voxphone.testing import capture_events
from voxphone.transports.dtmf import parse_telephone_event
from voxphone.transports.rtp_out import RtpEndpoint
from voxphone.transports.rtp_packet import Address, parse_rtp


async def test_a_key_longer_than_the_duration_field_holds_is_sent_that_long() -> None:
    """At Opus's 48 kHz clock the field holds 1.365 s: a 2 s key goes out as 65535 ticks,
    counted, instead of wrapping (RFC 4733 §2.5.1.5)."""
    call = Call("c", OPUS, capture_events(), SystemClock(), transport="rtp")
    sent: list[bytes] = []

    def transmit(data: bytes, _to: Address) -> None:
        sent.append(data)

    endpoint = RtpEndpoint(
        call, OPUS, 111, 101, transmit, lambda _d, _a: None,
        lambda _last: ("127.0.0.1", 9), lambda _r: None, SystemClock(),
    )  # fmt: skip
    await endpoint.send_dtmf("5", 2000)
    events = [parse_telephone_event(p.payload) for p in map(parse_rtp, sent)]
    assert max(e.duration for e in events) == 0xFFFF
    assert [e.duration for e in events if e.end] == [0xFFFF] * 3
    assert call.transport_stats["out_dtmf_shortened"] == 1
