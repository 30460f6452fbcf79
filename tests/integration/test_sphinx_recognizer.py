"""The sphinx recognizer in this process: every stream length ends cleanly, live text flows."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import Speech, choppy, overlap, recognise
from voxphone.audio.files import read_audio
from voxphone.engines.sphinx import SAMPLE_RATE, SphinxSettings

pytestmark = pytest.mark.integration

FRAME = 1280


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


@pytest.mark.parametrize("max_segment_s", [2.0, 30.0])
def test_speech_without_pauses_is_cut_at_word_boundaries_past_max_segment(
    max_segment_s: float, speech: dict[str, Speech], decoder: object
) -> None:
    said = speech["order"]
    pcm = np.concatenate([read_audio(said.path, SAMPLE_RATE)] * 3)  # 9.6 s, no pause
    settings = SphinxSettings(max_segment_s=max_segment_s)
    finals = [c for c in recognise(pcm, decoder, settings) if c.segment_end and c.text]
    if max_segment_s > 10:
        assert len(finals) == 1
    else:
        assert len(finals) >= 4
        assert all(f.end_ms - f.start_ms <= 2 * max_segment_s * 1000 for f in finals)
        assert all(a.end_ms == b.start_ms for a, b in zip(finals, finals[1:], strict=False))
    assert overlap(said.text, " ".join(f.text for f in finals)) >= 0.6
