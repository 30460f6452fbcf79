"""Every TLS client path of `voxphone serve`, end to end, on both event loops: https webhooks,
``wss://`` to a `vllm serve` stand-in (``vllm-remote``) and NATS JetStream over ``tls://``.

Each server has a certificate from a private CA (``trustme``), and the process trusts that CA
only through ``SSL_CERT_FILE`` (OpenSSL's default verify paths, which the
``ssl.create_default_context()`` that aiohttp and nats-py use reads): what an operator with a
private CA does. uvloop has SSL code of its own, so each loop is run.

Without the CA (on the default loop): the https webhook and NATS fail verification, a warning
each says so and the events wait in the outbox until the CA is trusted; a ``wss://`` engine
refuses the start.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import ssl
import sys
import wave
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trustme

from tests.conftest import free_tcp_port, free_udp_range, voxphone_call
from tests.fake_realtime import FakeRealtimeServer
from tests.hooks import until
from tests.integration.test_nats import nats_server, read_stream
from tests.integration.test_serve import WebhookReceiver, running_serve

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Pki:
    """A private CA and one server certificate for ``localhost`` and ``127.0.0.1``."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    server: ssl.SSLContext  # serves the certificate
    client: ssl.SSLContext  # trusts the CA (the test's own NATS reader)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    pki = Pki(tmp_path / "ca.pem", tmp_path / "server.pem", tmp_path / "server.key", server, client)
    ca.cert_pem.write_to_path(str(pki.ca_file))
    cert.cert_chain_pems[0].write_to_path(str(pki.cert_file))
    cert.private_key_pem.write_to_path(str(pki.key_file))
    return pki


@pytest.fixture(autouse=True)
def _no_inherited_trust(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CA is trusted where a test says so, never through this shell's variables."""
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)


def tone_wav(path: Path) -> Path:
    """8 kHz: 0.5 s silence, 1 s tone, 1 s silence, 1 s tone, 0.5 s silence. The fake engine
    writes a word per loud 80 ms frame, so two runs of words with a pause between."""
    t = np.arange(8000) / 8000
    tone = (np.sin(2 * np.pi * 300 * t) * 8000).astype(np.int16)
    gap = np.zeros(4000, np.int16)
    pcm = np.concatenate([gap, tone, gap, gap, tone, gap])
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(pcm.tobytes())
    return path


def use_engine(monkeypatch: pytest.MonkeyPatch, fake: FakeRealtimeServer) -> None:
    """`voxphone serve` processes the test starts transcribe with ``vllm-remote`` on ``fake``."""
    monkeypatch.setenv("VOXPHONE_ENGINE__KIND", "vllm-remote")
    monkeypatch.setenv("VOXPHONE_ENGINE__VLLM_REMOTE__URLS", json.dumps([fake.url]))
    monkeypatch.setenv("VOXPHONE_ENGINE__VLLM_REMOTE__MODEL", fake.model)
    monkeypatch.setenv("VOXPHONE_ENGINE__VOXTRAL__PAUSE_S", "0.4")
    monkeypatch.setenv("VOXPHONE_RTP__INACTIVITY_TIMEOUT_S", "1.0")


def rows(db: Path, sql: str) -> list[tuple[Any, ...]]:
    """The outbox's answer to ``sql`` (read while the process writes it: WAL)."""
    with closing(sqlite3.connect(db)) as c:
        return c.execute(sql).fetchall()


def column(db: Path, sql: str) -> list[Any]:
    return [r[0] for r in rows(db, sql)]


def logged(tmp_path: Path) -> list[dict[str, Any]]:
    lines = (tmp_path / "serve.log").read_text().splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
async def test_webhook_engine_and_nats_over_tls_with_a_private_ca(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loop: str
) -> None:
    """One RTP call (`voxphone call`, PCMU, 4 s) transcribed over ``wss://localhost``, its
    events signed to ``https://127.0.0.1`` and published to ``tls://127.0.0.1``."""
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    receiver = WebhookReceiver()
    await receiver.server.start_server(ssl=pki.server)
    fake = FakeRealtimeServer(ssl=pki.server)
    await fake.start()
    use_engine(monkeypatch, fake)
    assert str(receiver.server.make_url("/hooks")).startswith("https://127.0.0.1:")
    assert fake.url.startswith("wss://localhost:")
    try:
        async with nats_server(tmp_path, tls=(pki.cert_file, pki.key_file)) as nats:
            assert nats.url.startswith("tls://127.0.0.1:")
            async with running_serve(
                tmp_path, receiver, "--event-loop", loop, n_ports=2,
                SSL_CERT_FILE=str(pki.ca_file), VOXPHONE_NATS__URL=nats.url,
            ) as srv:  # fmt: skip
                await voxphone_call(tone_wav(tmp_path / "tone.wav"), srv.rtp_ports[0], timeout_s=30)
                await receiver.wait_ended(1, timeout_s=30)
                call_id = receiver.events[0]["call_id"]
                stored = await read_stream(nats.url, "VOXPHONE", pki.client)
                last = "voxphone.events.call.ended"
                async with asyncio.timeout(30):
                    while [m.subject for m in stored[-1:]] != [last]:  # noqa: ASYNC110
                        await asyncio.sleep(0.2)  # (the server's state)
                        stored = await read_stream(nats.url, "VOXPHONE", pki.client)
    finally:
        await fake.stop()
        await receiver.server.close()

    log = logged(tmp_path)
    (ready,) = [e for e in log if e["event"] == "voxphone_ready"]
    assert ready["event_loop"] == loop
    # Trusted at the first attempt: no warning, no failure on any path. (Over TLS, closing
    # nats-py's client makes asyncio warn "returning true from eof_received() has no effect
    # when using ssl": nats-py's connect_tls hands start_tls a protocol never told it is on
    # TLS. Not about trust, and not voxphone's.)
    eof = "returning true from eof_received() has no effect when using ssl"
    warned = [e for e in log if e["level"] in ("warning", "error") and e["event"] != eof]
    assert not warned, warned
    failures = {"endpoint_failing", "nats_error", "vllm_server_unusable", "engine_error"}
    assert not [e for e in log if e["event"] in failures], log

    # The webhook: one signed call, the fake engine's words in it.
    assert receiver.bad_signatures == 0
    events = receiver.events
    assert {e["call_id"] for e in events} == {call_id}
    assert events[0]["type"] == "call.started" and events[0]["data"]["codec"] == "PCMU"
    ended = events[-1]
    assert ended["type"] == "call.ended" and ended["data"]["reason"] == "bye"
    finals = [e["data"]["text"] for e in events if e["type"] == "transcript.final"]
    assert len(finals) == 2, finals  # two tones, a pause between
    words = " ".join(finals).split()
    assert words == [f"w{n}" for n in range(1, len(words) + 1)], words
    assert 20 <= len(words) <= 28, words  # 25 loud 80 ms frames
    assert ended["data"]["transcript"] == " ".join(finals)
    # The engine: one wss:// session that heard the whole call (4 s at 16 kHz) and was ended.
    (conn,) = fake.connections
    assert conn.model == "tinyvox" and conn.final
    assert abs(sum(a.size for a in conn.audio) - 4 * 16000) <= 1600

    # NATS: the same call; every event the webhook got, the same JSON (a webhook delta may
    # stand for several, under a backlog); and every delta, whose words are the finals'.
    in_stream = {m.headers["Nats-Msg-Id"]: m for m in stored if m.headers}
    assert len(in_stream) == len(stored)
    assert {m.headers["Voxphone-Call-Id"] for m in stored if m.headers} == {call_id}
    durable = [e for e in events if "delta_seq" not in e]
    assert [e["seq"] for e in durable] == list(range(len(durable)))
    for e in events:
        m = in_stream[e["id"]]
        assert m.subject == f"voxphone.events.{e['type']}"
        if "coalesced" not in e["data"]:
            assert json.loads(m.data or b"") == e
    segments: dict[int, str] = {}
    for m in stored:
        if m.subject == "voxphone.events.transcript.delta":
            data = json.loads(m.data or b"")["data"]
            segments[data["segment_id"]] = segments.get(data["segment_id"], "") + data["text"]
    assert [t.strip() for t in segments.values()] == finals


async def test_untrusted_certificates_keep_the_events_in_the_outbox_until_trusted(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the CA, the https webhook and NATS over TLS fail verification: a warning names
    the cause, nothing is delivered, the process serves the call and exits 0 with every event
    pending in the outbox; started again with ``SSL_CERT_FILE``, it delivers them."""
    receiver = WebhookReceiver()
    await receiver.server.start_server(ssl=pki.server)
    fake = FakeRealtimeServer()  # the engine in plain ws:// (an untrusted one refuses the start)
    await fake.start()
    use_engine(monkeypatch, fake)
    monkeypatch.setenv("VOXPHONE_NATS__ACK_TIMEOUT_S", "1.0")
    db = tmp_path / "events.db"
    tried = "SELECT endpoint, last_error FROM deliveries WHERE status = 'pending' AND attempts > 0"
    pending = "SELECT endpoint, count(*) FROM deliveries WHERE status = 'pending' GROUP BY endpoint"
    try:
        async with nats_server(tmp_path, tls=(pki.cert_file, pki.key_file)) as nats:
            monkeypatch.setenv("VOXPHONE_NATS__URL", nats.url)
            async with running_serve(tmp_path, receiver, n_ports=2) as srv:
                await voxphone_call(tone_wav(tmp_path / "tone.wav"), srv.rtp_ports[0], timeout_s=30)
                await until(lambda: "call.ended" in column(db, "SELECT type FROM events"), 30)
                await until(lambda: {r[0] for r in rows(db, tried)} == {"default", "nats"}, 30)
            assert receiver.events == [] and receiver.bad_signatures == 0
            untrusted = logged(tmp_path)
            (tmp_path / "serve.log").rename(tmp_path / "untrusted.log")
            ids = column(db, "SELECT id FROM events")
            waiting = rows(db, pending)
            last_errors = rows(db, tried)
            async with running_serve(tmp_path, receiver, n_ports=2, SSL_CERT_FILE=str(pki.ca_file)):
                await receiver.wait_ended(1, timeout_s=30)
                await until(lambda: not rows(db, pending), 30)
            stored = await read_stream(nats.url, "VOXPHONE", pki.client)
    finally:
        await fake.stop()
        await receiver.server.close()

    # A warning once per endpoint, not per attempt, naming the cause: NATS's too, although
    # nats-py retries the handshake within the connect (every 0.5 s) until its time is up.
    failing = {e["endpoint"]: e for e in untrusted if e["event"] == "endpoint_failing"}
    (nats_error,) = [e for e in untrusted if e["event"] == "nats_error"]
    assert sorted(failing) == ["default", "nats"], untrusted
    for e in (failing["default"], failing["nats"], nats_error):
        assert e["level"] == "warning"
        assert "CERTIFICATE_VERIFY_FAILED" in e["error"], e
    assert failing["nats"]["error"].startswith("TimeoutError: no connection within 1 s; ")
    assert not [e for e in untrusted if e["level"] == "error"], untrusted
    assert "Traceback" not in (tmp_path / "untrusted.log").read_text()
    assert sorted(waiting) == [("default", len(ids)), ("nats", len(ids))]
    assert all("CERTIFICATE_VERIFY_FAILED" in (error or "") for _, error in last_errors)
    # The stop says what it left behind; the next start says what it took up.
    (left,) = [e for e in untrusted if e["event"] == "outbox_left_pending"]
    assert left["pending"] == {"default": len(ids), "nats": len(ids)}

    # Trusted: the webhook gets every durable event (deltas are folded under the backlog, or
    # dropped past their 10 s horizon, by design) ...
    outcomes = set(rows(db, "SELECT endpoint, type = 'transcript.delta', status FROM deliveries "
                            "JOIN events USING (pos)"))  # fmt: skip
    assert ("default", 0, "delivered") in outcomes and ("nats", 0, "delivered") in outcomes
    assert outcomes <= {
        ("default", 0, "delivered"), ("default", 1, "delivered"), ("default", 1, "coalesced"),
        ("default", 1, "expired"), ("nats", 0, "delivered"), ("nats", 1, "delivered"),
    }, outcomes  # fmt: skip
    durable = [e for e in receiver.events if "delta_seq" not in e]
    assert [e["id"] for e in durable] == column(
        db, "SELECT id FROM events WHERE type != 'transcript.delta' ORDER BY pos"
    )
    assert [e["seq"] for e in durable] == list(range(len(durable)))
    assert durable[0]["type"] == "call.started" and durable[-1]["type"] == "call.ended"
    assert receiver.bad_signatures == 0
    # ... and the stream every event, once.
    assert sorted(m.headers["Nats-Msg-Id"] for m in stored if m.headers) == sorted(ids)


async def test_an_untrusted_engine_certificate_refuses_the_start(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine is checked at the start (``/v1/models`` over https): an untrusted certificate
    is a start-up error that names it, exit status 2."""
    fake = FakeRealtimeServer(ssl=pki.server)
    await fake.start()
    use_engine(monkeypatch, fake)
    try:
        serve = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "voxphone", "serve", "--http-port", str(free_tcp_port()),
            "--rtp-ports", "{}-{}".format(*free_udp_range(1)), "--log-format", "json",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await asyncio.wait_for(serve.communicate(), 30)
    finally:
        await fake.stop()
    assert serve.returncode == 2
    head, why = err.decode().splitlines()[-2:]
    assert head == "voxphone: error: no vLLM realtime server is usable:", err
    url = f"https://localhost:{fake.port}/v1/models"
    assert why.startswith(f"  {url}: ClientConnectorCertificateError: "), why
    assert "CERTIFICATE_VERIFY_FAILED" in why, why
    assert not fake.connections
