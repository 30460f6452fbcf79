"""The durable event outbox: SQLite in WAL mode, written by one thread.

``publish`` only appends to a queue, so the event loop never waits on a disk. The writer thread
commits whatever has queued up in one transaction -- the events and one delivery row per
destination that wants each -- and only then hands them to the deliverers and live streams.
Delivery outcomes flow back through the same thread, so one connection does every write, in
order. When the database can't be written (disk full, locked) the writer keeps its batch, marks
the outbox unhealthy (readiness, logs, counters) and retries; nothing is dropped until
``max_backlog`` events wait in memory, and those drops are counted and logged as errors.

One process owns a database: ``open`` takes an exclusive ``flock`` on ``<path>.lock`` (held
until ``close`` or the process dies, even by ``kill -9``), because two outboxes on one file
would each deliver every event and collide on ``pos``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import json
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog

from voxphone.clock import Clock
from voxphone.errors import ConfigError
from voxphone.events.model import Event

log = structlog.get_logger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
  pos INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, type TEXT NOT NULL, call_id TEXT NOT NULL,
  seq INTEGER NOT NULL, created REAL NOT NULL, body BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS events_created ON events(created);
CREATE TABLE IF NOT EXISTS deliveries (
  endpoint TEXT NOT NULL, pos INTEGER NOT NULL, status TEXT NOT NULL,
  attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT, updated REAL,
  PRIMARY KEY (endpoint, pos)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS deliveries_status ON deliveries(status, endpoint);
CREATE TABLE IF NOT EXISTS routes (call_id TEXT PRIMARY KEY, url TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS endpoints (name TEXT PRIMARY KEY, disabled TEXT);
"""

PENDING, DELIVERED, FAILED, EXPIRED, COALESCED = (
    "pending", "delivered", "failed", "expired", "coalesced",
)  # fmt: skip


@dataclass(frozen=True)
class Stored:
    """A committed event: its place in the outbox (``pos``, the stream cursor) and its bytes."""

    pos: int
    event: Event
    body: bytes
    created: float  # unix seconds, from the event's timestamp

    @classmethod
    def from_row(cls, pos: int, body: bytes, created: float) -> Stored:
        return cls(pos, Event(**json.loads(body)), body, created)


#: Which destinations (by name) want an event; ``routed`` = its call has its own webhook URL.
Selector = Callable[[Event, bool], list[str]]
#: Called on the event loop with each committed batch and, per event, its destinations.
Listener = Callable[[list[tuple[Stored, list[str]]]], None]


@dataclass
class Outcome:
    """A delivery's new state, written back by the writer thread."""

    endpoint: str
    pos: int
    status: str
    attempts: int
    error: str | None = None


@dataclass
class _Replay:
    endpoint: str
    where: str
    args: tuple[Any, ...]
    done: concurrent.futures.Future[list[Stored]] = field(default_factory=concurrent.futures.Future)


@dataclass
class _Call:
    """Run ``fn(connection)`` in the writer's transaction; its result resolves ``done``."""

    fn: Callable[[sqlite3.Connection], object]
    done: concurrent.futures.Future[object] = field(default_factory=concurrent.futures.Future)


_Op = Event | Outcome | _Replay | _Call | None


@dataclass
class OutboxStats:
    committed: int = 0
    dropped: int = 0
    write_errors: int = 0


class Outbox:
    """An ``EventSink`` that makes events durable before anything delivers them."""

    def __init__(
        self,
        path: Path,
        clock: Clock,
        select: Selector,
        synchronous: str = "FULL",
        busy_timeout_ms: int = 2000,
        max_backlog: int = 1_000_000,
    ) -> None:
        self.path = path
        self._clock = clock
        self._select = select
        self._sync = synchronous
        self._busy_ms = busy_timeout_ms
        self._max_backlog = max_backlog
        self._q: queue.SimpleQueue[_Op] = queue.SimpleQueue()
        self._held: list[_Op] = []
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._next_pos = 1
        self._lock_fd: int | None = None
        self.routes: dict[str, str] = {}
        self.listeners: list[Listener] = []
        self.error: str | None = None
        self.stats = OutboxStats()

    # -- the event loop's side ---------------------------------------------------------------

    def open(self) -> None:
        """Lock, then create or open the database (blocking; at startup, before the loop serves
        anyone). Raises ``ConfigError`` naming ``outbox.path`` when another process has it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _lock(self.path)
        with contextlib.closing(self._connect()) as db:
            db.executescript(SCHEMA)
            self._next_pos = (db.execute("SELECT max(pos) FROM events").fetchone()[0] or 0) + 1
            self.routes.update(db.execute("SELECT call_id, url FROM routes").fetchall())

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="voxphone-outbox", daemon=True)
        self._thread.start()

    def publish(self, event: Event) -> None:
        if self._q.qsize() + len(self._held) >= self._max_backlog:
            self.stats.dropped += 1
            log.error("outbox_full_event_dropped", event_id=event.id, call_id=event.call_id)
            return
        self._q.put(event)

    def route(self, call_id: str, url: str) -> None:
        """Send ``call_id``'s events to ``url`` (the ``call`` endpoint), durably."""
        self.routes[call_id] = url
        self.call(
            lambda db: db.execute("INSERT OR REPLACE INTO routes VALUES (?, ?)", (call_id, url))
        )

    def record(self, outcome: Outcome) -> None:
        self._q.put(outcome)

    def call(self, fn: Callable[[sqlite3.Connection], object]) -> asyncio.Future[object]:
        """Run ``fn`` in the writer thread after everything queued so far is committed."""
        op = _Call(fn)
        self._q.put(op)
        return asyncio.wrap_future(op.done)

    async def flush(self) -> None:
        """Until everything published so far is committed."""
        await self.call(lambda db: None)

    async def replay(self, endpoint: str, where: str, *args: Any) -> list[Stored]:
        """Mark events (``where`` over ``events``) pending again for ``endpoint``."""
        op = _Replay(endpoint, where, args)
        self._q.put(op)
        return await asyncio.wrap_future(op.done)

    async def close(self, timeout_s: float = 10.0) -> None:
        """Commit everything queued and stop the writer (giving up after ``timeout_s``)."""
        if self._thread is not None:
            self._q.put(None)
            await asyncio.to_thread(self._thread.join, timeout_s)
            if self._thread.is_alive():
                log.error("outbox_not_committed_at_exit", backlog=self.backlog, error=self.error)
            self._thread = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    @property
    def backlog(self) -> int:
        """Events and outcomes not committed yet."""
        return self._q.qsize() + len(self._held)

    def read(self, sql: str, *args: Any) -> list[Any]:
        """Rows from a fresh read connection (WAL readers never block the writer)."""
        with contextlib.closing(self._connect()) as db:
            return db.execute(sql, args).fetchall()

    async def aread(self, sql: str, *args: Any) -> list[Any]:
        return await asyncio.to_thread(self.read, sql, *args)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=self._busy_ms / 1000, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={self._sync}")
        return db

    # -- the writer thread -------------------------------------------------------------------

    def _run(self) -> None:
        db = self._connect()
        try:
            while self._cycle(db):
                pass
        finally:
            db.close()

    def _cycle(self, db: sqlite3.Connection) -> bool:
        """Commit one batch; False once told to stop (after committing what came before)."""
        if not self._held:
            self._held = [self._q.get()]
        ops = self._held  # counted in the backlog until committed
        while not self._q.empty() and ops[-1] is not None:
            ops.append(self._q.get_nowait())
        stop = ops[-1] is None
        if not self._commit(db, [op for op in ops if op is not None]):
            return True
        self._held = []
        return not stop

    def _commit(self, db: sqlite3.Connection, ops: Sequence[_Op]) -> bool:
        """True when ``ops`` are done with: committed, or (a bad one) refused loudly."""
        first_pos = self._next_pos
        try:
            db.execute("BEGIN IMMEDIATE")
            done = self._apply_all(db, ops)
            db.execute("COMMIT")
        except Exception as exc:
            self._next_pos = first_pos
            if db.in_transaction:
                db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.OperationalError):  # locked, full, I/O: try again
                self._failed(exc)
                return False
            return self._refuse(db, ops, exc)
        self._committed(ops, done)
        return True

    def _refuse(self, db: sqlite3.Connection, ops: Sequence[_Op], exc: Exception) -> bool:
        """One op is bad (a duplicate event id, a failing call): find it, commit the rest."""
        if len(ops) > 1:
            return all([self._commit(db, [op]) for op in ops])
        log.error("outbox_op_refused", error=repr(exc), op=type(ops[0]).__name__)
        if isinstance(ops[0], _Replay | _Call) and not ops[0].done.done():
            ops[0].done.set_exception(exc)
        return True

    def _failed(self, exc: sqlite3.Error) -> None:
        self.stats.write_errors += 1
        if self.error is None:
            log.error("outbox_write_failed", error=str(exc), path=str(self.path))
        self.error = f"outbox can't write: {exc}"
        time.sleep(min(2.0, 0.05 * 2 ** min(self.stats.write_errors, 6)))

    def _committed(self, ops: Sequence[_Op], done: list[object]) -> None:
        if self.error is not None:
            log.warning("outbox_write_recovered", backlog=self.backlog)
            self.error = None
        new = [r for r in done if isinstance(r, tuple)]
        self.stats.committed += len(new)
        # Hand the new events to the deliverers before resolving a waiter (``flush``), so
        # whoever flushed before closing them sees those events queued.
        if new and self._loop is not None:
            # A closed loop: they stay pending for the next start.
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._deliver, new)
        for op, result in zip(ops, done, strict=True):
            if isinstance(op, _Replay | _Call) and not op.done.done():  # not cancelled
                op.done.set_result(result)  # type: ignore[arg-type]

    def _deliver(self, batch: list[tuple[Stored, list[str]]]) -> None:
        for listener in self.listeners:
            listener(batch)

    def _apply_all(self, db: sqlite3.Connection, ops: Sequence[_Op]) -> list[object]:
        """Apply ``ops`` in order, with runs of events and outcomes written by ``executemany``
        (the writer holds the GIL the event loop needs: the less Python per row the better)."""
        rows = _Rows()
        done: list[object] = []
        for op in ops:
            if isinstance(op, Event):
                done.append(self._row(rows, op))
            elif isinstance(op, Outcome):
                now = self._clock.now().timestamp()
                rows.outcomes.append((op.status, op.attempts, op.error, now, op.endpoint, op.pos))
                done.append(None)
            elif isinstance(op, _Replay):
                rows.write(db)
                done.append(_replay(db, op))
            elif isinstance(op, _Call):
                rows.write(db)
                done.append(op.fn(db))
        rows.write(db)
        return done

    def _row(self, rows: _Rows, event: Event) -> tuple[Stored, list[str]]:
        body = event.to_json()
        created = datetime.fromisoformat(event.timestamp).timestamp()
        pos, self._next_pos = self._next_pos, self._next_pos + 1
        rows.events.append((pos, event.id, event.type, event.call_id, event.seq, created, body))
        targets = self._select(event, event.call_id in self.routes)
        rows.deliveries += [(name, pos) for name in targets]
        return Stored(pos, event, body, created), targets


def _lock(db: Path) -> int:
    """An open descriptor of ``<db>.lock`` holding an exclusive ``flock``, our pid written in
    it; ``ConfigError`` naming the holder's pid when another process (or outbox) holds it.
    A sidecar file, not the database: closing any descriptor of the database would drop
    SQLite's own POSIX locks (they are per process)."""
    fd = os.open(db.with_name(db.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise ConfigError(
            f"outbox.path {db} is in use by another voxphone (pid {holder}): "
            "run one process per outbox file, or give this one its own outbox.path"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


@dataclass
class _Rows:
    events: list[tuple[object, ...]] = field(default_factory=list)
    deliveries: list[tuple[str, int]] = field(default_factory=list)
    outcomes: list[tuple[object, ...]] = field(default_factory=list)

    def write(self, db: sqlite3.Connection) -> None:
        if self.events:
            db.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?)", self.events)
        if self.deliveries:
            db.executemany(
                "INSERT INTO deliveries (endpoint, pos, status) VALUES (?, ?, 'pending')",
                self.deliveries,
            )
        if self.outcomes:
            db.executemany(
                "UPDATE deliveries SET status=?, attempts=?, last_error=?, updated=? "
                "WHERE endpoint=? AND pos=?",
                self.outcomes,
            )
        self.events, self.deliveries, self.outcomes = [], [], []


def _replay(db: sqlite3.Connection, op: _Replay) -> list[Stored]:
    rows = db.execute(
        f"SELECT pos, body, created FROM events WHERE {op.where} ORDER BY pos", op.args
    ).fetchall()
    db.executemany(
        "INSERT INTO deliveries (endpoint, pos, status) VALUES (?, ?, 'pending') "
        "ON CONFLICT DO UPDATE SET status='pending', attempts=0, last_error=NULL",
        [(op.endpoint, pos) for pos, _, _ in rows],
    )
    return [Stored.from_row(*row) for row in rows]


def page(db: sqlite3.Connection, endpoint: str, start: int, limit: int) -> list[tuple[Stored, int]]:
    """Up to ``limit`` of ``endpoint``'s pending events from position ``start`` on, oldest
    first, with their attempts so far (a range of the ``(endpoint, pos)`` primary key)."""
    rows = db.execute(
        "SELECT e.pos, e.body, e.created, d.attempts FROM deliveries d "
        "JOIN events e ON e.pos = d.pos WHERE d.endpoint = ? AND d.pos >= ? "
        "AND d.status = 'pending' ORDER BY d.pos LIMIT ?",
        (endpoint, start, limit),
    ).fetchall()
    return [(Stored.from_row(pos, body, created), n) for pos, body, created, n in rows]


def compact(db: sqlite3.Connection, before: float) -> int:
    """Delete events older than ``before`` with nothing pending; returns how many went."""
    gone = db.execute(
        "DELETE FROM events WHERE created < ? AND pos NOT IN "
        "(SELECT pos FROM deliveries WHERE status = 'pending')",
        (before,),
    ).rowcount
    db.execute("DELETE FROM deliveries WHERE pos NOT IN (SELECT pos FROM events)")
    db.execute("DELETE FROM routes WHERE call_id NOT IN (SELECT call_id FROM events)")
    return gone
