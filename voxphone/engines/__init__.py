"""Speech engines behind one small interface (see ``base``); ``create_engine`` picks one."""

from __future__ import annotations

import structlog

from voxphone.config import EngineConfig
from voxphone.engines.base import Engine
from voxphone.errors import ConfigError

log = structlog.get_logger(__name__)


def create_engine(config: EngineConfig) -> Engine:
    """The configured engine, not yet started. ``auto`` explains its choice in the log."""
    kind = config.kind
    if kind == "auto":
        kind = "sphinx"
        log.info(
            "engine_auto",
            chose=kind,
            why="the vLLM engines are not available in this version; sphinx runs anywhere",
        )
    if kind == "sphinx":
        from voxphone.engines.sphinx import SphinxEngine, SphinxSettings

        s = config.sphinx
        return SphinxEngine(s.workers, SphinxSettings(pause_s=s.pause_s, noise_floor=s.noise_floor))
    raise ConfigError(
        f"engine.kind: {kind!r} is not available in this version of voxphone; "
        "use 'sphinx' or 'auto'"
    )
