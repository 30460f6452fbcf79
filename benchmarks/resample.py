"""Choose the streaming resampler by measurement: fidelity, added delay and cost side by side.

Each candidate resamples real speech (synthesised by flite) fed in 20 ms packets, as a call's
audio arrives. For each it reports:

- ``delay_ms``: the input held back after each packet — audio that has arrived but whose
  resampled samples have not come out yet — in ms, mean and max over the packets. That is
  latency added before an 80 ms frame can be handed to the engine. (voxphone's resampler
  starts with a lead of silence instead of holding audio back; the lead counts as delay.)
- ``snr_db``: signal-to-noise ratio of the streamed output (``process`` per packet, then
  ``flush``) against an offline reference: an FFT (ideal band-limited) resample of the whole
  signal at once, ignoring 50 ms at either end.
- ``snr_in_band_db``: the same below 0.85 × the lower Nyquist frequency (3.4 kHz for
  telephone audio, 6.8 kHz from 48 kHz), leaving out each filter's transition band.
- ``us_per_packet``: CPU time per 20 ms packet (best of three passes; noisy on a shared machine);
  for voxphone's also ``us_per_packet_batched_per_frame``, fed 80 ms at a time as the pipeline
  does.

Rates: 8 → 16 kHz (G.711, the common case) and 48 → 16 kHz (Opus, WebRTC).

    python benchmarks/resample.py [out-prefix]   # writes <prefix>.json and <prefix>.png
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import av
import numpy as np
import soxr
from machine import machine_name

from voxphone.audio.codecs import Pcm
from voxphone.audio.files import read_audio
from voxphone.audio.resample import MODEL_RATE, Resampler

TEXT = (
    "Thank you for calling. Please tell me your account number, then describe the problem "
    "in a few words. You can say agent at any time to speak to a person."
)
PACKET_S = 0.02
EDGE_S = 0.05

Chunker = Callable[[Pcm], Pcm]


class SoxrStream:
    """python-soxr's ``ResampleStream`` at one quality (what voxphone used: HQ)."""

    def __init__(self, in_rate: int, out_rate: int, quality: str, vr: bool = False) -> None:
        self._s = soxr.ResampleStream(in_rate, out_rate, 1, dtype="int16", quality=quality, vr=vr)

    def process(self, pcm: Pcm) -> Pcm:
        out: Pcm = self._s.resample_chunk(pcm)
        return out

    def flush(self) -> Pcm:
        out: Pcm = self._s.resample_chunk(np.zeros(0, np.int16), last=True)
        return out


class SwrStream:
    """PyAV's ``AudioResampler`` (FFmpeg's libswresample, default filter), driven directly."""

    def __init__(self, in_rate: int, out_rate: int) -> None:
        self._in_rate = in_rate
        self._r = av.AudioResampler(format="s16", layout="mono", rate=out_rate)

    def _out(self, frames: list[av.AudioFrame]) -> Pcm:
        parts = [f.to_ndarray().reshape(-1) for f in frames]
        return np.concatenate(parts) if parts else np.zeros(0, np.int16)

    def process(self, pcm: Pcm) -> Pcm:
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = self._in_rate
        return self._out(self._r.resample(frame))

    def flush(self) -> Pcm:
        return self._out(self._r.resample(None))


def candidates(in_rate: int) -> dict[str, Callable[[], Any]]:
    out: dict[str, Callable[[], Any]] = {
        f"soxr-{q}": (lambda q=q: SoxrStream(in_rate, MODEL_RATE, q))
        for q in ("QQ", "LQ", "MQ", "HQ", "VHQ")
    }
    out["soxr-HQ vr (variable-rate mode)"] = lambda: SoxrStream(in_rate, MODEL_RATE, "HQ", True)
    out["swr (PyAV AudioResampler)"] = lambda: SwrStream(in_rate, MODEL_RATE)
    out["voxphone Resampler"] = lambda: Resampler(in_rate, MODEL_RATE)
    return out


def speech(rate: int) -> Pcm:
    """Eight seconds or so of flite's rms voice, read at ``rate`` (FFmpeg resamples the file)."""
    wav = Path(tempfile.mkdtemp()) / "speech.wav"
    subprocess.run(["flite", "-voice", "rms", "-t", TEXT, "-o", str(wav)], check=True)
    return read_audio(wav, rate)


def fft_reference(x: Pcm, in_rate: int, out_rate: int) -> np.ndarray:
    """Ideal band-limited resample of the whole signal (zero-padded or truncated spectrum)."""
    n_out = x.size * out_rate // in_rate
    spec = np.fft.rfft(x.astype(np.float64))
    keep = min(spec.size, n_out // 2 + 1)
    out_spec = np.zeros(n_out // 2 + 1, complex)
    out_spec[:keep] = spec[:keep]
    return np.fft.irfft(out_spec, n_out) * (n_out / x.size)


def stream(make: Callable[[], Any], x: Pcm, packet: int, ratio: float) -> tuple[Pcm, list[float]]:
    """Feed ``x`` in packets; the output and the held-back input (ms) after each packet."""
    r = make()
    lead = getattr(r, "lead", 0)  # voxphone's: silence standing in for the filter's lookahead
    parts, held = [], []
    fed, out = 0, -lead
    for i in range(0, x.size - packet + 1, packet):
        y = r.process(x[i : i + packet])
        parts.append(y)
        fed += packet
        out += y.size
        held.append((fed - out / ratio) / (packet / PACKET_S / 1000))
    parts.append(r.flush())
    return np.concatenate(parts)[lead:], held


def snr_db(y: np.ndarray, ref: np.ndarray, edge: int) -> float:
    n = min(y.size, ref.size)
    sig, err = ref[edge : n - edge], y[edge : n - edge].astype(np.float64) - ref[edge : n - edge]
    return float(10 * np.log10(np.sum(sig**2) / max(np.sum(err**2), 1e-9)))


def lowpass(y: np.ndarray, rate: int, hz: float) -> np.ndarray:
    spec = np.fft.rfft(y)
    spec[int(hz * y.size / rate) :] = 0
    return np.fft.irfft(spec, y.size)


def band_snr_db(y: Pcm, ref: np.ndarray, edge: int, hz: float) -> float:
    """SNR below ``hz`` only: the band a telephone or speech model cares about, leaving out
    each filter's transition band just under the Nyquist frequency."""
    n = min(y.size, ref.size)
    return snr_db(
        lowpass(y[:n].astype(np.float64), MODEL_RATE, hz), lowpass(ref[:n], MODEL_RATE, hz), edge
    )


def cost_us(make: Callable[[], Any], x: Pcm, packet: int) -> float:
    best = float("inf")
    chunks = [x[i : i + packet] for i in range(0, x.size - packet + 1, packet)]
    for _ in range(3):
        r = make()
        t0 = time.perf_counter()
        for c in chunks:
            r.process(c)
        best = min(best, (time.perf_counter() - t0) / len(chunks) * 1e6)
    return best


def measure(in_rate: int) -> dict[str, dict[str, float]]:
    x = speech(in_rate)
    x = x[: x.size - x.size % int(in_rate * PACKET_S)]
    ratio = MODEL_RATE / in_rate
    ref = fft_reference(x, in_rate, MODEL_RATE)
    packet = int(in_rate * PACKET_S)
    band = 0.85 * min(in_rate, MODEL_RATE) / 2  # 3.4 kHz for telephone audio
    results = {}
    for name, make in candidates(in_rate).items():
        y, held = stream(make, x, packet, ratio)
        results[name] = {
            "delay_mean_ms": round(float(np.mean(held)), 2),
            "delay_max_ms": round(float(np.max(held)), 2),
            "snr_db": round(snr_db(y, ref, int(EDGE_S * MODEL_RATE)), 1),
            "snr_in_band_db": round(band_snr_db(y, ref, int(EDGE_S * MODEL_RATE), band), 1),
            "band_hz": band,
            "us_per_packet": round(cost_us(make, x, packet), 2),
            "samples_out": int(y.size),
            "samples_expected": int(ref.size),
        }
        if name == "voxphone Resampler":  # as the pipeline drives it: once per 80 ms frame
            results[name]["us_per_packet_batched_per_frame"] = round(
                cost_us(make, x, packet * 4) / 4, 2
            )
    return results


def plot(results: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    markers = "os^vDPX*"
    for ax, (rate, rows) in zip(axes, results["rates"].items(), strict=True):
        for i, (name, row) in enumerate(rows.items()):
            label = f"{name}: {row['delay_max_ms']:g} ms, {row['snr_in_band_db']:g} dB"
            ax.scatter(row["delay_max_ms"], row["snr_in_band_db"], marker=markers[i % 8], s=60,
                       label=label, alpha=0.8)  # fmt: skip
        ax.set_xlabel("max input held back per 20 ms packet (ms)")
        ax.set_ylabel("in-band SNR vs offline FFT resample (dB)")
        ax.set_title(f"{rate} -> 16 kHz, flite speech")
        ax.legend(fontsize=7, loc="lower right")
        ax.grid(alpha=0.3)
    fig.suptitle(f"streaming resamplers: fidelity vs added delay — {results['machine']}")
    fig.tight_layout()
    fig.savefig(png, dpi=100)


def main() -> None:
    default = f"benchmarks/results/resample-{machine_name()}"
    prefix = Path(sys.argv[1] if len(sys.argv) > 1 else default)
    results: dict[str, Any] = {
        "machine": f"{machine_name()} ({platform.processor() or platform.platform()})",
        "loadavg_before": os.getloadavg(),
        "versions": {"soxr": soxr.__version__, "av": av.__version__},
        "rates": {},
    }
    for rate in (8000, 48000):
        results["rates"][str(rate)] = measure(rate)
        for name, row in results["rates"][str(rate)].items():
            print(
                f"{rate:>5} {name:28} delay mean {row['delay_mean_ms']:6.2f} ms "
                f"max {row['delay_max_ms']:6.2f} ms  SNR {row['snr_db']:5.1f} dB "
                f"(in band {row['snr_in_band_db']:5.1f})  "
                f"{row['us_per_packet']:6.2f} us/packet"
            )
    results["loadavg_after"] = os.getloadavg()
    prefix.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, prefix.with_suffix(".png"))


if __name__ == "__main__":
    main()
