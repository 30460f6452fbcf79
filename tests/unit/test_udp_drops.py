"""Datagrams the kernel drops from a full receive buffer are counted, not lost without a trace."""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from structlog.testing import capture_logs

from tests.conftest import free_udp_range
from tests.unit.test_rtp_port import Calls
from voxphone.audio.codecs import PCMU
from voxphone.clock import SystemClock
from voxphone.testing import rtp_packets
from voxphone.transports.rtp import RECEIVE_BUFFER_FULL, RtpServer
from voxphone.transports.udp_drops import PROC_NET_UDP, parse_drops, read_drops, socket_inodes

linux = pytest.mark.skipif(sys.platform != "linux", reason="/proc/net/udp is Linux's")

#: Two lines of Linux's /proc/net/udp (kernel 6.x), the second with 42 drops.
TABLE = """\
   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
 1001: 0100007F:9B78 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1244314 2 00000000f5eb6007 0
 1002: 0100007F:9B79 00000000:0000 07 00000000:0000A280 00:00000000 00000000  1000        0 1244315 2 00000000b6dbce89 42
"""


def test_the_drops_column_is_read_by_inode_for_the_sockets_asked() -> None:
    assert parse_drops(TABLE, {1244314, 1244315}) == {1244314: 0, 1244315: 42}
    assert parse_drops(TABLE, {1244315, 7}) == {1244315: 42}
    assert parse_drops(TABLE.splitlines()[0] + "\n  garbage line\n", {1244315}) == {}


def test_a_table_the_host_lacks_is_skipped_and_none_readable_is_none(tmp_path: Path) -> None:
    ipv4 = tmp_path / "udp"
    ipv4.write_text(TABLE)
    missing = tmp_path / "udp6"  # ipv6.disable=1
    assert read_drops({1244315}, [ipv4, missing]) == {1244315: 42}
    assert read_drops({1244315}, [missing]) is None


def drain(sock: socket.socket) -> int:
    """How many datagrams were waiting on ``sock`` (non-blocking), read and thrown away."""
    n = 0
    while True:
        try:
            sock.recv(2048)
        except BlockingIOError:
            return n
        n += 1


@linux
def test_a_full_receive_buffer_drops_are_read_from_the_kernel() -> None:
    sent = 200
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx:
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the kernel's minimum
        rx.bind(("127.0.0.1", 0))
        rx.setblocking(False)
        inodes = socket_inodes([rx])
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
            for _ in range(sent):  # nobody reads
                tx.sendto(b"x" * 172, rx.getsockname())
        # A loaded host may deliver the last of them later (ksoftirqd): wait until all are in.
        queued, deadline = 0, time.monotonic() + 5
        while True:
            table = read_drops(inodes, [PROC_NET_UDP[socket.AF_INET]])
            assert table is not None
            queued += drain(rx)
            if queued + sum(table.values()) >= sent or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        assert sum(table.values()) == sent - queued > 0


@linux
async def test_the_rtp_server_counts_what_its_sockets_dropped_and_says_so() -> None:
    """The loop stalls (here: a blocking sleep) while callers send: what overflowed the port's
    receive buffer is counted in ``totals()`` and logged with the fix; the calls go on."""
    lo, hi = free_udp_range(1)
    calls = Calls()
    server = RtpServer(
        "127.0.0.1", (lo, hi), calls, SystemClock(), inactivity_timeout_s=30,
        receive_buffer_bytes=4096,
    )  # fmt: skip
    await server.start()
    try:
        assert await server.count_socket_drops() == 0
        pcm = (np.sin(np.arange(16000) / 3) * 5000).astype(np.int16)
        packets = list(rtp_packets(pcm, PCMU, seed=4))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for p in packets:  # 100 packets while the loop reads nothing
                s.sendto(p.serialize(), ("127.0.0.1", lo))

        def handled() -> int:
            return calls.calls[0].stats.packets if calls.calls else 0

        new, deadline = 0, time.monotonic() + 5
        with capture_logs() as logs:
            while new + handled() < len(packets) and time.monotonic() < deadline:
                new += await server.count_socket_drops()
                await asyncio.sleep(0.01)  # the loop reads what the buffer held
        assert new > 0 and new + handled() == len(packets)  # what the buffer held makes the call
        assert server.totals()[RECEIVE_BUFFER_FULL] == new
        warnings = [e for e in logs if e["event"] == "rtp_receive_buffer_overflow"]
        assert sum(w["dropped"] for w in warnings) == new
        assert "net.core.rmem_max" in warnings[0]["fix"] and "udp_mem" in warnings[0]["fix"]
        assert await server.count_socket_drops() == 0  # counted once
    finally:
        await server.stop()


async def test_where_the_counters_cannot_be_read_that_is_said_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(PROC_NET_UDP, socket.AF_INET, tmp_path / "no-such-table")
    lo, hi = free_udp_range(1)
    server = RtpServer("127.0.0.1", (lo, hi), Calls(), SystemClock(), inactivity_timeout_s=30)
    await server.start()
    with capture_logs() as logs:
        assert await server.count_socket_drops() == 0
        assert await server.count_socket_drops() == 0
        await server.stop()
    (said,) = [e for e in logs if e["event"] == "rtp_socket_drops_unreadable"]
    assert "receive_buffer_full" in said["consequence"]
    assert RECEIVE_BUFFER_FULL not in server.totals()


def rmem_max() -> int:
    return int(Path("/proc/sys/net/core/rmem_max").read_text())


@linux
@pytest.mark.parametrize("over", [False, True])
async def test_a_receive_buffer_the_kernel_caps_is_reported_at_start(over: bool) -> None:
    """Linux reports twice what it granted: asking between ``rmem_max`` and twice that is capped
    too, and asking ``rmem_max`` exactly is not."""
    if rmem_max() * 3 // 2 >= 2**31:
        pytest.skip("net.core.rmem_max is beyond what SO_RCVBUF can ask for")
    asked = rmem_max() * 3 // 2 if over else rmem_max()
    lo, hi = free_udp_range(1)
    server = RtpServer(
        "127.0.0.1", (lo, hi), Calls(), SystemClock(), inactivity_timeout_s=30,
        receive_buffer_bytes=asked,
    )  # fmt: skip
    with capture_logs() as logs:
        await server.start()
    await server.stop()
    capped = [e for e in logs if e["event"] == "rtp_receive_buffer_capped"]
    if not over:
        assert capped == []
        return
    assert capped[0]["asked_bytes"] == asked and capped[0]["granted_bytes"] == rmem_max()
    assert "net.core.rmem_max" in capped[0]["fix"]
