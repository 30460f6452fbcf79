"""Speech engines behind one small interface (see ``base``). Each engine owns its settings
type (``SphinxSettings``, ``VoxtralSettings``, vLLM's engine arguments); the app builds the
configured one (``voxphone.app.create_engine``), ``choose_kind`` resolves ``auto``."""

from __future__ import annotations

import structlog

log = structlog.get_logger(__name__)


def choose_kind(kind: str) -> str:
    """Resolve ``auto`` (``engine.kind``): the vLLM engine when a CUDA GPU (by NVML) and vLLM
    are here, else sphinx; any other kind is returned as it is. Nothing here may initialise
    CUDA (see ``vllm_compat.gpu_count``)."""
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
