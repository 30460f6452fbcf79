"""aiohttp's own refusals under ``/v1/`` (no route, wrong method, a body over the request
limit, a plain GET on a websocket route) are one line of JSON, shaped like every other refusal;
outside ``/v1/`` (the demo page) aiohttp's answers stay as they are."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from voxphone.http.api import TOKEN, json_errors, require_token


async def _read_json(request: web.Request) -> web.Response:
    return web.json_response(await request.json())


async def _socket(request: web.Request) -> web.StreamResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    return ws


@pytest.fixture
async def base() -> AsyncIterator[str]:
    app = web.Application(middlewares=[json_errors])
    app.router.add_post("/v1/calls/{call_id}/play", _read_json)
    app.router.add_get("/v1/calls/{call_id}/audio", _socket)
    app.router.add_post("/page", _read_json)
    async with TestServer(app, host="127.0.0.1") as server:
        yield str(server.make_url(""))


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "says"),
    [
        ("GET", "/v1/calls/c/play", None, 405, "method not allowed here; use POST"),
        ("POST", "/v1/nowhere", None, 404, "no such route"),
        ("POST", "/v1/calls/c/play", b"{" + b" " * 2_000_000, 413, "playback.max_clip_bytes"),
        ("GET", "/v1/calls/c/audio", None, 400, "is a websocket: connect with a websocket"),
    ],
    ids=["method", "route", "too-large", "not-upgraded"],
)
async def test_aiohttp_refusals_are_one_line_of_json(
    base: str, method: str, path: str, body: bytes | None, status: int, says: str
) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, base + path, data=io.BytesIO(body) if body else None) as r,
    ):
        assert r.status == status
        assert r.content_type == "application/json"
        why = json.loads(await r.text())["error"]
    assert says in why and path in why and "\n" not in why, why


async def test_outside_the_api_aiohttp_answers_unchanged(base: str) -> None:
    async with aiohttp.ClientSession() as http, http.get(base + "/page") as r:
        assert r.status == 405 and r.content_type == "text/plain"


async def test_a_missing_token_is_refused_saying_how_to_send_it() -> None:
    app = web.Application(middlewares=[json_errors, require_token])
    app[TOKEN] = "s3cret"
    app.router.add_post("/v1/calls/{call_id}/play", _read_json)
    async with TestServer(app, host="127.0.0.1") as server, aiohttp.ClientSession() as http:
        async with http.post(server.make_url("/v1/calls/c/play"), json={}) as r:
            assert r.status == 401
            why = (await r.json())["error"]
        headers = {"Authorization": "Bearer s3cret"}
        async with http.post(server.make_url("/v1/calls/c/play"), json={}, headers=headers) as r:
            assert r.status == 200
    assert "missing or wrong token" in why and "Authorization: Bearer" in why, why
    assert "?token=" in why and "s3cret" not in why, why
