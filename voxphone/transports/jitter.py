"""A bounded jitter buffer for RTP, sans I/O: reorders, drops duplicates and stragglers.

Packets are released in sequence order as soon as the next one is there. A missing packet is
waited for only while the buffered audio spans less than ``depth`` (default 60 ms, three 20 ms
packets); then it is given up (the timeline fills its slot with silence) and play-out moves on.
No timers: a pause in arrivals holds at most ``depth`` of audio until the next packet or ``flush``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from voxphone.transports.rtp_packet import RtpPacket


def seq_delta(a: int, b: int) -> int:
    """Signed difference of two 16-bit sequence numbers, across wrap-around."""
    d = (a - b) & 0xFFFF
    return d - 0x10000 if d >= 0x8000 else d


@dataclass
class JitterStats:
    reordered: int = 0  # arrived after a later packet, released in order anyway
    duplicates: int = 0
    late: int = 0  # arrived after its slot was given up
    lost: int = 0  # given up on


class JitterBuffer:
    REMEMBER = 512  # slots behind the play-out point in which a copy is told from a late packet

    def __init__(self, clock_rate: int, depth_ms: int = 60, hold_start: bool = False) -> None:
        """``hold_start``: buffer ``depth`` before playing the first packet, so a stream whose
        very first packets arrive out of order (Telnyx's websocket) still starts in order."""
        self._depth = clock_rate * depth_ms // 1000
        self._holding = hold_start
        self._next: int | None = None  # extended sequence number to release next
        self._first = 0  # the first slot played (extended), once ``_next`` is set
        self._buf: dict[int, RtpPacket] = {}
        self._highest: int | None = None
        #: Recent slots given up on. Every slot from ``_first`` to ``_next`` was played or given
        #: up, so these few ranges tell a copy from a late packet without a record per packet.
        self._given_up: list[range] = []
        self.stats = JitterStats()

    def push(self, pkt: RtpPacket) -> list[RtpPacket]:
        """Add a packet; return the packets now ready, in sequence order."""
        if self.take_next(pkt.sequence):
            return [pkt]
        if self._next is None:
            self._next = self._highest = self._first = pkt.sequence
        ext = self._next + seq_delta(pkt.sequence, self._next & 0xFFFF)
        if ext < self._next and self._holding:
            self._next = self._first = ext  # an earlier packet, before play-out began: from it
        elif ext < self._next:
            self._behind(ext)
            return []
        if ext in self._buf:
            self.stats.duplicates += 1
            return []
        assert self._highest is not None
        if ext < self._highest:
            self.stats.reordered += 1
        self._highest = max(self._highest, ext)
        self._buf[ext] = pkt
        if self._holding:
            if self._span() < self._depth:
                return []
            self._holding = False
        out = self._release()
        while self._buf and self._span() >= self._depth:
            first = min(self._buf)
            self._give_up(first)
            out += self._release()
        return out

    def take_next(self, sequence: int) -> bool:
        """Whether a packet with this 16-bit ``sequence`` is the very next to play with nothing
        waiting (most packets are): if so it counts as played and the caller plays it at once,
        without the reordering bookkeeping (or even building a packet); if not, ``push`` it."""
        nxt = self._next
        if nxt is None or self._buf or self._holding or sequence != nxt & 0xFFFF:
            return False
        self._highest = nxt
        self._next = nxt + 1
        return True

    def flush(self) -> list[RtpPacket]:
        """Everything buffered, in order (end of call, or a discontinuity: the next packet starts a
        new sequence; the counters carry on)."""
        out = [self._buf[k] for k in sorted(self._buf)]
        self._buf.clear()
        self._next = self._highest = None
        self._given_up.clear()
        return out

    def _behind(self, ext: int) -> None:
        """A packet behind the play-out point: a copy of one played (networks and some
        gateways duplicate packets), else late (its slot was given up, or play-out began
        after it)."""
        assert self._next is not None
        played = ext >= max(self._first, self._next - self.REMEMBER) and not any(
            ext in slots for slots in self._given_up
        )
        if played:
            self.stats.duplicates += 1
        else:
            self.stats.late += 1

    def _give_up(self, first: int) -> None:
        """Stop waiting for the packets before ``first``."""
        assert self._next is not None
        self.stats.lost += first - self._next
        oldest = first - self.REMEMBER
        self._given_up = [r for r in self._given_up if r.stop > oldest]
        self._given_up.append(range(self._next, first))
        self._next = first

    def _release(self) -> list[RtpPacket]:
        out = []
        assert self._next is not None
        while self._next in self._buf:
            out.append(self._buf.pop(self._next))
            self._next += 1
        return out

    def _span(self) -> int:
        """RTP time covered by what is buffered (newest minus oldest timestamp, wrap-safe)."""
        newest = self._buf[max(self._buf)].timestamp
        oldest = self._buf[min(self._buf)].timestamp
        return ((newest - oldest) & 0xFFFFFFFF) + 1 if len(self._buf) > 1 else 0
