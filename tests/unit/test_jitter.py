"""The jitter buffer: order restored, duplicates and stragglers dropped, bounded waiting."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from voxphone.transports.jitter import JitterBuffer, seq_delta
from voxphone.transports.rtp_packet import RtpPacket


def pkt(seq: int) -> RtpPacket:
    return RtpPacket(0, seq & 0xFFFF, (seq * 160) & 0xFFFFFFFF, 1, b"x")


def seqs(packets: list[RtpPacket]) -> list[int]:
    return [p.sequence for p in packets]


def test_in_order_packets_pass_straight_through() -> None:
    jb = JitterBuffer(8000)
    assert [seqs(jb.push(pkt(i))) for i in range(3)] == [[0], [1], [2]]


def test_take_next_plays_only_the_next_packet_with_nothing_waiting() -> None:
    """The in-order shortcut (no packet built): what it takes counts as played, so a copy is a
    duplicate; with a packet waiting, or the wrong number, the caller must ``push``."""
    jb = JitterBuffer(8000)
    assert not jb.take_next(0)  # nothing played yet: no origin
    assert seqs(jb.push(pkt(0))) == [0]
    assert jb.take_next(1) and jb.take_next(2)
    assert not jb.take_next(4)
    assert jb.push(pkt(4)) == []  # 3 is missing: 4 waits
    assert not jb.take_next(3)  # something waits: through push, which releases both
    assert seqs(jb.push(pkt(3))) == [3, 4]
    assert jb.push(pkt(2)) == [] and jb.stats.duplicates == 1
    assert jb.take_next(5)


def test_reordered_packets_come_out_in_order() -> None:
    jb = JitterBuffer(8000)
    out = []
    for i in [0, 2, 1, 3, 5, 4]:
        out += jb.push(pkt(i))
    assert seqs(out) == [0, 1, 2, 3, 4, 5]
    assert jb.stats.reordered == 2


def test_duplicates_and_late_packets_are_dropped() -> None:
    jb = JitterBuffer(8000)
    out = []
    for i in [0, 2, 2, 1, 0, 1]:  # a copy of 2 while it waits; 0 and 1 again once played
        out += jb.push(pkt(i))
    assert seqs(out) == [0, 1, 2]
    assert (jb.stats.duplicates, jb.stats.late) == (3, 0)  # copies, not late: all were played


def test_a_lost_packet_is_waited_for_at_most_the_depth() -> None:
    jb = JitterBuffer(8000, depth_ms=60)
    assert seqs(jb.push(pkt(0))) == [0]
    assert jb.push(pkt(2)) == [] and jb.push(pkt(3)) == [] and jb.push(pkt(4)) == []
    assert seqs(jb.push(pkt(5))) == [2, 3, 4, 5]  # 80 ms buffered: packet 1 is given up
    assert jb.stats.lost == 1
    assert jb.push(pkt(1)) == [] and jb.stats.late == 1


def test_sequence_wrap_is_seamless() -> None:
    jb = JitterBuffer(8000)
    out = []
    for i in [65534, 0, 65535, 1]:
        out += jb.push(pkt(i))
    assert seqs(out) == [65534, 65535, 0, 1]


def test_flush_returns_what_is_held() -> None:
    jb = JitterBuffer(8000)
    jb.push(pkt(10))
    jb.push(pkt(12))
    assert seqs(jb.flush()) == [12]


def test_seq_delta() -> None:
    assert (seq_delta(1, 65535), seq_delta(65535, 1), seq_delta(5, 5)) == (2, -2, 0)


@given(st.permutations(list(range(40))), st.integers(0, 65535))
def test_any_shuffle_within_the_window_is_released_once_in_order(
    order: list[int], base: int
) -> None:
    """Each packet comes out exactly once, in increasing sequence order, unless it came too late
    (then it is counted): a buffer that dropped everything would not pass."""
    jb = JitterBuffer(8000, depth_ms=60)
    out = []
    for i in order:
        out += jb.push(pkt(base + i))
    out += jb.flush()
    ext = [(p.sequence - base) & 0xFFFF for p in out]
    assert ext == sorted(set(ext))
    assert len(out) + jb.stats.late == len(order)
    assert ext[0] == order[0]  # the first to arrive starts play-out


def test_hold_start_reorders_the_first_packets_too() -> None:
    jb = JitterBuffer(8000, depth_ms=60, hold_start=True)
    out = []
    for i in [2, 0, 1]:
        out += jb.push(pkt(i))
    assert out == []  # still filling the first 60 ms
    for i in [4, 3, 5, 6]:
        out += jb.push(pkt(i))
    assert seqs(out + jb.flush()) == [0, 1, 2, 3, 4, 5, 6]
    assert jb.stats.late == 0


def test_a_packet_behind_play_out_is_a_copy_if_its_slot_was_played_else_late() -> None:
    """Behind the play-out point every slot was played or given up: copies of played ones
    (around two gaps given up, across the 16-bit wrap) are duplicates; packets for given-up
    slots, for slots before play-out began, or too old to tell (``REMEMBER``) are late."""
    jb = JitterBuffer(8000, depth_ms=40)
    start = 65_530
    played = [start + i for i in range(20) if i not in (5, 6, 12)]  # 5-6 and 12 lost
    for s in played:
        jb.push(pkt(s))
    jb.push(pkt(start + 20))
    jb.push(pkt(start + 21))  # the gap at 12 is given up once 40 ms wait behind it
    assert jb.stats.lost == 3
    for s in [start + 4, start + 7, start + 11, start + 13, start + 19]:
        assert jb.push(pkt(s)) == []
    assert (jb.stats.duplicates, jb.stats.late) == (5, 0)
    for s in [start + 5, start + 6, start + 12, start - 1]:
        assert jb.push(pkt(s)) == []
    assert (jb.stats.duplicates, jb.stats.late) == (5, 4)
    for s in range(start + 22, start + 22 + JitterBuffer.REMEMBER):
        jb.push(pkt(s))
    jb.push(pkt(start + 3))  # played, but too long ago to be told from a late packet
    assert (jb.stats.duplicates, jb.stats.late) == (5, 5)
