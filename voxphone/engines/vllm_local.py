"""Voxtral Realtime on an in-process vLLM ``AsyncLLM``, one resumable request per session.

Each session feeds 16 kHz float32 frames to vLLM's own Voxtral buffer, which frames them (39-token
first chunk, then one token per 80 ms) and needs every sampled token fed back before it builds the
next chunk. Ending the audio makes the buffer append its right padding and flush; hang-up cancels
the request *and* aborts it, or the parked request would hold its ``max_num_seqs`` slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog

from voxphone.audio.codecs import Pcm
from voxphone.engines import vllm_compat
from voxphone.engines.voxtral import DirectVoxtralStream, SessionFailed, Step, VoxtralSettings
from voxphone.errors import EngineError

log = structlog.get_logger(__name__)

VALID_DELAYS_MS = {*range(80, 1201, 80), 2400}


def check_model_dir(model: str) -> int | None:
    """Validate a local model directory; return its ``transcription_delay_ms`` (``None`` for a
    hub id, which vLLM resolves itself)."""
    path = Path(model)
    if not path.exists():
        if model.count("/") == 1 and not model.startswith((".", "/")):
            return None
        raise EngineError(f"engine.vllm.model: {model} does not exist")
    missing = [f for f in ("params.json", "tekken.json") if not (path / f).is_file()]
    if missing:
        raise EngineError(
            f"engine.vllm.model: {model} lacks {', '.join(missing)} "
            "(Voxtral needs the Mistral format)"
        )
    try:
        audio = json.loads((path / "tekken.json").read_text()).get("audio") or {}
    except json.JSONDecodeError as exc:
        raise EngineError(f"engine.vllm.model: {path / 'tekken.json'} is not JSON: {exc}") from None
    delay = audio.get("transcription_delay_ms")
    if not isinstance(delay, int) or delay not in VALID_DELAYS_MS:
        raise EngineError(
            f"{path / 'tekken.json'}: audio.transcription_delay_ms = {delay!r}; Voxtral needs a "
            "multiple of 80 ms from 80 to 1200, or 2400"
        )
    return delay


def preflight(engine_args: dict[str, Any], device: str) -> int | None:
    """What a vLLM engine needs before it starts — vLLM installed, a GPU for ``cuda``, a usable
    model directory — checked here in one line each rather than deep in vLLM's start-up.
    Returns the model's ``transcription_delay_ms`` (``None`` for a hub id); ``EngineError``."""
    if vllm_compat.installed_version() is None:
        raise EngineError("engine 'vllm' needs vLLM: pip install 'voxphone[vllm]'")
    if device == "cuda" and vllm_compat.gpu_count() == 0:
        raise EngineError(
            "engine 'vllm' needs a CUDA GPU and NVML sees none (check nvidia-smi and "
            'CUDA_VISIBLE_DEVICES), or set engine.vllm.device = "cpu" for vLLM\'s CPU build'
        )
    return check_model_dir(engine_args["model"])


class LocalSession:
    """One resumable vLLM request."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self.request_id = f"vox-{uuid.uuid4().hex}"
        self._audio: asyncio.Queue[npt.NDArray[np.float32] | None] = asyncio.Queue()
        self._feedback: asyncio.Queue[list[int]] = asyncio.Queue()

    async def _audio_stream(self) -> AsyncIterator[npt.NDArray[np.float32]]:
        while (frame := await self._audio.get()) is not None:
            yield frame

    async def send(self, frame: Pcm) -> None:
        self.send_nowait(frame)

    def send_nowait(self, frame: Pcm) -> bool:
        """``DirectSession``: the request's input queue is unbounded (vLLM takes audio as it
        comes), so a frame never waits."""
        self._audio.put_nowait(frame.astype(np.float32) / 32768.0)
        return True

    async def finish(self) -> None:
        self._audio.put_nowait(None)

    async def abort(self) -> None:
        self._audio.put_nowait(None)
        with contextlib.suppress(Exception):
            await self._engine.abort(self.request_id)

    async def steps(self) -> AsyncIterator[Step]:
        inputs = vllm_compat.streaming_inputs(self._engine, self._audio_stream(), self._feedback)
        results = self._engine.generate(
            prompt=inputs, sampling_params=vllm_compat.sampling_params(), request_id=self.request_id
        )
        try:
            async for out in results:
                if out.outputs:
                    self._feedback.put_nowait(list(out.outputs[0].token_ids))  # mandatory
                    yield Step(out.outputs[0].text)
                if out.finished:
                    return
        except asyncio.CancelledError:
            await self.abort()
            raise
        except Exception as exc:  # vLLM raises its own types; all mean this request is gone
            await self.abort()
            raise SessionFailed(f"vLLM request failed: {type(exc).__name__}: {exc}") from exc


class VllmLocalEngine:
    """One ``AsyncLLM`` in this process; one Voxtral stream per call.

    voxphone's own ``vllm`` engine (``vllm_pool``) keeps vLLM out of its process, in workers
    that run ``LocalSession``s; this class serves the engine tests and the benchmark baseline."""

    name = "vllm"

    def __init__(self, engine_args: dict[str, Any], settings: VoxtralSettings, device: str) -> None:
        self._args = engine_args
        self._settings = settings
        self._device = device
        self._engine: Any = None

    async def start(self) -> None:
        delay = preflight(self._args, self._device)
        if delay is not None:
            self._settings = dataclasses.replace(self._settings, delay_ms=delay)
        # vLLM otherwise installs its own stdout handler; this routes its logs through ours.
        os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
        log.info("vllm_starting", version=vllm_compat.installed_version(), **self._args)
        self._engine = vllm_compat.create_engine(**self._args)
        log.info("engine_started", engine=self.name)

    async def open_stream(self, call_id: str) -> DirectVoxtralStream:
        if self._engine is None:
            raise EngineError("vllm engine is not started")
        stream = DirectVoxtralStream(self._open_session, self._settings, call_id)
        await stream.start()
        return stream

    async def _open_session(self) -> LocalSession:
        return LocalSession(self._engine)

    async def stop(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None
