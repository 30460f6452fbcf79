"""Datagrams the kernel drops from a full receive buffer are counted, not lost without a trace."""

from __future__ import annotations

import socket
import sys

import numpy as np
import pytest
from structlog.testing import capture_logs

from tests.conftest import free_udp_range
from tests.hooks import until
from tests.unit.test_rtp_port import Calls
from voxphone.audio.codecs import PCMU
from voxphone.clock import SystemClock
from voxphone.testing import rtp_packets
from voxphone.transports.rtp import RECEIVE_BUFFER_FULL, RtpServer
from voxphone.transports.udp_drops import parse_drops, read_drops, socket_drops

linux = pytest.mark.skipif(sys.platform != "linux", reason="/proc/net/udp is Linux's")

#: Two lines of Linux's /proc/net/udp (kernel 6.x), the second with 42 drops.
TABLE = """\
   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
 1001: 0100007F:9B78 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1244314 2 00000000f5eb6007 0
 1002: 0100007F:9B79 00000000:0000 07 00000000:0000A280 00:00000000 00000000  1000        0 1244315 2 00000000b6dbce89 42
"""


def test_the_drops_column_is_read_by_inode() -> None:
    assert parse_drops(TABLE) == {1244314: 0, 1244315: 42}
    assert parse_drops(TABLE.splitlines()[0] + "\n  garbage line\n") == {}


@linux
def test_a_full_receive_buffer_drops_are_read_from_the_kernel() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx:
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the kernel's minimum
        rx.bind(("127.0.0.1", 0))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
            for _ in range(200):  # nobody reads
                tx.sendto(b"x" * 172, rx.getsockname())
        table = read_drops()
        assert table is not None
        queued = 0
        rx.setblocking(False)
        while True:
            try:
                rx.recv(2048)
            except BlockingIOError:
                break
            queued += 1
        assert socket_drops([rx], table) == 200 - queued > 0


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
        assert server.count_socket_drops() == 0
        pcm = (np.sin(np.arange(16000) / 3) * 5000).astype(np.int16)
        packets = list(rtp_packets(pcm, PCMU, seed=4))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for p in packets:  # 100 packets while the loop reads nothing
                s.sendto(p.serialize(), ("127.0.0.1", lo))
        with capture_logs() as logs:
            new = server.count_socket_drops()
        assert new > 0
        assert server.totals()[RECEIVE_BUFFER_FULL] == new
        (warning,) = [e for e in logs if e["event"] == "rtp_receive_buffer_overflow"]
        assert warning["dropped"] == new and "net.core.rmem_max" in warning["fix"]
        assert server.count_socket_drops() == 0  # counted once
        # what the buffer held still makes the call
        await until(
            lambda: bool(calls.calls) and calls.calls[0].stats.packets == len(packets) - new
        )
    finally:
        await server.stop()


async def test_a_receive_buffer_the_kernel_caps_is_reported_at_start() -> None:
    lo, hi = free_udp_range(1)
    asked = 1 << 30  # beyond any net.core.rmem_max
    server = RtpServer(
        "127.0.0.1", (lo, hi), Calls(), SystemClock(), inactivity_timeout_s=30,
        receive_buffer_bytes=asked,
    )  # fmt: skip
    with capture_logs() as logs:
        await server.start()
    await server.stop()
    (capped,) = [e for e in logs if e["event"] == "rtp_receive_buffer_capped"]
    assert capped["asked_bytes"] == asked > capped["got_bytes"] > 0
    assert "net.core.rmem_max" in capped["fix"]
