"""The SQLite outbox: commit before delivery, restart state, a locked database, replay, compaction."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from pathlib import Path

import pytest

from tests.hooks import until
from voxphone.clock import FakeClock
from voxphone.errors import ConfigError
from voxphone.events.model import Event, EventSequencer
from voxphone.events.outbox import DELIVERED, Outbox, Outcome, Stored, compact, page


def everyone(event: Event, routed: bool) -> list[str]:
    return ["call"] if routed else ["a", "b"]


def pending(box: Outbox, endpoints: list[str]) -> dict[str, list[tuple[Stored, int]]]:
    """Each endpoint's pending events with their attempts, as a deliverer pages them in."""
    with contextlib.closing(sqlite3.connect(box.path)) as db:
        return {ep: page(db, ep, 0, 1_000_000) for ep in endpoints}


def make(path: Path, **kw: object) -> tuple[Outbox, list[tuple[Stored, list[str]]]]:
    box = Outbox(path, FakeClock(), everyone, **kw)  # type: ignore[arg-type]
    seen: list[tuple[Stored, list[str]]] = []
    box.listeners.append(seen.extend)
    box.open()
    return box, seen


async def test_events_reach_listeners_only_after_they_are_committed(tmp_path: Path) -> None:
    box, _ = make(tmp_path / "e.db")
    committed_when_seen: list[bool] = []

    def check(batch: list[tuple[Stored, list[str]]]) -> None:
        ids = {row[0] for row in box.read("SELECT id FROM events")}
        committed_when_seen.extend(s.event.id in ids for s, _ in batch)

    box.listeners.append(check)
    box.start()
    seq = EventSequencer("c1", FakeClock())
    box.route("c2", "http://127.0.0.1:1/x")
    events = [seq.next("transcript.final", {"text": str(i)}) for i in range(200)]
    routed = EventSequencer("c2", FakeClock()).next("call.started", {})
    for e in [*events, routed]:
        box.publish(e)
    await box.flush()
    await box.close()
    assert committed_when_seen == [True] * 201
    rows = box.read("SELECT endpoint, count(*) FROM deliveries GROUP BY endpoint ORDER BY 1")
    assert rows == [("a", 200), ("b", 200), ("call", 1)]
    assert [s.event.seq for s, _ in pending(box, ["a"])["a"]] == list(range(200))


async def test_publish_returns_at_once_and_batches_commits(tmp_path: Path) -> None:
    box, seen = make(tmp_path / "e.db")
    box.start()
    seq = EventSequencer("c1", FakeClock())
    events = [seq.next("transcript.delta", {"text": "x"}) for _ in range(5000)]
    t0 = time.perf_counter()
    for e in events:
        box.publish(e)
    took = time.perf_counter() - t0
    await until(lambda: len(seen) == 5000)
    await box.close()
    assert took < 0.5, f"{took:.3f} s to queue 5000 events"
    assert [s.pos for s, _ in seen] == list(range(1, 5001))


async def test_a_restart_finds_what_is_still_pending(tmp_path: Path) -> None:
    box, seen = make(tmp_path / "e.db")
    box.start()
    seq = EventSequencer("c1", FakeClock())
    for i in range(4):
        box.publish(seq.next("transcript.final", {"text": str(i)}))
    await until(lambda: len(seen) == 4)
    box.record(Outcome("a", seen[0][0].pos, DELIVERED, 1))
    box.record(Outcome("a", seen[1][0].pos, "pending", 3, "HTTP 500"))
    await box.close()

    again, _ = make(tmp_path / "e.db")
    left = pending(again, ["a", "b"])
    assert [(s.event.seq, n) for s, n in left["a"]] == [(1, 3), (2, 0), (3, 0)]
    assert len(left["b"]) == 4
    again.start()
    again.publish(seq.next("call.ended", {}))
    await again.flush()
    await again.close()
    assert again.read("SELECT max(pos) FROM events") == [(5,)], "positions continue"


async def test_a_locked_database_is_loud_and_loses_nothing(tmp_path: Path) -> None:
    path = tmp_path / "e.db"
    box, seen = make(path, busy_timeout_ms=50)
    box.start()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    seq = EventSequencer("c1", FakeClock())
    for i in range(50):
        box.publish(seq.next("transcript.final", {"text": str(i)}))
    await until(lambda: box.error is not None)
    assert "locked" in (box.error or "")
    assert box.backlog >= 50 and not seen and box.stats.write_errors >= 1
    holder.execute("ROLLBACK")
    holder.close()
    await until(lambda: len(seen) == 50)
    await box.close()
    assert box.error is None and box.stats.dropped == 0
    assert [s.event.seq for s, _ in seen] == list(range(50))


async def test_past_max_backlog_events_are_dropped_and_counted(tmp_path: Path) -> None:
    box, _ = make(tmp_path / "e.db", max_backlog=3)  # not started: nothing drains the queue
    seq = EventSequencer("c1", FakeClock())
    for _ in range(5):
        box.publish(seq.next("dtmf", {"digit": "1"}))
    assert (box.backlog, box.stats.dropped) == (3, 2)


async def test_a_bad_event_is_refused_alone(tmp_path: Path) -> None:
    box, seen = make(tmp_path / "e.db")
    seq = EventSequencer("c1", FakeClock())
    first = seq.next("call.started", {})
    for e in [first, seq.next("dtmf", {"digit": "1"}), first, seq.next("call.ended", {})]:
        box.publish(e)  # queued before the writer starts: one batch, with a duplicate id
    box.start()
    await until(lambda: len(seen) == 3)
    await box.close()
    assert [s.event.type for s, _ in seen] == ["call.started", "dtmf", "call.ended"]


async def test_replay_and_compaction(tmp_path: Path) -> None:
    box, seen = make(tmp_path / "e.db")
    box.start()
    seq = EventSequencer("c1", FakeClock())
    for i in range(3):
        box.publish(seq.next("transcript.final", {"text": str(i)}))
    await until(lambda: len(seen) == 3)
    for s, _ in seen:
        for ep in ("a", "b"):
            box.record(Outcome(ep, s.pos, DELIVERED, 1))
    replayed = await box.replay("a", "id = ?", seen[1][0].event.id)
    assert [s.event.seq for s in replayed] == [1]
    assert [s.pos for s, _ in pending(box, ["a", "b"])["a"]] == [seen[1][0].pos]
    gone = await box.call(lambda db: compact(db, before=time.time() + 3600))
    assert gone == 2, "the event pending again for 'a' stays"
    await box.close()
    assert box.read("SELECT count(*) FROM deliveries") == [(2,)]


async def test_one_outbox_per_database_file(tmp_path: Path) -> None:
    """A second outbox on the same file (here or in another process) is refused, naming
    ``outbox.path`` and the holder; closing the first releases the file."""
    path = tmp_path / "e.db"
    first, _ = make(path)
    with pytest.raises(ConfigError, match=r"^outbox\.path .*e\.db is in use .*\(pid \d+\)"):
        make(path)
    other, _ = make(tmp_path / "other.db")  # another file is another outbox
    await first.close()
    again, _ = make(path)
    await again.close()
    await other.close()
