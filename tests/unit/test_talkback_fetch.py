"""``POST /v1/calls/{id}/play {"url"}`` fetches a clip server-side: every redirect hop is held
to the same rules as the URL, so an allowed (or public) server cannot send voxphone on to a
loopback or private address."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from voxphone.events.ssrf import HostPolicy
from voxphone.http.talkback import MAX_REDIRECTS, TalkbackLimits, fetch_clip

CLIP = b"RIFF-not-decoded-here"
INTERNAL = b"internal secret"


@pytest.fixture
async def internal() -> AsyncIterator[tuple[TestServer, list[str]]]:
    """A service on loopback that voxphone must never be sent to (records who asked)."""
    hits: list[str] = []

    async def secret(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(body=INTERNAL)

    app = web.Application()
    app.router.add_get("/secret", secret)
    async with TestServer(app, host="127.0.0.1") as server:
        yield server, hits


@pytest.fixture
async def allowed(internal: tuple[TestServer, list[str]]) -> AsyncIterator[TestServer]:
    """The clip server on 127.0.0.2 (what ``webhook.allowed_hosts`` names), with redirects."""
    target = internal[0]

    def go(location: str) -> web.Response:
        raise web.HTTPFound(location)

    app = web.Application()
    app.router.add_get("/clip.wav", lambda _r: web.Response(body=CLIP))
    app.router.add_get("/to-literal", lambda _r: go(str(target.make_url("/secret"))))
    app.router.add_get("/to-name", lambda _r: go(f"http://localhost:{target.port}/secret"))
    app.router.add_get("/to-file", lambda _r: go("file:///etc/passwd"))
    app.router.add_get("/relative", lambda _r: go("/clip.wav"))
    app.router.add_get("/loop", lambda _r: go("/loop"))
    async with TestServer(app, host="127.0.0.2") as server:
        yield server


POLICY = HostPolicy(["127.0.0.2"])
LIMITS = TalkbackLimits(fetch_timeout_s=5)


async def test_allowed_clips_and_redirects_within_the_rules_are_fetched(
    allowed: TestServer,
) -> None:
    assert await fetch_clip(str(allowed.make_url("/clip.wav")), POLICY, LIMITS) == CLIP
    assert await fetch_clip(str(allowed.make_url("/relative")), POLICY, LIMITS) == CLIP


@pytest.mark.parametrize("path", ["/to-literal", "/to-name", "/to-file"])
async def test_a_redirect_to_a_refused_address_is_not_followed(
    allowed: TestServer, internal: tuple[TestServer, list[str]], path: str
) -> None:
    url = str(allowed.make_url(path))
    with pytest.raises(web.HTTPUnprocessableEntity) as refused:
        await fetch_clip(url, POLICY, LIMITS)
    why = json.loads(refused.value.text or "")["error"]
    assert why.startswith(f"url: {url} redirects to "), why
    assert "webhook.allowed_hosts" in why or "only http:// and https://" in why, why
    assert internal[1] == []  # the loopback service was never asked


async def test_endless_redirects_stop(allowed: TestServer) -> None:
    with pytest.raises(web.HTTPUnprocessableEntity) as refused:
        await fetch_clip(str(allowed.make_url("/loop")), POLICY, LIMITS)
    assert f"more than {MAX_REDIRECTS} redirects" in (refused.value.text or "")
