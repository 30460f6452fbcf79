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

This reaches into aiortc's private receiver state (two name-mangled attributes), as
``receive_encoded`` says; ``test_webrtc_session`` drives a real aiortc receiver through each
way packets arrive and the decoder stops, and ``test_webrtc`` counts the packets a browser
sends against those the call took, so an aiortc change that moves either fails loudly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiortc import RTCRtpReceiver

from voxphone.call import Call
from voxphone.transports.jitter import JitterBuffer
from voxphone.transports.rtp_packet import RtpPacket

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
        try:
            self._on_packet()
            self._take(call, packet)
        except Exception as exc:
            call.count_dropped("internal_error", error=repr(exc))
        return False, None

    def _take(self, call: Call, packet: Any) -> None:
        seq = packet.sequence_number
        if packet.ssrc != self._ssrc:
            if self._ssrc is not None:
                self.flush()
                call.discontinuity()
                call.transport_stats["restarts"] = call.transport_stats.get("restarts", 0) + 1
            self._ssrc = packet.ssrc
        if self._buffer.take_next(seq):  # in order, nothing waiting: straight on
            call.push_packet(packet.timestamp, packet._data)
        else:
            pkt = RtpPacket(packet.payload_type, seq, packet.timestamp, packet.ssrc, packet._data)
            for p in self._buffer.push(pkt):
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


def stop_decoder(receiver: RTCRtpReceiver) -> bool:
    """Stop the decoder (the track ends after the call's last packet); ``False`` if it was
    stopped already."""
    if getattr(receiver, _PRIVATE + "decoder_thread", None) is None:
        return False
    getattr(receiver, _PRIVATE + "stop_decoder")()
    return True
