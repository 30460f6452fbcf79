"""The outbox inside a real `voxphone serve`: `kill -9` mid-delivery loses nothing, and a database
that can't be written makes the process not-ready (with the reason) while audio keeps flowing."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import Speech, free_tcp_port, free_udp_range
from tests.hooks import Hook, by_call, metric, new_secret, until
from tests.integration.test_serve import wait_ready
from voxphone.audio.codecs import PCMU
from voxphone.audio.files import read_audio
from voxphone.testing import rtp_packets, send_rtp

pytestmark = pytest.mark.integration


class Serve:
    """`voxphone serve` webhooks to ``hook``, its outbox in ``db``; one RTP port per call."""

    def __init__(self, tmp_path: Path, hook: Hook, calls: int, **env: str) -> None:
        self.http_port = free_tcp_port()
        self.rtp = free_udp_range(calls)
        self.db = tmp_path / "events.db"
        self.log = tmp_path / "serve.log"
        self.hook = hook
        self.env = {**os.environ, "VOXPHONE_ASTERISK__AUDIOSOCKET_PORT": "0",
                    "VOXPHONE_OUTBOX__PATH": str(self.db),
                    "VOXPHONE_RTP__INACTIVITY_TIMEOUT_S": "1.0", **env}  # fmt: skip
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> asyncio.subprocess.Process:
        with self.log.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "voxphone", "serve", "--http-port", str(self.http_port),
                "--rtp-ports", "{}-{}".format(*self.rtp), "--webhook", self.hook.url,
                "--webhook-secret", self.hook.secret or "", "--log-format", "json",
                env=self.env, stdout=log, stderr=log,
            )  # fmt: skip
        await wait_ready(self.http_port, self.proc)
        return self.proc

    async def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), 30)

    def count(self, sql: str) -> int:
        with sqlite3.connect(self.db) as db:
            return int(db.execute(sql).fetchone()[0])


async def test_kill_9_mid_delivery_then_restart_loses_nothing(
    speech: dict[str, Speech], tmp_path: Path
) -> None:
    hook = Hook(secret=new_secret(), delay_s=0.25)  # slow: deliveries are still in flight
    await hook.start()
    serve = Serve(tmp_path, hook, calls=3)
    try:
        proc = await serve.start()
        senders = [
            send_rtp(list(rtp_packets(read_audio(s.path, 8000), PCMU, seed=i)), ("127.0.0.1", port))
            for i, (s, port) in enumerate(zip(speech.values(), range(serve.rtp[0], serve.rtp[1] + 1), strict=True))
        ]  # fmt: skip
        await asyncio.gather(*senders)
        ended = "SELECT count(*) FROM events WHERE type = 'call.ended'"
        await until(lambda: serve.count(ended) == 3, timeout_s=60)
        await hook.until(lambda: len(hook.accepted) >= 2)
        proc.send_signal(signal.SIGKILL)
        assert await proc.wait() == -signal.SIGKILL
        before = len(hook.unique())
        total = serve.count("SELECT count(*) FROM events")
        assert before < total, "killed mid-delivery"
        hook.delay_s = 0
        await serve.start()
        await hook.until(lambda: sum(e["type"] == "call.ended" for e in hook.unique()) == 3, 60)
        assert await serve.stop() == 0, serve.log.read_text()[-3000:]
    finally:
        await hook.stop()
    assert hook.bad_signatures == 0
    settled = serve.count(
        "SELECT count(*) FROM deliveries WHERE status IN ('delivered', 'coalesced')"
    )
    assert settled == total, "every committed event was delivered (or coalesced into one that was)"
    for call_id, events in by_call(hook.unique()).items():
        order = [(e["seq"], e.get("delta_seq", -1)) for e in events]
        assert order == sorted(order), f"{call_id}: ordered per call across the restart"
        assert events[0]["type"] == "call.started" and events[-1]["type"] == "call.ended"
        durable = [e["seq"] for e in events if "delta_seq" not in e]
        count = serve.count(
            f"SELECT count(*) FROM events WHERE call_id = '{call_id}' "
            "AND type != 'transcript.delta'"
        )
        assert durable == list(range(count)), f"{call_id}: every durable event, no gap"


async def test_an_unwritable_outbox_is_loud_and_audio_keeps_flowing(tmp_path: Path) -> None:
    hook = Hook(secret=new_secret())
    await hook.start()
    serve = Serve(tmp_path, hook, calls=1, VOXPHONE_OUTBOX__BUSY_TIMEOUT_MS="100")
    ready_url = f"http://127.0.0.1:{serve.http_port}/ready"
    try:
        await serve.start()
        holder = sqlite3.connect(serve.db, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")  # a stuck writer elsewhere: the outbox can't commit
        silence = [p for p in rtp_packets(read_silence(4.0), PCMU, seed=1)]
        caller = asyncio.create_task(send_rtp(silence, ("127.0.0.1", serve.rtp[0])))
        async with aiohttp.ClientSession() as http:
            body = await until_status(http, ready_url, 503)
            assert body["status"] == "degraded" and "locked" in body["reason"]
            async with http.get(f"http://127.0.0.1:{serve.http_port}/metrics") as r:
                scraped = await r.text()
            assert metric(scraped, "voxphone_outbox_healthy") == 0
            assert metric(scraped, "voxphone_outbox_write_errors_total") >= 1
            calls_url = f"http://127.0.0.1:{serve.http_port}/v1/calls"
            first = await audio_ms(http, calls_url)
            await until_more_audio(http, calls_url, first)
            holder.execute("ROLLBACK")
            holder.close()
            await until_status(http, ready_url, 200)
        await caller
        await hook.until(
            lambda: [e["type"] for e in hook.accepted] == ["call.started", "call.ended"]
        )
        assert await serve.stop() == 0
    finally:
        await hook.stop()
    log = serve.log.read_text()
    assert "outbox_write_failed" in log and "outbox_write_recovered" in log


async def test_a_second_serve_on_the_same_outbox_refuses_to_start(tmp_path: Path) -> None:
    """Two processes on one outbox would each deliver every event: the second stops at once,
    exit 2, one line naming ``outbox.path`` and the holder, no traceback."""
    hook = Hook(secret=new_secret())
    first, second = Serve(tmp_path, hook, calls=1), Serve(tmp_path, hook, calls=1)
    try:
        holder = await first.start()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "voxphone", "serve", "--http-port", str(second.http_port),
            "--rtp-ports", "{}-{}".format(*second.rtp), "--log-format", "json",
            env=second.env, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            _, err = await asyncio.wait_for(proc.communicate(), 20)
        finally:
            if proc.returncode is None:  # it started: the outbox was not locked
                proc.kill()
                await proc.wait()
        assert await first.stop() == 0
    finally:
        await hook.stop()
    errors = [line for line in err.decode().splitlines() if not line.startswith("{")]
    assert proc.returncode == 2, err.decode()
    assert errors == [
        f"voxphone: error: outbox.path {first.db} is in use by another voxphone "
        f"(pid {holder.pid}): run one process per outbox file, or give this one its own "
        "outbox.path"
    ]


def read_silence(seconds: float) -> object:
    import numpy as np

    return np.zeros(int(8000 * seconds), dtype=np.int16)


async def until_status(http: aiohttp.ClientSession, url: str, status: int) -> dict[str, str]:
    async with asyncio.timeout(15):
        while True:
            async with http.get(url) as r:
                if r.status == status:
                    result: dict[str, str] = await r.json()
                    return result
            await asyncio.sleep(0.05)


async def audio_ms(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(url) as r:
        calls = (await r.json())["calls"]
    return int(calls[0]["audio_ms"]) if calls else 0


async def until_more_audio(http: aiohttp.ClientSession, url: str, than: int) -> None:
    async with asyncio.timeout(10):
        while await audio_ms(http, url) <= than + 200:  # noqa: ASYNC110 (another process)
            await asyncio.sleep(0.05)
