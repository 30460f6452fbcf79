"""Event envelope, per-call sequencing, and Standard Webhooks signing."""

from __future__ import annotations

import base64
import json
import time

import pytest
from aiohttp.test_utils import TestServer
from standardwebhooks import Webhook

from voxphone.clock import FakeClock, SystemClock
from voxphone.events.delivery import Retry, Sent
from voxphone.events.model import Event, EventSequencer
from voxphone.events.outbox import Stored
from voxphone.events.webhook import HttpTransport, decode_secret, sign, signed_headers

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


def test_durable_events_are_numbered_gap_free_and_deltas_apart() -> None:
    """``seq`` counts everything but deltas, so a delta expiring leaves no hole in it; deltas
    carry ``delta_seq`` and the ``seq`` of the event they follow; the two restore the order."""
    seqr = EventSequencer("call_1", FakeClock())
    types = ["call.started", "transcript.delta", "transcript.delta", "transcript.final",
             "transcript.delta", "dtmf", "call.ended"]  # fmt: skip
    events = [seqr.next(t, {}) for t in types]
    assert [e.seq for e in events] == [0, 0, 0, 1, 1, 2, 3]
    assert [e.delta_seq for e in events] == [None, 0, 1, None, 2, None, None]
    by_order = sorted(events, key=lambda e: (e.seq, e.delta_seq is not None, e.delta_seq or 0))
    assert by_order == events
    assert len({e.id for e in events}) == 7
    assert events[-1].data["events"] == {"call.started": 1, "transcript.delta": 3,
                                         "transcript.final": 1, "dtmf": 1, "call.ended": 1}  # fmt: skip
    durable, delta = json.loads(events[0].to_json()), json.loads(events[1].to_json())
    assert set(durable) == {"id", "type", "call_id", "seq", "timestamp", "data"}
    assert set(delta) == set(durable) | {"delta_seq"}
    assert Stored.from_row(1, events[1].to_json(), 0.0).event == events[1]
    assert durable["id"].startswith("evt_")
    assert durable["timestamp"] == "2026-01-01T00:00:00.000Z"


def test_signature_verifies_with_the_reference_library() -> None:
    body = b'{"type":"call.started"}'
    key = decode_secret(SECRET)
    headers = signed_headers([key], "evt_1", 1_700_000_000, body)
    assert headers["webhook-signature"].startswith("v1,")
    wh = Webhook(SECRET)
    # The reference checks the timestamp against now; sign a fresh one for it.
    fresh = signed_headers([key], "evt_1", int(time.time()), body)
    assert wh.verify(body, fresh) == {"type": "call.started"}
    assert headers["webhook-signature"] == sign(key, "evt_1", 1_700_000_000, body)


def _stored(event: Event) -> Stored:
    return Stored(1, event, event.to_json(), 0.0)


async def test_receive_command_verifies_signatures(capsys: pytest.CaptureFixture[str]) -> None:
    from voxphone.receive import create_receiver

    server = TestServer(create_receiver(SECRET), host="127.0.0.1")
    await server.start_server()
    url = str(server.make_url("/any/path"))
    good = HttpTransport(lambda _: url, [SECRET], SystemClock(), 5)
    forged = HttpTransport(lambda _: url, ["whsec_" + "QUJD" * 8], SystemClock(), 5)
    try:
        sent = await good.send(
            _stored(EventSequencer("c", FakeClock()).next("dtmf", {"digit": "5"}))
        )
        refused = await forged.send(_stored(EventSequencer("c", FakeClock()).next("dtmf", {})))
        call = EventSequencer("d", FakeClock())
        for kind in ("call.started", "call.ended"):
            await good.send(_stored(call.next(kind, {})))
    finally:
        await good.close()
        await forged.close()
        await server.close()
    assert sent == Sent() and refused == Retry("HTTP 401")
    out = capsys.readouterr()
    first = json.loads(out.out.splitlines()[0])
    assert first["data"] == {"digit": "5"}
    assert first["received_at"].endswith("Z") and isinstance(first["delay_ms"], int)
    assert "rejected: bad or missing webhook-signature" in out.err
    assert "d: complete: seq 0-1, 0 deltas" in out.err.splitlines()


def test_the_receiver_ledger_names_missing_seqs_until_all_are_in() -> None:
    """What ``voxphone receive`` reports: durable gaps are missing events; delta gaps are not."""
    from voxphone.receive import Ledger

    seqr = EventSequencer("c", FakeClock())
    types = ["call.started", "transcript.delta", "transcript.final", "transcript.delta",
             "dtmf", "call.ended"]  # fmt: skip
    started, _, final, delta, dtmf, ended = [seqr.next(t, {}).to_dict() for t in types]
    ledger = Ledger()
    assert [ledger.add(e) for e in (started, delta, started, ended)] == [
        None, None, None, "c: waiting for seq 1, 2",
    ]  # fmt: skip
    assert ledger.add(dtmf) == "c: waiting for seq 1"
    assert ledger.add(final) == "c: complete: seq 0-3, 1 deltas"
    assert ledger.add(final) is None and ledger.add({"not": "an event"}) is None
