"""The event loop `voxphone serve` runs on: chosen by config, flag or variable; uvloop's where
it is installed (``auto``, the default), asyncio's where not, unless uvloop was asked for: then
one line that says how to get it."""

from __future__ import annotations

import asyncio
import gc
import sys
import warnings
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from voxphone.config import load_config
from voxphone.errors import ConfigError
from voxphone.event_loop import LOOPS, EventLoop, loop_name, run


async def running_loop() -> str:
    return loop_name(asyncio.get_running_loop())


@pytest.mark.parametrize("kind", LOOPS)
def test_each_loop_runs_the_coroutine_on_itself(kind: EventLoop) -> None:
    if kind == "uvloop":
        pytest.importorskip("uvloop")
    assert run(kind, running_loop()) == kind


def test_auto_is_uvloop_where_it_is_installed_and_says_nothing() -> None:
    pytest.importorskip("uvloop")
    with capture_logs() as logs:
        assert run("auto", running_loop()) == "uvloop"
    assert logs == []


@pytest.fixture
def no_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    """uvloop as it is where it was never installed: ``import uvloop`` raises ImportError."""
    monkeypatch.setitem(sys.modules, "uvloop", None)


@pytest.mark.usefixtures("no_uvloop")
def test_auto_is_asyncio_where_uvloop_is_not_installed_and_says_why() -> None:
    with capture_logs() as logs:
        assert run("auto", running_loop()) == "asyncio"
    (said,) = logs
    assert said["event"] == "event_loop_auto" and said["log_level"] == "warning"
    assert said["chose"] == "asyncio" and said["why"].startswith("uvloop is not installed")


@pytest.mark.usefixtures("no_uvloop")
def test_uvloop_not_installed_says_how_to_install_it() -> None:
    main = running_loop()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "coroutine ... was never awaited" would be one
        with pytest.raises(
            ConfigError, match=r"not installed: pip install uvloop, or choose asyncio"
        ):
            run("uvloop", main)
        del main
        gc.collect()


def test_the_loop_comes_from_file_variable_or_flag(tmp_path: Path) -> None:
    f = tmp_path / "voxphone.toml"
    f.write_text('[process]\nevent_loop = "uvloop"\n')
    assert load_config(None, environ={}).process.event_loop == "auto"
    assert load_config(f, environ={}).process.event_loop == "uvloop"
    env = {"VOXPHONE_PROCESS__EVENT_LOOP": "asyncio"}
    assert load_config(f, environ=env).process.event_loop == "asyncio"
    flag = {"process.event_loop": "uvloop"}
    assert load_config(None, flag, env).process.event_loop == "uvloop"
    with pytest.raises(ConfigError, match="^VOXPHONE_PROCESS__EVENT_LOOP: process.event_loop: "):
        load_config(None, environ={"VOXPHONE_PROCESS__EVENT_LOOP": "trio"})
