"""What a latched source's packets become: restarts, codec switches, key presses, comfort noise.

Each sender here is a few lines of protocol-faithful RTP (``voxphone.testing``), fed to a port
without sockets; time is a ``FakeClock``.
"""

from __future__ import annotations

import random
from dataclasses import asdict
from typing import Any

import numpy as np
import pytest

from tests.unit.test_rtp_port import CALLER, Calls, tone_packets
from voxphone.audio.codecs import G722, OPUS, PCMA, Codec
from voxphone.call import Call
from voxphone.clock import FakeClock
from voxphone.testing import capture_events, dtmf_packets, rtp_packets
from voxphone.transports.rtp import Reservation, RtpPort
from voxphone.transports.rtp_packet import RtpPacket
from voxphone.transports.rtp_source import RtpSource, SequenceCheck, Step


def shifted(packets: list[RtpPacket], seq: int, ts: int) -> list[RtpPacket]:
    """The same packets renumbered from ``seq``/``ts`` (16/32-bit wrap), SSRC kept."""
    base_seq, base_ts = packets[0].sequence, packets[0].timestamp
    return [
        RtpPacket(
            p.payload_type,
            (p.sequence - base_seq + seq) & 0xFFFF,
            (p.timestamp - base_ts + ts) & 0xFFFFFFFF,
            p.ssrc,
            p.payload,
        )
        for p in packets
    ]


def feed(port: RtpPort, packets: list[RtpPacket | None]) -> None:
    for p in packets:
        if p is not None:
            port.handle(p.serialize(), CALLER)


class TestRestarts:
    """RFC 3550 §A.1: a big sequence jump confirmed by the next packet is a new stream."""

    def test_a_new_leg_under_the_same_ssrc_is_a_discontinuity_not_lateness(self) -> None:
        """The field case: a PBX relays a second call leg, keeps the SSRC and jumps the sequence
        number back by about 8,600 (and the timestamp elsewhere): every packet is audio."""
        calls = Calls()
        port = RtpPort(40000, calls, FakeClock())
        first = tone_packets(n=50, first_seq=20_000, first_ts=1_000_000)
        second = shifted(tone_packets(n=133), seq=20_050 - 8_600, ts=123_456)
        feed(port, [*first, *second])
        port.end(CALLER, "hangup")
        (call,) = calls.calls
        assert call.stats.packets == 183
        assert call.stats.dropped == {}
        assert call.transport_stats["restarts"] == 1
        assert call.pipeline.timeline.elapsed_ms == 183 * 20

    def test_a_forward_jump_beyond_the_dropout_limit_restarts_too(self) -> None:
        calls = Calls()
        port = RtpPort(40000, calls, FakeClock())
        first = tone_packets(n=20, first_seq=65_000)
        feed(port, [*first, *shifted(tone_packets(n=20), seq=65_020 + 5_000, ts=7)])
        port.end(CALLER, "hangup")
        assert calls.calls[0].stats.packets == 40 and calls.calls[0].stats.dropped == {}

    def test_a_lone_stray_far_from_the_sequence_is_counted_and_changes_nothing(self) -> None:
        calls = Calls()
        port = RtpPort(40000, calls, FakeClock())
        pkts = tone_packets(n=20, first_seq=100)
        stray = shifted(pkts[:1], seq=40_000, ts=5)[0]
        feed(port, [*pkts[:10], stray, *pkts[10:]])
        port.end(CALLER, "hangup")
        (call,) = calls.calls
        assert call.stats.packets == 20
        assert call.stats.dropped == {"out_of_sequence": 1}
        assert "restarts" not in call.transport_stats

    def test_a_timestamp_jump_either_way_re_anchors_the_clock(self) -> None:
        """Sequence continuing, timestamps jumping 20 s back then 60 s ahead: nothing is late
        and no minute of silence is invented."""
        calls = Calls()
        port = RtpPort(40000, calls, FakeClock())
        pkts = tone_packets(n=30, first_seq=10, first_ts=500_000)
        back = shifted(pkts[10:20], seq=20, ts=500_000 - 160_000)
        ahead = shifted(pkts[20:], seq=30, ts=500_000 + 480_000)
        feed(port, [*pkts[:10], *back, *ahead])
        port.end(CALLER, "hangup")
        (call,) = calls.calls
        assert call.stats.dropped == {}
        assert call.pipeline.timeline.elapsed_ms == 30 * 20

    def test_sequence_check_follows_rfc3550_a1(self) -> None:
        check = SequenceCheck(65_530)
        assert check.step(2) is Step.IN_ORDER  # across the wrap, within MAX_DROPOUT
        assert check.step(65_500) is Step.IN_ORDER  # 38 behind: reordering, for the buffer
        assert check.step(30_000) is Step.JUMP
        assert check.step(30_002) is Step.JUMP  # not its successor: another stray
        assert check.step(30_003) is Step.RESTART


def test_payload_type_switches_mid_stream_change_the_decoder_not_the_clock() -> None:
    """G.722 then PCMA, sequence and timestamp continuing. G.722's RTP clock is 8000 Hz for its
    16 kHz audio (RFC 3551 §4.5.2), so both halves advance 160 ticks per 20 ms."""
    calls = Calls()
    port = RtpPort(40000, calls, FakeClock())
    t16 = np.arange(16000) / 16000
    wide = list(rtp_packets((np.sin(2 * np.pi * 440 * t16) * 8000).astype(np.int16), G722))
    t8 = np.arange(8000) / 8000
    narrow = rtp_packets((np.sin(2 * np.pi * 440 * t8) * 8000).astype(np.int16), PCMA)
    last = wide[-1]
    following = shifted(list(narrow), seq=last.sequence + 1, ts=last.timestamp + 160)
    feed(
        port,
        [*wide, *[RtpPacket(8, p.sequence, p.timestamp, last.ssrc, p.payload) for p in following]],
    )
    port.end(CALLER, "hangup")
    (call,) = calls.calls
    assert call.codec is G722  # announced as it started
    assert call.stats.packets == 100 and call.stats.dropped == {} and call.stats.decode_errors == 0
    assert call.transport_stats["codec_switches"] == 1
    assert call.pipeline.timeline.elapsed_ms == 2000
    assert call.pipeline.framer.position_ms >= 1920  # both seconds reached the model's clock


class TestDtmf:
    def test_each_key_is_stamped_when_it_was_pressed(self) -> None:
        """``voxphone call --dtmf 159``: audio, then three presses 220 ms apart on the wire;
        ``at_ms`` comes from each event's RTP timestamp (RFC 4733 §2.3.1), not from how much
        audio has arrived (which stops while keys are pressed)."""
        calls = Calls()
        port = RtpPort(40000, calls, FakeClock())
        audio = tone_packets(n=50)
        feed(port, [*audio, *dtmf_packets("159", audio[-1])])
        dtmf = calls.sink.of_type("dtmf")
        assert [(e.data["digit"], e.data["at_ms"]) for e in dtmf] == [
            ("1", 1000),
            ("5", 1220),
            ("9", 1440),
        ]

    def test_opus_calls_time_keys_on_the_48khz_clock(self) -> None:
        """A signalled Opus call with telephone-event/48000: durations and times use that rate."""
        clock = FakeClock()
        sink = capture_events()
        call = Call("opus", OPUS, sink, clock, transport="rtp")
        port = RtpPort(40002, Calls(), clock)
        port.reserve(Reservation(call, payload_type=111, telephone_event=110))
        pcm = (np.sin(np.arange(48000) / 9) * 6000).astype(np.int16)
        audio = list(rtp_packets(pcm, OPUS, payload_type=111, seed=3))
        keys = dtmf_packets("7", audio[-1], payload_type=110, clock_rate=48000)
        feed(port, [*audio, *keys])
        (event,) = sink.of_type("dtmf")
        assert (event.data["digit"], event.data["duration_ms"], event.data["at_ms"]) == (
            "7",
            100,
            1000,
        )


def test_comfort_noise_is_media_and_becomes_silence() -> None:
    """RFC 3389: a 7 s pause sent as comfort noise every 200 ms is part of the call's clock
    (silence), not a gap too long to fill (which would re-anchor and lose the pause)."""
    calls = Calls()
    port = RtpPort(40000, calls, FakeClock())
    talk = tone_packets(n=20, first_seq=1, first_ts=0)
    ssrc = talk[0].ssrc
    noise = [RtpPacket(13, 21 + i, 3200 + 1600 * i, ssrc, b"\x40") for i in range(35)]
    after = shifted(tone_packets(n=20), seq=56, ts=3200 + 56_000)
    feed(
        port,
        [*talk, *noise, *[RtpPacket(0, p.sequence, p.timestamp, ssrc, p.payload) for p in after]],
    )
    port.end(CALLER, "hangup")
    (call,) = calls.calls
    assert call.stats.dropped == {}
    assert call.pipeline.timeline.stats.discontinuities == 0
    assert call.pipeline.timeline.elapsed_ms == 400 + 7000 + 400


def test_every_packet_that_is_not_audio_is_counted_by_reason_on_the_call() -> None:
    calls = Calls()
    port = RtpPort(40000, calls, FakeClock())
    pkts = tone_packets(n=12)
    ssrc = pkts[0].ssrc
    odd = RtpPacket(99, pkts[5].sequence, pkts[5].timestamp, ssrc, b"?")  # no codec for 99
    feed(port, [*pkts[:5], odd, *pkts[6:], pkts[7], pkts[7]])
    port.handle(b"\x80\x00\x01", CALLER)  # too short to be RTP
    port.end(CALLER, "hangup")
    (call,) = calls.calls
    assert call.stats.dropped == {"unknown_payload_type": 1, "duplicate": 2, "malformed": 1}
    assert call.stats.packets == 11


def test_a_signalled_call_switches_among_the_formats_its_answer_accepted() -> None:
    """The SDP answer's formats (G.722, PCMA) are what the caller may switch among; a payload
    type the answer did not list is counted, even where the port's config would know it."""
    clock = FakeClock()
    sink = capture_events()
    call = Call("sdp", G722, sink, clock, transport="rtp")
    port = RtpPort(40002, Calls(), clock)
    port.reserve(Reservation(call, 9, created=clock.monotonic(), codecs={9: G722, 8: PCMA}))
    wide = list(rtp_packets(np.zeros(3200, np.int16), G722, seed=5))
    last = wide[-1]
    narrow = shifted(tone_packets(PCMA, n=10), seq=last.sequence + 1, ts=last.timestamp + 160)
    slin = RtpPacket(118, (last.sequence + 11) & 0xFFFF, 0, last.ssrc, bytes(320))
    feed(
        port,
        [
            *wide,
            *[RtpPacket(8, p.sequence, p.timestamp, last.ssrc, p.payload) for p in narrow],
            slin,
        ],
    )
    call.hangup("hangup")
    assert call.stats.packets == 20 and call.transport_stats["codec_switches"] == 1
    assert call.stats.dropped == {"unknown_payload_type": 1}


class Recording(Call):
    """A real call that also keeps, in order, everything its transport tells it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.told: list[tuple[object, ...]] = []

    def push_packet(self, timestamp: int, payload: bytes, codec: Codec | None = None) -> None:
        self.told.append(("audio", timestamp, payload, codec.name if codec else None))
        super().push_packet(timestamp, payload, codec)

    def fill_silence(self, timestamp: int) -> None:
        self.told.append(("silence", timestamp))
        super().fill_silence(timestamp)

    def dtmf(self, digit: str, duration_ms: int, timestamp: int | None = None) -> None:
        self.told.append(("dtmf", digit, duration_ms, timestamp))
        super().dtmf(digit, duration_ms, timestamp)

    def discontinuity(self) -> None:
        self.told.append(("discontinuity",))
        super().discontinuity()

    def count_dropped(self, reason: str, n: int = 1, **detail: Any) -> None:
        if n > 0:
            self.told.append(("dropped", reason, n))
        super().count_dropped(reason, n, **detail)


def mixed_stream() -> list[bytes]:
    """Every kind of datagram a caller sends, interleaved with in-order audio: loss, reordering,
    duplicates, a late packet, a codec switch and back, comfort noise, DTMF, RTCP, padding and
    CSRCs, a marker bit, a lone stray, a restart under the same SSRC and a new SSRC."""
    p = tone_packets(n=120, first_seq=65_500, first_ts=4_294_960_000)  # both wrap
    ssrc = p[0].ssrc

    def renumbered(pkt: RtpPacket, pt: int, marker: bool = False) -> bytes:
        return RtpPacket(pt, pkt.sequence, pkt.timestamp, ssrc, pkt.payload, marker).serialize()

    padded = bytearray(p[31].serialize())
    padded[0] |= 0x20
    with_csrc = RtpPacket(0, p[32].sequence, p[32].timestamp, ssrc, p[32].payload, csrcs=(7,))
    keys = [k.serialize() for k in dtmf_packets("5", p[49]) if k is not None]
    rtcp_sr = bytes([0x80, 200, 0, 6]) + ssrc.to_bytes(4, "big") + bytes(20)
    stray = shifted([p[60]], seq=(p[60].sequence + 20_000) & 0xFFFF, ts=99)[0]
    leg = shifted(tone_packets(n=20), seq=(p[79].sequence - 9_000) & 0xFFFF, ts=123_456)
    other = [RtpPacket(0, q.sequence, q.timestamp, ssrc ^ 1, q.payload) for q in p[100:]]
    wire = [q.serialize() for q in p[:10]]  # p[10] lost, never sent
    wire += [q.serialize() for q in p[11:15]] + [p[16].serialize(), p[15].serialize()]
    wire += [p[17].serialize(), p[17].serialize(), p[10].serialize()]  # a copy; too late
    wire += [renumbered(q, 8) for q in p[18:24]] + [renumbered(p[24], 0, marker=True)]
    wire += [q.serialize() for q in p[25:30]] + [renumbered(p[30], 13), rtcp_sr]
    wire += [bytes(padded) + b"\0\0\3", with_csrc.serialize()]
    wire += [q.serialize() for q in p[33:50]] + keys
    wire += [q.serialize() for q in p[50 + len(keys) : 60]] + [stray.serialize()]
    wire += [q.serialize() for q in p[60:80]] + [q.serialize() for q in leg]
    return wire + [q.serialize() for q in other]


def test_the_fast_path_does_exactly_what_the_general_path_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``RtpSource.receive_plain`` (the next audio packet, straight from the bytes) against the
    general path alone, on one mixed stream at a jittery pace: the call is told the same things
    in the same order and the source ends in the same state (RFC 3550 §A.8 jitter included)."""

    def run() -> tuple[list[tuple[object, ...]], dict[str, Any], float, dict[str, int]]:
        clock, rng, opened = FakeClock(), random.Random(5), []

        def new_call(codec: Codec, meta: dict[str, object]) -> Call:
            opened.append(Recording("c", codec, capture_events(), clock, transport="rtp"))
            return opened[-1]

        port = RtpPort(40000, new_call, clock)
        for data in mixed_stream():
            clock.advance(0.02 + rng.uniform(-0.005, 0.005))
            port.handle(data, CALLER)
        source = port.sources[CALLER]
        jitter, buffer = source.jitter, {**asdict(source.buffer.stats), **vars(source._seq)}
        port.end(CALLER, "hangup")
        (call,) = opened
        return call.told, {**asdict(call.stats), **call.transport_stats}, jitter, buffer

    taken: list[bool] = []
    plain = RtpSource.receive_plain

    def counted(self: RtpSource, data: bytes, now: float) -> bool:
        taken.append(plain(self, data, now))
        return taken[-1]

    monkeypatch.setattr(RtpSource, "receive_plain", counted)
    fast = run()
    assert taken.count(True) > 80 and taken.count(False) > 20  # both paths were taken
    monkeypatch.setattr(RtpSource, "receive_plain", lambda self, data, now: False)
    general = run()
    assert fast == general
    told, stats, jitter, _ = fast
    assert stats["restarts"] == 2 and stats["codec_switches"] == 2 and jitter > 0
    assert {"late", "duplicate", "out_of_sequence"} <= set(stats["dropped"])
    assert ("discontinuity",) in told and any(t[0] == "dtmf" for t in told)
