"""aiohttp routes. Handlers are thin: they read the registry and answer JSON."""

from __future__ import annotations

from aiohttp import web

from voxphone import __version__
from voxphone.call import CallRegistry

REGISTRY = web.AppKey("registry", CallRegistry)


def create_app(registry: CallRegistry) -> web.Application:
    app = web.Application()
    app[REGISTRY] = registry
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/v1/calls", list_calls)
    return app


async def health(request: web.Request) -> web.Response:
    """Liveness: the event loop answers."""
    return web.json_response({"status": "ok", "version": __version__})


async def ready(request: web.Request) -> web.Response:
    """Readiness: 200 while accepting calls, 503 once draining (take us out of rotation)."""
    registry = request.app[REGISTRY]
    body = {
        "status": "ready" if registry.accepting else "draining",
        "engine": registry.engine.name,
        "active_calls": len(registry.calls),
        "max_calls": registry.max_concurrent,
    }
    return web.json_response(body, status=200 if registry.accepting else 503)


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
