"""RTP talk back: a call's ``MediaEndpoint`` (``voxphone.playback``) on its RTP port.

Bot audio is encoded in the call's codec with PyAV (PCMU, PCMA, G.722, Opus, L16: what the call
negotiated or its caller sent) and sent as one packet per 20 ms frame from the call's own port
to its caller's latched address (symmetric RTP, RFC 4961: NATs pass it, and a relatch is
followed); before a caller has latched, to the address its SDP named, if any. Numbering is
``RtpSender`` (own random SSRC, sequence and timestamp; marker at talkspurt start). DTMF goes
out as RFC 4733 telephone-events on the negotiated payload type: a start packet with the
marker, an update every 20 ms with the growing duration, and the end packet three times;
bot audio is not sent meanwhile (a receiver detecting tones must not hear both; counted as
``out_muted_during_dtmf``). The duration field is 16 bits: a key is at most 65535 clock ticks
(1.36 s at a 48 kHz clock) — longer ones are sent that long (``out_dtmf_shortened``). RTCP (RFC 3550
§6.4.1) goes from port + 1 to the caller's port + 1: a sender report with our first packet and
every ``SR_INTERVAL_S`` after, and a BYE when voxphone hangs up.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from voxphone.audio.codecs import Codec, Encoder, Pcm
from voxphone.call import Call
from voxphone.clock import Clock
from voxphone.transports.dtmf import telephone_event
from voxphone.transports.rtcp import bye, sender_report
from voxphone.transports.rtp_packet import Address, RtpPacket, RtpSender

FRAME_MS = 20
#: RFC 4733 §2.5.1.4: the end packet is sent three times, so one loss does not hide it.
END_REPEATS = 3
#: RFC 3550 §6.2: 5 s is the minimum RTCP interval for a two-party session.
SR_INTERVAL_S = 5.0


class RtpEndpoint:
    """The way back from one call to its RTP caller.

    ``transmit(datagram, address)`` sends from the call's port; ``remote(last)`` is where the
    caller is now, given where it was last time (None: nowhere yet — audio is counted
    ``no_remote`` and not sent);
    ``hang_up(reason)`` stops the call's media (the port's ``hang_up``); ``transmit_rtcp``
    sends from the RTCP port.
    """

    def __init__(
        self,
        call: Call,
        codec: Codec,
        payload_type: int,
        telephone_event_pt: int | None,
        transmit: Callable[[bytes, Address], None],
        transmit_rtcp: Callable[[bytes, Address], None],
        remote: Callable[[Address | None], Address | None],
        hang_up: Callable[[str], None],
        clock: Clock,
    ) -> None:
        self.call = call
        self.codec = codec
        self.sample_rate = codec.sample_rate
        self.can_send_dtmf = telephone_event_pt is not None
        self._event_pt = telephone_event_pt
        self._encoder = Encoder(codec)
        frame = codec.clock_rate * FRAME_MS // 1000
        self.sender = RtpSender(payload_type, codec.clock_rate, frame)
        self._transmit = transmit
        self._transmit_rtcp = transmit_rtcp
        #: RFC 7022: a random CNAME per stream, so reports cannot be linked across calls.
        self.cname = f"voxphone-{self.sender.ssrc:08x}"
        self._last_sr: float | None = None
        self._find = remote
        self._last: Address | None = None
        self._hang_up = hang_up
        self._clock = clock  # wall time for sender reports
        self._in_event = False
        self._restart = False  # the next audio packet starts a talkspurt (after an event)

    def send(self, pcm: Pcm, first: bool) -> None:
        if self._in_event:
            self._count("muted_during_dtmf")
            return
        target = self._remote()
        if target is None:
            self._count("no_remote")
            return
        payload = self._encoder.encode(pcm)
        if not payload:  # an encoder still filling its first frame (none of ours at 20 ms)
            return
        loop = asyncio.get_running_loop()
        pkt = self.sender.audio(payload, loop.time(), first or self._restart)
        self._restart = False
        self._send(pkt, target)

    def _remote(self) -> Address | None:
        self._last = self._find(self._last)
        return self._last

    def mark(self, name: str) -> None:
        """No message for it on this transport: ``playback.mark`` says it all."""

    def clear(self) -> None:
        """Nothing to drop: sent packets are gone and RTP has no buffer on this side."""

    async def send_dtmf(self, digit: str, duration_ms: int) -> None:
        """RFC 4733 §2.5: one event, updates every 20 ms, the end three times."""
        if self._event_pt is None:
            return
        loop = asyncio.get_running_loop()
        clock = self.codec.clock_rate
        step = clock * FRAME_MS // 1000
        total = max(step, clock * duration_ms // 1000)
        if total > 0xFFFF:  # RFC 4733 §2.5.1.5: one event's duration is 16 bits
            total = 0xFFFF
            self._count("dtmf_shortened")
        timestamp = self.sender.now_timestamp(loop.time())
        self._in_event = True
        try:
            start = loop.time()
            i = 0
            while True:
                duration = min(total, (i + 1) * step)
                end = duration >= total
                repeats = END_REPEATS if end else 1
                for r in range(repeats):
                    if r:
                        await self._sleep_until(loop, start + (i + r) * FRAME_MS / 1000)
                    payload = telephone_event(digit, duration, end)
                    pkt = self.sender.event(self._event_pt, timestamp, payload, i == 0 and r == 0)
                    target = self._remote()
                    if target is None:
                        self._count("no_remote")
                    else:
                        self._send(pkt, target)
                if end:
                    break
                i += 1
                await self._sleep_until(loop, start + i * FRAME_MS / 1000)
            self.sender.end_event(timestamp, total, loop.time())
        finally:
            self._in_event = False
            self._restart = True

    @staticmethod
    async def _sleep_until(loop: asyncio.AbstractEventLoop, at: float) -> None:
        await asyncio.sleep(max(0.0, at - loop.time()))

    def hangup(self, reason: str) -> None:
        """RTCP BYE for our stream (when one was sent), then the port's hang-up."""
        target = self._remote()
        if target is not None and self.sender.packets:
            report = self._report(asyncio.get_running_loop().time())
            self._transmit_rtcp(report + bye(self.sender.ssrc, reason), _rtcp_of(target))
        self._hang_up(reason)

    def _send(self, pkt: RtpPacket, target: Address) -> None:
        self._transmit(pkt.serialize(), target)
        stats = self.call.transport_stats
        stats["packets_out"] = stats.get("packets_out", 0) + 1
        now = asyncio.get_running_loop().time()
        if self._last_sr is None or now - self._last_sr >= SR_INTERVAL_S:
            self._last_sr = now
            self._transmit_rtcp(self._report(now), _rtcp_of(target))

    def _report(self, now: float) -> bytes:
        s = self.sender
        ts = s.timestamp_at(now)
        return sender_report(
            s.ssrc, self._clock.now().timestamp(), ts, s.packets, s.octets, self.cname
        )

    def _count(self, reason: str) -> None:
        stats = self.call.transport_stats
        stats[f"out_{reason}"] = stats.get(f"out_{reason}", 0) + 1


def _rtcp_of(rtp: Address) -> Address:
    """RFC 3550 §11: RTCP goes to the RTP port + 1 (voxphone's SDP offers no rtcp-mux)."""
    return (rtp[0], rtp[1] + 1)
