"""RFC 4733 telephone-events (DTMF over RTP), sans I/O.

A digit is sent as several packets sharing one RTP timestamp (the event's start), with a growing
duration, and its end packet is repeated (usually three times) for robustness. ``DtmfReceiver``
turns that into exactly one digit: on the first end packet, or — if every end packet was lost —
when the next event starts.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from voxphone.errors import TransportError

#: RFC 4733 §3.2: events 0–15 are the DTMF keys.
DTMF_KEYS = "0123456789*#ABCD"


@dataclass(frozen=True)
class TelephoneEvent:
    event: int
    end: bool
    volume: int
    duration: int  # in RTP clock units

    @property
    def key(self) -> str | None:
        return DTMF_KEYS[self.event] if self.event < len(DTMF_KEYS) else None


def telephone_event(key: str, duration: int, end: bool, volume: int = 10) -> bytes:
    """The 4-byte event block (RFC 4733 §2.3) for DTMF ``key`` (``0-9 * # A-D``), lasting
    ``duration`` clock units so far; ``volume`` in -dBm0 (0-63, 10 is a typical level)."""
    code = DTMF_KEYS.index(key.upper())
    return struct.pack("!BBH", code, (0x80 if end else 0) | (volume & 0x3F), min(duration, 0xFFFF))


def parse_telephone_event(payload: bytes) -> TelephoneEvent:
    """Parse the 4-byte event block (RFC 4733 §2.3); only the first of several blocks is used."""
    if len(payload) < 4:
        raise TransportError(f"telephone-event payload is {len(payload)} bytes, needs 4")
    event, flags, duration = struct.unpack_from("!BBH", payload)
    return TelephoneEvent(event, bool(flags & 0x80), flags & 0x3F, duration)


@dataclass(frozen=True)
class Digit:
    key: str
    duration_ms: int
    timestamp: int


class DtmfReceiver:
    """One source's telephone-events in, one ``Digit`` per key press out."""

    def __init__(self, clock_rate: int = 8000) -> None:
        self._rate = clock_rate
        self._current: tuple[int, TelephoneEvent] | None = None  # (timestamp, latest packet)
        self._done: int | None = None  # timestamp of the last digit already reported

    def feed(self, timestamp: int, payload: bytes) -> list[Digit]:
        """Feed one packet's payload; raises ``TransportError`` when it is malformed."""
        ev = parse_telephone_event(payload)
        out: list[Digit] = []
        if timestamp == self._done:
            return out  # a repeated end packet of a digit already reported
        if self._current is not None and self._current[0] != timestamp:
            out += self._emit()  # the previous event's end packets were all lost
        self._current = (timestamp, ev)
        if ev.end:
            out += self._emit()
        return out

    def _emit(self) -> list[Digit]:
        assert self._current is not None
        timestamp, ev = self._current
        self._current = None
        self._done = timestamp
        if ev.key is None:
            return []  # a tone or other non-DTMF event (RFC 4733 §3): not a key press
        return [Digit(ev.key, ev.duration * 1000 // self._rate, timestamp)]
