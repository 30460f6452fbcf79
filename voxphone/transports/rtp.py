"""Plain RTP ingress (RFC 3550): sans-I/O packet parsing plus a thin asyncio UDP endpoint.

A call is created by the first packets of a new source on any port of the configured range and
ends after a period of silence on the wire. A new source must first pass RFC 3550 §A.1 probation
(two packets with consecutive sequence numbers), so a flood of random datagrams never creates a
call; once a source is latched, packets from it with another SSRC are dropped and counted, and so
is RTCP about the call from anywhere but that source (a stranger's BYE must not hang it up).
"""

from __future__ import annotations

import asyncio
import functools
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field

import structlog

from voxphone.audio.codecs import STATIC_PAYLOAD_TYPES, Codec
from voxphone.call import Call
from voxphone.clock import Clock
from voxphone.errors import TransportError
from voxphone.transports.dtmf import DtmfReceiver
from voxphone.transports.jitter import JitterBuffer
from voxphone.transports.rtcp import Bye, RtcpPacket, SenderReport, parse_rtcp
from voxphone.transports.rtp_packet import RtpPacket, is_rtcp, parse_rtp

log = structlog.get_logger(__name__)

Address = tuple[str, int]
COMFORT_NOISE_PT = 13


def rtcp_source_ok(rtp: Address, rtcp: Address) -> bool:
    """Whether RTCP from ``rtcp`` may speak for the stream latched from ``rtp``: the same address
    (RFC 5761 mux, or a sender that uses one socket) or its port + 1 (RFC 3550 §11). A gateway
    whose RTCP leaves from anywhere else has its BYE dropped, and its calls end on inactivity."""
    return rtcp[0] == rtp[0] and rtcp[1] in (rtp[1], rtp[1] + 1)


CallFactory = Callable[[Codec, dict[str, object]], Call | None]


@dataclass
class RtpStats:
    """Counters of one port (all ports are summed for reporting)."""

    received: int = 0
    malformed: int = 0
    rtcp: int = 0
    unsupported_payload: int = 0
    foreign_ssrc: int = 0
    on_probation: int = 0
    rejected_calls: int = 0
    ssrc_changes: int = 0
    foreign_source: int = 0
    relatched: int = 0
    after_bye: int = 0
    foreign_rtcp: int = 0  # RTCP naming a call's SSRC from another source, dropped


@dataclass
class _Candidate:
    """A source (or a new SSRC of a known one) on RFC 3550 §A.1 probation."""

    ssrc: int
    sequence: int
    packets: list[RtpPacket] = field(default_factory=list)

    def confirms(self, pkt: RtpPacket) -> bool:
        return pkt.ssrc == self.ssrc and (self.sequence + 1) & 0xFFFF == pkt.sequence


@dataclass(frozen=True)
class PortPolicy:
    """How every port of the range treats media (from the ``[rtp]`` config)."""

    payload_types: Mapping[int, Codec] = field(default_factory=lambda: dict(STATIC_PAYLOAD_TYPES))
    telephone_events: frozenset[int] = frozenset({101})
    jitter_ms: int = 60
    #: On an API-allocated port, a new source may take over once the latched one has been
    #: silent this long (NAT rebinding); ``None`` never.
    relatch_after_s: float | None = None


@dataclass
class Reservation:
    """A port allocated to one call by the API: it latches onto the first valid source (only
    ``expected_ip``, when given) and drops every other source (symmetric RTP)."""

    call: Call
    payload_type: int
    telephone_event: int | None = None
    expected_ip: str | None = None
    created: float = 0.0


@dataclass
class _Session:
    call: Call
    ssrc: int
    payload_type: int
    last_seen: float
    buffer: JitterBuffer
    dtmf: DtmfReceiver = field(default_factory=DtmfReceiver)
    new_ssrc: _Candidate | None = None
    telephone_events: frozenset[int] | None = None  # negotiated; else the port's default
    transit: float | None = None
    jitter: float = 0.0  # RFC 3550 §A.8 interarrival jitter, in RTP clock units


class RtpPort(asyncio.DatagramProtocol):
    """One UDP port: demultiplexes sources into calls. All logic is in ``handle``."""

    MAX_CANDIDATES = 256

    def __init__(
        self,
        port: int,
        new_call: CallFactory,
        clock: Clock,
        policy: PortPolicy | None = None,
    ) -> None:
        self.port = port
        self.policy = policy or PortPolicy()
        self._new_call = new_call
        self._clock = clock
        self.sessions: dict[Address, _Session] = {}
        #: Where parsed RTCP goes, with the port it arrived on and its source; the server
        #: matches it to this port's calls and the previous port's (RTCP is on RTP port + 1).
        self.on_rtcp: Callable[[RtpPort, Address, list[RtcpPacket]], None] | None = None
        self._candidates: OrderedDict[Address, _Candidate] = OrderedDict()
        self._said_bye: dict[Address, int] = {}  # source → the SSRC that sent RTCP BYE
        self.reservation: Reservation | None = None
        self.stats = RtpStats()

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        self.handle(data, (str(addr[0]), int(addr[1])))

    def handle(self, data: bytes, addr: Address) -> None:
        self.stats.received += 1
        if is_rtcp(data):
            self._rtcp(data, addr)
            return
        try:
            pkt = parse_rtp(data)
        except TransportError:
            self.stats.malformed += 1
            return
        session = self.sessions.get(addr)
        if session is None and self.reservation is not None:
            self._latch(self.reservation, pkt, addr)
        elif session is None:
            if self._said_bye.get(addr) == pkt.ssrc:
                self.stats.after_bye += 1  # stragglers of a stream that hung up
                return
            self._probation(pkt, addr)
        elif pkt.ssrc != session.ssrc:
            self._ssrc_change(session, pkt)
        else:
            session.last_seen = self._clock.monotonic()
            if pkt.payload_type == session.payload_type:
                self._arrival(session, pkt)
            self._play(session, [pkt])

    def _rtcp(self, data: bytes, addr: Address) -> None:
        try:
            packets = parse_rtcp(data)
        except TransportError:
            self.stats.malformed += 1
            return
        self.stats.rtcp += 1
        if self.on_rtcp is not None:
            self.on_rtcp(self, addr, packets)

    def _arrival(self, session: _Session, pkt: RtpPacket) -> None:
        """RFC 3550 §A.8: smoothed variation of transit time, the jitter a receiver reports."""
        transit = session.last_seen * session.call.codec.clock_rate - pkt.timestamp
        if session.transit is not None:
            d = abs(transit - session.transit)
            if d < session.call.codec.clock_rate:  # not across a timestamp jump or wrap
                session.jitter += (d - session.jitter) / 16
        session.transit = transit

    def _ssrc_change(self, session: _Session, pkt: RtpPacket) -> None:
        """A new SSRC from the latched address (re-INVITE, transfer, a media server switch) is
        the same call after a discontinuity, once it passes probation; a stray packet is not."""
        cand = session.new_ssrc
        if cand is None or not cand.confirms(pkt):
            self.stats.foreign_ssrc += 1
            session.new_ssrc = _Candidate(pkt.ssrc, pkt.sequence, [pkt])
            return
        self.stats.ssrc_changes += 1
        for ready in session.buffer.flush():
            self._deliver(session, ready)
        session.call.discontinuity()
        session.ssrc, session.new_ssrc = pkt.ssrc, None
        session.last_seen = self._clock.monotonic()
        self._play(session, [*cand.packets, pkt])

    def _latch(self, res: Reservation, pkt: RtpPacket, addr: Address) -> None:
        if res.expected_ip is not None and addr[0] != res.expected_ip:
            self.stats.foreign_source += 1
            return
        if self.sessions and not self._may_relatch():
            self.stats.foreign_source += 1
            return
        if pkt.payload_type != res.payload_type:
            self.stats.unsupported_payload += 1
            return
        if res.expected_ip is None:  # anyone may latch: make them pass probation first
            cand = self._candidates.pop(addr, None)
            if cand is None or not cand.confirms(pkt):
                self.stats.on_probation += 1
                self._candidates[addr] = _Candidate(pkt.ssrc, pkt.sequence, [pkt])
                return
            packets = [*cand.packets, pkt]
        else:
            packets = [pkt]
        self._candidates.clear()
        if self.sessions:  # NAT rebinding: the caller's media now comes from a new address
            self._relatch(res, addr, packets)
            return
        jitter = JitterBuffer(res.call.codec.clock_rate, self.policy.jitter_ms)
        dtmf = frozenset({res.telephone_event}) if res.telephone_event is not None else None
        session = _Session(res.call, pkt.ssrc, pkt.payload_type, self._clock.monotonic(), jitter)
        session.telephone_events = dtmf
        res.call.metadata["remote"] = f"{addr[0]}:{addr[1]}"
        self.sessions[addr] = session
        self._play(session, packets)

    def _may_relatch(self) -> bool:
        """A latched source that has gone quiet for ``relatch_after_s`` may be replaced."""
        after = self.policy.relatch_after_s
        if after is None:
            return False
        (session,) = self.sessions.values()
        return self._clock.monotonic() - session.last_seen >= after

    def _relatch(self, res: Reservation, addr: Address, packets: list[RtpPacket]) -> None:
        ((old_addr, session),) = self.sessions.items()
        for ready in session.buffer.flush():
            self._deliver(session, ready)
        del self.sessions[old_addr]
        self.sessions[addr] = session
        self.stats.relatched += 1
        res.call.metadata["remote"] = f"{addr[0]}:{addr[1]}"
        if packets[0].ssrc != session.ssrc:
            session.ssrc = packets[0].ssrc
            res.call.discontinuity()
        session.last_seen = self._clock.monotonic()
        self._play(session, packets)

    def _play(self, session: _Session, packets: list[RtpPacket]) -> None:
        """Packets through the jitter buffer; whatever comes out in order is delivered."""
        for pkt in packets:
            for ready in session.buffer.push(pkt):
                self._deliver(session, ready)

    def _deliver(self, session: _Session, pkt: RtpPacket) -> None:
        if pkt.payload_type == session.payload_type:
            session.call.push_packet(pkt.timestamp, pkt.payload)
        elif pkt.payload_type in (session.telephone_events or self.policy.telephone_events):
            try:
                digits = session.dtmf.feed(pkt.timestamp, pkt.payload)
            except TransportError:
                self.stats.malformed += 1
                return
            for d in digits:
                session.call.dtmf(d.key, d.duration_ms)
        elif pkt.payload_type != COMFORT_NOISE_PT:
            self.stats.unsupported_payload += 1

    def _probation(self, pkt: RtpPacket, addr: Address) -> None:
        """RFC 3550 §A.1: a source is valid after two packets in sequence."""
        codec = self.policy.payload_types.get(pkt.payload_type)
        if codec is None:
            self.stats.unsupported_payload += 1
            return
        cand = self._candidates.pop(addr, None)
        if cand is None or not cand.confirms(pkt):
            self.stats.on_probation += 1
            self._candidates[addr] = _Candidate(pkt.ssrc, pkt.sequence, [pkt])
            while len(self._candidates) > self.MAX_CANDIDATES:
                self._candidates.popitem(last=False)
            return
        meta: dict[str, object] = {
            "remote": f"{addr[0]}:{addr[1]}",
            "local_port": self.port,
            "ssrc": pkt.ssrc,
        }
        call = self._new_call(codec, meta)
        if call is None:
            self.stats.rejected_calls += 1
            return
        call.hangup = functools.partial(self.hang_up, call)
        jitter = JitterBuffer(codec.clock_rate, self.policy.jitter_ms)
        session = _Session(call, pkt.ssrc, pkt.payload_type, self._clock.monotonic(), jitter)
        self.sessions[addr] = session
        self._play(session, [*cand.packets, pkt])

    def expire(self, now: float, timeout_s: float, no_media_s: float = 30.0) -> None:
        """End calls whose source has been silent for ``timeout_s`` (or, allocated by the API,
        never sent anything for ``no_media_s``); forget finished ones and free their port."""
        for addr, session in list(self.sessions.items()):
            if session.call.done:
                del self.sessions[addr]
            elif now - session.last_seen >= timeout_s:
                self.end(addr, "inactivity")
        res = self.reservation
        if res is not None and (res.call.done or res.call.end_reason is not None):
            self.reservation = None
            self.sessions.clear()
        elif res is not None and not self.sessions and now - res.created >= no_media_s:
            res.call.end("no_media")

    def reserve(self, reservation: Reservation) -> None:
        self.reservation = reservation
        reservation.call.hangup = functools.partial(self.hang_up, reservation.call)

    def hang_up(self, call: Call, reason: str) -> None:
        """End ``call`` from outside (API ``DELETE``, shutdown) as ``end`` does: what its
        jitter buffer holds is played out first."""
        addr = next((a for a, s in self.sessions.items() if s.call is call), None)
        if addr is None:
            call.end(reason)
        else:
            self.end(addr, reason)

    @property
    def free(self) -> bool:
        return self.reservation is None and not self.sessions and not self._candidates

    def end(self, addr: Address, reason: str) -> None:
        """Play out what the jitter buffer holds, then end the call."""
        session = self.sessions.pop(addr)
        if reason == "bye":
            self._said_bye[addr] = session.ssrc
            while len(self._said_bye) > self.MAX_CANDIDATES:
                self._said_bye.pop(next(iter(self._said_bye)))
        for ready in session.buffer.flush():
            self._deliver(session, ready)
        stats = session.call.transport_stats
        stats.update(asdict(session.buffer.stats))
        stats["jitter_ms"] = round(session.jitter * 1000 / session.call.codec.clock_rate)
        session.call.end(reason)


def _same(proto: RtpPort) -> RtpPort:
    return proto


def _ssrcs(pkt: RtcpPacket) -> tuple[int, ...]:
    """The sources an RTCP packet speaks for (SR: its sender; BYE: those leaving)."""
    if isinstance(pkt, Bye):
        return pkt.ssrcs
    if isinstance(pkt, SenderReport):
        return (pkt.ssrc,)
    return ()


def _count(call: Call, key: str, n: int = 1) -> None:
    call.transport_stats[key] = call.transport_stats.get(key, 0) + n


class RtpServer:
    """Every port of a range, bound on one host, and the sweeper that ends silent calls."""

    def __init__(
        self,
        host: str,
        ports: tuple[int, int],
        new_call: CallFactory,
        clock: Clock,
        inactivity_timeout_s: float,
        no_media_timeout_s: float = 30.0,
        policy: PortPolicy | None = None,
    ) -> None:
        self.host = host
        self.no_media_timeout_s = no_media_timeout_s
        self.policy = policy or PortPolicy()
        self.port_range = ports
        self._new_call = new_call
        self._clock = clock
        self._timeout = inactivity_timeout_s
        self.ports: list[RtpPort] = []
        self._transports: list[asyncio.DatagramTransport] = []
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        lo, hi = self.port_range
        for port in range(lo, hi + 1):
            proto = RtpPort(port, self._new_call, self._clock, self.policy)
            try:
                transport, _ = await loop.create_datagram_endpoint(
                    functools.partial(_same, proto), local_addr=(self.host, port)
                )
            except OSError as exc:
                await self.stop()
                raise TransportError(
                    f"cannot bind RTP port {self.host}:{port}: {exc.strerror or exc}; choose "
                    "another range (--rtp-ports, rtp.ports) or stop what holds it"
                ) from exc
            proto.on_rtcp = self._rtcp
            self.ports.append(proto)
            self._transports.append(transport)
        self._sweeper = asyncio.create_task(self._sweep(), name="rtp-sweeper")
        log.info("rtp_listening", host=self.host, ports=f"{lo}-{hi}")

    async def _sweep(self) -> None:
        interval = min(0.25, self._timeout / 4)
        while True:
            await asyncio.sleep(interval)
            now = self._clock.monotonic()
            for port in self.ports:
                port.expire(now, self._timeout, self.no_media_timeout_s)

    def allocate(self) -> RtpPort:
        """A free port for an API-created call: even numbers first (RTCP goes to port + 1)."""
        for port in sorted(self.ports, key=lambda p: (p.port % 2, p.port)):
            if port.free:
                return port
        lo, hi = self.port_range
        raise TransportError(f"no free RTP port in {lo}-{hi}")

    def _rtcp(self, port: RtpPort, source: Address, packets: list[RtcpPacket]) -> None:
        """A sender's BYE ends its call; its sender reports are counted on the call. RTCP about a
        call from anywhere but its latched source is dropped and counted (``foreign_rtcp``)."""
        for media in self._media_ports(port):
            for addr, session in list(media.sessions.items()):
                named = [p for p in packets if session.ssrc in _ssrcs(p)]
                if not named:
                    continue
                if not rtcp_source_ok(addr, source):
                    port.stats.foreign_rtcp += 1
                    _count(session.call, "foreign_rtcp")
                elif any(isinstance(p, Bye) for p in named):
                    media.end(addr, "bye")
                else:
                    _count(session.call, "sender_reports", len(named))

    def _media_ports(self, port: RtpPort) -> list[RtpPort]:
        """The ports whose calls RTCP arriving on ``port`` may concern: itself (rtcp-mux) and
        the RTP port below it (RFC 3550 §11: RTCP goes to RTP port + 1)."""
        index = port.port - self.port_range[0]
        return self.ports[max(0, index - 1) : index + 1]

    def end_all(self, reason: str) -> None:
        """End every RTP call, playing out what each jitter buffer holds first."""
        for port in self.ports:
            for addr in list(port.sessions):
                port.end(addr, reason)

    def totals(self) -> RtpStats:
        total = RtpStats()
        for port in self.ports:
            for name, value in vars(port.stats).items():
                setattr(total, name, getattr(total, name) + value)
        return total

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for transport in self._transports:
            transport.close()
        self._transports = []
