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


def steal_jiffies(cpus: set[int] | None = None, stat: Path = Path("/proc/stat")) -> tuple[int, int]:
    """(steal, total) clock ticks so far on ``cpus`` (all when ``None``), from ``/proc/stat``:
    steal is time the hypervisor ran someone else while this guest wanted the CPU. A run whose
    window saw steal measured a shared host, not the code. ``(0, 0)`` where there is none."""
    steal = total = 0
    try:
        lines = stat.read_text().splitlines()
    except OSError:
        return 0, 0
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or (name == "cpu") != (cpus is None):
            continue
        if cpus is not None and int(name[3:]) not in cpus:
            continue
        ticks = [int(f) for f in fields]
        steal += ticks[7] if len(ticks) > 7 else 0  # user nice system idle iowait irq softirq steal
        total += sum(ticks[:8])
    return steal, total


def steal_pct(before: tuple[int, int], after: tuple[int, int]) -> float | None:
    """The share of CPU time stolen between two ``steal_jiffies`` readings, in percent."""
    total = after[1] - before[1]
    return round(100 * (after[0] - before[0]) / total, 1) if total > 0 else None


def pin(cpus: str | None) -> None:
    """Run this process (and the threads it starts) on ``cpus`` only."""
    if cpus:
        os.sched_setaffinity(0, cpu_list(cpus))
