"""Per-packet cost of the RTP and WebRTC ingress hot paths, and the latency the audio path adds.

Prints, for 20 ms G.711 packets: each stage alone (RTP parse, decode, timeline, resample,
framing), then parse + decode + timeline + resample + framing, then the whole ``RtpPort.handle``
path (jitter buffer and call queue too), in microseconds per packet, and what that means in
calls per core (50 packets/s per call; no sockets, no event loop: see ``load.py`` for those);
with 300 calls taking turns, also the transport's part alone (up to ``Call.push_packet``).
For WebRTC, the 20 ms Opus packets aiortc's receiver hands over: voxphone's part (jitter
buffer, libopus decode to 16 kHz, timeline, framing).
Last, the added latency: how long after the packet completing an 80 ms frame's audio arrives
the frame leaves the pipeline (in packets of audio), plus the resampler's lead.

    python benchmarks/hot_path.py   # also writes benchmarks/results/hot_path-<machine>.json
    python benchmarks/hot_path.py --out /tmp/hot_path.json   # a scratch run
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import structlog
from aiortc.rtp import RtpPacket as AiortcRtpPacket
from machine import cpu_model, machine_name

from voxphone.audio.codecs import OPUS, PCMU, Codec, Decoder, Encoder
from voxphone.audio.framer import FRAME_MS, Framer, Timeline
from voxphone.audio.pipeline import AudioPipeline
from voxphone.audio.resample import Resampler
from voxphone.call import Call
from voxphone.clock import FakeClock
from voxphone.testing import rtp_packets
from voxphone.transports.rtp import RtpPort
from voxphone.transports.rtp_packet import parse_rtp
from voxphone.transports.webrtc_in import EncodedAudio

SECONDS = 60


class _Null:
    def publish(self, event: object) -> None:
        pass


class _TransportOnly(Call):
    """A call that counts its packets and does nothing else with them: timed through
    ``RtpPort.handle``, what is left is the transport's part (socket side to ``push_packet``)."""

    def push_packet(self, timestamp: int, payload: bytes, codec: Codec | None = None) -> None:
        self.stats.packets += 1


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


def stages(wire: list[bytes]) -> dict[str, float]:
    """Each stage of the RTP path alone, µs per 20 ms packet (resampling is done per 80 ms
    frame by the pipeline, so it is timed on 80 ms chunks and divided by four)."""
    pkts = [parse_rtp(w) for w in wire]
    pcm = [Decoder(PCMU).decode(p.payload) for p in pkts]
    frames_in = [np.concatenate(pcm[i : i + 4]) for i in range(0, len(pcm) - 3, 4)]
    resampled = [Resampler(8000).process(x) for x in pcm]
    return {
        "rtp_parse": per_packet_us(lambda: parse_rtp, wire),
        "decode": per_packet_us(lambda: Decoder(PCMU).decode, [p.payload for p in pkts]),
        "timeline": per_packet_us(
            lambda: (lambda tl: lambda p: tl.place(p.timestamp, 160))(Timeline(8000, 8000)), pkts
        ),
        "resample_per_packet": per_packet_us(lambda: Resampler(8000).process, pcm),
        "resample_per_frame": per_packet_us(lambda: Resampler(8000).process, frames_in) / 4,
        "framing": per_packet_us(lambda: Framer().push, resampled),
    }


def added_latency_ms() -> float:
    """Worst, over 10 s of 20 ms PCMU packets, of the audio that had arrived beyond a frame's
    end when the frame left the pipeline, plus the resampler's lead (ms)."""
    pipe, enc, x = AudioPipeline(PCMU), Encoder(PCMU), speechlike(10)
    worst, frames = 0.0, 0
    for n in range(1, x.size // 160 + 1):
        out = len(pipe.push_packet(n * 160, enc.encode(x[(n - 1) * 160 : n * 160])))
        frames += out
        if out:
            worst = max(worst, n * 20 - frames * FRAME_MS)
    return worst + pipe.resampler.lead / 16


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="JSON path; default: the results' own")
    args = p.parse_args()
    # No engine drains the call's frame queue here, so frames take the drop-oldest path (and
    # would log it): the RtpPort figure is an upper bound. Keep the log quiet.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    load_before = os.getloadavg()
    wire = [p.serialize() for p in rtp_packets(speechlike(SECONDS), PCMU, seed=1)]
    stage_us = stages(wire)

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
    inter_us = interleaved_us(wire, INTERLEAVED)
    transport_us = interleaved_us(wire, INTERLEAVED, _TransportOnly)
    print(f"packets: {len(wire)} x 20 ms PCMU")
    for name, us in stage_us.items():
        print(f"  {name:34} {us:6.2f} us/packet")
    print(f"parse+decode+timeline+resample+frame: {full_us:6.2f} us/packet")
    print(
        f"RtpPort.handle (all of the above + jitter buffer + call queue): {port_us:6.2f} us/packet"
    )
    print(f"=> calls per core (audio path only): {1e6 / (port_us * 50):8.0f}")
    print(f"RtpPort.handle, {INTERLEAVED} calls interleaved:  {inter_us:6.2f} us/packet")
    print(f"  of which the transport (push_packet a no-op): {transport_us:6.2f} us/packet")
    webrtc_us = webrtc()
    latency = added_latency_ms()
    print(f"added latency (frame after its audio, resampler lead included): {latency:.1f} ms")
    result = {
        "machine": machine_name(),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "rtp_pcmu_stage_us_per_packet": {k: round(v, 2) for k, v in stage_us.items()},
        "rtp_pipeline_us_per_packet": round(full_us, 2),
        "rtp_port_handle_us_per_packet": round(port_us, 2),
        "calls_per_core_audio_path_only": round(1e6 / (port_us * 50)),
        f"rtp_port_handle_us_per_packet_{INTERLEAVED}_calls_interleaved": round(inter_us, 2),
        f"rtp_transport_only_us_per_packet_{INTERLEAVED}_calls_interleaved": round(transport_us, 2),
        "webrtc_us_per_packet": webrtc_us,
        "added_latency_max_ms": latency,
    }
    out = args.out or Path(f"benchmarks/results/hot_path-{result['machine']}.json")
    out.write_text(json.dumps(result, indent=2) + "\n")


INTERLEAVED = 300


def interleaved_us(wire: list[bytes], calls: int, call_type: type[Call] = Call) -> float:
    """``RtpPort.handle`` µs per packet with ``calls`` callers taking turns, packet by packet,
    as a server sees them: each call's state is cold in the cache by its next packet, which
    one call alone never shows. Frames are taken from the calls' queues as an engine would.
    ``call_type`` ``_TransportOnly`` leaves out the audio pipeline below ``push_packet``."""
    clock = FakeClock()
    opened: list[Call] = []

    def new_call(codec: object, meta: object) -> Call:
        opened.append(call_type("c", PCMU, _Null(), clock, transport="rtp"))
        return opened[-1]

    rtp = RtpPort(40000, new_call, clock)
    addrs = [("192.0.2.1", 5000 + i) for i in range(calls)]
    streams = [[w[:8] + (1000 + i).to_bytes(4, "big") + w[12:] for w in wire] for i in range(calls)]
    for i in range(calls):  # probation: each source's first packets in a row
        for k in range(3):
            rtp.handle(streams[i][k], addrs[i])
    n = min(len(wire), 1000)
    t0 = time.perf_counter()
    for k in range(3, n):
        for i in range(calls):
            rtp.handle(streams[i][k], addrs[i])
        if k % 4 == 3:
            for call in opened:
                while call._frames:
                    call._frames.popleft()
                    call._queued_at.popleft()
    return (time.perf_counter() - t0) / ((n - 3) * calls) * 1e6


def webrtc() -> dict[str, float]:
    """A browser call's packets (aiortc's ``RtpPacket``, 20 ms of Opus, stereo as a browser
    may send it) through voxphone's side: ``EncodedAudio`` (jitter buffer), libopus to 16 kHz
    mono, timeline, framing. Before, aiortc's decoder thread decoded each to 48 kHz stereo
    and voxphone downmixed and resampled that."""
    t = np.arange(SECONDS * 48000) / 48000
    mono = (np.sin(2 * np.pi * 220 * t) * 6000).astype(np.int16)
    stereo = np.repeat(mono, 2).reshape(-1, 1920)  # 960 samples x 2 channels, interleaved
    encoder = av.CodecContext.create("libopus", "w")
    encoder.sample_rate, encoder.layout, encoder.format = 48000, "stereo", "s16"
    payloads = []
    for i, row in enumerate(stereo):
        frame = av.AudioFrame.from_ndarray(row.reshape(1, -1), format="s16", layout="stereo")
        frame.sample_rate, frame.pts, frame.time_base = 48000, i * 960, Fraction(1, 48000)
        payloads += [bytes(p) for p in encoder.encode(frame)]
    packets = []
    for i, payload in enumerate(payloads):
        packet = AiortcRtpPacket(111, sequence_number=i & 0xFFFF, timestamp=i * 960, ssrc=1)
        packet.payload = packet._data = payload  # type: ignore[attr-defined]  # depayloaded
        packets.append(packet)

    def ours() -> Callable[[AiortcRtpPacket], object]:
        call = Call("c", OPUS, _Null(), FakeClock(), transport="webrtc")
        return EncodedAudio(call, lambda: None).add

    us = per_packet_us(ours, packets)
    print(f"webrtc packets: {len(packets)} x 20 ms opus 48 kHz stereo")
    print(f"jitter buffer+opus decode+timeline+frame (voxphone): {us:6.2f} us/packet")
    return {"voxphone_with_opus_decode": round(us, 2)}


if __name__ == "__main__":
    main()
