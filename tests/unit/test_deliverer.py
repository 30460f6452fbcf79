"""The Deliverer against a real outbox (SQLite in a temporary folder) and an in-memory
transport: a backlog bigger than its window stays in SQLite and is paged in, in order."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from tests.hooks import until
from voxphone.clock import FakeClock
from voxphone.events.delivery import Deliverer, DeliveryPolicy, Result, Sent
from voxphone.events.model import Event, EventSequencer
from voxphone.events.outbox import Outbox, Stored


class Gate:
    """A transport that holds every send until ``open`` is set, then records it."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.sent: list[Stored] = []
        self.deliverer: Deliverer | None = None
        self.most_held = 0

    async def send(self, stored: Stored) -> Result:
        await self.open.wait()
        assert self.deliverer is not None
        self.most_held = max(self.most_held, self.deliverer.held)
        self.sent.append(stored)
        return Sent()

    async def close(self) -> None:
        pass


def to_a(event: Event, routed: bool) -> list[str]:
    return ["a"]


@asynccontextmanager
async def deliverer(
    path: Path, mode: str, window: int
) -> AsyncIterator[tuple[Deliverer, Gate, Outbox]]:
    box = Outbox(path, FakeClock(), to_a)
    box.open()
    gate = Gate()
    policy = DeliveryPolicy(mode="parallel" if mode == "parallel" else "ordered")
    d = Deliverer("a", policy, gate, box, FakeClock(), window=window)
    gate.deliverer = d

    def schedule(batch: list[tuple[Stored, list[str]]]) -> None:
        for stored, _ in batch:
            d.add(stored)

    box.listeners.append(schedule)
    (pending,) = box.read("SELECT count(*) FROM deliveries WHERE status = 'pending'")[0]
    d.resume(pending)
    box.start()
    try:
        yield d, gate, box
    finally:
        await d.close(0)
        await box.close()


def publish(box: Outbox, calls: int, each: int) -> list[Event]:
    """``each`` finals for each of ``calls`` calls, interleaved."""
    seqs = [EventSequencer(f"c{i}", FakeClock()) for i in range(calls)]
    events = [s.next("transcript.final", {"n": n}) for n in range(each) for s in seqs]
    for e in events:
        box.publish(e)
    return events


@pytest.mark.parametrize("mode", ["ordered", "parallel"])
async def test_a_backlog_bigger_than_the_window_waits_in_sqlite(tmp_path: Path, mode: str) -> None:
    """300 events, a window of 20: never more than 20 in memory, each delivered once, and in
    ``ordered`` mode each call's events in order."""
    async with deliverer(tmp_path / "e.db", mode, window=20) as (d, gate, box):
        events = publish(box, calls=3, each=100)
        await box.flush()
        await until(lambda: d.pending == 300)
        assert d.held <= 20
        gate.open.set()
        await asyncio.wait_for(d.drained(), 30)
    assert gate.most_held <= 20
    assert sorted(s.event.id for s in gate.sent) == sorted(e.id for e in events)
    if mode == "ordered":
        for call in ("c0", "c1", "c2"):
            got = [s.event.seq for s in gate.sent if s.event.call_id == call]
            assert got == list(range(100))
    assert d.pending == 0


async def test_a_restart_pages_the_backlog_in_before_new_events(tmp_path: Path) -> None:
    """What a previous run left pending comes first, from SQLite, a window at a time; events
    committed meanwhile queue behind it (one call: one order)."""
    path = tmp_path / "e.db"
    first = Outbox(path, FakeClock(), to_a)
    first.open()
    first.start()
    seq = EventSequencer("c", FakeClock())
    for n in range(50):
        first.publish(seq.next("transcript.final", {"n": n}))
    await first.close()
    async with deliverer(path, "ordered", window=8) as (d, gate, box):
        assert d.pending == 50 and d.held <= 8
        for n in range(50, 60):
            box.publish(seq.next("transcript.final", {"n": n}))
        gate.open.set()
        await until(lambda: len(gate.sent) == 60)
    assert [s.event.data["n"] for s in gate.sent] == list(range(60))
    assert gate.most_held <= 8
