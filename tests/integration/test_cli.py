"""The `voxphone` command as a user runs it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import Speech, overlap
from voxphone.audio.files import read_audio

pytestmark = pytest.mark.integration


def voxphone(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "voxphone", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize("telephony", [False, True])
def test_transcribe_prints_the_words(speech: dict[str, Speech], telephony: bool) -> None:
    s = speech["order"]
    r = voxphone("transcribe", str(s.path), *(["--telephony"] if telephony else []))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines and all(line.startswith("[00:") for line in lines)
    heard = " ".join(line.split("] ", 1)[1] for line in lines)
    assert overlap(s.text, heard) >= 0.6, heard


def test_transcribe_json_lines_are_events(speech: dict[str, Speech]) -> None:
    r = voxphone("transcribe", "--json", str(speech["callback"].path))
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines()]
    assert events[0]["type"] == "call.started" and events[0]["data"]["transport"] == "file"
    assert events[-1]["type"] == "call.ended" and events[-1]["data"]["reason"] == "end_of_file"
    durable = [e for e in events if e["type"] != "transcript.delta"]
    assert [e["seq"] for e in durable] == list(range(len(durable)))


def test_transcribe_rejects_a_non_audio_file(tmp_path: Path) -> None:
    junk = tmp_path / "notes.txt"
    junk.write_text("not audio")
    r = voxphone("transcribe", str(junk))
    assert r.returncode == 2
    assert f"voxphone: error: {junk}" in r.stderr


def test_help_explains_every_serve_flag() -> None:
    r = voxphone("serve", "--help")
    assert r.returncode == 0
    for flag in [
        "--config",
        "--http-port",
        "--rtp-ports",
        "--webhook",
        "--webhook-secret",
        "--engine",
    ]:
        assert flag in r.stdout


def test_bad_flag_value_names_the_key() -> None:
    r = voxphone("serve", "--rtp-ports", "9-1")
    assert r.returncode == 2
    assert "rtp.ports" in r.stderr and "Traceback" not in r.stderr


def test_gpu_engine_without_a_gpu_is_a_clear_error(speech: dict[str, Speech]) -> None:
    r = voxphone("transcribe", "--engine", "vllm", str(speech["order"].path))
    assert r.returncode == 2
    assert "voxphone: error: engine 'vllm' needs a CUDA GPU and none is visible" in r.stderr


def test_auto_engine_explains_its_choice(speech: dict[str, Speech]) -> None:
    r = voxphone("transcribe", "--log-level", "info", str(speech["order"].path))
    assert r.returncode == 0
    assert "engine_auto" in r.stderr and "sphinx" in r.stderr and "no CUDA GPU visible" in r.stderr


def test_ctrl_c_ends_a_transcription_with_the_words_so_far(
    speech: dict[str, Speech], tmp_path: Path
) -> None:
    """Ctrl-C signals the terminal's whole process group, the sphinx workers too: the open
    segment still comes out, as in a server's drain, and the exit status says "interrupted"."""
    pcm = read_audio(speech["order"].path, 16000)
    gap = np.zeros(3200, np.int16)
    long = tmp_path / "long.wav"
    with wave.open(str(long), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes(np.concatenate([pcm, gap] * 10).tobytes())
    proc = subprocess.Popen(
        [sys.executable, "-m", "voxphone", "transcribe", "--json", str(long)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:  # until the first words, mid-file
        lines.append(line)
        if json.loads(line)["type"] == "transcript.delta":
            break
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    events = [json.loads(line) for line in lines + out.splitlines()]
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert [e["type"] for e in events if e["type"] == "engine.error"] == []
    ended = events[-1]
    assert ended["type"] == "call.ended" and ended["data"]["reason"] == "shutdown"
    assert ended["data"]["audio_ms"] < pcm.size * 10 // 16  # it stopped early
    finals = [e["data"]["text"] for e in events if e["type"] == "transcript.final"]
    assert finals and ended["data"]["transcript"] == " ".join(finals)
