"""``benchmarks/load.py``, the audio path's load generator (issue #16), run as its README line
runs it: a few callers of each kind against voxphone's ``App``, end to end, its JSON read back.
A handful of calls keeps it quick; what it must show is that every caller's audio reached the
engine and every sampled packet was timed, so the figures it prints at 1,000 calls mean what
they say."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Speech
from voxphone.testing import free_udp_range

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CALLS, SECONDS = 3, 6


@pytest.mark.parametrize(
    ("argv", "codec"),
    [
        (["--codec", "pcma"], "PCMA 20 ms"),
        (["--transport", "twilio", "--loss", "0.1", "--jitter-ms", "10"], "Twilio µ-law 20 ms"),
        (
            ["--codec", "opus", "--opus-answered"],
            "Opus mono 20 ms, 20 kbit/s voip, 8 kHz band (answered)",
        ),
    ],
    ids=["rtp-pcma", "twilio-lossy", "rtp-opus-answered"],
)
def test_load_generator(
    argv: list[str], codec: str, speech: dict[str, Speech], tmp_path: Path
) -> None:
    port, _ = free_udp_range(1)
    out = tmp_path / "load.json"
    # fmt: off
    subprocess.run(
        [sys.executable, "benchmarks/load.py", "--calls", str(CALLS), "--seconds", str(SECONDS),
         "--ramp", "0.5", "--ports", "1", "--base-port", str(port),
         "--speech", str(speech["order"].path), "--out", str(out), *argv],
        cwd=ROOT, check=True, timeout=120, capture_output=True,
    )
    # fmt: on
    r = json.loads(out.read_text())
    assert r["codec"] == codec
    assert r["calls_seen"] == r["calls_up_during_window"] == CALLS
    # Lost packets are silence on the call's timeline: every 80 ms of each call reaches the
    # engine (less the last frame or two, should the last packets be the lost ones).
    assert r["frames"]["dropped"] == 0
    frames = SECONDS * 1000 // 80
    assert CALLS * (frames - 2) <= r["frames"]["to_engine"] <= CALLS * frames
    assert r["packets"]["sampled"] >= CALLS * (SECONDS - 1)
    assert r["packets"]["sampled_not_handled"] == 0
    assert r["packet_latency_ms_whole_run"]["n"] == r["packets"]["sampled"]
    # the steady state: packets sent while every call was up (the CPU figures' window)
    assert 0 < r["packet_latency_ms"]["n"] < r["packets"]["sampled"]
    assert 0 < r["sender_late_ms"]["n"] == r["packet_latency_ms"]["n"]
    assert r["server_cpu_cores"] > 0 and r["calls_per_core"] > 0
    assert r["steal_pct"]["server_cpus_pct"] is None  # (not pinned)
    assert 0 <= r["steal_pct"]["host_pct"] <= 100


def test_a_run_cut_short_at_the_port_measures_while_the_callers_send(
    speech: dict[str, Speech], tmp_path: Path
) -> None:
    """``--stop-at port`` opens no call, so the window starts once every caller's first packet
    was read, not at a time-out after the callers are gone: the steady state has latencies,
    and one port per caller works."""
    port, _ = free_udp_range(CALLS)
    out = tmp_path / "load.json"
    # fmt: off
    subprocess.run(
        [sys.executable, "benchmarks/load.py", "--calls", str(CALLS), "--seconds", str(SECONDS),
         "--ramp", "0.5", "--ports", str(CALLS), "--base-port", str(port), "--stop-at", "port",
         "--speech", str(speech["order"].path), "--out", str(out)],
        cwd=ROOT, check=True, timeout=40, capture_output=True,
    )
    # fmt: on
    r = json.loads(out.read_text())
    assert r["stop_at"] == "port" and r["server_ports"] == CALLS
    assert r["calls_seen"] == 0 and r["frames"]["to_engine"] == 0
    assert r["packets"]["sampled_not_handled"] == 0
    assert 0 < r["packet_latency_ms"]["n"] < r["packets"]["sampled"]


def test_pipecat_peer_needs_twilio_streams() -> None:
    """``--server pipecat`` is Pipecat's Twilio server: without Twilio streams the run is
    refused with one line saying what to add, before anything starts."""
    done = subprocess.run(
        [sys.executable, "benchmarks/load.py", "--server", "pipecat", "--calls", "1"],
        cwd=ROOT, timeout=60, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1].endswith(
        "--server pipecat serves Twilio streams: add --transport twilio"
    )
    assert "Traceback" not in done.stderr


def test_pipecat_peer_missing_is_one_line() -> None:
    """Where Pipecat's server cannot be imported (voxphone's own environment, CI's), asking for
    it is refused with one line naming what to install, not a traceback."""
    if all(map(importlib.util.find_spec, ("pipecat", "fastapi", "uvicorn"))):
        pytest.skip("pipecat-ai, FastAPI and uvicorn are installed here")
    done = subprocess.run(
        [sys.executable, "benchmarks/load.py", "--server", "pipecat", "--transport", "twilio"],
        cwd=ROOT, timeout=60, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 2
    assert "pip install pipecat-ai fastapi uvicorn" in done.stderr.splitlines()[-1]
    assert "Traceback" not in done.stderr


def test_load_generator_against_pipecat(speech: dict[str, Speech], tmp_path: Path) -> None:
    """The same Twilio callers against Pipecat's server (``pipecat_server.py``), where
    pipecat-ai, FastAPI and uvicorn are installed (the benchmark's own venv; not CI's, where
    this is skipped): every call's audio reaches the sink, less what soxr's stream holds back,
    and every sampled message is timed at Pipecat's ``deserialize``."""
    for module in ("pipecat", "fastapi", "uvicorn"):
        pytest.importorskip(module)
    out = tmp_path / "load.json"
    # fmt: off
    subprocess.run(
        [sys.executable, "benchmarks/load.py", "--calls", str(CALLS), "--seconds", str(SECONDS),
         "--ramp", "0.5", "--transport", "twilio", "--server", "pipecat",
         "--speech", str(speech["order"].path), "--out", str(out)],
        cwd=ROOT, check=True, timeout=120, capture_output=True,
    )
    # fmt: on
    r = json.loads(out.read_text())
    assert r["server"] == "pipecat" and r["server_software"].startswith("pipecat-ai ")
    assert r["calls_seen"] == r["calls_up_during_window"] == CALLS
    frames = SECONDS * 1000 // 80
    assert CALLS * (frames - 3) <= r["frames"]["to_engine"] <= CALLS * frames
    assert r["packets"]["sampled"] >= CALLS * (SECONDS - 1)
    assert r["packets"]["sampled_not_handled"] == 0


def test_callers_start_at_independent_moments_the_same_in_every_load_process() -> None:
    """Starts are drawn over the ramp, so the callers' 20 ms packets fall due at independent
    moments; a grid (``--starts grid``) puts 1,000 calls over 3 s on 20 phases, their packets
    due 50 at once. Every load process draws the same starts from the seed."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("load_starts", ROOT / "benchmarks/load.py")
        assert spec is not None and spec.loader is not None
        load = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(load)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    def most_on_one_phase(offsets: list[float]) -> int:  # (phases to the 0.1 ms)
        phases = [round(x * 10_000) % 200 for x in offsets]
        return max(phases.count(p) for p in set(phases))

    args = load.parse(["--calls", "1000"])
    drawn = load.start_offsets(args)
    assert drawn == load.start_offsets(load.parse(["--calls", "1000", "--share", "1/4"]))
    assert all(0 <= x <= args.ramp for x in drawn)
    assert most_on_one_phase(drawn) < 20  # ≈ 5 expected of 1,000 over 200 slots
    grid = load.start_offsets(load.parse(["--calls", "1000", "--starts", "grid"]))
    assert most_on_one_phase(grid) == 50
    other_seed = load.start_offsets(load.parse(["--calls", "1000", "--seed", "2"]))
    assert other_seed != drawn


def test_steal_is_read_per_cpu_from_proc_stat(tmp_path: Path) -> None:
    """The hypervisor's steal (``/proc/stat``'s eighth field) on the server's CPUs and the host:
    what tells a run on a busy shared machine from one the code alone made slow."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import machine
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    stat = tmp_path / "stat"

    def write(cpu0_steal: int, cpu1_steal: int, ticks: int) -> None:
        rows = [
            f"cpu0 {ticks} 0 0 0 0 0 0 {cpu0_steal} 0 0",
            f"cpu1 {ticks} 0 0 0 0 0 0 {cpu1_steal} 0 0",
        ]
        host = f"cpu {2 * ticks} 0 0 0 0 0 0 {cpu0_steal + cpu1_steal} 0 0"
        stat.write_text("\n".join([host, *rows, "intr 1 2 3", "ctxt 9"]) + "\n")

    write(0, 0, 1000)
    before = machine.steal_jiffies({1}, stat), machine.steal_jiffies(None, stat)
    write(0, 100, 1900)  # cpu1: 1,000 ticks, 100 of them stolen; cpu0: 900, none stolen
    after = machine.steal_jiffies({1}, stat), machine.steal_jiffies(None, stat)
    assert machine.steal_pct(before[0], after[0]) == 10.0
    assert machine.steal_pct(before[1], after[1]) == 5.3  # 100 of the host's 1,900 ticks
    assert machine.steal_pct(after[0], after[0]) is None  # no time passed
    assert machine.steal_jiffies(None, tmp_path / "absent") == (0, 0)
