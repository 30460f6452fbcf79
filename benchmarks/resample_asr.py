"""Does the resampler change what a recogniser hears? Word overlap with pocketsphinx, per resampler.

The test sentences (flite, as in ``tests/conftest.py``) go through voxphone's pipeline as 20 ms
PCMU packets, clean and with 10 % random loss (five seeds), with three resamplers: soxr HQ's
stream (voxphone's before), libswresample with voxphone's 2 ms lead of silence (now), and
libswresample without the lead. Each frame stream is decoded by the embedded sphinx recogniser;
the score is the fraction of the sentence's words heard (``tests.conftest.overlap``). One run
of an integration test is one sample of this; the means say more.

    python benchmarks/resample_asr.py   # writes benchmarks/results/resample_asr-<machine>.json
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from machine import machine_name  # noqa: E402

from benchmarks.resample import SoxrStream  # noqa: E402
from tests.conftest import SENTENCES, overlap  # noqa: E402
from voxphone.audio.codecs import PCMU, Encoder, Pcm  # noqa: E402
from voxphone.audio.files import read_audio  # noqa: E402
from voxphone.audio.pipeline import AudioPipeline  # noqa: E402
from voxphone.engines.sphinx import Recognizer, SphinxSettings  # noqa: E402

SEEDS = 6  # seed 0: no loss


class SoxrHQ(SoxrStream):
    """soxr's stream as voxphone used it, with the pipeline's batching turned off."""

    lead = 0

    def __init__(self) -> None:
        super().__init__(8000, 16000, "HQ")

    def releasable(self, more_in: int) -> int:
        return 1 << 30


def pipeline(variant: str) -> AudioPipeline:
    pipe = AudioPipeline(PCMU)
    if variant == "soxr HQ":
        pipe.resampler = SoxrHQ()  # type: ignore[assignment]
    elif variant == "swr, no lead":
        pipe.resampler.lead = 0
    return pipe


def heard(frames: list[Pcm], decoder: Any) -> str:
    rec = Recognizer(SphinxSettings(), decoder=decoder)
    chunks = [c for f in frames for c in rec.process(f)] + rec.finish()
    return " ".join(c.text for c in chunks if c.segment_end)


def main() -> None:
    from pocketsphinx import Decoder

    decoder = Decoder(samprate=16000, loglevel="FATAL")
    tmp = Path(tempfile.mkdtemp())
    scores: dict[str, list[float]] = {}
    for name, (voice, text) in SENTENCES.items():
        wav = tmp / f"{name}.wav"
        subprocess.run(["flite", "-voice", voice, "-t", text, "-o", str(wav)], check=True)
        pcm, enc = read_audio(wav, 8000), Encoder(PCMU)
        packets = [enc.encode(pcm[i : i + 160]) for i in range(0, pcm.size - 159, 160)]
        for seed in range(SEEDS):
            rng = np.random.default_rng(seed)
            kept = [i for i in range(len(packets)) if seed == 0 or i < 2 or rng.random() > 0.1]
            for variant in ("soxr HQ", "swr + 2 ms lead (voxphone)", "swr, no lead"):
                pipe = pipeline(variant)
                frames = [f for i in kept for f in pipe.push_packet(i * 160, packets[i])]
                score = overlap(text, heard(frames + pipe.flush(), decoder))
                scores.setdefault(variant, []).append(round(score, 3))
    machine = machine_name()
    result = {
        "machine": machine,
        "runs": f"{len(SENTENCES)} sentences x (clean + {SEEDS - 1} seeds of 10 % loss)",
        "mean_word_overlap": {k: round(float(np.mean(v)), 3) for k, v in scores.items()},
        "word_overlap": scores,
    }
    print(json.dumps(result["mean_word_overlap"], indent=2))
    out = Path(f"benchmarks/results/resample_asr-{machine}.json")
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
