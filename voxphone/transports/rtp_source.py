"""One latched RTP source, sans I/O: what a caller's packets become (audio, keys, silence).

A source is one remote address sending one call's media to one port. This module is its state
machine, fed parsed packets and the time; the sockets, demultiplexing and latching live in
``rtp.py``. It follows RFC 3550 §A.1 for sequence numbers: a jump larger than ``MAX_DROPOUT``
ahead or ``MAX_MISORDER`` behind is not loss or lateness but, once a second packet follows it in
sequence, a restart of the stream (a PBX relaying a new call leg under the same SSRC), which
re-anchors the call's timeline as a new SSRC does. Every packet that does not become audio is
counted on the call by reason (``Call.count_dropped``), never dropped silently.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from enum import Enum

from voxphone.audio.codecs import Codec
from voxphone.call import Call
from voxphone.errors import TransportError
from voxphone.transports.dtmf import DtmfReceiver
from voxphone.transports.jitter import JitterBuffer
from voxphone.transports.rtp_packet import RtpPacket

#: RFC 3550 §A.1: the largest forward step still taken as loss, and backward as reordering.
MAX_DROPOUT = 3000
MAX_MISORDER = 100
#: RFC 3389 comfort noise (RFC 3551 static payload type 13): a pause, played as silence.
COMFORT_NOISE_PT = 13
#: RFC 3550 §5.1: the header's sequence number, timestamp and SSRC, after its first two bytes.
_SEQ_TS_SSRC = struct.Struct("!HII")
#: RFC 3550 §5.1 first byte of a plain header: version 2, no padding, no extension, no CSRCs.
_PLAIN_FIRST_BYTE = 0x80


class Step(Enum):
    """What a sequence number means for the stream (RFC 3550 §A.1 ``update_seq``)."""

    IN_ORDER = "in order"  # or reordered within MAX_MISORDER: the jitter buffer decides
    JUMP = "jump"  # too far from the last: held until the next packet confirms it
    RESTART = "restart"  # the packet after a jump, in sequence with it: the sender restarted


class SequenceCheck:
    """RFC 3550 §A.1 ``update_seq`` for a source already validated: 16-bit wrap-safe."""

    def __init__(self, sequence: int) -> None:
        self.max_seq = sequence
        self.bad_seq: int | None = None

    def step(self, sequence: int) -> Step:
        udelta = (sequence - self.max_seq) & 0xFFFF
        if udelta < MAX_DROPOUT:
            self.max_seq, self.bad_seq = sequence, None
            return Step.IN_ORDER
        if udelta <= 0x10000 - MAX_MISORDER:
            if sequence == self.bad_seq:
                self.max_seq, self.bad_seq = sequence, None
                return Step.RESTART
            self.bad_seq = (sequence + 1) & 0xFFFF
            return Step.JUMP
        return Step.IN_ORDER


@dataclass
class Candidate:
    """A source (or a new SSRC of a known one) on RFC 3550 §A.1 probation: its packets are kept
    and played if the next one follows in sequence, else counted as ``unvalidated``."""

    ssrc: int
    sequence: int
    since: float
    packets: list[RtpPacket] = field(default_factory=list)

    def confirms(self, pkt: RtpPacket) -> bool:
        return pkt.ssrc == self.ssrc and (self.sequence + 1) & 0xFFFF == pkt.sequence


@dataclass(frozen=True)
class SourceTerms:
    """What a source may send and how long it may be silent, from the port or the signalling."""

    #: Payload type → codec: every format it may switch among mid-stream (RFC 3550 §5.1).
    codecs: Mapping[int, Codec]
    telephone_events: frozenset[int]
    jitter_ms: int
    #: Silence on the wire that ends the call (seconds), and the reason it ends with.
    timeout_s: float
    timeout_reason: str


def _audio_by_second_byte(codecs: Mapping[int, Codec]) -> dict[int, Codec]:
    """The codec for each value of an RTP header's second byte (marker bit, RFC 3550 §5.1, set
    or not) that carries audio, leaving out the values RTCP's packet types take (192–223, RFC
    5761 §4): one lookup tells the fast path it has audio and which format."""
    out = {}
    for pt, codec in codecs.items():
        for byte in (pt, pt | 0x80):
            if not 192 <= byte <= 223:
                out[byte] = codec
    return out


class RtpSource:
    """One caller's stream: sequence checks, the jitter buffer, codec switches, DTMF, comfort
    noise and RFC 3550 §A.8 jitter. ``receive`` takes packets of any SSRC from this source."""

    def __init__(self, call: Call, first: RtpPacket, terms: SourceTerms, now: float) -> None:
        self.call = call
        self.terms = terms
        self.ssrc = first.ssrc
        self.last_seen = now
        self.codec = call.codec  # the format being decoded now: its clock times everything
        self.buffer = JitterBuffer(call.codec.clock_rate, terms.jitter_ms)
        self._seq = SequenceCheck(first.sequence)
        self._dtmf = DtmfReceiver(call.codec.clock_rate)
        self._held: RtpPacket | None = None  # the packet after a sequence jump
        self._new_ssrc: Candidate | None = None
        self._transit: float | None = None
        self.jitter = 0.0  # RFC 3550 §A.8 interarrival jitter, in RTP clock units
        self._audio_by_byte = _audio_by_second_byte(terms.codecs)

    def receive_plain(self, data: bytes, now: float) -> bool:
        """The fast path for most datagrams, straight from the socket: a plain header (no
        padding, extension or CSRCs), this SSRC, an audio payload type, a sequence number the
        jitter buffer plays at once (the next one, nothing waiting). Such a packet goes to
        ``Call.push_packet`` without an ``RtpPacket`` built and with exactly the state changes
        ``receive`` makes for it (RFC 3550 §A.1 sequence, §A.8 jitter, ``last_seen``, the
        codec switch). Returns False, having changed nothing, for any other datagram: the
        caller then parses it and calls ``receive`` (RTCP, DTMF, comfort noise, another SSRC,
        loss, reordering, duplicates, a restart). Why: at 1,000 calls per core a packet has
        20 µs, and the general path's packet object and calls cost a fifth of that."""
        if len(data) < 12 or data[0] != _PLAIN_FIRST_BYTE:
            return False
        codec = self._audio_by_byte.get(data[1])  # RTCP's second bytes are not in it
        if codec is None:
            return False
        sequence, timestamp, ssrc = _SEQ_TS_SSRC.unpack_from(data, 2)
        seq = self._seq
        if ssrc != self.ssrc or (sequence - seq.max_seq) & 0xFFFF >= MAX_DROPOUT:
            return False
        if not self.buffer.take_next(sequence):  # (no state changed when it says no)
            return False
        seq.max_seq, seq.bad_seq = sequence, None  # ``SequenceCheck.step``: in order
        self.last_seen = now
        self._arrival_at(timestamp, now)
        if codec is not self.codec:
            self._switch(codec)
        self.call.push_packet(timestamp, data[12:], codec)
        return True

    def receive(self, pkt: RtpPacket, now: float) -> None:
        """One packet from this source's address, in arrival order."""
        if pkt.ssrc != self.ssrc:
            self._other_ssrc(pkt, now)
            return
        self.last_seen = now
        step = self._seq.step(pkt.sequence)
        if step is Step.JUMP:
            self._hold(pkt)
        elif step is Step.RESTART:
            held, self._held = self._held, None
            self._restart([p for p in (held, pkt) if p is not None])
        else:
            self._arrival(pkt, now)
            self._play(pkt)

    def moved(self, packets: list[RtpPacket], now: float) -> None:
        """The caller's media now comes from another address (NAT rebinding, or the address the
        signalling named): the same call, a discontinuity if the stream restarted."""
        self.last_seen = now
        if packets[0].ssrc != self.ssrc:
            self.ssrc = packets[0].ssrc
            self._restart(packets)
            return
        for pkt in packets:
            self.receive(pkt, now)

    def finish(self, reason: str) -> None:
        """Play out what is held, report the transport's counters, end the call."""
        self.flush()
        self.report()
        self.call.end(reason)

    def abandon(self) -> None:
        """The call ended without the transport (its engine failed): what the jitter buffer
        holds is counted ``after_end``, not played, and the counters are reported."""
        self.call.count_dropped("after_end", len(self.buffer.flush()))
        self.report()

    def report(self) -> None:
        """The transport's counters into ``call.transport_stats`` (for ``call.ended``)."""
        stats = self.call.transport_stats
        stats.update(asdict(self.buffer.stats))
        stats["jitter_ms"] = round(self.jitter * 1000 / self.codec.clock_rate)

    def flush(self) -> None:
        """Deliver everything the jitter buffer holds; count what never validated."""
        for ready in self.buffer.flush():
            self._deliver(ready)
        if self._held is not None:
            self.call.count_dropped("out_of_sequence")
            self._held = None
        if self._new_ssrc is not None:
            self.call.count_dropped("foreign_ssrc", len(self._new_ssrc.packets))
            self._new_ssrc = None

    # -- sequence ---------------------------------------------------------------------------

    def _hold(self, pkt: RtpPacket) -> None:
        """A lone packet far from the sequence is a stray until its successor confirms it."""
        if self._held is not None:
            self.call.count_dropped("out_of_sequence", sequence=self._held.sequence)
        self._held = pkt

    def _other_ssrc(self, pkt: RtpPacket, now: float) -> None:
        """A new SSRC from this address (re-INVITE, transfer, a media server switch) is the same
        call after a discontinuity once it passes probation; a stray packet is counted."""
        cand = self._new_ssrc
        if cand is None or not cand.confirms(pkt):
            if cand is not None:
                self.call.count_dropped("foreign_ssrc", len(cand.packets), ssrc=cand.ssrc)
            self._new_ssrc = Candidate(pkt.ssrc, pkt.sequence, now, [pkt])
            return
        self._new_ssrc = None
        self.ssrc = pkt.ssrc
        self.last_seen = now
        self._restart([*cand.packets, pkt])

    def _restart(self, packets: list[RtpPacket]) -> None:
        """The stream starts afresh: play out the old one, re-anchor the call's timeline."""
        self.flush()
        self.call.discontinuity()
        self.call.transport_stats["restarts"] = self.call.transport_stats.get("restarts", 0) + 1
        self._seq = SequenceCheck(packets[0].sequence)
        self._dtmf = DtmfReceiver(self.codec.clock_rate)
        self._transit = None
        for pkt in packets:
            self._seq.step(pkt.sequence)
            self._play(pkt)

    def _arrival(self, pkt: RtpPacket, now: float) -> None:
        if pkt.payload_type in self.terms.codecs:
            self._arrival_at(pkt.timestamp, now)

    def _arrival_at(self, timestamp: int, now: float) -> None:
        """RFC 3550 §A.8: smoothed variation of transit time, the jitter a receiver reports
        (audio packets only, on the clock of the format being decoded)."""
        rate = self.codec.clock_rate
        transit = now * rate - timestamp
        if self._transit is not None:
            d = abs(transit - self._transit)
            if d < rate:  # not across a timestamp jump or wrap
                self.jitter += (d - self.jitter) / 16
        self._transit = transit

    # -- play-out ---------------------------------------------------------------------------

    def _play(self, pkt: RtpPacket) -> None:
        """Through the jitter buffer; whatever comes out in order is delivered."""
        if self.buffer.take_next(pkt.sequence):  # the next one, nothing waiting: most packets
            self._deliver(pkt)
            return
        stats = self.buffer.stats
        late, duplicates = stats.late, stats.duplicates
        ready = self.buffer.push(pkt)
        self.call.count_dropped("late", stats.late - late)
        self.call.count_dropped("duplicate", stats.duplicates - duplicates)
        for each in ready:
            self._deliver(each)

    def _deliver(self, pkt: RtpPacket) -> None:
        codec = self.terms.codecs.get(pkt.payload_type)
        if codec is not None:
            self._switch(codec)
            self.call.push_packet(pkt.timestamp, pkt.payload, codec)
        elif pkt.payload_type in self.terms.telephone_events:
            self._key(pkt)
        elif pkt.payload_type == COMFORT_NOISE_PT:
            self.call.fill_silence(pkt.timestamp)
        else:
            self.call.count_dropped("unknown_payload_type", payload_type=pkt.payload_type)

    def _switch(self, codec: Codec) -> None:
        """A payload type change (RFC 3550 §5.1): the call decodes the new format from this
        packet on (``Call.push_packet``); telephone-events share the audio's clock (RFC 4733
        §2.1), so the DTMF decoder follows a clock-rate change."""
        if codec is self.codec or codec == self.codec:  # (identity first: a dataclass's == is slow)
            return
        self.call.transport_stats["codec_switches"] = (
            self.call.transport_stats.get("codec_switches", 0) + 1
        )
        if codec.clock_rate != self.codec.clock_rate:
            self._dtmf = DtmfReceiver(codec.clock_rate)
        self.codec = codec

    def _key(self, pkt: RtpPacket) -> None:
        """RFC 4733 events: one ``dtmf`` per key press, at its start on the call clock."""
        try:
            digits = self._dtmf.feed(pkt.timestamp, pkt.payload)
        except TransportError as exc:
            self.call.count_dropped("malformed", error=str(exc))
            return
        for digit in digits:
            self.call.dtmf(digit.key, digit.duration_ms, digit.timestamp)
