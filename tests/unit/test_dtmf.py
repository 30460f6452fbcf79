"""RFC 4733 DTMF: one digit per key press, whatever the redundancy or loss."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from voxphone.errors import TransportError
from voxphone.transports.dtmf import DtmfReceiver, parse_telephone_event


def event(key: int, duration: int, end: bool = False, volume: int = 10) -> bytes:
    return struct.pack("!BBH", key, (0x80 if end else 0) | volume, duration)


def press(rx: DtmfReceiver, ts: int, key: int, steps: int = 4, ends: int = 3) -> list[str]:
    """A key press as a sender emits it: growing durations, then a triple end packet."""
    out = []
    for i in range(1, steps + 1):
        out += rx.feed(ts, event(key, 160 * i))
    for _ in range(ends):
        out += rx.feed(ts, event(key, 160 * steps + 160, end=True))
    return [d.key for d in out]


def test_parse_fields() -> None:
    ev = parse_telephone_event(event(11, 800, end=True, volume=7))
    assert (ev.key, ev.end, ev.volume, ev.duration) == ("#", True, 7, 800)


def test_one_digit_per_press_despite_repeated_end_packets() -> None:
    rx = DtmfReceiver()
    digits = press(rx, 1000, 1) + press(rx, 5000, 2) + press(rx, 9000, 1)
    assert digits == ["1", "2", "1"]


def test_duration_in_ms_from_the_8khz_clock() -> None:
    rx = DtmfReceiver()
    got = []
    for i in range(1, 5):
        got += rx.feed(0, event(5, 160 * i))
    got += rx.feed(0, event(5, 800, end=True))
    assert [(d.key, d.duration_ms) for d in got] == [("5", 100)]


def test_lost_end_packets_still_give_the_digit_when_the_next_starts() -> None:
    rx = DtmfReceiver()
    assert press(rx, 1000, 7, ends=0) == []
    assert press(rx, 3000, 8) == ["7", "8"]


def test_non_dtmf_events_are_not_digits() -> None:
    rx = DtmfReceiver()
    assert press(rx, 0, 66) == []  # a ringing tone event


def test_short_payload_is_a_precise_error() -> None:
    with pytest.raises(TransportError, match="telephone-event payload is 3 bytes, needs 4"):
        DtmfReceiver().feed(0, b"\x01\x02\x03")


@given(st.lists(st.tuples(st.integers(0, 5), st.binary(max_size=8)), max_size=40))
def test_any_packets_give_digits_or_precise_errors(packets: list[tuple[int, bytes]]) -> None:
    rx = DtmfReceiver()
    for ts, payload in packets:
        try:
            for d in rx.feed(ts, payload):
                assert d.key in "0123456789*#ABCD" and d.duration_ms >= 0
        except TransportError as exc:
            assert "needs 4" in str(exc)
