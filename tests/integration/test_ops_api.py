"""The delivery operations API's answers: what a wrong request is told, and times as events
write theirs."""

from __future__ import annotations

import re
from pathlib import Path

import aiohttp
import pytest

from tests.hooks import Hook, until
from tests.integration.test_delivery import api, endpoint, service
from voxphone.clock import SystemClock
from voxphone.events.model import EventSequencer

pytestmark = [pytest.mark.integration, pytest.mark.each_loop]

#: The envelope's ``timestamp`` form: RFC 3339, milliseconds, Z.
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


async def test_replay_and_deliveries_answer_precisely(tmp_path: Path) -> None:
    hook = Hook(status=500)
    await hook.start()
    try:
        async with (
            service(tmp_path, endpoint("crm", hook, max_attempts=1)) as svc,
            api(svc) as server,
            aiohttp.ClientSession() as http,
        ):
            event = EventSequencer("c", SystemClock()).next("transcript.final", {"text": "x"})
            svc.publish(event)
            await until(lambda: svc.deliverers["crm"].stats.failed == 1)
            await svc.outbox.flush()
            async with http.get(server.make_url("/v1/deliveries")) as r:
                (failed,) = (await r.json())["deliveries"]
            url = server.make_url("/v1/deliveries/replay")
            answers = []
            for body in (
                {"endpoint": "nobody", "event_id": event.id},
                [],
                {"event_id": event.id},
                {"endpoint": "crm", "since": "yesterday"},
            ):
                async with http.post(url, json=body) as r:
                    answers.append((r.status, (await r.json())["error"]))
    finally:
        await hook.stop()
    assert ISO.match(failed["updated"]), failed
    assert failed["updated"] >= event.timestamp  # the same clock, the same form
    assert answers[0] == (404, "no endpoint 'nobody'")  # as /v1/endpoints/{name}/enable says
    assert answers[1][0] == 400 and answers[1][1].startswith(
        'body: expected a JSON object {"endpoint"'
    )
    assert answers[2] == (400, answers[2][1]) and answers[2][1].startswith(
        "replay: missing 'endpoint'"
    )
    assert answers[3][0] == 400 and "yesterday" in answers[3][1]
