"""The RTP port's source handling: probation, latching, RTCP, junk, inactivity."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest

from voxphone.audio.codecs import PCMA, PCMU, Codec
from voxphone.call import Call
from voxphone.clock import FakeClock
from voxphone.testing import capture_events, dtmf_packets, rtp_packets
from voxphone.transports.rtp import PortPolicy, Reservation, RtpPort
from voxphone.transports.rtp_packet import RtpPacket

CALLER = ("192.0.2.10", 5004)


class Calls:
    """A call factory that builds real (unstarted) calls and remembers them."""

    def __init__(self, limit: int = 10) -> None:
        self.calls: list[Call] = []
        self.limit = limit
        self.sink = capture_events()

    def __call__(self, codec: Codec, meta: dict[str, object]) -> Call | None:
        if len(self.calls) >= self.limit:
            return None
        call = Call(
            f"c{len(self.calls)}", codec, self.sink, FakeClock(), transport="rtp", metadata=meta
        )
        self.calls.append(call)
        return call


def tone_packets(codec: Codec = PCMU, n: int = 10, **kw: int) -> list[RtpPacket]:
    pcm = (np.sin(np.arange(160 * n) / 3) * 5000).astype(np.int16)
    return list(rtp_packets(pcm, codec, seed=7, **kw))


def test_a_call_starts_after_two_packets_in_sequence() -> None:
    calls = Calls()
    port = RtpPort(40000, calls, FakeClock())
    pkts = tone_packets()
    port.handle(pkts[0].serialize(), CALLER)
    assert calls.calls == []
    port.handle(pkts[1].serialize(), CALLER)
    assert len(calls.calls) == 1
    call = calls.calls[0]
    assert call.codec is PCMU
    assert call.metadata == {"remote": "192.0.2.10:5004", "local_port": 40000, "ssrc": pkts[0].ssrc}
    for p in pkts[2:]:
        port.handle(p.serialize(), CALLER)
    assert call.stats.packets == 10


def test_static_payload_type_picks_the_codec() -> None:
    calls = Calls()
    port = RtpPort(40000, calls, FakeClock())
    for p in tone_packets(PCMA, 2):
        port.handle(p.serialize(), CALLER)
    assert calls.calls[0].codec is PCMA


def test_random_datagrams_never_create_or_disturb_a_call() -> None:
    """A flood of junk from the caller's own address and from strangers."""
    clock = FakeClock()
    calls = Calls()
    port = RtpPort(40000, calls, clock)
    rtcp: list[object] = []
    port.on_rtcp = lambda _port, _addr, packets: rtcp.append(packets)
    pkts = tone_packets(n=50)
    rng = random.Random(3)
    for i, p in enumerate(pkts):
        port.handle(p.serialize(), CALLER)
        for _ in range(20):
            junk = os.urandom(rng.randrange(0, 300))
            port.handle(junk, CALLER if i % 2 else ("198.51.100.7", rng.randrange(1024, 65535)))
    assert len(calls.calls) == 1
    call = calls.calls[0]
    assert call.stats.packets == 50
    assert call.stats.decode_errors == 0
    assert call.pipeline.timeline.stats.late == 0
    port.end(CALLER, "hangup")
    clock.advance(10)
    port.expire(clock.monotonic())  # what is still on probation is given up, and counted
    counted = sum(call.stats.dropped.values()) + sum(port.counts.values()) + len(rtcp)
    assert counted == 50 * 20  # every junk datagram, by reason, on the call or the server


def test_other_ssrc_from_a_latched_source_is_dropped() -> None:
    calls = Calls()
    port = RtpPort(40000, calls, FakeClock())
    for p in tone_packets(n=3):
        port.handle(p.serialize(), CALLER)
    stranger = RtpPacket(0, 1, 1, ssrc=0xDEADBEEF, payload=b"\xff" * 160)
    port.handle(stranger.serialize(), CALLER)
    port.end(CALLER, "hangup")
    assert calls.calls[0].stats.dropped == {"foreign_ssrc": 1}
    assert calls.calls[0].stats.packets == 3


def test_rtcp_and_comfort_noise_are_not_audio() -> None:
    calls = Calls()
    port = RtpPort(40000, calls, FakeClock())
    rtcp: list[object] = []
    port.on_rtcp = lambda _port, _addr, packets: rtcp.append(packets)
    pkts = tone_packets(n=3)
    for p in pkts:
        port.handle(p.serialize(), CALLER)
    port.handle(bytes([0x80, 200, 0, 6]) + bytes(24), CALLER)
    cn = RtpPacket(13, pkts[-1].sequence + 1, pkts[-1].timestamp + 160, pkts[0].ssrc, b"\x40")
    port.handle(cn.serialize(), CALLER)
    port.end(CALLER, "hangup")
    assert len(rtcp) == 1
    assert calls.calls[0].stats.packets == 3
    assert calls.calls[0].stats.dropped == {}


def test_rtcp_stays_rtcp_even_where_it_reads_as_the_next_audio_packet() -> None:
    """RFC 5761 §4: the second byte tells RTCP (192–223) from RTP, so a payload type in 64–95
    (here 72, which with the marker bit reads as a sender report) never takes RTCP for audio, even
    when the report's bytes line up as that stream's next packet and SSRC."""
    calls = Calls()
    policy = PortPolicy(payload_types={0: PCMU, 72: PCMA})
    port = RtpPort(40000, calls, FakeClock(), policy)
    rtcp: list[object] = []
    port.on_rtcp = lambda _port, _addr, packets: rtcp.append(packets)
    pkts = tone_packets(n=3, first_seq=3)  # the next sequence number is 6: the SR's length
    for p in pkts:
        port.handle(p.serialize(), CALLER)
    ssrc = pkts[0].ssrc.to_bytes(4, "big")
    port.handle(bytes([0x80, 200, 0, 6]) + ssrc + ssrc + bytes(16), CALLER)
    port.end(CALLER, "hangup")
    assert len(rtcp) == 1
    assert calls.calls[0].stats.packets == 3


def test_refused_call_is_counted() -> None:
    calls = Calls(limit=0)
    port = RtpPort(40000, calls, FakeClock())
    for p in tone_packets(n=2):
        port.handle(p.serialize(), CALLER)
    assert port.counts == {"call_refused": 2}


async def test_silence_on_the_wire_ends_the_call() -> None:
    clock = FakeClock()
    calls = Calls()
    port = RtpPort(40000, calls, clock)
    for p in tone_packets(n=3):
        port.handle(p.serialize(), CALLER)
    clock.advance(4.9)
    port.expire(clock.monotonic())
    assert calls.calls[0].end_reason is None
    clock.advance(0.2)
    port.expire(clock.monotonic())
    assert calls.calls[0].end_reason == "inactivity"
    assert port.sources == {}


def test_dtmf_digits_become_events_once_each() -> None:
    calls = Calls()
    port = RtpPort(40000, calls, FakeClock())
    audio = tone_packets(n=5)
    for p in audio:
        port.handle(p.serialize(), CALLER)
    for p in dtmf_packets("19#", audio[-1]):
        if p is not None:
            port.handle(p.serialize(), CALLER)
            port.handle(p.serialize(), CALLER)  # and every packet duplicated by the network
    dtmf = calls.sink.of_type("dtmf")
    assert [(e.data["digit"], e.data["duration_ms"]) for e in dtmf] == [
        ("1", 100),
        ("9", 100),
        ("#", 100),
    ]
    assert calls.calls[0].stats.dropped == {
        "duplicate": len([p for p in dtmf_packets("19#", audio[-1]) if p])
    }


def test_a_new_ssrc_from_the_same_source_continues_the_call() -> None:
    """Re-INVITE or transfer: the sender restarts its stream; the call goes on."""
    calls = Calls()
    port = RtpPort(40000, calls, FakeClock())
    for p in tone_packets(n=5):
        port.handle(p.serialize(), CALLER)
    pcm = (np.sin(np.arange(160 * 5) / 3) * 5000).astype(np.int16)
    for p in rtp_packets(pcm, PCMU, ssrc=0xABCDEF, seed=9):
        port.handle(p.serialize(), CALLER)
    assert len(calls.calls) == 1
    assert calls.calls[0].transport_stats["restarts"] == 1
    assert calls.calls[0].stats.packets == 10  # all but none: the probation packet is kept
    assert calls.calls[0].pipeline.timeline.stats.late == 0


def test_reordered_packets_reach_the_call_in_order() -> None:
    calls = Calls()
    port = RtpPort(40000, calls, FakeClock())
    pkts = tone_packets(n=12)
    order = [0, 1, 3, 2, 5, 4, 6, 8, 7, 9, 11, 10]
    for i in order:
        port.handle(pkts[i].serialize(), CALLER)
    port.end(CALLER, "hangup")
    call = calls.calls[0]
    assert call.pipeline.timeline.stats.late == 0  # the timeline never saw them out of order
    assert call.transport_stats["reordered"] == 4  # 2, 4, 7 and 10 came after a later one
    assert call.end_reason == "hangup"


def reserved_port(relatch_after_s: float | None, clock: FakeClock) -> tuple[RtpPort, Call]:
    call = Call("api", PCMU, capture_events(), clock, transport="rtp")
    port = RtpPort(40002, Calls(), clock, PortPolicy(relatch_after_s=relatch_after_s))
    port.reserve(Reservation(call, payload_type=0))
    return port, call


@pytest.mark.parametrize("relatch", [None, 1.0])
def test_allocated_port_latches_and_maybe_relatches_after_nat_rebinding(
    relatch: float | None,
) -> None:
    clock = FakeClock()
    port, call = reserved_port(relatch, clock)
    first, moved = ("192.0.2.10", 5004), ("192.0.2.10", 61000)
    pkts = tone_packets(n=10)
    for p in pkts[:4]:
        port.handle(p.serialize(), first)
    for p in tone_packets(n=2):
        port.handle(p.serialize(), ("198.51.100.9", 4000))  # a stranger, while the caller talks
    assert call.stats.dropped == {"foreign_source": 2}
    clock.advance(1.5)  # the NAT rebinds: the caller's packets now come from another port
    for p in pkts[4:]:
        port.handle(p.serialize(), moved)
    if relatch is None:
        assert call.stats.packets == 4 and "relatched" not in call.transport_stats
    else:
        assert call.stats.packets == 10 and call.transport_stats["relatched"] == 1
        assert call.metadata["remote"] == "192.0.2.10:61000"
        assert call.pipeline.timeline.stats.late == 0


@pytest.mark.parametrize("allocated", [True, False])
def test_hanging_up_plays_out_what_the_jitter_buffer_holds(allocated: bool) -> None:
    """API DELETE and shutdown go through ``call.hangup``: the packets waiting behind a lost one
    are transcribed and the buffer's counters reported, as on an RTCP BYE."""
    if allocated:
        port, call = reserved_port(None, FakeClock())
    else:
        calls = Calls()
        port = RtpPort(40000, calls, FakeClock())
    pkts = tone_packets(n=6)
    for p in pkts[:3] + pkts[4:]:  # packet 3 is lost: 4 and 5 wait for it
        port.handle(p.serialize(), CALLER)
    call = call if allocated else calls.calls[0]
    assert call.stats.packets == 3
    call.hangup("hangup")
    assert call.end_reason == "hangup"
    assert call.stats.packets == 5
    assert call.transport_stats["lost"] == 0 and "jitter_ms" in call.transport_stats
    assert port.sources == {}
