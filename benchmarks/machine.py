"""The name every CPU benchmark's results carry, from one place."""

from __future__ import annotations

import asyncio
import os
import platform
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

#: Event loops a server under test can run on: asyncio's own (``voxphone serve``'s), or
#: uvloop's (libuv, in C), to measure what the loop itself costs.
LOOPS = ("asyncio", "uvloop")


def machine_name() -> str:
    """``<cores>core-<arch>`` (``2core-x86_64``): in result file names and JSON, so runs on
    different machines never overwrite each other and a figure says where it was measured."""
    return f"{os.cpu_count()}core-{platform.machine()}"


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), for the JSON: cores of one count differ."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_list(text: str) -> set[int]:
    """``taskset``'s list syntax: ``0``, ``1-3``, ``0,2,4-5``."""
    cpus: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def pin(cpus: str | None) -> None:
    """Run this process (and the threads it starts) on ``cpus`` only."""
    if cpus:
        os.sched_setaffinity(0, cpu_list(cpus))


def run_on(loop: str, main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on ``loop`` (one of ``LOOPS``); uvloop must be installed for it."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
