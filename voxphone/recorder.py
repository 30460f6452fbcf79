"""What a service sends back to ``voxphone call``: RTP datagrams in, a WAV file out (sans I/O).

Audio packets are decoded in the call's codec and placed by their RTP timestamps (RFC 3550
§5.1), so the silence between talkspurts is kept as silence and a lost packet leaves a gap of
its length; RFC 4733 telephone-events become the digits pressed. Datagrams that are not RTP,
or carry another payload type, are counted, not recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from voxphone.audio.codecs import Codec, Decoder, Pcm
from voxphone.audio.files import write_wav
from voxphone.errors import DecodeError, TransportError
from voxphone.transports.dtmf import DtmfReceiver
from voxphone.transports.rtp_packet import parse_rtp

#: A timestamp this far (seconds) from the first packet's is not placed (a wild sender).
MAX_SPAN_S = 4 * 3600


@dataclass
class RtpRecorder:
    """Collects one stream sent back to a caller; ``telephone_event`` is the events' type."""

    codec: Codec
    payload_type: int
    telephone_event: int = 101
    packets: int = 0
    digits: str = ""
    dropped: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._decoder = Decoder(self.codec)
        self._dtmf = DtmfReceiver(self.codec.clock_rate)
        self._pieces: list[tuple[int, Pcm]] = []  # (offset in samples, audio)
        self._first_ts: int | None = None

    def add(self, datagram: bytes) -> None:
        try:
            pkt = parse_rtp(datagram)
        except TransportError:
            self._drop("not_rtp")
            return
        if pkt.payload_type == self.telephone_event:
            try:
                self.digits += "".join(d.key for d in self._dtmf.feed(pkt.timestamp, pkt.payload))
            except TransportError:
                self._drop("malformed_event")
            return
        if pkt.payload_type != self.payload_type:
            self._drop("other_payload_type")
            return
        try:
            pcm = self._decoder.decode(pkt.payload)
        except DecodeError:
            self._drop("undecodable")
            return
        if self._first_ts is None:
            self._first_ts = pkt.timestamp
        ticks = (pkt.timestamp - self._first_ts) & 0xFFFFFFFF
        offset = ticks * self.codec.sample_rate // self.codec.clock_rate
        if offset > MAX_SPAN_S * self.codec.sample_rate:
            self._drop("timestamp_out_of_range")
            return
        self.packets += 1
        self._pieces.append((offset, pcm))

    def _drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def pcm(self) -> Pcm:
        """The audio received, mono int16 at ``codec.sample_rate``, silence where none came."""
        if not self._pieces:
            return np.zeros(0, np.int16)
        end = max(offset + pcm.size for offset, pcm in self._pieces)
        out = np.zeros(end, np.int16)
        for offset, pcm in self._pieces:
            out[offset : offset + pcm.size] = pcm
        return out

    def write_wav(self, path: Path) -> float:
        """Write the audio as 16-bit mono WAV; returns its length in seconds."""
        return write_wav(path, self.pcm(), self.codec.sample_rate)
