"""``voxphone serve`` keeps the garbage collector off the packets' clock (``voxphone.heap``)."""

from __future__ import annotations

import asyncio
import gc
import weakref

import pytest
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


#: CPython's incremental collector (3.14) ignores a third threshold and reports it as 0.
incremental = pytest.mark.skipif(
    gc.get_threshold()[2] == 0, reason="the incremental collector has no generation-2 trigger"
)


def cpython_collects_the_old_generation() -> bool:
    """Whether, in this process, CPython starts a full collection by itself: a cycle is aged into
    generation 2, then enough objects follow it there for CPython's rule (more than a quarter of
    those it counted there at its last full collection), allocated so that its automatic
    collections run; the cycle is freed only by a full one."""
    old = cycle()
    survivors: list[list[int]] = [[] for _ in range(gc.get_freeze_count() // 2 + 200_000)]
    gc.collect(1)  # the last of them reach generation 2 too
    ran = old() is None
    del survivors
    return ran


@incremental
async def test_full_collections_run_on_voxphones_clock_not_cpythons() -> None:
    thresholds = gc.get_threshold()
    alive = Node()
    # The control: with CPython's trigger the workload below does start a full collection.
    freeze_startup_heap()
    try:
        assert cpython_collects_the_old_generation()
    finally:
        gc.unfreeze()
    with capture_logs() as logs:
        async with collector_off_the_clock(interval_s=0.5):
            assert gc.get_freeze_count() > 0
            assert not any(obj is alive for obj in gc.get_objects())
            assert gc.get_threshold()[:2] == thresholds[:2]
            assert not cpython_collects_the_old_generation()
            old = cycle()
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


async def test_a_cancellation_while_the_block_ends_reaches_the_caller() -> None:
    """The caller is cancelled just as the block's exit waits for the schedule's task to end:
    the cancellation is the caller's, not swallowed with the task's, and all is restored."""
    thresholds = gc.get_threshold()

    async def serve() -> None:
        me = asyncio.current_task()
        assert me is not None
        async with collector_off_the_clock(interval_s=60):
            asyncio.get_running_loop().call_soon(me.cancel)  # lands while the exit waits

    task = asyncio.create_task(serve())
    with pytest.raises(asyncio.CancelledError):
        await task
    assert gc.get_threshold() == thresholds
    assert gc.get_freeze_count() == 0
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "gc-full-collections"]


async def test_a_freeze_made_before_the_block_outlives_it() -> None:
    marker = Node()
    gc.freeze()
    try:
        async with collector_off_the_clock(interval_s=60):
            pass
        assert not any(obj is marker for obj in gc.get_objects())  # still frozen
    finally:
        gc.unfreeze()
    assert any(obj is marker for obj in gc.get_objects())
