"""Host candidates on chosen interfaces and a UDP port range, for NAT'd servers and containers.

aiortc's ICE agent (aioice) binds every interface on an ephemeral port and has no setting for
either. A container publishes a fixed port range and a cloud VM wants one interface, so for a
peer connection that needs them we replace its agents' gathering step — per connection, before
``setLocalDescription`` gathers — with one that binds in the range. STUN and TURN still work:
server-reflexive candidates come from the bound sockets, relayed ones from aioice as usual.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

import aioice
from aioice import Candidate, ice
from aioice.candidate import candidate_foundation, candidate_priority
from aiortc import RTCPeerConnection

from voxphone.errors import TransportError
from voxphone.transports.rtp import bind_udp


class Unavailable(TransportError):
    """The offer is fine but voxphone can't take the call now (limit, draining, no port)."""


class HostBinder:
    """Binds host-candidate sockets on ``interfaces`` within ``ports`` (shared by all calls)."""

    def __init__(self, interfaces: Sequence[str], ports: tuple[int, int] | None) -> None:
        self.interfaces = interfaces
        self.ports = ports
        self._cursor: Iterator[int] = itertools.cycle(
            range(ports[0], ports[1] + 1) if ports else [0]
        )

    @property
    def active(self) -> bool:
        """Whether aioice's default gathering has to be replaced at all."""
        return bool(self.interfaces) or self.ports is not None

    def apply(self, pc: RTCPeerConnection) -> None:
        """Make every ICE agent of ``pc`` gather through this binder (call before gathering)."""
        if not self.active:
            return
        for connection in _ice_connections(pc):
            connection.get_component_candidates = partial(_gather, connection, self)  # type: ignore[method-assign]

    async def bind(self, connection: aioice.Connection, address: str) -> ice.StunProtocol:
        """A STUN/ICE socket on ``address``: the next free port of the range, or any port.

        The socket is bound here (``rtp.bind_udp``, as RTP ports are) and handed to the loop
        (``sock=``), not bound by ``create_datagram_endpoint(local_addr=…)``: a port in use
        must cost nothing, and uvloop's endpoint leaves an unclosed transport behind each bind
        it fails (uvloop 0.23; test_webrtc's full-range test found it on uvloop's loop)."""
        loop = asyncio.get_running_loop()
        tries = self.ports[1] - self.ports[0] + 1 if self.ports else 1
        for _ in range(tries):
            try:
                sock = bind_udp(address, next(self._cursor), receive_buffer_bytes=None)
            except OSError:
                continue
            try:
                _, protocol = await loop.create_datagram_endpoint(
                    partial(ice.StunProtocol, connection), sock=sock
                )
            except OSError:
                sock.close()
                continue
            except BaseException:
                sock.close()
                raise
            return protocol
        raise Unavailable(f"no free WebRTC UDP port on {address} in {self.ports}")


def _ice_connections(pc: RTCPeerConnection) -> list[aioice.Connection]:
    transports = [t.receiver.transport for t in pc.getTransceivers()]
    if pc.sctp is not None:
        transports.append(pc.sctp.transport)
    agents = {id(t.transport.iceGatherer): t.transport.iceGatherer for t in transports}
    return [gatherer._connection for gatherer in agents.values()]


async def _gather(
    connection: aioice.Connection, binder: HostBinder, component: int, addresses: list[str],
    timeout: int = 5,  # noqa: ASYNC109 -- aioice's signature
) -> list[Candidate]:  # fmt: skip
    """aioice's ``get_component_candidates`` with our own host sockets."""
    candidates: list[Candidate] = []
    protocols: list[ice.StunProtocol] = []
    for address in binder.interfaces or addresses:
        protocol = await binder.bind(connection, address)
        connection._protocols.append(protocol)  # closed with the connection, even on failure
        host, port = protocol.transport.get_extra_info("sockname")[:2]
        protocol.local_candidate = Candidate(
            foundation=candidate_foundation("host", "udp", host),
            component=component,
            transport="udp",
            priority=candidate_priority(component, "host"),
            host=host,
            port=port,
            type="host",
        )
        protocols.append(protocol)
        candidates.append(protocol.local_candidate)
    candidates += await _reflexive(connection, protocols, timeout)
    # TURN: aioice's own gathering with no host addresses does only the relay part.
    relayed: list[Candidate] = await ice.Connection.get_component_candidates(
        connection, component=component, addresses=[], timeout=timeout
    )
    return candidates + relayed


async def _reflexive(
    connection: aioice.Connection, protocols: list[ice.StunProtocol], wait_s: int
) -> list[Candidate]:
    stun: Any = connection.stun_server
    if not stun:
        return []
    tasks = [
        asyncio.create_task(ice.server_reflexive_candidate(p, stun))
        for p in protocols
        if ipaddress.ip_address(p.local_candidate.host).version == 4
    ]
    if not tasks:
        return []
    done, pending = await asyncio.wait(tasks, timeout=wait_s)
    for task in pending:
        task.cancel()
    return [t.result()[0] for t in done if t.exception() is None]
