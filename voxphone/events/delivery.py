"""At-least-once delivery of committed events to one destination, whatever carries them.

A ``Deliverer`` holds up to ``window`` of its destination's pending events in memory, in
lanes: one per call in ``ordered`` mode (the head must be delivered, or given up, before the
next is tried), one per event in ``parallel`` mode. A bigger backlog (a long outage, a restart
with a million events pending) stays in SQLite and is paged in, oldest first, as the window
empties: memory is bounded by the window, not by the backlog. A lane retries its head with
exponential backoff and jitter (or the destination's ``Retry-After``) until the event's type
horizon passes. Every outcome is written back to the outbox, so a restart resumes with what is
still pending. The transport (HTTP, NATS) only answers how one attempt went.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any, Literal, Protocol

import structlog
from pydantic import BaseModel, ConfigDict, Field, field_validator

from voxphone.clock import Clock
from voxphone.events.model import TRANSCRIPT_DELTA, Event
from voxphone.events.outbox import (
    COALESCED,
    DELIVERED,
    EXPIRED,
    FAILED,
    Outbox,
    Outcome,
    Stored,
    page,
)

log = structlog.get_logger(__name__)

#: Pending events a deliverer holds in memory; the rest wait in SQLite (see ``Deliverer``).
WINDOW = 1000


#: Seconds after an event was made that its delivery is given up, by type (``*`` = others):
#: a delta is stale within seconds, the rest is kept three days.
EVENT_HORIZONS: dict[str, float] = {"transcript.delta": 10.0, "*": 3 * 86400.0}


class DeliveryPolicy(BaseModel):
    """How one destination is delivered to: ordering, concurrency, retries and their horizons.

    The delivery part owns it; the config's ``[[webhooks]]`` entries and ``[nats]`` table
    extend it with where to deliver (``voxphone.config``). Immutable once validated.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Events of these types only (``call.*`` matches a prefix); empty = every type.
    types: list[str] = []
    #: ``ordered``: one event in flight per call, the next waits (FIFO per call);
    #: ``parallel``: every event on its own, as fast as the destination takes them.
    mode: Literal["ordered", "parallel"] = "ordered"
    #: Attempts in flight at once to this destination, over all calls.
    concurrency: int = Field(32, ge=1, le=10_000)
    #: Backoff before retry n is ``retry_base_s * 2**(n-1)``, capped, with jitter.
    retry_base_s: float = Field(1.0, gt=0)
    retry_max_s: float = Field(600.0, gt=0)
    #: Give up after this many attempts (0 = only the horizon limits retries).
    max_attempts: int = Field(0, ge=0)
    #: Seconds after an event was made that its delivery is given up, by type (``*`` = others).
    horizons_s: dict[str, float] = Field(default_factory=lambda: dict(EVENT_HORIZONS))
    #: Under backlog (the oldest waiting delta is ``coalesce_after_s`` old), merge a call's
    #: consecutive not-yet-tried ``transcript.delta`` events into one, so a slow receiver
    #: catches up instead of drowning.
    coalesce_deltas: bool = True
    coalesce_after_s: float = Field(2.0, ge=0)

    @field_validator("horizons_s")
    @classmethod
    def _check_horizons(cls, value: dict[str, float]) -> dict[str, float]:
        if any(v <= 0 for v in value.values()):
            raise ValueError("horizons must be positive seconds")
        return {**EVENT_HORIZONS, **value}


@dataclass(frozen=True)
class Sent:
    """The destination has the event (2xx, a JetStream ack)."""


@dataclass(frozen=True)
class Retry:
    """Try again: after ``after_s`` when the destination said so (``Retry-After``)."""

    error: str
    after_s: float | None = None


@dataclass(frozen=True)
class Gone:
    """The destination asked never to be called again (HTTP 410)."""

    error: str


Result = Sent | Retry | Gone


class Transport(Protocol):
    async def send(self, stored: Stored) -> Result: ...

    async def close(self) -> None: ...


# -- pure policy ---------------------------------------------------------------------------------


def matches(pattern: str, type_: str) -> bool:
    """``call.*`` matches ``call.started``; ``*`` matches everything; else exact."""
    if pattern.endswith("*"):
        return type_.startswith(pattern[:-1])
    return pattern == type_


def wants(types: list[str], type_: str) -> bool:
    return not types or any(matches(p, type_) for p in types)


def horizon_s(horizons: dict[str, float], type_: str) -> float:
    """The most specific horizon for ``type_``: exact, then the longest prefix pattern."""
    if type_ in horizons:
        return horizons[type_]
    prefixes = [p for p in horizons if p != "*" and matches(p, type_)]
    return horizons[max(prefixes, key=len)] if prefixes else horizons["*"]


def backoff_s(attempt: int, base_s: float, max_s: float, rng: random.Random) -> float:
    """Delay before retry ``attempt`` (1 = the first retry): exponential, capped, with "equal
    jitter" (half fixed, half random) so a fleet of retries doesn't arrive in lockstep."""
    ceiling = min(max_s, base_s * 2.0 ** min(attempt - 1, 60))
    return ceiling / 2 + rng.uniform(0, ceiling / 2)


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdecimal():
        return float(value)
    try:
        return max(0.0, (parsedate_to_datetime(value) - now).total_seconds())
    except (TypeError, ValueError):
        return None


def coalesce(items: list[Stored]) -> Stored:
    """One delta standing for consecutive deltas of one call: the last one's envelope (so
    ``webhook-id`` and ``seq`` stay the newest), their texts joined, ``coalesced`` = how many."""
    last = items[-1]
    if len(items) == 1:
        return last
    text = "".join(str(s.event.data.get("text", "")) for s in items)
    data = {**last.event.data, "text": text, "coalesced": len(items)}
    event = replace(last.event, data=data)
    return Stored(last.pos, event, event.to_json(), last.created)


# -- the deliverer -------------------------------------------------------------------------------


@dataclass
class Job:
    stored: Stored
    attempts: int = 0
    #: Deltas coalesced into this one (recorded as such once it is done with).
    folded: list[Stored] = field(default_factory=list)


@dataclass
class DeliveryStats:
    delivered: int = 0
    retries: int = 0
    failed: int = 0
    expired: int = 0
    coalesced: int = 0
    in_flight: int = 0


class Deliverer:
    """Delivers one destination's events; see the module docstring.

    ``ordered``: a task per call with pending events works through them in order, sleeping
    out its head's backoff. ``parallel``: ``concurrency`` workers take events from one queue;
    a failed one goes back on it when its backoff is over, so it holds up nothing else.
    """

    def __init__(
        self,
        name: str,
        policy: DeliveryPolicy,
        transport: Transport,
        outbox: Outbox,
        clock: Clock,
        *,
        disable_on_gone: bool = True,
        rng: random.Random | None = None,
        window: int = WINDOW,
    ) -> None:
        self.name = name
        self.policy = policy
        self.transport = transport
        self._outbox = outbox
        self._clock = clock
        self._disable_on_gone = disable_on_gone
        self._rng = rng or random.Random()
        self._sem = asyncio.Semaphore(policy.concurrency)
        self._lanes: dict[str, deque[Job]] = {}
        self._ready: deque[Job] = deque()
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self._queued: set[int] = set()
        self.window = window
        #: The lowest outbox position that may be pending in SQLite but not in memory
        #: (None: memory holds the whole backlog), how many wait there, and the task paging
        #: them in.
        self._spill: int | None = None
        self._spilled = 0
        self._paging: asyncio.Task[None] | None = None
        self._spilled_while_paging = False
        self._drained = asyncio.Event()
        self._drained.set()
        self._enabled = asyncio.Event()
        self._enabled.set()
        self.disabled: str | None = None
        self._failing = False
        self.stats = DeliveryStats()
        #: Called with each event the destination acknowledged (metrics); must not raise.
        self.on_delivered: Callable[[Stored], None] | None = None
        self._closed = False

    def wants(self, event: Event) -> bool:
        return wants(self.policy.types, event.type)

    @property
    def pending(self) -> int:
        """Events waiting: those in memory and those left in SQLite (the latter may count a
        replayed event twice until it is paged in)."""
        return len(self._queued) + self._spilled

    @property
    def held(self) -> int:
        """Pending events held in memory: at most ``window``."""
        return len(self._queued)

    def add(self, stored: Stored, attempts: int = 0) -> None:
        """Take a committed event (not twice: a replay of a pending one is a no-op). Once the
        window is full it stays in SQLite, and so does every later one until paging catches
        up, so a call's events still go out in order. After ``close`` it stays pending in the
        outbox for the next start."""
        if stored.pos in self._queued or self._closed:
            return
        if self._spill is not None or len(self._queued) >= self.window:
            self._spill = stored.pos if self._spill is None else min(self._spill, stored.pos)
            self._spilled += 1
            self._spilled_while_paging = True
            self._drained.clear()
            self._page_soon()
            return
        self._hold(Job(stored, attempts))

    def resume(self, pending: int) -> None:
        """Page in the ``pending`` events a previous run left in the outbox (at startup)."""
        if pending:
            self._spill, self._spilled = 0, pending
            self._drained.clear()
            self._page_soon()

    def _page_soon(self) -> None:
        """Start paging in when events wait in SQLite and half the window is free."""
        if self._spill is None or self._paging is not None:
            return
        if len(self._queued) <= self.window // 2:
            self._paging = asyncio.create_task(self._page(), name=f"page-{self.name}")

    async def _page(self) -> None:
        """Load the oldest pending events from SQLite while the window has room. The query
        runs in the outbox's writer, after every outcome queued so far, so nothing delivered
        comes back; events spilled while it ran make it go round again."""
        try:
            while self._spill is not None and len(self._queued) <= self.window // 2:
                self._spilled_while_paging = False
                start, room = self._spill, self.window - len(self._queued)
                query = functools.partial(page, endpoint=self.name, start=start, limit=room)
                rows = await self._outbox.call(query)
                assert isinstance(rows, list)
                self._paged(start, room, rows)
        except Exception as exc:  # the outbox refused the read: try again in a second
            log.error("outbox_page_failed", endpoint=self.name, error=repr(exc))
            asyncio.get_running_loop().call_later(1.0, self._page_soon)
            return
        finally:
            self._paging = None
        self._page_soon()

    def _paged(self, start: int, room: int, rows: list[tuple[Stored, int]]) -> None:
        for stored, attempts in rows:
            if stored.pos not in self._queued:
                self._hold(Job(stored, attempts))
        self._spilled = max(0, self._spilled - len(rows))
        assert self._spill is not None
        if self._spill < start:  # a replay of older events came in meanwhile
            return
        if len(rows) < room and not self._spilled_while_paging:
            self._spill, self._spilled = None, 0  # caught up: memory holds the backlog
            if not self._queued:
                self._drained.set()
        elif rows:
            self._spill = rows[-1][0].pos + 1

    def _hold(self, job: Job) -> None:
        """Put a job in memory: its lane (``ordered``) or the shared queue (``parallel``)."""
        stored = job.stored
        self._queued.add(stored.pos)
        self._drained.clear()
        if self.policy.mode == "parallel":
            self._ready.append(job)
            self._wake.set()
            while len(self._tasks) < self.policy.concurrency and len(self._tasks) < self.held:
                self._spawn(self._work())
            return
        lane = self._lanes.get(stored.event.call_id)
        if lane is None:
            lane = self._lanes[stored.event.call_id] = deque()
            self._spawn(self._lane(stored.event.call_id, lane))
        lane.append(job)

    async def drained(self) -> None:
        """Until nothing is pending (delivered or given up)."""
        await self._drained.wait()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro, name=f"deliver-{self.name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def disable(self, reason: str, persist: bool = True) -> None:
        """Stop delivering (until ``enable``); pending events wait in the outbox."""
        self.disabled = reason
        self._enabled.clear()
        if not persist:
            return
        log.error("endpoint_disabled", endpoint=self.name, reason=reason)
        self._outbox.call(
            lambda db: db.execute(
                "INSERT OR REPLACE INTO endpoints VALUES (?, ?)", (self.name, reason)
            )
        )

    def enable(self) -> None:
        self.disabled = None
        self._enabled.set()
        self._outbox.call(lambda db: db.execute("DELETE FROM endpoints WHERE name=?", (self.name,)))

    async def close(self, timeout_s: float) -> None:
        """Let deliveries finish for up to ``timeout_s``; what is left stays pending."""
        if self.disabled is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), timeout_s)
        self._closed = True
        for timer in self._timers.values():
            timer.cancel()
        tasks = list(self._tasks) + ([self._paging] if self._paging else [])
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.transport.close()

    async def _lane(self, call_id: str, jobs: deque[Job]) -> None:
        try:
            while jobs:
                await self._enabled.wait()
                self._merge(jobs)
                async with self._sem:
                    delay = await self._try(jobs[0])
                if delay is None:
                    jobs.popleft()
                else:
                    await asyncio.sleep(delay)
        finally:
            del self._lanes[call_id]

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._ready:
                self._wake.clear()
                await self._wake.wait()
            await self._enabled.wait()
            if not self._ready:
                continue
            job = self._ready.popleft()
            delay = await self._try(job)
            if delay is not None:
                self._timers[job.stored.pos] = loop.call_later(delay, self._requeue, job)

    def _requeue(self, job: Job) -> None:
        self._timers.pop(job.stored.pos, None)
        self._ready.append(job)
        self._wake.set()

    async def _try(self, job: Job) -> float | None:
        """One attempt; the delay before the next, or None when the job is done with."""
        if self._past_horizon(job.stored):
            self._finish(job, EXPIRED if _is_delta(job) else FAILED, "past its horizon")
            return None
        self.stats.in_flight += 1
        try:
            result = await self.transport.send(job.stored)
        finally:
            self.stats.in_flight -= 1
        job.attempts += 1
        if isinstance(result, Sent):
            self._finish(job, DELIVERED, None)
            return None
        return self._failed(job, result)

    def _failed(self, job: Job, result: Retry | Gone) -> float | None:
        if isinstance(result, Gone) and self._disable_on_gone:
            self.disable(f"{result.error} at {self._clock.now().isoformat()}")
        elif isinstance(result, Gone) or 0 < self.policy.max_attempts <= job.attempts:
            self._finish(job, FAILED, result.error)
            return None
        self.stats.retries += 1
        self._outbox.record(
            Outcome(self.name, job.stored.pos, "pending", job.attempts, result.error)
        )
        after = result.after_s if isinstance(result, Retry) else None
        if after is None:
            p = self.policy
            after = backoff_s(job.attempts, p.retry_base_s, p.retry_max_s, self._rng)
        if not self._failing:  # once per outage, not once per retry
            log.warning("endpoint_failing", endpoint=self.name, error=result.error)
            self._failing = True
        log.debug("delivery_retry", endpoint=self.name, error=result.error, retry_in_s=after,
                  event_id=job.stored.event.id, attempts=job.attempts)  # fmt: skip
        return after

    def _merge(self, jobs: deque[Job]) -> None:
        """Under backlog, fold untried deltas of one segment at the lane's head into one job."""
        if not self.policy.coalesce_deltas or not _untried_delta(jobs[0]):
            return
        age = self._clock.now().timestamp() - jobs[0].stored.created
        if age < self.policy.coalesce_after_s:
            return
        segment = jobs[0].stored.event.data.get("segment_id")
        run = 1
        while run < len(jobs) and _untried_delta(jobs[run]):
            if jobs[run].stored.event.data.get("segment_id") != segment:
                break
            run += 1
        if run == 1:
            return
        folded = [jobs.popleft().stored for _ in range(run)]
        jobs.appendleft(Job(coalesce(folded), folded=folded[:-1]))

    def _finish(self, job: Job, status: str, err: str | None) -> None:
        for s in [*job.folded, job.stored]:
            self._queued.discard(s.pos)
        if not self._queued and self._spill is None:
            self._drained.set()
        self._page_soon()
        for s in job.folded:
            self._outbox.record(Outcome(self.name, s.pos, COALESCED, 0))
        self.stats.coalesced += len(job.folded)
        self._outbox.record(Outcome(self.name, job.stored.pos, status, job.attempts, err))
        if status == DELIVERED:
            self.stats.delivered += 1
            if self.on_delivered is not None:
                self.on_delivered(job.stored)
            if self._failing:
                log.info("endpoint_recovered", endpoint=self.name)
                self._failing = False
            return
        if status == EXPIRED:
            self.stats.expired += 1
        else:
            self.stats.failed += 1
        log.warning("delivery_given_up", endpoint=self.name, status=status, error=err,
                    event_id=job.stored.event.id, type=job.stored.event.type)  # fmt: skip

    def _past_horizon(self, stored: Stored) -> bool:
        age = self._clock.now().timestamp() - stored.created
        return age > horizon_s(self.policy.horizons_s, stored.event.type)


def _is_delta(job: Job) -> bool:
    return job.stored.event.type == TRANSCRIPT_DELTA


def _untried_delta(job: Job) -> bool:
    return job.attempts == 0 and _is_delta(job)
