"""Prometheus metrics, read from the running objects at scrape time (nothing on the hot path).

Each ``App`` has its own ``CollectorRegistry``: no global state, and two apps in one process
(tests) don't collide. ``GET /metrics`` serves it, outside ``/v1/`` (scrapers carry no token).
"""

from __future__ import annotations

from collections.abc import Iterator

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from voxphone.call import CallRegistry
from voxphone.events.service import EventService

METRICS = web.AppKey("metrics", CollectorRegistry)


class EventMetrics(Collector):
    """The outbox's health and every destination's delivery counters."""

    def __init__(self, events: EventService, calls: CallRegistry) -> None:
        self._events = events
        self._calls = calls

    def collect(self) -> Iterator[Metric]:
        box = self._events.outbox
        yield _gauge("voxphone_active_calls", "Calls in progress.", len(self._calls.calls))
        yield _counter("voxphone_outbox_committed", "Events committed.", box.stats.committed)
        yield _counter(
            "voxphone_outbox_dropped", "Events dropped: backlog full.", box.stats.dropped
        )
        yield _counter("voxphone_outbox_write_errors", "Failed commits.", box.stats.write_errors)
        yield _gauge("voxphone_outbox_backlog", "Events and outcomes not committed.", box.backlog)
        yield _gauge("voxphone_outbox_healthy", "1 when the outbox writes.", box.error is None)
        yield from self._deliveries()

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


def add_routes(app: web.Application, events: EventService, calls: CallRegistry) -> None:
    registry = CollectorRegistry()
    registry.register(EventMetrics(events, calls))
    app[METRICS] = registry
    app.router.add_get("/metrics", metrics)
