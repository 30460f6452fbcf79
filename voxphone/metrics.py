"""Prometheus metrics for the questions asked at 3 a.m.: are calls coming in, are they ending
well, is the network bad, is the engine keeping up, are webhooks getting through.

Each ``App`` has its own ``CollectorRegistry``: no global state, and two apps in one process
(tests) don't collide. ``GET /metrics`` serves it, outside ``/v1/`` (scrapers carry no token).

Two kinds of series (Prometheus conventions: ``_total`` counters, ``_seconds`` and ``_bytes``
in base units):

- read from the running objects at scrape time (``StateCollector``): active calls, refusals,
  the outbox, deliveries — nothing on the hot path;
- observed from the event stream (``CallMetrics``, an ``EventSink``): calls started and ended,
  packets and drops from each ``call.ended``'s stats (aggregated once, at call end), jitter,
  engine lag and restarts, end-of-speech → ``transcript.final`` latency; webhook
  acknowledgements from the deliverers; event-loop lag from a probe task.

Process RSS, open file descriptors and CPU come from prometheus-client's ``ProcessCollector``
(``process_resident_memory_bytes``, ``process_open_fds``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from voxphone.call import CallRegistry
from voxphone.events import model as ev
from voxphone.events.model import Event
from voxphone.events.outbox import Stored
from voxphone.events.service import EventService

METRICS = web.AppKey("metrics", CollectorRegistry)

#: Latency buckets (seconds) from a fast LAN hop to a stuck engine.
LATENCY_S = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
#: Interarrival jitter (seconds): a LAN is under 5 ms, a bad mobile leg 100 ms and more.
JITTER_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32)
#: Event-loop lag (seconds): anything over 10 ms delays every call's packets.
LOOP_LAG_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
#: Engine stream counters (``call.ended.data.engine``) that mean a session was restarted.
RESTARTS = {"rollovers": "rollover", "watchdog_restarts": "watchdog", "reconnects": "reconnect"}


class CallMetrics:
    """Counters and histograms fed by the event stream (an ``EventSink``: never blocks)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._transport: dict[str, str] = {}  # call_id → transport, until call.ended
        r = registry
        self.started = Counter(
            "voxphone_calls_started", "Calls started.", ["transport"], registry=r
        )
        self.ended = Counter(
            "voxphone_calls_ended", "Calls ended, by end reason.", ["transport", "reason"],
            registry=r,
        )  # fmt: skip
        self.packets = Counter(
            "voxphone_packets_received", "Media packets received in calls.", ["transport"],
            registry=r,
        )  # fmt: skip
        self.lost = Counter(
            "voxphone_packets_lost", "Packets that never came (the jitter buffer gave up).",
            ["transport"], registry=r,
        )  # fmt: skip
        self.late = Counter(
            "voxphone_packets_late", "Packets that came after their slot was played.",
            ["transport"], registry=r,
        )  # fmt: skip
        self.reordered = Counter(
            "voxphone_packets_reordered", "Packets that came after a later one (put in order).",
            ["transport"], registry=r,
        )  # fmt: skip
        self.dropped = Counter(
            "voxphone_packets_dropped", "What a call received and could not use, by reason "
            "(duplicate, decode_error, unknown_message...).", ["transport", "reason"],
            registry=r,
        )  # fmt: skip
        self.frames_dropped = Counter(
            "voxphone_frames_dropped", "80 ms frames dropped because the engine lagged.",
            ["transport"], registry=r,
        )  # fmt: skip
        self.jitter = Histogram(
            "voxphone_interarrival_jitter_seconds", "RFC 3550 interarrival jitter at call end.",
            ["transport"], buckets=JITTER_S, registry=r,
        )  # fmt: skip
        self.engine_lag = Histogram(
            "voxphone_engine_lag_seconds", "Largest engine lag of a call (audio sent minus "
            "audio answered), observed at call end.", buckets=LATENCY_S, registry=r,
        )  # fmt: skip
        self.final_latency = Histogram(
            "voxphone_transcript_final_latency_seconds", "End of speech (arrival of the "
            "segment's last audio) to its transcript.final.", buckets=LATENCY_S, registry=r,
        )  # fmt: skip
        self.engine_errors = Counter(
            "voxphone_engine_errors", "engine.error events.", ["recovered"], registry=r
        )
        self.playbacks = Counter(
            "voxphone_playbacks", "Bot audio played into calls: playback.started, .finished "
            "and .cleared events, by reason (api, barge_in, hangup; empty otherwise).",
            ["event", "reason"], registry=r,
        )  # fmt: skip
        self.restarts = Counter(
            "voxphone_engine_session_restarts", "Engine sessions replaced inside a call.",
            ["reason"], registry=r,
        )  # fmt: skip
        self.webhook_ack = Histogram(
            "voxphone_webhook_ack_seconds", "transcript.final made to acknowledged (2xx) by "
            "the destination.", ["endpoint"], buckets=LATENCY_S, registry=r,
        )  # fmt: skip
        self.loop_lag = Histogram(
            "voxphone_event_loop_lag_seconds", "How late the event loop ran a timer.",
            buckets=LOOP_LAG_S, registry=r,
        )  # fmt: skip

    def publish(self, event: Event) -> None:
        if event.type == ev.CALL_STARTED:
            transport = str(event.data.get("transport", "unknown"))
            self._transport[event.call_id] = transport
            self.started.labels(transport).inc()
        elif event.type == ev.CALL_ENDED:
            self._ended(self._transport.pop(event.call_id, "unknown"), event.data)
        elif event.type == ev.TRANSCRIPT_FINAL and "latency_ms" in event.data:
            self.final_latency.observe(event.data["latency_ms"] / 1000)
        elif event.type == ev.ENGINE_ERROR:
            self.engine_errors.labels(str(bool(event.data.get("recovered"))).lower()).inc()
        elif event.type in (ev.PLAYBACK_STARTED, ev.PLAYBACK_FINISHED, ev.PLAYBACK_CLEARED):
            kind = event.type.removeprefix("playback.")
            self.playbacks.labels(kind, str(event.data.get("reason", ""))).inc()

    def _ended(self, transport: str, data: Mapping[str, Any]) -> None:
        """Aggregate one call's ``call.ended`` stats (shapes: see ``Call._finish``)."""
        self.ended.labels(transport, str(data.get("reason"))).inc()
        stats, moved = data.get("stats", {}), data.get("transport", {})
        self.packets.labels(transport).inc(stats.get("packets", 0))
        self.frames_dropped.labels(transport).inc(stats.get("dropped_frames", 0))
        drops = {
            **stats.get("dropped", {}),
            "decode_error": stats.get("decode_errors", 0),
            "duplicate": moved.get("duplicates", 0),
        }
        for reason, n in drops.items():
            self.dropped.labels(transport, reason).inc(n)
        late = max(stats.get("late_packets", 0), moved.get("late", 0))
        self.late.labels(transport).inc(late)
        self.lost.labels(transport).inc(moved.get("lost", 0))
        self.reordered.labels(transport).inc(moved.get("reordered", 0))
        if "jitter_ms" in moved:
            self.jitter.labels(transport).observe(moved["jitter_ms"] / 1000)
        self._engine(data.get("engine", {}))

    def _engine(self, engine: Mapping[str, int]) -> None:
        if "max_lag_ms" in engine:
            self.engine_lag.observe(engine["max_lag_ms"] / 1000)
        for key, reason in RESTARTS.items():
            self.restarts.labels(reason).inc(engine.get(key, 0))

    def delivered(self, endpoint: str, stored: Stored) -> None:
        """A deliverer's 2xx: how long a final took from being made to being acknowledged."""
        if stored.event.type == ev.TRANSCRIPT_FINAL:
            self.webhook_ack.labels(endpoint).observe(max(0.0, time.time() - stored.created))

    async def probe_loop(self, interval_s: float = 0.25) -> None:
        """Sleep ``interval_s`` forever and record how late each wake-up is.

        Timed with ``time.perf_counter``, not ``loop.time()``: uvloop's ``time()`` is libuv's
        clock in whole milliseconds, which would read a 0.7 ms lag as 0 and 13.1 as 14. That
        mends half of it: uvloop's timers are set on that millisecond clock, so a wake-up can
        come up to 1 ms early and read 0, and every reading there is low by up to 1 ms. So on
        uvloop (the default) lags under a millisecond are not told apart; larger ones, the
        ones that matter, are."""
        while True:
            due = time.perf_counter() + interval_s
            await asyncio.sleep(interval_s)
            self.loop_lag.observe(max(0.0, time.perf_counter() - due))


class StateCollector(Collector):
    """Read at scrape time: live calls, refusals, the outbox and every destination."""

    def __init__(
        self,
        events: EventService,
        calls: CallRegistry,
        rtp_totals: Callable[[], Any] | None = None,
    ) -> None:
        """``rtp_totals``: RTP datagrams no call could be charged with, by reason, if any."""
        self._events = events
        self._calls = calls
        self._rtp_totals = rtp_totals

    def collect(self) -> Iterator[Metric]:
        box = self._events.outbox
        yield _gauge("voxphone_active_calls", "Calls in progress.", len(self._calls.calls))
        refused = CounterMetricFamily(
            "voxphone_calls_refused", "Calls refused, by ingress and reason "
            "(draining, limit, duplicate_id).", labels=["transport", "reason"],
        )  # fmt: skip
        for (transport, reason), n in sorted(self._calls.refused.items()):
            refused.add_metric([transport, reason], n)
        yield refused
        yield _gauge("voxphone_draining", "1 while shutting down.", not self._calls.accepting)
        yield _counter("voxphone_outbox_committed", "Events committed.", box.stats.committed)
        yield _counter(
            "voxphone_outbox_dropped", "Events dropped: backlog full.", box.stats.dropped
        )
        yield _counter("voxphone_outbox_write_errors", "Failed commits.", box.stats.write_errors)
        yield _gauge("voxphone_outbox_backlog", "Events and outcomes not committed.", box.backlog)
        yield _gauge("voxphone_outbox_healthy", "1 when the outbox writes.", box.error is None)
        yield from self._deliveries()
        if self._rtp_totals is not None:
            yield self._rtp()

    def _rtp(self) -> Metric:
        """RTP datagrams the ports dropped before (or after) any call could be charged with them,
        by reason: ``unvalidated``, ``unknown_payload_type``, ``malformed``, ``call_refused``,
        ``after_end``, ``over_buffer_limit``, ``receive_buffer_full`` (the kernel's, from a full
        socket receive buffer) (``RtpServer.totals``). A call's own drops are in
        ``voxphone_packets_dropped_total``."""
        assert self._rtp_totals is not None
        family = CounterMetricFamily(
            "voxphone_rtp_datagrams_dropped", "RTP datagrams no call could be charged with, "
            "by reason.", labels=["reason"],
        )  # fmt: skip
        for reason, n in sorted(self._rtp_totals().items()):
            family.add_metric([reason], n)
        return family

    def _deliveries(self) -> Iterator[Metric]:
        done = CounterMetricFamily(
            "voxphone_deliveries",
            "Deliveries done with, by outcome.",
            labels=["endpoint", "outcome"],
        )
        retries = CounterMetricFamily(
            "voxphone_delivery_retries", "Failed attempts.", labels=["endpoint"]
        )
        pending = GaugeMetricFamily(
            "voxphone_delivery_pending", "Events waiting.", labels=["endpoint"]
        )
        disabled = GaugeMetricFamily(
            "voxphone_endpoint_disabled", "1 if disabled.", labels=["endpoint"]
        )
        for name, d in self._events.deliverers.items():
            for outcome in ("delivered", "failed", "expired", "coalesced"):
                done.add_metric([name, outcome], getattr(d.stats, outcome))
            retries.add_metric([name], d.stats.retries)
            pending.add_metric([name], d.pending)
            disabled.add_metric([name], d.disabled is not None)
        yield from (done, retries, pending, disabled)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS])
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4"})


class Metrics:
    """One app's metrics: the registry, the event sink, and the loop-lag probe's task."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.calls = CallMetrics(self.registry)
        ProcessCollector(registry=self.registry)
        self._probe: asyncio.Task[None] | None = None

    def start(
        self,
        app: web.Application,
        events: EventService,
        calls: CallRegistry,
        rtp_totals: Callable[[], Any] | None = None,
    ) -> None:
        """Serve ``/metrics`` on ``app`` and start watching (after ``events.start``)."""
        self.registry.register(StateCollector(events, calls, rtp_totals))
        for name, deliverer in events.deliverers.items():
            deliverer.on_delivered = lambda stored, name=name: self.calls.delivered(name, stored)
        app[METRICS] = self.registry
        app.router.add_get("/metrics", metrics)
        self._probe = asyncio.create_task(self.calls.probe_loop(), name="loop-lag-probe")

    async def stop(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
