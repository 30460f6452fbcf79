"""``voxphone receive``: a webhook receiver for trying voxphone out. It verifies Standard Webhooks
signatures (when given the secret), prints each event as a JSON line (with its arrival time,
``received_at``, and ``delay_ms`` since it was made), and checks each call
against the sequence contract (the README's "Events"): once ``call.ended`` is in, it says on
stderr whether every durable event arrived, or which ``seq`` are still missing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime

from aiohttp import web

from voxphone.clock import iso_utc
from voxphone.errors import ConfigError
from voxphone.events.webhook import decode_secret, sign


def verify(key: bytes, headers: dict[str, str], body: bytes) -> bool:
    """True when one of the ``v1,`` signatures matches (several appear during key rotation)."""
    try:
        expected = sign(key, headers["webhook-id"], int(headers["webhook-timestamp"]), body)
    except (KeyError, ValueError):
        return False
    return expected in headers.get("webhook-signature", "").split()


@dataclass
class _Call:
    seqs: set[int] = field(default_factory=set)
    last: int | None = None  # call.ended's seq: the call's durable events are 0..last
    deltas: set[int] = field(default_factory=set)
    complete: bool = False


@dataclass
class Ledger:
    """What a receiver holds of each call: durable ``seq`` (every one from 0 to
    ``call.ended``'s must come) and ``delta_seq`` (gaps there are deltas that expired or were
    coalesced: the segment's ``transcript.final`` has their text)."""

    calls: dict[str, _Call] = field(default_factory=dict)

    def add(self, event: object) -> str | None:
        """Take one decoded body (duplicates are fine). From the call's ``call.ended`` on,
        each of its events gives a line to report, until nothing is missing."""
        if not isinstance(event, dict) or not {"call_id", "type", "seq"} <= event.keys():
            return None  # not an envelope: printed, not counted
        call = self.calls.setdefault(event["call_id"], _Call())
        if "delta_seq" in event:
            call.deltas.add(event["delta_seq"])
        else:
            call.seqs.add(event["seq"])
        if event["type"] == "call.ended":
            call.last = event["seq"]
        elif call.last is None or call.complete:
            return None
        return self._report(event["call_id"], call)

    @staticmethod
    def _report(call_id: str, call: _Call) -> str | None:
        assert call.last is not None
        missing = sorted(set(range(call.last + 1)) - call.seqs)
        if missing:
            return f"{call_id}: waiting for seq {', '.join(map(str, missing))}"
        call.complete = True
        return f"{call_id}: complete: seq 0-{call.last}, {len(call.deltas)} deltas"


def arrived(event: object, now: datetime | None = None) -> object:
    """The event as printed: with ``received_at`` (RFC 3339, UTC) and, when it has a
    ``timestamp``, ``delay_ms`` (made → received: the delivery's latency, clocks allowing)."""
    if not isinstance(event, dict):
        return event
    now = now or datetime.now(UTC)
    stamped = {**event, "received_at": iso_utc(now)}
    with contextlib.suppress(KeyError, TypeError, ValueError):
        made = datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00"))
        stamped["delay_ms"] = round((now - made).total_seconds() * 1000)
    return stamped


def create_receiver(secret: str | None) -> web.Application:
    key = decode_secret(secret) if secret else None
    ledger = Ledger()

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        if key is not None and not verify(key, dict(request.headers), body):
            print("rejected: bad or missing webhook-signature", file=sys.stderr, flush=True)
            return web.Response(status=401, text="bad signature\n")
        try:
            event = json.loads(body)
        except json.JSONDecodeError:
            return web.Response(status=400, text="body is not JSON\n")
        print(json.dumps(arrived(event), ensure_ascii=False), flush=True)
        if (line := ledger.add(event)) is not None:
            print(line, file=sys.stderr, flush=True)
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/{tail:.*}", handle)
    return app


async def receive(host: str, port: int, secret: str | None) -> None:
    runner = web.AppRunner(create_receiver(secret), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --port"
        ) from None
    verified = "verifying signatures" if secret else "not verifying signatures"
    print(f"listening on http://{host}:{port}/ ({verified})", file=sys.stderr, flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
