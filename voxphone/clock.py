"""Injected time, so logic never reads the wall clock directly and tests never patch it."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    """What time-dependent code needs: a monotonic reading and a wall-clock timestamp."""

    def monotonic(self) -> float: ...

    def now(self) -> datetime: ...


class SystemClock:
    """The real clock. ``monotonic`` is ``time.monotonic`` itself, not a method calling it:
    calls read it once per 80 ms frame, and a Python frame around it costs more than it does."""

    monotonic = staticmethod(time.monotonic)

    def now(self) -> datetime:
        return datetime.now(UTC)


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, start: float = 1000.0, wall: datetime | None = None) -> None:
        self._t = start
        self._wall = wall or datetime(2026, 1, 1, tzinfo=UTC)
        self._t0 = start

    def monotonic(self) -> float:
        return self._t

    def now(self) -> datetime:
        return self._wall + timedelta(seconds=self._t - self._t0)

    def advance(self, seconds: float) -> None:
        self._t += seconds


def iso_utc(moment: datetime) -> str:
    """RFC 3339 with millisecond precision and a Z, the form the event envelope uses."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
