"""The cyclic garbage collector, kept off the packets' clock.

CPython's collector stops the event loop while it runs, and every call's packets wait behind it
in their sockets' receive buffers; a pause longer than a buffer holds makes the kernel drop them.
A collection visits every container in the generations it collects, so what it costs is the
number of objects alive, not the garbage found. Two things keep that off the audio path:

- The start-up heap (imported modules, config, engine, sockets: ≈ 85,000 objects that live as
  long as the process) is frozen (``gc.freeze``), out of every collection's reach. Before, each
  full collection visited it all: with a few hundred calls up the loop stalled 70–100 ms.
- Full collections (generation 2) run on voxphone's clock, every ``FULL_COLLECTION_INTERVAL_S``,
  not at CPython's trigger. A call holds ≈ 100 containers for its whole life, and CPython starts
  a full collection each time the objects that reached generation 2 since the last one exceed a
  quarter of those there: with 800 calls up, every ≈ 10 s, each 30–55 ms (``benchmarks/load.py``,
  2-core EPYC); one 30 s run lost 3,507 packets from default-sized receive buffers. The
  young generations are collected as before, and they catch the garbage cycles that die young,
  which is nearly all of them (a request's exception and its traceback); a cycle that outlives
  them waits at most one interval.

A CPython with the incremental collector (3.14's, ``gh-108362``) has only a young and
an old generation, scans the old one an increment at a time along with each young collection and
ignores a third threshold: its pauses are bounded by its own design, the scheduled collections
run all the same, and the freeze keeps the start-up heap out of every increment.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import AsyncIterator

import structlog

log = structlog.get_logger(__name__)

#: Seconds between full collections while ``voxphone serve`` runs: a 30–55 ms pause every five
#: minutes (800 calls) instead of every ten seconds.
FULL_COLLECTION_INTERVAL_S = 300.0
#: A generation-2 threshold CPython never reaches (it counts generation-1 collections).
_NEVER = 2**31 - 1


def freeze_startup_heap() -> int:
    """Freeze every object alive now (``gc.freeze``), after one last collection; returns how
    many. They live as long as the process, so no collection needs to visit them again."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


@contextlib.asynccontextmanager
async def collector_off_the_clock(
    interval_s: float = FULL_COLLECTION_INTERVAL_S,
) -> AsyncIterator[None]:
    """While the block runs: the heap alive at its start frozen, CPython's own full collections
    off, and one full collection every ``interval_s`` seconds from a task on the running loop.

    On the way out, whatever ended the block, the schedule stops and the thresholds are restored;
    the heap is unfrozen unless something had frozen objects before (``gc.unfreeze`` would undo
    that too), so a test's process goes on as it was."""
    thresholds = gc.get_threshold()
    frozen_before = gc.get_freeze_count()
    log.debug("startup_heap_frozen", objects=freeze_startup_heap())
    gc.set_threshold(thresholds[0], thresholds[1], _NEVER)
    try:
        task = asyncio.create_task(_collect_every(interval_s), name="gc-full-collections")
        try:
            yield
        finally:
            task.cancel()
            await asyncio.wait([task])  # a cancellation of our own caller still reaches it
    finally:
        gc.set_threshold(*thresholds)
        if frozen_before == 0:
            gc.unfreeze()


async def _collect_every(interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        start = time.perf_counter()
        unreachable = gc.collect()
        pause_ms = round((time.perf_counter() - start) * 1000, 1)
        log.debug("gc_full_collection", unreachable=unreachable, pause_ms=pause_ms)
