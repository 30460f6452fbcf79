"""Datagrams the kernel dropped at a UDP socket (Linux), which the socket's reader never sees.

Linux counts, per socket, each datagram it drops instead of queueing: the last column of
``/proc/net/udp`` and ``/proc/net/udp6`` (``net/ipv4/udp.c``, ``udp4_format_sock``), on the
socket's line, found by its inode. Nearly all are drops at a full receive buffer (``SO_RCVBUF``);
the same counter takes those refused because UDP's memory as a whole (the sysctl
``net.ipv4.udp_mem``) ran out, and datagrams with a bad checksum. That is how a stalled event
loop loses packets: a call sees only a sequence gap, which looks like the network's loss.

A table lists every UDP socket on the host (WebRTC calls' included). ``read_drops`` is meant for
a worker thread: the kernel writes the text while the GIL is free. The parse that keeps the
lines of the inodes asked for is Python, ≈ 0.5 µs a line, and holds the GIL: from a thread it
stalls the loop in slices of at most ``sys.getswitchinterval()`` (5 ms), 3 ms in all on a host
with 5,000 UDP sockets. Linux's ``NETLINK_SOCK_DIAG`` (``SK_MEMINFO_DROPS``, filtered by port in
the kernel) would avoid the parse, for hosts where that matters. Elsewhere than Linux nothing is
read (``None``).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Collection, Iterable
from pathlib import Path

#: The table of UDP sockets of each address family.
PROC_NET_UDP = {socket.AF_INET: Path("/proc/net/udp"), socket.AF_INET6: Path("/proc/net/udp6")}


def socket_inodes(sockets: Iterable[socket.socket]) -> frozenset[int]:
    """The inodes of open ``sockets``: what their lines in the tables are found by."""
    return frozenset(os.fstat(s.fileno()).st_ino for s in sockets if s.fileno() >= 0)


def parse_drops(table: str, inodes: Collection[int]) -> dict[int, int]:
    """``/proc/net/udp``'s text → ``{inode: drops}`` for the sockets of ``inodes`` found in it;
    the header and lines that are not a socket's are skipped. The fields are read from the line's
    end (…, inode, ref, pointer, drops), which splits a fraction of it."""
    drops: dict[int, int] = {}
    for line in table.splitlines()[1:]:
        fields = line.rsplit(None, 4)
        if len(fields) < 5 or not (fields[1].isdigit() and fields[4].isdigit()):
            continue
        if (inode := int(fields[1])) in inodes:
            drops[inode] = int(fields[4])
    return drops


def read_drops(inodes: Collection[int], tables: Iterable[Path]) -> dict[int, int] | None:
    """The drops of the sockets of ``inodes``, from each of ``tables`` that can be read (a host
    booted with ``ipv6.disable=1`` has no ``udp6``); ``None`` when none can (not Linux)."""
    drops: dict[int, int] = {}
    read = False
    for table in tables:
        try:
            text = table.read_text()
        except OSError:
            continue
        read = True
        drops.update(parse_drops(text, inodes))
    return drops if read else None
