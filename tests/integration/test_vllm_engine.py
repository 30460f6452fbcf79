"""voxphone's ``vllm`` engine as a user runs it: ``voxphone serve`` starting its own vLLM engine
worker processes (vLLM's CPU build, the tiny random-weight Voxtral), RTP calls in, webhooks out.

What a GPU host needs and a CPU can check: voxphone's own process never imports torch (so it
cannot initialise CUDA before vLLM forks its EngineCore — the start failure seen on an H200);
calls spread over several engines and survive one engine dying; a failed start is one line.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import Speech, free_tcp_port, free_udp_range, voxphone_call
from tests.integration.test_serve import Serve, WebhookReceiver, calls_of, running_serve
from voxphone.engines import vllm_compat
from voxphone.engines.tiny_voxtral import write_tiny_voxtral

pytestmark = [pytest.mark.integration]

#: Loaded by every Python process the test starts (PYTHONPATH): at exit each one reports
#: whether it had imported torch, which is what initialising CUDA would take.
SITECUSTOMIZE = """\
import atexit, os, sys
def _report():
    with open(os.environ["VOXPHONE_TEST_IMPORTS"], "a") as f:
        f.write(f"{os.getpid()} torch={'torch' in sys.modules} {' '.join(sys.argv[:2])}\\n")
atexit.register(_report)
"""


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if vllm_compat.installed_version() is None:
        pytest.fail("vLLM (CPU build) is not installed; run scripts/test, which installs it")
    return write_tiny_voxtral(tmp_path_factory.mktemp("tinyvox"))


def vllm_config(path: Path, model: Path, engines: int) -> Path:
    path.write_text(
        f'[engine]\nkind = "vllm"\n[engine.vllm]\nmodel = "{model}"\nload_format = "dummy"\n'
        f'device = "cpu"\nengines = {engines}\nmax_model_len = 1024\nenforce_eager = true\n'
        f'dtype = "bfloat16"\n[calls]\nmax_concurrent = 4\n[rtp]\ninactivity_timeout_s = 1.0\n'
    )
    return path


def processes() -> list[tuple[int, int, list[str]]]:
    """(pid, parent pid, argv) of every process, from /proc."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes().decode().split("\0")
        except (OSError, ValueError):
            continue
        found.append((int(entry.name), int(stat.rsplit(")", 1)[1].split()[1]), argv))
    return found


def serve_pid(http_port: int) -> int:
    """The ``voxphone serve`` process serving HTTP on ``http_port``."""
    (pid,) = [p for p, _, argv in processes() if "serve" in argv and str(http_port) in argv]
    return pid


def worker_pids(parent: int) -> list[int]:
    """The engine workers ``parent`` started, oldest first."""
    return sorted(
        p
        for p, pp, argv in processes()
        if pp == parent and argv[2:3] == ["voxphone.engines.vllm_worker"]
    )


@asynccontextmanager
async def serve_with_engines(
    tmp_path: Path, model: Path, rx: WebhookReceiver
) -> AsyncIterator[tuple[Serve, int, list[int]]]:
    """`voxphone serve` on two vLLM engine workers: (serve, its pid, the workers' pids)."""
    config = vllm_config(tmp_path / "voxphone.toml", model, engines=2)
    await rx.server.start_server()
    try:
        async with running_serve(
            tmp_path, rx, "--config", str(config), ready_timeout_s=240, VLLM_CPU_KVCACHE_SPACE="1"
        ) as serve:
            parent = serve_pid(serve.http_port)
            yield serve, parent, worker_pids(parent)
    finally:
        await rx.server.close()


async def readiness(http_port: int) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{http_port}/ready") as r,
    ):
        return r.status, await r.json()


async def test_serve_runs_vllm_in_engine_workers_and_never_imports_torch_itself(
    tiny_model: Path, speech: dict[str, Speech], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    imports = tmp_path / "imports.txt"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), os.getcwd()]))
    monkeypatch.setenv("VOXPHONE_TEST_IMPORTS", str(imports))
    rx = WebhookReceiver()
    async with serve_with_engines(tmp_path, tiny_model, rx) as (serve, parent, workers):
        assert len(workers) == 2
        lo = serve.rtp_ports[0]
        await asyncio.gather(
            voxphone_call(speech["order"].path, lo), voxphone_call(speech["phone"].path, lo + 2)
        )
        await rx.wait_ended(2, timeout_s=60)
    calls = list(calls_of(rx).values())
    assert len(calls) == 2
    for events in calls:
        types = [e["type"] for e in events]
        assert types[0] == "call.started" and types.count("call.ended") == 1, types
        assert "transcript.delta" in types
        assert events[-1]["data"]["reason"] == "bye"
    # voxphone's own process never imported torch, so it cannot have touched CUDA.
    reports = imports.read_text().splitlines()
    (own,) = [r for r in reports if r.startswith(f"{parent} ")]
    assert "torch=False" in own, reports
    assert any("vllm_worker" in r and "torch=True" in r for r in reports), reports


async def test_a_call_on_a_lost_engine_moves_to_the_other(
    tiny_model: Path, speech: dict[str, Speech], tmp_path: Path
) -> None:
    """Kill the engine that holds a live call: ``engine.error`` (recovered) and the call goes on
    on the other engine, audio since the last final replayed, to the caller's own hang-up; kill
    the other too and ``/ready`` turns 503, naming the cause."""
    rx = WebhookReceiver()
    async with serve_with_engines(tmp_path, tiny_model, rx) as (serve, _, (first, second)):
        caller = asyncio.create_task(voxphone_call(speech["order"].path, serve.rtp_ports[0]))
        await asyncio.sleep(1.5)  # the call's session is on the first engine (least loaded)
        os.killpg(first, signal.SIGKILL)
        await caller
        await rx.wait_ended(1, timeout_s=60)
        status, body = await readiness(serve.http_port)
        assert status == 200, body  # one engine left: still taking calls
        # The last engine goes too: out of rotation, saying why and where vLLM's logs are.
        os.killpg(second, signal.SIGKILL)
        for _ in range(150):  # the connection's loss is noticed within moments
            status, body = await readiness(serve.http_port)
            if status != 200:
                break
            await asyncio.sleep(0.2)
        assert status == 503 and body["status"] == "degraded", body
        assert "every vLLM engine worker (2) has exited; restart voxphone" in body["reason"]
        assert "engine-1.log" in body["reason"]
    (events,) = calls_of(rx).values()
    errors = [e["data"] for e in events if e["type"] == "engine.error"]
    assert len(errors) == 1 and errors[0]["recovered"] is True, errors
    assert "engine worker 0 connection lost" in errors[0]["message"]
    ended = events[-1]["data"]
    assert ended["reason"] == "bye" and ended["engine"]["reconnects"] == 1
    assert ended["engine"]["sessions"] == 2


def test_a_failed_engine_start_is_one_line_with_vllms_root_cause(
    tiny_model: Path, tmp_path: Path
) -> None:
    """vLLM fails inside its EngineCore (asked for more KV cache memory than the machine has):
    one line naming vLLM's own error and where its full log is, exit 2, no traceback."""
    config = vllm_config(tmp_path / "voxphone.toml", tiny_model, engines=1)
    lo, hi = free_udp_range(2)
    r = subprocess.run(
        [
            sys.executable, "-m", "voxphone", "serve", "--config", str(config),
            "--http-port", str(free_tcp_port()), "--rtp-ports", f"{lo}-{hi}",
            "--log-level", "error",
        ],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "100000"},
    )  # fmt: skip
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    (line,) = r.stderr.splitlines()
    assert line.startswith("voxphone: error: engine 'vllm' failed to start: "), line
    assert "100000.0 GiB" in line and "(vLLM's log: " in line
    log = Path(line.rsplit("(vLLM's log: ", 1)[1].rstrip(")"))
    assert "Traceback" in log.read_text()
