"""Side by side with Pipecat on the same Twilio media-stream input, measured in one run.

3,000 Twilio ``media`` messages (60 s of 20 ms µ-law from flite speech, as Twilio sends them:
JSON, base64) go through:

- Pipecat: ``TwilioFrameSerializer.deserialize`` (JSON, base64, µ-law decode and its soxr
  stream resampler to 16 kHz), awaited per message as its transport does;
- voxphone: ``JsonStreamSession.feed``, what its websocket handler calls per text frame (parse,
  jitter buffer, then the call's decode, timeline, resample, 80 ms framing into its queue).

The two alternate, five rounds each with fresh state; the best round of each is kept, and
``pipecat_ratio`` is Pipecat's µs per message over voxphone's (above 1: voxphone is cheaper).
``voxphone_us_per_message_parts`` splits voxphone's figure: the stream layer alone (``feed`` with
the call's ``push_packet`` doing nothing, measured in the same alternation) and the rest (the
call's audio path).
Also reported: how many messages released audio at once, and the audio each side had handed
on after the last message (ms), which shows the resamplers' held-back audio.

Pipecat is not a voxphone dependency: run this with an interpreter that has it, e.g.

    python3 -m venv --system-site-packages /tmp/pc && /tmp/pc/bin/pip install pipecat-ai
    PYTHONPATH=$PWD /tmp/pc/bin/python benchmarks/pipecat_twilio.py
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import os
import subprocess
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import structlog
from machine import machine_name, pin

from voxphone.audio.codecs import PCMU, Encoder
from voxphone.audio.files import read_audio
from voxphone.call import Call
from voxphone.clock import SystemClock
from voxphone.http.api import REGISTRY
from voxphone.testing import capture_events
from voxphone.transports.mediastream import JsonStreamSession

MESSAGES = 3000
ROUNDS = 5
TEXT = "Hello, I would like to check the status of my order. It has not arrived yet."


def messages(speech: Path | None = None) -> list[str]:
    """A Twilio ``start`` and ``MESSAGES`` ``media`` messages of looped speech: ``speech`` (any
    file PyAV reads), or flite's ``TEXT``."""
    wav = speech or Path(tempfile.mkdtemp()) / "speech.wav"
    if speech is None:
        subprocess.run(["flite", "-voice", "rms", "-t", TEXT, "-o", str(wav)], check=True)
    pcm, enc = read_audio(wav, 8000), Encoder(PCMU)
    chunks = [enc.encode(pcm[i : i + 160]) for i in range(0, pcm.size - 159, 160)]
    sid = "MZ0123456789abcdef0123456789abcdef"
    start = {
        "event": "start",
        "sequenceNumber": "1",
        "streamSid": sid,
        "start": {
            "streamSid": sid,
            "callSid": "CA0123456789abcdef0123456789abcdef",
            "accountSid": "AC0123456789abcdef0123456789abcdef",
            "tracks": ["inbound"],
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        },
    }
    out = [json.dumps(start)]
    for n in range(MESSAGES):
        media = {
            "track": "inbound",
            "chunk": str(n + 1),
            "timestamp": str(n * 20),
            "payload": base64.b64encode(chunks[n % len(chunks)]).decode(),
        }
        out.append(
            json.dumps(
                {"event": "media", "sequenceNumber": str(n + 2), "media": media, "streamSid": sid}
            )
        )
    return out


class _Registry:
    """Opens real (unstarted) calls, as the server's registry would."""

    def __init__(self) -> None:
        self.calls: list[Call] = []

    def open(self, codec: Any, *, transport: str, metadata: Any, call_id: Any) -> Call:
        call = Call(call_id, codec, capture_events(), SystemClock(), transport=transport)
        self.calls.append(call)
        return call


def started_session(msgs: list[str]) -> tuple[JsonStreamSession, Call]:
    """A Twilio stream session past ``start``, as the websocket handler has it."""
    registry = _Registry()
    session = JsonStreamSession(SimpleNamespace(app={REGISTRY: registry}), "twilio")  # type: ignore[arg-type]
    session.feed(msgs[0])
    return session, registry.calls[0]


async def voxphone_round(msgs: list[str]) -> float:
    """µs per media message: nothing in the timed loop but ``feed``, as the websocket handler
    calls it."""
    session, _ = started_session(msgs)
    feed = session.feed
    t0 = time.perf_counter()
    for text in msgs[1:]:
        feed(text)
    return (time.perf_counter() - t0) / (len(msgs) - 1) * 1e6


def voxphone_output(msgs: list[str]) -> tuple[int, float]:
    """Messages that released a frame, and the audio handed on after the last (ms): an
    untimed pass, so counting costs neither side time."""
    session, call = started_session(msgs)
    framer, released = call.pipeline.framer, 0
    for text in msgs[1:]:
        before = framer.frames_out
        session.feed(text)
        released += framer.frames_out != before
    return released, framer.frames_out * 80.0


async def stream_layer_round(msgs: list[str]) -> float:
    """µs per media message of the stream layer alone: text in, ``push_packet`` called (and
    doing nothing here)."""
    session, call = started_session(msgs)
    call.push_packet = lambda timestamp, payload, codec=None: None  # type: ignore[method-assign]
    feed = session.feed
    t0 = time.perf_counter()
    for text in msgs[1:]:
        feed(text)
    return (time.perf_counter() - t0) / (len(msgs) - 1) * 1e6


def pipecat_serializer() -> Any:
    from pipecat.serializers.twilio import TwilioFrameSerializer

    params = TwilioFrameSerializer.InputParams(sample_rate=16000, auto_hang_up=False)
    ser = TwilioFrameSerializer("MZ0123456789abcdef0123456789abcdef", params=params)
    ser._sample_rate = 16000  # what ``setup`` sets from the pipeline's StartFrame
    return ser


async def pipecat_round(msgs: list[str]) -> float:
    """µs per media message: nothing in the timed loop but ``deserialize``, awaited as
    Pipecat's transport does."""
    deserialize = pipecat_serializer().deserialize
    t0 = time.perf_counter()
    for text in msgs[1:]:
        await deserialize(text)
    return (time.perf_counter() - t0) / (len(msgs) - 1) * 1e6


async def pipecat_output(msgs: list[str]) -> tuple[int, float]:
    """``voxphone_output`` for Pipecat."""
    ser, released, samples = pipecat_serializer(), 0, 0
    for text in msgs[1:]:
        frame = await ser.deserialize(text)
        if frame is not None:
            released += 1
            samples += len(frame.audio) // 2
    return released, samples / 16.0


async def measure(speech: Path | None = None) -> dict[str, Any]:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    from loguru import logger  # Pipecat logs through loguru: keep its per-message lines out

    logger.remove()
    import pipecat

    msgs = messages(speech)
    load_before = os.getloadavg()
    best: dict[str, float] = {}
    for _ in range(ROUNDS):
        for name, run in (
            ("pipecat", pipecat_round),
            ("voxphone", voxphone_round),
            ("stream_layer", stream_layer_round),
        ):
            best[name] = min(best.get(name, float("inf")), await run(msgs))
    outputs = {"pipecat": await pipecat_output(msgs), "voxphone": voxphone_output(msgs)}
    machine = machine_name()
    sides, layer = ("pipecat", "voxphone"), best["stream_layer"]
    result = {
        "machine": machine,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "messages": MESSAGES,
        "pipecat_version": getattr(pipecat, "__version__", "?"),
        "us_per_message": {k: round(best[k], 2) for k in sides},
        "voxphone_us_per_message_parts": {
            "stream_layer": round(layer, 2),
            "call_audio_path": round(best["voxphone"] - layer, 2),
        },
        "messages_releasing_audio": {k: outputs[k][0] for k in sides},
        "audio_out_ms_after_last": {k: outputs[k][1] for k in sides},
        "audio_in_ms": MESSAGES * 20,
        "pipecat_ratio": round(best["pipecat"] / best["voxphone"], 2),
    }
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--speech", type=Path, default=None, help="a speech file, not flite's")
    p.add_argument("--cpus", default=None, help="pin this process, e.g. 3")
    args = p.parse_args()
    pin(args.cpus)
    result = asyncio.run(measure(args.speech))
    print(json.dumps(result, indent=2))
    out = Path(f"benchmarks/results/pipecat_twilio-{result['machine']}.json")
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
