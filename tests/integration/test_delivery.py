"""Webhook delivery through the real outbox (SQLite on disk) to real HTTP receivers: outages,
500s, timeouts, 429 + Retry-After, 410, horizons, restarts, the live stream and the ops API."""

from __future__ import annotations

import asyncio
import json
import random
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.hooks import Hook, by_call, metric, new_secret, until
from voxphone import metrics
from voxphone.app import event_settings
from voxphone.clock import SystemClock
from voxphone.config import load_config
from voxphone.events.model import Event, EventSequencer
from voxphone.events.service import EventService
from voxphone.http import events as events_api

pytestmark = [pytest.mark.integration, pytest.mark.each_loop]

FAST = {"retry_base_s": 0.05, "retry_max_s": 0.3, "timeout_s": 2.0}


def endpoint(name: str, hook: Hook, **kw: Any) -> dict[str, Any]:
    secrets = [hook.secret] if hook.secret else []
    return {"name": name, "url": hook.url, "secrets": secrets, **FAST, **kw}


@asynccontextmanager
async def service(
    tmp_path: Path, *endpoints: dict[str, Any], **overrides: object
) -> AsyncIterator[EventService]:
    config = load_config(
        overrides={"webhooks": list(endpoints), "outbox.path": str(tmp_path / "events.db"),
                   **overrides},
        environ={},
    )  # fmt: skip
    svc = EventService(event_settings(config), SystemClock())
    await svc.start()
    try:
        yield svc
    finally:
        await svc.stop(drain_timeout_s=0.5)


async def synthetic_call(sink: EventService, call_id: str, rng: random.Random) -> list[Event]:
    """A call's worth of events, at a jittered pace: deltas, finals, DTMF, the end."""
    seq = EventSequencer(call_id, SystemClock())
    events = [seq.next("call.started", {"transport": "synthetic"})]
    for segment in range(3):
        events += [seq.next("transcript.delta", {"text": f"w{i} ", "segment_id": segment})
                   for i in range(4)]  # fmt: skip
        events.append(seq.next("transcript.final", {"text": "...", "segment_id": segment}))
    events += [seq.next("dtmf", {"digit": "7"}), seq.next("call.ended", {"reason": "bye"})]
    for e in events:
        sink.publish(e)
        await asyncio.sleep(rng.uniform(0, 0.02))
    return events


def order(event: dict[str, Any]) -> tuple[int, int]:
    """Where an event was published in its call: durable ``seq``, then the deltas after it."""
    return event["seq"], event.get("delta_seq", -1)


def assert_complete(got: list[dict[str, Any]], sent: list[Event], ordered: bool) -> None:
    """Every event arrived once per webhook-id; deltas may be coalesced but keep all text."""
    sent_by_call = by_call([e.to_dict() for e in sent])
    got_by_call = by_call(got)
    assert set(got_by_call) == set(sent_by_call)
    for call_id, events in sent_by_call.items():
        arrived = got_by_call[call_id]
        if ordered:
            assert [order(e) for e in arrived] == sorted(order(e) for e in arrived), call_id
        whole = [e for e in events if e["type"] != "transcript.delta"]
        assert [e["id"] for e in whole] == [
            e["id"] for e in arrived if e["type"] != "transcript.delta"
        ]
        for segment in range(3):
            texts = [
                e["data"]["text"]
                for e in events
                if e["type"] == "transcript.delta" and e["data"]["segment_id"] == segment
            ]
            heard = [
                e["data"]["text"]
                for e in sorted(arrived, key=order)
                if e["type"] == "transcript.delta" and e["data"]["segment_id"] == segment
            ]
            assert "".join(heard) == "".join(texts), (call_id, segment)


async def test_receiver_down_during_20_calls_then_back(tmp_path: Path) -> None:
    down = Hook(secret=new_secret())  # not started: connections are refused
    flaky = Hook(secret=new_secret(), script=[(500, {})] * 40 + [(503, {"Retry-After": "0"})] * 10)
    await flaky.start()
    rng = random.Random(8)
    try:
        async with service(
            tmp_path,
            endpoint("crm", down, coalesce_after_s=0.2),
            endpoint("bulk", flaky, mode="parallel"),
        ) as svc:
            calls = asyncio.gather(*(synthetic_call(svc, f"call_{i}", rng) for i in range(20)))
            await asyncio.sleep(1.0)
            await down.start()
            sent = [e for call in await calls for e in call]
            finals = {e.id for e in sent if e.type != "transcript.delta"}
            await down.until(lambda: finals <= {e["id"] for e in down.accepted})
            await flaky.until(lambda: len(flaky.unique()) == len(sent))
            crm = svc.deliverers["crm"].stats
    finally:
        await down.stop()
        await flaky.stop()
    assert down.bad_signatures == flaky.bad_signatures == 0
    assert_complete(down.unique(), sent, ordered=True)
    assert crm.coalesced > 0, "the backlog of deltas was coalesced"
    assert crm.retries > 0 and crm.failed == crm.expired == 0
    assert sorted(e["id"] for e in flaky.unique()) == sorted(e.id for e in sent)
    assert sum(a.status >= 500 for a in flaky.attempts) == 50


async def test_500s_then_success_back_off_exponentially(tmp_path: Path) -> None:
    hook = Hook(script=[(500, {})] * 4)
    await hook.start()
    try:
        async with service(tmp_path, endpoint("a", hook, retry_base_s=0.1, retry_max_s=10)) as svc:
            svc.publish(EventSequencer("c", SystemClock()).next("transcript.final", {"text": "hi"}))
            await hook.until(lambda: len(hook.accepted) == 1)
    finally:
        await hook.stop()
    times = [a.at for a in hook.attempts]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert len(hook.attempts) == 5 and len({a.webhook_id for a in hook.attempts}) == 1
    for n, gap in enumerate(gaps, start=1):  # 0.1 * 2**(n-1), half of it random
        assert 0.1 * 2 ** (n - 1) / 2 - 0.02 <= gap <= 0.1 * 2 ** (n - 1) + 0.2, gaps


async def test_429_waits_for_retry_after(tmp_path: Path) -> None:
    hook = Hook(script=[(429, {"Retry-After": "1"})])
    await hook.start()
    try:
        async with service(tmp_path, endpoint("a", hook)) as svc:
            svc.publish(EventSequencer("c", SystemClock()).next("call.started", {}))
            await hook.until(lambda: len(hook.accepted) == 1)
    finally:
        await hook.stop()
    first, second = hook.attempts
    assert second.at - first.at >= 0.95, "retried before Retry-After (backoff alone is 0.05 s)"


async def test_a_timeout_is_retried_with_the_same_webhook_id(tmp_path: Path) -> None:
    hook = Hook(delays=[1.0])
    await hook.start()
    try:
        async with service(tmp_path, endpoint("a", hook, timeout_s=0.3)) as svc:
            svc.publish(EventSequencer("c", SystemClock()).next("call.started", {}))
            await hook.until(lambda: len(hook.accepted) == 2)  # the slow one lands late too
            stats = svc.deliverers["a"].stats
    finally:
        await hook.stop()
    assert hook.accepted[0]["id"] == hook.accepted[1]["id"]
    assert len(hook.unique()) == 1 and stats.retries == 1 and stats.delivered == 1


async def test_410_disables_the_endpoint_until_it_is_enabled(tmp_path: Path) -> None:
    hook = Hook(script=[(410, {})])
    await hook.start()
    try:
        async with service(tmp_path, endpoint("a", hook)) as svc:
            seq = EventSequencer("c", SystemClock())
            svc.publish(seq.next("call.started", {}))
            await until(lambda: svc.deliverers["a"].disabled is not None)
            svc.publish(seq.next("call.ended", {}))
            await svc.outbox.flush()
            await asyncio.sleep(0.3)  # what would have been several retries
            assert len(hook.attempts) == 1
            assert "410" in (svc.deliverers["a"].disabled or "")
            svc.deliverers["a"].enable()
            await hook.until(lambda: len(hook.accepted) == 2)
    finally:
        await hook.stop()
    assert [e["type"] for e in hook.accepted] == ["call.started", "call.ended"]


async def test_deltas_expire_at_their_horizon_finals_keep_trying(tmp_path: Path) -> None:
    hook = Hook(status=500)
    await hook.start()
    try:
        horizons = {"transcript.delta": 0.3}
        async with service(
            tmp_path, endpoint("a", hook, mode="parallel", horizons_s=horizons)
        ) as svc:
            seq = EventSequencer("c", SystemClock())
            svc.publish(seq.next("transcript.delta", {"text": "a", "segment_id": 0}))
            svc.publish(seq.next("transcript.final", {"text": "a", "segment_id": 0}))
            stats = svc.deliverers["a"].stats
            await until(lambda: stats.expired == 1)
            retried = stats.retries
            await until(lambda: stats.retries >= retried + 2)  # past the delta's horizon
            assert svc.deliverers["a"].pending == 1, "the final is still being retried"
            hook.status = 204
            await hook.until(lambda: len(hook.accepted) == 1)
            # The receiver has it; the deliverer records that once the response is read.
            await until(lambda: svc.deliverers["a"].stats.delivered == 1)
            await svc.outbox.flush()
            rows = await svc.outbox.aread("SELECT status FROM deliveries ORDER BY pos")
    finally:
        await hook.stop()
    assert [r[0] for r in rows] == ["expired", "delivered"]
    assert hook.accepted[0]["type"] == "transcript.final"


async def test_pending_deliveries_survive_a_restart(tmp_path: Path) -> None:
    hook = Hook()
    seq = EventSequencer("c", SystemClock())
    async with service(tmp_path, endpoint("a", hook)) as svc:  # the receiver is down
        for _ in range(5):
            svc.publish(seq.next("transcript.final", {"text": "x"}))
        await until(lambda: svc.deliverers["a"].stats.retries >= 2)
    await hook.start()
    try:
        async with service(tmp_path, endpoint("a", hook)):
            await hook.until(lambda: len(hook.unique()) == 5)
    finally:
        await hook.stop()
    assert [e["seq"] for e in hook.unique()] == [0, 1, 2, 3, 4]


@asynccontextmanager
async def api(svc: EventService) -> AsyncIterator[TestServer]:
    """The events routes and ``/metrics`` of an app around ``svc`` (no calls)."""
    app = web.Application()
    events_api.add_routes(app, svc)
    calls = SimpleNamespace(calls={}, refused={}, accepting=True)
    watch = metrics.Metrics()
    watch.start(app, svc, calls)  # type: ignore[arg-type]
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield server
    finally:
        await server.close()
        await watch.stop()


async def read_sse(resp: aiohttp.ClientResponse, n: int) -> list[tuple[int, dict[str, Any]]]:
    """The next ``n`` events of an SSE response: (id, envelope)."""
    got: list[tuple[int, dict[str, Any]]] = []
    fields: dict[str, str] = {}
    async with asyncio.timeout(10):
        while len(got) < n:
            line = (await resp.content.readline()).decode().rstrip("\n")
            if line.startswith(":"):
                continue
            if line:
                key, _, value = line.partition(": ")
                fields[key] = value
            elif "data" in fields:
                got.append((int(fields["id"]), json.loads(fields["data"])))
                fields = {}
    return got


async def test_sse_resumes_with_last_event_id_without_gaps(tmp_path: Path) -> None:
    async with service(tmp_path) as svc, api(svc) as server, aiohttp.ClientSession() as http:
        a, b = EventSequencer("a", SystemClock()), EventSequencer("b", SystemClock())
        url = server.make_url("/v1/events")
        async with http.get(url, params={"call_id": "a"}) as resp:
            assert resp.headers["Content-Type"] == "text/event-stream"
            for i in range(10):
                svc.publish(a.next("transcript.final", {"text": str(i)}))
                svc.publish(b.next("transcript.final", {"text": str(i)}))
            first = await read_sse(resp, 4)
        # Disconnected: these happen while nobody listens.
        for i in range(10, 15):
            svc.publish(a.next("transcript.final", {"text": str(i)}))
        svc.publish(a.next("call.ended", {}))
        await svc.outbox.flush()
        headers = {"Last-Event-ID": str(first[-1][0])}
        async with http.get(url, params={"call_id": "a"}, headers=headers) as resp:
            rest = await read_sse(resp, 12)
            svc.publish(a.next("dtmf", {"digit": "1"}))  # live after the catch-up
            live = await read_sse(resp, 1)
        async with http.get(url, params={"type": "call.*", "last_event_id": "0"}) as resp:
            only_ended = await read_sse(resp, 1)
    seqs = [e["seq"] for _, e in first + rest + live]
    assert seqs == list(range(17)), "every event of call a, once, in order"
    assert {e["call_id"] for _, e in first + rest} == {"a"}
    assert [p for p, _ in first + rest] == sorted(p for p, _ in first + rest)
    assert only_ended[0][1]["type"] == "call.ended"


async def until_line(reader: asyncio.StreamReader, part: bytes) -> None:
    """Read lines until one holds ``part``; the stream's end first fails (a closed stream reads
    ``b""`` at once, for ever, and a loop on it would never let a timeout fire)."""
    while part not in (line := await reader.readline()):
        assert line, f"the stream ended before a line with {part!r}"


async def test_a_live_stream_client_that_goes_away_is_no_server_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """curl -N stopped with Ctrl-C: the next write finds the connection gone; the stream ends
    quietly instead of logging aiohttp's "Error handling request" with a traceback."""
    async with service(tmp_path) as svc:
        app = web.Application()
        events_api.add_routes(app, svc)
        # As `voxphone serve` runs it: without TestServer's handler_cancellation, the handler
        # is not cancelled when the client goes; it learns at its next write.
        runner = web.AppRunner(app)
        await runner.setup()
        try:
            site = web.SockSite(runner, socket.create_server(("127.0.0.1", 0)))
            await site.start()
            port = runner.addresses[0][1]
            seq = EventSequencer("c", SystemClock())
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /v1/events HTTP/1.1\r\nHost: x\r\n\r\n")
            async with asyncio.timeout(10):
                # The stream is open (its opening comment is sent once its position is taken):
                # an event published before that is history, not this live stream's.
                await until_line(reader, b": voxphone events")
                svc.publish(seq.next("call.started", {}))
                await until_line(reader, b"call.started")
            writer.close()  # the client is gone, as curl is when killed
            await writer.wait_closed()
            for i in range(20):  # events for a connection that is no more
                svc.publish(seq.next("transcript.final", {"text": str(i)}))
                await asyncio.sleep(0.02)
            await svc.outbox.flush()
            await asyncio.sleep(0.2)
        finally:  # a server left open would hold uvloop's loop.close() for ever
            await runner.cleanup()
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert errors == [], [r.getMessage() for r in errors]


async def test_websocket_stream_filters_and_resumes(tmp_path: Path) -> None:
    async with service(tmp_path) as svc, api(svc) as server, aiohttp.ClientSession() as http:
        seq = EventSequencer("c", SystemClock())
        for kind in ("call.started", "transcript.delta", "transcript.final", "call.ended"):
            svc.publish(seq.next(kind, {}))
        await svc.outbox.flush()
        params = {"last_event_id": "0", "type": "transcript.final"}
        async with http.ws_connect(server.make_url("/v1/events/ws"), params=params) as ws:
            msg = json.loads(await ws.receive_str(timeout=5))
            svc.publish(seq.next("transcript.final", {"text": "live"}))
            live = json.loads(await ws.receive_str(timeout=5))
    assert (msg["cursor"], msg["event"]["type"]) == (3, "transcript.final")
    assert live["event"]["data"] == {"text": "live"} and live["cursor"] == 5


async def test_ops_api_lists_failures_replays_and_reenables(tmp_path: Path) -> None:
    hook = Hook(status=500)
    await hook.start()
    try:
        ep = endpoint("crm", hook, max_attempts=2)
        async with (
            service(tmp_path, ep) as svc,
            api(svc) as server,
            aiohttp.ClientSession() as http,
        ):
            seq = EventSequencer("c", SystemClock())
            events = [seq.next("transcript.final", {"text": str(i)}) for i in range(3)]
            for e in events:
                svc.publish(e)
            await until(lambda: svc.deliverers["crm"].stats.failed == 3)
            await svc.outbox.flush()
            async with http.get(
                server.make_url("/v1/deliveries"), params={"status": "failed"}
            ) as r:
                failed = (await r.json())["deliveries"]
            hook.status = 204
            replay = {"endpoint": "crm", "event_id": events[1].id}
            async with http.post(server.make_url("/v1/deliveries/replay"), json=replay) as r:
                assert (await r.json())["replayed"] == 1
            await hook.until(lambda: len(hook.accepted) == 1)
            since = {"endpoint": "crm", "since": events[0].timestamp, "call_id": "c"}
            async with http.post(server.make_url("/v1/deliveries/replay"), json=since) as r:
                assert (await r.json())["replayed"] == 3
            await hook.until(lambda: len(hook.accepted) == 4)
            svc.deliverers["crm"].disable("by hand")
            async with http.post(server.make_url("/v1/endpoints/crm/enable")) as r:
                assert r.status == 200
            async with http.get(server.make_url("/v1/endpoints")) as r:
                (listed,) = (await r.json())["endpoints"][1:]
            async with http.get(server.make_url("/v1/deliveries"), params={"status": "nope"}) as r:
                assert r.status == 400 and "status" in (await r.json())["error"]
    finally:
        await hook.stop()
    assert [(d["event_id"], d["attempts"], d["last_error"]) for d in failed] == [
        (e.id, 2, "HTTP 500") for e in events
    ]
    assert [e["id"] for e in hook.accepted] == [events[1].id] + [e.id for e in events]
    assert listed["name"] == "crm" and listed["disabled"] is None and listed["failed"] == 3


async def test_a_redirect_is_a_failed_attempt_and_is_never_followed(tmp_path: Path) -> None:
    """A 301 is retried and shows in ``/v1/deliveries`` with its ``Location``; the signed
    request never reaches the redirect target (which would take any method)."""
    elsewhere: list[str] = []

    async def target(request: web.Request) -> web.Response:
        elsewhere.append(f"{request.method} {request.path}")
        return web.Response(status=200)

    target_app = web.Application()
    target_app.router.add_route("*", "/{tail:.*}", target)
    moved_to = TestServer(target_app, host="127.0.0.1")
    await moved_to.start_server()
    location = str(moved_to.make_url("/elsewhere"))
    hook = Hook(script=[(301, {"Location": location})] * 1000)
    await hook.start()
    try:
        async with (
            service(tmp_path, endpoint("a", hook)) as svc,
            api(svc) as server,
            aiohttp.ClientSession() as http,
        ):
            svc.publish(EventSequencer("c", SystemClock()).next("call.started", {}))
            stats = svc.deliverers["a"].stats
            await until(lambda: stats.retries >= 2 or stats.delivered > 0)
            assert elsewhere == [] and stats.delivered == 0, "a redirect was followed"
            await svc.outbox.flush()
            params = {"status": "pending", "endpoint": "a"}
            async with http.get(server.make_url("/v1/deliveries"), params=params) as r:
                (waiting,) = (await r.json())["deliveries"]
            hook.script.clear()  # the receiver is fixed: 204 from now on
            await hook.until(lambda: len(hook.accepted) == 1)
            await until(lambda: stats.delivered == 1)
    finally:
        await hook.stop()
        await moved_to.close()
    assert elsewhere == []
    assert waiting["last_error"] == f"HTTP 301 to {location} (not followed)"
    assert waiting["attempts"] >= 2
    assert {a.status for a in hook.attempts} == {301, 204}


async def test_expired_deltas_leave_no_gap_in_seq(tmp_path: Path) -> None:
    """Through an outage longer than the delta horizon every delta expires, yet the durable
    events arrive as seq 0..call.ended's, which is what a receiver checks (README, Events)."""
    from voxphone.receive import Ledger

    hook = Hook(status=503)
    await hook.start()
    ep = endpoint("a", hook, mode="parallel", horizons_s={"transcript.delta": 0.3})
    try:
        async with service(tmp_path, ep) as svc:
            sent = await synthetic_call(svc, "c", random.Random(1))
            deltas = sum(e.type == "transcript.delta" for e in sent)
            await until(lambda: svc.deliverers["a"].stats.expired == deltas)
            hook.status = 204
            await hook.until(lambda: len(hook.unique()) == len(sent) - deltas)
    finally:
        await hook.stop()
    got = sorted(hook.unique(), key=lambda e: e["seq"])
    ended = got[-1]
    assert ended["type"] == "call.ended" and ended["data"]["events"]["transcript.delta"] == deltas
    assert [e["seq"] for e in got] == list(range(ended["seq"] + 1)), "no hole in seq"
    ledger = Ledger()
    assert [ledger.add(e) for e in got][-1] == f"c: complete: seq 0-{ended['seq']}, 0 deltas"


async def test_every_secret_of_an_endpoint_signs_each_request(tmp_path: Path) -> None:
    """Key rotation: with ``secrets = [new, old]`` a receiver still on the old key and one
    already on the new key both verify every request (one ``v1,`` signature per secret)."""
    old, new = new_secret(), new_secret()
    on_old, on_new = Hook(secret=old), Hook(secret=new)
    await on_old.start()
    await on_new.start()
    try:
        async with service(
            tmp_path,
            endpoint("old", on_old, secrets=[new, old]),
            endpoint("new", on_new, secrets=[new, old]),
        ) as svc:
            svc.publish(EventSequencer("c", SystemClock()).next("call.started", {}))
            await on_old.until(lambda: len(on_old.attempts) == 1)
            await on_new.until(lambda: len(on_new.attempts) == 1)
    finally:
        await on_old.stop()
        await on_new.stop()
    assert on_old.bad_signatures == on_new.bad_signatures == 0
    assert len(on_old.accepted) == len(on_new.accepted) == 1


async def test_an_endpoint_gets_only_the_types_it_asked_for(tmp_path: Path) -> None:
    picky, everything = Hook(), Hook()
    await picky.start()
    await everything.start()
    try:
        async with service(
            tmp_path,
            endpoint("picky", picky, types=["transcript.final", "call.*"]),
            endpoint("all", everything),
        ) as svc:
            sent = await synthetic_call(svc, "c", random.Random(2))
            await everything.until(lambda: len(everything.unique()) == len(sent))
            await until(lambda: svc.deliverers["picky"].pending == 0)
            await svc.outbox.flush()
            rows = await svc.outbox.aread(
                "SELECT count(*) FROM deliveries WHERE endpoint = 'picky'"
            )
    finally:
        await picky.stop()
        await everything.stop()
    wanted = [e.id for e in sent if e.type in ("transcript.final", "call.started", "call.ended")]
    assert [e["id"] for e in picky.unique()] == wanted and len(wanted) == 5
    assert rows == [(5,)], "no delivery row for a type the endpoint filters out"


@pytest.mark.parametrize("mode", ["parallel", "ordered"])
async def test_an_endpoint_never_has_more_than_concurrency_requests_in_flight(
    tmp_path: Path, mode: str
) -> None:
    """``concurrency = 3``: a slow receiver sees exactly 3 requests at once, never 4 (in
    ``ordered`` mode across calls: each call has one in flight)."""
    hook = Hook(delay_s=0.2)
    await hook.start()
    try:
        async with service(tmp_path, endpoint("a", hook, mode=mode, concurrency=3)) as svc:
            for i in range(12):
                svc.publish(EventSequencer(f"c{i}", SystemClock()).next("call.started", {}))
            await hook.until(lambda: len(hook.accepted) == 12)
    finally:
        await hook.stop()
    assert hook.most_in_flight == 3


async def test_delivery_metrics_count_each_outcome(tmp_path: Path) -> None:
    """``/metrics`` per endpoint, each sample present with its value: ``a`` delivers after two
    500s; ``b`` gives a final up after two attempts and expires a delta; ``c`` answered 410."""
    a = Hook(script=[(500, {}), (500, {})])
    b, c = Hook(status=500), Hook(status=410)
    for hook in (a, b, c):
        await hook.start()
    try:
        async with (
            service(
                tmp_path,
                endpoint("a", a, types=["transcript.final"]),
                endpoint("b", b, mode="parallel", max_attempts=2,
                         horizons_s={"transcript.delta": 1e-6}),
                endpoint("c", c),
            ) as svc,
            api(svc) as server,
            aiohttp.ClientSession() as http,
        ):  # fmt: skip
            seq = EventSequencer("call", SystemClock())
            svc.publish(seq.next("transcript.final", {"text": "hi"}))
            svc.publish(seq.next("transcript.delta", {"text": "h"}))
            da, db, dc = (svc.deliverers[n] for n in "abc")
            await until(lambda: da.stats.delivered == 1 and dc.disabled is not None)
            await until(lambda: db.stats.failed == 1 and db.stats.expired == 1)
            async with http.get(server.make_url("/metrics")) as r:
                scraped = await r.text()
    finally:
        for hook in (a, b, c):
            await hook.stop()

    def deliveries(endpoint: str, outcome: str) -> float:
        return metric(scraped, "voxphone_deliveries_total", endpoint=endpoint, outcome=outcome)

    def per(name: str, endpoint: str) -> float:
        return metric(scraped, name, endpoint=endpoint)

    assert [deliveries("a", o) for o in ("delivered", "failed", "expired")] == [1, 0, 0]
    assert [deliveries("b", o) for o in ("delivered", "failed", "expired")] == [0, 1, 1]
    assert [per("voxphone_delivery_retries_total", n) for n in "abc"] == [2, 1, 1]
    assert [per("voxphone_delivery_pending", n) for n in "abc"] == [0, 0, 2]
    assert [per("voxphone_endpoint_disabled", n) for n in "abc"] == [0, 0, 1]
    assert deliveries("a", "coalesced") == 0
    assert metric(scraped, "voxphone_outbox_committed_total") == 2
    assert metric(scraped, "voxphone_outbox_healthy") == 1


async def test_compaction_deletes_what_is_done_and_keeps_what_is_pending(
    tmp_path: Path,
) -> None:
    """``POST /v1/outbox/compact`` (retention: a few µs) deletes the delivered events and
    their rows; the one still pending for a down endpoint stays, with its row."""
    up, down = Hook(), Hook()  # ``down`` is never started
    await up.start()
    try:
        async with (
            service(tmp_path, endpoint("up", up), endpoint("down", down, types=["call.ended"]),
                    **{"outbox.retention_h": 1e-9}) as svc,
            api(svc) as server,
            aiohttp.ClientSession() as http,
        ):  # fmt: skip
            seq = EventSequencer("c", SystemClock())
            for kind in ("call.started", "transcript.final", "call.ended"):
                svc.publish(seq.next(kind, {}))
            await up.until(lambda: len(up.accepted) == 3)
            await until(lambda: svc.deliverers["up"].stats.delivered == 3)
            await svc.outbox.flush()
            async with http.post(server.make_url("/v1/outbox/compact")) as r:
                assert r.status == 200
                deleted = (await r.json())["deleted"]
            left = await svc.outbox.aread("SELECT type FROM events")
            rows = await svc.outbox.aread("SELECT endpoint, status FROM deliveries ORDER BY 1")
    finally:
        await up.stop()
    assert deleted == 2
    assert left == [("call.ended",)]
    assert rows == [("down", "pending"), ("up", "delivered")]
