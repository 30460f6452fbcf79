"""Event envelope, per-call sequencing, and Standard Webhooks signing and delivery."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from standardwebhooks import Webhook

from voxphone.clock import FakeClock
from voxphone.events.model import EventSequencer
from voxphone.events.webhook import WebhookSink, decode_secret, sign, signed_headers

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


def test_sequencer_is_gap_free_and_envelope_matches_design() -> None:
    seqr = EventSequencer("call_1", FakeClock())
    events = [seqr.next("transcript.delta", {"text": str(i)}) for i in range(5)]
    assert [e.seq for e in events] == [0, 1, 2, 3, 4]
    assert len({e.id for e in events}) == 5
    body = json.loads(events[0].to_json())
    assert set(body) == {"id", "type", "call_id", "seq", "timestamp", "data"}
    assert body["id"].startswith("evt_")
    assert body["timestamp"] == "2026-01-01T00:00:00.000Z"


def test_signature_verifies_with_the_reference_library() -> None:
    body = b'{"type":"call.started"}'
    headers = signed_headers(decode_secret(SECRET), "evt_1", 1_700_000_000, body)
    assert headers["webhook-signature"].startswith("v1,")
    wh = Webhook(SECRET)
    # The reference checks the timestamp against now; sign a fresh one for it.
    now = int(time.time())
    fresh = signed_headers(decode_secret(SECRET), "evt_1", now, body)
    assert wh.verify(body, fresh) == {"type": "call.started"}
    assert headers["webhook-signature"] == sign(decode_secret(SECRET), "evt_1", 1_700_000_000, body)


def test_unsigned_when_no_secret() -> None:
    assert "webhook-signature" not in signed_headers(None, "evt_1", 1, b"{}")


class Receiver:
    """A real HTTP server that records (or refuses) webhook POSTs."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.requests: list[tuple[dict[str, str], bytes]] = []
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self.server = TestServer(app, host="127.0.0.1")

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append((dict(request.headers), await request.read()))
        return web.Response(status=self.status)

    @property
    def url(self) -> str:
        return str(self.server.make_url("/hook"))


async def test_delivers_in_order_with_valid_signatures() -> None:
    rx = Receiver()
    await rx.server.start_server()
    try:
        sink = WebhookSink(rx.url, SECRET, FakeClock())
        await sink.start()
        seqr = EventSequencer("call_1", FakeClock())
        for i in range(20):
            sink.publish(seqr.next("transcript.delta", {"text": str(i)}))
        await sink.close()
    finally:
        await rx.server.close()
    assert [json.loads(body)["seq"] for _, body in rx.requests] == list(range(20))
    assert sink.stats.delivered == 20
    h, body = rx.requests[0]
    expected = sign(decode_secret(SECRET), h["webhook-id"], int(h["webhook-timestamp"]), body)
    assert h["webhook-signature"] == expected
    assert h["webhook-id"] == json.loads(body)["id"]


@pytest.mark.parametrize("status", [500, 404, 302])
async def test_non_2xx_is_counted_as_failure(status: int) -> None:
    rx = Receiver(status)
    await rx.server.start_server()
    try:
        sink = WebhookSink(rx.url, None, FakeClock())
        await sink.start()
        sink.publish(EventSequencer("c", FakeClock()).next("dtmf", {"digit": "1"}))
        await sink.close()
    finally:
        await rx.server.close()
    assert (sink.stats.delivered, sink.stats.failed) == (0, 1)


async def test_unreachable_receiver_never_blocks_publish() -> None:
    sink = WebhookSink("http://127.0.0.1:9/hook", None, FakeClock(), timeout_s=1, queue_size=3)
    await sink.start()
    seqr = EventSequencer("c", FakeClock())
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    for _ in range(10):
        sink.publish(seqr.next("transcript.delta", {"text": "x"}))
    assert loop.time() - t0 < 0.05
    await sink.close(timeout_s=3)
    assert sink.stats.dropped >= 6
    assert sink.stats.failed + sink.stats.dropped == 10


async def test_receive_command_verifies_signatures(capsys: pytest.CaptureFixture[str]) -> None:
    from voxphone.receive import create_receiver

    server = TestServer(create_receiver(SECRET), host="127.0.0.1")
    await server.start_server()
    try:
        sink = WebhookSink(str(server.make_url("/any/path")), SECRET, FakeClock())
        await sink.start()
        sink.publish(EventSequencer("c", FakeClock()).next("dtmf", {"digit": "5"}))
        await sink.close()
        forged = WebhookSink(str(server.make_url("/")), "whsec_" + "QUJD" * 8, FakeClock())
        await forged.start()
        forged.publish(EventSequencer("c", FakeClock()).next("dtmf", {"digit": "6"}))
        await forged.close()
    finally:
        await server.close()
    assert (sink.stats.delivered, forged.stats.failed) == (1, 1)
    out = capsys.readouterr()
    assert json.loads(out.out.splitlines()[0])["data"] == {"digit": "5"}
    assert "rejected: bad or missing webhook-signature" in out.err
