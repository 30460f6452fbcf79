"""Plain RTP ingress (RFC 3550): UDP ports that demultiplex sources into calls, and the server.

Two kinds of call. **First-packet mode**: any port of the range; a new source becomes a call once
it passes RFC 3550 §A.1 probation (two packets in sequence), so random datagrams never create one,
and it ends after ``inactivity_s`` without packets. **Signalled** (``POST /v1/calls``): the API
reserves a port; the port latches onto its caller and the call ends on ``DELETE``, RTCP BYE,
``max_duration`` or ``no_media_s`` without packets (silence suppression is not a hang-up).

Addresses in signalling are hints (NAT): as Asterisk's ``strictrtp`` learning does, media from the
address the SDP named latches at once; otherwise the first source to pass probation latches, and
for ``learning_s`` after that the signalled address may still take over. A JSON ``remote_ip`` is
an explicit filter instead. Once latched, other sources are dropped and counted.

A call ended from above (hang-up, ``max_duration``, BYE) stays ended: its source's packets are
counted as ``after_end`` and ignored until it has been quiet for ``ended_grace_s``; only then does
its port return to the pool. Everything that is not audio is counted: on the call when it can be
told whose it is (``Call.count_dropped``), else on the server (``RtpServer.totals``).

Each call talks back through an ``RtpEndpoint`` (``rtp_out.py``): bot audio and DTMF leave from
the call's port to its latched caller (symmetric RTP).

The per-source state machine is ``rtp_source.py``; the packet format is ``rtp_packet.py``.
"""

from __future__ import annotations

import array
import asyncio
import dataclasses
import fcntl
import functools
import socket
import sys
import termios
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from voxphone.audio.codecs import STATIC_PAYLOAD_TYPES, Codec
from voxphone.call import Call
from voxphone.clock import Clock
from voxphone.errors import TransportError
from voxphone.transports.rtcp import Bye, RtcpPacket, SenderReport, parse_rtcp
from voxphone.transports.rtp_out import RtpEndpoint
from voxphone.transports.rtp_packet import Address, RtpPacket, is_rtcp, parse_rtp
from voxphone.transports.rtp_source import COMFORT_NOISE_PT, Candidate, RtpSource, SourceTerms
from voxphone.transports.udp_drops import PROC_NET_UDP, read_drops, socket_inodes

log = structlog.get_logger(__name__)

CallFactory = Callable[[Codec, dict[str, object]], Call | None]
#: Counts of packets no call could be charged with, by reason (shared by a server's ports).
Counts = dict[str, int]
#: ``SO_RCVBUF`` asked for each port's socket (Linux grants up to ``net.core.rmem_max``, then
#: doubles it for its own bookkeeping). Over loopback Linux's default, 208 KiB, holds 256 G.711
#: datagrams and 1 MiB ≈ 2,500: a port carrying 250 calls (12,500 datagrams a second) then rides
#: out a stall of the loop of ≈ 200 ms instead of 20 ms (less from a NIC: bigger buffers each).
#: Not more: audio held longer is that late, and an overloaded server's lag would grow to
#: seconds before anything is dropped (``load.py``, 1,000 calls on a full Xeon core, 4 MiB:
#: packets handled 0.9 s after they were sent, at the median).
RECEIVE_BUFFER_BYTES = 1024 * 1024
#: The most ``SO_RCVBUF`` a config may ask for: 256 MiB holds minutes of a port's audio, far
#: more than is worth holding (Linux caps what it grants at ``net.core.rmem_max`` anyway), and
#: well inside the C ``int`` that ``setsockopt`` takes.
MAX_RECEIVE_BUFFER_BYTES = 256 * 1024 * 1024
#: Seconds between sweeps for silent calls and expired grace periods (``RtpServer._sweep``).
SWEEP_S = 1.0
#: Sources the sweep scans for silence between pauses (≈ 40 µs of the loop on the 2-core Xeon).
SWEEP_SLICE = 32
#: Seconds between reads of the kernel's drop counters (``udp_drops``).
DROPS_CHECK_S = 5.0
#: ``totals()`` reason: datagrams the kernel dropped from a port's full receive buffer.
RECEIVE_BUFFER_FULL = "receive_buffer_full"


def rtcp_source_ok(rtp: Address, rtcp: Address) -> bool:
    """Whether RTCP from ``rtcp`` may speak for the stream latched from ``rtp``: the same address
    (RFC 5761 mux, or a sender that uses one socket) or its port + 1 (RFC 3550 §11). A gateway
    whose RTCP leaves from anywhere else has its BYE dropped, and its calls end on inactivity."""
    return rtcp[0] == rtp[0] and rtcp[1] in (rtp[1], rtp[1] + 1)


@dataclass(frozen=True)
class PortPolicy:
    """How every port of the range treats media (from the ``[rtp]`` config); times in seconds."""

    payload_types: Mapping[int, Codec] = field(default_factory=lambda: dict(STATIC_PAYLOAD_TYPES))
    telephone_events: frozenset[int] = frozenset({101})
    jitter_ms: int = 60
    #: A latched source that has been silent this long may be replaced (NAT rebinding).
    relatch_after_s: float | None = None
    #: First-packet calls end after this long without a packet.
    inactivity_s: float = 5.0
    #: Signalled calls end after this long without a packet (or without any, from the start).
    no_media_s: float = 30.0
    #: An ended call's source is ignored until it has been quiet this long; then its port is free.
    ended_grace_s: float = 3.0
    #: After latching elsewhere, the address the SDP named may still take over for this long
    #: (Asterisk's STRICT_RTP_LEARN_TIMEOUT is 5 s).
    learning_s: float = 5.0
    #: Sources on probation kept per port, and how long one may wait for its second packet.
    max_candidates: int = 256
    probation_s: float = 2.0


@dataclass
class Reservation:
    """A port allocated to one call by the API. ``expected_ip`` (JSON ``remote_ip``) admits only
    that address; ``hint`` (the SDP's connection address and port) is preferred, not required."""

    call: Call
    payload_type: int
    telephone_event: int | None = None
    expected_ip: str | None = None
    created: float = 0.0
    hint: Address | None = None
    #: The formats the SDP answer accepted (``payload_type`` among them); else the port's.
    codecs: Mapping[int, Codec] | None = None
    latched_at: float | None = None
    ended_at: float | None = None
    #: Whether voxphone may send media back (the SDP answer is ``sendrecv``).
    sends: bool = True


@dataclass
class _Ended:
    """A source whose call ended: ignored (``after_end``) until quiet for the grace period."""

    call: Call
    ssrc: int | None  # None: every stream from there (a reserved port's caller)
    last: float


class RtpPort(asyncio.DatagramProtocol):
    """One UDP port: demultiplexes sources into calls. All logic is in ``handle``."""

    def __init__(
        self,
        port: int,
        new_call: CallFactory,
        clock: Clock,
        policy: PortPolicy | None = None,
        counts: Counts | None = None,
    ) -> None:
        self.port = port
        self.policy = policy or PortPolicy()
        self._new_call = new_call
        self._clock = clock
        self.sources: dict[Address, RtpSource] = {}
        self.by_ssrc: dict[int, Address] = {}
        self.reservation: Reservation | None = None
        self.counts: Counts = counts if counts is not None else {}
        #: Where parsed RTCP goes, with the port it arrived on and its source.
        self.on_rtcp: Callable[[RtpPort, Address, list[RtcpPacket]], None] | None = None
        #: Told when a packet takes ``handle``'s general path or the port is reserved (the
        #: server's sweep set); a latched source's packets need not: its port is in it already.
        self.on_active: Callable[[RtpPort], None] = lambda _port: None
        self._candidates: OrderedDict[Address, Candidate] = OrderedDict()
        self._ended: dict[Address, _Ended] = {}
        self.queued = False  # in the server's free-port queue
        #: Sends a datagram from this port (the server sets it once the socket is bound), and
        #: an RTCP one from port + 1 (RFC 3550 §11; this port when that is not ours).
        self.transmit: Callable[[bytes, Address], None] = self._unbound
        self.transmit_rtcp: Callable[[bytes, Address], None] = self._unbound

    def _unbound(self, data: bytes, addr: Address) -> None:
        self._count(None, "unbound_send")

    def remote_of(self, call: Call, last: Address | None = None) -> Address | None:
        """Where ``call``'s caller is: its latched source (``last``, when that is still it,
        without a search), else the address its SDP named; None before either is known."""
        source = self.sources.get(last) if last is not None else None
        if source is not None and source.call is call:
            return last
        addr = next((a for a, s in self.sources.items() if s.call is call), None)
        if addr is not None:
            return addr
        res = self.reservation
        return res.hint if res is not None and res.call is call else None

    def talk_back(self, call: Call, payload_type: int, telephone_event: int | None) -> None:
        """Give ``call`` its way back (``RtpEndpoint``): audio in ``payload_type`` (the call's
        codec), DTMF on ``telephone_event``; its hang-up goes through this port."""
        endpoint = RtpEndpoint(
            call, call.codec, payload_type, telephone_event,
            transmit=lambda data, addr: self.transmit(data, addr),
            transmit_rtcp=lambda data, addr: self.transmit_rtcp(data, addr),
            remote=functools.partial(self.remote_of, call),
            hang_up=functools.partial(self.hang_up, call),
            clock=self._clock,
        )  # fmt: skip
        call.attach_endpoint(endpoint)

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        """``addr`` as ``recvfrom`` gives it: (host, port) for IPv4, used as it is; IPv6's
        (host, port, flowinfo, scope_id) is cut down to an ``Address``."""
        if len(addr) != 2 or type(addr[0]) is not str:
            addr = (str(addr[0]), int(addr[1]))
        self.handle(data, addr)  # type: ignore[arg-type]  # (str, int) now

    def handle(self, data: bytes, addr: Address) -> None:
        """One datagram from ``addr``: RTCP, or RTP for a latched source, an ended call's
        stream, the reserved call's caller-to-be, or a new source on probation.

        Most datagrams are the next audio packet of a live call's latched source: its
        ``RtpSource.receive_plain`` plays those straight from the bytes. Anything it declines
        takes the general path below, which parses the packet first (and marks the port for
        the sweep: a latched source's port is marked already, and stays so while it has one)."""
        now = self._clock.monotonic()
        source = self.sources.get(addr)
        if (
            source is not None
            and source.call.end_reason is None
            and source.receive_plain(data, now)
        ):
            return
        self.on_active(self)
        if is_rtcp(data):
            self._rtcp(data, addr)
            return
        try:
            pkt = parse_rtp(data)
        except TransportError as exc:
            self._count(self._owner(addr), "malformed", error=str(exc))
            return
        if source is not None and source.call.end_reason is not None:
            self._close(addr, source, now)  # ended elsewhere (engine failure): stop its media
            source = None
        if source is not None:
            self._receive(addr, source, pkt, now)
        elif self._after_end(addr, pkt, now):
            return
        elif self.reservation is not None:
            self._latch(self.reservation, pkt, addr, now)
        else:
            self._probation(pkt, addr, now)

    def _receive(self, addr: Address, source: RtpSource, pkt: RtpPacket, now: float) -> None:
        ssrc = source.ssrc
        source.receive(pkt, now)
        if source.ssrc != ssrc:  # a new SSRC passed probation: keep the RTCP index true
            self.by_ssrc.pop(ssrc, None)
            self.by_ssrc[source.ssrc] = addr

    def _owner(self, addr: Address) -> Call | None:
        """The call a packet from ``addr`` concerns: its latched source's, else the port's."""
        source = self.sources.get(addr)
        if source is not None:
            return source.call
        return self.reservation.call if self.reservation is not None else None

    def _count(self, call: Call | None, reason: str, n: int = 1, **detail: object) -> None:
        """On the call while its ``call.ended`` is still to come, else on the server (logged
        once per reason, as a call logs its own)."""
        if call is not None and not call.done:
            call.count_dropped(reason, n, **detail)
        elif n > 0:
            if reason not in self.counts:
                log.info("rtp_dropped", reason=reason, port=self.port, **detail)
            self.counts[reason] = self.counts.get(reason, 0) + n

    def _rtcp(self, data: bytes, addr: Address) -> None:
        try:
            packets = parse_rtcp(data)
        except TransportError as exc:
            self._count(self._owner(addr), "malformed", error=str(exc))
            return
        if self.on_rtcp is not None:
            self.on_rtcp(self, addr, packets)

    # -- ended calls ------------------------------------------------------------------------

    def _after_end(self, addr: Address, pkt: RtpPacket, now: float) -> bool:
        """Packets of an ended call's stream: counted ``after_end``, never a new call."""
        ended = self._ended.get(addr)
        if ended is not None and ended.ssrc in (None, pkt.ssrc):
            ended.last = now
            self._count(ended.call, "after_end")
            return True
        res = self.reservation
        if res is not None and res.call.end_reason is not None:
            self._count(res.call, "after_end")  # the port is closed until its grace is over
            return True
        return False

    def _close(self, addr: Address, source: RtpSource, now: float, refuse: bool = True) -> None:
        """Forget a finished source; unless it ended by its own silence (``refuse=False``), its
        address stays closed until quiet for the grace period."""
        del self.sources[addr]
        self.by_ssrc.pop(source.ssrc, None)
        if refuse:
            ssrc = None if self.reservation is not None else source.ssrc
            self._ended[addr] = _Ended(source.call, ssrc, now)

    def end(self, addr: Address, reason: str, refuse: bool = True) -> None:
        """Play out what the source's jitter buffer holds, then end its call."""
        source = self.sources[addr]
        self._close(addr, source, self._clock.monotonic(), refuse)
        source.finish(reason)

    def _finished(self, source: RtpSource) -> None:
        """The call is about to publish ``call.ended``. If it ended without the port (its
        engine failed) its source still sends: it is closed now, so its packets are counted
        ``after_end`` instead of going into an ended call, and its counters are reported.
        Otherwise the port closed it first and there is nothing to do."""
        addr = next((a for a, s in self.sources.items() if s is source), None)
        if addr is not None:
            self._close(addr, source, self._clock.monotonic())
            source.abandon()

    def hang_up(self, call: Call, reason: str) -> None:
        """End ``call`` from outside (API ``DELETE``, ``max_duration``, shutdown) as ``end``
        does: what its jitter buffer holds is played out first, then its media is refused."""
        addr = next((a for a, s in self.sources.items() if s.call is call), None)
        if addr is None:
            call.end(reason)
        else:
            self.end(addr, reason)
        if self.reservation is not None and self.reservation.call is call:
            self.reservation.ended_at = self._clock.monotonic()

    # -- first-packet mode ------------------------------------------------------------------

    def _probation(self, pkt: RtpPacket, addr: Address, now: float) -> None:
        """RFC 3550 §A.1: a source is valid after two packets in sequence."""
        codec = self.policy.payload_types.get(pkt.payload_type)
        if codec is None:
            pt = pkt.payload_type
            known = pt in self.policy.telephone_events or pt == COMFORT_NOISE_PT
            self._count(None, "before_start" if known else "unknown_payload_type")
            return
        packets = self._confirmed(pkt, addr, now)
        if packets is None:
            return
        meta: dict[str, object] = {
            "remote": f"{addr[0]}:{addr[1]}",
            "local_port": self.port,
            "ssrc": pkt.ssrc,
        }
        call = self._new_call(codec, meta)
        if call is None:
            self._count(None, "call_refused", len(packets))
            return
        events = sorted(self.policy.telephone_events)
        self.talk_back(call, pkt.payload_type, events[0] if events else None)
        terms = self._terms(self.policy.payload_types, None, signalled=False)
        self._add(addr, RtpSource(call, packets[0], terms, now), packets, now)

    def _confirmed(self, pkt: RtpPacket, addr: Address, now: float) -> list[RtpPacket] | None:
        """The packets that validate ``addr`` as a source, or ``None`` while on probation."""
        cand = self._candidates.pop(addr, None)
        if cand is not None and cand.confirms(pkt):
            return [*cand.packets, pkt]
        if cand is not None:
            self._count(self._reserved_call(), "unvalidated", len(cand.packets))
        self._candidates[addr] = Candidate(pkt.ssrc, pkt.sequence, now, [pkt])
        while len(self._candidates) > self.policy.max_candidates:
            _, evicted = self._candidates.popitem(last=False)
            self._count(self._reserved_call(), "over_buffer_limit", len(evicted.packets))
        return None

    def _reserved_call(self) -> Call | None:
        return self.reservation.call if self.reservation is not None else None

    def _terms(
        self, codecs: Mapping[int, Codec], dtmf: int | None, *, signalled: bool
    ) -> SourceTerms:
        p = self.policy
        return SourceTerms(
            codecs=codecs,
            telephone_events=frozenset({dtmf}) if dtmf is not None else p.telephone_events,
            jitter_ms=p.jitter_ms,
            timeout_s=p.no_media_s if signalled else p.inactivity_s,
            timeout_reason="no_media" if signalled else "inactivity",
        )

    def _add(self, addr: Address, source: RtpSource, packets: list[RtpPacket], now: float) -> None:
        self.sources[addr] = source
        self.by_ssrc[source.ssrc] = addr
        source.call.on_finish(functools.partial(self._finished, source))
        for pkt in packets:
            self._receive(addr, source, pkt, now)

    # -- signalled calls --------------------------------------------------------------------

    def reserve(self, reservation: Reservation) -> None:
        self.reservation = reservation
        call = reservation.call
        if reservation.sends:
            self.talk_back(call, reservation.payload_type, reservation.telephone_event)
        else:
            call.hangup = functools.partial(self.hang_up, call)
        self.on_active(self)

    def _latch(self, res: Reservation, pkt: RtpPacket, addr: Address, now: float) -> None:
        """Admit the reserved call's caller: only ``expected_ip`` when given; else the SDP's
        address at once, or the first source to pass probation (Asterisk strictrtp learning)."""
        if res.expected_ip is not None and addr[0] != res.expected_ip:
            self._count(res.call, "foreign_source", source=f"{addr[0]}:{addr[1]}")
            return
        codecs = self._codecs(res)
        if pkt.payload_type not in codecs:
            self._count(res.call, "unknown_payload_type", payload_type=pkt.payload_type)
            return
        trusted = res.expected_ip is not None or addr == res.hint
        if self.sources and not self._may_take_over(res, addr, now):
            self._count(res.call, "foreign_source", source=f"{addr[0]}:{addr[1]}")
            return
        packets = [pkt] if trusted else self._confirmed(pkt, addr, now)
        if packets is None:
            return
        self._candidates.clear()
        if self.sources:
            self._relatch(res, addr, packets, now)
            return
        res.latched_at = now
        res.call.metadata["remote"] = f"{addr[0]}:{addr[1]}"
        terms = self._terms(codecs, res.telephone_event, signalled=True)
        self._add(addr, RtpSource(res.call, packets[0], terms, now), packets, now)

    def _codecs(self, res: Reservation) -> Mapping[int, Codec]:
        """The formats a signalled caller may send and switch among mid-stream (RFC 3550
        §5.1): those its SDP answer accepted, else the negotiated one and the port's."""
        if res.codecs:
            return res.codecs
        return {**self.policy.payload_types, res.payload_type: res.call.codec}

    def _may_take_over(self, res: Reservation, addr: Address, now: float) -> bool:
        """Another address may replace the latched one: the SDP's own address during the
        learning window, or anyone once the latched one has been silent ``relatch_after_s``."""
        learning = res.latched_at is not None and now - res.latched_at < self.policy.learning_s
        if addr == res.hint and learning:
            return True
        after = self.policy.relatch_after_s
        if after is None:
            return False
        (source,) = self.sources.values()
        return now - source.last_seen >= after

    def _relatch(
        self, res: Reservation, addr: Address, packets: list[RtpPacket], now: float
    ) -> None:
        ((old, source),) = self.sources.items()
        del self.sources[old]
        self.by_ssrc.pop(source.ssrc, None)
        self.sources[addr] = source
        res.call.transport_stats["relatched"] = res.call.transport_stats.get("relatched", 0) + 1
        res.call.metadata["remote"] = f"{addr[0]}:{addr[1]}"
        log.info(
            "rtp_relatched",
            call_id=res.call.call_id,
            old=f"{old[0]}:{old[1]}",
            new=f"{addr[0]}:{addr[1]}",
        )
        source.moved(packets, now)
        self.by_ssrc[source.ssrc] = addr

    # -- the sweep --------------------------------------------------------------------------

    def expire(self, now: float) -> None:
        """End silent calls; forget ended sources, stale candidates, a finished reservation:
        ``expire_sources`` for every source, then ``expire_others``, in one go."""
        self.expire_sources(list(self.sources), now)
        self.expire_others(now)

    def expire_sources(self, addrs: Iterable[Address], now: float) -> None:
        """End the calls of ``addrs``' sources that fell silent and forget those whose call
        ended; an address no longer here is skipped. ``RtpServer._sweep`` passes a port's
        sources a slice at a time (``SWEEP_SLICE``), letting the packets that arrive meanwhile
        go first: the loop stops while a slice is scanned."""
        sources = self.sources
        for addr in addrs:
            source = sources.get(addr)
            if source is None:
                continue
            if source.call.end_reason is not None:
                self._close(addr, source, now)
            elif now - source.last_seen >= source.terms.timeout_s:
                self.end(addr, source.terms.timeout_reason, refuse=False)

    def expire_others(self, now: float) -> None:
        """Forget addresses whose grace period is over and candidates whose probation ran
        out (counted ``unvalidated``); end or let go of the reservation."""
        grace = self.policy.ended_grace_s
        for addr, ended in list(self._ended.items()):
            if now - ended.last >= grace:
                del self._ended[addr]
        for addr, cand in list(self._candidates.items()):
            if now - cand.since >= self.policy.probation_s:
                del self._candidates[addr]
                self._count(self._reserved_call(), "unvalidated", len(cand.packets))
        self._expire_reservation(now)

    def _expire_reservation(self, now: float) -> None:
        """A reserved call that never got media ends ``no_media``; an ended one gives its port
        back once the grace period is over and its caller has gone quiet."""
        res = self.reservation
        if res is None:
            return
        waited = now - res.created >= self.policy.no_media_s
        if res.call.end_reason is None and res.latched_at is None and waited:
            res.call.end("no_media")
        if res.call.end_reason is None or self.sources:
            return
        res.ended_at = now if res.ended_at is None else res.ended_at
        if now - res.ended_at >= self.policy.ended_grace_s and not self._ended:
            self.reservation = None

    @property
    def free(self) -> bool:
        """Nothing to sweep, so free to allocate: no call, no reservation, nothing on
        probation or in its grace period."""
        return (
            self.reservation is None
            and not self.sources
            and not self._candidates
            and not self._ended
        )


#: Datagrams read from one port per wake-up at most, so one flooded port cannot starve the loop.
_READS_PER_WAKEUP = 256
_MAX_DATAGRAM = 2048


def bind_udp(
    host: str, port: int, receive_buffer_bytes: int | None = RECEIVE_BUFFER_BYTES
) -> socket.socket:
    """A non-blocking UDP socket bound to ``host:port`` (IPv6 if ``host`` is an IPv6 literal),
    its receive buffer asked to be ``receive_buffer_bytes`` (``None``: the kernel's default).
    ``OSError`` (the port in use, say) with nothing left open."""
    sock = socket.socket(_family(host), socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        if receive_buffer_bytes is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer_bytes)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def _family(host: str) -> socket.AddressFamily:
    """IPv6 for an IPv6 literal (it has colons), else IPv4: the socket's family and its table."""
    return socket.AF_INET6 if ":" in host else socket.AF_INET


class PortReader:
    """Reads a port's socket each time the event loop finds it readable (``drain``). The
    port's ``handle`` (IPv4) or ``datagram_received`` (IPv6) is taken when the reader is made,
    at the server's start: a later patch of the port's methods does not reach IPv4's reads."""

    __slots__ = ("_deliver", "_fd", "_port", "_recvfrom", "_waiting")

    def __init__(self, sock: socket.socket, proto: RtpPort) -> None:
        self._recvfrom = sock.recvfrom
        self._fd = sock.fileno()
        self._port = proto.port
        # An IPv4 socket's ``recvfrom`` gives the ``Address`` itself, so ``handle`` takes it as
        # it is; IPv6's (host, port, flowinfo, scope_id) goes through ``datagram_received``.
        self._deliver: Callable[[bytes, Any], None] = (
            proto.handle if sock.family == socket.AF_INET else proto.datagram_received
        )
        self._waiting = array.array("i", [0])  # ``FIONREAD``'s answer

    def drain(self) -> None:
        """Hand every datagram waiting on the socket to its port, up to ``_READS_PER_WAKEUP``.

        asyncio's datagram transport reads one datagram per event-loop iteration, so with few
        ports and many calls each packet paid for a whole iteration (``select`` and the
        scheduling around it) and waited in the socket's queue for its turn
        (``benchmarks/load.py``: p99 37 ms from ``sendto`` to handled, 200 calls on 4 ports).
        Draining pays for one wake-up per batch.

        The batch ends at the read that finds nothing, which raises ``BlockingIOError``: about
        1.5 µs on the 2-core Xeon, where a read is 1.4. Callers whose packets fall due at
        independent moments (one port per call, or few calls) mostly find one datagram per
        wake-up, and paid that twice for each. So after the first datagram the kernel is asked
        whether another waits (``FIONREAD``, ≈ 0.5 µs, ``socket(7)``: the size of the next
        datagram on Linux, the bytes waiting on BSD): if none, the batch ends without the
        failed read. A next datagram of zero bytes reads as none: it waits for the next
        wake-up, which the loop makes at once (the socket is still readable)."""
        recvfrom, deliver = self._recvfrom, self._deliver
        first = True
        for _ in range(_READS_PER_WAKEUP):
            try:
                data, addr = recvfrom(_MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # an ICMP error for a datagram sent earlier: not fatal
                log.debug("rtp_socket_error", port=self._port, error=str(exc))
                continue
            deliver(data, addr)
            if first:
                first = False
                fcntl.ioctl(self._fd, termios.FIONREAD, self._waiting)
                if not self._waiting[0]:
                    return


def _via(port: RtpPort, data: bytes, addr: Address) -> None:
    port.transmit(data, addr)


def _transmit(sock: socket.socket, proto: RtpPort, data: bytes, addr: Address) -> None:
    """Send from the port's own socket (symmetric RTP); a full send buffer or an ICMP error
    loses the datagram, counted (``send_failed``) as the network would lose it."""
    try:
        sock.sendto(data, addr)
    except OSError as exc:
        proto._count(None, "send_failed", error=str(exc))


def _ssrcs(pkt: RtcpPacket) -> tuple[int, ...]:
    """The sources an RTCP packet speaks for (SR: its sender; BYE: those leaving)."""
    if isinstance(pkt, Bye):
        return pkt.ssrcs
    if isinstance(pkt, SenderReport):
        return (pkt.ssrc,)
    return ()


class RtpServer:
    """Every port of a range, bound on one host; a free-port queue for the calls API, and the
    sweeper that ends silent calls. Ports report activity, so the sweep visits only busy ones."""

    def __init__(
        self,
        host: str,
        ports: tuple[int, int],
        new_call: CallFactory,
        clock: Clock,
        inactivity_timeout_s: float,
        no_media_timeout_s: float = 30.0,
        policy: PortPolicy | None = None,
        receive_buffer_bytes: int = RECEIVE_BUFFER_BYTES,
    ) -> None:
        self.host = host
        self.receive_buffer_bytes = receive_buffer_bytes
        self.policy = dataclasses.replace(
            policy or PortPolicy(), inactivity_s=inactivity_timeout_s, no_media_s=no_media_timeout_s
        )
        self.port_range = ports
        self._new_call = new_call
        self._clock = clock
        self.ports: dict[int, RtpPort] = {}
        self._counts: Counts = {}
        self._free: deque[RtpPort] = deque()
        self._active: set[RtpPort] = set()
        self._sockets: list[socket.socket] = []
        self._sweeper: asyncio.Task[None] | None = None
        self._next_drops_check = 0.0
        self._inodes: frozenset[int] = frozenset()
        #: What the kernel granted of ``receive_buffer_bytes`` to each port (known once started).
        self.receive_buffer_granted: int | None = None
        self._drops_unreadable = False
        self._sweep_faults: set[str] = set()  # what has failed in a sweep (logged once each)

    async def start(self) -> None:
        lo, hi = self.port_range
        try:
            for port in range(lo, hi + 1):
                self._open(port)
        except BaseException:  # the ports bound so far are let go
            await self.stop()
            raise
        for proto in self.ports.values():
            proto.transmit_rtcp = functools.partial(_via, self.ports.get(proto.port + 1, proto))
        for proto in sorted(self.ports.values(), key=lambda p: (p.port % 2, p.port)):
            self._enqueue(proto)  # even numbers first: RTCP goes to port + 1
        self._inodes = socket_inodes(self._sockets)
        self._sweeper = asyncio.create_task(self._sweep(), name="rtp-sweeper")
        log.info("rtp_listening", host=self.host, ports=f"{lo}-{hi}")
        self._check_receive_buffer()

    def _open(self, port: int) -> None:
        proto = RtpPort(port, self._new_call, self._clock, self.policy, self._counts)
        try:
            sock = bind_udp(self.host, port, self.receive_buffer_bytes)
        except OSError as exc:
            raise TransportError(
                f"cannot bind RTP port {self.host}:{port}: {exc.strerror or exc}; choose "
                "another range (--rtp-ports, rtp.ports) or stop what holds it"
            ) from exc
        proto.on_rtcp = self._rtcp
        proto.on_active = self._active.add
        proto.transmit = functools.partial(_transmit, sock, proto)
        self.ports[port] = proto
        self._sockets.append(sock)
        asyncio.get_running_loop().add_reader(sock.fileno(), PortReader(sock, proto).drain)

    def _check_receive_buffer(self) -> None:
        """Say so at start when the kernel granted less receive buffer than asked (Linux caps
        ``SO_RCVBUF`` at ``net.core.rmem_max``, then doubles what it granted for its own
        bookkeeping and reports that: ``socket(7)``)."""
        got = self._sockets[0].getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        granted = got // 2 if sys.platform.startswith("linux") else got
        self.receive_buffer_granted = granted
        if granted < self.receive_buffer_bytes:
            log.info(
                "rtp_receive_buffer_capped", asked_bytes=self.receive_buffer_bytes,
                granted_bytes=granted, fix="raise the sysctl net.core.rmem_max to "
                f"{self.receive_buffer_bytes} or more, so a stall of the loop drops no packet",
            )  # fmt: skip

    def _enqueue(self, port: RtpPort) -> None:
        if not port.queued:
            port.queued = True
            self._free.append(port)

    async def _sweep(self) -> None:
        """``sweep`` once a second (a quarter of ``inactivity_s`` if that is shorter), letting
        the loop's other work (the packets that arrived meanwhile) go next after every
        ``SWEEP_SLICE`` sources scanned, whatever ports they are on. The loop stops while it
        scans: whole ports at once (250 sources, ≈ 0.3 ms on the 2-core Xeon, four times a
        second in ``benchmarks/load.py``) held every call's packets that long, and four such
        scans a second of every port at once were most of the packets' p99 latency at 800
        calls (1.5–2.0 ms; 0.7–0.9 a port at a time). With a port per call, one pause per
        port would have been a thousand task steps a sweep."""
        interval = min(SWEEP_S, self.policy.inactivity_s / 4)
        while True:
            await asyncio.sleep(interval)
            budget = SWEEP_SLICE  # sources (or ports' other state) to scan before a pause
            for port in list(self._active):
                try:
                    addrs = list(port.sources)  # (the keys only: no new tuples to collect)
                    for start in range(0, len(addrs), SWEEP_SLICE):
                        if budget <= 0:
                            await asyncio.sleep(0)
                            budget = SWEEP_SLICE
                        chunk = addrs[start : start + SWEEP_SLICE]
                        port.expire_sources(chunk, self._clock.monotonic())
                        budget -= len(chunk)
                    port.expire_others(self._clock.monotonic())
                    self._release_if_free(port)
                    budget -= 1
                except Exception:  # a bug met on one port must not stop the sweep of the rest
                    self._sweep_failed(f"port {port.port}")
                if budget <= 0:
                    await asyncio.sleep(0)
                    budget = SWEEP_SLICE
            now = self._clock.monotonic()
            if now >= self._next_drops_check:
                self._next_drops_check = now + DROPS_CHECK_S
                try:
                    await self.count_socket_drops()
                except Exception:
                    self._sweep_failed("socket drops")

    def _sweep_failed(self, what: str) -> None:
        """A bug met by the sweep: the traceback is logged the first time for each ``what``,
        then only counted in debug lines (the sweep runs every second)."""
        if what in self._sweep_faults:
            log.debug("rtp_sweep_failed", what=what)
        else:
            self._sweep_faults.add(what)
            log.exception("rtp_sweep_failed", what=what)

    async def count_socket_drops(self) -> int:
        """Reads the kernel's drop counters of the ports' sockets (``udp_drops``, in a worker
        thread: the host's whole table is read) into ``totals()["receive_buffer_full"]`` and
        returns how many are new; new ones are logged with the fix. A call charged with none of
        them sees each as a sequence gap (``lost``). Where the counters cannot be read (not
        Linux) that is said once, and nothing is counted."""
        tables = (PROC_NET_UDP[_family(self.host)],)
        table = await asyncio.to_thread(read_drops, self._inodes, tables)
        if table is None:
            if not self._drops_unreadable:
                self._drops_unreadable = True
                log.info(
                    "rtp_socket_drops_unreadable", tables=[str(t) for t in tables],
                    consequence="datagrams the kernel drops from a full receive buffer are "
                    "not counted (receive_buffer_full); the calls see them as network loss",
                )  # fmt: skip
            return 0
        total = sum(table.values())
        new = total - self._counts.get(RECEIVE_BUFFER_FULL, 0)
        if new > 0:
            self._counts[RECEIVE_BUFFER_FULL] = total
            log.warning(
                "rtp_receive_buffer_overflow", dropped=new, total=total,
                fix="the event loop fell behind its sockets: carry fewer calls per process, or "
                "raise rtp.receive_buffer_bytes (and the sysctl net.core.rmem_max that caps "
                "it); if the buffers are large already, UDP's memory as a whole ran out: raise "
                "the sysctl net.ipv4.udp_mem",
            )  # fmt: skip
        return max(new, 0)

    def sweep(self, now: float) -> None:
        """End silent calls and free ports, visiting only the ports with something going on."""
        for port in list(self._active):
            self._expire(port, now)

    def _expire(self, port: RtpPort, now: float) -> None:
        port.expire(now)
        self._release_if_free(port)

    def _release_if_free(self, port: RtpPort) -> None:
        """A port with nothing left to sweep leaves the sweep set and rejoins the free queue."""
        if port.free:
            self._active.discard(port)
            self._enqueue(port)

    def allocate(self) -> RtpPort:
        """A free port for an API-created call, from the queue (even numbers first). A queued
        port that a first-packet call took meanwhile is skipped; it returns when idle again."""
        while self._free:
            port = self._free.popleft()
            port.queued = False
            self._active.add(port)  # swept back into the queue if it is never reserved
            if port.free:
                return port
        lo, hi = self.port_range
        raise TransportError(f"no free RTP port in {lo}-{hi}")

    def release(self, port: RtpPort) -> None:
        """Give back an allocated port that was never reserved (the request was refused): it
        is the next one allocated."""
        if port.free and not port.queued:
            port.queued = True
            self._free.appendleft(port)

    def _rtcp(self, port: RtpPort, source: Address, packets: list[RtcpPacket]) -> None:
        """A sender's BYE ends its call; its sender reports are counted on the call. RTCP about a
        call from anywhere but its latched source is dropped and counted (``foreign_rtcp``).
        Looked up by SSRC on this port (rtcp-mux) and the one below (RFC 3550 §11: port + 1)."""
        named = {ssrc for p in packets for ssrc in _ssrcs(p)}
        for media in (port, self.ports.get(port.port - 1)):
            for ssrc in named if media is not None else ():
                assert media is not None
                addr = media.by_ssrc.get(ssrc)
                if addr is not None and addr in media.sources:
                    self._rtcp_for(media, addr, source, [p for p in packets if ssrc in _ssrcs(p)])

    def _rtcp_for(
        self, media: RtpPort, addr: Address, source: Address, packets: list[RtcpPacket]
    ) -> None:
        call = media.sources[addr].call
        if not rtcp_source_ok(addr, source):
            call.count_dropped("foreign_rtcp", source=f"{source[0]}:{source[1]}")
        elif any(isinstance(p, Bye) for p in packets):
            media.end(addr, "bye")
        else:
            stats = call.transport_stats
            stats["sender_reports"] = stats.get("sender_reports", 0) + len(packets)

    def totals(self) -> dict[str, int]:
        """Packets no call could be charged with, by reason (no call on the port, or the call's
        ``call.ended`` already published): ``unvalidated``, ``unknown_payload_type``,
        ``malformed``, ``call_refused``, ``after_end``, ``over_buffer_limit``, and
        ``receive_buffer_full`` (read every ``DROPS_CHECK_S``: ``count_socket_drops``)."""
        return dict(self._counts)

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        try:
            if self._inodes:
                await self.count_socket_drops()
        finally:  # even if stopping is cancelled while the counters are read
            loop = asyncio.get_running_loop()
            for sock in self._sockets:
                loop.remove_reader(sock.fileno())
                sock.close()
            self._sockets = []
