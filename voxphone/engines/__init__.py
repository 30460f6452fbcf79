"""Speech engines behind one small interface (see ``base``); ``create_engine`` picks one."""

from __future__ import annotations

from dataclasses import replace

import structlog

from voxphone.config import Config
from voxphone.engines.base import Engine

log = structlog.get_logger(__name__)


def choose_kind(config: Config) -> str:
    """Resolve ``auto``: the vLLM engine when a CUDA GPU (by NVML) and vLLM are here, else
    sphinx. Nothing here may initialise CUDA (see ``vllm_compat.gpu_count``)."""
    kind = config.engine.kind
    if kind != "auto":
        return kind
    from voxphone.engines import vllm_compat

    version = vllm_compat.installed_version()
    if version is not None and vllm_compat.gpu_count() > 0:
        log.info("engine_auto", chose="vllm", why=f"CUDA GPU and vLLM {version} present")
        return "vllm"
    why = "no vLLM installed" if version is None else "no CUDA GPU visible"
    log.info("engine_auto", chose="sphinx", why=why)
    return "sphinx"


def create_engine(config: Config) -> Engine:
    """The configured engine, not yet started."""
    kind = choose_kind(config)
    e = config.engine
    if kind == "sphinx":
        from voxphone.engines.sphinx import SphinxEngine, SphinxSettings

        s = e.sphinx
        return SphinxEngine(
            s.workers,
            SphinxSettings(
                pause_s=s.pause_s, noise_floor=s.noise_floor, max_segment_s=s.max_segment_s
            ),
        )
    from voxphone.engines.voxtral import VoxtralSettings

    v = e.voxtral
    voxtral = VoxtralSettings(
        pause_s=v.pause_s, max_session_s=v.max_session_s, watchdog_s=v.watchdog_s,
        max_segment_s=v.max_segment_s,
    )  # fmt: skip
    if kind == "vllm-remote":
        from voxphone.engines.vllm_remote import VllmRemoteEngine

        r = e.vllm_remote
        remote = replace(voxtral, max_model_len=131_072, delay_ms=v.transcription_delay_ms)
        return VllmRemoteEngine(r.urls, r.model, remote, r.connect_timeout_s)
    from voxphone.engines.vllm_pool import VllmEngine

    c = e.vllm
    share = -(-config.calls.max_concurrent // c.engines)  # each engine's share of the calls
    seqs = c.max_num_seqs or share + max(2, share // 10)
    args = {
        "model": c.model,
        "tokenizer_mode": "mistral",
        "config_format": "mistral",
        "load_format": c.load_format,
        "max_model_len": c.max_model_len,
        "max_num_seqs": seqs,
        "dtype": c.dtype,
        "enforce_eager": c.enforce_eager,
        "limit_mm_per_prompt": {"audio": 1},
    }
    if c.device == "cuda":
        args["gpu_memory_utilization"] = c.gpu_memory_utilization
        args["compilation_config"] = {"cudagraph_mode": c.cudagraph_mode}
        if c.kv_cache_memory_bytes is not None:
            args["kv_cache_memory_bytes"] = c.kv_cache_memory_bytes
    if c.max_num_batched_tokens is not None:
        args["max_num_batched_tokens"] = c.max_num_batched_tokens
    local = replace(voxtral, max_model_len=c.max_model_len)
    return VllmEngine(args, local, c.device, engines=c.engines)
