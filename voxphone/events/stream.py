"""The live event stream (SSE and websocket): the outbox for resuming, memory for the live tail.

A reader subscribes first, then reads what it missed from the outbox, then takes committed
events as they come, skipping any it already sent (by outbox position). A reader that falls
behind loses nothing: its queue overflowing sends it back to the outbox to catch up.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from voxphone.events.delivery import wants
from voxphone.events.outbox import Outbox, Stored

PAGE = 500


@dataclass
class Filter:
    call_id: str | None = None
    types: list[str] = field(default_factory=list)

    def __call__(self, stored: Stored) -> bool:
        ev = stored.event
        return (self.call_id in (None, ev.call_id)) and wants(self.types, ev.type)


@dataclass(eq=False)
class Subscription:
    keep: Filter
    queue: asyncio.Queue[Stored] = field(default_factory=lambda: asyncio.Queue(1000))
    lagged: bool = False

    def offer(self, stored: Stored) -> None:
        if not self.lagged and self.keep(stored):
            try:
                self.queue.put_nowait(stored)
            except asyncio.QueueFull:
                self.lagged = True


class LiveFeed:
    """Hands each committed batch to every live reader (an outbox listener)."""

    def __init__(self) -> None:
        self.subscribers: set[Subscription] = set()

    def __call__(self, batch: list[tuple[Stored, list[str]]]) -> None:
        for sub in self.subscribers:
            for stored, _ in batch:
                sub.offer(stored)


async def head(outbox: Outbox) -> int:
    """The newest committed position (a reader without a cursor starts after it)."""
    rows = await outbox.aread("SELECT coalesce(max(pos), 0) FROM events")
    return int(rows[0][0])


async def follow(
    outbox: Outbox, feed: LiveFeed, after: int, keep: Filter, keepalive_s: float = 15.0
) -> AsyncIterator[Stored | None]:
    """Events after position ``after`` that ``keep`` accepts, for ever, in outbox order;
    ``None`` after ``keepalive_s`` of quiet (time for a heartbeat)."""
    sub = Subscription(keep)
    feed.subscribers.add(sub)
    try:
        cursor = after
        while True:
            async for stored in _catch_up(outbox, cursor, keep):
                cursor = max(cursor, stored.pos)
                if keep(stored):
                    yield stored
            async for item in _live(sub, keepalive_s):
                if item is None or item.pos > cursor:
                    cursor = item.pos if item is not None else cursor
                    yield item
    finally:
        feed.subscribers.discard(sub)


async def _catch_up(outbox: Outbox, after: int, keep: Filter) -> AsyncIterator[Stored]:
    """Everything committed after ``after`` (all types: the caller filters, cursors move)."""
    call_sql, call_args = ("AND call_id = ?", (keep.call_id,)) if keep.call_id else ("", ())
    while True:
        rows = await outbox.aread(
            f"SELECT pos, body, created FROM events WHERE pos > ? {call_sql} ORDER BY pos LIMIT ?",
            after, *call_args, PAGE,
        )  # fmt: skip
        for row in rows:
            stored = Stored.from_row(*row)
            after = stored.pos
            yield stored
        if len(rows) < PAGE:
            return


async def _live(sub: Subscription, keepalive_s: float) -> AsyncIterator[Stored | None]:
    """The live tail, until the reader lagged (then it must catch up from the outbox)."""
    while True:
        if sub.lagged:
            while not sub.queue.empty():
                sub.queue.get_nowait()
            sub.lagged = False
            return
        try:
            yield await asyncio.wait_for(sub.queue.get(), keepalive_s)
        except TimeoutError:
            yield None
