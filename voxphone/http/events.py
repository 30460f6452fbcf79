"""Event routes: the live stream (SSE, websocket) and the delivery operations API.

``GET /v1/events`` (SSE) and ``GET /v1/events/ws`` stream committed events, filtered by
``call_id`` and ``type`` (repeatable, ``call.*`` patterns); ``Last-Event-ID`` (or
``?last_event_id=``) resumes from the outbox after that position. The rest is for operators:
failed deliveries, replays, re-enabling an endpoint, compaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from voxphone.clock import iso_utc
from voxphone.events.service import EventService
from voxphone.events.stream import Filter, follow, head
from voxphone.http.api import error

EVENTS = web.AppKey("events", EventService)
#: Live stream handlers, cancelled at shutdown (they would otherwise hold it up).
STREAMS = web.AppKey("event_streams", set[asyncio.Task[object]])
STATUSES = ("pending", "delivered", "failed", "expired", "coalesced")


def _filter(request: web.Request) -> Filter:
    return Filter(request.query.get("call_id"), request.query.getall("type", []))


async def _cursor(request: web.Request) -> int:
    given = request.headers.get("Last-Event-ID") or request.query.get("last_event_id")
    if given is None:
        return await head(request.app[EVENTS].outbox)
    if not given.isdecimal():
        raise web.HTTPBadRequest(text=f"Last-Event-ID must be an outbox position, got {given!r}")
    return int(given)


@contextlib.contextmanager
def _tracked(request: web.Request) -> Iterator[None]:
    task: asyncio.Task[object] | None = asyncio.current_task()
    assert task is not None
    request.app[STREAMS].add(task)
    try:
        yield
    finally:
        request.app[STREAMS].discard(task)


async def _close_streams(app: web.Application) -> None:
    streams: set[asyncio.Task[object]] = app[STREAMS]
    for task in list(streams):
        task.cancel()


async def sse(request: web.Request) -> web.StreamResponse:
    with _tracked(request):
        return await _sse(request)


async def _sse(request: web.Request) -> web.StreamResponse:
    svc, after = request.app[EVENTS], await _cursor(request)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-cache"})  # fmt: skip
    await resp.prepare(request)
    # A client that went away (``curl -N`` stopped) shows at the next write: aiohttp does not
    # cancel handlers when a connection drops. The normal end of a stream, not an error.
    with contextlib.suppress(ConnectionResetError):
        await resp.write(b": voxphone events\n\n")
        async for stored in follow(svc.outbox, svc.live, after, _filter(request)):
            if stored is None:
                await resp.write(b": keepalive\n\n")
                continue
            ev = stored.event
            await resp.write(b"id: %d\nevent: %s\ndata: %s\n\n" % (stored.pos, ev.type.encode(),
                                                                    stored.body))  # fmt: skip
    return resp


async def websocket(request: web.Request) -> web.StreamResponse:
    """Text frames ``{"cursor": <position>, "event": <envelope>}``."""
    with _tracked(request):
        return await _websocket(request)


async def _websocket(request: web.Request) -> web.StreamResponse:
    svc, after = request.app[EVENTS], await _cursor(request)
    ws = web.WebSocketResponse(heartbeat=15)
    await ws.prepare(request)
    with contextlib.suppress(ConnectionResetError):  # the client went away (as for SSE)
        async for stored in follow(svc.outbox, svc.live, after, _filter(request)):
            if ws.closed:
                break
            if stored is not None:
                await ws.send_str(f'{{"cursor":{stored.pos},"event":{stored.body.decode()}}}')
    return ws


async def list_endpoints(request: web.Request) -> web.Response:
    svc = request.app[EVENTS]
    return web.json_response({"endpoints": [
        {"name": d.name, "mode": d.policy.mode, "types": d.policy.types, "disabled": d.disabled,
         "pending": d.pending, **vars(d.stats)}
        for d in svc.deliverers.values()
    ]})  # fmt: skip


async def enable_endpoint(request: web.Request) -> web.Response:
    deliverer = request.app[EVENTS].deliverers.get(request.match_info["name"])
    if deliverer is None:
        return error(404, f"no endpoint {request.match_info['name']!r}")
    deliverer.enable()
    return web.json_response({"name": deliverer.name, "disabled": None})


async def list_deliveries(request: web.Request) -> web.Response:
    status = request.query.get("status", "failed")
    if status not in STATUSES:
        return error(400, f"status: expected one of {', '.join(STATUSES)}, got {status!r}")
    limit = request.query.get("limit", "100")
    if not limit.isdecimal():
        return error(400, f"limit: expected a number, got {limit!r}")
    ep = request.query.get("endpoint")
    rows = await request.app[EVENTS].outbox.aread(
        "SELECT d.endpoint, e.id, e.type, e.call_id, e.seq, e.pos, d.status, d.attempts, "
        "d.last_error, d.updated FROM deliveries d JOIN events e ON e.pos = d.pos "
        "WHERE d.status = ? AND (? IS NULL OR d.endpoint = ?) ORDER BY e.pos LIMIT ?",
        status, ep, ep, int(limit),
    )  # fmt: skip
    keys = ("endpoint", "event_id", "type", "call_id", "seq", "cursor", "status", "attempts",
            "last_error")  # fmt: skip
    return web.json_response({"deliveries": [
        {**dict(zip(keys, r[:-1], strict=True)), "updated": _iso(r[-1])} for r in rows
    ]})  # fmt: skip


def _iso(seconds: object) -> str | None:
    """An outbox time (Unix seconds) as events write theirs (RFC 3339, ms, Z)."""
    if not isinstance(seconds, int | float):
        return None
    return iso_utc(datetime.fromtimestamp(seconds, UTC))


REPLAY_BODY = (
    'a JSON object {"endpoint": name, "event_id": id} or '
    '{"endpoint": name, "since": time, "until"?: time, "call_id"?: id}, times in ISO 8601'
)


async def replay(request: web.Request) -> web.Response:
    """``{"endpoint", "event_id"}`` or ``{"endpoint", "since", "until"?, "call_id"?}`` (ISO
    8601 times): those events are delivered again, with their original ``webhook-id``."""
    svc = request.app[EVENTS]
    try:
        body = json.loads(await request.text() or "{}")
    except json.JSONDecodeError as exc:
        return error(400, f"body is not JSON: {exc}")
    if not isinstance(body, dict):
        return error(400, f"body: expected {REPLAY_BODY}")
    try:
        name = str(body["endpoint"])
        where, args = _replay_range(body)
    except KeyError as exc:
        return error(400, f"replay: missing {exc}: expected {REPLAY_BODY}")
    except (TypeError, ValueError) as exc:
        return error(400, f"replay: {exc}")
    deliverer = svc.deliverers.get(name)
    if deliverer is None:
        return error(404, f"no endpoint {name!r}")
    stored = await svc.outbox.replay(deliverer.name, where, *args)
    for s in stored:
        deliverer.add(s)
    return web.json_response({"endpoint": deliverer.name, "replayed": len(stored)})


def _replay_range(body: dict[str, Any]) -> tuple[str, list[object]]:
    if "event_id" in body:
        return "id = ?", [str(body["event_id"])]
    since = datetime.fromisoformat(body["since"]).timestamp()
    until = datetime.fromisoformat(body["until"]).timestamp() if "until" in body else 1e12
    call_id = body.get("call_id")
    return "created >= ? AND created <= ? AND (? IS NULL OR call_id = ?)", [
        since, until, call_id, call_id,
    ]  # fmt: skip


async def compact(request: web.Request) -> web.Response:
    return web.json_response({"deleted": await request.app[EVENTS].compact()})


def add_routes(app: web.Application, events: EventService) -> None:
    app[EVENTS] = events
    app[STREAMS] = set()
    app.on_shutdown.append(_close_streams)
    app.router.add_get("/v1/events", sse)
    app.router.add_get("/v1/events/ws", websocket)
    app.router.add_get("/v1/endpoints", list_endpoints)
    app.router.add_post("/v1/endpoints/{name}/enable", enable_endpoint)
    app.router.add_get("/v1/deliveries", list_deliveries)
    app.router.add_post("/v1/deliveries/replay", replay)
    app.router.add_post("/v1/outbox/compact", compact)
