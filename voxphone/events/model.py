"""The event envelope (one schema for webhooks and live streams) and per-call sequencing."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from voxphone.clock import Clock, iso_utc

CALL_STARTED: Final = "call.started"
TRANSCRIPT_DELTA: Final = "transcript.delta"
TRANSCRIPT_FINAL: Final = "transcript.final"
DTMF: Final = "dtmf"
CALL_ENDED: Final = "call.ended"
ENGINE_ERROR: Final = "engine.error"
#: Talk back (``voxphone.playback``): bot audio played into the call.
PLAYBACK_STARTED: Final = "playback.started"
PLAYBACK_MARK: Final = "playback.mark"
PLAYBACK_FINISHED: Final = "playback.finished"
PLAYBACK_CLEARED: Final = "playback.cleared"

EVENT_TYPES: Final = (
    CALL_STARTED,
    TRANSCRIPT_DELTA,
    TRANSCRIPT_FINAL,
    DTMF,
    CALL_ENDED,
    ENGINE_ERROR,
    PLAYBACK_STARTED,
    PLAYBACK_MARK,
    PLAYBACK_FINISHED,
    PLAYBACK_CLEARED,
)


#: Events a destination may drop by design (past their horizon): numbered apart from the rest.
EPHEMERAL_TYPES: Final = frozenset({TRANSCRIPT_DELTA})


@dataclass(frozen=True)
class Event:
    """One thing that happened in a call.

    ``seq`` numbers the call's durable events (every type but ``transcript.delta``) 0, 1, 2, …
    with no gaps, ``call.started`` first and ``call.ended`` last, so a receiver can tell a
    lost event from one that is merely late. A delta may expire undelivered (it is stale in
    seconds), so deltas are numbered apart: ``delta_seq`` (0, 1, 2, … per call, on deltas
    only), and their ``seq`` is that of the durable event they follow (-1 before any); sorting
    by ``(seq, delta_seq is not None, delta_seq)`` restores the order they were published in.
    """

    id: str
    type: str
    call_id: str
    seq: int
    timestamp: str
    data: dict[str, Any] = field(default_factory=dict)
    delta_seq: int | None = None

    def to_dict(self) -> dict[str, Any]:
        numbers = {"seq": self.seq}
        if self.delta_seq is not None:
            numbers["delta_seq"] = self.delta_seq
        return {
            "id": self.id,
            "type": self.type,
            "call_id": self.call_id,
            **numbers,
            "timestamp": self.timestamp,
            "data": self.data,
        }

    def to_json(self) -> bytes:
        """Compact UTF-8 JSON: the exact bytes that are signed and sent."""
        return json.dumps(self.to_dict(), separators=(",", ":"), ensure_ascii=False).encode()


class EventSequencer:
    """Stamps one call's events with ids, timestamps, ``seq`` and ``delta_seq`` (see
    ``Event``), and ``call.ended`` with ``data.events``: how many events of each type the call
    published, itself included, so a receiver with a ``types`` filter can count what it got."""

    def __init__(self, call_id: str, clock: Clock) -> None:
        self.call_id = call_id
        self._clock = clock
        self._seq = -1  # the last durable event's
        self._delta_seq = -1
        self._counts: Counter[str] = Counter()

    def next(self, type_: str, data: dict[str, Any]) -> Event:
        self._counts[type_] += 1
        delta_seq = None
        if type_ in EPHEMERAL_TYPES:
            self._delta_seq += 1
            delta_seq = self._delta_seq
        else:
            self._seq += 1
        if type_ == CALL_ENDED:
            data = {**data, "events": dict(self._counts)}
        return Event(
            id=f"evt_{uuid.uuid4().hex}",
            type=type_,
            call_id=self.call_id,
            seq=self._seq,
            timestamp=iso_utc(self._clock.now()),
            data=data,
            delta_seq=delta_seq,
        )


class EventSink(Protocol):
    """Where a call's events go. ``publish`` must not block or raise: audio never waits on it."""

    def publish(self, event: Event) -> None: ...


class FanOut:
    """Publishes each event to several sinks, in order."""

    def __init__(self, sinks: list[EventSink]) -> None:
        self.sinks = sinks

    def publish(self, event: Event) -> None:
        for sink in self.sinks:
            sink.publish(event)
