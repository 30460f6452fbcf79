"""A browser call's audio as RTP payloads: aiortc's receive path up to its jitter buffer, then
voxphone's, as for any RTP call.

aiortc (1.16, ``rtcrtpreceiver.py``) gives each depayloaded packet of a receiver to its
``JitterBuffer``, which holds the newest 4 audio packets (80 ms) and hands the complete ones to
a decoder thread; that thread decodes Opus with FFmpeg to 48 kHz stereo and passes each 20 ms
frame back to the event loop (``run_coroutine_threadsafe``), where it was downmixed and
resampled to 16 kHz. Measured with ``benchmarks/webrtc_calls.py`` under py-spy, the decoder
threads alone were 45 % of a browser call's server CPU. ``EncodedAudio`` takes the jitter
buffer's place: each packet goes through voxphone's jitter buffer (``transports.jitter``: in
order, it is played at once) to ``Call.push_packet``, and the call decodes it as it decodes an
RTP call's (Opus: libopus straight to 16 kHz mono, ``audio.opus``). aiortc's decoder gets
nothing; its thread idles until the receiver stops, and then ends the track as before.

Below that, ``receive_srtp`` takes the call's audio packets from the ICE connection itself, so
they skip aiortc's queue, DTLS task and receiver (see there); other datagrams take aiortc's path.

This reaches into aiortc's and aioice's private state, as ``receive_encoded`` and
``receive_srtp`` say; ``test_webrtc_session`` drives a real aiortc receiver through each way
packets arrive and the decoder stops, and ``test_webrtc`` counts the packets a browser sends
against those the call took, and which path they took, so a change that moves either fails
loudly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import aioice.ice
import pylibsrtp
from aiortc import RTCRtpReceiver
from aiortc.rtcrtpreceiver import StreamStatistics

from voxphone.call import Call
from voxphone.errors import TransportError
from voxphone.transports.jitter import JitterBuffer
from voxphone.transports.rtp_packet import RtpPacket, is_rtcp, parse_rtp

_PRIVATE = "_RTCRtpReceiver__"  # aiortc's name-mangled receiver internals


class EncodedAudio:
    """What aiortc's receiver sees as its jitter buffer (``add``), feeding ``call`` payloads.

    ``on_packet`` is called for every packet (the session's media watchdog). A new SSRC (the
    browser restarted its stream) plays out the old one and re-anchors the call's clock; the
    jitter buffer's counters go to ``call.transport_stats`` when it is flushed (the call ends,
    or the stream restarts)."""

    def __init__(self, call: Call, on_packet: Callable[[], None]) -> None:
        self._call: Call | None = call
        self._on_packet = on_packet
        self._buffer = JitterBuffer(call.codec.clock_rate)
        self._ssrc: int | None = None
        #: Packets taken straight from the ICE connection (``add_srtp``), not through aiortc.
        self.from_ice = 0
        call.on_finish(self._report)  # it may end without us: its engine failed

    def add(self, packet: Any) -> tuple[bool, None]:
        """One of aiortc's ``RtpPacket`` (``rtp.py``), its payload depayloaded into ``_data``.
        Returns what aiortc's ``JitterBuffer.add`` does: (send a PLI, a frame to decode) —
        never either. Never raises: this runs inside aiortc's DTLS receive loop, which an
        exception would end, and the call with it; a packet that fails is counted
        (``internal_error``) and the call goes on."""
        call = self._call
        if call is None:  # the call has ended (``detach``)
            return False, None
        self._play(call, packet.ssrc, packet.sequence_number, packet.timestamp, packet._data)
        return False, None

    def add_srtp(self, session: pylibsrtp.Session, data: bytes) -> RtpPacket | None:
        """One SRTP packet of the call's audio, straight from the ICE connection
        (``receive_srtp``): unprotected (RFC 3711) with the DTLS transport's session, parsed,
        taken as ``add`` takes aiortc's. Never raises (this runs in aioice's datagram callback);
        a packet libsrtp refuses (a replay, a forgery) is counted ``srtp_unprotect_failed``, as
        one that is not RTP is ``malformed`` (aiortc's path dropped both without a count).
        Returns the packet taken, if any."""
        call = self._call
        if call is None:  # the call has ended (``detach``)
            return None
        self.from_ice += 1
        try:
            pkt = parse_rtp(session.unprotect(data))
        except pylibsrtp.Error as exc:
            call.count_dropped("srtp_unprotect_failed", error=str(exc))
            return None
        except TransportError as exc:
            call.count_dropped("malformed", error=str(exc))
            return None
        self._play(call, pkt.ssrc, pkt.sequence, pkt.timestamp, pkt.payload)
        return pkt

    def count_dropped(self, reason: str, **detail: Any) -> None:
        """A datagram of the call's stream that could not be used, counted on the call (until
        it has ended)."""
        if (call := self._call) is not None:
            call.count_dropped(reason, **detail)

    def _play(self, call: Call, ssrc: int, seq: int, timestamp: int, payload: bytes) -> None:
        """One packet heard (the session's watchdog) and taken; a failure is counted
        (``internal_error``), never raised: both callers run inside aiortc's or aioice's
        receive path, which an exception would end."""
        try:
            self._on_packet()
            self._take(call, ssrc, seq, timestamp, payload)
        except Exception as exc:
            call.count_dropped("internal_error", error=repr(exc))

    def _take(self, call: Call, ssrc: int, seq: int, timestamp: int, payload: bytes) -> None:
        if ssrc != self._ssrc:
            if self._ssrc is not None:
                self.flush()
                call.discontinuity()
                call.transport_stats["restarts"] = call.transport_stats.get("restarts", 0) + 1
            self._ssrc = ssrc
        if self._buffer.take_next(seq):  # in order, nothing waiting: straight on
            call.push_packet(timestamp, payload)
        else:
            for p in self._buffer.push(RtpPacket(0, seq, timestamp, ssrc, payload)):
                call.push_packet(p.timestamp, p.payload)

    def flush(self) -> None:
        """Play what the jitter buffer holds: the stream ends or restarts."""
        if (call := self._call) is not None:
            for p in self._buffer.flush():
                call.push_packet(p.timestamp, p.payload)
            call.transport_stats.update(vars(self._buffer.stats))

    def _report(self) -> None:
        """The call is about to publish ``call.ended``: if it ended without the stream's end
        (its engine failed), the counters are reported and what the jitter buffer holds is
        counted ``after_end``; otherwise ``flush`` reported them."""
        if (call := self._call) is not None:
            call.count_dropped("after_end", len(self._buffer.flush()))
            call.transport_stats.update(vars(self._buffer.stats))

    def detach(self) -> None:
        """The call has ended: forget it. aiortc's receiver keeps this object, and the peer
        connection's objects refer to one another, so without this the call (and its audio
        state) would stay alive until the garbage collector's oldest generation is swept,
        where an ended call is otherwise freed at once (``Call._release``)."""
        self._call = None
        self._on_packet = _nothing


def _nothing() -> None:
    pass


#: The receiver's name-mangled attributes this module uses (``_PRIVATE`` + each).
_RECEIVER_INTERNALS = (
    "jitter_buffer", "codecs", "remote_streams", "stop_decoder", "decoder_thread"
)  # fmt: skip


def missing_internals(receiver: RTCRtpReceiver) -> list[str]:
    """What ``receive_encoded`` and ``receive_srtp`` reach into that this aiortc and aioice
    lack, as ``Class.attribute`` (empty: all there), for a ``receiver`` fresh from
    ``addTransceiver``. Checked once at start-up (``WebRtcGateway.start``): should they move in
    a release the pins (``aiortc<1.17``, ``aioice<0.14``) did not keep out, voxphone says so
    before taking a call, rather than with an ``AttributeError`` in each call's set-up."""
    dtls = receiver.transport
    ice = dtls.transport
    connection = getattr(ice, "_connection", None)
    wanted = [
        *((receiver, "RTCRtpReceiver", _PRIVATE + n) for n in _RECEIVER_INTERNALS),
        (dtls, "RTCDtlsTransport", "_rx_srtp"),
        (ice, "RTCIceTransport", "_connection"),
        (connection, "aioice.Connection", "data_received"),
        (connection, "aioice.Connection", "_protocols"),
    ]
    missing = [
        f"{owner}.{name.removeprefix(_PRIVATE)}"
        for obj, owner, name in wanted
        if not hasattr(obj, name)
    ]
    # ``_media_first`` replaces the method aioice defines (every DatagramProtocol has one) and
    # reads the candidate aioice sets on each protocol (declared on the class, set when gathered).
    stun = getattr(aioice.ice, "StunProtocol", None)
    if "datagram_received" not in vars(stun or object):
        missing.append("aioice.StunProtocol.datagram_received")
    if "local_candidate" not in getattr(stun, "__annotations__", {}):
        missing.append("aioice.StunProtocol.local_candidate")
    return missing


def receive_encoded(receiver: RTCRtpReceiver, audio: EncodedAudio) -> None:
    """Put ``audio`` in the place of ``receiver``'s jitter buffer, and make every way aiortc
    stops the receiver's decoder — an RTCP BYE, DTLS closing under it, ``stop()``, voxphone's
    own hang-up — first play what ``audio`` holds, so the track ends after the call's last
    packet has reached the call."""
    getattr(receiver, _PRIVATE + "jitter_buffer")  # (an AttributeError, should aiortc move it)
    setattr(receiver, _PRIVATE + "jitter_buffer", audio)
    stop = getattr(receiver, _PRIVATE + "stop_decoder")

    def flush_then_stop() -> None:
        if getattr(receiver, _PRIVATE + "decoder_thread", None) is not None:
            audio.flush()
        stop()
        audio.detach()

    setattr(receiver, _PRIVATE + "stop_decoder", flush_then_stop)


class _Counted(NamedTuple):
    """What aiortc's ``StreamStatistics.add`` reads of a packet."""

    sequence_number: int
    timestamp: int


#: The largest SRTP datagram libsrtp's binding unprotects (pylibsrtp's buffer: it raises
#: ``ValueError`` beyond); a browser's audio packets are a few hundred bytes.
MAX_SRTP_BYTES = 1500
#: Codecs aiortc's receiver does not hand its jitter buffer: their packets stay on its path.
_NOT_AUDIO = frozenset({"audio/rtx", "audio/telephone-event", "audio/cn", "audio/red"})


def receive_srtp(receiver: RTCRtpReceiver, audio: EncodedAudio) -> None:
    """Take the call's audio packets from the ICE connection itself to ``audio``
    (``EncodedAudio.add_srtp``), below aiortc's DTLS transport; every other datagram (STUN is
    answered before this, DTLS, RTCP, other payload types) goes on to aiortc as before.

    Why: aiortc hands each datagram through an ``asyncio.Queue`` to its DTLS transport's task,
    which unprotects it, parses it into its ``RtpPacket`` (header extensions and all), keeps
    receiver statistics and only then reaches its jitter buffer (``receive_encoded``): a task
    wake-up and three awaits per 20 ms packet of every call. Here a packet is unprotected with
    the same libsrtp session, in the datagram's own callback.

    aiortc's receiver statistics are kept as its path keeps them (``StreamStatistics``: the
    report blocks of its RTCP receiver reports, from which a browser learns the loss its Opus
    encoder adapts to, and ``getStats``' inbound counters); the DTLS transport's byte counts
    are not. The browser's RTCP (sender reports, BYE) still reaches aiortc. This reaches into
    aiortc (1.16) and aioice (0.13): the ICE transport's ``_connection``, its
    ``data_received`` and its sockets' protocols (``_protocols``: media skips their STUN parse,
    ``_media_first``), the DTLS transport's ``_rx_srtp`` (set once the handshake is done: until
    then everything takes aiortc's path) and the receiver's negotiated codecs; an
    ``AttributeError`` says so should they move, and ``test_webrtc`` counts the packets a
    browser sends against those the call took."""
    dtls = receiver.transport
    connection = dtls.transport._connection
    to_aiortc = connection.data_received
    codecs = getattr(receiver, _PRIVATE + "codecs")  # filled in place once DTLS is up
    if not hasattr(dtls, "_rx_srtp"):
        raise AttributeError("aiortc's RTCDtlsTransport has no _rx_srtp: receive_srtp needs it")
    streams = getattr(receiver, _PRIVATE + "remote_streams")  # its RTCP reports' statistics
    ours: dict[int, bool] = {}  # payload type -> whether its packets come here

    def is_ours(pt: int) -> bool:
        codec = codecs.get(pt)
        if codec is None:  # not negotiated (or not yet): aiortc's path decides
            return False
        ours[pt] = codec.mimeType.lower() not in _NOT_AUDIO
        return ours[pt]

    def data_received(data: bytes, component: int) -> None:
        session = dtls._rx_srtp
        # RTP (RFC 7983: first byte 128–191), not RTCP (RFC 5761: second byte 192–223), of
        # an audio payload type: SRTP leaves the header in the clear (RFC 3711 §3.1).
        if session is None or len(data) < 12 or not 127 < data[0] < 192:
            to_aiortc(data, component)
        elif len(data) > MAX_SRTP_BYTES:  # libsrtp's buffer: aiortc's task would die of it
            audio.count_dropped("malformed", error=f"an SRTP datagram of {len(data)} bytes")
        elif is_rtcp(data):
            to_aiortc(data, component)
        else:
            try:
                take(session, data, component)
            except Exception as exc:  # aioice's callback: nothing may escape into it
                audio.count_dropped("internal_error", error=repr(exc))

    def take(session: pylibsrtp.Session, data: bytes, component: int) -> None:
        pt = data[1] & 0x7F  # (the marker bit off)
        if not (ours.get(pt) or (pt not in ours and is_ours(pt))):
            to_aiortc(data, component)
        elif (pkt := audio.add_srtp(session, data)) is not None:
            stream = streams.get(pkt.ssrc)
            if stream is None:
                stream = streams[pkt.ssrc] = StreamStatistics(codecs[pt].clockRate)
            stream.add(_Counted(pkt.sequence, pkt.timestamp))

    connection.data_received = data_received  # type: ignore[method-assign]  # (aioice's hook)
    for protocol in connection._protocols:  # its sockets, gathered before a session starts
        _media_first(protocol, data_received)


def _media_first(protocol: Any, data_received: Callable[[bytes, int], None]) -> None:
    """Make one of aioice's sockets (a ``StunProtocol``) hand RTP and RTCP straight to
    ``data_received``, as it would after trying to parse them as STUN.

    aioice parses every datagram as STUN first and passes it on when that raises: for media,
    a failed parse and an exception per packet, ≈ 6 % of the server's samples in a profile at
    250 browser calls (``benchmarks/results/maxplaybackrate-ab/profile-after-250.txt``: its
    ``parse_message`` and ``StunProtocol.datagram_received``). RFC 7983 §7 tells them
    apart by the first byte: STUN 0–3, DTLS 20–63, RTP and RTCP 128–191. Anything else still
    takes aioice's way (STUN, answered there; DTLS, to aiortc); a relayed (TURN) candidate's
    protocol is reached through the same method. A protocol without a candidate (none gathered
    on it) is left as it is: its datagrams, if any, take aioice's way, only slower."""
    candidate = getattr(protocol, "local_candidate", None)
    if candidate is None:
        return
    stun, component = protocol.datagram_received, candidate.component

    def datagram_received(data: bytes, addr: Any) -> None:
        if data and 127 < data[0] < 192:
            data_received(data, component)
        else:
            stun(data, addr)

    protocol.datagram_received = datagram_received


def stop_decoder(receiver: RTCRtpReceiver) -> bool:
    """Stop the decoder (the track ends after the call's last packet); ``False`` if it was
    stopped already."""
    if getattr(receiver, _PRIVATE + "decoder_thread", None) is None:
        return False
    getattr(receiver, _PRIVATE + "stop_decoder")()
    return True
