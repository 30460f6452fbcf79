"""The event envelope (one schema for webhooks and live streams) and per-call sequencing."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from voxphone.clock import Clock, iso_utc

CALL_STARTED: Final = "call.started"
TRANSCRIPT_DELTA: Final = "transcript.delta"
TRANSCRIPT_FINAL: Final = "transcript.final"
DTMF: Final = "dtmf"
CALL_ENDED: Final = "call.ended"
ENGINE_ERROR: Final = "engine.error"

EVENT_TYPES: Final = (
    CALL_STARTED,
    TRANSCRIPT_DELTA,
    TRANSCRIPT_FINAL,
    DTMF,
    CALL_ENDED,
    ENGINE_ERROR,
)


@dataclass(frozen=True)
class Event:
    """One thing that happened in a call. ``seq`` is gap-free per call, starting at 0."""

    id: str
    type: str
    call_id: str
    seq: int
    timestamp: str
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": self.type,
            "call_id": self.call_id,
            "seq": self.seq,
            "timestamp": self.timestamp,
            "data": self.data,
        }

    def to_json(self) -> bytes:
        """Compact UTF-8 JSON: the exact bytes that are signed and sent."""
        return json.dumps(self.to_dict(), separators=(",", ":"), ensure_ascii=False).encode()


class EventSequencer:
    """Stamps one call's events with ids, timestamps and a gap-free ``seq``."""

    def __init__(self, call_id: str, clock: Clock) -> None:
        self.call_id = call_id
        self._clock = clock
        self._seq = 0

    def next(self, type_: str, data: dict[str, Any]) -> Event:
        event = Event(
            id=f"evt_{uuid.uuid4().hex}",
            type=type_,
            call_id=self.call_id,
            seq=self._seq,
            timestamp=iso_utc(self._clock.now()),
            data=data,
        )
        self._seq += 1
        return event


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
