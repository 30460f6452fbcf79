"""The name every CPU benchmark's results carry, from one place."""

from __future__ import annotations

import os
import platform
from pathlib import Path


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
