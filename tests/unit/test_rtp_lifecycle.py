"""How RTP calls end and what their media does afterwards; latching when signalling is a hint.

Ports are driven without sockets and swept on a ``FakeClock``; the server tests bind free ports
only and call ``sweep`` themselves.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import time
from typing import Any

import pytest
from structlog.testing import capture_logs

from tests.conftest import free_udp_range
from tests.hooks import until
from tests.unit.test_call import end_by_engine_failure
from tests.unit.test_rtp_port import CALLER, Calls, tone_packets
from voxphone.audio.codecs import PCMU
from voxphone.call import Call
from voxphone.clock import FakeClock, SystemClock
from voxphone.errors import TransportError
from voxphone.testing import capture_events
from voxphone.transports import rtp
from voxphone.transports.rtp import (
    PortPolicy,
    PortReader,
    Reservation,
    RtpPort,
    RtpServer,
    bind_udp,
)
from voxphone.transports.rtp_packet import RtpPacket

GATEWAY = ("192.0.2.5", 17000)  # where the SDP says media comes from
NATTED = ("203.0.113.9", 31000)  # where it really comes from


def reserved(
    clock: FakeClock, *, hint: tuple[str, int] | None = None, expected_ip: str | None = None
) -> tuple[RtpPort, Call, Calls]:
    calls = Calls()
    call = Call("api", PCMU, capture_events(), clock, transport="rtp")
    port = RtpPort(40002, calls, clock)
    port.reserve(Reservation(call, 0, 101, expected_ip, clock.monotonic(), hint))
    return port, call, calls


def send(port: RtpPort, packets: list[RtpPacket], source: tuple[str, int] = CALLER) -> None:
    for p in packets:
        port.handle(p.serialize(), source)


class TestEndedCallsStayEnded:
    @pytest.mark.parametrize("reason", ["hangup", "max_duration"])
    def test_an_api_call_ended_from_above_opens_no_phantom_call(self, reason: str) -> None:
        """After ``DELETE`` (or ``max_duration``, which also goes through ``call.hangup``) the
        gateway's remaining packets are counted ``after_end``; the port is given back only once
        they have stopped for the grace period."""
        clock = FakeClock()
        port, call, calls = reserved(clock)
        pkts = tone_packets(n=100)
        send(port, pkts[:50])
        call.hangup(reason)
        assert call.end_reason == reason
        for p in pkts[50:]:
            clock.advance(0.02)
            port.handle(p.serialize(), CALLER)
            port.expire(clock.monotonic())
        assert calls.calls == [] and port.reservation is not None and not port.free
        assert call.stats.dropped == {"after_end": 50}
        clock.advance(PortPolicy().ended_grace_s)
        port.expire(clock.monotonic())
        assert port.free and port.reservation is None

    def test_a_first_packet_call_hung_up_ignores_its_stream_but_not_a_new_one(self) -> None:
        calls = Calls()
        port = RtpPort(40000, calls, FakeClock())
        send(port, tone_packets(n=10))
        calls.calls[0].hangup("hangup")
        send(port, tone_packets(n=10, first_seq=500))  # the same stream (SSRC), going on
        assert len(calls.calls) == 1
        assert calls.calls[0].stats.dropped == {"after_end": 10}
        fresh = tone_packets(n=2, ssrc=0xC0FFEE)  # a new call from the same address
        send(port, fresh)
        assert len(calls.calls) == 2

    def test_a_call_that_ended_elsewhere_stops_its_media_too(self) -> None:
        """An engine failure ends the call inside; the transport notices at the next packet."""
        calls = Calls()
        port = RtpPort(40000, calls, FakeClock())
        pkts = tone_packets(n=20)
        send(port, pkts[:10])
        calls.calls[0].end("engine_error")
        send(port, pkts[10:])
        assert len(calls.calls) == 1 and calls.calls[0].stats.dropped == {"after_end": 10}


class TestSilence:
    def test_a_signalled_call_survives_a_pause_and_ends_after_the_long_timeout(self) -> None:
        """Silence suppression: 7 s without packets is not a hang-up for an API call; the
        ``no_media_s`` timeout (30 s) is."""
        clock = FakeClock()
        port, call, _ = reserved(clock)
        pkts = tone_packets(n=20)
        send(port, pkts[:10])
        clock.advance(7)
        port.expire(clock.monotonic())
        send(port, pkts[10:])
        assert call.end_reason is None and call.stats.packets == 20
        clock.advance(29.9)
        port.expire(clock.monotonic())
        assert call.end_reason is None
        clock.advance(0.2)
        port.expire(clock.monotonic())
        assert call.end_reason == "no_media"

    def test_a_first_packet_call_keeps_the_short_inactivity_timeout(self) -> None:
        clock = FakeClock()
        calls = Calls()
        port = RtpPort(40000, calls, clock, PortPolicy(inactivity_s=5.0, no_media_s=30.0))
        send(port, tone_packets(n=5))
        clock.advance(5)
        port.expire(clock.monotonic())
        assert calls.calls[0].end_reason == "inactivity"


class TestSignalledAddressesAreHints:
    """Asterisk strictrtp learning: the SDP's address latches at once; behind NAT, the first
    source to pass probation does, and the SDP's address may take over while learning."""

    def test_media_from_behind_nat_latches_after_probation(self) -> None:
        clock = FakeClock()
        port, call, _ = reserved(clock, hint=GATEWAY)
        pkts = tone_packets(n=10)
        send(port, pkts, NATTED)
        assert call.stats.packets == 10
        assert call.metadata["remote"] == "203.0.113.9:31000"
        send(port, tone_packets(n=4, ssrc=0xBAD), ("198.51.100.7", 4000))  # anyone else
        assert call.stats.dropped == {"foreign_source": 4}

    def test_the_signalled_address_latches_at_once_and_may_take_over_while_learning(
        self,
    ) -> None:
        clock = FakeClock()
        port, call, _ = reserved(clock, hint=GATEWAY)
        pkts = tone_packets(n=30)
        send(port, pkts[:10], NATTED)
        clock.advance(1)
        send(port, pkts[10:20], GATEWAY)  # the address the SDP named: it takes over
        assert call.metadata["remote"] == "192.0.2.5:17000"
        assert call.transport_stats["relatched"] == 1 and call.stats.packets == 20
        clock.advance(PortPolicy().learning_s)
        send(port, pkts[20:], NATTED)  # learning is over: the latch holds
        assert call.stats.dropped == {"foreign_source": 10}

    def test_the_json_remote_ip_stays_a_filter(self) -> None:
        clock = FakeClock()
        port, call, _ = reserved(clock, expected_ip="192.0.2.5")
        send(port, tone_packets(n=4), NATTED)
        assert call.stats.packets == 0 and call.stats.dropped == {"foreign_source": 4}
        send(port, tone_packets(n=4), GATEWAY)
        assert call.stats.packets == 4


async def test_the_server_queues_free_ports_and_sweeps_only_busy_ones() -> None:
    """Allocation takes even ports first from a queue; a port comes back to it once its call
    has ended and the grace period is over; packets to idle ports are counted on the server."""
    first, _ = free_udp_range(5)
    lo = first + first % 2  # four ports, the first even
    hi = lo + 3
    clock = FakeClock()
    calls = Calls()
    server = RtpServer("127.0.0.1", (lo, hi), calls, clock, inactivity_timeout_s=5)
    await server.start()
    try:
        evens = [server.allocate(), server.allocate()]
        assert [p.port % 2 for p in evens] == [0, 0]
        call = Call("api", PCMU, capture_events(), clock, transport="rtp")
        evens[0].reserve(Reservation(call, 0, created=clock.monotonic()))
        server.sweep(clock.monotonic())  # the unreserved one goes back to the queue
        odd = server.allocate()
        assert odd.port % 2 == 1
        server.ports[odd.port].handle(RtpPacket(77, 1, 1, 1, b"").serialize(), CALLER)
        assert server.totals() == {"unknown_payload_type": 1}
        call.hangup("hangup")
        clock.advance(PortPolicy().ended_grace_s)
        server.sweep(clock.monotonic())
        ports = [server.allocate() for _ in range(4)]
        assert {p.port for p in ports} == set(range(lo, hi + 1))
        server.release(ports[2])  # a refused request gives its port back at once
        assert server.allocate() is ports[2]
        with pytest.raises(TransportError, match="no free RTP port"):
            server.allocate()
    finally:
        await server.stop()


def test_a_port_reads_every_waiting_datagram_in_one_wake_up() -> None:
    """A burst queued on a port's socket is handed over in one go, in order — not one datagram
    per event-loop iteration (asyncio's transport), which made packets on busy ports queue."""
    lo, _ = free_udp_range(1)
    sock = bind_udp("127.0.0.1", lo)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    seen: list[int] = []
    port = RtpPort(lo, Calls(), FakeClock())
    port.handle = lambda data, addr: seen.append(data[0])  # type: ignore[method-assign]
    reader = PortReader(sock, port)
    try:
        for i in range(100):
            sender.sendto(bytes([i]), ("127.0.0.1", lo))
        reader.drain()
        assert seen == list(range(100))
        reader.drain()  # nothing waiting: returns at once
        assert len(seen) == 100
    finally:
        sender.close()
        sock.close()


def test_a_datagram_of_zero_bytes_ends_a_batch_and_is_read_at_the_next_wake_up() -> None:
    """After a wake-up's first datagram the kernel is asked whether another waits; a datagram
    of zero bytes reads as none, so the batch ends there, and the next wake-up (the socket is
    still readable) reads it and what follows. Nothing is lost or reordered."""
    lo, _ = free_udp_range(1)
    sock = bind_udp("127.0.0.1", lo)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    seen: list[bytes] = []
    port = RtpPort(lo, Calls(), FakeClock())
    port.handle = lambda data, addr: seen.append(data)  # type: ignore[method-assign]
    reader = PortReader(sock, port)
    try:
        for data in (b"one", b"", b"two", b"three"):
            sender.sendto(data, ("127.0.0.1", lo))
        time.sleep(0.05)  # (loopback delivers at once; a margin all the same)
        reader.drain()
        assert seen == [b"one"]
        reader.drain()
        assert seen == [b"one", b"", b"two", b"three"]
        reader.drain()  # nothing waiting
        assert len(seen) == 4
    finally:
        sender.close()
        sock.close()


def test_a_port_on_ipv6_hands_over_each_datagram_with_a_host_and_port_address() -> None:
    """IPv6's ``recvfrom`` gives (host, port, flowinfo, scope_id); the port's sources are keyed
    by (host, port), so the drain hands IPv6 datagrams over through ``datagram_received``."""
    lo, _ = free_udp_range(1)
    try:
        sock = bind_udp("::1", lo)
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    sender = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    seen: list[tuple[bytes, object]] = []
    port = RtpPort(lo, Calls(), FakeClock())
    port.handle = lambda data, addr: seen.append((data, addr))  # type: ignore[method-assign]
    try:
        sender.bind(("::1", 0))
        sender.sendto(b"x", ("::1", lo))
        PortReader(sock, port).drain()
        assert seen == [(b"x", ("::1", sender.getsockname()[1]))]
    finally:
        sender.close()
        sock.close()


async def test_a_call_whose_engine_fails_reports_its_rtp_counters_and_refuses_its_media() -> None:
    """The call ends without the port (its engine failed): ``call.ended.transport`` still has
    the jitter buffer's counters, the packet it held for reordering is counted ``after_end``
    on the call, and the rest of the stream on the port (its ``call.ended`` is out)."""
    calls = Calls()
    counts: dict[str, int] = {}
    port = RtpPort(40000, calls, FakeClock(), counts=counts)
    pkts = tone_packets(n=20)
    send(port, pkts[:9] + pkts[10:11])  # packet 9 is missing: packet 10 is held
    (call,) = calls.calls
    await end_by_engine_failure(call)
    ended = calls.sink.of_type("call.ended")[-1].data
    assert ended["reason"] == "engine_error"
    assert ended["transport"]["reordered"] == 0 and "jitter_ms" in ended["transport"]
    assert ended["stats"]["dropped"] == {"after_end": 1}
    assert port.sources == {}
    send(port, pkts[11:])
    assert counts == {"after_end": 9} and len(calls.calls) == 1


async def test_a_silent_call_is_ended_by_the_sweeper_within_a_sweep_of_its_timeout() -> None:
    """The sweeper runs every quarter of ``inactivity_timeout_s`` (at most ``SWEEP_S``)."""
    lo, hi = free_udp_range(1)
    calls = Calls()
    server = RtpServer("127.0.0.1", (lo, hi), calls, SystemClock(), inactivity_timeout_s=0.4)
    await server.start()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for p in tone_packets(n=5):
                s.sendto(p.serialize(), ("127.0.0.1", lo))
        silent_since = time.monotonic()  # the loop reads the last packet after this
        await until(lambda: bool(calls.calls) and calls.calls[0].stats.packets == 5)
        await until(lambda: calls.calls[0].end_reason is not None, timeout_s=5)
        assert calls.calls[0].end_reason == "inactivity"
        assert 0.4 <= time.monotonic() - silent_since < 0.4 + 0.1 + 1.0  # a sweep + slack
    finally:
        await server.stop()


async def swept(
    monkeypatch: pytest.MonkeyPatch, slice_: int, n_ports: int, n_callers: int
) -> tuple[list[Call], list[object]]:
    """``n_callers`` silent callers on ``n_ports`` ports (in turn), swept until all ended, with
    ``SWEEP_SLICE`` at ``slice_``; returns the calls and what happened, in
    order: the size of each scan (``expire_sources``) and an ``"other"`` for each callback the
    loop ran after one, which it does at the sweep's next pause."""
    monkeypatch.setattr(rtp, "SWEEP_SLICE", slice_)
    lo, hi = free_udp_range(n_ports)
    calls = Calls()
    server = RtpServer("127.0.0.1", (lo, hi), calls, SystemClock(), inactivity_timeout_s=0.2)
    events: list[object] = []
    callers = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(n_callers)]
    await server.start()
    try:
        for port in server.ports.values():

            def recorded(addrs: list[tuple[str, int]], now: float, scan: Any = None) -> None:
                events.append(len(addrs))
                asyncio.get_running_loop().call_soon(events.append, "other")
                scan(addrs, now)

            port.expire_sources = functools.partial(recorded, scan=port.expire_sources)  # type: ignore[method-assign]
        for k, s in enumerate(callers):
            for p in tone_packets(n=3):
                s.sendto(p.serialize(), ("127.0.0.1", lo + k % n_ports))
        await until(lambda: len(calls.calls) == n_callers, timeout_s=5)
        await until(lambda: all(c.end_reason is not None for c in calls.calls), timeout_s=5)
    finally:
        for s in callers:
            s.close()
        await server.stop()
    assert {c.end_reason for c in calls.calls} == {"inactivity"}
    return calls.calls, events


async def test_the_sweep_scans_a_port_a_slice_at_a_time_and_ends_every_silent_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A port's sources are scanned ``SWEEP_SLICE`` at a time, the loop's other callbacks
    (its packets, on a live server) run between the slices, and every silent call ends."""
    _, events = await swept(monkeypatch, 2, n_ports=1, n_callers=5)
    scans = [i for i, e in enumerate(events) if e != "other"]
    assert max(events[i] for i in scans) == 2  # type: ignore[type-var]
    assert all(events[i + 1] == "other" for i in scans[:-1])  # the loop ran in between


async def test_the_sweep_pauses_after_a_slice_of_sources_across_ports(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With a port per call the sweep pauses after ``SWEEP_SLICE`` sources, not after every
    port (a thousand task steps a sweep with a thousand calls), and still ends them all."""
    _, events = await swept(monkeypatch, 3, n_ports=6, n_callers=6)
    marks = "".join("." if e == "other" else "s" for e in events)
    runs = [len(run) for run in marks.split(".")]
    assert 2 <= max(runs) <= 3  # ports share a pause; a pause within every slice's worth


async def test_a_sweep_that_fails_on_one_port_goes_on_with_the_others() -> None:
    """A bug met on one port (here: its scan raises every time), or while reading the drop
    counters, is logged once with its traceback; the other ports' silent calls still end."""
    lo, hi = free_udp_range(2)
    calls = Calls()
    server = RtpServer("127.0.0.1", (lo, hi), calls, SystemClock(), inactivity_timeout_s=0.2)

    def broken(addrs: object, now: float) -> None:
        raise RuntimeError("a bug")

    async def broken_drops() -> int:
        raise RuntimeError("another bug")

    server.count_socket_drops = broken_drops  # type: ignore[method-assign]
    with capture_logs() as logs:
        await server.start()
        try:
            server.ports[lo].expire_sources = broken  # type: ignore[method-assign]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                for port in (lo, hi):
                    for p in tone_packets(n=5):
                        s.sendto(p.serialize(), ("127.0.0.1", port))
            await until(lambda: len(calls.calls) == 2, timeout_s=5)
            on_hi = [c for c in calls.calls if c.metadata["local_port"] == hi]
            await until(lambda: on_hi[0].end_reason is not None, timeout_s=5)
            await asyncio.sleep(0.3)  # more sweeps, failing the same way
        finally:
            del server.count_socket_drops  # stopping reads them once more
            await server.stop()
    assert on_hi[0].end_reason == "inactivity"
    failed = [e for e in logs if e["event"] == "rtp_sweep_failed"]
    tracebacks = sorted(e["what"] for e in failed if e["log_level"] == "error")
    assert tracebacks == [f"port {lo}", "socket drops"]
    assert len(failed) > 2  # the repeats, as debug lines
