"""``voxphone serve`` keeps the garbage collector off the packets' clock (``voxphone.heap``)."""

from __future__ import annotations

import asyncio
import gc
import weakref

from structlog.testing import capture_logs

from tests.hooks import until
from voxphone.heap import collector_off_the_clock, freeze_startup_heap


class Node:
    """A container the collector tracks, which can be part of a reference cycle."""

    def __init__(self) -> None:
        self.other: Node | None = None


def cycle() -> weakref.ref[Node]:
    """A reference cycle nothing else points to, aged into generation 2; a weak reference to it."""
    a, b = Node(), Node()
    a.other, b.other = b, a
    gc.collect(1)  # survivors of a generation-1 collection move to generation 2
    return weakref.ref(a)


def test_what_is_alive_at_start_up_is_out_of_the_collectors_reach() -> None:
    # Containers the collector tracks, alive at start-up.
    alive: list[list[int]] = [[] for _ in range(1000)]
    try:
        frozen = freeze_startup_heap()
        assert frozen == gc.get_freeze_count() >= len(alive)
        # A frozen object is in no generation, so no collection visits it.
        assert not any(obj is alive[0] for obj in gc.get_objects())
    finally:
        gc.unfreeze()
    assert any(obj is alive[0] for obj in gc.get_objects())


async def test_full_collections_run_on_voxphones_clock_not_cpythons() -> None:
    thresholds = gc.get_threshold()
    alive = Node()
    with capture_logs() as logs:
        async with collector_off_the_clock(interval_s=0.2):
            assert gc.get_freeze_count() > 0
            assert not any(obj is alive for obj in gc.get_objects())
            assert gc.get_threshold()[:2] == thresholds[:2]
            old = cycle()
            # Young collections go on, enough for CPython to start several full ones itself...
            for _ in range(30):
                gc.collect(1)
            survivors = [[] for _ in range(100_000)]  # enough new objects for CPython's rule
            assert old() is not None  # ...but none ran
            del survivors
            await until(lambda: old() is None)  # the scheduled one found it
    assert gc.get_threshold() == thresholds
    assert gc.get_freeze_count() == 0
    assert any(e["event"] == "gc_full_collection" and e["unreachable"] >= 2 for e in logs)


async def test_ending_the_block_stops_the_schedule() -> None:
    async with collector_off_the_clock(interval_s=0.01):
        pass
    old = cycle()
    gc.disable()
    try:
        await asyncio.sleep(0.05)
        assert old() is not None  # no full collection after the block
    finally:
        gc.enable()
    gc.collect()
    assert old() is None
