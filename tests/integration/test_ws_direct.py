"""``DirectWebSocketResponse``: messages taken as aiohttp parses them, in order with those left to
``receive``, against a real aiohttp server and client on 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestServer
from structlog.testing import capture_logs

from voxphone.transports import ws_direct
from voxphone.transports.ws_direct import DirectWebSocketResponse

pytestmark = [pytest.mark.integration, pytest.mark.each_loop]

Taker = Callable[[list[tuple[str, Any]]], Callable[[Any], bool]]


@asynccontextmanager
async def server(taker: Taker, kind: WSMsgType = WSMsgType.TEXT) -> AsyncIterator[dict[str, Any]]:
    """A websocket endpoint that offers ``kind`` messages to ``taker(seen)`` and records in
    ``seen`` the rest as its ``async for`` gets them; ``state`` has what each connection did."""
    state: dict[str, Any] = {"seen": [], "taking": None, "errors": [], "done": asyncio.Event()}

    async def handle(request: web.Request) -> web.WebSocketResponse:
        ws = DirectWebSocketResponse()
        await ws.prepare(request)
        seen: list[tuple[str, Any]] = state["seen"]
        state["taking"] = ws.take(kind, taker(seen))
        async for msg in ws:
            if msg.type is WSMsgType.ERROR:
                state["errors"].append(msg.data)
            else:
                seen.append(("loop", msg.data))
                await ws.send_str(f"loop saw {msg.data}")
        state["done"].set()
        return ws

    app = web.Application()
    app.router.add_get("/ws", handle)
    async with TestServer(app, host="127.0.0.1") as srv:
        state["url"] = str(srv.make_url("/ws"))
        yield state


def taking_all_but(declined: set[str]) -> Taker:
    def make(seen: list[tuple[str, Any]]) -> Callable[[Any], bool]:
        def take(data: Any) -> bool:
            if data in declined:
                return False
            seen.append(("taken", data))
            return True

        return take

    return make


needs_direct = pytest.mark.skipif(
    not ws_direct.DIRECT_READING,
    reason=f"aiohttp {aiohttp.__version__} is not a release ws_direct follows {ws_direct.SUPPORTED}",
)


@needs_direct
async def test_taken_and_declined_messages_keep_their_order() -> None:
    messages = [f"m{i}" for i in range(200)]
    declined = {"m3", "m4", "m50", "m51", "m52", "m199"}
    async with server(taking_all_but(declined)) as st, aiohttp.ClientSession() as http:
        async with http.ws_connect(st["url"]) as ws:
            for m in messages:  # back to back: several frames reach the server in one read
                await ws.send_str(m)
            # Once the loop has had the declined ones, what follows is taken again.
            while (await asyncio.wait_for(ws.receive_str(), 10)) != "loop saw m199":
                pass
            await ws.send_str("after")
            await ws.close()
        await asyncio.wait_for(st["done"].wait(), 10)
    assert st["taking"] is True
    assert [data for _, data in st["seen"]] == [*messages, "after"]
    taken = [data for how, data in st["seen"] if how == "taken"]
    assert declined.isdisjoint(taken)
    assert taken[:3] == ["m0", "m1", "m2"] and taken[-1] == "after"


@needs_direct
async def test_order_holds_when_aiohttp_pauses_reading_behind_a_full_queue() -> None:
    """A message over the queue's limit (512 KiB) pauses reading; aiohttp then parses what it
    held back from inside the handler's ``read``, before the handler has that message: what
    follows must wait behind it, not be taken first."""
    big = "x" * (600 * 1024)
    messages = ["m0", big, *(f"m{i}" for i in range(1, 30))]
    async with server(taking_all_but({big})) as st, aiohttp.ClientSession() as http:
        async with http.ws_connect(st["url"], max_msg_size=0) as ws:
            for m in messages:
                await ws.send_str(m)
            await ws.close()
        await asyncio.wait_for(st["done"].wait(), 10)
    assert [data for _, data in st["seen"]] == messages


@needs_direct
async def test_only_the_kind_asked_for_is_taken_and_pings_are_answered() -> None:
    async with (
        server(taking_all_but(set()), WSMsgType.BINARY) as st,
        aiohttp.ClientSession() as http,
    ):
        async with http.ws_connect(st["url"], autoping=False) as ws:
            await ws.send_bytes(b"\x01\x02")
            await ws.send_str("text goes to the loop")
            await ws.ping(b"p")
            pong = await asyncio.wait_for(ws.receive(), 10)
            while pong.type is WSMsgType.TEXT:  # the loop's word on the text
                pong = await asyncio.wait_for(ws.receive(), 10)
            await ws.send_bytes(b"\x03")
            await ws.close()
        await asyncio.wait_for(st["done"].wait(), 10)
    assert pong.type is WSMsgType.PONG and pong.data == b"p"
    assert st["seen"] == [
        ("taken", b"\x01\x02"),
        ("loop", "text goes to the loop"),
        ("taken", b"\x03"),
    ]


@needs_direct
async def test_an_error_in_the_taker_ends_only_its_websocket() -> None:
    def failing(seen: list[tuple[str, Any]]) -> Callable[[Any], bool]:
        def take(data: Any) -> bool:
            if data == "boom":
                raise RuntimeError("taker failed")
            seen.append(("taken", data))
            return True

        return take

    with capture_logs() as logs:
        async with server(failing) as st, aiohttp.ClientSession() as http:
            async with http.ws_connect(st["url"]) as ws:
                await ws.send_str("before")
                await ws.send_str("boom")
                closing = await asyncio.wait_for(ws.receive(), 10)
            await asyncio.wait_for(st["done"].wait(), 10)
    assert closing.type is WSMsgType.CLOSE
    assert [str(e) for e in st["errors"]] == ["taker failed"]
    (failed,) = [e for e in logs if e["event"] == "websocket_message_failed"]
    assert failed["log_level"] == "error" and failed["exc_info"]
    assert st["seen"] == [("taken", "before")]


async def test_without_direct_reading_every_message_goes_to_receive(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another aiohttp release: ``take`` says no and changes nothing."""
    monkeypatch.setattr(ws_direct, "DIRECT_READING", False)
    async with server(taking_all_but(set())) as st, aiohttp.ClientSession() as http:
        async with http.ws_connect(st["url"]) as ws:
            for m in ("a", "b", "c"):
                await ws.send_str(m)
            await ws.close()
        await asyncio.wait_for(st["done"].wait(), 10)
    assert st["taking"] is False
    assert st["seen"] == [("loop", "a"), ("loop", "b"), ("loop", "c")]
