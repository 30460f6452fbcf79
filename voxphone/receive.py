"""``voxphone receive``: a webhook receiver for trying voxphone out. It verifies Standard Webhooks
signatures (when given the secret) and prints each event as a JSON line."""

from __future__ import annotations

import asyncio
import json
import sys

from aiohttp import web

from voxphone.events.webhook import decode_secret, sign


def verify(key: bytes, headers: dict[str, str], body: bytes) -> bool:
    """True when one of the ``v1,`` signatures matches (several appear during key rotation)."""
    try:
        expected = sign(key, headers["webhook-id"], int(headers["webhook-timestamp"]), body)
    except (KeyError, ValueError):
        return False
    return expected in headers.get("webhook-signature", "").split()


def create_receiver(secret: str | None) -> web.Application:
    key = decode_secret(secret) if secret else None

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        if key is not None and not verify(key, dict(request.headers), body):
            print("rejected: bad or missing webhook-signature", file=sys.stderr, flush=True)
            return web.Response(status=401, text="bad signature\n")
        try:
            event = json.loads(body)
        except json.JSONDecodeError:
            return web.Response(status=400, text="body is not JSON\n")
        print(json.dumps(event, ensure_ascii=False), flush=True)
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/{tail:.*}", handle)
    return app


async def receive(host: str, port: int, secret: str | None) -> None:
    runner = web.AppRunner(create_receiver(secret), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    verified = "verifying signatures" if secret else "not verifying signatures"
    print(f"listening on http://{host}:{port}/ ({verified})", file=sys.stderr, flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
