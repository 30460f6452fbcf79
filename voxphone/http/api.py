"""aiohttp routes. Handlers are thin: they read the registry and answer JSON."""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import WSCloseCode, web
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from voxphone import __version__
from voxphone.call import CallRegistry
from voxphone.validation import error_message

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
REGISTRY = web.AppKey("registry", CallRegistry)
TOKEN = web.AppKey("token", str)
#: Checks that make the service not ready: each returns why, or None when all is well.
PROBLEMS = web.AppKey("problems", list[Callable[[], str | None]])


def error(status: int, message: str) -> web.Response:
    """Every refusal's shape: ``{"error": "<what was wrong, and where>"}``."""
    return web.json_response({"error": message}, status=status)


def refusal(cls: type[web.HTTPError], message: str, **kwargs: Any) -> web.HTTPError:
    """``error`` as an exception, for helpers deep inside a handler."""
    return cls(text=json.dumps({"error": message}), content_type="application/json", **kwargs)


def invalid(exc: ValidationError) -> str:
    """A pydantic error as ``field.path: message; ...`` (``body`` for the body as a whole)."""
    return "; ".join(_invalid(e) for e in exc.errors())


_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}


def _invalid(e: ErrorDetails) -> str:
    where = ".".join(map(str, e["loc"])) or "body"
    if e["type"] != "model_type":
        return f"{where}: {error_message(e)}"
    got = _JSON_TYPES.get(type(e["input"]), "null" if e["input"] is None else "a number")
    return f'{where}: expected a JSON object ({{"field": value, ...}}), got {got}'


@web.middleware
async def require_token(request: web.Request, handler: Handler) -> web.StreamResponse:
    """``http.token``: /v1/ needs ``?token=`` or a bearer token; health and readiness do not,
    nor CORS preflights (browsers send those without credentials)."""
    token = request.app[TOKEN]
    if token and request.path.startswith("/v1/") and request.method != "OPTIONS":
        given = request.query.get("token") or request.headers.get("Authorization") or ""
        given = given.removeprefix("Bearer ")
        if not hmac.compare_digest(given.encode(), token.encode()):
            return error(
                401,
                "missing or wrong token: send the [http] token as 'Authorization: Bearer "
                "<token>', or as ?token=<token> in the URL (websockets, providers)",
            )
    return await handler(request)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own refusals under ``/v1/`` (no such route, wrong method, a body over the
    request limit, a plain GET on a websocket route) as every other refusal is shaped: one line
    of JSON saying the cause and the fix, instead of aiohttp's plain text."""
    try:
        return await handler(request)
    except web.HTTPError as exc:
        if not request.path.startswith("/v1/") or exc.content_type == "application/json":
            raise
        return error(exc.status, _plain_refusal(request, exc))


def _plain_refusal(request: web.Request, exc: web.HTTPError) -> str:
    where = f"{request.method} {request.path}"
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods - {"HEAD"}))
        return f"{where}: method not allowed here; use {allowed}"
    if isinstance(exc, web.HTTPNotFound):
        return f"{where}: no such route (the API is listed in README.md, Configuration)"
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return (
            f"{where}: {' '.join((exc.text or '').split())} (the limit for a JSON body); send "
            "audio as the body itself (up to playback.max_clip_bytes)"
        )
    if "WebSocket" in (exc.text or "") and request.headers.get("Upgrade") is None:
        return f"{where} is a websocket: connect with a websocket client (Upgrade: websocket)"
    return f"{where}: " + " ".join((exc.text or exc.reason).split())


#: Requests that start a call, by path: the transport named in refusal counts.
CALL_STARTS = {
    ("POST", "/v1/calls"): "rtp",
    ("POST", "/v1/whip"): "webrtc",
    ("POST", "/v1/webrtc/offer"): "webrtc",
    ("GET", "/v1/media/asterisk"): "asterisk_websocket",
    ("GET", "/v1/media/twilio"): "twilio",
    ("GET", "/v1/media/telnyx"): "telnyx",
    ("GET", "/v1/media/vonage"): "vonage",
    ("GET", "/v1/media/stream"): "stream",
}
#: Seconds a refused client should wait before trying again (another instance, by then).
RETRY_AFTER_S = 5
DRAINING = "draining: this instance is shutting down and takes no new calls"


@web.middleware
async def refuse_when_draining(request: web.Request, handler: Handler) -> web.StreamResponse:
    """While draining, a request that would start a call is refused before its handler runs:
    HTTP gets 503 with ``Retry-After``, a media websocket is accepted and closed at once with
    1013 (try again later) and the reason, so the provider fails over instead of retrying."""
    registry = request.app[REGISTRY]
    transport = CALL_STARTS.get((request.method, request.path))
    if transport is None or registry.accepting:
        return await handler(request)
    registry.refuse(transport, "draining")
    if request.headers.get("Upgrade", "").lower() == "websocket":
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.close(code=WSCloseCode.TRY_AGAIN_LATER, message=DRAINING.encode())
        return ws
    response = error(503, DRAINING)
    response.headers["Retry-After"] = str(RETRY_AFTER_S)
    return response


def create_app(registry: CallRegistry, token: str | None = None) -> web.Application:
    app = web.Application(middlewares=[json_errors, require_token, refuse_when_draining])
    app[TOKEN] = token or ""
    app[REGISTRY] = registry
    app[PROBLEMS] = []
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/v1/calls", list_calls)
    return app


async def health(request: web.Request) -> web.Response:
    """Liveness: the event loop answers."""
    return web.json_response({"status": "ok", "version": __version__})


async def ready(request: web.Request) -> web.Response:
    """Readiness: 200 while accepting calls, 503 once draining or while something is broken
    (the outbox can't write): take us out of rotation, and ``reason`` says why."""
    registry = request.app[REGISTRY]
    problems = [p for p in (check() for check in request.app[PROBLEMS]) if p]
    ok = registry.accepting and not problems
    body = {
        "status": "ready" if ok else ("draining" if not registry.accepting else "degraded"),
        "engine": registry.engine.name,
        "active_calls": len(registry.calls),
        "max_calls": registry.max_concurrent,
    }
    if problems:
        body["reason"] = "; ".join(problems)
    return web.json_response(body, status=200 if ok else 503)


async def list_calls(request: web.Request) -> web.Response:
    calls = [
        {
            "call_id": c.call_id,
            "transport": c.transport,
            "codec": c.codec.name,
            "audio_ms": c.pipeline.framer.position_ms,
            "metadata": c.metadata,
        }
        for c in request.app[REGISTRY].calls.values()
    ]
    return web.json_response({"calls": calls})
