"""Delivery policy as pure functions: backoff, Retry-After, horizons, filters, coalescing, and
signatures across a key rotation (verified by the reference Standard Webhooks library)."""

from __future__ import annotations

import random
import time
from datetime import UTC, datetime

import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from tests.hooks import new_secret
from voxphone.clock import FakeClock
from voxphone.events.delivery import (
    EVENT_HORIZONS,
    Gone,
    Retry,
    Sent,
    backoff_s,
    coalesce,
    horizon_s,
    parse_retry_after,
    wants,
)
from voxphone.events.model import EventSequencer
from voxphone.events.outbox import Stored
from voxphone.events.webhook import classify, decode_secret, signed_headers


def test_backoff_doubles_up_to_the_cap_with_half_of_it_random() -> None:
    rng = random.Random(7)
    for attempt, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (6, 32.0), (12, 600.0), (500, 600.0)]:
        delays = [backoff_s(attempt, 1.0, 600.0, rng) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays), (attempt, min(delays))
        assert max(delays) - min(delays) > ceiling / 4, "jittered, not lockstep"


def test_retry_after_in_seconds_or_as_an_http_date() -> None:
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("7", now) == 7.0
    assert parse_retry_after("Thu, 01 Jan 2026 12:00:30 GMT", now) == 30.0
    assert parse_retry_after("Thu, 01 Jan 2026 11:00:00 GMT", now) == 0.0
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after(None, now) is None


@pytest.mark.parametrize(
    ("status", "result"),
    [
        (200, Sent()),
        (204, Sent()),
        (302, Retry("HTTP 302 (not followed)")),
        (404, Retry("HTTP 404")),
        (500, Retry("HTTP 500")),
        (410, Gone("HTTP 410 Gone")),
    ],
)
def test_only_2xx_is_success_and_410_is_gone(status: int, result: object) -> None:
    assert classify(status, None, datetime.now(UTC)) == result


def test_429_carries_its_retry_after() -> None:
    assert classify(429, "3", datetime.now(UTC)) == Retry("HTTP 429", 3.0)


def test_horizons_deltas_expire_in_seconds_finals_and_calls_last_days() -> None:
    h = {**EVENT_HORIZONS, "call.*": 7 * 86400.0, "call.ended": 30 * 86400.0}
    assert horizon_s(EVENT_HORIZONS, "transcript.delta") == 10.0
    assert horizon_s(EVENT_HORIZONS, "transcript.final") >= 2 * 86400
    assert horizon_s(h, "call.started") == 7 * 86400.0
    assert horizon_s(h, "call.ended") == 30 * 86400.0
    assert horizon_s(h, "dtmf") == EVENT_HORIZONS["*"]


def test_type_filters_take_exact_types_and_prefix_patterns() -> None:
    assert wants([], "dtmf")
    assert wants(["call.*"], "call.ended") and not wants(["call.*"], "dtmf")
    assert wants(["transcript.final", "dtmf"], "dtmf")
    assert not wants(["transcript.final"], "transcript.delta")


def _stored(events: list) -> list[Stored]:  # type: ignore[type-arg]
    return [Stored(i + 1, e, e.to_json(), 0.0) for i, e in enumerate(events)]


def test_coalesced_deltas_keep_the_newest_envelope_and_all_the_text() -> None:
    seq = EventSequencer("c1", FakeClock())
    parts = ["Hel", "lo th", "ere"]
    items = _stored([seq.next("transcript.delta", {"text": t, "segment_id": 2}) for t in parts])
    merged = coalesce(items)
    assert merged.pos == items[-1].pos
    assert merged.event.id == items[-1].event.id and merged.event.delta_seq == 2
    assert merged.event.data == {"text": "Hello there", "segment_id": 2, "coalesced": 3}
    assert Stored.from_row(merged.pos, merged.body, 0.0).event == merged.event
    assert coalesce(items[:1]) is items[0]


def test_rotation_signs_with_every_key_and_either_verifies() -> None:
    old, new, stranger = new_secret(), new_secret(), new_secret()
    body = b'{"type":"call.started","data":{}}'
    now = int(time.time())
    headers = signed_headers([decode_secret(new), decode_secret(old)], "evt_1", now, body)
    assert len(headers["webhook-signature"].split()) == 2
    assert all(s.startswith("v1,") for s in headers["webhook-signature"].split())
    for secret in (old, new):  # receivers on either side of the rotation accept it
        assert Webhook(secret).verify(body, headers)["type"] == "call.started"
    with pytest.raises(WebhookVerificationError):
        Webhook(stranger).verify(body, headers)
    assert "webhook-signature" not in signed_headers([], "evt_1", now, body)
