"""Datagrams the kernel dropped at a UDP socket (Linux), which the socket's reader never sees.

When a socket's receive buffer (``SO_RCVBUF``) is full, Linux drops each further datagram and
adds one to the socket's ``drops`` counter: the last column of ``/proc/net/udp`` and
``/proc/net/udp6`` (``net/ipv4/udp.c``, ``udp4_format_sock``), on the socket's line, found by its
inode. That is how a stalled event loop loses packets: a call sees only a sequence gap, which
looks like the network's loss. Elsewhere than Linux nothing is read (``None``).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Mapping
from pathlib import Path

#: The tables of UDP sockets, IPv4 and IPv6.
PROC_NET_UDP = (Path("/proc/net/udp"), Path("/proc/net/udp6"))
_INODE, _DROPS = 9, 12  # whitespace-separated fields of a socket's line


def parse_drops(table: str) -> dict[int, int]:
    """``/proc/net/udp``'s text → ``{inode: drops}``; the header and short lines are skipped."""
    drops: dict[int, int] = {}
    for line in table.splitlines()[1:]:
        fields = line.split()
        if len(fields) > _DROPS and fields[_INODE].isdigit() and fields[_DROPS].isdigit():
            drops[int(fields[_INODE])] = int(fields[_DROPS])
    return drops


def read_drops(tables: Iterable[Path] = PROC_NET_UDP) -> dict[int, int] | None:
    """Every UDP socket's drops by inode, or ``None`` where the tables cannot be read."""
    drops: dict[int, int] = {}
    try:
        for table in tables:
            drops.update(parse_drops(table.read_text()))
    except OSError:
        return None
    return drops


def socket_drops(sockets: Iterable[socket.socket], drops: Mapping[int, int]) -> int:
    """The drops of ``sockets`` (open ones) summed, from ``read_drops``'s table."""
    return sum(drops.get(os.fstat(s.fileno()).st_ino, 0) for s in sockets if s.fileno() >= 0)
