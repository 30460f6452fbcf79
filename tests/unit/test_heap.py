"""``voxphone serve`` freezes its start-up heap, so full collections skip it."""

from __future__ import annotations

import gc

from voxphone.app import freeze_startup_heap


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
