"""The sphinx recognizer in this process: every stream length ends cleanly, live text flows."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from tests.conftest import Speech
from voxphone.audio.files import read_audio
from voxphone.engines.base import TranscriptChunk
from voxphone.engines.sphinx import SAMPLE_RATE, Recognizer, SphinxSettings

pytestmark = pytest.mark.integration

FRAME = 1280


@pytest.fixture(scope="module")
def decoder() -> Iterator[object]:
    """One loaded model for the module: each recognizer would otherwise load it (0.8 s)."""
    from pocketsphinx import Decoder

    yield Decoder(samprate=SAMPLE_RATE, loglevel="FATAL")


def choppy(speech: Speech) -> np.ndarray:
    """Speech in 0.32 s pieces with 0.3 s gaps: the endpointer stays in speech while its window
    starts with a gap, where ``end_stream`` returns no samples (the issue's IndexError)."""
    pcm = read_audio(speech.path, SAMPLE_RATE)
    parts = [(pcm[i : i + 5120], np.zeros(4800, np.int16)) for i in range(0, pcm.size, 5120)]
    return np.concatenate([p for pair in parts for p in pair])


def recognise(pcm: np.ndarray, decoder: object) -> list[TranscriptChunk]:
    rec = Recognizer(SphinxSettings(), decoder)
    chunks = [c for pos in range(0, pcm.size, FRAME) for c in rec.process(pcm[pos : pos + FRAME])]
    return chunks + rec.finish()


def lengths() -> list[int]:
    """Every 80 ms frame boundary over 2 s of choppy speech, and a sample either side of some."""
    whole = [k * FRAME for k in range(1, 26)]
    return whole + [n + d for n in whole[10:16] for d in (-1, 1, 481)]


@pytest.mark.parametrize("n", lengths())
def test_every_stream_length_ends_with_its_segment_closed(
    n: int, speech: dict[str, Speech], decoder: object
) -> None:
    chunks = recognise(choppy(speech["order"])[:n], decoder)
    ends = [c for c in chunks if c.segment_end]
    assert all(e.start_ms <= e.end_ms <= n * 1000 // SAMPLE_RATE + 80 for e in ends)
    if n >= 12 * FRAME:  # enough speech for the endpointer (0.5 s window) to have heard some
        assert ends and ends[-1].text
