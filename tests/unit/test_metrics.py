"""``/metrics`` series fed by the event stream: what a dashboard's panels read."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry

from tests.hooks import until
from voxphone.clock import FakeClock
from voxphone.event_loop import LOOPS, EventLoop, run
from voxphone.events.model import EventSequencer
from voxphone.events.outbox import OutboxStats, Stored
from voxphone.metrics import CallMetrics, Metrics, StateCollector

ROOT = Path(__file__).parents[2]


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    got = registry.get_sample_value(name, labels)
    assert got is not None, (name, labels)
    return got


def test_call_end_stats_become_counters_by_transport_and_reason() -> None:
    """Each call's ``call.ended`` stats are added once: packets, drops by reason, loss,
    lateness, jitter, engine lag and restarts; latency from finals."""
    registry = CollectorRegistry()
    m = CallMetrics(registry)
    seq = EventSequencer("c1", FakeClock())
    m.publish(seq.next("call.started", {"transport": "rtp", "codec": "PCMU"}))
    m.publish(seq.next("transcript.final", {"text": "hi", "latency_ms": 700}))
    m.publish(seq.next("engine.error", {"message": "x", "recovered": True}))
    m.publish(seq.next("call.ended", {
        "reason": "bye",
        "stats": {"packets": 500, "decode_errors": 2, "late_packets": 1, "dropped_frames": 3,
                  "dropped": {"unknown_message": 4}},
        "transport": {"lost": 7, "late": 5, "reordered": 6, "duplicates": 8, "jitter_ms": 12},
        "engine": {"max_lag_ms": 400, "rollovers": 1, "watchdog_restarts": 2, "reconnects": 0},
    }))  # fmt: skip
    assert value(registry, "voxphone_calls_started_total", transport="rtp") == 1
    assert value(registry, "voxphone_calls_ended_total", transport="rtp", reason="bye") == 1
    assert value(registry, "voxphone_packets_received_total", transport="rtp") == 500
    assert value(registry, "voxphone_packets_lost_total", transport="rtp") == 7
    assert value(registry, "voxphone_packets_late_total", transport="rtp") == 5
    assert value(registry, "voxphone_packets_reordered_total", transport="rtp") == 6
    dropped = "voxphone_packets_dropped_total"
    assert value(registry, dropped, transport="rtp", reason="duplicate") == 8
    assert value(registry, dropped, transport="rtp", reason="decode_error") == 2
    assert value(registry, dropped, transport="rtp", reason="unknown_message") == 4
    assert value(registry, "voxphone_frames_dropped_total", transport="rtp") == 3
    assert value(registry, "voxphone_interarrival_jitter_seconds_sum", transport="rtp") == 0.012
    assert value(registry, "voxphone_engine_lag_seconds_sum") == 0.4
    restarts = "voxphone_engine_session_restarts_total"
    assert value(registry, restarts, reason="watchdog") == 2
    assert value(registry, restarts, reason="rollover") == 1
    assert value(registry, "voxphone_transcript_final_latency_seconds_sum") == 0.7
    assert value(registry, "voxphone_engine_errors_total", recovered="true") == 1


def test_the_grafana_dashboard_reads_only_series_voxphone_exports() -> None:
    """Every series a panel queries is one /metrics serves (a renamed metric breaks this)."""
    registry = CollectorRegistry()
    Metrics(registry)  # the event-fed series and the process collector
    box = SimpleNamespace(stats=OutboxStats(), backlog=0, error=None)
    events = SimpleNamespace(outbox=box, deliverers={})
    calls = SimpleNamespace(calls={}, refused={}, accepting=True)
    registry.register(StateCollector(events, calls, lambda: {"call_refused": 0}))  # type: ignore[arg-type]
    exported = {family.name for family in registry.collect()}
    dashboard = json.loads((ROOT / "configs/grafana/voxphone.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {re.sub(r"_(total|bucket|sum|count)$", "", n)
            for e in exprs for n in re.findall(r"\b(?:voxphone|process)_[a-z_]+", e)}  # fmt: skip
    assert used and used <= exported, used - exported


def test_a_delivered_final_is_timed_from_when_it_was_made() -> None:
    registry = CollectorRegistry()
    m = CallMetrics(registry)
    seq = EventSequencer("c1", FakeClock())
    for type_ in ("transcript.final", "transcript.delta"):
        event = seq.next(type_, {"text": "hi"})
        m.delivered("crm", Stored(1, event, event.to_json(), time.time() - 1.5))
    assert value(registry, "voxphone_webhook_ack_seconds_count", endpoint="crm") == 1  # finals only
    assert 1.5 <= value(registry, "voxphone_webhook_ack_seconds_sum", endpoint="crm") < 3


@pytest.mark.parametrize("kind", LOOPS)
def test_the_loop_lag_probe_sees_a_blocked_loop(kind: EventLoop) -> None:
    if kind == "uvloop":
        pytest.importorskip("uvloop")

    async def blocked() -> None:
        registry = CollectorRegistry()
        m = CallMetrics(registry)
        probe = asyncio.create_task(m.probe_loop(interval_s=0.01))
        await asyncio.sleep(0.02)
        time.sleep(0.2)  # noqa: ASYNC251 -- a blocking call on the loop: what the probe is for
        await until(lambda: value(registry, "voxphone_event_loop_lag_seconds_sum") >= 0.15)
        probe.cancel()

    run(kind, blocked())


def test_playback_events_are_counted_by_kind_and_reason() -> None:
    registry = CollectorRegistry()
    m = CallMetrics(registry)
    seq = EventSequencer("c1", FakeClock())
    m.publish(seq.next("playback.started", {"playback_id": "pb_1"}))
    m.publish(seq.next("playback.mark", {"playback_id": "pb_1", "name": "x"}))
    m.publish(seq.next("playback.cleared", {"playback_id": "pb_1", "reason": "barge_in"}))
    m.publish(seq.next("playback.started", {"playback_id": "pb_2"}))
    m.publish(seq.next("playback.finished", {"playback_id": "pb_2", "played_ms": 20}))
    assert value(registry, "voxphone_playbacks_total", event="started", reason="") == 2
    assert value(registry, "voxphone_playbacks_total", event="cleared", reason="barge_in") == 1
    assert value(registry, "voxphone_playbacks_total", event="finished", reason="") == 1
