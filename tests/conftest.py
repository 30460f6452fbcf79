"""Shared fixtures: synthesised speech (flite, made in the test run, never checked in) and ports."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from voxphone.audio.files import read_audio
from voxphone.audio.resample import Resampler
from voxphone.engines.base import TranscriptChunk
from voxphone.engines.sphinx import SAMPLE_RATE, Recognizer, SphinxSettings
from voxphone.errors import ConfigError
from voxphone.event_loop import LOOPS, loop_factory
from voxphone.testing import free_tcp_port as free_tcp_port  # for the tests that import it here
from voxphone.testing import free_udp_range as free_udp_range

#: A thread a test leaves running is named, not waited for; a teardown that hangs stops the run.
pytest_plugins = ["tests.threads", "tests.teardown_watchdog"]


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Tests marked ``each_loop`` run once on each event loop ``voxphone serve`` can run on:
    asyncio's and uvloop's (the default where installed). These are the tests that drive
    voxphone's transports, delivery and engines in the test's own process, so without this
    only asyncio's loop would ever run them. The rest run on asyncio's alone (pytest-asyncio
    wants a mapping for every test once the hook exists; one factory adds nothing to its id)."""
    factories: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {}
    for name in LOOPS if item.get_closest_marker("each_loop") else LOOPS[:1]:
        try:
            factories[name] = loop_factory(name) or asyncio.new_event_loop
        except ConfigError:  # uvloop is not installed here
            continue
    return factories


# Sentences flite says clearly enough for pocketsphinx, even through 8 kHz G.711.
SENTENCES = {
    "order": ("rms", "Hello, I would like to check the status of my order."),
    "callback": ("slt", "Please call me back tomorrow morning at nine."),
    "phone": ("rms", "My phone number is five five five one two three four."),
}


@dataclass(frozen=True)
class Speech:
    path: Path
    text: str

    @property
    def words(self) -> set[str]:
        return words(self.text)


def words(text: str) -> set[str]:
    return {w.strip(".,!?").lower() for w in text.split()}


def overlap(expected: str, heard: str) -> float:
    """Fraction of the expected words that were heard (order-free, as ASR tests should be)."""
    want = words(expected)
    return len(want & words(heard)) / len(want)


async def whip(url: str, wav: Path, *args: str, timeout_s: float = 60) -> list[dict]:  # type: ignore[type-arg]
    """The README's `voxphone whip FILE --url URL ARGS…` (aiortc): the JSON lines it printed
    (the call's events, then ``{"recorded": …}`` with ``--record``); it must exit 0."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "voxphone", "whip", str(wav), "--url", url, *args,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
    assert proc.returncode == 0
    return [json.loads(line) for line in out.decode().splitlines()]


async def voxphone_call(wav: Path, port: int, *args: str, timeout_s: float = 60) -> None:
    """The README's `voxphone call FILE --to 127.0.0.1:PORT ARGS…`: RTP at real-time pace,
    then an RTCP BYE; it must exit 0."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "voxphone", "call", str(wav), "--to", f"127.0.0.1:{port}", *args,
        stdout=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert await asyncio.wait_for(proc.wait(), timeout_s) == 0


def require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is not installed; run the README test command, which installs it")
    return path


@pytest.fixture(autouse=True)
def _outbox_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every `voxphone serve` a test starts keeps its event outbox in the test's own folder."""
    monkeypatch.setenv("VOXPHONE_OUTBOX__PATH", str(tmp_path / "events.db"))


@pytest.fixture(autouse=True)
def _no_fixed_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every `voxphone serve` a test starts binds free ports only: AudioSocket (off by default)
    stays off unless the test gives it a free port; HTTP and RTP ports are always given."""
    monkeypatch.setenv("VOXPHONE_ASTERISK__AUDIOSOCKET_PORT", "0")


@pytest.fixture(autouse=True)
def _quick_shutdown(monkeypatch: pytest.MonkeyPatch) -> None:
    """`voxphone serve` processes stopped at a test's end hang up live calls at once (as before
    drain_s); the drain tests set ``VOXPHONE_CALLS__DRAIN_S`` themselves."""
    monkeypatch.setenv("VOXPHONE_CALLS__DRAIN_S", "0")


@pytest.fixture(scope="session")
def speech(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Speech]:
    flite = require("flite")
    out = tmp_path_factory.mktemp("speech")
    result = {}
    for key, (voice, text) in SENTENCES.items():
        path = out / f"{key}.wav"
        subprocess.run([flite, "-voice", voice, "-t", text, "-o", str(path)], check=True)
        result[key] = Speech(path, text)
    return result


def choppy(speech: Speech) -> np.ndarray:
    """Speech in 0.32 s pieces with 0.3 s gaps: the endpointer stays in speech while its window
    starts with a gap, where ``end_stream`` returns no samples (the issue's IndexError)."""
    pcm = read_audio(speech.path, 16000)
    parts = [(pcm[i : i + 5120], np.zeros(4800, np.int16)) for i in range(0, pcm.size, 5120)]
    return np.concatenate([p for pair in parts for p in pair])


@pytest.fixture(scope="module")
def decoder() -> Iterator[object]:
    """One loaded pocketsphinx model for the module: each recognizer would otherwise load it
    (0.8 s)."""
    from pocketsphinx import Decoder

    yield Decoder(samprate=SAMPLE_RATE, loglevel="FATAL")


def recognise(
    pcm: np.ndarray, decoder: object, settings: SphinxSettings | None = None
) -> list[TranscriptChunk]:
    """voxphone's sphinx ``Recognizer`` over 16 kHz PCM in 80 ms frames, then its end."""
    rec = Recognizer(settings or SphinxSettings(), decoder)
    chunks = [c for pos in range(0, pcm.size, 1280) for c in rec.process(pcm[pos : pos + 1280])]
    return chunks + rec.finish()


def hear(pcm: np.ndarray, decoder: object, rate: int = SAMPLE_RATE) -> str:
    """The words pocketsphinx hears in mono int16 PCM at ``rate`` (resampled to its 16 kHz)."""
    if rate != SAMPLE_RATE:
        resampler = Resampler(rate, SAMPLE_RATE)
        pcm = np.concatenate([resampler.process(pcm), resampler.flush()])
    return " ".join(c.text for c in recognise(pcm, decoder) if c.segment_end and c.text)
