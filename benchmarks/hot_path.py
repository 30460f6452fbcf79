"""Per-packet cost of the RTP and WebRTC ingress hot paths, and the latency the resampler adds.

Prints, for 20 ms G.711 packets: RTP parse, and parse + decode + timeline + resample + framing,
in microseconds per packet, and what that means in calls per core (50 packets/s per call). For
WebRTC, the 20 ms 48 kHz stereo frames aiortc hands over: voxphone's part (downmix + timeline +
resample + framing) and, for scale, aiortc's Opus decode of the same audio.

    python benchmarks/hot_path.py
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from fractions import Fraction

import av
import numpy as np
import structlog

from voxphone.audio.codecs import OPUS, PCMU
from voxphone.audio.pipeline import AudioPipeline
from voxphone.audio.resample import Resampler
from voxphone.call import Call
from voxphone.clock import FakeClock
from voxphone.testing import rtp_packets
from voxphone.transports.rtp import RtpPort
from voxphone.transports.rtp_packet import parse_rtp
from voxphone.transports.webrtc import media_timestamp, to_mono

SECONDS = 60


class _Null:
    def publish(self, event: object) -> None:
        pass


def speechlike(seconds: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    t = np.arange(seconds * 8000) / 8000
    return (np.sin(2 * np.pi * 220 * t) * 6000 + rng.normal(0, 800, t.size)).astype(np.int16)


def per_packet_us(make_fn, items: list) -> float:  # type: ignore[no-untyped-def,type-arg]
    """Best of three passes, each with fresh state (a replay would only hit the late path)."""
    best = float("inf")
    for _ in range(3):
        fn = make_fn()
        t0 = time.perf_counter()
        for item in items:
            fn(item)
        best = min(best, (time.perf_counter() - t0) / len(items) * 1e6)
    return best


def main() -> None:
    # No engine drains the call's frame queue here, so frames take the drop-oldest path (and
    # would log it): the RtpPort figure is an upper bound. Keep the log quiet.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    wire = [p.serialize() for p in rtp_packets(speechlike(SECONDS), PCMU, seed=1)]
    parse_us = per_packet_us(lambda: parse_rtp, wire)

    def full() -> Callable[[bytes], object]:
        pipe = AudioPipeline(PCMU)

        def one(data: bytes) -> object:
            pkt = parse_rtp(data)
            return pipe.push_packet(pkt.timestamp, pkt.payload)

        return one

    full_us = per_packet_us(full, wire)

    def port() -> Callable[[bytes], object]:
        """The whole per-datagram path of a live call: RtpPort.handle → jitter buffer → Call."""
        clock = FakeClock()
        rtp = RtpPort(
            40000, lambda codec, meta: Call("c", codec, _Null(), clock, transport="rtp"), clock
        )
        return lambda data: rtp.handle(data, ("192.0.2.1", 5004))

    port_us = per_packet_us(port, wire)
    print(f"packets: {len(wire)} x 20 ms PCMU")
    print(f"rtp parse:                          {parse_us:6.2f} us/packet")
    print(f"parse+decode+resample+frame:        {full_us:6.2f} us/packet")
    print(
        f"RtpPort.handle (all of the above + jitter buffer + call queue): {port_us:6.2f} us/packet"
    )
    print(f"=> calls per core (audio path only): {1e6 / (port_us * 50):8.0f}")

    webrtc()

    r = Resampler(8000, 16000)
    lag = []
    fed = out = 0
    for chunk in np.split(speechlike(4), 200):
        fed += chunk.size * 2
        out += r.process(chunk).size
        lag.append((fed - out) / 16)
    print(
        f"resampler (soxr HQ 8k->16k) lag:    mean {np.mean(lag):5.1f} ms, max {max(lag):5.1f} ms"
    )


def webrtc() -> None:
    """aiortc's frames (s16 stereo 48 kHz, 20 ms) through voxphone's side of a browser call."""
    t = np.arange(SECONDS * 48000) / 48000
    mono = (np.sin(2 * np.pi * 220 * t) * 6000).astype(np.int16)
    stereo = np.repeat(mono, 2).reshape(-1, 1920)  # 960 samples x 2 channels, interleaved
    encoder = av.CodecContext.create("libopus", "w")
    encoder.sample_rate, encoder.layout, encoder.format = 48000, "stereo", "s16"
    frames, packets = [], []
    for i, row in enumerate(stereo):
        frame = av.AudioFrame.from_ndarray(row.reshape(1, -1), format="s16", layout="stereo")
        frame.sample_rate, frame.pts, frame.time_base = 48000, i * 960, Fraction(1, 48000)
        frames.append(frame)
        packets += encoder.encode(frame)

    def ours() -> Callable[[av.AudioFrame], object]:
        call = Call("c", OPUS, _Null(), FakeClock(), transport="webrtc")
        return lambda f: call.push_pcm(media_timestamp(f, 48000), to_mono(f))

    def aiortc_decode() -> Callable[[av.Packet], object]:
        decoder = av.CodecContext.create("libopus", "r")
        decoder.sample_rate, decoder.layout, decoder.format = 48000, "stereo", "s16"
        return lambda p: decoder.decode(p)

    ours_us = per_packet_us(ours, frames)
    decode_us = per_packet_us(aiortc_decode, packets)
    print(f"webrtc frames: {len(frames)} x 20 ms opus 48 kHz stereo")
    print(f"downmix+timeline+resample+frame (voxphone): {ours_us:6.2f} us/frame")
    print(f"opus decode (aiortc's decoder thread):      {decode_us:6.2f} us/frame")
    print(f"=> calls per core (audio path only): {1e6 / ((ours_us + decode_us) * 50):8.0f}")


if __name__ == "__main__":
    main()
